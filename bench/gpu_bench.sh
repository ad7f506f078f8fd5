#!/usr/bin/env bash
# One prepared run for a lent GPU machine (one H100/H200, no network; runs 1-4 ~7 minutes of its 15, 5-7 ~5 more:
# run 1-4 alone where time is short): training and
# reference-scoring speed against TRL 1.12's DPOTrainer (precompute_ref_log_probs) on real-length pairs, a
# profile by device time, and the checks that need a GPU (bench/gpu_checks.py). Everything is also written
# to $OUT/gpu_bench.log (or ./gpu_bench.log).
#
# That machine has torch (CUDA), transformers, accelerate and peft; trl, datasets and vaderSentiment travel
# as wheels. Before the run, here (x86-64 wheels for its Python 3.12; see the device tool's README):
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#       -d .whl trl==1.12.0 datasets==5.2.0 transformers==5.23.0 peft==0.21.2 vaderSentiment==3.3.2 \
#       dill multiprocess xxhash 'fsspec<=2026.9.0'
# (not pyarrow: the machine's pyarrow 25 works, 24.0.0 breaks datasets on Python 3.12), then run
#   bench/gpu_bench.sh            with `.whl` carried, timeout_s 540
set -euo pipefail
cd "$(dirname "$0")/.."
LOG="${OUT:-.}/gpu_bench.log"
exec > >(tee "$LOG") 2>&1
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site
fi
# Fail in seconds, not after minutes of device time, if anything is missing.
python3 -c "import torch, transformers, accelerate, peft, trl, datasets, vaderSentiment; \
print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.get_device_name(0), \
'transformers', transformers.__version__, 'trl', trl.__version__, 'datasets', datasets.__version__)"
nvidia-smi --query-gpu=name,memory.total --format=csv
export TQDM_DISABLE=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONUNBUFFERED=1
REAL="--pair_lengths real --max_length 1024 --precision bf16 --threads 16"
start=$SECONDS
# 1. mixtral-1b, 16 pairs/step: ours packed (the CUDA default) and padded against TRL's precompute
python3 bench/bench_dpo.py --preset mixtral-1b --batch_size 16 --steps 8 --warmup 3 $REAL --workdir /tmp/bench_1b \
    --configs ours_padding_free,ours_padded,trl_precompute || echo "[run 1 incomplete]"
echo "[${SECONDS}s]"
# 2. Mixtral-8x7B's layer shapes (2 layers), 8 pairs/step
python3 bench/bench_dpo.py --preset mixtral-8x7b-2l --batch_size 8 --steps 6 --warmup 2 $REAL \
    --configs ours_padding_free,trl_precompute || echo "[run 2 incomplete]"
echo "[${SECONDS}s]"
# 3. where ours spends the device's time (reuses run 1's checkpoint and pairs)
python3 bench/bench_dpo.py --preset mixtral-1b --batch_size 16 --steps 3 --warmup 2 $REAL --workdir /tmp/bench_1b \
    --configs ours_padding_free --profile || echo "[run 3 incomplete]"
echo "[${SECONDS}s]"
# 4. packed vs padded on the flash kernel, host syncs per step, LoRA over an FP8 base
python3 bench/gpu_checks.py
echo "[${SECONDS}s]"
# 5. a dense model: SmolLM2-135M-Instruct's shapes (random weights), HH-like pairs, 16 pairs/step
python3 bench/bench_dpo.py --preset smollm2-135m-shape --pair_lengths hh --max_length 512 --batch_size 16 --steps 6 \
    --warmup 2 --precision bf16 --threads 16 --configs ours_padding_free,ours_padded,trl_precompute || echo "[run 5 incomplete]"
echo "[${SECONDS}s]"
# 6. the length sweep: TRL's precompute, ours padded and packed at each length, 4 pairs/step
python3 bench/bench_dpo.py --preset mixtral-1b --lengths 512,1024,2048,4096 --batch_size 4 --steps 3 --warmup 2 \
    --precision bf16 --threads 16 || echo "[run 6 incomplete]"
echo "[${SECONDS}s]"
# 7. --torch_compile: ours packed, compiled and not (packed lengths vary: see bench/RESULTS.md)
python3 bench/bench_dpo.py --preset mixtral-1b --batch_size 16 --steps 8 --warmup 3 $REAL --workdir /tmp/bench_1b \
    --configs ours_padding_free,ours_padded --torch_compile || echo "[run 7 incomplete]"
echo "[$((SECONDS - start))s in all]"
