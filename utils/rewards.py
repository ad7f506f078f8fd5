"""The toy task's ground-truth reward in the shape of a reward model, for PPO-GT (the DPO paper's PPO baseline that
is given the true reward instead of a learned one)."""

import torch
from torch import nn
from transformers.modeling_outputs import BaseModelOutput

from utils import toy_task


class GroundTruthReward(nn.Module):
    """Scores completions with `toy_task.ground_truth_reward` wherever TRL's PPOTrainer expects a reward model.

    TRL scores with `get_reward(model, query_responses, pad_token_id, context_length)`: it calls
    `getattr(model, model.base_model_prefix)` as the backbone, applies `model.score` to its last hidden states and
    reads each row at its completion's last token. Here that backbone is `score_completions`, which decodes each
    completion and puts its reward at every position, and `score` is the identity.

    `get_reward` does not pass `context_length` on, so prompts must be left-padded to exactly `prompt_length` tokens:
    every completion then starts at that column.
    """

    base_model_prefix = "score_completions"

    def __init__(self, tokenizer, prompt_length: int):
        super().__init__()
        self.tokenizer = tokenizer
        self.prompt_length = prompt_length
        self.score = nn.Identity()

    def score_completions(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **unused) -> BaseModelOutput:
        completions = input_ids[:, self.prompt_length:]
        # A completion ends at its first padding token, as TRL's sequence lengths do (it pads after the stop token).
        kept = attention_mask[:, self.prompt_length:].long().cumprod(dim=1).bool()
        texts = [self.tokenizer.decode(ids[mask], skip_special_tokens=True) for ids, mask in zip(completions, kept)]
        rewards = torch.tensor(toy_task.ground_truth_reward(texts), dtype=torch.float32, device=input_ids.device)
        return BaseModelOutput(hidden_states=(rewards[:, None, None].expand(-1, input_ids.shape[1], 1),))
