"""Completion log-probs: the only place that turns logits into log pi(y|x)."""

import torch


def completion_logps(logits: torch.Tensor, input_ids: torch.Tensor,
                     completion_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of each row's completion-token log-probs, and the number of those tokens.

    logits: [batch, seq, vocab] from the model on `input_ids` [batch, seq]; completion_mask marks
    the tokens that count (prompt and padding are 0). Returns (sum_logps, num_tokens), both [batch].
    """
    labels = input_ids[:, 1:]  # the logits at position t predict the token at t + 1
    mask = completion_mask[:, 1:].to(torch.float32)
    logits = logits[:, :-1].float()
    # gather - logsumexp equals log_softmax at the label without materialising a second [B, T, V] tensor
    token_logps = torch.gather(logits, -1, labels.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)
    return (token_logps * mask).sum(-1), mask.sum(-1)
