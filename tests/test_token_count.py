"""experiments/token_count.py: the positions a run's models process, by kind, each model counted once."""

import os
import sys

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "experiments"))

from token_count import TokenCounter, flops_until  # noqa: E402


def test_counts_training_scoring_and_generation_positions(tokenizer):
    from utils.modeling import ModelArguments, load_model

    model = load_model(ModelArguments(model_name_or_path="mixtral-tiny"), tokenizer)
    ids = torch.randint(3, 50, (3, 7))
    with TokenCounter() as counter:
        model(input_ids=ids).logits.sum().backward()  # training: MixtralModel inside counts with its parent, once
        with torch.no_grad():
            model(ids)  # scoring, the ids as a positional argument
            model.model(input_ids=ids[:2])  # a body called directly (TRL's value and reward models): one model
    counts = counter.counts
    assert (counts["forward_backward"], counts["forward"]) == (21, 21 + 14)
    model(input_ids=ids)  # after the context: not counted
    assert counter.counts["forward_backward"] == 21

    # FLOPs: the causal LM with its output layer, the body alone without; a backward costs two forwards
    from utils.speed import forward_flops

    body, head, _ = forward_flops(model.config)
    assert counts["flops_per_position"] == {"MixtralForCausalLM": body + head, "MixtralModel": body}
    assert flops_until(counts) == (body + head) * (3 * 21 + 21) + body * 14
    first, second = counts["events"][0][0], counts["events"][1][0]
    assert flops_until(counts, first) == (body + head) * 3 * 21  # cut at a time: the events up to it
    assert flops_until(counts, second) == (body + head) * (3 * 21 + 21)

    prompt = torch.randint(3, 50, (2, 5))
    with TokenCounter() as counter:
        model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=4, min_new_tokens=4,
                       do_sample=False, pad_token_id=tokenizer.pad_token_id, output_router_logits=False)
    # the prompt once, then one position per row for each new token but the last (it is never fed back)
    assert (counter.counts["forward_backward"], counter.counts["forward"]) == (0, 2 * 5 + 2 * 3)
