"""Exact attention over packed rows, each sequence attending within itself and never over the whole row,
registered with transformers' AttentionInterface as `varlen`.

A padding-free batch is one row of several sequences; the collator passes their cumulative lengths
(`cu_seq_lens_q/k`, int32) and longest length (`max_length_q/k`, host ints), transformers' own names for them.
transformers' sdpa and eager turn a packed row into a dense [T, T] block-diagonal mask and compute all of it
(quadratic in the row's length), and its flash_attention_2 path inspects `position_ids` on the device at every
forward (a host sync). A name that has no mask function in transformers' AttentionMaskInterface gets no mask
(the model passes `attention_mask=None`), so nothing is built or inspected: this function reads the lengths.

- CUDA: flash-attn's variable-length kernel where flash-attn is installed, else PyTorch's own
  (`torch.nn.attention.varlen`, torch >= 2.10, compute capability >= 8.0). Neither plans per shape.
- Elsewhere (CPU, or float32 without autocast, which flash kernels do not take): the row's sequences are
  gathered into a right-padded [sequences, heads, longest, dim] batch and attended with sdpa's causal kernel, then
  scattered back: the attention work of the padded batch, never a [T, T] mask over the whole row (quadratic in
  every token of the batch: ~8x the padded attention at 8 x 512 tokens on CPU). Exact, as right padding is;
  the indices are built on the device from the lengths, with no host read.
- Rows without lengths (padded batches) get plain causal attention. That is exact for the real tokens of
  right-padded rows, which attend only to earlier, real positions, but not for left padding: generation
  (`utils.generation`) switches to sdpa while it runs.
"""

import functools
import importlib.util
import inspect

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

VARLEN_ATTENTION = "varlen"  # the name this module registers its implementation under


@functools.lru_cache(maxsize=None)
def _flash_attn_varlen():
    """flash-attn's varlen function, or None where flash-attn is not installed."""
    if importlib.util.find_spec("flash_attn") is None:
        return None
    from flash_attn import flash_attn_varlen_func

    return flash_attn_varlen_func


@functools.lru_cache(maxsize=None)
def _torch_varlen():
    """(varlen_attn, its parameter names), or None where torch has no varlen attention."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn, frozenset(inspect.signature(varlen_attn).parameters)


@functools.lru_cache(maxsize=None)
def cuda_varlen_kernel_available(device_index: int | None = None) -> bool:
    """Whether packed rows on this CUDA device run through a variable-length flash kernel."""
    if not torch.cuda.is_available():
        return False
    if _flash_attn_varlen() is not None:
        return True
    return _torch_varlen() is not None and torch.cuda.get_device_capability(device_index) >= (8, 0)


def packs_linearly(implementation: str, device: torch.device, dtype: torch.dtype) -> bool:
    """Whether a packed row through `implementation` costs no more than the same sequences in padded rows, rather
    than the square of the row's length: `varlen` everywhere (a variable-length flash kernel on CUDA in fp16/bf16,
    else the padded layout below), flash_attention_2 on CUDA in fp16/bf16 (`dtype`, the compute precision)."""
    if implementation == VARLEN_ATTENTION:
        return True
    return implementation == "flash_attention_2" and device.type == "cuda" and dtype in (torch.float16, torch.bfloat16)


def _cuda_varlen(query, key, value, cu_seq_lens_q, cu_seq_lens_k, max_length_q, max_length_k, dropout, scaling):
    """query [T, H, D], key/value [T, H_kv, D] -> [T, H, D], causal within each sequence."""
    flash = _flash_attn_varlen()
    if flash is not None:
        return flash(query, key, value, cu_seq_lens_q, cu_seq_lens_k, max_length_q, max_length_k, dropout_p=dropout,
                     softmax_scale=scaling, causal=True)
    if dropout:
        raise ValueError("attention dropout is not supported by torch's varlen attention: install flash-attn, or set "
                         "the model's attention_dropout to 0")
    varlen_attn, parameters = _torch_varlen()
    if "enable_gqa" in parameters:
        extra = {"enable_gqa": key.shape[1] != query.shape[1]}
    else:  # older torch: one kv head per query head
        groups = query.shape[1] // key.shape[1]
        key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
        extra = {}
    # torch 2.10 takes is_causal and no scale (its default, 1/sqrt(head_dim), is Mixtral's); later releases a
    # flash-style window, (-1, 0) being causal, and a scale
    extra.update({"window_size": (-1, 0)} if "window_size" in parameters else {"is_causal": True})
    if "scale" in parameters:
        extra["scale"] = scaling
    elif scaling is not None and abs(scaling - query.shape[-1] ** -0.5) > 1e-6:
        raise ValueError(f"this torch's varlen attention has no scale argument, and the model's is {scaling}")
    return varlen_attn(query, key, value, cu_seq_lens_q, cu_seq_lens_k, max_length_q, max_length_k, **extra)


def padded_layout(cu_seq_lens: torch.Tensor, num_tokens: int, longest: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices between a packed row of `num_tokens` tokens and a right-padded [sequences, longest] layout, built on
    the device: `gather` [sequences * longest] is each slot's token in the row, `scatter` [num_tokens] each token's
    slot. Padding slots take the row's last token; they follow every real token of their sequence, so causal
    attention keeps them out of every real token's output."""
    starts = cu_seq_lens[:-1].long()
    slots = torch.arange(longest, device=starts.device)
    gather = (starts[:, None] + slots).clamp(max=num_tokens - 1).flatten()
    positions = torch.arange(num_tokens, device=starts.device)
    sequence = torch.searchsorted(cu_seq_lens[1:].long(), positions, right=True)
    scatter = sequence * longest + positions - starts[sequence]
    return gather, scatter


