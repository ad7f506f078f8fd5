"""experiments/claims.py --quick, run once: every experiment's rows, budgets counted from the runs, and properties
that a method wired to the wrong data, reward or starting point would break."""

import csv
import json
import os
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "experiments"))

import claims  # noqa: E402


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("claims")
    argv = sys.argv
    sys.argv = ["claims.py", "--quick", "--output_dir", str(out)]
    try:
        claims.main()  # in process, each step too (one job)
    finally:
        sys.argv = argv
    with open(out / "claims.csv") as f:
        rows = list(csv.DictReader(f))
    return out, rows


def pick(rows, experiment, method):
    (row,) = [row for row in rows if row["experiment"] == experiment and row["method"] == method]
    return row


def test_every_experiment_reports_its_methods_and_files(quick):
    out, rows = quick
    quick_size = {key: value[1] for key, value in claims.SIZES.items()}
    methods = {experiment: [row["method"] for row in rows if row["experiment"] == experiment]
               for experiment in dict.fromkeys(row["experiment"] for row in rows)}
    assert methods == {"frontier": ["SFT", "DPO beta=0.1", "PPO kl=0.3", "Preferred-FT"],
                       "iterative": ["iterative DPO round 1"],
                       "data": ["DPO", "RM + PPO", "DPO", "RM + PPO"],
                       "topic": ["SFT", "Preferred-FT", "DPO", "RM + PPO"],
                       "adapt": ["DPO before", "DPO after", "RM + PPO before", "RM + PPO after"]}
    all_pairs = sum(1 for _ in open(out / "pairs.jsonl"))
    assert [int(row["pairs"]) for row in rows if row["experiment"] == "data"] == [128, 128, all_pairs, all_pairs]
    with open(out / "dpo_tuning.csv") as f:
        assert len(list(csv.DictReader(f))) == 2  # the quick grid: 2 learning rates x 1 epoch count
    text = (out / "claims.md").read_text()
    for section in ("DPO's tuning", "Frontier and budgets", "Preference data and compute", "bad examples",
                    "new preference", "Length and diversity", "The KL estimate"):
        assert section in text
    assert f"{quick_size['kl_check_prompts']} |" in text  # the larger KL evaluation ran
    for plot in ("claims_frontier.png", "claims_data.png"):
        assert (out / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_budgets_are_the_runs_counted_tokens(quick):
    out, rows = quick
    counts = {step: json.load(open(out / "logs" / f"{step}.tokens.json")) for step in
              ("reward_seed0", "ppo_kl0.3_seed0", "dpo_beta0.1_seed0")}
    dpo, ppo = pick(rows, "frontier", "DPO beta=0.1"), pick(rows, "frontier", "PPO kl=0.3")
    # claim 1: DPO queries no reward and trains no reward model; RM + PPO pays for both
    assert dpo["reward_queries"] == "0" and dpo["reward_model_tokens"] == "0"
    assert int(ppo["reward_queries"]) > 0
    assert int(ppo["reward_model_tokens"]) == sum(counts["reward_seed0"].values()) > 0
    assert int(ppo["train_tokens"]) == counts["reward_seed0"]["forward_backward"] + counts["ppo_kl0.3_seed0"][
        "forward_backward"]
    assert int(dpo["train_tokens"]) == counts["dpo_beta0.1_seed0"]["forward_backward"] > 0
    assert int(dpo["forward_tokens"]) > 0  # the reference scored once: the run's own cache, not another run's
    sft = pick(rows, "frontier", "SFT")
    assert float(sft["kl"]) == 0.0 and float(sft["kl_sampled"]) == 0.0  # SFT against itself
    assert all(float(row["kl"]) > 0 for row in rows if row["method"] not in ("SFT",))


def test_topic_pairs_and_iterative_pairs_are_labelled_by_their_own_reward(quick):
    """The topic world's pairs follow its ground truth (not sentiment's); iterative DPO's follow the learned reward
    model (not the ground truth)."""
    from eval_policy import make_judge
    from utils import toy_task

    out, _ = quick
    topic = [json.loads(line) for line in open(out / "pairs_topic.jsonl")]
    chosen = toy_task.topic_penalised_reward([p["chosen"] for p in topic])
    rejected = toy_task.topic_penalised_reward([p["rejected"] for p in topic])
    assert all(c > r for c, r in zip(chosen, rejected))
    sentiment = [json.loads(line) for line in open(out / "pairs.jsonl")]
    swapped = [{"prompt": p["prompt"], "chosen": p["rejected"], "rejected": p["chosen"]} for p in sentiment]
    assert any(p in topic for p in swapped)  # some pairs change sides: where the music outweighs the sentiment

    iterative = [json.loads(line) for line in open(out / "pairs_iterative1_seed0.jsonl")]
    judge = make_judge(str(out / "reward_seed0"))
    prompts = [p["prompt"] for p in iterative]
    learned = zip(judge(prompts, [p["chosen"] for p in iterative]), judge(prompts, [p["rejected"] for p in iterative]))
    assert all(c > r for c, r in learned)
    truth = zip(toy_task.ground_truth_reward([p["chosen"] for p in iterative]),
                toy_task.ground_truth_reward([p["rejected"] for p in iterative]))
    assert not all(c > r for c, r in truth)  # the reward model is not the ground truth


def test_second_preference_moves_both_methods_from_their_checkpoints(quick):
    """Wired to the wrong pairs (the sentiment ones) or the wrong reward model, the second round would not shorten
    the completions; "before" is the first round's own checkpoint, evaluated with the same samples."""
    _, rows = quick
    for method, first_round in (("DPO", "DPO beta=0.1"), ("RM + PPO", "PPO kl=0.3")):
        before, after = pick(rows, "adapt", f"{method} before"), pick(rows, "adapt", f"{method} after")
        assert float(after["words"]) < float(before["words"]), (method, before["words"], after["words"])
        assert before["reward"] == pick(rows, "frontier", first_round)["reward"]
        assert int(after["pairs"]) > 0 and before["train_tokens"] == "0"  # the change's cost only
