import json
import math

import pytest
import torch

import eval_policy
from eval_policy import distinct_n, full_kl_per_token, kl_estimate, win_rate


def test_kl_estimate_matches_closed_form_for_categoricals():
    p = torch.tensor([0.5, 0.3, 0.15, 0.05])
    q = torch.tensor([0.25, 0.25, 0.25, 0.25])
    exact = sum(pi * math.log(pi / qi) for pi, qi in zip(p.tolist(), q.tolist()))
    samples = torch.multinomial(p, 20_000, replacement=True, generator=torch.Generator().manual_seed(0))
    log_ratio = p.log()[samples] - q.log()[samples]
    standard_error = log_ratio.std().item() / math.sqrt(len(samples))
    assert kl_estimate(p.log()[samples], q.log()[samples]) == pytest.approx(exact, abs=4 * standard_error)
    assert kl_estimate(p.log()[samples], p.log()[samples]) == 0.0


def test_full_kl_per_token_is_the_closed_form():
    policy_logits, reference_logits = torch.randn(5, 7, generator=torch.Generator().manual_seed(0)).unbind(0)[:2]
    p, q = policy_logits.softmax(-1).tolist(), reference_logits.softmax(-1).tolist()
    exact = sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))
    assert full_kl_per_token(policy_logits[None], reference_logits[None]).item() == pytest.approx(exact, rel=1e-5)
    assert full_kl_per_token(policy_logits[None], policy_logits[None] + 3.0).item() == pytest.approx(0, abs=1e-6)


def test_distinct_n_counts_bigrams_over_all_texts():
    # bigrams: (a b) (b a) (a b) | (a b) (b c): 3 distinct of 5
    assert distinct_n(["a b a b", "a b c"], 2) == pytest.approx(3 / 5)
    assert distinct_n(["a", ""], 2) == 0.0


def test_win_rate_counts_ties_as_half():
    assert win_rate([1.0, 0.0, 0.5, 0.2], [0.0, 1.0, 0.5, 0.1]) == pytest.approx((1 + 0 + 0.5 + 1) / 4)


def test_policy_equal_to_reference_has_zero_kl_and_writes_json(tmp_path):
    output = tmp_path / "eval.json"
    results = eval_policy.main(["--policy_path", "mixtral-tiny", "--reference_path", "mixtral-tiny",
                                "--num_prompts", "8", "--num_eval_pairs", "8", "--max_new_tokens", "6",
                                "--output_file", str(output)])
    assert results["kl"] == 0.0  # every sampled token has the same log-prob under both
    assert results["kl_full"] == 0.0 and len(results["completions"]) == 8
    assert results["preference_accuracy"] == 0.0  # identical models: every implicit margin is exactly zero
    assert 0.0 <= results["win_rate"] <= 1.0
    assert json.loads(output.read_text())["mean_reward"] == pytest.approx(results["mean_reward"])


def test_without_reference_samples_the_policy_samples_are_the_same(tmp_path):
    """--sample_reference false skips only the reference's samples (and the win rate): the policy's, drawn first
    from the same seed, and every metric of them are unchanged."""
    flags = ["--policy_path", "mixtral-tiny", "--reference_path", "mixtral-tiny", "--num_prompts", "6",
             "--num_eval_pairs", "0", "--max_new_tokens", "5"]
    full = eval_policy.main([*flags, "--output_file", str(tmp_path / "a.json")])
    policy_only = eval_policy.main([*flags, "--output_file", str(tmp_path / "b.json"), "--sample_reference", "false"])
    assert policy_only["completions"] == full["completions"] and policy_only["mean_reward"] == full["mean_reward"]
    assert math.isnan(policy_only["win_rate"]) and not math.isnan(full["win_rate"])


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


def loop_full_kl(policy, reference, prompt_ids, completion_ids) -> float:
    """sum over the completion's positions of KL(policy || reference) over the whole vocabulary, in float64."""
    ids = torch.tensor([prompt_ids + completion_ids])
    with torch.no_grad():
        p, q = (torch.log_softmax(model(ids).logits[0].double(), dim=-1) for model in (policy, reference))
    positions = range(len(prompt_ids) - 1, ids.shape[1] - 1)  # each predicts the next token, a completion token
    return sum((p[t].exp() * (p[t] - q[t])).sum().item() for t in positions)


def test_full_kl_and_sampled_kl_estimate_the_same_expectation():
    """The tower rule: over many samples of one prompt, the mean sampled log-ratio and the mean full-distribution KL
    agree within the sampled one's standard error, and the full one varies less between samples."""
    from utils.generation import sample
    from utils.modeling import ModelArguments, load_model, load_tokenizer

    tokenizer = load_tokenizer(ModelArguments(model_name_or_path="mixtral-tiny"))
    policy = load_model(ModelArguments(model_name_or_path="mixtral-tiny", model_init_seed=1), tokenizer).eval()
    reference = load_model(ModelArguments(model_name_or_path="mixtral-tiny"), tokenizer).eval()
    torch.manual_seed(0)
    samples = sample(policy, tokenizer, ["the movie was"] * 400, max_new_tokens=3, batch_size=200)
    ratios = (eval_policy.sampled_logps(policy, samples, tokenizer.pad_token_id, 200)
              - eval_policy.sampled_logps(reference, samples, tokenizer.pad_token_id, 200))
    full = eval_policy.sampled_full_kls(policy, reference, samples, tokenizer.pad_token_id, 200)
    standard_error = math.hypot(ratios.std().item(), full.std().item()) / math.sqrt(len(samples))
    assert ratios.mean().item() == pytest.approx(full.mean().item(), abs=4 * standard_error)
    assert full.std().item() < ratios.std().item()


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
    assert results["log_ratios"] == pytest.approx(log_ratios, abs=1e-4)
    # the full-distribution estimate: each sample alone, sum over its completion of the exact per-token KL
    full_kls = [loop_full_kl(policy, reference, s.prompt_ids, s.completion_ids) for s in sampled[0]]
    assert min(full_kls) > 0
    assert results["full_kls"] == pytest.approx(full_kls, abs=1e-4)
    assert results["kl_full"] == pytest.approx(sum(full_kls) / len(full_kls), abs=1e-4)

    pairs = load_preference_data(DataArguments(toy_num_train_pairs=1, toy_num_eval_pairs=num_pairs,
                                               toy_seed=eval_policy.EvalArguments.prompt_seed), tokenizer)["test"]
    assert len(pairs) == num_pairs

    def implicit_reward(row, side):
        ids = row[f"{side}_input_ids"]
        return loop_logps(policy, row["prompt_input_ids"], ids) - loop_logps(reference, row["prompt_input_ids"], ids)

    accuracy = sum(implicit_reward(row, "chosen") > implicit_reward(row, "rejected") for row in pairs) / len(pairs)
    assert results["preference_accuracy"] == pytest.approx(accuracy)
