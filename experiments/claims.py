"""What is claimed for DPO against RLHF (reward model + PPO), tested at toy scale with curves at matched KL.

    .venv/bin/python experiments/claims.py --jobs 2            # the study: 5 seeds, 5 data sizes
    .venv/bin/python experiments/claims.py --jobs 2 --resume   # go on after an interruption (finished steps stay)
    .venv/bin/python experiments/claims.py --report_only       # tables and plots again from the saved evaluations
    .venv/bin/python experiments/claims.py --quick             # every experiment at reduced size, 1 seed (the tests)

The toy world is experiments/frontier.py's: SFT of the Mixtral-style preset on toy reviews, preference pairs sampled
from the SFT policy and labelled by a ground truth (VADER sentiment). The SFT policy is shared by every run.

Tuning (seed 0, its own 2,000 pairs): DPO (learning rate x epochs), Preferred-FT (the same grid size) and PPO
(learning rate x PPO epochs) each run a grid of 8 and keep the setting with the highest learned reward (the seed-0
reward model, normalised on SFT's samples) minus 0.3 x KL on validation prompts (prompt seed 20,000): the
objective PPO maximises, read without the ground truth. Every later run uses its method's pick.

Seeds 1..N: each seed samples its own pairs from SFT and its own test prompts (prompt seed 10,000 + seed), and seeds
training and evaluation sampling. Every trained policy is saved at 1/16, 1/8, 1/4, 1/2 of its optimizer steps and at
the end and evaluated there: ground-truth reward against KL(policy || SFT) (eval_policy's full estimate), a curve
per seed that starts at SFT (KL 0). Experiments:

- frontier (claims 1, 3): DPO, reward model + PPO, Preferred-FT on all the seed's pairs.
- data (claim 2): DPO and RM + PPO on the first N pairs, N in --data_sizes and all. DPO and the reward model train
  for the optimizer steps of the full data at every N; PPO's prompts (unlabelled) are all the seed's prompts.
- topic (claim 4): the same pairs relabelled by a ground truth that penalises mentions of the music; DPO,
  RM + PPO and Preferred-FT on them. The control is the sentiment-labelled frontier runs.
- adapt (claim 5): a second preference (fewer words) on new pairs from SFT; DPO continues from its frontier
  checkpoint, RLHF trains a reward model on them and continues PPO from its frontier checkpoint. KL to the start.
- iterative: DPO rounds on pairs sampled from the current policy, labelled by the seed's reward model or by the
  ground truth, against one-shot DPO on as many ground-truth pairs (the data experiment's run).

Compute: every model forward counted as it ran (experiments/token_count.py) x its FLOPs per position; forward = 1,
backward = 2. Each method is charged its reward model's training, its reference scoring, generation and labelling,
and (as a constant) its tuning grid with the reward model the criterion reads. Shared work (SFT, the seed's pairs)
is charged to no one.

Pre-stated decision rules (experiments/curves.py; CLAIMS below): each claim has one deciding comparison, a per-seed
difference read at the largest KL of curves.KL_GRID that every compared curve reaches on every seed; a paired t-test
over seeds; Holm's correction across the claims; verdict "supported" (significant, predicted sign), "contradicted"
(significant, other sign) or "not shown".

Writes claims.md, claims.csv (every evaluated checkpoint), tuning.csv and claims_curves.png, claims_data.png,
claims_compute.png to --results_dir.
"""

import argparse
import concurrent.futures
import itertools
import json
import math
import os
import re
import statistics
import sys
import time

import yaml

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import curves  # noqa: E402 -- beside this file
import frontier  # noqa: E402
from frontier import REPO, data_flags, mean_interval, plus_minus  # noqa: E402
from token_count import flops_until  # noqa: E402

SIZES = {  # default / --quick
    "preset": ("mixtral-toy", "mixtral-toy"),
    "sft_reviews": (4000, 800),
    "pairs": (2000, 192),
    "data_sizes": ((125, 250, 500, 1000), (64,)),  # and all the pairs
    "ppo_episodes": (1024, 48),
    "ppo_batch": ((16, 4), (8, 2)),
    "eval_prompts": (256, 24),
    "max_new_tokens": (32, 12),
    "seeds": (5, 1),
    "fractions": ((1 / 16, 1 / 8, 1 / 4, 1 / 2), (1 / 3,)),  # and the end
    "dpo_grid": ({"learning_rate": (3e-5, 1e-4, 3e-4, 1e-3), "num_train_epochs": (1, 2)},
                 {"learning_rate": (1e-4, 1e-3), "num_train_epochs": (1,)}),
    "pft_grid": ({"learning_rate": (1e-4, 3e-4, 1e-3, 3e-3), "num_train_epochs": (1, 2)},
                 {"learning_rate": (3e-4, 3e-3), "num_train_epochs": (1,)}),
    "ppo_grid": ({"learning_rate": (1e-4, 3e-4, 1e-3, 3e-3), "num_ppo_epochs": (2, 4)},
                 {"learning_rate": (3e-4, 1e-3), "num_ppo_epochs": (2,)}),
    "adapt_pairs": (500, 48),
    "iterative_rounds": (2, 2),
    "iterative_pairs": (250, 32),  # rounds x pairs is a data size: one-shot DPO on as many pairs
}
TUNING_KL_COEF = 0.3  # the KL weight of the tuning objective, as in frontier.py --tune_ppo
TEST_PROMPT_SEED = 10_000  # + the seed; the validation prompts are frontier.VALIDATION_PROMPT_SEED (20,000)

# Each claim: where it comes from, what it says, its deciding comparison and the sign that supports it.
CLAIMS = [
    {"claim": "1. DPO matches RLHF without a reward model", "source": "DPO paper (Rafailov et al. 2023, sec. 6.1)",
     "rule": "frontier: DPO - RM + PPO, ground-truth reward at the deciding KL", "sign": 1},
    {"claim": "2. DPO needs less preference data", "source": "seed text",
     "rule": "data: DPO - RM + PPO at each N below all (each N at its deciding KL), averaged over N", "sign": 1},
    {"claim": "3. DPO needs less compute", "source": "DPO paper (\"computationally lightweight\") and seed text",
     "rule": "frontier: ln(FLOPs of RM + PPO / FLOPs of DPO) to reach the deciding reward, tuning charged",
     "sign": 1},
    {"claim": "4. DPO learns from bad examples", "source": "seed text",
     "rule": "topic: topic-world reward, (DPO on topic labels - DPO on sentiment labels) - (the same for "
             "Preferred-FT), at the deciding KL", "sign": 1},
    {"claim": "5. DPO adapts to new data at once", "source": "seed text",
     "rule": "adapt: DPO - RM + PPO in the new preference (minus words) gained from the start, at the deciding KL "
             "from the start", "sign": 1},
]


