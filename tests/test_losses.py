"""Every registered loss against an independent per-pair formula written from its paper with plain floats, both
policy sides' gradients against the closed form, and the registry's combinations (TRL's loss_type lists)."""

import math
from types import SimpleNamespace

import pytest
import torch

from utils.losses import LOSSES, PairLogps, logged_metrics, loss_table, preference_loss


def _random_logps(n=16, seed=0) -> PairLogps:
    g = torch.Generator().manual_seed(seed)
    sums = [-(torch.rand(n, generator=g, dtype=torch.float64) * 40 + 1) for _ in range(4)]
    tokens = [torch.randint(1, 30, (n,), generator=g).double() for _ in range(2)]
    return PairLogps(*sums, *tokens)


def _log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def _expected(loss_type, beta, eps, gamma, pc, pr, rc, rr, nc, nr, batch_nll):
    """Independent per-pair formulas, written from the papers with plain floats."""
    margin = (pc - rc) - (pr - rr)
    mean_margin = (pc - rc) / nc - (pr - rr) / nr
    if loss_type == "sigmoid":
        return -(1 - eps) * _log_sigmoid(beta * margin) - eps * _log_sigmoid(-beta * margin)
    if loss_type == "robust":
        return (-(1 - eps) * _log_sigmoid(beta * margin) + eps * _log_sigmoid(-beta * margin)) / (1 - 2 * eps)
    if loss_type == "ipo":
        return (mean_margin - 1 / (2 * beta)) ** 2
    if loss_type == "hinge":
        return max(0.0, 1 - beta * margin)
    if loss_type == "sigmoid_norm":
        return -_log_sigmoid(beta * mean_margin)
    if loss_type == "simpo":  # Meng et al. 2024, eq. 6: no reference, per-token means, margin gamma
        logit = beta * pc / nc - beta * pr / nr - gamma
        return -(1 - eps) * _log_sigmoid(logit) - eps * _log_sigmoid(-logit)
    if loss_type == "sft":
        return batch_nll
    raise AssertionError(f"no independent formula for {loss_type}: add one with the registry entry")


def _flags(loss_type, eps, gamma) -> dict:
    flags = LOSSES[loss_type].flags
    return {**({"label_smoothing": eps} if "label_smoothing" in flags else {}),
            **({"simpo_gamma": gamma} if "simpo_gamma" in flags else {})}


@pytest.mark.parametrize("loss_type", list(LOSSES))
@pytest.mark.parametrize("beta,eps,gamma", [(0.1, 0.0, 0.5), (0.5, 0.2, 1.0)])
def test_each_loss_matches_its_independent_formula(loss_type, beta, eps, gamma):
    logps = _random_logps()
    flags = _flags(loss_type, eps, gamma)
    losses, chosen_rewards, rejected_rewards, terms = preference_loss(logps, [loss_type], beta=beta, **flags)
    batch_nll = float(-logps.policy_chosen.sum() / logps.chosen_tokens.sum())
    used_eps = flags.get("label_smoothing", 0.0)
    expected = [_expected(loss_type, beta, used_eps, gamma, *map(float, row), batch_nll)
                for row in zip(logps.policy_chosen, logps.policy_rejected, logps.ref_chosen, logps.ref_rejected,
                               logps.chosen_tokens, logps.rejected_tokens)]
    torch.testing.assert_close(losses, torch.tensor(expected, dtype=torch.float64), rtol=1e-9, atol=1e-9)
    shown = logps.per_token() if LOSSES[loss_type].per_token else logps
    uses_reference = float(LOSSES[loss_type].uses_reference)
    torch.testing.assert_close(chosen_rewards, beta * (shown.policy_chosen - uses_reference * shown.ref_chosen))
    torch.testing.assert_close(rejected_rewards, beta * (shown.policy_rejected - uses_reference * shown.ref_rejected))
    assert terms[loss_type].item() == pytest.approx(sum(expected) / len(expected))


