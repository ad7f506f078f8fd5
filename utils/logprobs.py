"""Completion log-probs: the only place that turns a model's output into log pi(y|x).

The [tokens, vocab] logits are the largest tensor of a DPO step (Mixtral's vocabulary is 32k).
We never materialise them whole: the model returns its final hidden states, and only the
completion tokens' rows go through the output layer (and what the model's forward applies after it,
`utils.families.output_head`), a chunk at a time; beyond one chunk, each is
recomputed in backward (activation checkpointing), so that peak memory grows with the sequence,
not with sequence x vocabulary. The gradients are exact.
"""

from typing import NamedTuple

import torch
from peft import PeftModel
from torch.utils.checkpoint import checkpoint

from utils.families import output_head
from utils.modeling import router_kwargs


# What the collator (utils/data.py) gives the model itself; packed rows carry their sequences' boundaries.
MODEL_INPUTS = ("input_ids", "attention_mask", "position_ids", "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q",
                "max_length_k")
# On CPU the log-softmax runs on slices of this many rows of a chunk's logits ([128, 32k] float32 is 16 MB):
# whole [tokens, vocab] passes stream through memory and, in bf16, cost more than the output layer's matmul.
CPU_SOFTMAX_ROWS = 128


class SequenceLogps(NamedTuple):
    """Per sequence of a batch: its completion tokens' summed log-probs and their number; and the router's
    load-balancing loss of the forward (None unless asked for)."""
    sums: torch.Tensor
    num_tokens: torch.Tensor
    aux_loss: torch.Tensor | None


def _token_logps(head, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    logits = head(hidden)
    rows = CPU_SOFTMAX_ROWS if logits.device.type == "cpu" else max(1, logits.shape[0])  # GPU: one kernel
    float_dtype = torch.promote_types(logits.dtype, torch.float32)  # bf16/fp16 logits: softmax in fp32
    token_logps = []
    for logits_rows, label_rows in zip(logits.split(rows), labels.split(rows)):  # split's backward: one cat
        logprobs = torch.log_softmax(logits_rows.to(float_dtype), dim=-1)
        token_logps.append(logprobs.gather(-1, label_rows.unsqueeze(-1)).squeeze(-1))
    return torch.cat(token_logps)


def completion_logps(hidden: torch.Tensor, head, input_ids: torch.Tensor, completion_positions: torch.Tensor,
                     completion_sequence: torch.Tensor, num_sequences: int,
                     chunk_size: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sequence: the sum of its completion tokens' log-probs, and their number ([num_sequences], >= fp32).

    hidden: [rows, seq, dim] final hidden states for `input_ids` [rows, seq]; `head` maps them to the logits the
    model's forward() returns (`utils.families.output_head`: the output layer and what follows it).
    `completion_positions` are the flat (row-major) indices of the tokens that count, each predicted by the hidden
    state just before it in its row; `completion_sequence` says which of `num_sequences` sequences each is in (a row
    per sequence, or several packed in one row: the same computation).
    """
    hidden = hidden.flatten(0, 1).index_select(0, completion_positions - 1)
    labels = input_ids.flatten().index_select(0, completion_positions)
    # One chunk keeps its logits for backward; several are recomputed there, so only one is alive at a time.
    recompute = torch.is_grad_enabled() and hidden.requires_grad and labels.shape[0] > chunk_size
    chunks = []
    for start in range(0, labels.shape[0], chunk_size):
        args = (head, hidden[start:start + chunk_size], labels[start:start + chunk_size])
        if recompute:
            chunks.append(checkpoint(_token_logps, *args, use_reentrant=False))
        else:
            chunks.append(_token_logps(*args))
    token_logps = torch.cat(chunks) if chunks else hidden.new_zeros(0, dtype=torch.float32)
    sums = token_logps.new_zeros(num_sequences).index_add(0, completion_sequence, token_logps)
    counts = token_logps.new_zeros(num_sequences).index_add(0, completion_sequence, torch.ones_like(token_logps))
    return sums, counts


def _run_as_forward(wrapper, unwrapped, fn, inputs: dict):
    """Run fn(original_forward, **inputs) as `unwrapped`'s forward, called through `wrapper`.

    Distributed wrappers (DDP, FSDP, DeepSpeed) gather parameters and arm gradient hooks around
    their forward; our output-layer chunks run outside the model's own forward, so we temporarily
    make them part of it. The call always goes through `wrapper.__call__`, even when `wrapper is
    unwrapped`: FSDP2's `fully_shard` wraps in place, and its hooks (which gather the root's
    embeddings, final norm and output layer) are module hooks, not a wrapper class.
    """
    had_own_forward = "forward" in vars(unwrapped)  # e.g. accelerate's autocast wrapper, set on the instance
    original_forward = unwrapped.forward

    def restore():
        if had_own_forward:
            unwrapped.forward = original_forward
        else:
            vars(unwrapped).pop("forward", None)

    def forward(**kwargs):
        restore()
        return fn(original_forward, **kwargs)

    unwrapped.forward = forward
    try:
        return wrapper(**inputs)
    finally:
        restore()


def model_logps(model, batch: dict, *, unwrapped=None, router_aux_loss: bool = False, chunk_size: int = 4096,
                dtype: torch.dtype = torch.float32) -> SequenceLogps:
    """Run a causal LM on a collated batch: its sequences' completion log-probs (`SequenceLogps`).

    `model` may be a distributed wrapper of `unwrapped`; a PEFT model runs with whatever adapters are active.
    `dtype` is the training's compute precision: other than float32, the body and the output layer both run
    under autocast to it (log-softmax in float32), whoever calls, so that the policy, a precomputed reference
    and a frozen one compute alike. accelerate's autocast covers the model's forward only, not our output layer.
    """
    unwrapped = model if unwrapped is None else unwrapped
    base = unwrapped.get_base_model() if isinstance(unwrapped, PeftModel) else unwrapped
    decoder, head = base.get_decoder(), output_head(base)
    inputs = {key: batch[key] for key in MODEL_INPUTS if key in batch}
    # a packed row holds len(cu_seq_lens) - 1 sequences, a padded batch one per row
    num_sequences = batch["cu_seq_lens_q"].shape[0] - 1 if "cu_seq_lens_q" in batch else batch["input_ids"].shape[0]

    def forward(original_forward, **inputs):
        captured = []
        hook = decoder.register_forward_hook(lambda module, args, output: captured.append(output[0]))
        try:  # logits_to_keep=1: the model's own output layer runs on one position only
            outputs = original_forward(**inputs, use_cache=False, logits_to_keep=1,
                                       **router_kwargs(base, router_aux_loss))
        finally:
            hook.remove()
        sums, counts = completion_logps(captured[0], head, batch["input_ids"], batch["completion_positions"],
                                        batch["completion_sequence"], num_sequences, chunk_size=chunk_size)
        return SequenceLogps(sums, counts, outputs.aux_loss if router_aux_loss else None)

    with torch.autocast(batch["input_ids"].device.type, dtype=dtype, enabled=dtype != torch.float32):
        return _run_as_forward(model, unwrapped, forward, inputs)
