"""Numerical guards: a non-finite loss or gradient stops training before the optimizer step.

The error names the optimizer step and the batch's rows (`row_index`, the row's index in its source
split), so that the bad pair can be found. It is raised before `optimizer.step()`, so no weights and no
checkpoint of the bad step are written: the last checkpoint on disk is the last good one.
"""

import torch
from transformers import TrainerCallback


class NonFiniteError(FloatingPointError):
    """A NaN or infinite loss or gradient; the message names the step and the rows."""


class NonFiniteGuard(TrainerCallback):
    """Collects the rows of the current optimizer step and checks its loss and gradients.

    The trainer calls `add_rows` and `check_loss` from `training_step` (once per micro-batch); as a
    callback, the guard checks the accumulated gradients at `on_pre_optimizer_step`. With fp16 the
    gradient scaler expects overflowing steps and skips them itself, so gradients are not checked then.
    """

    def __init__(self):
        self.rows: list[int] = []

    def add_rows(self, row_index: torch.Tensor | None) -> None:
        if row_index is not None:
            self.rows += row_index.tolist()

    def fail(self, what: str, value: torch.Tensor, step: int) -> None:
        rows = f"; the step's batch holds rows {sorted(self.rows)} of the train split" if self.rows else ""
        raise NonFiniteError(f"non-finite {what} ({value.item()}) at step {step}{rows}. Stopped before the "
                             f"optimizer step: nothing of this step was saved")

    def check_loss(self, loss: torch.Tensor, step: int) -> None:
        if not torch.isfinite(loss).all():
            self.fail("loss", loss.detach().float().sum(), step)

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        grads = [p.grad for p in model.parameters() if p.grad is not None] if model is not None else []
        if grads and not args.fp16:
            norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads]))
            if not torch.isfinite(norm):
                self.fail("gradient norm", norm, state.global_step + 1)

    def on_step_end(self, args, state, control, **kwargs):
        self.rows = []
