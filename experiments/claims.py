"""The DPO paper's claims about DPO against RLHF (reward model + PPO), each tested at toy scale.

    .venv/bin/python experiments/claims.py --jobs 2     # the study, 3 seeds: 78 minutes on the busy 2-core machine
    .venv/bin/python experiments/claims.py --quick      # every experiment at reduced size, 1 seed (the tests use it)
    .venv/bin/python experiments/claims.py --jobs 2 --resume   # go on after an interruption (finished steps stay)

The toy world, the SFT policy, the preference pairs sampled from it (labelled by the ground truth) and the methods
are experiments/frontier.py's, run through its code. Experiments, each for --seeds seeds:

- tuning: DPO gets PPO's tuning budget (frontier.py --tune_ppo): 8 settings of learning rate x epochs at beta 0.1,
  seed 0, picked on validation prompts without the ground truth by the criterion PPO's tuning uses, the learned
  reward (the seed-0 reward model, normalised on SFT's samples) minus 0.3 x KL. Every DPO run below uses the pick.
- frontier: tuned DPO at each beta of SIZES, reward model + PPO at each KL coefficient, Preferred-FT; with
  - budget (claim 1, DPO needs no reward model): pairs labelled, reward queries, reward-model training tokens;
  - length and diversity: mean completion length, distinct-2.
- data (claim 2, less preference data): DPO (beta 0.1) and reward model + PPO (kl_coef 0.3, the reward model trained
  on the same pairs) on the first N pairs, N in --data_sizes and all of them: they land near the same KL.
- compute (claim 3): the token positions each run's models processed (counted as they ran:
  experiments/token_count.py) and its wall time, for the data runs; the cheapest that reaches TARGET_REWARD.
- topic (claim 4, DPO learns from bad examples): the same samples labelled by a ground truth that penalises
  mentions of the music (utils/toy_task.py topic_penalised_reward); SFT, Preferred-FT (chosen answers only), DPO and
  PPO on them: the topic's rate and the topic world's reward.
- adapt (claim 5, DPO adapts at once): a second preference, fewer words (toy_task.brevity_reward), on new pairs
  sampled from SFT. DPO continues from its beta-0.1 checkpoint on them; RLHF trains a reward model on them and runs
  PPO again from its kl-0.3 checkpoint. Both preferences, and the cost of the change.
- iterative: DPO rounds from the current policy on its own samples labelled by the seed's learned reward model
  (never the ground truth).
- kl: why DPO's KL was uncertain: per-sample statistics of the two estimators and a larger evaluation.

Every policy is evaluated by eval_policy.py on held-out test prompts, each seed with its own samples. KL to SFT is
eval_policy's kl_full (sum over the completion of the exact per-token KL, on the policy's samples: the sampled
log-ratio's expectation, with less noise); kl_sampled is the sampled log-ratio. Means over seeds with 95%
t-intervals; differences paired by seed. Writes claims.md, claims.csv (every evaluation), dpo_tuning.md/csv and
claims_frontier.png, claims_data.png to --results_dir.
"""

import argparse
import concurrent.futures
import itertools
import json
import math
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import frontier  # noqa: E402 -- beside this file
from frontier import data_flags, difference_interval, mean_interval, plus_minus  # noqa: E402

SIZES = {  # default / --quick
    "preset": ("mixtral-toy", "mixtral-toy"),
    "sft_reviews": (4000, 800),
    "pairs": (2000, 384),
    "betas": ((0.1,), (0.1,)),
    "kl_coefs": ((0.3,), (0.3,)),
    "ppo_episodes": (1024, 64),
    "ppo_batch": ((16, 4), (8, 2)),
    "eval_prompts": (256, 32),
    "max_new_tokens": (32, 16),
    "seeds": (3, 1),
    "data_sizes": ((500,), (128,)),  # and all the pairs
    "dpo_grid": ({"learning_rate": (3e-5, 1e-4, 3e-4, 1e-3), "num_train_epochs": (1, 2)},
                 {"learning_rate": (1e-4, 3e-4), "num_train_epochs": (2,)}),
    "adapt_pairs": (500, 128),
    "iterative_rounds": (2, 1),
    "iterative_pairs": (500, 128),
    "kl_check_prompts": (1024, 48),
}
BETA, KL_COEF = 0.1, 0.3  # DPO's and PPO's setting for data, topic and adapt: both land near 1.2 nats (frontier.md)
TUNING_KL_COEF = 0.3  # the KL weight of the tuning objective, as in frontier.py --tune_ppo
TARGET_REWARD = 0.4  # claims 2 and 3: the least data / compute at which a method's mean reward reaches this
PRIORITY = {"frontier": 0, "kl": 1, "topic": 2, "data": 3, "adapt": 4, "iterative": 5}
METRICS = ("reward", "kl", "kl_sampled", "win_rate", "length", "distinct_2", "words", "topic_rate", "topic_reward")


def parse():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="every experiment at reduced size, 1 seed")
    parser.add_argument("--seeds", type=int, help="seeds per method (default 3; --quick: 1)")
    parser.add_argument("--data_sizes", type=int, nargs="+", help="pair counts of the data experiment, besides all")
    parser.add_argument("--jobs", type=int, default=1, help="training runs at once, each with cores / jobs threads")
    parser.add_argument("--output_dir", default="outputs/claims", help="checkpoints and logs")
    parser.add_argument("--results_dir", help="tables and plots (default experiments/results; --quick: output_dir)")
    parser.add_argument("--resume", action="store_true",
                        help="skip the steps that finished in an earlier run into the same --output_dir")
    parser.add_argument("--report_only", action="store_true",
                        help="rewrite the tables and plots from the last run's <output_dir>/claims_runs.json")
    args = parser.parse_args()
    args.size = {key: value[1 if args.quick else 0] for key, value in SIZES.items()}
    args.size["data_sizes"] = tuple(args.data_sizes or args.size["data_sizes"])
    args.seeds = args.seeds or args.size["seeds"]
    if args.seeds < 1:
        parser.error("--seeds must be at least 1")
    args.results_dir = args.results_dir or (args.output_dir if args.quick else os.path.join(frontier.REPO,
                                                                                            "experiments", "results"))
    return args


