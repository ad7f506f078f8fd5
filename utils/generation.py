"""Sampling completions from a policy (toy pairs, evaluation, the demo)."""

from dataclasses import dataclass

import torch

from utils.modeling import generation_attention


@dataclass
class Completion:
    prompt_ids: list[int]
    completion_ids: list[int]  # the sampled tokens, up to and including eos
    text: str  # the completion decoded without special tokens


@torch.no_grad()
def sample(model, tokenizer, prompts: list[str], *, max_new_tokens: int = 32, temperature: float = 1.0,
           top_p: float = 1.0, batch_size: int = 64) -> list[Completion]:
    """One sampled completion per prompt (greedy when temperature is 0)."""
    was_training, padding_side = model.training, tokenizer.padding_side
    model.eval()
    tokenizer.padding_side = "left"  # generation appends on the right, so prompts must end at the same column
    sampling = dict(do_sample=True, temperature=temperature, top_p=top_p, top_k=0) if temperature > 0 else dict(
        do_sample=False)
    completions = []
    try:
        for start in range(0, len(prompts), batch_size):
            batch = tokenizer(prompts[start:start + batch_size], return_tensors="pt", padding=True).to(model.device)
            # transformers 5.23's generate() crashes on Mixtral with router logits on.
            with generation_attention(model):
                output = model.generate(**batch, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                                        eos_token_id=tokenizer.eos_token_id, output_router_logits=False, **sampling)
            width = batch["input_ids"].shape[1]
            for prompt_ids, prompt_mask, ids in zip(batch["input_ids"], batch["attention_mask"], output[:, width:]):
                ids = ids.tolist()
                if tokenizer.eos_token_id in ids:  # generate pads finished rows after their eos
                    ids = ids[:ids.index(tokenizer.eos_token_id) + 1]
                completions.append(Completion(prompt_ids[prompt_mask.bool()].tolist(), ids,
                                              tokenizer.decode(ids, skip_special_tokens=True)))
    finally:
        tokenizer.padding_side = padding_side
        model.train(was_training)
    return completions


def sample_completions(model, tokenizer, prompts: list[str], **kwargs) -> list[str]:
    """The completions' texts only."""
    return [completion.text for completion in sample(model, tokenizer, prompts, **kwargs)]