def parse(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="every experiment at reduced size, 1 seed")
    parser.add_argument("--seeds", type=int, help="evaluation seeds (default 5; --quick: 1); seed 0 only tunes")
    parser.add_argument("--jobs", type=int, default=1, help="training runs at once, each with cores / jobs threads")
    parser.add_argument("--output_dir", default="outputs/claims", help="checkpoints and logs")
    parser.add_argument("--results_dir", help="tables and plots (default experiments/results; --quick: output_dir)")
    parser.add_argument("--resume", action="store_true",
                        help="skip the steps and evaluations that finished in an earlier run into --output_dir")
    parser.add_argument("--report_only", action="store_true",
                        help="rewrite the tables and plots from <output_dir>/claims_runs.json")
    args = parser.parse_args(argv)
    args.size = {key: value[1 if args.quick else 0] for key, value in SIZES.items()}
    args.seeds = args.seeds or args.size["seeds"]
    if args.seeds < 1:
        parser.error("--seeds must be at least 1")
    one_shot = args.size["iterative_rounds"] * args.size["iterative_pairs"]
    if one_shot not in args.size["data_sizes"]:
        parser.error(f"iterative_rounds x iterative_pairs ({one_shot}) must be one of the data sizes")
    args.results_dir = args.results_dir or (args.output_dir if args.quick else os.path.join(REPO, "experiments",
                                                                                            "results"))
    return args


def grid(settings: dict) -> list[dict]:
    return [dict(zip(settings, values)) for values in itertools.product(*settings.values())]


def setting_flags(setting: dict) -> list:
    return [item for key, value in setting.items() for item in (f"--{key}", value)]


def setting_name(prefix: str, setting: dict) -> str:
    return prefix + "".join(f"_{key.split('_')[-1]}{value:g}" for key, value in setting.items())


def config_value(config: str, key: str):
    with open(os.path.join(REPO, "configs", config)) as f:
        return yaml.safe_load(f)[key]


class Study:
    """The runs (steps of frontier.Steps, into <out>/<name>), their evaluations and the curves they make."""

    def __init__(self, size: dict, out: str, steps: frontier.Steps):
        self.size, self.out, self.steps = size, out, steps
        self.futures, self.evaluations, self.counts = {}, {}, {}
        self.fractions = [str(fraction) for fraction in size["fractions"]]
        os.makedirs(os.path.join(steps.log_dir, "evals"), exist_ok=True)

    def path(self, name: str) -> str:
        return os.path.join(self.out, name)

    # One training run each, submitted to the pool once the steps it reads have finished; saved along training
    # (--save_at_fractions) unless it only tunes.
    def submit(self, name, script, *flags, after=(), priority=0, curve=True):
        along = ["--save_at_fractions", *self.fractions] if curve else []
        self.futures[name] = self.steps.submit(name, script, *flags, *along, after=[self.futures[a] for a in after],
                                               priority=priority)

    def dpo(self, name, init, pairs, setting, seed, *flags, after=(), priority=0, curve=True):
        # a reference cache of its own: every run scores (and is charged for) its reference
        self.submit(name, "train_dpo.py", "configs/dpo_toy.yaml", "--model_name_or_path", init, "--seed", seed,
                    "--output_dir", self.path(name), "--toy_reward_prompts", 0, "--eval_strategy", "no",
                    "--ref_logps_cache_dir", self.path(f"ref_cache/{name}"), *data_flags(self.path(pairs)),
                    *setting_flags(setting), *flags, after=after, priority=priority, curve=curve)

    def reward_model(self, name, pairs, seed, *flags, after=(), priority=0):
        self.submit(name, "train_reward.py", "configs/reward_toy.yaml", "--model_name_or_path", self.sft, "--seed",
                    seed, "--output_dir", self.path(name), *data_flags(self.path(pairs)), *flags, after=after,
                    priority=priority, curve=False)

    def ppo(self, name, init, reward, prompts, setting, seed, after=(), priority=0, curve=True):
        self.submit(name, "train_ppo.py", frontier.PPO_CONFIG, "--model_name_or_path", init, "--reward_model_path",
                    self.path(reward), "--seed", seed, *frontier.ppo_flags(self.size), "--output_dir",
                    self.path(name), *data_flags(self.path(prompts)), *setting_flags(setting),
                    after=[reward, *after], priority=priority, curve=curve)

    def preferred_ft(self, name, pairs, setting, seed, after=(), priority=0, curve=True):
        """SFT on the chosen completions of the pairs (train_sft.py on preference data)."""
        self.submit(name, "train_sft.py", "--model_name_or_path", self.sft, "--output_dir", self.path(name), "--seed",
                    seed, *data_flags(self.path(pairs)), *setting_flags(setting), after=after, priority=priority,
                    curve=curve)

    def pairs(self, name, policy, num_pairs, seed, *flags, after=(), priority=0):
        self.futures[name] = self.steps.submit(
            name, "make_toy_pairs.py", "--source", "policy", "--model_name_or_path", policy, "--num_pairs", num_pairs,
            "--max_new_tokens", self.size["max_new_tokens"], "--seed", seed, "--output_file",
            self.path(f"{name}.jsonl"), *flags, after=[self.futures[a] for a in after], priority=priority)

    def flops(self, step: str, until: float = math.inf) -> float:
        """FLOPs a finished step counted up to wall time `until` (its counts read once)."""
        if step not in self.counts:
            self.counts[step] = self.steps.tokens(step)
        return flops_until(self.counts[step], until)

    def evaluate(self, policy: str, reference: str, seed: int, **overrides) -> dict:
        """Metrics of checkpoint folder `policy` against `reference` on the seed's test prompts (cached; saved for
        --resume)."""
        key = json.dumps([os.path.relpath(policy, self.out), os.path.relpath(reference, self.out), seed, overrides])
        if key not in self.evaluations:
            from eval_policy import evaluate_policy
            from utils import toy_task

            saved = os.path.join(self.steps.log_dir, "evals", re.sub(r"[^\w.-]+", "_", key) + ".json")
            if self.steps.resume and os.path.exists(saved):
                with open(saved) as f:
                    self.evaluations[key] = json.load(f)
                return self.evaluations[key]
            test = {"prompt_seed": TEST_PROMPT_SEED + seed, "sample_reference": False}
            results = evaluate_policy(frontier.eval_arguments(policy, reference, self.size, seed,
                                                              **{**test, **overrides}))
            texts = results["completions"]
            metrics = {"reward": results["mean_reward"], "kl": results["kl_full"], "kl_sampled": results["kl"],
                       "topic_reward": statistics.fmean(toy_task.topic_penalised_reward(texts)),
                       "topic_rate": statistics.fmean(map(toy_task.mentions_topic, texts)),
                       "words": statistics.fmean(len(text.split()) for text in texts),
                       "length": results["mean_length"], "distinct_2": results["distinct_2"],
                       "gt_reward": statistics.fmean(toy_task.ground_truth_reward(texts))}
            with open(saved, "w") as f:
                json.dump(metrics, f)
            self.evaluations[key] = metrics
        return self.evaluations[key]

    def checkpoints(self, step: str) -> list[tuple[str, int, float]]:
        """(folder, optimizer step, wall time it was written) of a finished run's checkpoints, the final model last."""
        from utils.checkpointing import checkpoints

        folder = self.path(step)
        with open(os.path.join(folder, "trainer_state.json")) as f:
            final_step = json.load(f)["global_step"]
        return [*((checkpoint, int(checkpoint.rsplit("-", 1)[1]),
                   os.path.getmtime(os.path.join(checkpoint, "trainer_state.json")))
                  for checkpoint in reversed(checkpoints(folder))), (folder, final_step, math.inf)]


# ------------------------------------------------------------------------------------------------ the runs

