"""Numerical guards: a non-finite loss or gradient stops training before the optimizer step.

The error names the optimizer step and the batch's rows (`row_index`, the row's index in its source
split), so that the bad pair can be found. It is raised before `optimizer.step()`, so no weights and no
checkpoint of the bad step are written: the last checkpoint on disk is the last good one.
"""

import math

import torch
from transformers import Trainer


class NonFiniteError(FloatingPointError):
    """A NaN or infinite loss or gradient; the message names the step and the rows."""


class GuardedTrainer(Trainer):
    """A Trainer that checks each micro-batch's loss and, before each optimizer step, the gradient norm the
    Trainer computes anyway (for clipping and logging; under DeepSpeed, the engine's), so the check costs no
    extra pass over the gradients. With fp16 the gradient scaler expects overflowing steps and skips them
    itself, so gradients are not checked then."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._step_rows: list[torch.Tensor] = []  # this optimizer step's row_index tensors (no device sync)

    def _fail(self, what: str, value) -> None:
        rows = sorted(torch.cat(self._step_rows).tolist()) if self._step_rows else []
        where = f"; the step's batch holds rows {rows} of the train split" if rows else ""
        raise NonFiniteError(f"non-finite {what} ({float(value)}) at step {self.state.global_step + 1}{where}. "
                             f"Stopped before the optimizer step: nothing of this step was saved")

    def training_step(self, model, inputs, num_items_in_batch=None):
        if inputs.get("row_index") is not None:
            self._step_rows.append(inputs["row_index"])
        loss = super().training_step(model, inputs, num_items_in_batch)
        if not torch.isfinite(loss).all():
            self._fail("loss", loss.detach().float().sum())
        return loss

    def _get_grad_norm(self, model, grad_norm=None):
        grad_norm = super()._get_grad_norm(model, grad_norm)
        if not self.args.fp16 and grad_norm is not None and not math.isfinite(float(grad_norm)):
            self._fail("gradient norm", grad_norm)
        self._step_rows = []
        return grad_norm
