"""Numerical guards: a non-finite loss or gradient stops training before the optimizer step.

The error names the optimizer step and the batch's rows (`source` and `row_index`: the dataset split and the
row's index there, a mixture's parts named apart), so that the bad pair can be found. It is raised before
`optimizer.step()`, so no weights and no checkpoint of the bad step are written: the last checkpoint on disk is
the last good one.

The check costs one host sync per optimizer step, where the Trainer's gradient norm is read anyway: the
micro-batches' losses are kept on the device until then. Under several processes the flags are all-reduced
first, so that every rank stops at the same step with the same message (a rank raising alone would leave the
others waiting in their next collective until the timeout).
"""

import torch
import torch.distributed as dist
from accelerate.utils import gather_object
from torch.distributed.tensor import DTensor
from utils.errors import NonFiniteError
from utils.trainer_hooks import HookedTrainer


def several_processes() -> bool:
    """Whether a process group of more than one rank is running (every rank must then take the same branch)."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class NonFiniteGuard(HookedTrainer):
    """A Trainer mixin that checks, before each optimizer step, the step's micro-batch losses and the gradient norm the
    Trainer computes anyway (for clipping and logging; under DeepSpeed, the engine's), so the check costs no extra
    pass over the gradients. With fp16 the gradient scaler expects overflowing steps and skips them itself, so
    gradients are not checked then."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._step_rows: list[tuple[list[str], torch.Tensor]] = []  # this optimizer step's (source, row_index)
        self._step_losses: list[torch.Tensor] = []  # and its micro-batches' losses, on the device

    def training_step(self, model, inputs, num_items_in_batch=None):
        if inputs.get("row_index") is not None:  # kept on the device: read only if the step is bad
            rows = inputs["row_index"]
            self._step_rows.append((inputs.get("source") or ["the train split"] * len(rows), rows))
        loss = super().training_step(model, inputs, num_items_in_batch)
        self._step_losses.append(loss.detach().float().sum())
        return loss

    def on_grad_norm(self, grad_norm) -> None:
        super().on_grad_norm(grad_norm)
        self._check_finite(grad_norm)
        self._step_rows, self._step_losses = [], []

    def _check_finite(self, grad_norm) -> None:
        losses = torch.stack(self._step_losses) if self._step_losses else torch.zeros(1, device=self.args.device)
        check_gradients = not self.args.fp16 and grad_norm is not None
        if isinstance(grad_norm, DTensor):  # FSDP2: the total norm, the same on every rank
            grad_norm = grad_norm.full_tensor()
        gradient = torch.as_tensor(grad_norm if check_gradients else 0.0, device=losses.device, dtype=torch.float32)
        flags = torch.stack([(~torch.isfinite(losses)).any(), ~torch.isfinite(gradient)]).float()
        if several_processes():
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        bad_loss, bad_gradient = flags.tolist()  # the step's one host sync
        if not (bad_loss or bad_gradient):
            return
        # Every rank is here: gather what each saw, so that all of them report the same.
        local_rows = [(source, row) for sources, rows in self._step_rows for source, row in zip(sources, rows.tolist())]
        first_bad = next((loss.item() for loss in losses if not torch.isfinite(loss)), None)
        ranks = gather_object([(local_rows, first_bad)])  # [(rows, first non-finite loss or None)] per rank
        rows_by_source = {}
        for source, row in sorted(row for rank_rows, _ in ranks for row in rank_rows):
            rows_by_source.setdefault(source, []).append(row)
        if bad_loss:
            value = next(value for _, value in ranks if value is not None)
            culprits = [rank for rank, (_, value) in enumerate(ranks) if value is not None]
            what = f"loss ({value})" + (f" on rank(s) {culprits}" if len(ranks) > 1 else "")
        else:
            what = f"gradient norm ({float(gradient)})"
        where = "; the step's batch holds " + ", ".join(f"rows {rows} of {source}" for source, rows in
                                                        rows_by_source.items()) if rows_by_source else ""
        raise NonFiniteError(f"non-finite {what} at step {self.state.global_step + 1}{where}. "
                             f"Stopped before the optimizer step: nothing of this step was saved")