def submit_tuning(study: Study) -> None:
    size = study.size
    study.pairs("pairs_seed0", study.sft, size["pairs"], 0, priority=-2)
    study.reward_model("reward_seed0", "pairs_seed0.jsonl", 0, after=["pairs_seed0"])
    for setting in grid(size["dpo_grid"]):
        study.dpo(setting_name("tune_dpo", setting), study.sft, "pairs_seed0.jsonl", setting, 0,
                  after=["pairs_seed0"], curve=False)
    for setting in grid(size["ppo_grid"]):
        study.ppo(setting_name("tune_ppo", setting), study.sft, "reward_seed0", "pairs_seed0.jsonl", setting, 0,
                  after=["pairs_seed0"], curve=False)
    for setting in grid(size["pft_grid"]):
        study.preferred_ft(setting_name("tune_pft", setting), "pairs_seed0.jsonl", setting, 0,
                           after=["pairs_seed0"], curve=False)


def tune(study: Study) -> tuple[dict, list[dict], dict]:
    """Each method's pick from its grid (learned reward - TUNING_KL_COEF x KL on validation prompts), the grid's rows,
    and each method's tuning FLOPs (its grid runs and the reward model its criterion reads)."""
    size = study.size
    study.futures["reward_seed0"].result()
    mean, std = frontier.reward_model_baseline(study.sft, study.path("reward_seed0"), size,
                                               frontier.VALIDATION_PROMPT_SEED)
    picks, rows, costs = {}, [], {}
    for method, prefix in (("DPO", "tune_dpo"), ("RM + PPO", "tune_ppo"), ("Preferred-FT", "tune_pft")):
        settings = grid(size[{"tune_dpo": "dpo_grid", "tune_ppo": "ppo_grid", "tune_pft": "pft_grid"}[prefix]])
        method_rows = []
        for setting in settings:
            name = setting_name(prefix, setting)
            study.futures[name].result()
            learned = study.evaluate(study.path(name), study.sft, 0, judge=study.path("reward_seed0"),
                                     prompt_seed=frontier.VALIDATION_PROMPT_SEED)
            normalized = (learned["reward"] - mean) / std
            method_rows.append({"method": method, **setting, "objective": normalized - TUNING_KL_COEF * learned["kl"],
                                "learned_reward": normalized, "kl": learned["kl"], "gt_reward": learned["gt_reward"],
                                "flops": study.flops(name)})
            print(f"{name}: objective {method_rows[-1]['objective']:.3f}, GT reward {learned['gt_reward']:.3f}",
                  flush=True)
        best = max(method_rows, key=lambda row: row["objective"])
        picks[method] = {key: best[key] for key in settings[0]}
        for row in method_rows:
            row["chosen"] = row is best
        rows += method_rows
        costs[method] = sum(row["flops"] for row in method_rows) + study.flops("reward_seed0")
    return picks, rows, costs


def full_steps(study: Study, pairs: str, config: str) -> int:
    """Optimizer steps of a run of `config` on all of `pairs` (one process, no gradient accumulation)."""
    train_pairs = frontier.pair_token_counts(study.path(pairs), study.sft)["train_pairs"]
    return math.ceil(train_pairs / config_value(config, "per_device_train_batch_size"))


def submit_seed(study: Study, seed: int, picks: dict) -> list[dict]:
    """Every run of one seed, submitted; returns its curves: experiment, method, pairs, the start policy and
    reference, and the runs in order, each with the steps charged before it (a reward model, labelled pairs)."""
    size, sft, priority = study.size, study.sft, seed
    dpo, ppo, pft = picks["DPO"], picks["RM + PPO"], picks["Preferred-FT"]
    pairs = f"pairs_seed{seed}"
    study.futures[pairs].result()  # submitted first, for every seed: the subsets and counts below read it
    with open(study.path(f"{pairs}.jsonl")) as f:
        lines = f.readlines()
    for n in size["data_sizes"]:
        with open(study.path(f"{pairs}_n{n}.jsonl"), "w") as f:
            f.writelines(lines[:n])
    relabel_topic(study.path(f"{pairs}.jsonl"), study.path(f"{pairs}_topic.jsonl"))
    dpo_steps = full_steps(study, f"{pairs}.jsonl", "dpo_toy.yaml") * dpo["num_train_epochs"]
    reward_steps = full_steps(study, f"{pairs}.jsonl", "reward_toy.yaml") * config_value("reward_toy.yaml",
                                                                                         "num_train_epochs")
    all_pairs = len(lines)
    curves_ = []

    def curve(experiment, method, n, runs, start=sft, reference=sft):
        curves_.append({"experiment": experiment, "method": method, "seed": seed, "pairs": n, "runs": runs,
                        "start": start, "reference": reference})

    # frontier, and the data experiment's largest size
    study.dpo(f"dpo_seed{seed}", sft, f"{pairs}.jsonl", dpo, seed, after=[pairs], priority=priority)
    study.ppo(f"ppo_seed{seed}", sft, f"reward_seed{seed}", f"{pairs}.jsonl", ppo, seed, priority=priority)
    study.preferred_ft(f"pft_seed{seed}", f"{pairs}.jsonl", pft, seed, priority=priority)
    for experiment in ("frontier", "data"):
        curve(experiment, "DPO", all_pairs, [([], f"dpo_seed{seed}")])
        curve(experiment, "RM + PPO", all_pairs, [([f"reward_seed{seed}"], f"ppo_seed{seed}")])
    curve("frontier", "Preferred-FT", all_pairs, [([], f"pft_seed{seed}")])

    # data: the first n pairs, the full data's optimizer steps
    for n in size["data_sizes"]:
        subset = f"{pairs}_n{n}.jsonl"
        study.dpo(f"dpo_n{n}_seed{seed}", sft, subset, dpo, seed, "--max_steps", dpo_steps, priority=priority)
        study.reward_model(f"reward_n{n}_seed{seed}", subset, seed, "--max_steps", reward_steps, priority=priority)
        study.ppo(f"ppo_n{n}_seed{seed}", sft, f"reward_n{n}_seed{seed}", f"{pairs}.jsonl", ppo, seed,
                  priority=priority)
        curve("data", "DPO", n, [([], f"dpo_n{n}_seed{seed}")])
        curve("data", "RM + PPO", n, [([f"reward_n{n}_seed{seed}"], f"ppo_n{n}_seed{seed}")])

    # topic: the same pairs labelled by the topic-penalising ground truth
    topic = f"{pairs}_topic.jsonl"
    topic_pairs = sum(1 for _ in open(study.path(topic)))
    study.dpo(f"dpo_topic_seed{seed}", sft, topic, dpo, seed, priority=priority)
    study.reward_model(f"reward_topic_seed{seed}", topic, seed, priority=priority)
    study.ppo(f"ppo_topic_seed{seed}", sft, f"reward_topic_seed{seed}", topic, ppo, seed, priority=priority)
    study.preferred_ft(f"pft_topic_seed{seed}", topic, pft, seed, priority=priority)
    curve("topic", "DPO", topic_pairs, [([], f"dpo_topic_seed{seed}")])
    curve("topic", "RM + PPO", topic_pairs, [([f"reward_topic_seed{seed}"], f"ppo_topic_seed{seed}")])
    curve("topic", "Preferred-FT", topic_pairs, [([], f"pft_topic_seed{seed}")])

    # adapt: new pairs from SFT labelled by brevity; each method continues from its frontier policy
    brevity = f"pairs_brevity_seed{seed}"
    study.pairs(brevity, sft, size["adapt_pairs"], 100 + seed, "--ground_truth", "brevity", priority=priority)
    study.dpo(f"dpo_adapt_seed{seed}", study.path(f"dpo_seed{seed}"), f"{brevity}.jsonl", dpo, seed,
              after=[f"dpo_seed{seed}", brevity], priority=priority)
    study.reward_model(f"reward_brevity_seed{seed}", f"{brevity}.jsonl", seed, after=[brevity], priority=priority)
    study.ppo(f"ppo_adapt_seed{seed}", study.path(f"ppo_seed{seed}"), f"reward_brevity_seed{seed}",
              f"{pairs}.jsonl", ppo, seed, after=[f"ppo_seed{seed}"], priority=priority)
    for method, start, charged, run in (("DPO", f"dpo_seed{seed}", [], f"dpo_adapt_seed{seed}"),
                                        ("RM + PPO", f"ppo_seed{seed}", [f"reward_brevity_seed{seed}"],
                                         f"ppo_adapt_seed{seed}")):
        curve("adapt", method, size["adapt_pairs"], [(charged, run)], start=study.path(start),
              reference=study.path(start))

    # iterative: rounds on the current policy's samples, labelled by the reward model or the ground truth
    rounds, per_round = size["iterative_rounds"], size["iterative_pairs"]
    for labels, flags, needed in (("RM", ["--reward_model_path", study.path(f"reward_seed{seed}")],
                                   [f"reward_seed{seed}"]), ("GT", [], [])):
        policy, runs = sft, []
        for round_ in range(1, rounds + 1):
            round_pairs, name = f"pairs_iter{labels}{round_}_seed{seed}", f"dpo_iter{labels}{round_}_seed{seed}"
            previous = [f"dpo_iter{labels}{round_ - 1}_seed{seed}"] if round_ > 1 else []
            study.pairs(round_pairs, policy, per_round, 1000 * round_ + seed, *flags, after=[*needed, *previous],
                        priority=priority)
            study.dpo(name, policy, f"{round_pairs}.jsonl", dpo, seed, "--max_steps", dpo_steps // rounds,
                      after=[round_pairs], priority=priority)
            runs.append(([*(needed if round_ == 1 else []), round_pairs], name))
            policy = study.path(name)
        curve("iterative", f"iterative DPO ({labels} labels)", rounds * per_round, runs)
    curve("iterative", "one-shot DPO", rounds * per_round, [([], f"dpo_n{rounds * per_round}_seed{seed}")])
    return curves_