class Study:
    """The runs (steps) and their costs, and the evaluations (rows)."""

    def __init__(self, size: dict, out: str, steps: frontier.Steps):
        self.size, self.out, self.steps, self.logs = size, out, steps, steps.log_dir
        self.futures, self.evaluations, self.rows = {}, {}, []

    def path(self, name: str) -> str:
        return os.path.join(self.out, name)

    # Each step's priority is its experiment's (PRIORITY): on a busy machine the main claims finish first.
    def dpo(self, name, init, data, beta, seed, setting, after=(), priority=0):
        # a reference cache of its own: every run scores (and is charged for) its reference
        self.futures[name] = frontier.submit_dpo(
            self.steps, name, self.out, init, data, beta, seed, "--learning_rate", setting["learning_rate"],
            "--num_train_epochs", setting["num_train_epochs"], "--ref_logps_cache_dir", self.path(f"ref_cache/{name}"),
            after=after, priority=priority)

    def reward_model(self, name, data, seed, after=(), priority=0):
        self.futures[name] = frontier.submit_reward_model(self.steps, name, self.out, self.sft, data, seed, after,
                                                          priority)

    def ppo(self, name, init, reward, data, seed, kl_coef=KL_COEF, after=(), priority=0):
        self.futures[name] = frontier.submit_ppo(self.steps, name, self.out, init, self.path(reward), data, kl_coef,
                                                 seed, self.size, after=[self.futures[reward], *after],
                                                 priority=priority)

    def preferred_ft(self, name, data, seed, priority=0):
        self.futures[name] = frontier.submit_preferred_ft(self.steps, name, self.out, self.sft, data, seed,
                                                          priority=priority)

    def pairs(self, name, policy, num_pairs, seed, *flags, after=(), priority=0):
        self.futures[name] = self.steps.submit(
            name, "make_toy_pairs.py", "--source", "policy", "--model_name_or_path", policy, "--num_pairs", num_pairs,
            "--max_new_tokens", self.size["max_new_tokens"], "--seed", seed, "--output_file",
            self.path(f"{name}.jsonl"), *flags, after=after, priority=priority)

    def cost(self, steps: list[str]) -> dict:
        """Wall seconds and counted token positions of the steps a method needed (each once finished)."""
        tokens = [self.steps.tokens(step) for step in steps]
        return {"wall_s": sum(self.futures[step].result() for step in steps),
                "train_tokens": sum(t["forward_backward"] for t in tokens),
                "forward_tokens": sum(t["forward"] for t in tokens),
                "reward_model_tokens": sum(t["forward_backward"] + t["forward"]
                                           for step, t in zip(steps, tokens) if step.startswith("reward"))}

    def evaluate(self, name: str, seed: int, **overrides) -> dict:
        """The metrics of checkpoint `name` (SFT: "sft") on the test prompts with the seed's samples (cached)."""
        key = name, seed, tuple(sorted(overrides.items()))
        if key not in self.evaluations:
            from utils import toy_task

            saved = os.path.join(self.logs, f"eval_{name}{''.join(f'_{key}' for key in overrides)}_seed{seed}.json")
            if self.steps.resume and os.path.exists(saved):  # evaluated by the run that is resumed
                with open(saved) as f:
                    results = json.load(f)
            else:
                results = frontier.evaluation(self.path(name), self.sft, self.size, self.logs, seed, **overrides)
            texts = results["completions"]
            self.evaluations[key] = {
                "reward": results["mean_reward"], "kl": results["kl_full"], "kl_sampled": results["kl"],
                "win_rate": results["win_rate"], "length": results["mean_length"],
                "distinct_2": results["distinct_2"], "words": statistics.fmean(len(t.split()) for t in texts),
                "topic_rate": statistics.fmean(map(toy_task.mentions_topic, texts)),
                "topic_reward": statistics.fmean(toy_task.topic_penalised_reward(texts)),
                "gt_reward": statistics.fmean(toy_task.ground_truth_reward(texts)),  # whoever judged
                "log_ratios": results["log_ratios"], "full_kls": results["full_kls"]}
        return self.evaluations[key]

    def row(self, experiment: str, method: str, seed: int, name: str, steps: list[str], pairs: int,
            reward_queries: int, **extra):
        """Evaluate checkpoint `name` and record it with the budget of `steps` (pairs: a count, or a function that
        counts them once they exist)."""
        metrics = {key: value for key, value in self.evaluate(name, seed).items() if key in METRICS}
        cost = self.cost(steps) if steps else {"wall_s": 0.0, "train_tokens": 0, "forward_tokens": 0,
                                               "reward_model_tokens": 0}
        pairs = pairs() if callable(pairs) else pairs
        self.rows.append({"experiment": experiment, "method": method, "seed": seed, **metrics, "pairs": pairs,
                          "reward_queries": reward_queries, **cost, **extra})
        print(f"{experiment} {method} seed {seed}: reward {metrics['reward']:.3f}, KL {metrics['kl']:.2f}", flush=True)


def write_subset(pairs_file: str, count: int, out_file: str) -> None:
    with open(pairs_file) as f, open(out_file, "w") as g:
        g.writelines(itertools.islice(f, count))


