"""Mistakes that would otherwise surface after the work (a NaN flag, a folder that cannot be written), refused before
anything loads, each in one line; and a full disk at save time, named as such.

`check_ranges` reads every numeric field of the arguments it is given: any float must be finite, and the fields
in RANGES must lie in their range. `check_writable` asks the file system, without writing, whether a folder can be
created or written to. `disk_full_as_error` turns "no space left" while saving into one line naming the folder and
its free space.
"""

import contextlib
import dataclasses
import errno
import math
import os
import shutil

from utils.errors import ConfigError

# {field: (low, high, low inclusive, what it is)}: the range each numeric field must lie in (None: unbounded).
POSITIVE, NON_NEGATIVE, FRACTION = (0, None, False, "> 0"), (0, None, True, ">= 0"), (0, 1, True, "in [0, 1)")
RANGES = {
    **dict.fromkeys(("beta", "per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps",
                     "max_length", "max_prompt_length", "logps_chunk_size", "precompute_ref_batch_size",
                     "adam_epsilon", "logging_steps", "save_steps", "eval_steps", "dataset_num_proc", "lora_r",
                     "lora_alpha", "toy_num_train_pairs", "toy_bt_temperature", "pad_to_multiple_of"), POSITIVE),
    **dict.fromkeys(("learning_rate", "weight_decay", "max_grad_norm", "warmup_steps", "rpo_alpha", "loss_weights",
                     "toy_num_eval_pairs"), NON_NEGATIVE),
    **dict.fromkeys(("eval_fraction", "lora_dropout", "adam_beta1", "adam_beta2"), FRACTION),
}


def check_ranges(*arguments) -> None:
    """Every float (or list of floats) in the dataclasses `arguments` finite, and each field of RANGES in its range;
    --max_steps -1 (train --num_train_epochs) or > 0, and then --num_train_epochs > 0 unless --max_steps is set."""
    for arguments_object in arguments:
        for field in dataclasses.fields(arguments_object):
            value = getattr(arguments_object, field.name)
            values = value if isinstance(value, list | tuple) else [value]
            for item in values:
                if isinstance(item, bool) or not isinstance(item, int | float):
                    continue
                if not math.isfinite(item):
                    raise ConfigError(f"--{field.name} must be a finite number, got {value}")
                if field.name in RANGES:
                    low, high, inclusive, wording = RANGES[field.name]
                    if item < low or (item == low and not inclusive) or (high is not None and item >= high):
                        raise ConfigError(f"--{field.name} must be {wording}, got {value}")
        max_steps = getattr(arguments_object, "max_steps", None)
        if max_steps is not None and max_steps != -1 and max_steps <= 0:
            raise ConfigError(f"--max_steps must be > 0, or -1 to train --num_train_epochs, got {max_steps}")
        if max_steps == -1 and getattr(arguments_object, "num_train_epochs", 1) <= 0:
            raise ConfigError(f"--num_train_epochs must be > 0 (or set --max_steps), got "
                              f"{arguments_object.num_train_epochs}")


def check_writable(folder: str, flag: str) -> None:
    """Refuse a folder the run could not write: a file in its place or above it, or a read-only place. Asks the file
    system (os.access also answers EROFS for root) and writes nothing."""
    path = os.path.abspath(folder)
    if os.path.exists(path) and not os.path.isdir(path):
        raise ConfigError(f"--{flag} {folder}: is a file, not a folder")
    existing = path
    while not os.path.exists(existing):  # the run creates the missing part below the first folder that exists
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise ConfigError(f"--{flag} {folder}: cannot be created, {existing} is a file")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"--{flag} {folder}: {existing} is not writable (read-only or no permission)")


def is_disk_full(error: BaseException) -> bool:
    """An OSError with ENOSPC or EDQUOT, or safetensors' error carrying that message (it raises no OSError)."""
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    return type(error).__name__ == "SafetensorError" and "No space left on device" in str(error)


@contextlib.contextmanager
def disk_full_as_error(folder: str, what: str):
    """Inside: a full disk while writing to `folder` ends the run in one line naming it and its free space."""
    try:
        yield
    except Exception as error:
        if not is_disk_full(error):
            raise
        existing = os.path.abspath(folder)
        while not os.path.exists(existing):
            existing = os.path.dirname(existing)
        free = shutil.disk_usage(existing).free
        raise ConfigError(f"no space left on the device of {folder} while saving {what} ({free / 2**30:.2f} GiB "
                          f"free): free space there or point the run elsewhere") from error