def relabel_topic(pairs_file: str, out_file: str) -> None:
    """The same samples labelled by the topic world's ground truth (ties dropped, as build_pairs does)."""
    from utils import toy_task

    with open(pairs_file) as f:
        pairs = [json.loads(line) for line in f]
    relabelled = toy_task.build_pairs([p["prompt"] for p in pairs], [p["chosen"] for p in pairs],
                                      [p["rejected"] for p in pairs], seed=0, reward=toy_task.topic_penalised_reward)
    with open(out_file, "w") as f:
        f.writelines(json.dumps(pair) + "\n" for pair in relabelled)


def curve_rows(study: Study, curve: dict) -> list[dict]:
    """A curve's points, each evaluated: the start (KL 0, no compute) and every checkpoint of its runs, with the
    FLOPs spent up to it (the steps charged before each run in full, earlier runs in full)."""
    seed, start = curve["seed"], curve["start"]
    head = {key: curve[key] for key in ("experiment", "method", "seed", "pairs")}
    rows = [{**head, "run": os.path.basename(start), "step": 0, "flops": 0.0,
             **study.evaluate(start, curve["reference"], seed)}]
    spent = 0.0
    for charged, run in curve["runs"]:
        spent += sum(study.flops(step) for step in charged)
        for folder, step, written in study.checkpoints(run):
            rows.append({**head, "run": os.path.relpath(folder, study.out), "step": step,
                         "flops": spent + study.flops(run, written),
                         **study.evaluate(folder, curve["reference"], seed)})
        spent += study.flops(run)
    return rows


def run_study(size: dict, seeds: range, out: str, steps: frontier.Steps, save) -> dict:
    study = Study(size, out, steps)
    study.sft = study.path("sft")
    steps.run("sft", "train_sft.py", "configs/sft_toy.yaml", "--model_name_or_path", size["preset"],
              "--toy_num_reviews", size["sft_reviews"], "--output_dir", study.sft)
    submit_tuning(study)
    for seed in seeds:  # the pairs first: they need only SFT, and every run of their seed reads them
        study.pairs(f"pairs_seed{seed}", study.sft, size["pairs"], seed, priority=-1)
    for seed in seeds:  # while the grids run: the reward models need no tuning
        study.reward_model(f"reward_seed{seed}", f"pairs_seed{seed}.jsonl", seed, after=[f"pairs_seed{seed}"],
                           priority=seed)
    tuning_file = study.path("claims_tuning.json")  # a resumed run does not evaluate the grids again
    if steps.resume and os.path.exists(tuning_file):
        with open(tuning_file) as f:
            picks, tuning, tuning_flops = json.load(f)
    else:
        picks, tuning, tuning_flops = tune(study)
        with open(tuning_file, "w") as f:
            json.dump([picks, tuning, tuning_flops], f)
    print(f"tuned: {picks}", flush=True)
    report = {"picks": picks, "tuning": tuning, "tuning_flops": tuning_flops, "rows": [], "steps": {}}
    pending = [curve for seed in seeds for curve in submit_seed(study, seed, picks)]

    def needed(curve):
        names = [name for charged, run in curve["runs"] for name in (*charged, run)]
        if curve["start"] != study.sft:
            names.append(os.path.basename(curve["start"]))
        return [study.futures[name] for name in names]

    while pending:  # evaluate whichever curve is ready first, in this process, while the pool trains
        ready = next((curve for curve in pending if all(future.done() for future in needed(curve))), None)
        if ready is None:
            concurrent.futures.wait([future for curve in pending for future in needed(curve)],
                                    return_when=concurrent.futures.FIRST_COMPLETED)
            continue
        pending.remove(ready)
        for future in needed(ready):
            future.result()  # a failed step stops the study here
        report["rows"] += curve_rows(study, ready)
        last = report["rows"][-1]
        print(f"{ready['experiment']} {ready['method']} n={ready['pairs']} seed {ready['seed']}: reward "
              f"{last['reward']:.3f} at KL {last['kl']:.2f}", flush=True)
        report["steps"] = {name: future.result() for name, future in study.futures.items() if future.done()}
        save(report)
    return report


# ------------------------------------------------------------------------------------------------ the report

