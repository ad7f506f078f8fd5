"""Helpers shared by tests: the tiny run's command line, the environment of the runs tests start as subprocesses,
and independent reference computations (plain transformers, no project code paths)."""

import os

import torch


def tiny_run_args(tmp_path, *extra, output: str = "out", cache: str = "cache") -> list[str]:
    """train_dpo's command line for a tiny run: the mixtral-tiny preset on 64 toy pairs (16 held out) in batches of
    8, seed 0, writing to tmp_path/output with its reference cache in tmp_path/cache. `extra` comes last: a flag
    given again there wins."""
    return ["--model_name_or_path", "mixtral-tiny", "--toy_num_train_pairs", "64", "--toy_num_eval_pairs", "16",
            "--max_length", "64", "--output_dir", str(tmp_path / output), "--ref_logps_cache_dir",
            str(tmp_path / cache), "--per_device_train_batch_size", "8", "--logging_steps", "1",
            "--report_to", "none", "--disable_tqdm", "true", "--seed", "0", *extra]


def subprocess_env() -> dict:
    """The environment for a script run as a user runs it: CPU only, offline, one OpenMP thread."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "HF_HUB_OFFLINE": "1",
            "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def loop_logps(model, prompt_ids: list[int], completion_ids: list[int]) -> float:
    """One unpadded sequence through the model; the sum of its completion tokens' log-probs, in float64."""
    ids = torch.tensor([prompt_ids + completion_ids])
    with torch.no_grad():
        logprobs = torch.log_softmax(model(ids).logits[0].double(), dim=-1)
    return sum(logprobs[t - 1, ids[0, t]].item() for t in range(len(prompt_ids), ids.shape[1]))

