"""Preference losses: a registry of pure functions of per-pair log-probs (no model, no Trainer).

Adding a loss is one entry in `LOSSES` and one independent formula in tests/test_losses.py: argument
validation (train_dpo.check_arguments), the TRL-parity test and the docs' loss table read the registry.
`--loss_type` takes a list, as TRL's does: the weighted sum of its terms (`[sigmoid, sft]` is RPO).
"""

from dataclasses import dataclass, replace
from typing import Callable

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class PairLogps:
    """Per pair, shape [batch]: the completions' summed log-probs under the policy and the reference, and the
    completions' token counts."""
    policy_chosen: torch.Tensor
    policy_rejected: torch.Tensor
    ref_chosen: torch.Tensor
    ref_rejected: torch.Tensor
    chosen_tokens: torch.Tensor
    rejected_tokens: torch.Tensor

    def per_token(self) -> "PairLogps":
        """Log-probs averaged over each completion's tokens, policy and reference alike."""
        return replace(self, policy_chosen=self.policy_chosen / self.chosen_tokens,
                       ref_chosen=self.ref_chosen / self.chosen_tokens,
                       policy_rejected=self.policy_rejected / self.rejected_tokens,
                       ref_rejected=self.ref_rejected / self.rejected_tokens)

    def margin(self) -> torch.Tensor:
        """(log pi(y_w) - log pi_ref(y_w)) - (log pi(y_l) - log pi_ref(y_l))."""
        return (self.policy_chosen - self.ref_chosen) - (self.policy_rejected - self.ref_rejected)


def sigmoid_loss(logps: PairLogps, beta: float, label_smoothing: float = 0.0) -> torch.Tensor:
    margin = logps.margin()
    return -F.logsigmoid(beta * margin) * (1 - label_smoothing) - F.logsigmoid(-beta * margin) * label_smoothing


def robust_loss(logps: PairLogps, beta: float, label_smoothing: float = 0.0) -> torch.Tensor:
    margin = logps.margin()
    return ((-F.logsigmoid(beta * margin) * (1 - label_smoothing) + F.logsigmoid(-beta * margin) * label_smoothing)
            / (1 - 2 * label_smoothing))


def ipo_loss(logps: PairLogps, beta: float) -> torch.Tensor:
    return (logps.margin() - 1 / (2 * beta)) ** 2


def hinge_loss(logps: PairLogps, beta: float) -> torch.Tensor:
    return torch.relu(1 - beta * logps.margin())


def simpo_loss(logps: PairLogps, beta: float, simpo_gamma: float = 0.5, label_smoothing: float = 0.0) -> torch.Tensor:
    # reference-free: the reference terms are zeros (LossSpec.uses_reference is False)
    logits = beta * (logps.policy_chosen - logps.policy_rejected) - simpo_gamma
    return -F.logsigmoid(logits) * (1 - label_smoothing) - F.logsigmoid(-logits) * label_smoothing


def sft_loss(logps: PairLogps, beta: float) -> torch.Tensor:
    """The chosen completions' NLL per token over the whole batch (as TRL's `sft` term), repeated per pair."""
    nll = -logps.policy_chosen.sum() / logps.chosen_tokens.sum()
    return nll.expand_as(logps.policy_chosen)


@dataclass(frozen=True)
class LossSpec:
    function: Callable[..., torch.Tensor]  # (PairLogps, beta, **flags) -> per-pair losses
    formula: str  # for the docs' table, with Δ the margin of log-ratios and ℓ̄ a per-token mean log-prob
    paper: str
    per_token: bool = False  # log-probs averaged over completion tokens before the loss (and in logged rewards)
    uses_reference: bool = True  # False: no reference is scored at all
    flags: tuple[str, ...] = ()  # hyper-parameters besides beta that it reads
    in_trl: bool = True  # TRL 1.12's DPOTrainer has it under this name (the parity test compares first batches)


LOSSES = {
    "sigmoid": LossSpec(
        sigmoid_loss, "`−log σ(βΔ)`; with `label_smoothing` ε: `−(1−ε) log σ(βΔ) − ε log σ(−βΔ)` (cDPO)",
        "Rafailov et al. 2023", flags=("label_smoothing",)),
    "robust": LossSpec(
        robust_loss, "`(−(1−ε) log σ(βΔ) + ε log σ(−βΔ)) / (1−2ε)`", "Chowdhury et al. 2024",
        flags=("label_smoothing",)),
    "ipo": LossSpec(ipo_loss, "`(Δ − 1/(2β))²`", "Azar et al. 2023", per_token=True),
    "hinge": LossSpec(hinge_loss, "`max(0, 1 − βΔ)`", "Zhao et al. 2023 (SLiC)"),
    "sigmoid_norm": LossSpec(
        sigmoid_loss, "DPO's `−log σ(βΔ)` on per-token averaged log-ratios", "TRL's `sigmoid_norm`", per_token=True),
    "simpo": LossSpec(
        simpo_loss, "`−log σ(β(ℓ̄_w − ℓ̄_l) − γ)`, no reference (none is scored)", "Meng et al. 2024", per_token=True,
        uses_reference=False, flags=("simpo_gamma", "label_smoothing"), in_trl=False),
    "sft": LossSpec(
        sft_loss, "NLL per token of the chosen completions; `[sigmoid, sft]` with `loss_weights` is RPO",
        "Pang et al. 2024 (RPO)", uses_reference=False),
}
FLAG_DEFAULTS = {"label_smoothing": 0.0, "simpo_gamma": 0.5}


