"""Token positions that a run's models process, counted as they run (not estimated from a configuration).

    python experiments/token_count.py COUNTS.json SCRIPT.py [flags]   # runs SCRIPT.py, then writes the counts

Every forward of an outermost Hugging Face model (a PreTrainedModel that is not called from inside another) adds its
input positions (batch x sequence, padding included: what the model computes on) to `forward_backward` when autograd
records it (training: a backward follows) and to `forward` otherwise (generation, reference and reward scoring). A
model's inner body called directly, as TRL's PPO calls the value model's backbone and the reward model's, counts as
one model. The ground-truth reward is no model and counts nothing.
"""

import argparse
import json
import os
import runpy
import sys

import torch
from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook


class TokenCounter:
    """Context manager: counts positions of every outermost PreTrainedModel forward while active."""

    def __init__(self):
        self.counts = {"forward_backward": 0, "forward": 0}
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
                    self.counts["forward_backward" if torch.is_grad_enabled() else "forward"] += positions

        self.handles = [register_module_forward_pre_hook(enter),
                        register_module_forward_hook(leave, with_kwargs=True, always_call=True)]
        return self

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()


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