class Curves:
    """The evaluated checkpoints as curves: (experiment, method, size) -> seed -> points in training order. size is
    the data experiment's pair count ("all" for all the seed's pairs), None elsewhere. Only the seeds that have every
    curve count (the report of a run cut short)."""

    def __init__(self, rows: list[dict], data_sizes, read=curves.at_kl):
        self.rows, self.read = {}, read  # read: how a curve is read at a KL
        for row in rows:
            size = None if row["experiment"] != "data" else row["pairs"] if row["pairs"] in data_sizes else "all"
            self.rows.setdefault((row["experiment"], row["method"], size), {}).setdefault(row["seed"], []).append(row)
        seeds = {row["seed"] for row in rows}
        self.seeds = sorted(seed for seed in seeds if all(seed in by_seed for by_seed in self.rows.values()))

    def points(self, key, seed, y="reward", x="kl") -> list[tuple[float, float]]:
        return [(row[x] if isinstance(x, str) else x(row), row[y] if isinstance(y, str) else y(row))
                for row in self.rows[key][seed]]

    def matched(self, keys, y="reward"):
        """The deciding KL of the curves `keys` (the largest grid KL every seed's curve of each reaches) and each
        curve's per-seed value of `y` there; (None, None) where they have no grid KL in common."""
        kl = curves.deciding_value([self.points(key, seed, y) for key in keys for seed in self.seeds])
        if kl is None:
            return None, None
        return kl, {key: [self.read(self.points(key, seed, y), kl) for seed in self.seeds] for key in keys}


FRONTIER_DPO, FRONTIER_PPO, FRONTIER_PFT = (("frontier", method, None) for method in ("DPO", "RM + PPO",
                                                                                     "Preferred-FT"))


def new_preference(row) -> float:
    return -row["words"]  # toy_task.brevity_reward: fewer words are better


def compute_points(c: Curves, method: str, seed: int, tuning: float) -> list[tuple[float, float]]:
    """(FLOPs spent, reward) along a frontier curve, its method's tuning charged first."""
    return [(tuning + flops, reward) for flops, reward in c.points(("frontier", method, None), seed, "reward", "flops")]


def decide(c: Curves, report: dict, data_sizes) -> list[dict]:
    """Each claim's deciding comparison: where it is read, the per-seed differences, the paired test, and (after
    Holm across the claims) the verdict by the pre-stated rule."""
    results = []

    def result(claim, at, differences, detail=""):
        test = curves.paired_test(differences) if differences else {"mean": math.nan, "half_width": math.nan,
                                                                    "p": math.nan, "seeds": 0}
        results.append({**claim, "at": at, **test, "differences": differences, "detail": detail})

    kl, values = c.matched([FRONTIER_DPO, FRONTIER_PPO])
    result(CLAIMS[0], f"KL {kl}" if kl else "no common KL",
           [a - b for a, b in zip(values[FRONTIER_DPO], values[FRONTIER_PPO])] if kl else [])

    per_size, at = [], []
    for n in data_sizes:
        kl, values = c.matched([("data", "DPO", n), ("data", "RM + PPO", n)])
        if kl is not None:
            per_size.append([a - b for a, b in zip(values["data", "DPO", n], values["data", "RM + PPO", n])])
            at.append(f"{n}: {kl}")
    result(CLAIMS[1], "KL " + ", ".join(at) if at else "no common KL",
           [statistics.fmean(seed_values) for seed_values in zip(*per_size)] if per_size else [])

    tuning = report["tuning_flops"]
    costs = {method: [compute_points(c, method, seed, tuning[method]) for seed in c.seeds]
             for method in ("DPO", "RM + PPO")}
    level = curves.deciding_value([[(reward, flops) for flops, reward in points] for method in costs
                                   for points in costs[method]], curves.REWARD_GRID)
    if level is None:
        result(CLAIMS[2], "no common reward level", [])
    else:
        reach = {method: [curves.cost_to_reach(points, level) for points in costs[method]] for method in costs}
        result(CLAIMS[2], f"reward {level}", [math.log(ppo / dpo) for dpo, ppo in zip(reach["DPO"],
                                                                                        reach["RM + PPO"])])

    keys = [("topic", "DPO", None), FRONTIER_DPO, ("topic", "Preferred-FT", None), FRONTIER_PFT]
    kl, values = c.matched(keys, "topic_reward")
    result(CLAIMS[3], f"KL {kl}" if kl else "no common KL",
           [(td - sd) - (tp - sp) for td, sd, tp, sp in zip(*(values[key] for key in keys))] if kl else [])

    keys = [("adapt", "DPO", None), ("adapt", "RM + PPO", None)]
    kl, values = c.matched(keys, new_preference)
    if kl is None:
        result(CLAIMS[4], "no common KL", [])
    else:
        gains = {key: [value - c.points(key, seed, new_preference)[0][1] for seed, value in zip(c.seeds, values[key])]
                 for key in keys}
        result(CLAIMS[4], f"KL {kl} from the start", [a - b for a, b in zip(*gains.values())])

    adjusted = curves.holm({index: r["p"] for index, r in enumerate(results)})
    for index, r in enumerate(results):
        r["p_holm"] = adjusted[index]
        r["verdict"] = curves.verdict(r["mean"], r["p_holm"], r["sign"])
    return results


def cell(values: list[float], digits: int = 3) -> str:
    return plus_minus(*mean_interval(values), digits) if values else "–"


def paired_cell(a: list[float], b: list[float], digits: int = 3) -> str:
    return cell([x - y for x, y in zip(a, b)], digits)


def table(header: list[str], lines: list[list]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "| --- |" + " ---: |" * (len(header) - 1),
            *("| " + " | ".join(map(str, line)) + " |" for line in lines)]


def p_text(p: float) -> str:
    return "–" if math.isnan(p) else f"{p:.3f}" if p >= 0.001 else "< 0.001"


def results_section(decisions: list[dict], seeds: int) -> list[str]:
    lines = [[d["claim"], d["source"], d["rule"], d["at"],
              plus_minus(d["mean"], d["half_width"], 3) if d["seeds"] else "–", p_text(d["p"]), p_text(d["p_holm"]),
              f"**{d['verdict']}**"] for d in decisions]
    return ["## Verdicts", "",
            f"Each claim's deciding comparison, stated before the run: the mean over {seeds} seeds of the per-seed "
            f"difference ± the half-width of its 95% t-interval, the two-sided paired t-test's p and Holm's adjusted "
            f"p across the {len(decisions)} claims. Supported: Holm p <= {curves.ALPHA} with the predicted sign (DPO "
            f"better, or cheaper); contradicted: Holm p <= {curves.ALPHA} with the other sign; otherwise not shown.",
            "", *table(["claim", "from", "deciding comparison", "read at", "difference", "p", "Holm p", "verdict"],
                       lines)]


def sensitivity_section(decisions: list[dict], linear: list[dict]) -> list[str]:
    lines = [[d["claim"], d["at"], plus_minus(d["mean"], d["half_width"], 3) if d["seeds"] else "–",
              p_text(d["p_holm"]), d["verdict"], e["at"], plus_minus(e["mean"], e["half_width"], 3) if e["seeds"]
              else "–", p_text(e["p_holm"]), e["verdict"]] for d, e in zip(decisions, linear)]
    return ["## Sensitivity to how a curve is read", "",
            "The verdicts above read each curve as a frontier (the best reward within the KL budget). Read instead "
            "by plain linear interpolation between its points ordered by KL, a PPO checkpoint that overshoots in KL "
            "early in training pulls PPO's reading down between its neighbours. Both readings, the same runs:", "",
            *table(["claim", "frontier: at", "difference", "Holm p", "verdict", "linear: at", "difference",
                    "Holm p", "verdict"], lines)]