def varlen_attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0,
                             scaling: float | None = None, sliding_window: int | None = None,
                             cu_seq_lens_q: torch.Tensor | None = None, cu_seq_lens_k: torch.Tensor | None = None,
                             max_length_q: int | None = None, max_length_k: int | None = None, **kwargs):
    """transformers' attention signature: query [batch, heads, seq, dim], key/value [batch, kv_heads, seq, dim];
    returns ([batch, seq, heads, dim], None)."""
    if sliding_window is not None:
        raise ValueError(f"attn_implementation {VARLEN_ATTENTION!r} has no sliding-window support (the model's "
                         f"sliding_window is {sliding_window}); use sdpa or flash_attention_2")
    if cu_seq_lens_q is None:  # one sequence per row, right-padded (see the module docstring)
        return sdpa_attention_forward(module, query, key, value, None, dropout=dropout, scaling=scaling,
                                      is_causal=True, **kwargs)
    if query.shape[0] != 1:
        raise ValueError(f"packed sequences come as one row, got a batch of {query.shape[0]}")
    # Flash kernels take fp16/bf16 only. Under autocast, rotary embeddings leave query and key in float32 (as
    # transformers' flash path does, they are cast to autocast's dtype); in plain float32 the exact path below runs.
    half = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else query.dtype
    if query.is_cuda and half in (torch.float16, torch.bfloat16) and cuda_varlen_kernel_available(query.device.index):
        query, key, value = (tensor[0].transpose(0, 1).to(half) for tensor in (query, key, value))
        output = _cuda_varlen(query, key, value, cu_seq_lens_q, cu_seq_lens_k, max_length_q, max_length_k, dropout,
                              scaling)
        return output.unsqueeze(0), None
    gather, scatter = padded_layout(cu_seq_lens_q, query.shape[2], max_length_q)
    sequences = cu_seq_lens_q.shape[0] - 1
    query, key, value = (tensor[0].transpose(0, 1).index_select(0, gather).unflatten(0, (sequences, max_length_q))
                         .transpose(1, 2) for tensor in (query, key, value))  # [sequences, heads, longest, dim]
    output = F.scaled_dot_product_attention(query, key, value, dropout_p=dropout, scale=scaling, is_causal=True,
                                            enable_gqa=key.shape[1] != query.shape[1])
    return output.transpose(1, 2).flatten(0, 1).index_select(0, scatter).unsqueeze(0), None


AttentionInterface.register(VARLEN_ATTENTION, varlen_attention_forward)
