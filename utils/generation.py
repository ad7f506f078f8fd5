"""Sampling completions from a policy (toy pairs, evaluation, the demo)."""

import torch


@torch.no_grad()
def sample_completions(model, tokenizer, prompts: list[str], *, max_new_tokens: int = 32, temperature: float = 1.0,
                       top_p: float = 1.0, batch_size: int = 64) -> list[str]:
    """One sampled completion per prompt (greedy when temperature is 0), decoded without special tokens."""
    was_training, padding_side = model.training, tokenizer.padding_side
    model.eval()
    tokenizer.padding_side = "left"  # generation appends on the right, so prompts must end at the same column
    completions = []
    try:
        for start in range(0, len(prompts), batch_size):
            batch = tokenizer(prompts[start:start + batch_size], return_tensors="pt", padding=True).to(model.device)
            sampling = dict(do_sample=True, temperature=temperature, top_p=top_p) if temperature > 0 else dict(
                do_sample=False)
            # transformers 5.23's generate() crashes on Mixtral with router logits on.
            output = model.generate(**batch, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                                    output_router_logits=False, **sampling)
            new_tokens = output[:, batch["input_ids"].shape[1]:]
            completions += tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
    finally:
        tokenizer.padding_side = padding_side
        model.train(was_training)
    return completions
