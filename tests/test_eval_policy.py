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


def test_kl_and_preference_accuracy_of_a_policy_unlike_its_reference(tmp_path, monkeypatch):
    """Against a per-sample loop of plain forward passes: a flipped KL sign or chosen/rejected swapped in the
    implicit-reward accuracy would fail here (with policy = reference both give 0 either way)."""
    from helpers import loop_logps
    from utils.data import DataArguments, load_preference_data
    from utils.modeling import ModelArguments, load_model, load_tokenizer

    tokenizer = load_tokenizer(ModelArguments(model_name_or_path="mixtral-tiny"))
    policy = load_model(ModelArguments(model_name_or_path="mixtral-tiny", model_init_seed=1), tokenizer).eval()
    policy.save_pretrained(tmp_path / "policy")
    tokenizer.save_pretrained(tmp_path / "policy")
    reference = load_model(ModelArguments(model_name_or_path="mixtral-tiny"), tokenizer).eval()
    sampled = []  # every sample() call's completions: the policy's first, then the reference's
    sample = eval_policy.sample
    monkeypatch.setattr(eval_policy, "sample", lambda *args, **kwargs: sampled.append(sample(*args, **kwargs))
                        or sampled[-1])
    num_pairs = 9  # odd: an accuracy of exactly 1/2, the one a swap leaves unchanged, cannot happen
    results = eval_policy.main(["--policy_path", str(tmp_path / "policy"), "--reference_path", "mixtral-tiny",
                                "--num_prompts", "6", "--num_eval_pairs", str(num_pairs), "--max_new_tokens", "6",
                                "--output_file", str(tmp_path / "eval.json")])

    log_ratios = [loop_logps(policy, s.prompt_ids, s.completion_ids)
                  - loop_logps(reference, s.prompt_ids, s.completion_ids) for s in sampled[0]]
    kl = sum(log_ratios) / len(log_ratios)
    assert kl > 0.01  # far enough from 0 for its sign to show
    assert results["kl"] == pytest.approx(kl, abs=1e-4)

    pairs = load_preference_data(DataArguments(toy_num_train_pairs=1, toy_num_eval_pairs=num_pairs,
                                               toy_seed=eval_policy.EvalArguments.prompt_seed), tokenizer)["test"]
    assert len(pairs) == num_pairs

    def implicit_reward(row, side):
        ids = row[f"{side}_input_ids"]
        return loop_logps(policy, row["prompt_input_ids"], ids) - loop_logps(reference, row["prompt_input_ids"], ids)

    accuracy = sum(implicit_reward(row, "chosen") > implicit_reward(row, "rejected") for row in pairs) / len(pairs)
    assert results["preference_accuracy"] == pytest.approx(accuracy)
