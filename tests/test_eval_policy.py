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


def test_sampled_logps_equal_a_plain_loop_over_the_sampled_ids():
    """The KL's log-probs: padded batches of sampled ids (cut at eos) score like each sample alone."""
    from helpers import loop_logps
    from utils import toy_task
    from utils.generation import sample
    from utils.modeling import ModelArguments, load_model, load_tokenizer

    tokenizer = load_tokenizer(ModelArguments(model_name_or_path="mixtral-tiny"))
    model = load_model(ModelArguments(model_name_or_path="mixtral-tiny"), tokenizer).eval()
    torch.manual_seed(0)
    samples = sample(model, tokenizer, toy_task.make_prompts(6, seed=3), max_new_tokens=8)
    assert len({len(s.prompt_ids) + len(s.completion_ids) for s in samples}) > 1  # padding really happens
    scored = eval_policy.sampled_logps(model, samples, tokenizer.pad_token_id, batch_size=4)
    for s, value in zip(samples, scored.tolist()):
        assert value == pytest.approx(loop_logps(model, s.prompt_ids, s.completion_ids), abs=1e-4)
