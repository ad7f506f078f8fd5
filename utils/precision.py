"""Mixed precision: one rule for every script's --bf16 default, so that methods trained on one machine (the frontier
study) are compared at one precision."""

from dataclasses import field

import torch


def bf16_field():
    """The --bf16 field of a script's arguments: unset means `default_bf16` decides; a bare --bf16 means true."""
    return field(default=None, metadata={"help": "bf16 mixed precision; default: on where the run's device supports "
                                                 "it (CUDA with bf16, without --use_cpu or --fp16).",
                                         "nargs": "?", "const": True})


def default_bf16(args) -> bool:
    """`args.bf16` if given, else whether the device the run will use supports bf16: CUDA with bf16, unless
    --use_cpu or --fp16. Called by every script's arguments before TrainingArguments' own checks."""
    if args.bf16 is not None:
        return args.bf16
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported() and not args.use_cpu and not args.fp16


def compute_dtype(args) -> torch.dtype:
    """The training's compute precision, in which the policy and every kind of reference compute their log-probs."""
    return torch.bfloat16 if args.bf16 else torch.float16 if args.fp16 else torch.float32