def preference_loss(logps: PairLogps, loss_types=("sigmoid",), loss_weights=None, *, beta: float, **flags):
    """(per-pair losses, chosen rewards, rejected rewards, {loss type: its mean}) for the weighted sum of the
    `loss_types` terms; `flags` are the registry's hyper-parameters (label_smoothing, simpo_gamma).

    Rewards are the implicit rewards beta * (log pi - log pi_ref), detached (metrics, not part of the graph), as the
    first term sees them: from per-token means where it averages over tokens, without pi_ref where it reads none."""
    unknown = [name for name in loss_types if name not in LOSSES]
    if unknown:
        raise ValueError(f"unknown loss_type {unknown}; choose from {list(LOSSES)}")
    weights = [1.0] * len(loss_types) if loss_weights is None else loss_weights
    values = {**FLAG_DEFAULTS, **{name: value for name, value in flags.items() if value is not None}}
    losses, terms = 0.0, {}
    for name, weight in zip(loss_types, weights, strict=True):
        spec = LOSSES[name]
        term = spec.function(logps.per_token() if spec.per_token else logps, beta,
                             **{flag: values[flag] for flag in spec.flags})
        terms[name] = term.mean().detach()
        losses = losses + weight * term
    chosen_rewards, rejected_rewards = implicit_rewards(as_logged(logps, loss_types), beta)
    return losses, chosen_rewards, rejected_rewards, terms


def implicit_rewards(shown: PairLogps, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """beta * (log pi - log pi_ref) of the chosen and the rejected completions, detached."""
    return (beta * (shown.policy_chosen - shown.ref_chosen).detach(),
            beta * (shown.policy_rejected - shown.ref_rejected).detach())


def as_logged(logps: PairLogps, loss_types, per_token: bool | None = None) -> PairLogps:
    """The log-probs as the first term of `loss_types` sees them (`per_token` None), or summed (False) or averaged
    over each completion's tokens (True): no pi_ref where that term reads none (SimPO's reward is beta times the
    policy's log-prob)."""
    first = LOSSES[loss_types[0]]
    shown = logps.per_token() if (first.per_token if per_token is None else per_token) else logps
    if not first.uses_reference:
        shown = replace(shown, ref_chosen=torch.zeros_like(shown.ref_chosen),
                        ref_rejected=torch.zeros_like(shown.ref_rejected))
    return shown


def logged_metrics(logps: PairLogps, loss_types, beta: float) -> dict[str, torch.Tensor]:
    """Per pair, detached: `rewards/*` and `logps/*` from summed log-probs, as TRL 1.12 logs them whatever the loss;
    where the first term of `loss_types` averages over tokens, the same from per-token means, which that loss sees,
    as `rewards_per_token/*` and `logps_per_token/*`. So a dashboard key means one thing for every loss."""
    views = {"": False, "_per_token": True} if LOSSES[loss_types[0]].per_token else {"": False}
    metrics = {}
    for suffix, per_token in views.items():
        shown = as_logged(logps, loss_types, per_token)
        chosen, rejected = implicit_rewards(shown, beta)
        metrics.update({f"rewards{suffix}/chosen": chosen, f"rewards{suffix}/rejected": rejected,
                        f"rewards{suffix}/accuracies": (chosen > rejected).float(),
                        f"rewards{suffix}/margins": chosen - rejected,
                        f"logps{suffix}/chosen": shown.policy_chosen.detach(),
                        f"logps{suffix}/rejected": shown.policy_rejected.detach()})
    return metrics


def uses_reference(loss_types) -> bool:
    return any(LOSSES[name].uses_reference for name in loss_types)


def loss_table() -> str:
    """The registry as the README's Markdown table (a test checks the README holds it)."""
    rows = [f"| `{name}` | {spec.formula} | {'averaged' if spec.per_token else 'summed'} | "
            f"{', '.join(f'`{flag}`' for flag in ('beta', *spec.flags))} | {spec.paper} |"
            for name, spec in LOSSES.items()]
    return "\n".join(["| `loss_type` | per-pair loss | log-probs | flags | paper |", "| --- | --- | --- | --- | --- |",
                      *rows])
