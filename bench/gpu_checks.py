"""The checks that need a GPU, run by bench/gpu_bench.sh after the speed runs; each prints lines starting "CHECK".

    python3 bench/gpu_checks.py [--checks packed,syncs,fp8]

packed  one DPO batch of real-length pairs on mixtral-1b, bf16: loss and gradients with packed rows through
        `varlen` (the flash kernel) against padded rows through sdpa; differences at bf16's rounding (~1e-2
        relative) are expected, a packing error shows as O(1).
syncs   host syncs per steady-state training step of a packed run (torch.cuda.set_sync_debug_mode), each with
        the Python line that made it; the target is at most 2.
fp8     train_dpo.py with --use_peft --load_in_fp8 on a small bf16 checkpoint, a few steps: the loss is finite
        and the adapters moved.

On a machine without CUDA the script runs the packed check on CPU in float32 (a smoke test of the script).
"""

import argparse
import os
import sys
import tempfile
import traceback
import warnings

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "bench"))

import torch  # noqa: E402
from transformers import TrainerCallback  # noqa: E402

from bench_dpo import real_length_pairs  # noqa: E402
from train_dpo import DPOArguments, DPOTrainer  # noqa: E402
from utils.data import DataArguments, PreferenceCollator, prepare_split  # noqa: E402
from utils.modeling import ModelArguments, load_model, load_tokenizer  # noqa: E402

CUDA = torch.cuda.is_available()


def pairs_dataset(tokenizer, num_pairs: int):
    from datasets import Dataset

    raw = Dataset.from_list(real_length_pairs(num_pairs, tokenizer))
    return prepare_split(raw, DataArguments(dataset_name="real-length pairs", max_length=1024), tokenizer, "train")


def check_packed(preset: str) -> None:
    tokenizer = load_tokenizer(ModelArguments(model_name_or_path=preset))
    rows = list(pairs_dataset(tokenizer, 4))
    results = {}
    for packed in (False, True):
        model = load_model(ModelArguments(model_name_or_path=preset), tokenizer, packed=packed)
        args = DPOArguments(output_dir=tempfile.mkdtemp(), report_to="none", bf16=CUDA, use_cpu=not CUDA,
                            reference_free=True, router_aux_loss_coef=0.0)
        trainer = DPOTrainer(model=model, args=args, processing_class=tokenizer)
        batch = trainer._prepare_inputs(PreferenceCollator(tokenizer.pad_token_id, padding_free=packed)(rows))
        trainer.model.train()
        loss = trainer.compute_loss(trainer.model, batch)
        loss.backward()
        results[packed] = (loss.item(), {n: p.grad.float() for n, p in trainer.model.named_parameters()},
                           model.config._attn_implementation)
        del trainer, model
    (padded_loss, padded_grads, padded_attn), (packed_loss, packed_grads, packed_attn) = results[False], results[True]
    worst = max(((packed_grads[n] - g).norm() / g.norm().clamp_min(1e-12)).item() for n, g in padded_grads.items())
    print(f"CHECK packed: {preset}, {'bf16' if CUDA else 'fp32'}; loss padded ({padded_attn}) {padded_loss:.6f}, "
          f"packed ({packed_attn}) {packed_loss:.6f}, relative difference "
          f"{abs(packed_loss - padded_loss) / abs(padded_loss):.2e}; worst relative gradient difference "
          f"{worst:.2e}", flush=True)


class SyncsPerStep(TrainerCallback):
    """Records the synchronizing CUDA calls of each optimizer step from the third on (set_sync_debug_mode)."""

    def __init__(self):
        self.per_step, self.recorder = [], None

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step >= 2:
            self.recorder = warnings.catch_warnings(record=True)
            self.records = self.recorder.__enter__()
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")

    def on_step_end(self, args, state, control, **kwargs):
        if self.recorder is not None:
            torch.cuda.set_sync_debug_mode("default")
            self.recorder.__exit__(None, None, None)
            self.per_step.append([f"{os.path.relpath(w.filename, REPO)}:{w.lineno}" for w in self.records
                                  if "synchronizing" in str(w.message)])
            self.recorder = None


def check_syncs(preset: str) -> None:
    tokenizer = load_tokenizer(ModelArguments(model_name_or_path=preset))
    model_args = ModelArguments(model_name_or_path=preset)
    model = load_model(model_args, tokenizer, packed=True)
    dataset = pairs_dataset(tokenizer, 8 * 6)
    counter = SyncsPerStep()
    args = DPOArguments(output_dir=tempfile.mkdtemp(), ref_logps_cache_dir=tempfile.mkdtemp(), report_to="none",
                        per_device_train_batch_size=8, max_steps=6, logging_steps=1000, save_strategy="no",
                        padding_free=True, bf16=True)
    trainer = DPOTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                         data_collator=PreferenceCollator(tokenizer.pad_token_id, padding_free=True),
                         model_args=model_args, data_args=DataArguments(max_length=1024), callbacks=[counter])
    trainer.train()
    counts = [len(step) for step in counter.per_step]
    print(f"CHECK syncs: {preset}, packed, bf16, AdamW: host syncs per step {counts} (target <= 2)", flush=True)
    for where in sorted(set(counter.per_step[-1])):
        print(f"CHECK syncs:   at {where}", flush=True)


def check_fp8() -> None:
    import train_dpo

    workdir = tempfile.mkdtemp()
    model_args = ModelArguments(model_name_or_path="mixtral-small")
    tokenizer = load_tokenizer(model_args)
    model = load_model(model_args, tokenizer).to(torch.bfloat16)
    model.save_pretrained(os.path.join(workdir, "bf16"))
    tokenizer.save_pretrained(os.path.join(workdir, "bf16"))
    trainer = train_dpo.main(["--model_name_or_path", os.path.join(workdir, "bf16"), "--use_peft", "--load_in_fp8",
                              "--bf16", "--max_steps", "3", "--learning_rate", "1e-3", "--toy_num_train_pairs", "64",
                              "--toy_num_eval_pairs", "8", "--per_device_train_batch_size", "8", "--logging_steps", "1",
                              "--output_dir", os.path.join(workdir, "out"), "--report_to", "none",
                              "--ref_logps_cache_dir", os.path.join(workdir, "cache"), "--eval_strategy", "no"])
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    moved = sum(param.abs().sum().item() > 0 for name, param in trainer.model.named_parameters() if "lora_B" in name)
    fp8_modules = sorted({type(module).__name__ for module in trainer.model.modules()
                          if "fp8" in type(module).__name__.lower()})
    print(f"CHECK fp8: losses {losses}, LoRA B matrices moved {moved}, FP8 modules {fp8_modules}, peak GPU "
          f"{torch.cuda.max_memory_allocated() / 2 ** 30:.1f} GiB", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checks", default="packed,syncs,fp8")
    parser.add_argument("--preset", default="mixtral-1b" if CUDA else "mixtral-tiny")
    args = parser.parse_args()
    for check in args.checks.split(","):
        if check in ("syncs", "fp8") and not CUDA:
            print(f"CHECK {check}: skipped, no CUDA", flush=True)
            continue
        try:  # one failing check must not cost the others' device time
            {"packed": lambda: check_packed(args.preset), "syncs": lambda: check_syncs(args.preset),
             "fp8": check_fp8}[check]()
        except Exception:  # noqa: BLE001 -- report and go on
            print(f"CHECK {check}: FAILED\n{traceback.format_exc()}", flush=True)
        if CUDA:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()


if __name__ == "__main__":
    main()
