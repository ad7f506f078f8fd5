"""experiments/claims.py --quick, run once, and the study's statistics on hand-made tables: the things a planted bug
(a curve read at the wrong KL, a reward model not charged, a wrong Holm step, a verdict of the wrong sign) would
break."""

import json
import math
import os
import random
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "experiments"))

import claims  # noqa: E402
import curves  # noqa: E402
from token_count import flops_until  # noqa: E402


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("claims")
    claims.main(["--quick", "--output_dir", str(out)])  # in process, each step too (one job)
    with open(out / "claims_runs.json") as f:
        return out, json.load(f)


def curve_rows(report, experiment, method, pairs=None):
    return [row for row in report["rows"] if row["experiment"] == experiment and row["method"] == method
            and (pairs is None or row["pairs"] == pairs)]


def test_every_curve_starts_at_its_start_and_has_its_checkpoints(quick):
    out, report = quick
    size = {key: value[1] for key, value in claims.SIZES.items()}
    expected = {("frontier", "DPO"), ("frontier", "RM + PPO"), ("frontier", "Preferred-FT"), ("data", "DPO"),
                ("data", "RM + PPO"), ("topic", "DPO"), ("topic", "RM + PPO"), ("topic", "Preferred-FT"),
                ("adapt", "DPO"), ("adapt", "RM + PPO"), ("iterative", "iterative DPO (RM labels)"),
                ("iterative", "iterative DPO (GT labels)"), ("iterative", "one-shot DPO")}
    assert {(row["experiment"], row["method"]) for row in report["rows"]} == expected
    points = len(size["fractions"]) + 1  # checkpoints along training and the end
    for experiment, method in expected:
        for n in {row["pairs"] for row in curve_rows(report, experiment, method)}:
            rows = curve_rows(report, experiment, method, n)
            rounds = size["iterative_rounds"] if method.startswith("iterative DPO") else 1
            assert len(rows) == 1 + rounds * points, (experiment, method, n)
            assert rows[0]["step"] == 0 and rows[0]["kl"] == 0 and rows[0]["flops"] == 0
            assert [row["flops"] for row in rows] == sorted(row["flops"] for row in rows)  # compute only grows
    # DPO on fewer pairs trains for the full data's optimizer steps; iterative rounds share them
    full, small = (curve_rows(report, "data", "DPO", n)[-1]["step"] for n in
                   (max(row["pairs"] for row in report["rows"] if row["experiment"] == "data"), size["data_sizes"][0]))
    assert full == small > 0
    ends = [row["step"] for row in curve_rows(report, "iterative", "iterative DPO (GT labels)")
            if not row["run"].split("/")[-1].startswith("checkpoint") and row["step"]]
    assert ends == [full // size["iterative_rounds"]] * size["iterative_rounds"]
    text = (out / "claims.md").read_text()
    for section in ("Verdicts", "Pre-stated rules", "matched KL", "Preference data", "Compute", "bad examples",
                    "new preference", "Iterative DPO", "Tuning"):
        assert section in text
    for plot in ("claims_curves.png", "claims_data.png", "claims_compute.png"):
        assert (out / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_reward_at_a_kl_budget_by_hand():
    """A curve whose first checkpoint overshoots in KL (as PPO's first update does), read at a budget: the best
    point or mixture of two points within it; never beyond the curve."""
    points = [(0.0, 0.0), (2.0, 0.1), (0.5, 0.3), (1.0, 0.5)]  # training order
    # at 0.75: points within reach 0.0 and 0.3; mixing (0.5, 0.3) and (1.0, 0.5) half and half gives 0.4
    assert curves.at_kl(points, 0.75) == pytest.approx(0.4)
    assert curves.at_kl(points, 1.5) == pytest.approx(0.5)  # (1.0, 0.5) is within the budget; mixing in 2.0 loses
    assert curves.at_kl(points, 0.25) == pytest.approx(0.15)  # half SFT, half (0.5, 0.3)
    with pytest.raises(ValueError):
        curves.at_kl(points, 2.5)
    # the plain reading of the sensitivity check: between (1.0, 0.5) and the overshoot (2.0, 0.1)
    assert curves.linear_at_kl(points, 1.5) == pytest.approx(0.3)
    assert curves.linear_at_kl(points, 0.75) == pytest.approx(0.4)
    c = claims.Curves([{"experiment": "frontier", "method": "DPO", "seed": seed, "pairs": 10, "kl": kl, "reward": r}
                       for seed, end in ((1, 1.2), (2, 0.9)) for kl, r in ((0.0, 0.0), (end, end))], ())
    assert c.matched([claims.FRONTIER_DPO]) == (0.75, {claims.FRONTIER_DPO: [0.75, 0.75]})  # 0.9 < 1.0 on the grid


def test_the_quick_curves_read_as_frontiers(quick):
    _, report = quick
    c = claims.Curves(report["rows"], tuple(report["size"]["data_sizes"]))
    for key in ((claims.FRONTIER_PPO, claims.FRONTIER_DPO)):
        points = c.points(key, c.seeds[0])
        reach = max(kl for kl, _ in points)
        readings = [curves.at_kl(points, reach * i / 20) for i in range(21)]
        assert readings == sorted(readings)  # more KL budget never lowers the best reward
        assert all(curves.at_kl(points, kl) >= reward for kl, reward in points)
        assert readings[-1] == max(reward for _, reward in points)


def test_a_reward_model_is_charged_by_its_counted_positions(quick):
    """RM + PPO's compute at a checkpoint is the reward model's counted FLOPs plus PPO's up to that checkpoint; DPO's
    has no reward model in it. The reward model's FLOPs are recomputed here from its positions."""
    out, report = quick
    tokens = {step: json.load(open(out / "logs" / f"{step}.tokens.json"))
              for step in ("reward_seed1", "ppo_seed1", "dpo_seed1")}
    reward = tokens["reward_seed1"]
    (per_position,) = reward["flops_per_position"].values()  # the classifier alone: no output layer
    reward_flops = per_position * (3 * reward["forward_backward"] + reward["forward"])
    assert reward_flops > 0 and "MixtralForSequenceClassification" in reward["flops_per_position"]
    ppo, dpo = curve_rows(report, "frontier", "RM + PPO"), curve_rows(report, "frontier", "DPO")
    assert ppo[-1]["flops"] == pytest.approx(reward_flops + flops_until(tokens["ppo_seed1"]))
    assert dpo[-1]["flops"] == pytest.approx(flops_until(tokens["dpo_seed1"]))
    first = ppo[1]  # the first checkpoint: PPO's forwards up to the moment it was written
    written = os.path.getmtime(out / first["run"] / "trainer_state.json")
    assert reward_flops < first["flops"] == pytest.approx(reward_flops + flops_until(tokens["ppo_seed1"], written))
    assert first["flops"] < ppo[-1]["flops"]
    # tuning: a method's grid runs and the reward model its criterion reads
    grid = [row for row in report["tuning"] if row["method"] == "DPO"]
    assert report["tuning_flops"]["DPO"] == pytest.approx(sum(row["flops"] for row in grid) + flops_until(
        json.load(open(out / "logs" / "reward_seed0.tokens.json"))))


def test_holm_step_by_hand():
    p = {"a": 0.01, "b": 0.04, "c": 0.03, "d": 0.005, "e": math.nan}
    # sorted: d 0.005 x 4, a 0.01 x 3, c 0.03 x 2, b 0.04 x 1 -> running maximum
    assert curves.holm(p) == pytest.approx({"d": 0.02, "a": 0.03, "c": 0.06, "b": 0.06, "e": math.nan},
                                           nan_ok=True)
    verdicts = {name: curves.verdict(1.0, adjusted, 1) for name, adjusted in curves.holm(p).items()}
    assert verdicts == {"d": "supported", "a": "supported", "c": "not shown", "b": "not shown", "e": "not shown"}


def test_paired_test_matches_the_t_table():
    differences = [0.1, 0.2, 0.15, 0.3, 0.05]
    test = curves.paired_test(differences)
    mean, sd = 0.16, 0.0962
    assert test["mean"] == pytest.approx(mean)
    assert test["half_width"] == pytest.approx(2.776 * 0.096177 / math.sqrt(5), rel=1e-3)
    assert curves.t_two_sided_p(2.776, 4) == pytest.approx(0.05, abs=2e-4)
    assert curves.t_two_sided_p(1.0, 10) == pytest.approx(0.3409, abs=1e-4)
    assert test["p"] == pytest.approx(curves.t_two_sided_p(mean / (sd / math.sqrt(5)), 4), rel=1e-2)


def hand_table(slopes: dict, seeds=(1, 2, 3, 4, 5), kl_end=1.2, sizes=(100,)) -> list[dict]:
    """Rows of every curve the report reads: reward (and topic reward, and words removed) = slope x KL with a
    little seeded noise, FLOPs = cost x KL; slopes: (experiment, method) -> (slope, cost)."""
    rng, rows = random.Random(0), []
    for (experiment, method), (slope, cost) in slopes.items():
        for n in (sizes + (1000,) if experiment == "data" else (1000,)):
            for seed in seeds:
                noisy = slope + rng.gauss(0, 0.01)
                for kl in (0.0, 0.3, 0.6, kl_end):
                    rows.append({"experiment": experiment, "method": method, "seed": seed, "pairs": n,
                                 "kl": kl, "reward": noisy * kl, "topic_reward": noisy * kl,
                                 "words": 20 - noisy * kl, "flops": cost * kl * 1e12})
    return rows


def test_decision_rule_on_a_hand_made_table():
    slopes = {("frontier", "DPO"): (0.5, 1.0), ("frontier", "RM + PPO"): (0.3, 3.0),  # 1: DPO higher; 3: cheaper
              ("frontier", "Preferred-FT"): (0.2, 0.5),
              ("data", "DPO"): (0.2, 1.0), ("data", "RM + PPO"): (0.4, 3.0),  # 2: DPO lower -> contradicted
              ("topic", "DPO"): (0.5, 1.0), ("topic", "Preferred-FT"): (0.2, 1.0),  # 4: no more than the control
              ("topic", "RM + PPO"): (0.3, 1.0),
              ("adapt", "DPO"): (0.3, 1.0), ("adapt", "RM + PPO"): (0.3, 1.0)}  # 5: equal -> not shown
    c = claims.Curves(hand_table(slopes), (100,))
    decisions = claims.decide(c, {"tuning_flops": {"DPO": 0.0, "RM + PPO": 0.0}}, (100,))
    assert [d["at"] for d in decisions] == ["KL 1.0", "KL 100: 1.0", "reward 0.3", "KL 1.0", "KL 1.0 from the start"]
    assert decisions[0]["mean"] == pytest.approx(0.2, abs=0.02)  # (0.5 - 0.3) x KL 1.0
    # reward 0.3: DPO at KL 0.6 (0.6 TFLOPs), RM + PPO at KL 1.0 (3 TFLOPs): ln 5
    assert decisions[2]["mean"] == pytest.approx(math.log(5), abs=0.1)
    assert [d["verdict"] for d in decisions] == ["supported", "contradicted", "supported", "not shown", "not shown"]
    # charging the tuning can turn the compute claim: DPO's grid costing 30 TFLOPs more than PPO's
    costly = claims.decide(c, {"tuning_flops": {"DPO": 30e12, "RM + PPO": 0.0}}, (100,))
    assert costly[2]["verdict"] == "contradicted"
