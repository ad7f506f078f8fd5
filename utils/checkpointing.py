"""Interruption and resume: SIGTERM/SIGINT during training save a checkpoint and end the run cleanly;
`--resume_from_checkpoint latest` continues from the newest complete checkpoint in output_dir, and
the Trainer mixin `ExactCheckpointLoading` restores a checkpoint's weights exactly, mixture-of-experts models included.

    interrupt = GracefulInterrupt()
    trainer = SomeTrainer(..., callbacks=[interrupt])
    with interrupt:                      # handlers installed for the duration of training only
        trainer.train(resume_from_checkpoint=resolve_resume(args.resume_from_checkpoint, args.output_dir))
    exit_if_interrupted(trainer, interrupt)   # logs where the checkpoint is, exits with 128 + signal
"""

import json
import logging
import os
import re
import signal
import threading
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from transformers import PreTrainedModel, TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from transformers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME

from utils.errors import ConfigError
from utils.guards import several_processes
from utils.trainer_hooks import HookedTrainer

logger = logging.getLogger(__name__)
SIGNALS = (signal.SIGTERM, signal.SIGINT)
CHECKPOINT_PATTERN = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")
LATEST = ("latest", "true")


class GracefulInterrupt(TrainerCallback):
    """The first SIGTERM or SIGINT sets a flag (and restores the previous handlers, so a second signal acts
    as usual); at the end of the current optimizer step the Trainer then saves a normal checkpoint and stops."""

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():  # Python lets only the main thread set handlers
            self._previous = {signum: signal.signal(signum, self._handle) for signum in SIGNALS}
        return self

    def __exit__(self, *exc_info):
        self._restore()

    def _restore(self):
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    def _handle(self, signum, frame):
        self.signum = signum
        self._restore()
        logger.warning("%s received: saving a checkpoint at the end of this step, then stopping (send it again to "
                       "stop at once)", signal.Signals(signum).name)

    def on_step_end(self, args, state, control, **kwargs):
        signum = self.signum or 0
        if several_processes():
            # every rank must agree to save and stop at the same step, or the next collective hangs
            flag = torch.tensor(signum, device=args.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            signum = int(flag)
        if signum:
            self.signum = signum
            control.should_save = True
            control.should_training_stop = True
        return control


@dataclass
class SaveAtFractionsArguments:
    """Mixed into each train script's arguments: model checkpoints along training (experiments/claims.py's
    reward-vs-KL curves)."""

    save_at_fractions: list[float] = field(default_factory=list, metadata={
        "help": "Also save checkpoint-<step> at these fractions of the run's optimizer steps, e.g. 0.0625 0.125 0.25 "
                "0.5. With --save_strategy no they hold the model only (no resuming from them)."})

    def __post_init__(self):
        if any(not 0 < fraction <= 1 for fraction in self.save_at_fractions):
            raise ValueError(f"--save_at_fractions must lie in (0, 1], got {self.save_at_fractions}")
        if self.save_at_fractions and self.save_strategy in ("no", None):
            self.save_only_model = True  # weights only: 5 optimizer states per run are disk the study never reads
        super().__post_init__()


class SaveAtFractions(TrainerCallback):
    """Sets the Trainer's should_save at the steps nearest the given fractions of max_steps (TRL's online trainers
    honour it too), so the engine, not we, writes the checkpoint: sharded models stay correct."""

    def __init__(self, fractions: list[float]):
        self.fractions, self.steps = fractions, set()

    def on_train_begin(self, args, state, control, **kwargs):
        self.steps = {max(1, round(fraction * state.max_steps)) for fraction in self.fractions}

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step in self.steps:
            control.should_save = True


def exit_if_interrupted(trainer, interrupt: GracefulInterrupt) -> None:
    """After `trainer.train()`: if a signal stopped it, log the checkpoint and exit with status 128 + signal."""
    if interrupt.signum is None:
        return
    checkpoint = os.path.join(trainer.args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{trainer.state.global_step}")
    logger.warning("stopped by %s at step %d; checkpoint saved to %s. Continue with the same command plus "
                   "--resume_from_checkpoint latest", signal.Signals(interrupt.signum).name,
                   trainer.state.global_step, os.path.abspath(checkpoint))
    raise SystemExit(128 + interrupt.signum)


def is_complete(checkpoint: str) -> bool:
    """The Trainer writes trainer_state.json last: a checkpoint killed while saving has none (or a cut one)."""
    try:
        with open(os.path.join(checkpoint, "trainer_state.json")) as f:
            json.load(f)
        return True
    except (OSError, ValueError):
        return False


def checkpoints(output_dir: str) -> list[str]:
    """checkpoint-N folders in output_dir, newest (highest N) first."""
    if not os.path.isdir(output_dir):
        return []
    found = [(int(match.group(1)), name) for name in os.listdir(output_dir)
             if (match := CHECKPOINT_PATTERN.match(name)) and os.path.isdir(os.path.join(output_dir, name))]
    return [os.path.join(output_dir, name) for _, name in sorted(found, reverse=True)]


def latest_checkpoint(output_dir: str) -> str | None:
    """The newest complete checkpoint in output_dir; incomplete ones are skipped with a warning."""
    for checkpoint in checkpoints(output_dir):
        if is_complete(checkpoint):
            return checkpoint
        logger.warning("%s is incomplete (no readable trainer_state.json: killed while saving?); skipping it",
                       checkpoint)
    return None


def resolve_resume(value: str | None, output_dir: str) -> str | None:
    """--resume_from_checkpoint: None (start afresh), `latest`/`true` (the newest complete checkpoint in
    output_dir) or a checkpoint folder. Fails before any work where there is nothing to resume from."""
    if value is None or value.lower() in ("", "false", "none"):
        if checkpoints(output_dir):
            logger.warning("%s already holds checkpoints, which this run will overwrite; pass "
                           "--resume_from_checkpoint latest to continue from them instead", output_dir)
        return None
    if value.lower() in LATEST:
        checkpoint = latest_checkpoint(output_dir)
        if checkpoint is None:
            raise ConfigError(f"--resume_from_checkpoint {value}: no complete checkpoint in {output_dir}")
        logger.info("resuming from %s", checkpoint)
        return checkpoint
    if not is_complete(value):
        raise ConfigError(f"--resume_from_checkpoint {value}: not a complete checkpoint folder "
                          f"(no readable trainer_state.json)")
    return value


class ExactCheckpointLoading(HookedTrainer):
    """A Trainer mixin whose checkpoints load back into the model exactly.

    transformers 5.23 saves a checkpoint in the Hub layout (Mixtral: one tensor per expert,
    `block_sparse_moe.experts.N.w1`) but restores it with a plain `load_state_dict`, which matches none of
    the fused expert keys (`mlp.experts.gate_up_proj`): a resumed run would silently keep its initial experts
    and router (huggingface/transformers#48805). A full-model safetensors checkpoint is therefore read back
    through `from_pretrained`, which converts the layout; adapters, FSDP and DeepSpeed keep the Trainer's way.
    """

    def load_checkpoint_weights(self, checkpoint: str | None, model) -> bool:
        has_weights = checkpoint is not None and any(
            os.path.isfile(os.path.join(checkpoint, name)) for name in (SAFE_WEIGHTS_NAME, SAFE_WEIGHTS_INDEX_NAME))
        if not (has_weights and isinstance(model, PreTrainedModel)) or self.is_fsdp_enabled or self.is_deepspeed_enabled:
            return False
        logger.info("loading weights from %s", checkpoint)
        saved = type(model).from_pretrained(checkpoint, dtype=model.dtype, device_map="cpu")
        model.load_state_dict(saved.state_dict(), strict=True)  # every key: nothing silently left behind
        return True