def rules_section(size: dict) -> list[str]:
    return ["## Pre-stated rules", "",
            f"- A curve: one seed's run evaluated at its start (KL 0), at "
            f"{', '.join(f'{fraction:.3g}' for fraction in size['fractions'])} of its optimizer steps and at its "
            f"end. Its "
            f"reward at a KL: the best its checkpoints reach within that KL budget, a checkpoint or a mixture of two "
            f"(the points' upper concave envelope, made non-decreasing: curves.at_kl), never extrapolated.",
            f"- The deciding KL of a comparison: the largest of {', '.join(map(str, curves.KL_GRID))} that every "
            f"compared curve reaches on every seed. The deciding reward of the compute claim: the largest of "
            f"{', '.join(map(str, curves.REWARD_GRID))} that both methods reach on every seed; the FLOPs to reach it: "
            f"interpolated at the first crossing, in training order.",
            "- Differences are paired by seed (same pairs, test prompts and sampling seed); the p-values are Holm-"
            "corrected across the five claims. Iterative DPO and the per-KL and per-size tables are descriptive: "
            "their intervals are not corrected for the number of cells."]


def frontier_section(c: Curves) -> list[str]:
    lines = []
    for kl in curves.KL_GRID:
        values = {}
        for key in (FRONTIER_DPO, FRONTIER_PPO, FRONTIER_PFT):
            if curves.deciding_value([c.points(key, seed) for seed in c.seeds], (kl,)) == kl:
                values[key] = [curves.at_kl(c.points(key, seed), kl) for seed in c.seeds]
        if FRONTIER_DPO in values or FRONTIER_PPO in values:
            lines.append([kl, *(cell(values.get(key, [])) for key in (FRONTIER_DPO, FRONTIER_PPO, FRONTIER_PFT)),
                          paired_cell(values[FRONTIER_DPO], values[FRONTIER_PPO])
                          if FRONTIER_DPO in values and FRONTIER_PPO in values else "–"])
    ends = [[key[1], cell([c.rows[key][seed][-1]["kl"] for seed in c.seeds], 2),
             cell([c.rows[key][seed][-1]["reward"] for seed in c.seeds]),
             cell([c.rows[key][seed][-1]["words"] for seed in c.seeds], 1),
             cell([c.rows[key][seed][-1]["distinct_2"] for seed in c.seeds])]
            for key in (FRONTIER_DPO, FRONTIER_PPO, FRONTIER_PFT)]
    return ["## Frontier: reward at matched KL (claim 1)", "",
            "Ground-truth reward of each method's curve read at each KL that every seed's curve reaches (– where "
            "some seed's does not); the last column pairs DPO with RM + PPO by seed.", "",
            *table(["KL", "DPO", "RM + PPO", "Preferred-FT", "DPO - RM + PPO"], lines), "",
            "At the end of training (not at matched KL: for length and diversity):", "",
            *table(["method", "KL", "reward", "words", "distinct-2"], ends)]


def data_section(c: Curves, data_sizes) -> list[str]:
    lines = []
    for n in (*data_sizes, "all"):
        kl, values = c.matched([("data", "DPO", n), ("data", "RM + PPO", n)])
        if kl is None:
            lines.append([n, "–", "–", "–", "–"])
            continue
        dpo, ppo = values["data", "DPO", n], values["data", "RM + PPO", n]
        lines.append([n, kl, cell(dpo), cell(ppo), paired_cell(dpo, ppo)])
    return ["## Preference data (claim 2)", "",
            "Both methods on the first N of each seed's pairs: DPO and the reward model train for the full data's "
            "optimizer steps at every N (more epochs on fewer pairs); PPO's 1,024 episodes draw on all the seed's "
            "prompts (unlabelled prompts cost nothing). Reward at each size's deciding KL:", "",
            *table(["pairs", "KL", "DPO", "RM + PPO", "DPO - RM + PPO"], lines), "",
            "The plot (claims_data.png) reads every size at one KL, the largest every data curve reaches, with a "
            "least-squares line in log N per method."]


def compute_section(c: Curves, report: dict) -> list[str]:
    tuning = report["tuning_flops"]
    lines = []
    start = max(c.rows[FRONTIER_DPO][seed][0]["reward"] for seed in c.seeds)  # SFT's: reached at no cost
    for level in (level for level in curves.REWARD_GRID if level > start):
        reach = {}
        for method in ("DPO", "RM + PPO"):
            for charged in (tuning[method], 0.0):
                costs = [curves.cost_to_reach(compute_points(c, method, seed, charged), level) for seed in c.seeds]
                reach[method, charged > 0] = costs if None not in costs else None
        if all(value is not None for value in reach.values()):
            lines.append([level, *(cell([x / 1e12 for x in reach[method, True]], 1) for method in ("DPO", "RM + PPO")),
                          cell([math.log(p / d) for d, p in zip(reach["DPO", True], reach["RM + PPO", True])], 2),
                          cell([math.log(p / d) for d, p in zip(reach["DPO", False], reach["RM + PPO", False])], 2)])
    breakdown = []
    for method, key, charged in (("DPO", FRONTIER_DPO, []), ("RM + PPO", FRONTIER_PPO, ["reward_seed"]),
                                 ("Preferred-FT", FRONTIER_PFT, [])):
        final = [c.rows[key][seed][-1]["flops"] / 1e12 for seed in c.seeds]
        breakdown.append([method, f"{tuning[method] / 1e12:.1f}", cell(final, 1)])
    wall = {method: [report["steps"].get(f"{prefix}_seed{seed}", math.nan) + sum(
        report["steps"].get(f"{step}{seed}", 0.0) for step in charged) for seed in c.seeds]
        for method, prefix, charged in (("DPO", "dpo", []), ("RM + PPO", "ppo", ["reward_seed"]))}
    return ["## Compute (claim 3)", "",
            "FLOPs: every forward of every model, counted as it ran (experiments/token_count.py: positions x the "
            "model's forward FLOPs per position, the output layer included where the model has one; backward = 2 "
            "forwards; attention's length-squared term left out, ~3% at these lengths). DPO is charged its "
            "reference scoring and the output layer at every position (its own path computes it on completion "
            "tokens only); RM + PPO its reward model's training, rollouts, reference, reward and value forwards. "
            "Tuning: the method's 8 grid runs and the seed-0 reward model its criterion reads. Cost to reach a "
            "reward (TFLOPs, tuning included), and ln(RM + PPO / DPO) with and without tuning, per seed:", "",
            *table(["reward", "DPO (TFLOPs)", "RM + PPO (TFLOPs)", "ln ratio", "ln ratio, no tuning"], lines), "",
            "What each method spent (TFLOPs): tuning (once, study-wide) and one seed's run to its end (mean over "
            "seeds; RM + PPO's includes its reward model):", "",
            *table(["method", "tuning", "run"], breakdown), "",
            f"Wall time of one seed's run (s; RM + PPO: reward model + PPO), this run, the machine otherwise idle, "
            f"{report['jobs']} runs at once: DPO {cell(wall['DPO'], 0)}, RM + PPO {cell(wall['RM + PPO'], 0)}, "
            f"ratio {cell([p / d for d, p in zip(wall['DPO'], wall['RM + PPO'])], 2)}."]