def relabel(pairs_file: str, reward, out_file: str) -> None:
    """The same samples labelled by another ground truth (ties dropped, as build_pairs does)."""
    from utils import toy_task

    with open(pairs_file) as f:
        pairs = [json.loads(line) for line in f]
    relabelled = toy_task.build_pairs([p["prompt"] for p in pairs], [p["chosen"] for p in pairs],
                                      [p["rejected"] for p in pairs], seed=0, reward=reward)
    with open(out_file, "w") as f:
        f.writelines(json.dumps(pair) + "\n" for pair in relabelled)


def count_pairs(pairs_file: str) -> int:
    with open(pairs_file) as f:
        return sum(1 for _ in f)


def tune_dpo(study: Study, reward: str) -> tuple[dict, list[dict]]:
    """The tuning grid's runs (submitted by run_study) evaluated on validation prompts with the learned reward."""
    size = study.size
    grid = [dict(zip(size["dpo_grid"], values)) for values in itertools.product(*size["dpo_grid"].values())]
    concurrent.futures.wait([study.futures[name] for name in (reward, *map(tuning_name, grid))])
    mean, std = frontier.reward_model_baseline(study.sft, study.path(reward), size, frontier.VALIDATION_PROMPT_SEED)
    rows = []
    for setting in grid:
        name = tuning_name(setting)
        learned = study.evaluate(name, 0, judge=study.path(reward), prompt_seed=frontier.VALIDATION_PROMPT_SEED)
        normalized = (learned["reward"] - mean) / std
        rows.append({**setting, "objective": normalized - TUNING_KL_COEF * learned["kl"], "learned_reward": normalized,
                     "kl": learned["kl"], "gt_reward": learned["gt_reward"], "wall_s": study.futures[name].result()})
        print(f"{name}: objective {rows[-1]['objective']:.3f}, GT reward {learned['gt_reward']:.3f}", flush=True)
    best = max(rows, key=lambda row: row["objective"])
    return {"learning_rate": best["learning_rate"], "num_train_epochs": best["num_train_epochs"]}, rows


def tuning_name(setting: dict) -> str:
    return f"tune_dpo_lr{setting['learning_rate']}_epochs{setting['num_train_epochs']}"