def test_a_list_of_losses_is_their_weighted_sum():
    logps = _random_logps(seed=4)
    combined, rewards, _, terms = preference_loss(logps, ["sigmoid", "sft"], [1.0, 0.7], beta=0.2)
    sigmoid, sigmoid_rewards, _, _ = preference_loss(logps, ["sigmoid"], beta=0.2)
    sft, _, _, _ = preference_loss(logps, ["sft"], beta=0.2)
    torch.testing.assert_close(combined, sigmoid + 0.7 * sft)
    torch.testing.assert_close(rewards, sigmoid_rewards)  # the first term's rewards
    assert set(terms) == {"sigmoid", "sft"}


def test_simpo_matches_trl_cpo_loss():
    """TRL has SimPO in its CPOTrainer (cpo_alpha 0), fed per-token mean log-probs; its loss function alone."""
    from trl.experimental.cpo import CPOTrainer

    logps = _random_logps(seed=5)
    for beta, gamma, eps in ((2.0, 0.5, 0.0), (2.5, 1.4, 0.1)):
        ours, chosen_rewards, _, _ = preference_loss(logps, ["simpo"], beta=beta, simpo_gamma=gamma,
                                                     label_smoothing=eps)
        config = SimpleNamespace(alpha=0.0, beta=beta, simpo_gamma=gamma, label_smoothing=eps, loss_type="simpo",
                                 accelerator=SimpleNamespace(device="cpu"))
        per_token = logps.per_token()
        theirs, trl_chosen_rewards, _ = CPOTrainer.cpo_loss(config, per_token.policy_chosen, per_token.policy_rejected)
        torch.testing.assert_close(ours, theirs)
        torch.testing.assert_close(chosen_rewards, trl_chosen_rewards)


def _expected_dloss_dmargin(loss_type, beta, eps, margin):
    """d loss / d margin, derived by hand from each loss's formula (margin = chosen - rejected log-ratio)."""
    if loss_type == "sigmoid":
        return -(1 - eps) * beta * torch.sigmoid(-beta * margin) + eps * beta * torch.sigmoid(beta * margin)
    if loss_type == "robust":
        return (-(1 - eps) * beta * torch.sigmoid(-beta * margin) - eps * beta * torch.sigmoid(beta * margin)) / (
            1 - 2 * eps)
    if loss_type == "hinge":
        return -beta * (beta * margin < 1).to(margin.dtype)
    raise AssertionError(loss_type)


@pytest.mark.parametrize("loss_type,beta,eps", [("sigmoid", 0.3, 0.0), ("sigmoid", 0.3, 0.2), ("robust", 0.3, 0.0),
                                                ("robust", 0.3, 0.2), ("hinge", 0.1, 0.0)])