def topic_section(c: Curves) -> list[str]:
    keys = [("topic", "DPO", None), FRONTIER_DPO, ("topic", "Preferred-FT", None), FRONTIER_PFT,
            ("topic", "RM + PPO", None), FRONTIER_PPO]
    kl, values = c.matched(keys[:4], "topic_reward")
    if kl is None:
        return ["## Learning from bad examples (claim 4)", "", "No KL common to the four curves."]
    lines = []
    for method, topic, sentiment in (("DPO", *keys[:2]), ("Preferred-FT", *keys[2:4]), ("RM + PPO", *keys[4:])):
        if curves.deciding_value([c.points(key, seed) for key in (topic, sentiment) for seed in c.seeds],
                                 (kl,)) != kl:
            lines.append([method, "–", "–", "–"])
            continue
        a, b = ([curves.at_kl(c.points(key, seed, "topic_reward"), kl) for seed in c.seeds] for key in (topic,
                                                                                                       sentiment))
        lines.append([method, cell(a), cell(b), paired_cell(a, b)])
    rates = [[key[1] + (" (topic labels)" if key[0] == "topic" else " (sentiment labels)"),
              cell([c.rows[key][seed][-1]["topic_rate"] for seed in c.seeds]),
              cell([c.rows[key][seed][-1]["kl"] for seed in c.seeds], 2)] for key in keys]
    return ["## Learning from bad examples (claim 4)", "",
            "Each seed's pairs relabelled by a ground truth that subtracts 1 from the sentiment of a completion that "
            "mentions the music (`toy_task.topic_penalised_reward`). Preferred-FT sees only the chosen answers; DPO "
            "and the reward model both. The control is each method trained on the sentiment labels of the same "
            f"samples: what the topic labels add, read in the topic world's reward at KL {kl}:", "",
            *table(["method", "topic labels", "sentiment labels", "topic - sentiment"], lines), "",
            "The deciding difference-in-differences is DPO's row minus Preferred-FT's (Verdicts). Topic rate at the "
            "end of training:", "", *table(["run", "topic rate", "KL"], rates)]


def adapt_section(c: Curves) -> list[str]:
    keys = [("adapt", "DPO", None), ("adapt", "RM + PPO", None)]
    kl, values = c.matched(keys, new_preference)
    if kl is None:
        return ["## Adapting to a new preference (claim 5)", "", "No KL common to the two curves."]
    lines = []
    for key in keys:
        start = [c.points(key, seed, new_preference)[0][1] for seed in c.seeds]
        final = c.rows[key]
        lines.append([key[1], cell([-s for s in start], 1),
                      cell([-(v - s) for v, s in zip(values[key], start)], 2),
                      cell([final[seed][-1]["kl"] for seed in c.seeds], 2),
                      cell([final[seed][-1]["flops"] / 1e12 for seed in c.seeds], 1)])
    return ["## Adapting to a new preference (claim 5)", "",
            "New pairs sampled from SFT, labelled by a second preference: fewer words (`toy_task.brevity_reward`). "
            "DPO continues from its frontier checkpoint on them (its reference: that checkpoint); RLHF trains a new "
            "reward model on them and continues PPO from its frontier checkpoint. KL is to each method's start. "
            f"Words removed at KL {kl} from the start, and the change's cost:", "",
            *table(["method", "words at the start", f"words removed at KL {kl}", "KL at the end",
                    "TFLOPs of the change"], lines)]


def iterative_section(c: Curves) -> list[str]:
    keys = [("iterative", method, None) for method in ("iterative DPO (GT labels)", "iterative DPO (RM labels)",
                                                       "one-shot DPO")]
    kl, values = c.matched(keys)
    if kl is None:
        return ["## Iterative DPO", "", "No KL common to the three curves."]
    gt, rm, one_shot = (values[key] for key in keys)
    return ["## Iterative DPO (descriptive)", "",
            "Rounds of DPO, each on pairs sampled from the current policy and labelled by the seed's reward model "
            "(trained on its ground-truth pairs) or by the ground truth, against one-shot DPO on as many "
            "ground-truth pairs; the rounds together take the one-shot run's optimizer steps. Reward at KL "
            f"{kl}:", "",
            *table(["curve", "reward", "minus one-shot DPO"],
                   [["iterative DPO, ground-truth labels", cell(gt), paired_cell(gt, one_shot)],
                    ["iterative DPO, reward-model labels", cell(rm), paired_cell(rm, one_shot)],
                    ["one-shot DPO", cell(one_shot), ""]])]


def tuning_section(report: dict, size: dict) -> list[str]:
    lines = []
    for row in report["tuning"]:
        setting = ", ".join(f"{key} {row[key]:g}" for key in row if key in ("learning_rate", "num_train_epochs",
                                                                            "num_ppo_epochs"))
        mark = "**" if row["chosen"] else ""
        lines.append([row["method"], f"{mark}{setting}{mark}", f"{mark}{row['objective']:.3f}{mark}",
                      f"{row['learned_reward']:.3f}", f"{row['kl']:.2f}", f"{row['gt_reward']:.3f}"])
    return ["## Tuning (seed 0)", "",
            f"Every method's grid on seed 0's pairs, evaluated on {size['eval_prompts']} validation prompts (prompt "
            f"seed {frontier.VALIDATION_PROMPT_SEED}). Objective: the seed-0 reward model's score normalised on SFT's "
            f"samples minus {TUNING_KL_COEF} x KL; the ground-truth column is shown, not used. Bold: chosen.", "",
            *table(["method", "setting", "objective", "learned reward (norm.)", "KL", "GT reward"], lines)]