def run_study(size: dict, seeds: range, out: str, steps: frontier.Steps, save) -> tuple[Study, dict, list[dict]]:
    from utils import toy_task

    study = Study(size, out, steps)
    shared = frontier.prepare(size, out, steps)
    study.sft, pairs_file = shared["sft"], shared["pairs_file"]
    data, all_pairs = shared["data"], count_pairs(pairs_file)
    study.futures["sft"] = concurrent.futures.Future()
    study.futures["sft"].set_result(shared["sft_seconds"])
    files = {"full": pairs_file, "topic": study.path("pairs_topic.jsonl")}
    relabel(pairs_file, toy_task.topic_penalised_reward, files["topic"])
    for n in size["data_sizes"]:
        files[n] = study.path(f"pairs_{n}.jsonl")
        write_subset(pairs_file, n, files[n])
    tokens = shared["tokens"]
    _, ppo_queries = frontier.ppo_budget(size, tokens)

    # submitted in order of need: the DPO tuning first (every DPO run waits for it), reward models before their PPO
    grid = [dict(zip(size["dpo_grid"], values)) for values in itertools.product(*size["dpo_grid"].values())]
    for setting in grid:
        study.dpo(tuning_name(setting), study.sft, data, BETA, 0, setting)
    for seed in seeds:
        study.reward_model(f"reward_seed{seed}", data, seed)
    study.pairs("pairs_brevity", study.sft, size["adapt_pairs"], 1, "--ground_truth", "brevity",
                priority=PRIORITY["adapt"])
    topic, brevity = data_flags(files["topic"]), data_flags(study.path("pairs_brevity.jsonl"))
    for seed in seeds:
        for kl_coef in size["kl_coefs"]:
            study.ppo(f"ppo_kl{kl_coef}_seed{seed}", study.sft, f"reward_seed{seed}", data, seed, kl_coef)
        study.preferred_ft(f"preferred_ft_seed{seed}", data, seed)
        study.reward_model(f"reward_topic_seed{seed}", topic, seed, priority=PRIORITY["topic"])
        study.preferred_ft(f"preferred_ft_topic_seed{seed}", topic, seed, priority=PRIORITY["topic"])
        study.ppo(f"ppo_topic_seed{seed}", study.sft, f"reward_topic_seed{seed}", topic, seed,
                  priority=PRIORITY["topic"])
        for n in size["data_sizes"]:
            study.reward_model(f"reward_n{n}_seed{seed}", data_flags(files[n]), seed, priority=PRIORITY["data"])
            study.ppo(f"ppo_n{n}_seed{seed}", study.sft, f"reward_n{n}_seed{seed}", data_flags(files[n]), seed,
                      priority=PRIORITY["data"])
        study.reward_model(f"reward_brevity_seed{seed}", brevity, seed, after=study.futures["pairs_brevity"],
                           priority=PRIORITY["adapt"])
        study.ppo(f"ppo_adapt_seed{seed}", study.path(f"ppo_kl{KL_COEF}_seed{seed}"), f"reward_brevity_seed{seed}",
                  brevity, seed, after=[study.futures[f"ppo_kl{KL_COEF}_seed{seed}"]], priority=PRIORITY["adapt"])
        study.pairs(f"pairs_iterative1_seed{seed}", study.sft, size["iterative_pairs"], 1000 + seed,
                    "--reward_model_path", study.path(f"reward_seed{seed}"),
                    after=study.futures[f"reward_seed{seed}"], priority=PRIORITY["iterative"])

    tuning_file = study.path("claims_tuning.json")  # a resumed run does not evaluate the grid again
    if steps.resume and os.path.exists(tuning_file):
        with open(tuning_file) as f:
            setting, tuning = json.load(f)
    else:
        setting, tuning = tune_dpo(study, "reward_seed0")
        with open(tuning_file, "w") as f:
            json.dump([setting, tuning], f)
    print(f"DPO tuned: {setting}", flush=True)
    for seed in seeds:
        for beta in size["betas"]:
            study.dpo(f"dpo_beta{beta}_seed{seed}", study.sft, data, beta, seed, setting,
                      priority=PRIORITY["frontier" if beta == BETA else "kl"])
        for n in size["data_sizes"]:
            study.dpo(f"dpo_n{n}_seed{seed}", study.sft, data_flags(files[n]), BETA, seed, setting,
                      priority=PRIORITY["data"])
        study.dpo(f"dpo_topic_seed{seed}", study.sft, topic, BETA, seed, setting, priority=PRIORITY["topic"])
        study.dpo(f"dpo_adapt_seed{seed}", study.path(f"dpo_beta{BETA}_seed{seed}"), brevity, BETA, seed, setting,
                  after=[study.futures[f"dpo_beta{BETA}_seed{seed}"], study.futures["pairs_brevity"]],
                  priority=PRIORITY["adapt"])
        policy = study.sft
        for round_ in range(1, size["iterative_rounds"] + 1):
            pairs, name = f"pairs_iterative{round_}_seed{seed}", f"dpo_iterative{round_}_seed{seed}"
            if round_ > 1:
                study.pairs(pairs, policy, size["iterative_pairs"], 1000 * round_ + seed, "--reward_model_path",
                            study.path(f"reward_seed{seed}"),
                            after=study.futures[f"dpo_iterative{round_ - 1}_seed{seed}"],
                            priority=PRIORITY["iterative"])
            study.dpo(name, policy, data_flags(study.path(f"{pairs}.jsonl")), BETA, seed, setting,
                      after=study.futures[pairs], priority=PRIORITY["iterative"])
            policy = study.path(name)

    # evaluations, in the main process while the pool trains: a run's evaluation waits only for that run
    def evaluations(seed):
        yield "frontier", "SFT", "sft", [], 0, 0
        for beta in size["betas"]:
            yield "frontier", f"DPO beta={beta}", f"dpo_beta{beta}_seed{seed}", [f"dpo_beta{beta}_seed{seed}"], \
                all_pairs, 0
        for kl_coef in size["kl_coefs"]:
            yield "frontier", f"PPO kl={kl_coef}", f"ppo_kl{kl_coef}_seed{seed}", \
                [f"reward_seed{seed}", f"ppo_kl{kl_coef}_seed{seed}"], all_pairs, ppo_queries
        yield "frontier", "Preferred-FT", f"preferred_ft_seed{seed}", [f"preferred_ft_seed{seed}"], all_pairs, 0
        queries = 0
        for round_ in range(1, size["iterative_rounds"] + 1):
            queries += 2 * size["iterative_pairs"]  # the reward model scores both samples of every prompt
            yield "iterative", f"iterative DPO round {round_}", f"dpo_iterative{round_}_seed{seed}", \
                [f"reward_seed{seed}", *(f"{kind}_iterative{r}_seed{seed}" for r in range(1, round_ + 1)
                                         for kind in ("pairs", "dpo"))], all_pairs, queries
        for n in (*size["data_sizes"], all_pairs):
            dpo, ppo = (f"dpo_n{n}_seed{seed}", f"ppo_n{n}_seed{seed}") if n != all_pairs else (
                f"dpo_beta{BETA}_seed{seed}", f"ppo_kl{KL_COEF}_seed{seed}")
            reward = f"reward_n{n}_seed{seed}" if n != all_pairs else f"reward_seed{seed}"
            yield "data", "DPO", dpo, [dpo], n, 0
            yield "data", "RM + PPO", ppo, [reward, ppo], n, ppo_queries
        topic_pairs = count_pairs(files["topic"])
        yield "topic", "SFT", "sft", [], 0, 0
        yield "topic", "Preferred-FT", f"preferred_ft_topic_seed{seed}", [f"preferred_ft_topic_seed{seed}"], \
            topic_pairs, 0
        yield "topic", "DPO", f"dpo_topic_seed{seed}", [f"dpo_topic_seed{seed}"], topic_pairs, 0
        yield "topic", "RM + PPO", f"ppo_topic_seed{seed}", [f"reward_topic_seed{seed}", f"ppo_topic_seed{seed}"], \
            topic_pairs, ppo_queries
        brevity_pairs = lambda: count_pairs(study.path("pairs_brevity.jsonl"))  # noqa: E731 -- once it is written
        yield "adapt", "DPO before", f"dpo_beta{BETA}_seed{seed}", [], 0, 0
        yield "adapt", "DPO after", f"dpo_adapt_seed{seed}", [f"dpo_adapt_seed{seed}"], brevity_pairs, 0
        yield "adapt", "RM + PPO before", f"ppo_kl{KL_COEF}_seed{seed}", [], 0, 0
        yield "adapt", "RM + PPO after", f"ppo_adapt_seed{seed}", [f"reward_brevity_seed{seed}",
                                                                   f"ppo_adapt_seed{seed}"], brevity_pairs, ppo_queries

    def needs(item):
        _, (_, (_, _, name, needed, _, _)) = item
        return [study.futures[step] for step in {*needed, name}]

    pending = list(enumerate((seed, item) for seed in seeds for item in evaluations(seed)))
    while pending:  # whichever run is ready first; the rows keep the listed order
        ready = next((item for item in pending if all(future.done() for future in needs(item))), None)
        if ready is None:
            concurrent.futures.wait([f for item in pending for f in needs(item)],
                                    return_when=concurrent.futures.FIRST_COMPLETED)
            continue
        pending.remove(ready)
        index, (seed, (experiment, method, name, needed, pairs, queries)) = ready
        study.row(experiment, method, seed, name, needed, pairs, queries, order=index)
        save(sorted(study.rows, key=lambda row: row["order"]), setting, tuning, {})  # a report of what is done
    study.rows.sort(key=lambda row: row.pop("order"))
    kl_check = {}
    beta = min(size["betas"])
    for seed in seeds:  # the smallest beta, the least certain KL, with kl_check_prompts test prompts
        kl_check[seed] = (study.evaluate(f"dpo_beta{beta}_seed{seed}", seed),
                          study.evaluate(f"dpo_beta{beta}_seed{seed}", seed, num_prompts=size["kl_check_prompts"]))
    return study, setting, tuning, kl_check


