"""The two kernel-level choices behind the DPO speed on CPU, measured alone (bench/RESULTS.md).

    .venv/bin/python bench/bench_kernels.py

1. MoE experts: the `mixtral-small` body's forward+backward (16 x 100 tokens) with transformers'
   eager and grouped_mm experts and ours (autocast_grouped_mm), in fp32 and under bf16 autocast.
2. Completion log-probs: the output layer plus log-softmax at the labels for 4096 tokens x 32k vocab,
   forward+backward, as `utils.logprobs` computes it against logsumexp over the whole chunk.
Best of a few repeats, in milliseconds.
"""

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from transformers import MixtralForCausalLM  # noqa: E402

from utils.logprobs import _token_logps  # noqa: E402
from utils.modeling import AUTOCAST_GROUPED_MM, preset_config, toy_tokenizer  # noqa: E402


def best_ms(step, repeats: int = 4) -> float:
    step()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        best = min(best, time.perf_counter() - start)
    return 1000 * best


def autocast(precision: str):
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")


def experts(precision: str) -> None:
    input_ids = torch.randint(0, 700, (16, 100), generator=torch.Generator().manual_seed(0))
    for implementation in ("eager", "grouped_mm", AUTOCAST_GROUPED_MM):
        torch.manual_seed(0)
        model = MixtralForCausalLM._from_config(preset_config("mixtral-small", toy_tokenizer()),
                                                experts_implementation=implementation, attn_implementation="sdpa")

        def step():
            with autocast(precision):
                hidden = model.model(input_ids=input_ids).last_hidden_state
            hidden.float().square().mean().backward()

        print(f"experts {implementation:20s} {precision}: body forward+backward {best_ms(step):7.0f} ms")


def whole_chunk_logsumexp(output_layer, hidden, labels):
    logits = output_layer(hidden).float()
    return logits.gather(-1, labels.unsqueeze(-1)).squeeze(-1) - logits.logsumexp(-1)


def log_softmax(precision: str, tokens: int = 4096, dim: int = 384, vocab: int = 32000) -> None:
    generator = torch.Generator().manual_seed(0)
    output_layer = torch.nn.Linear(dim, vocab, bias=False)
    hidden = torch.randn(tokens, dim, generator=generator, requires_grad=True)
    labels = torch.randint(0, vocab, (tokens,), generator=generator)
    for name, function in (("logsumexp, whole chunk", whole_chunk_logsumexp), ("utils.logprobs", _token_logps)):
        def step():
            with autocast(precision):
                token_logps = function(output_layer, hidden, labels)
            token_logps.sum().backward()

        print(f"log-probs {name:22s} {precision}: output layer forward+backward {best_ms(step):7.0f} ms")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", 2)),
                        help="torch's CPU threads (default: OMP_NUM_THREADS, else 2)")
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    for precision in args.precisions:
        experts(precision)
        log_softmax(precision)
