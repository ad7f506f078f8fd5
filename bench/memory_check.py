"""utils/memory.py's estimate against a measured peak on CPU (docs/scaling.md, "Estimating a run's memory").

    python bench/memory_check.py [--presets mixtral-toy mixtral-small] [--batch_sizes 8 32]

The runtime constant (utils/memory.py RUNTIME_BYTES) comes from `--presets mixtral-tiny --batch_sizes 1`, not from the
checked runs. Each (preset, batch size) trains 3 steps of train_dpo.py on the toy pairs in its own process (float32, one thread).
Measured: the process's peak resident memory during training (Linux VmHWM, reset when training begins, after the
reference pass) minus its resident memory just before the model was built. Estimated: estimate_peak_memory for
the largest micro-batch the run met (its padded tokens and completion tokens), the same function --dry_run uses.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

DRIVER = r"""
import json, sys
import torch
from transformers import TrainerCallback
import train_dpo
from utils.memory import estimate_peak_memory

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024

seen = {"baseline": None, "tokens": 0, "completion": 0, "length": 0}
load_model = train_dpo.load_model
def recording_load_model(*args, **kwargs):
    seen["baseline"] = status("VmRSS:")
    return load_model(*args, **kwargs)
train_dpo.load_model = recording_load_model

compute_loss = train_dpo.DPOTrainer.compute_loss
def recording_compute_loss(self, model, inputs, *args, **kwargs):
    if model.training and inputs["input_ids"].numel() > seen["tokens"]:
        seen.update(tokens=inputs["input_ids"].numel(), completion=len(inputs["completion_positions"]),
                    length=inputs["input_ids"].shape[1])
    return compute_loss(self, model, inputs, *args, **kwargs)
train_dpo.DPOTrainer.compute_loss = recording_compute_loss

class ResetPeak(TrainerCallback):
    def on_train_begin(self, *args, **kwargs):
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
init = train_dpo.DPOTrainer.__init__
def init_with_callback(self, *args, **kwargs):
    kwargs["callbacks"] = [*kwargs.get("callbacks", []), ResetPeak()]
    init(self, *args, **kwargs)
train_dpo.DPOTrainer.__init__ = init_with_callback

trainer = train_dpo.main(sys.argv[1:])
estimate, engine = estimate_peak_memory(trainer.model, trainer.args, tokens=seen["tokens"],
                                        completion_tokens=seen["completion"], sequence_length=seen["length"],
                                        world_size=1)
print("RESULT " + json.dumps({"measured": status("VmHWM:") - seen["baseline"], "estimate": estimate.total,
                              "parts": {k: v for k, v in vars(estimate).items()}, "tokens": seen["tokens"]}))
"""


def measure(preset: str, batch_size: int, workdir: str) -> dict:
    out = os.path.join(workdir, f"{preset}-{batch_size}")
    argv = ["--model_name_or_path", preset, "--per_device_train_batch_size", str(batch_size), "--max_steps", "3",
            "--toy_num_train_pairs", str(8 * batch_size), "--toy_num_eval_pairs", "8", "--use_cpu", "true",
            "--bf16", "false", "--output_dir", out, "--ref_logps_cache_dir", os.path.join(workdir, "cache"),
            "--save_strategy", "no", "--report_to", "none", "--disable_tqdm", "true", "--logging_steps", "1",
            "--optim", "adamw_torch", "--seed", "0"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    run = subprocess.run([sys.executable, "-c", DRIVER, *argv], cwd=REPO, env=env, capture_output=True, text=True,
                         check=True)
    line = next(line for line in run.stdout.splitlines() if line.startswith("RESULT "))
    return json.loads(line.removeprefix("RESULT "))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=["mixtral-toy", "mixtral-small"])
    parser.add_argument("--batch_sizes", nargs="+", type=int, default=[8, 32])
    args = parser.parse_args()
    print("| preset | pairs per micro-batch | tokens (padded) | estimate (MiB) | measured (MiB) | estimate / measured |")
    print("| --- | --- | --- | --- | --- | --- |")
    with tempfile.TemporaryDirectory() as workdir:
        for preset in args.presets:
            for batch_size in args.batch_sizes:
                result = measure(preset, batch_size, workdir)
                estimate, measured = result["estimate"] / 2**20, result["measured"] / 2**20
                print(f"| {preset} | {batch_size} | {result['tokens']} | {estimate:.0f} | {measured:.0f} | "
                      f"{estimate / measured:.2f} |", flush=True)
                print("    parts (MiB): " + ", ".join(f"{k} {v / 2**20:.0f}" for k, v in result["parts"].items()),
                      file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
