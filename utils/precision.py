"""Mixed precision: one rule for every script's --bf16 default, so that methods trained on one machine (the frontier
study) are compared at one precision; and a warning where bf16 would run on a CPU without bf16 units."""

import functools
import logging
from dataclasses import field

import torch

logger = logging.getLogger(__name__)


def bf16_field():
    """The --bf16 field of a script's arguments: unset means `default_bf16` decides; a bare --bf16 means true."""
    return field(default=None, metadata={"help": "bf16 mixed precision; default: on where the run's device supports "
                                                 "it (CUDA with bf16, without --use_cpu or --fp16).",
                                         "nargs": "?", "const": True})


def default_bf16(args) -> bool:
    """`args.bf16` if given, else whether the device the run will use supports bf16: CUDA with bf16, unless
    --use_cpu or --fp16. Called by every script's arguments before TrainingArguments' own checks; warns once where
    bf16 would run on a CPU without bf16 units."""
    bf16 = args.bf16 if args.bf16 is not None else (
        torch.cuda.is_available() and torch.cuda.is_bf16_supported() and not args.use_cpu and not args.fp16)
    if bf16 and (args.use_cpu or not torch.accelerator.is_available()) and cpu_has_bf16_units() is False:
        warn_slow_cpu_bf16()
    return bf16


def cpu_has_bf16_units() -> bool | None:
    """Whether this CPU has bf16 matrix units (x86: AVX-512 BF16 or AMX; Arm: BF16), from /proc/cpuinfo's flags;
    None where there is no /proc/cpuinfo to tell (torch has no public query)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = set(f.read().split())
    except OSError:
        return None
    return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})


@functools.cache
def warn_slow_cpu_bf16() -> None:
    logger.warning("--bf16 on a CPU without bf16 units (no avx512_bf16, amx_bf16 or bf16 in /proc/cpuinfo): bf16 "
                   "matmuls run 30-100x slower than float32 there (a 512x512 matmul on one AVX2 core: 0.4 against "
                   "13.6 GFLOP/s; docs/recipes.md). Train in float32: --bf16 false")


def compute_dtype(args) -> torch.dtype:
    """The training's compute precision, in which the policy and every kind of reference compute their log-probs."""
    return torch.bfloat16 if args.bf16 else torch.float16 if args.fp16 else torch.float32
