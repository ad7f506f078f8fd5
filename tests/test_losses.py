import math

import pytest
import torch

from utils.losses import LOSS_TYPES, dpo_loss


def _random_logps(n=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [-(torch.rand(n, generator=g, dtype=torch.float64) * 40 + 1) for _ in range(4)]


def _log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def _expected(loss_type, beta, eps, pc, pr, rc, rr):
    """Independent per-pair formulas, written from the papers with plain floats."""
    margin = (pc - rc) - (pr - rr)
    if loss_type == "sigmoid":
        return -(1 - eps) * _log_sigmoid(beta * margin) - eps * _log_sigmoid(-beta * margin)
    if loss_type == "robust":
        return (-(1 - eps) * _log_sigmoid(beta * margin) + eps * _log_sigmoid(-beta * margin)) / (1 - 2 * eps)
    if loss_type == "ipo":
        return (margin - 1 / (2 * beta)) ** 2
    if loss_type == "hinge":
        return max(0.0, 1 - beta * margin)
    raise AssertionError(loss_type)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("beta,eps", [(0.1, 0.0), (0.5, 0.2)])
def test_each_variant_matches_independent_formula(loss_type, beta, eps):
    pc, pr, rc, rr = _random_logps()
    losses, chosen_rewards, rejected_rewards = dpo_loss(pc, pr, rc, rr, beta=beta, loss_type=loss_type,
                                                        label_smoothing=eps)
    expected = [_expected(loss_type, beta, eps, *map(float, row)) for row in zip(pc, pr, rc, rr)]
    torch.testing.assert_close(losses, torch.tensor(expected, dtype=torch.float64), rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(chosen_rewards, beta * (pc - rc))
    torch.testing.assert_close(rejected_rewards, beta * (pr - rr))


def _expected_dloss_dmargin(loss_type, beta, eps, margin):
    """d loss / d margin, derived by hand from each variant's formula (margin = chosen - rejected log-ratio)."""
    if loss_type == "sigmoid":
        return -(1 - eps) * beta * torch.sigmoid(-beta * margin) + eps * beta * torch.sigmoid(beta * margin)
    if loss_type == "robust":
        return (-(1 - eps) * beta * torch.sigmoid(-beta * margin) - eps * beta * torch.sigmoid(beta * margin)) / (
            1 - 2 * eps)
    if loss_type == "ipo":
        return 2 * (margin - 1 / (2 * beta))
    if loss_type == "hinge":
        return -beta * (beta * margin < 1).to(margin.dtype)
    raise AssertionError(loss_type)


@pytest.mark.parametrize("loss_type,beta,eps", [("sigmoid", 0.3, 0.0), ("sigmoid", 0.3, 0.2), ("robust", 0.3, 0.0),
                                                ("robust", 0.3, 0.2), ("ipo", 0.5, 0.0), ("hinge", 0.1, 0.0)])
def test_gradients_of_both_policy_sides_match_the_closed_form(loss_type, beta, eps):
    pc, pr, rc, rr = _random_logps(seed=1)
    pc.requires_grad_(True)
    pr.requires_grad_(True)
    losses, _, _ = dpo_loss(pc, pr, rc, rr, beta=beta, loss_type=loss_type, label_smoothing=eps)
    losses.sum().backward()
    margin = ((pc - rc) - (pr - rr)).detach()
    if loss_type == "hinge":  # a real test of both branches, and no pair on the kink
        assert (beta * margin < 1).any() and (beta * margin > 1).any()
        assert ((beta * margin - 1).abs() > 1e-6).all()
    dloss_dmargin = _expected_dloss_dmargin(loss_type, beta, eps, margin)
    assert (dloss_dmargin != 0).any()
    torch.testing.assert_close(pc.grad, dloss_dmargin, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(pr.grad, -dloss_dmargin, rtol=1e-9, atol=1e-12)


def test_rewards_are_detached_and_loss_is_not():
    pc, pr, rc, rr = _random_logps(seed=2)
    pc.requires_grad_(True)
    losses, chosen_rewards, rejected_rewards = dpo_loss(pc, pr, rc, rr, beta=0.1)
    assert losses.requires_grad
    assert not chosen_rewards.requires_grad and not rejected_rewards.requires_grad


def test_reference_free_is_zero_reference():
    pc, pr, _, _ = _random_logps(seed=3)
    zeros = torch.zeros_like(pc)
    losses, chosen_rewards, _ = dpo_loss(pc, pr, zeros, zeros, beta=0.2)
    expected = [-_log_sigmoid(0.2 * (float(c) - float(r))) for c, r in zip(pc, pr)]
    torch.testing.assert_close(losses, torch.tensor(expected, dtype=torch.float64))
    torch.testing.assert_close(chosen_rewards, 0.2 * pc)


def test_unknown_loss_type_is_an_error():
    pc, pr, rc, rr = _random_logps()
    with pytest.raises(ValueError, match="unknown loss_type"):
        dpo_loss(pc, pr, rc, rr, beta=0.1, loss_type="sigmod")
