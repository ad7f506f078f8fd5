"""Preference losses: pure functions of sequence log-probs (no model, no Trainer)."""

import torch
import torch.nn.functional as F

LOSS_TYPES = ("sigmoid", "robust", "ipo", "hinge")
# IPO regresses a length-normalised margin; the trainer averages log-probs over tokens for these.
LENGTH_AVERAGED_LOSSES = ("ipo",)


def dpo_loss(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
             ref_chosen_logps: torch.Tensor, ref_rejected_logps: torch.Tensor, *, beta: float,
             loss_type: str = "sigmoid", label_smoothing: float = 0.0):
    """Per-pair losses and implicit rewards beta * (log pi - log pi_ref), all of shape [batch].

    `label_smoothing` is the assumed probability that a label is flipped (cDPO and robust DPO).
    Rewards are detached: they are metrics, not part of the graph.
    """
    margin = (policy_chosen_logps - ref_chosen_logps) - (policy_rejected_logps - ref_rejected_logps)
    if loss_type == "sigmoid":  # DPO, Rafailov et al. 2023; label_smoothing > 0 gives conservative DPO (cDPO)
        losses = (-F.logsigmoid(beta * margin) * (1 - label_smoothing)
                  - F.logsigmoid(-beta * margin) * label_smoothing)
    elif loss_type == "robust":  # unbiased under label noise, Chowdhury et al. 2024 (rDPO)
        losses = ((-F.logsigmoid(beta * margin) * (1 - label_smoothing)
                   + F.logsigmoid(-beta * margin) * label_smoothing) / (1 - 2 * label_smoothing))
    elif loss_type == "ipo":  # IPO, Azar et al. 2023: squared loss toward 1 / (2 beta)
        losses = (margin - 1 / (2 * beta)) ** 2
    elif loss_type == "hinge":  # SLiC-HF, Zhao et al. 2023
        losses = torch.relu(1 - beta * margin)
    else:
        raise ValueError(f"unknown loss_type {loss_type!r}; choose from {LOSS_TYPES}")
    chosen_rewards = beta * (policy_chosen_logps - ref_chosen_logps).detach()
    rejected_rewards = beta * (policy_rejected_logps - ref_rejected_logps).detach()
    return losses, chosen_rewards, rejected_rewards