# ------------------------------------------------------------------------------------------------ tables

def runs(rows, experiment, method, metric):
    return [row[metric] for row in sorted(rows, key=lambda row: row["seed"])
            if row["experiment"] == experiment and row["method"] == method]


def summary(rows, experiment, method, metric, digits=3):
    return plus_minus(*mean_interval(runs(rows, experiment, method, metric)), digits)


def difference(rows, a: tuple, b: tuple, metric="reward", digits=3):
    """a - b paired by seed; a and b are (experiment, method); bold when the interval excludes 0."""
    mean, half_width = difference_interval(runs(rows, *a, metric), runs(rows, *b, metric))
    text = plus_minus(mean, half_width, digits)
    return f"**{text}**" if half_width < abs(mean) else text


def methods_of(rows, experiment):
    return list(dict.fromkeys(row["method"] for row in rows if row["experiment"] == experiment))


def first(rows, experiment, method, key):
    return next(row[key] for row in rows if row["experiment"] == experiment and row["method"] == method)


def mean_of(rows, experiment, method, key):
    return statistics.fmean(runs(rows, experiment, method, key))


def table(header: list[str], lines: list[list]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "| --- |" + " ---: |" * (len(header) - 1),
            *("| " + " | ".join(map(str, line)) + " |" for line in lines)]


def budget_section(rows):
    header = ["method", "GT reward", "KL to SFT", "preference pairs", "reward queries", "reward-model tokens",
              "fwd+bwd tokens", "fwd-only tokens", "wall time (s)"]
    lines = [[m, summary(rows, e, m, "reward"), summary(rows, e, m, "kl", 2), f"{first(rows, e, m, 'pairs'):,}",
              f"{first(rows, e, m, 'reward_queries'):,}", f"{mean_of(rows, e, m, 'reward_model_tokens'):,.0f}",
              f"{mean_of(rows, e, m, 'train_tokens'):,.0f}", f"{mean_of(rows, e, m, 'forward_tokens'):,.0f}",
              f"{mean_of(rows, e, m, 'wall_s'):.0f}"]
             for e in ("frontier", "iterative") for m in methods_of(rows, e)]
    return ["## Frontier and budgets (claim 1; tuned DPO; iterative DPO)", "",
            "Tokens are the positions the runs' models processed, counted as they ran (padding included): "
            "fwd+bwd in training, fwd-only in generation and reference/reward scoring; reward-model tokens are "
            "the part spent training the reward model. Reward queries: learned-reward scores in training (PPO: "
            "the normalisation samples and one per episode; iterative DPO: two per labelled prompt). Iterative "
            "DPO's costs are cumulative over its rounds and include its reward model. Wall time: each run's own, "
            "with other runs and evaluations beside it; SFT's is shared by every method and not counted.", "",
            *table(header, lines), "", f"DPO beta={BETA} minus each other method, paired by seed:", "",
            *table(["other method", "GT reward", "KL"],
                   [[m, difference(rows, ("frontier", f"DPO beta={BETA}"), (e, m)),
                     difference(rows, ("frontier", f"DPO beta={BETA}"), (e, m), "kl", 2)]
                    for e in ("frontier", "iterative") for m in methods_of(rows, e) if m != f"DPO beta={BETA}"])]


def length_section(rows):
    header = ["method", "mean length (tokens)", "words", "distinct-2"]
    lines = [[m, summary(rows, "frontier", m, "length", 1), summary(rows, "frontier", m, "words", 1),
              summary(rows, "frontier", m, "distinct_2", 3)] for m in methods_of(rows, "frontier")]
    lines += [[m, summary(rows, "iterative", m, "length", 1), summary(rows, "iterative", m, "words", 1),
               summary(rows, "iterative", m, "distinct_2", 3)] for m in methods_of(rows, "iterative")]
    return ["## Length and diversity", "", "Completions' mean length (tokens, eos included; at most max_new_tokens) "
            "and words; distinct-2: distinct word bigrams over all bigrams of one evaluation's completions.", "",
            *table(header, lines)]


def reaches(rows, experiment, method, sizes):
    """The least N whose mean reward reaches TARGET_REWARD, and the least whose 95% interval lies above it."""
    mean_n = next((n for n in sizes if statistics.fmean(
        [r["reward"] for r in rows if r["experiment"] == experiment and r["method"] == method and r["pairs"] == n])
                   >= TARGET_REWARD), None)
    sure_n = next((n for n in sizes if (lambda m, h: m - (0 if math.isnan(h) else h))(*mean_interval(
        [r["reward"] for r in sorted(rows, key=lambda r: r["seed"])
         if r["experiment"] == experiment and r["method"] == method and r["pairs"] == n])) >= TARGET_REWARD), None)
    return mean_n, sure_n


