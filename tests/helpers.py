"""Independent reference computations shared by tests (plain transformers, no project code paths)."""

import torch


def loop_logps(model, prompt_ids: list[int], completion_ids: list[int]) -> float:
    """One unpadded sequence through the model; the sum of its completion tokens' log-probs, in float64."""
    ids = torch.tensor([prompt_ids + completion_ids])
    with torch.no_grad():
        logprobs = torch.log_softmax(model(ids).logits[0].double(), dim=-1)
    return sum(logprobs[t - 1, ids[0, t]].item() for t in range(len(prompt_ids), ids.shape[1]))
