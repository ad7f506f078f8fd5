#!/usr/bin/env bash
# One prepared run for a lent GPU machine (H100/H200, ~15 minutes of device time in all, no network):
# ours vs TRL's DPOTrainer on the ~1.3B-parameter Mixtral-style preset, bf16, printing tokens/s, MFU
# against the measured bf16 matmul peak, and peak GPU memory.
#
# That machine has torch (CUDA), transformers, accelerate and peft but no trl, datasets or vaderSentiment.
# Before the run, here (x86-64 wheels for its Python 3.12, see the device tool's README):
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#       -d .whl trl==1.12.0 datasets==5.2.0 vaderSentiment==3.3.2 transformers==5.23.0 \
#       dill xxhash multiprocess pyarrow fsspec
# then run this script with `.whl` carried.
set -euo pipefail
cd "$(dirname "$0")/.."
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site
fi
# Fail in seconds, not after minutes of device time, if anything is missing.
python3 -c "import torch, transformers, accelerate, peft, trl, datasets, vaderSentiment; \
print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.get_device_name(0), \
'transformers', transformers.__version__, 'trl', trl.__version__)"
nvidia-smi --query-gpu=name,memory.total --format=csv
export TQDM_DISABLE=1 HF_HUB_OFFLINE=1
python3 bench/bench_dpo.py --preset mixtral-1b --precision bf16 --batch_size 8 --max_length 1024 \
    --steps 10 --warmup 3 --threads 16 --configs trl,trl_precompute,ours_padding_free "$@"
