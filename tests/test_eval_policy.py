import json
import math

import pytest
import torch

import eval_policy
from eval_policy import kl_estimate, win_rate


def test_kl_estimate_matches_closed_form_for_categoricals():
    p = torch.tensor([0.5, 0.3, 0.15, 0.05])
    q = torch.tensor([0.25, 0.25, 0.25, 0.25])
    exact = sum(pi * math.log(pi / qi) for pi, qi in zip(p.tolist(), q.tolist()))
    samples = torch.multinomial(p, 20_000, replacement=True, generator=torch.Generator().manual_seed(0))
    log_ratio = p.log()[samples] - q.log()[samples]
    standard_error = log_ratio.std().item() / math.sqrt(len(samples))
    assert kl_estimate(p.log()[samples], q.log()[samples]) == pytest.approx(exact, abs=4 * standard_error)
    assert kl_estimate(p.log()[samples], p.log()[samples]) == 0.0


def test_win_rate_counts_ties_as_half():
    assert win_rate([1.0, 0.0, 0.5, 0.2], [0.0, 1.0, 0.5, 0.1]) == pytest.approx((1 + 0 + 0.5 + 1) / 4)


def test_policy_equal_to_reference_has_zero_kl_and_writes_json(tmp_path):
    output = tmp_path / "eval.json"
    results = eval_policy.main(["--policy_path", "mixtral-tiny", "--reference_path", "mixtral-tiny",
                                "--num_prompts", "8", "--num_eval_pairs", "8", "--max_new_tokens", "6",
                                "--output_file", str(output)])
    assert results["kl"] == 0.0  # every sampled token has the same log-prob under both
    assert results["preference_accuracy"] == 0.0  # identical models: every implicit margin is exactly zero
    assert 0.0 <= results["win_rate"] <= 1.0
    assert json.loads(output.read_text())["mean_reward"] == pytest.approx(results["mean_reward"])