def test_gradients_of_both_policy_sides_match_the_closed_form(loss_type, beta, eps):
    logps = _random_logps(seed=1)
    logps.policy_chosen.requires_grad_(True)
    logps.policy_rejected.requires_grad_(True)
    losses, _, _, _ = preference_loss(logps, [loss_type], beta=beta, **_flags(loss_type, eps, 0.5))
    losses.sum().backward()
    margin = logps.margin().detach()
    if loss_type == "hinge":  # a real test of both branches, and no pair on the kink
        assert (beta * margin < 1).any() and (beta * margin > 1).any()
        assert ((beta * margin - 1).abs() > 1e-6).all()
    dloss_dmargin = _expected_dloss_dmargin(loss_type, beta, eps, margin)
    assert (dloss_dmargin != 0).any()
    torch.testing.assert_close(logps.policy_chosen.grad, dloss_dmargin, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(logps.policy_rejected.grad, -dloss_dmargin, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("loss_type,beta", [("ipo", 0.5), ("sigmoid_norm", 0.3), ("simpo", 2.0)])
def test_per_token_losses_divide_each_sides_gradient_by_its_length(loss_type, beta):
    logps = _random_logps(seed=6)
    logps.policy_chosen.requires_grad_(True)
    logps.policy_rejected.requires_grad_(True)
    losses, _, _, _ = preference_loss(logps, [loss_type], beta=beta)
    losses.sum().backward()
    per_token = logps.per_token()
    if loss_type == "ipo":
        dloss_dmean = 2 * (per_token.margin().detach() - 1 / (2 * beta))
    elif loss_type == "sigmoid_norm":
        dloss_dmean = -beta * torch.sigmoid(-beta * per_token.margin().detach())
    else:
        logit = beta * (per_token.policy_chosen - per_token.policy_rejected).detach() - 0.5
        dloss_dmean = -beta * torch.sigmoid(-logit)
    torch.testing.assert_close(logps.policy_chosen.grad, dloss_dmean / logps.chosen_tokens, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(logps.policy_rejected.grad, -dloss_dmean / logps.rejected_tokens, rtol=1e-9,
                               atol=1e-12)


@pytest.mark.parametrize("loss_type", list(LOSSES))
def test_logged_metrics_keep_trl_names_for_sums_and_name_per_token_means_apart(loss_type):
    """rewards/* and logps/* are TRL's (summed log-probs) for every loss; a loss that averages over tokens adds what it
    sees as rewards_per_token/* and logps_per_token/*; pi_ref counts only where the loss reads one."""
    logps, beta = _random_logps(seed=7), 0.3
    logps.policy_chosen.requires_grad_(True)
    metrics = logged_metrics(logps, [loss_type], beta)
    ref = float(LOSSES[loss_type].uses_reference)
    views = {"": (1.0, 1.0)}
    if LOSSES[loss_type].per_token:
        views["_per_token"] = (logps.chosen_tokens, logps.rejected_tokens)
    for suffix, (n_chosen, n_rejected) in views.items():
        chosen = beta * (logps.policy_chosen - ref * logps.ref_chosen) / n_chosen
        rejected = beta * (logps.policy_rejected - ref * logps.ref_rejected) / n_rejected
        torch.testing.assert_close(metrics[f"rewards{suffix}/chosen"], chosen.detach())
        torch.testing.assert_close(metrics[f"rewards{suffix}/rejected"], rejected.detach())
        torch.testing.assert_close(metrics[f"rewards{suffix}/margins"], (chosen - rejected).detach())
        torch.testing.assert_close(metrics[f"rewards{suffix}/accuracies"], (chosen > rejected).float())
        torch.testing.assert_close(metrics[f"logps{suffix}/chosen"], (logps.policy_chosen / n_chosen).detach())
        torch.testing.assert_close(metrics[f"logps{suffix}/rejected"], logps.policy_rejected / n_rejected)
    assert len(metrics) == 6 * len(views) and not any(value.requires_grad for value in metrics.values())


def test_rewards_are_detached_and_loss_is_not():
    logps = _random_logps(seed=2)
    logps.policy_chosen.requires_grad_(True)
    losses, chosen_rewards, rejected_rewards, _ = preference_loss(logps, beta=0.1)
    assert losses.requires_grad
    assert not chosen_rewards.requires_grad and not rejected_rewards.requires_grad


def test_simpo_reads_no_reference():
    logps = _random_logps(seed=3)
    other_reference = PairLogps(logps.policy_chosen, logps.policy_rejected, logps.ref_chosen * 3, logps.ref_rejected,
                                logps.chosen_tokens, logps.rejected_tokens)
    assert not LOSSES["simpo"].uses_reference
    # the trainer passes zeros for a loss that uses no reference; the loss itself ignores them anyway
    torch.testing.assert_close(preference_loss(logps, ["simpo"], beta=2.0)[0],
                               preference_loss(other_reference, ["simpo"], beta=2.0)[0])


def test_unknown_loss_type_is_an_error():
    with pytest.raises(ValueError, match="unknown loss_type"):
        preference_loss(_random_logps(), ["sigmod"], beta=0.1)


def test_the_docs_loss_table_is_the_registry():
    import pathlib

    docs = (pathlib.Path(__file__).parent.parent / "README.md").read_text()
    assert loss_table() in docs
