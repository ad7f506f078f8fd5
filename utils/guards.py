"""Numerical guards: a non-finite loss or gradient stops training before the optimizer step; before the first step,
the first batch's log-probs are checked against the model's own forward and, at a fresh start, against the reference
(`FirstBatchChecks`, at the end of this module).

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
from peft import PeftModel
from torch.distributed.tensor import DTensor
from utils.errors import ConfigError, NonFiniteError
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


# How far a summed log-prob may move from rounding alone, relative to (|sum| + its token count), by compute dtype: the
# same sequences scored in batches of other shapes (other padding, packed rows) differ by about eps x |logit| per token.
LOGPS_RTOL = {torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 2e-2}


def own_forward_logps(model, batch: dict, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Per sequence of a collated batch (padded or packed rows): the sum of its completion tokens' log-probs as the
    model's own forward() gives them, each sequence alone in a row of its own (no padding, no packing): the
    log-softmax of `forward().logits` at the completion tokens. Independent of `utils.logprobs` (no output layer of
    ours, no chunks): what that fast path must equal."""
    input_ids = batch["input_ids"]
    width = input_ids.shape[1]
    if "cu_seq_lens_q" in batch:  # one packed row: its sequences' boundaries
        bounds = batch["cu_seq_lens_q"].tolist()
        starts, lengths = bounds[:-1], [end - start for start, end in zip(bounds[:-1], bounds[1:])]
    else:  # one right-padded row per sequence
        starts = [row * width for row in range(input_ids.shape[0])]
        lengths = batch["attention_mask"].sum(-1).tolist()
    flat_ids, positions = input_ids.flatten(), batch["completion_positions"]
    sequence_of = batch["completion_sequence"]
    sums = torch.zeros(len(starts), dtype=torch.float32, device=input_ids.device)
    with torch.no_grad(), torch.autocast(input_ids.device.type, dtype=dtype, enabled=dtype != torch.float32):
        for index, (start, length) in enumerate(zip(starts, lengths)):
            ids = flat_ids[start:start + length]
            offsets = positions[sequence_of == index] - start
            logits = model(input_ids=ids[None], use_cache=False).logits[0, offsets - 1]  # the completion's rows
            sums[index] = torch.log_softmax(logits.float(), dim=-1).gather(-1, ids[offsets, None]).sum()
    return sums


def _worst(difference: torch.Tensor, tolerance: torch.Tensor) -> tuple[float, float]:
    """(largest difference / tolerance, largest difference) over the batch, the same on every rank."""
    worst = torch.stack([(difference / tolerance).max(), difference.max()]).float()
    if several_processes():
        dist.all_reduce(worst, op=dist.ReduceOp.MAX)
    ratio, largest = worst.tolist()
    return ratio, largest


class FirstBatchChecks(HookedTrainer):
    """A Trainer mixin that checks the first training batch's log-probs, before the first optimizer step:

    - `--check_logps`: our fast path (`utils.logprobs`, the policy's log-probs of the step) equals the model's own
      forward() (`own_forward_logps`): a family whose forward we do not reproduce stops here instead of training on
      wrong numbers. Cost: one forward of the batch, without gradients.
    - `--check_step0_rewards`: at a fresh start whose reference is the initial policy (`reference_is_initial_policy`
      of utils/reference.py: precomputed by this trainer, its frozen copy, or adapters off), step 0's implicit rewards
      are 0 within the compute dtype's rounding (`LOGPS_RTOL`). Cost: none (the step computes both sides anyway).
    Every rank checks its own batch; the verdict is all-reduced, so all ranks stop together."""

    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        self._first_batch_pending = True
        self._resumed = bool(resume_from_checkpoint)
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def check_first_batch(self, model, inputs: dict, policy_sums: torch.Tensor, num_tokens: torch.Tensor,
                          reference: tuple[torch.Tensor, torch.Tensor], dtype: torch.dtype) -> None:
        """Called by compute_loss with the step's policy log-probs ([2 x pairs]) and the reference's (chosen,
        rejected); acts once, so a later step pays nothing but this check."""
        if not getattr(self, "_first_batch_pending", False) or not model.training:
            return
        self._first_batch_pending = False
        policy_sums = policy_sums.detach().float()
        rtol = LOGPS_RTOL.get(dtype, LOGPS_RTOL[torch.bfloat16])
        if self.args.check_logps:
            own = own_forward_logps(model, inputs, dtype)
            ratio, largest = _worst((policy_sums - own).abs(), rtol * (own.abs() + num_tokens) + 1e-6)
            if ratio > 1:
                unwrapped = self.accelerator.unwrap_model(model)
                name = type(unwrapped.get_base_model() if isinstance(unwrapped, PeftModel) else unwrapped).__name__
                raise ConfigError(
                    f"{name}: our completion log-probs differ from its own forward() by up to {largest:.4g} nats on "
                    f"the first batch (tolerance {rtol:g} x (|log-prob| + tokens) in {dtype}): its forward computes "
                    "something our fast path does not; add its transform after the output layer to "
                    "utils/families.py POST_HEAD_TRANSFORMS, or, if the rows are packed, run without --padding_free "
                    "(--check_logps false trains on regardless)")
        if self.args.check_step0_rewards and not self._resumed and self.reference_is_initial_policy:
            reference_sums = torch.cat(reference).detach().float()
            ratio, largest = _worst((policy_sums - reference_sums).abs(),
                                    rtol * (reference_sums.abs() + num_tokens) + 1e-6)
            if ratio > 1:
                raise ConfigError(
                    f"step 0's implicit rewards are not 0: the reference's log-probs differ from the initial "
                    f"policy's by up to {largest:.4g} nats (reward {self.args.beta * largest:.4g}; tolerance "
                    f"{rtol:g} x (|log-prob| + tokens) in {dtype}), so the reference does not score what the policy "
                    "scores. Likely causes: another precision path (dtype, attention or autocast), dropout left on "
                    "(--disable_dropout), packed rows attended across sequences, or a stale reference cache "
                    "(delete --ref_logps_cache_dir's files) (--check_step0_rewards false trains on regardless)")
