"""Training speed in the logs: tokens/s, and the share of this machine's matmul peak that the work the math needs
takes (model FLOPs utilisation), so that a user sees speed without a separate bench.

The needed work of a step is full fine-tuning's forward + backward (3 forwards) of: the body on every real token,
the output layer on the completion tokens only (the only logits DPO needs), and each sequence's causal attention
scores. Padding, recomputation and a reference forward at the step are not needed work: they lower the share.
The peak is one big matmul in the training's precision, measured once per process (under a second on CPU).
Batches are counted on the device and read when logged, so a step adds no host read.
"""

import functools
import time

import torch


def forward_flops(config) -> tuple[float, float, float]:
    """Forward FLOPs: per token of the body (attention projections, the gated MLP or the top-k experts and their
    router), per completion token of the output layer, and per squared sequence length (QK^T and AV, causal)."""
    config = config.get_text_config()
    hidden, layers = config.hidden_size, config.num_hidden_layers
    head_dim = getattr(config, "head_dim", None) or hidden // config.num_attention_heads
    attention = 2 * hidden * head_dim * (2 * config.num_attention_heads + 2 * config.num_key_value_heads)
    if getattr(config, "num_local_experts", None):
        mlp = config.num_experts_per_tok * 3 * 2 * hidden * config.intermediate_size
        mlp += 2 * hidden * config.num_local_experts
    else:
        mlp = 3 * 2 * hidden * config.intermediate_size
    scores = layers * 2 * 2 * head_dim * config.num_attention_heads / 2  # [L, L] twice, half of it causal
    return layers * (attention + mlp), 2 * hidden * config.vocab_size, scores


@functools.lru_cache(maxsize=None)
def matmul_peak_flops(device: torch.device, dtype: torch.dtype) -> float:
    """FLOP/s of a square matmul on `device` in `dtype`, the best of a few (the first warms up)."""
    size = 2048 if device.type == "cpu" else 8192
    a, b = (torch.randn(size, size, device=device).to(dtype) for _ in range(2))
    best = float("inf")
    for _ in range(4):
        start = time.perf_counter()
        torch.mm(a, b)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - start)
    return 2 * size ** 3 / best


class SpeedMeter:
    """Counts the training batches' tokens on the device; `pop` turns the counts since the last call into
    tokens/s and the needed work's share of the matmul peak (over all processes)."""

    def __init__(self, config, accelerator, dtype: torch.dtype):
        self.accelerator, self.dtype = accelerator, dtype
        self.body, self.head, self.scores = forward_flops(config)
        self.counts = None  # [tokens, completion tokens, sum of squared lengths] since the last pop
        self.start = None
        self.total_tokens = self.total_flops = self.total_seconds = 0.0

    def add(self, inputs: dict) -> None:
        if "cu_seq_lens_q" in inputs:  # a packed row: every token is real
            lengths = (inputs["cu_seq_lens_q"][1:] - inputs["cu_seq_lens_q"][:-1]).double()
        else:
            lengths = inputs["attention_mask"].sum(dim=1).double()
        counts = torch.stack([lengths.sum(), lengths.new_tensor(inputs["completion_positions"].numel()),
                              lengths.square().sum()])
        self.counts = counts if self.counts is None else self.counts + counts
        if self.start is None:
            self.start = time.perf_counter()

    def restart(self) -> None:
        """Leave the time since the last count out (an evaluation ran)."""
        self.start = None if self.counts is None else time.perf_counter()

    def pop(self) -> dict[str, float]:
        if self.counts is None:
            return {}
        tokens, completion_tokens, squares = self.accelerator.reduce(self.counts, reduction="sum").tolist()
        seconds = time.perf_counter() - self.start
        flops = 3 * (self.body * tokens + self.head * completion_tokens + self.scores * squares)
        peak = matmul_peak_flops(self.accelerator.device, self.dtype) * self.accelerator.num_processes
        self.total_tokens, self.total_flops = self.total_tokens + tokens, self.total_flops + flops
        self.total_seconds += seconds
        self.counts, self.start = None, time.perf_counter()
        return {"tokens_per_second": tokens / seconds, "matmul_peak_share": flops / seconds / peak}

    def totals(self) -> dict[str, float]:
        """The whole run's (the logged intervals'): for train_results.json."""
        if not self.total_seconds:
            return {}
        peak = matmul_peak_flops(self.accelerator.device, self.dtype) * self.accelerator.num_processes
        return {"train_tokens_per_second": self.total_tokens / self.total_seconds,
                "train_matmul_peak_share": self.total_flops / self.total_seconds / peak}