def data_section(rows):
    sizes = sorted({row["pairs"] for row in rows if row["experiment"] == "data"})

    def at(method, n, metric):
        return [r[metric] for r in sorted(rows, key=lambda r: r["seed"])
                if r["experiment"] == "data" and r["method"] == method and r["pairs"] == n]

    header = ["pairs", "DPO reward", "DPO KL", "RM + PPO reward", "RM + PPO KL", "DPO - RM+PPO reward",
              "DPO fwd+bwd tokens", "RM + PPO fwd+bwd tokens", "DPO wall (s)", "RM + PPO wall (s)"]
    lines = []
    for n in sizes:
        diff, half = difference_interval(at("DPO", n, "reward"), at("RM + PPO", n, "reward"))
        text = plus_minus(diff, half, 3)
        lines.append([f"{n:,}", plus_minus(*mean_interval(at("DPO", n, "reward")), 3),
                      plus_minus(*mean_interval(at("DPO", n, "kl")), 2),
                      plus_minus(*mean_interval(at("RM + PPO", n, "reward")), 3),
                      plus_minus(*mean_interval(at("RM + PPO", n, "kl")), 2),
                      f"**{text}**" if half < abs(diff) else text,
                      f"{statistics.fmean(at('DPO', n, 'train_tokens')):,.0f}",
                      f"{statistics.fmean(at('RM + PPO', n, 'train_tokens')):,.0f}",
                      f"{statistics.fmean(at('DPO', n, 'wall_s')):.0f}",
                      f"{statistics.fmean(at('RM + PPO', n, 'wall_s')):.0f}"])
    lines_reach = []
    for method in ("DPO", "RM + PPO"):
        mean_n, sure_n = reaches(rows, "data", method, sizes)
        cheapest = next((n for n in sizes if n == mean_n), None)
        cost = ("–" if cheapest is None else
                f"{statistics.fmean(at(method, cheapest, 'train_tokens')):,.0f} fwd+bwd, "
                f"{statistics.fmean(at(method, cheapest, 'forward_tokens')):,.0f} fwd-only tokens, "
                f"{statistics.fmean(at(method, cheapest, 'wall_s')):.0f} s")
        lines_reach.append([method, "not reached" if mean_n is None else f"{mean_n:,}",
                            "not reached" if sure_n is None else f"{sure_n:,}", cost])
    return ["## Preference data and compute (claims 2 and 3)", "",
            f"DPO beta={BETA} and reward model + PPO kl_coef={KL_COEF} (the reward model trained on the same pairs: "
            f"the first N of the pairs file, 10% held out) with N pairs labelled. Tokens and wall time counted per "
            f"run (RM + PPO: both); the pairs' sampling is shared and not counted.", "", *table(header, lines), "",
            f"Least data (and the compute of that run) at which the mean ground-truth reward reaches "
            f"{TARGET_REWARD} (the interval: its 95% interval lies above {TARGET_REWARD}):", "",
            *table(["method", "pairs (mean)", "pairs (interval)", "compute at the least pairs (mean)"], lines_reach)]


def topic_section(rows):
    header = ["method", "topic rate", "topic-world reward", "sentiment reward", "KL to SFT",
              "topic rate - SFT's", "topic-world reward - SFT's"]
    lines = [[m, summary(rows, "topic", m, "topic_rate"), summary(rows, "topic", m, "topic_reward"),
              summary(rows, "topic", m, "reward"), summary(rows, "topic", m, "kl", 2),
              difference(rows, ("topic", m), ("topic", "SFT"), "topic_rate") if m != "SFT" else "",
              difference(rows, ("topic", m), ("topic", "SFT"), "topic_reward") if m != "SFT" else ""]
             for m in methods_of(rows, "topic")]
    extra = ["", "DPO minus Preferred-FT: topic rate " + difference(rows, ("topic", "DPO"), ("topic", "Preferred-FT"),
                                                                 "topic_rate")
             + ", topic-world reward " + difference(rows, ("topic", "DPO"), ("topic", "Preferred-FT"), "topic_reward")
             + "; DPO minus RM + PPO: topic rate " + difference(rows, ("topic", "DPO"), ("topic", "RM + PPO"),
                                                                "topic_rate")
             + ", topic-world reward " + difference(rows, ("topic", "DPO"), ("topic", "RM + PPO"), "topic_reward")
             + "."]
    return ["## Learning from bad examples (claim 4)", "",
            "The frontier's pairs relabelled by a ground truth that subtracts 1 from the sentiment of a completion "
            "that mentions the music (`toy_task.topic_penalised_reward`); topic rate: the fraction of completions "
            "that do. Preferred-FT sees only the chosen answers, DPO and the reward model both answers.", "",
            *table(header, lines), *extra]


def adapt_section(rows):
    header = ["method", "sentiment reward", "words (fewer: preferred)", "KL to SFT", "new pairs",
              "reward queries", "fwd+bwd tokens", "fwd-only tokens", "wall time (s)"]
    lines = [[m, summary(rows, "adapt", m, "reward"), summary(rows, "adapt", m, "words", 2),
              summary(rows, "adapt", m, "kl", 2), f"{first(rows, 'adapt', m, 'pairs'):,}",
              f"{first(rows, 'adapt', m, 'reward_queries'):,}", f"{mean_of(rows, 'adapt', m, 'train_tokens'):,.0f}",
              f"{mean_of(rows, 'adapt', m, 'forward_tokens'):,.0f}", f"{mean_of(rows, 'adapt', m, 'wall_s'):.0f}"]
             for m in methods_of(rows, "adapt")]
    changes = [f"{name}: words {difference(rows, ('adapt', f'{name} after'), ('adapt', f'{name} before'), 'words', 2)}"
               f", sentiment {difference(rows, ('adapt', f'{name} after'), ('adapt', f'{name} before'))}"
               for name in ("DPO", "RM + PPO")]
    return ["## Adapting to a new preference (claim 5)", "",
            f"New pairs sampled from SFT, labelled by a second preference: fewer words "
            f"(`toy_task.brevity_reward`). DPO continues from its beta={BETA} checkpoint on them (its reference: "
            f"that checkpoint); RLHF trains a new reward model on them and runs PPO again from its kl_coef={KL_COEF} "
            f"checkpoint. Costs are those of the change only.", "", *table(header, lines), "",
            "After minus before, paired by seed: " + "; ".join(changes) + "."]