def plot(c: Curves, report: dict, data_sizes, results_dir: str, suffix: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def mean_curve(axes, keys_labels, y="reward", relative=False):
        for key, label in keys_labels:
            reach = min(max(x for x, _ in c.points(key, seed, y)) for seed in c.seeds)
            grid = [reach * i / 40 for i in range(41)]
            start = {seed: c.points(key, seed, y)[0][1] if relative else 0.0 for seed in c.seeds}
            stats = [mean_interval([curves.at_kl(c.points(key, seed, y), kl) - start[seed] for seed in c.seeds])
                     for kl in grid]
            means = [m for m, _ in stats]
            half = [0 if math.isnan(h) else h for _, h in stats]
            (line,) = axes.plot(grid, means, label=label)
            axes.fill_between(grid, [m - h for m, h in zip(means, half)], [m + h for m, h in zip(means, half)],
                              color=line.get_color(), alpha=0.2)
            ends = [c.points(key, seed, y)[-1] for seed in c.seeds]
            axes.plot(statistics.fmean(x for x, _ in ends), statistics.fmean(v - start[s] for (_, v), s in
                                                                              zip(ends, c.seeds)),
                      marker="o", color=line.get_color())
        axes.grid(alpha=0.3)
        axes.legend(fontsize=8)

    figure, panels = plt.subplots(2, 2, figsize=(11, 8))
    mean_curve(panels[0][0], [(FRONTIER_DPO, "DPO"), (FRONTIER_PPO, "RM + PPO"), (FRONTIER_PFT, "Preferred-FT")])
    panels[0][0].set_title("frontier (sentiment)")
    panels[0][0].set_ylabel("ground-truth reward")
    mean_curve(panels[0][1], [(("topic", m, None), f"{m}, topic labels") for m in ("DPO", "RM + PPO", "Preferred-FT")]
               + [(FRONTIER_DPO, "DPO, sentiment labels"), (FRONTIER_PFT, "Preferred-FT, sentiment labels")],
               "topic_reward")
    panels[0][1].set_title("topic world")
    panels[0][1].set_ylabel("topic-world reward")
    mean_curve(panels[1][0], [(("adapt", m, None), m) for m in ("DPO", "RM + PPO")], new_preference, relative=True)
    panels[1][0].set_title("adapt: the new preference, from each method's start")
    panels[1][0].set_ylabel("words removed (new preference gained)")
    panels[1][0].set_xlabel("KL to the start (nats)")
    mean_curve(panels[1][1], [(("iterative", m, None), m) for m in ("iterative DPO (GT labels)",
                                                                    "iterative DPO (RM labels)", "one-shot DPO")])
    panels[1][1].set_title("iterative DPO")
    panels[1][1].set_xlabel("KL(policy || SFT), nats")
    figure.suptitle(f"Reward against KL, mean over {len(c.seeds)} seeds with 95% intervals; dots: ends of "
                    f"training{suffix}", fontsize=10)
    figure.tight_layout()
    figure.savefig(os.path.join(results_dir, "claims_curves.png"), dpi=110)

    keys = [("data", m, n) for m in ("DPO", "RM + PPO") for n in (*data_sizes, "all")]
    kl = curves.deciding_value([c.points(key, seed) for key in keys for seed in c.seeds])
    figure, axes = plt.subplots(figsize=(6.4, 4.4))
    if kl is not None:
        for method, marker in (("DPO", "o"), ("RM + PPO", "s")):
            sizes, stats = [], []
            for n in (*data_sizes, "all"):
                values = [curves.at_kl(c.points(("data", method, n), seed), kl) for seed in c.seeds]
                pairs = statistics.fmean(c.rows["data", method, n][seed][0]["pairs"] for seed in c.seeds)
                sizes.append(pairs)
                stats.append(mean_interval(values))
            container = axes.errorbar(sizes, [m for m, _ in stats], yerr=[0 if math.isnan(h) else h for _, h in stats],
                                      marker=marker, linestyle="", capsize=3, label=method)
            fit = statistics.linear_regression([math.log(n) for n in sizes], [m for m, _ in stats])
            axes.plot(sizes, [fit.intercept + fit.slope * math.log(n) for n in sizes], linestyle="--",
                      color=container[0].get_color(), label=f"{method}: {fit.intercept:.2f} + {fit.slope:.3f} ln N")
    axes.set_xscale("log")
    axes.set_xlabel("preference pairs labelled")
    axes.set_ylabel(f"ground-truth reward at KL {kl}")
    axes.set_title(f"Reward at matched KL against preference data{suffix}", fontsize=10)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(os.path.join(results_dir, "claims_data.png"), dpi=110)

    figure, panels = plt.subplots(1, 2, figsize=(11, 4.4))
    for axes, tuned in zip(panels, (True, False)):
        for method in ("DPO", "RM + PPO"):
            tuning, color = report["tuning_flops"][method] if tuned else 0.0, None
            for seed in c.seeds:
                flops, rewards = zip(*compute_points(c, method, seed, tuning))
                (line,) = axes.plot([f / 1e12 for f in flops], rewards, marker=".", alpha=0.6, color=color,
                                    label=method if color is None else None)
                color = line.get_color()
        axes.set_xlabel("cumulative TFLOPs" + (", tuning included" if tuned else ", the runs alone (no tuning)"))
        axes.set_ylabel("ground-truth reward")
        axes.grid(alpha=0.3)
        axes.legend(fontsize=8)
    panels[0].set_xscale("log")
    figure.suptitle(f"Reward against compute, frontier runs, one line per seed{suffix}", fontsize=10)
    figure.tight_layout()
    figure.savefig(os.path.join(results_dir, "claims_compute.png"), dpi=110)


def write_outputs(report: dict, args) -> list[dict]:
    size, results_dir = report["size"], args.results_dir
    data_sizes = tuple(size["data_sizes"])
    c = Curves(report["rows"], data_sizes)
    os.makedirs(results_dir, exist_ok=True)
    frontier.write_csv(os.path.join(results_dir, "claims.csv"),
                       [row for row in report["rows"] if row["seed"] in c.seeds])
    frontier.write_csv(os.path.join(results_dir, "tuning.csv"), report["tuning"])
    decisions = decide(c, report, data_sizes)
    linear = decide(Curves(report["rows"], data_sizes, read=curves.linear_at_kl), report, data_sizes)
    quick = " (--quick)" if report["quick"] else ""
    lines = [f"# What is claimed for DPO, at toy scale{quick}", "",
             f"`experiments/claims.py{' --quick' if report['quick'] else ''}`: {len(c.seeds)} seed(s) "
             f"({', '.join(map(str, c.seeds))}), {size['eval_prompts']} test prompts per evaluation, "
             f"{report['seconds'] / 60:.0f} minutes with --jobs {report['jobs']}. Every seed samples its own pairs "
             f"and test prompts and seeds training and sampling; the SFT policy is shared (not re-trained per seed). "
             f"Tuning ran on seed 0 only, which is not among the evaluated seeds.", "",
             *results_section(decisions, len(c.seeds)), "", *rules_section(size), "",
             *sensitivity_section(decisions, linear), "",
             *frontier_section(c), "", *data_section(c, data_sizes), "", *compute_section(c, report), "",
             *topic_section(c), "", *adapt_section(c), "", *iterative_section(c), "", *tuning_section(report, size)]
    with open(os.path.join(results_dir, "claims.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    plot(c, report, data_sizes, results_dir, quick)
    print("\n".join(lines))
    print(f"wrote {results_dir}/claims.md, claims.csv, tuning.csv, claims_curves.png, claims_data.png, "
          f"claims_compute.png")
    return decisions


def main(argv=None):
    args = parse(argv)
    os.environ.setdefault("TQDM_DISABLE", "1")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    out = os.path.abspath(args.output_dir)
    os.makedirs(os.path.join(out, "logs"), exist_ok=True)
    saved = os.path.join(out, "claims_runs.json")  # what the tables are made of
    if args.report_only:
        with open(saved) as f:
            write_outputs(json.load(f), args)
        return
    start = time.perf_counter()

    def save(report):
        with open(saved, "w") as f:
            json.dump({**report, "seconds": time.perf_counter() - start, "size": args.size, "seeds": args.seeds,
                       "jobs": args.jobs, "quick": args.quick}, f)

    steps = frontier.Steps(args.jobs, os.path.join(out, "logs"), resume=args.resume)
    if args.jobs > 1:  # this process evaluates beside the pool's runs: its share of the cores
        import torch

        torch.set_num_threads(max(1, (os.cpu_count() or 1) // args.jobs))
    try:
        report = run_study(args.size, range(1, args.seeds + 1), out, steps, save)
    except RuntimeError as error:  # a step failed: its log says why
        steps.pool.shutdown(cancel_futures=True)
        sys.exit(str(error))
    except BaseException:  # our bug, or Ctrl-C: start nothing more (running steps finish)
        steps.pool.shutdown(cancel_futures=True)
        raise
    save(report)
    with open(saved) as f:
        write_outputs(json.load(f), args)
    print(f"total: {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
