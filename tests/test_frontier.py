import csv
import math
import os
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "experiments"))

import frontier  # noqa: E402


def test_quick_frontier_trains_every_method_and_reports_its_budget(tmp_path, monkeypatch):
    """The whole study end to end at --quick sizes (one seed): what the run must show, not only that it ran."""
    monkeypatch.setattr(sys, "argv", ["frontier.py", "--quick", "--output_dir", str(tmp_path)])
    frontier.main()  # in process, each stage too (one job): no interpreter starts
    with open(tmp_path / "frontier.csv") as f:
        rows = {row["method"]: row for row in csv.DictReader(f)}
    assert set(rows) == {"SFT", "DPO beta=0.1", "DPO beta=1.0", "Preferred-FT", "PPO kl=0.1", "PPO-GT kl=0.1",
                         "Best-of-4"}
    reward = {method: float(row["mean_reward"]) for method, row in rows.items()}
    kl = {method: float(row["kl"]) for method, row in rows.items()}
    # DPO learns the preference. Over 3 quick seeds DPO beta=0.1 beat SFT by 0.096-0.107 (each seed's evaluation
    # samples both with one seed, so the difference varies far less than either reward, which spans 0.11 over the
    # seeds) at KL 0.34-1.08; a DPO that trained nothing samples what SFT samples: a difference of 0 and KL 0.
    assert reward["DPO beta=0.1"] > reward["SFT"] + 0.05, reward
    assert kl["SFT"] == 0.0 and kl["DPO beta=0.1"] > 0.1, kl  # the SFT policy against itself; DPO moved away
    assert kl["Best-of-4"] == pytest.approx(math.log(4) - 3 / 4)  # analytic
    # budgets: the pairs labelled, reward queries (PPO-GT: normalisation samples + episodes), one seed, no interval
    pairs = sum(1 for _ in open(tmp_path / "pairs.jsonl"))
    train_prompts = pairs - math.ceil(0.1 * pairs)
    assert [rows[m]["pairs"] for m in ("DPO beta=0.1", "PPO kl=0.1", "PPO-GT kl=0.1")] == [str(pairs), str(pairs), "0"]
    quick = {key: value[1] for key, value in frontier.SIZES.items()}
    assert int(rows["PPO-GT kl=0.1"]["reward_queries"]) == min(256, train_prompts) + quick["ppo_episodes"]
    assert int(rows["Best-of-4"]["reward_queries"]) == 4 * quick["eval_prompts"]  # 4 samples per test prompt
    assert all(row["seeds"] == "1" and row["mean_reward_ci95"] == "nan" for row in rows.values())
    with open(tmp_path / "frontier_seeds.csv") as f:
        assert sorted(row["method"] for row in csv.DictReader(f)) == sorted(rows)
    table = (tmp_path / "frontier.md").read_text().splitlines()
    header = table.index(next(line for line in table if line.startswith("| method |")))
    assert len(table) == header + 2 + len(rows) and "±" not in "".join(table)
    assert (tmp_path / "frontier.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with open(tmp_path / "frontier_curves.csv") as f:  # DPO's and PPO's checkpoints along training
        curves = list(csv.DictReader(f))
    for method in ("DPO beta=0.1", "PPO kl=0.1", "PPO-GT kl=0.1"):
        steps = [int(row["step"]) for row in curves if row["method"] == method]
        assert len(steps) >= 2 and steps == sorted(set(steps)), (method, steps)
    assert {row["method"] for row in curves} == {m for m in rows if m.startswith(("DPO", "PPO"))}


def test_mean_interval_is_the_t_interval():
    mean, half_width = frontier.mean_interval([1.0, 2.0, 3.0])
    # scipy.stats.t.ppf(0.975, 2) = 4.302653; the sample standard deviation is 1
    assert mean == 2.0 and half_width == pytest.approx(4.302653 / math.sqrt(3), rel=1e-3)
    assert math.isnan(frontier.mean_interval([0.5])[1])


def test_difference_interval_is_paired_by_seed():
    difference, half_width = frontier.difference_interval([1.0, 3.0, 5.0], [0.0, 1.0, 2.0])
    assert difference == 2.0 and half_width == pytest.approx(4.302653 / math.sqrt(3), rel=1e-3)  # of [1, 2, 3]
    # what a seed adds to both methods (its evaluation samples) cancels: the same interval
    shifts = [10.0, -7.0, 3.0]
    shifted = frontier.difference_interval([x + c for x, c in zip([1.0, 3.0, 5.0], shifts)],
                                           [y + c for y, c in zip([0.0, 1.0, 2.0], shifts)])
    assert shifted == pytest.approx((difference, half_width))
    # an unpaired interval would be far wider: the shifted runs spread over 17
    assert half_width < frontier.mean_interval([x + c for x, c in zip([1.0, 3.0, 5.0], shifts)])[1] / 5


def test_a_resumed_run_skips_the_steps_that_finished(tmp_path):
    output = tmp_path / "pairs.jsonl"
    flags = ("--output_file", output, "--num_pairs", 5)
    seconds = frontier.Steps(1, str(tmp_path)).run("pairs", "make_toy_pairs.py", *flags)
    assert frontier.Steps(1, str(tmp_path)).tokens("pairs") == {"forward_backward": 0, "forward": 0,  # no model
                                                                "flops_per_position": {}, "events": []}
    output.unlink()
    assert frontier.Steps(1, str(tmp_path), resume=True).run("pairs", "make_toy_pairs.py", *flags) == seconds
    assert not output.exists()  # not run again
    frontier.Steps(1, str(tmp_path)).run("pairs", "make_toy_pairs.py", *flags)  # without resume: it runs
    assert output.exists()


def test_priority_pool_runs_the_most_important_ready_call_first():
    import threading

    pool, ran, gate = frontier.PriorityPool(1), [], threading.Event()
    pool.submit(0, gate.wait)  # holds the one worker while the others queue
    futures = [pool.submit(priority, ran.append, priority) for priority in (5, 0, 3, 0)]
    gate.set()
    for future in futures:
        future.result(timeout=10)
    assert ran == [0, 0, 3, 5]
    failing = pool.submit(0, lambda: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        failing.result(timeout=10)