def kl_section(rows, kl_check, size):
    beta = min(size["betas"])
    lines = []
    for seed, checks in kl_check.items():
        for evaluation, prompts in zip(checks, (size["eval_prompts"], size["kl_check_prompts"])):
            ratios, full = evaluation["log_ratios"], evaluation["full_kls"]
            top = sorted(ratios, reverse=True)[:max(1, len(ratios) // 100)]
            within = [1.96 * statistics.stdev(values) / math.sqrt(len(values)) for values in (ratios, full)]
            lines.append([seed, prompts, f"{statistics.fmean(ratios):.2f} ± {within[0]:.2f}",
                          f"{statistics.fmean(full):.2f} ± {within[1]:.2f}", f"{statistics.stdev(ratios):.2f}",
                          f"{statistics.stdev(full):.2f}", f"{max(ratios):.1f}",
                          f"{sum(top) / sum(ratios):.2f}" if sum(ratios) > 0 else "–"])
    spread = [[m, summary(rows, "frontier", m, "kl_sampled", 2), summary(rows, "frontier", m, "kl", 2)]
              for m in methods_of(rows, "frontier")]
    if kl_check:
        spread.append([f"DPO beta={beta}, {size['kl_check_prompts']} prompts",
                       *(plus_minus(*mean_interval([statistics.fmean(checks[1][key]) for checks in kl_check.values()]),
                                    2) for key in ("log_ratios", "full_kls"))])
    return ["## The KL estimate", "",
            f"DPO beta={beta}: each seed's checkpoint evaluated on its test prompts and on {size['kl_check_prompts']} "
            f"prompts. Sampled: the mean summed log-ratio of the sampled tokens; full: the mean summed exact "
            f"per-token KL on the same samples; ± 1.96 standard errors over that evaluation's samples (evaluation "
            f"noise only). Top 1%: the share of the summed log-ratio from the largest 1% of samples.", "",
            *table(["seed", "prompts", "sampled KL", "full KL", "sampled per-sample std", "full per-sample std",
                    "largest sample", "top-1% share"], lines), "",
            "Across seeds (mean ± 95% t-interval), both estimators on the same samples:", "",
            *table(["method", "sampled KL", "full KL"], spread)]


def saved_kl_check(logs: str, size: dict, seeds) -> dict:
    """The KL check's evaluations as far as the logs have them (the report of a run cut short)."""
    checks = {}
    for seed in seeds:
        files = [os.path.join(logs, f"eval_dpo_beta{min(size['betas'])}_seed{seed}{suffix}_seed{seed}.json")
                 for suffix in ("", "_num_prompts")]
        if all(map(os.path.exists, files)):
            checks[seed] = [json.load(open(file)) for file in files]
    return checks


def tuning_lines(tuning: list[dict], setting: dict, size: dict) -> list[str]:
    header = ["learning rate", "epochs", "objective", "learned reward (norm.)", "KL", "GT reward", "wall time (s)"]
    lines = []
    for row in tuning:
        mark = "**" if all(row[k] == v for k, v in setting.items()) else ""
        lines.append([f"{mark}{row['learning_rate']:g}{mark}", f"{mark}{row['num_train_epochs']}{mark}",
                      f"{mark}{row['objective']:.3f}{mark}", f"{row['learned_reward']:.3f}", f"{row['kl']:.2f}",
                      f"{row['gt_reward']:.3f}", f"{row['wall_s']:.0f}"])
    return [f"DPO beta={BETA} (seed 0) at each setting, evaluated on {size['eval_prompts']} validation prompts (prompt "
            f"seed {frontier.VALIDATION_PROMPT_SEED}). Objective, as PPO's tuning: the seed-0 reward model's score "
            f"normalised on SFT's samples minus {TUNING_KL_COEF} x KL (full estimator); the ground-truth (GT) column "
            f"is shown, not used. Bold: chosen.", "", *table(header, lines)]


def plot(rows, results_dir, title_suffix):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4.8))
    for experiment, family, marker in (("frontier", "DPO", "o"), ("frontier", "PPO", "s"),
                                       ("frontier", "Preferred-FT", "D"), ("iterative", "iterative", "v"),
                                       ("frontier", "SFT", "x")):
        points = []
        for method in methods_of(rows, experiment):
            if method.startswith(family):
                kl, reward = mean_interval(runs(rows, experiment, method, "kl")), mean_interval(
                    runs(rows, experiment, method, "reward"))
                points.append((kl[0], reward[0], kl[1], reward[1]))
        if points:
            points.sort()
            kl, reward, kl_error, reward_error = zip(*points)
            axes.errorbar(kl, reward, xerr=[0 if math.isnan(e) else e for e in kl_error],
                          yerr=[0 if math.isnan(e) else e for e in reward_error], marker=marker, capsize=3,
                          linestyle="-" if len(points) > 1 else "",
                          label={"DPO": "DPO (tuned)", "PPO": "RM + PPO", "iterative": "iterative DPO"}.get(family,
                                                                                                            family))
    axes.set_xlabel("KL(policy || SFT), nats per completion (full-distribution estimate)")
    axes.set_ylabel("mean ground-truth reward (VADER)")
    axes.set_title("Toy sentiment frontier, tuned DPO" + title_suffix)
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(os.path.join(results_dir, "claims_frontier.png"), dpi=120)

    if not any(row["experiment"] == "data" for row in rows):
        return
    figure, axes = plt.subplots(figsize=(6, 4.2))
    for method, marker in (("DPO", "o"), ("RM + PPO", "s")):
        sizes = sorted({r["pairs"] for r in rows if r["experiment"] == "data" and r["method"] == method})
        stats = [mean_interval([r["reward"] for r in rows if r["experiment"] == "data" and r["method"] == method
                                and r["pairs"] == n]) for n in sizes]
        axes.errorbar(sizes, [m for m, _ in stats], yerr=[0 if math.isnan(h) else h for _, h in stats],
                      marker=marker, capsize=3, label=method)
    axes.axhline(TARGET_REWARD, color="grey", linestyle=":", label=f"target {TARGET_REWARD}")
    axes.set_xscale("log")
    axes.set_xlabel("preference pairs labelled")
    axes.set_ylabel("mean ground-truth reward")
    axes.set_title(f"Reward against preference data (DPO beta={BETA}, PPO kl={KL_COEF})" + title_suffix,
                   fontsize=10)
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(os.path.join(results_dir, "claims_data.png"), dpi=120)


