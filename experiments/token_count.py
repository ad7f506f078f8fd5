"""Token positions that a run's models process, counted as they run (not estimated from a configuration).

    python experiments/token_count.py COUNTS.json SCRIPT.py [flags]   # runs SCRIPT.py, then writes the counts

Every forward of an outermost Hugging Face model (a PreTrainedModel that is not called from inside another) adds its
input positions (batch x sequence, padding included: what the model computes on) to `forward_backward` when autograd
records it (training: a backward follows) and to `forward` otherwise (generation, reference and reward scoring). A
model's inner body called directly, as TRL's PPO calls the value model's backbone and the reward model's, counts as
one model. The ground-truth reward is no model and counts nothing.

Each forward is also kept as an event (wall time, model, kind, positions), and each model's forward FLOPs per position
(utils/speed.forward_flops: the body, plus the output layer where the model has one; attention's length-squared term
is left out), so that a study can cut the counts at a checkpoint's time and turn them into FLOPs
(`flops_until`).
"""

import argparse
import json
import os
import runpy
import sys
import time

import torch
from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook


class TokenCounter:
    """Context manager: counts positions of every outermost PreTrainedModel forward while active."""

    def __init__(self):
        self.counts = {"forward_backward": 0, "forward": 0, "flops_per_position": {}, "events": []}
        self.depth = 0

    def __enter__(self):
        from transformers import PreTrainedModel

        def enter(module, args):
            if isinstance(module, PreTrainedModel):
                self.depth += 1

        def leave(module, args, kwargs, output):
            if not isinstance(module, PreTrainedModel):
                return
            self.depth -= 1
            if self.depth == 0:
                inputs = kwargs.get("input_ids", kwargs.get("inputs_embeds", args[0] if args else None))
                if isinstance(inputs, torch.Tensor):
                    positions = inputs.shape[0] * inputs.shape[1] if inputs.dim() > 1 else inputs.numel()
                    kind = "forward_backward" if torch.is_grad_enabled() else "forward"
                    self.counts[kind] += positions
                    model = type(module).__name__
                    if model not in self.counts["flops_per_position"]:
                        self.counts["flops_per_position"][model] = flops_per_position(module)
                    self.counts["events"].append((time.time(), model, kind, positions))

        self.handles = [register_module_forward_pre_hook(enter),
                        register_module_forward_hook(leave, with_kwargs=True, always_call=True)]
        return self

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()


def flops_per_position(model) -> float:
    """Forward FLOPs per input position: the body, plus the output layer if the model has one (a causal LM's head
    runs on every position; a classifier's score layer is negligible)."""
    from utils.speed import forward_flops

    body, head, _ = forward_flops(model.config)
    return body + (head if model.get_output_embeddings() is not None else 0)


def flops_until(counts: dict, until: float = float("inf")) -> float:
    """FLOPs of the forwards counted up to wall time `until`: forward = 1, backward = 2 forwards."""
    per_position = counts["flops_per_position"]
    return sum(positions * per_position[model] * (3 if kind == "forward_backward" else 1)
               for when, model, kind, positions in counts["events"] if when <= until)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("counts_file", help="where the counts go (JSON), written even if the script fails")
    parser.add_argument("script", help="the script to run, as `python SCRIPT.py` runs it")
    parser.add_argument("flags", nargs=argparse.REMAINDER, help="the script's own flags")
    args = parser.parse_args()
    counts_file, script, flags = args.counts_file, args.script, args.flags
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    sys.path.insert(0, repo)  # as `python SCRIPT.py` would put the script's folder first
    sys.argv = [script, *flags]
    with TokenCounter() as counter:
        try:
            runpy.run_path(script, run_name="__main__")
        finally:
            with open(counts_file, "w") as f:
                json.dump(counter.counts, f)


if __name__ == "__main__":
    main()