def complete(rows: list[dict], size: dict) -> list[dict]:
    """The rows of the seeds that have every method of their experiment (the report of a run cut short)."""
    expected = {"frontier": 2 + len(size["betas"]) + len(size["kl_coefs"]), "iterative": size["iterative_rounds"],
                "data": 2 * (len(size["data_sizes"]) + 1), "topic": 4, "adapt": 4}
    kept = []
    for (experiment, seed) in dict.fromkeys((row["experiment"], row["seed"]) for row in rows):
        seed_rows = [row for row in rows if row["experiment"] == experiment and row["seed"] == seed]
        if len(seed_rows) == expected[experiment]:
            kept += seed_rows
    return kept


def write_outputs(rows, setting, tuning, kl_check, args):
    size, results_dir = args.size, args.results_dir
    rows = complete([{key: value for key, value in row.items() if key != "order"} for row in rows], size)
    run = {row["experiment"] for row in rows}

    def section(experiment, title, make):
        if experiment in run:
            return make()
        return [f"## {title}", "", "Not run to the end (the study was cut short)."]

    os.makedirs(results_dir, exist_ok=True)
    frontier.write_csv(os.path.join(results_dir, "claims.csv"), rows)
    frontier.write_csv(os.path.join(results_dir, "dpo_tuning.csv"), tuning)
    with open(os.path.join(results_dir, "dpo_tuning.md"), "w") as f:
        f.write("\n".join(tuning_lines(tuning, setting, size)) + "\n")
    seeds = args.seeds
    lines = [f"# The DPO paper's claims at toy scale{' (--quick)' if args.quick else ''}", "",
             f"`experiments/claims.py{' --quick' if args.quick else ''}`. Mean over {seeds} seed{'s' if seeds > 1 else ''}"
             + (" ± the half-width of its 95% t-interval" if seeds > 1 else " (no interval from one seed)")
             + f"; {size['eval_prompts']} test prompts per evaluation; differences paired by seed (bold: the interval "
               f"excludes 0). KL: the full-distribution estimate (see the KL section).", "",
             "## DPO's tuning", "", f"Chosen: learning rate {setting['learning_rate']:g}, "
             f"{setting['num_train_epochs']} epoch(s).", "", *tuning_lines(tuning, setting, size), "",
             *section("frontier", "Frontier and budgets", lambda: budget_section(rows)), "",
             *section("data", "Preference data and compute", lambda: data_section(rows)), "",
             *section("topic", "Learning from bad examples", lambda: topic_section(rows)), "",
             *section("adapt", "Adapting to a new preference", lambda: adapt_section(rows)), "",
             *section("frontier", "Length and diversity", lambda: length_section(rows)), "",
             *section("frontier", "The KL estimate", lambda: kl_section(rows, kl_check, size))]
    with open(os.path.join(results_dir, "claims.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    plot(rows, results_dir, " (--quick)" if args.quick else "")
    print("\n".join(lines))
    print(f"wrote {results_dir}/claims.md, claims.csv, dpo_tuning.md, dpo_tuning.csv, claims_frontier.png, "
          f"claims_data.png")


def main():
    args = parse()
    os.environ.setdefault("TQDM_DISABLE", "1")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    out = os.path.abspath(args.output_dir)
    os.makedirs(os.path.join(out, "logs"), exist_ok=True)
    saved = os.path.join(out, "claims_runs.json")  # what the tables are made of
    if args.report_only:
        with open(saved) as f:
            runs = json.load(f)
        kl_check = ({int(seed): checks for seed, checks in runs["kl_check"].items()} or
                    saved_kl_check(os.path.join(out, "logs"), args.size, range(args.seeds)))
        write_outputs(runs["rows"], runs["setting"], runs["tuning"], kl_check, args)
        return
    start = time.perf_counter()

    def save(rows, setting, tuning, kl_check):
        with open(saved, "w") as f:
            json.dump({"rows": rows, "setting": setting, "tuning": tuning, "kl_check": kl_check,
                       "seconds": time.perf_counter() - start}, f)

    steps = frontier.Steps(args.jobs, os.path.join(out, "logs"), resume=args.resume)
    if args.jobs > 1:  # this process evaluates beside the pool's runs: its share of the cores
        import torch

        torch.set_num_threads(max(1, (os.cpu_count() or 1) // args.jobs))
    try:
        study, setting, tuning, kl_check = run_study(args.size, range(args.seeds), out, steps, save)
    except RuntimeError as error:  # a step failed: its log says why
        steps.pool.shutdown(cancel_futures=True)
        sys.exit(str(error))
    except BaseException:  # our bug, or Ctrl-C: start nothing more (running steps finish)
        steps.pool.shutdown(cancel_futures=True)
        raise
    save(study.rows, setting, tuning, kl_check)
    write_outputs(study.rows, setting, tuning, kl_check, args)
    print(f"total: {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
