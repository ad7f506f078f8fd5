"""The DPO paper's controlled-sentiment study (its Figure 2) at toy scale: reward vs KL frontier.

    .venv/bin/python experiments/frontier.py --jobs 2     # default sizes, 3 seeds: 27 minutes on 2 CPU cores
    .venv/bin/python experiments/frontier.py --quick      # reduced sizes, 1 seed, ~1.5 minutes (the tests use it)
    .venv/bin/python experiments/frontier.py --tune_ppo --jobs 2   # PPO's learning rate x epochs: ~5 minutes

SFT on the toy corpus; preference pairs sampled from the SFT policy for toy prompts and labelled by the ground truth
(VADER). The SFT policy and the pairs are shared by every run; then, for each of --seeds seeds: DPO at several beta,
a reward model, PPO against it at several KL coefficients, PPO-GT (PPO on the ground-truth reward) at the same
coefficients and episodes, Preferred-FT (SFT on the chosen completions) and best-of-N sampling from SFT under the
learned reward. The seed sets each run's training (data order, rollouts, the reward model's) and its evaluation
samples. Every policy is evaluated by eval_policy.py on held-out test prompts: mean ground-truth reward (y) against
KL to the SFT policy (x). Each point is the mean over seeds with a 95% t-interval; DPO and PPO are also evaluated
at 1/16, 1/8, 1/4 and 1/2 of their optimizer steps (frontier_curves.csv), and frontier.png draws each run's path
from SFT through them to its end point (error bars). Writes frontier.png,
frontier.csv (mean and interval half-width per method), frontier_seeds.csv (every run) and frontier.md (the table
with each method's budget: preference pairs, reward queries, estimated forward/backward tokens, wall time; and the
differences between methods, with intervals paired by seed) to --output_dir.

--tune_ppo trains PPO against the seed-0 reward model for each learning rate and number of PPO epochs in TUNING_GRID
at the middle KL coefficient and evaluates it on validation prompts (not the test prompts); it picks the setting with
the highest KL-regularised objective that PPO maximises, measured with the learned reward (no ground truth), and
writes ppo_tuning.csv and ppo_tuning.md. The chosen values go in configs/ppo_toy.yaml by hand.
"""

import argparse
import concurrent.futures
import contextlib
import csv
import importlib
import itertools
import json
import logging
import math
import os
import queue
import statistics
import subprocess
import sys
import threading
import time
import traceback

import yaml

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from token_count import TokenCounter  # noqa: E402 -- beside this file

SIZES = {  # default / --quick
    "preset": ("mixtral-toy", "mixtral-toy"),
    "sft_reviews": (4000, 1000),
    "pairs": (2000, 512),
    "betas": ((0.05, 0.1, 0.5, 2.0), (0.1, 1.0)),
    "kl_coefs": ((0.1, 0.3, 1.0), (0.1,)),
    "ppo_episodes": (1024, 128),
    "ppo_batch": ((16, 4), (8, 2)),  # per_device_train_batch_size, gradient_accumulation_steps
    "eval_prompts": (256, 64),
    "best_of_n": (16, 4),
    "max_new_tokens": (32, 16),
    "seeds": (3, 1),
}
TUNING_GRID = {"learning_rate": (1e-4, 3e-4, 1e-3, 3e-3), "num_ppo_epochs": (2, 4)}
FRACTIONS = (1 / 16, 1 / 8, 1 / 4, 1 / 2)  # DPO and PPO checkpoints along training, and the end: the curves
VALIDATION_PROMPT_SEED = 20_000  # the test prompts are eval_policy's default prompt_seed (10,000)
PPO_CONFIG = os.path.join(REPO, "configs", "ppo_toy.yaml")
DATA_FLAGS = ("--eval_fraction", "0.1", "--max_length", "128")


def parse():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="reduced sizes and 1 seed (a few minutes)")
    parser.add_argument("--seeds", type=int, help="seeds per method (default 3; --quick: 1)")
    parser.add_argument("--tune_ppo", action="store_true", help="run PPO's tuning grid instead of the study")
    parser.add_argument("--jobs", type=int, default=1,
                        help="training runs at once, each with cores / jobs threads (evaluations run one at a time)")
    parser.add_argument("--output_dir", default="outputs/frontier")
    args = parser.parse_args()
    args.size = {key: value[1 if args.quick else 0] for key, value in SIZES.items()}
    args.seeds = args.seeds or args.size["seeds"]
    if args.seeds < 1:
        parser.error("--seeds must be at least 1")
    return args


class PriorityPool:
    """Worker threads that run the queued call with the lowest priority number first (in submission order among
    equals): a step whose inputs became ready late still runs before less important ones queued earlier."""

    def __init__(self, workers: int):
        self.queue, self.order = queue.PriorityQueue(), itertools.count()
        for _ in range(workers):
            threading.Thread(target=self.work, daemon=True).start()

    def submit(self, priority: int, fn, *args) -> concurrent.futures.Future:
        future = concurrent.futures.Future()
        self.queue.put((priority, next(self.order), future, fn, args))
        return future

    def work(self):
        while True:
            _, _, future, fn, args = self.queue.get()
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn(*args))
            except BaseException as error:  # noqa: BLE001 -- the future carries it to whoever waits
                future.set_exception(error)

    def shutdown(self, cancel_futures: bool = True):
        """Cancel what has not started (running steps finish; their processes outlive this one)."""
        while cancel_futures and not self.queue.empty():
            self.queue.get_nowait()[2].cancel()


class Steps:
    """Our scripts' runs, each with its output in <log_dir>/<step>.log and the token positions its models processed
    (experiments/token_count.py) in <log_dir>/<step>.tokens.json. With jobs > 1, up to `jobs` processes at once;
    with one job, each script's main(argv) in this process, one after the other: a process would add nothing but its
    imports (~7 s a run)."""

    def __init__(self, jobs: int, log_dir: str, resume: bool = False):
        self.log_dir, self.pool, self.in_process = log_dir, PriorityPool(jobs), jobs == 1
        self.resume = resume  # a step that finished in an earlier run with the same log_dir is not run again
        self.env = dict(os.environ)
        self.lock = threading.Lock()
        if jobs > 1:  # share the cores instead of oversubscribing them
            self.env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // jobs))

    def run(self, step: str, script: str, *flags) -> float:
        """Wall seconds of the step."""
        done_file = os.path.join(self.log_dir, f"{step}.done")  # its wall seconds, once it succeeded
        if self.resume and os.path.exists(done_file):
            with open(done_file) as f:
                return float(f.read())
        start = time.perf_counter()
        counts_file = os.path.join(self.log_dir, f"{step}.tokens.json")
        with open(os.path.join(self.log_dir, f"{step}.log"), "w") as log:
            if self.in_process:
                with TokenCounter() as counter:
                    succeeded = run_main(script, [str(flag) for flag in flags], log)
                with open(counts_file, "w") as f:
                    json.dump(counter.counts, f)
            else:
                command = [sys.executable, os.path.join(REPO, "experiments", "token_count.py"), counts_file,
                           os.path.join(REPO, script), *map(str, flags)]
                succeeded = subprocess.run(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                                           env=self.env).returncode == 0
        seconds = time.perf_counter() - start
        if not succeeded:
            raise RuntimeError(f"{step} failed; see {self.log_dir}/{step}.log")
        with open(done_file, "w") as f:
            f.write(str(seconds))
        print(f"{step}: {seconds:.0f} s", flush=True)
        return seconds

    def tokens(self, step: str) -> dict:
        """{"forward_backward": positions, "forward": positions} that the step's models processed."""
        with open(os.path.join(self.log_dir, f"{step}.tokens.json")) as f:
            return json.load(f)

    def submit(self, step: str, script: str, *flags, after=(), priority: int = 0) -> concurrent.futures.Future:
        """`run` in the pool once the steps in `after` (futures, or one) have succeeded: a step waiting for others
        holds no worker; among ready steps the lowest `priority` first. In process, the step runs now, in the main
        thread (where the scripts' signal handlers must be installed), after the steps it needs, which have run
        already."""
        after = [after] if isinstance(after, concurrent.futures.Future) else list(after)
        if self.in_process:
            for needed in after:
                needed.result()
            future = concurrent.futures.Future()
            future.set_result(self.run(step, script, *flags))
            return future
        future, started = concurrent.futures.Future(), []

        def start(_=None):
            with self.lock:
                if started or not all(needed.done() for needed in after):
                    return
                started.append(True)
            failed = next((needed.exception() for needed in after if needed.exception()), None)
            if failed is not None:
                future.set_exception(failed)
                return
            inner = self.pool.submit(priority, self.run, step, script, *flags)
            inner.add_done_callback(lambda done: future.set_exception(done.exception()) if done.exception()
                                    else future.set_result(done.result()))

        for needed in after:
            needed.add_done_callback(start)
        start()
        return future


def run_main(script: str, argv: list[str], log) -> bool:
    """`script`'s main(argv) in this process with its output in `log`; whether it succeeded (a failure's traceback
    goes to the log, as a failed process's would)."""
    module = importlib.import_module(os.path.splitext(script)[0])
    try:
        with contextlib.chdir(REPO), contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
            try:
                module.main(argv)
                return True
            except (Exception, SystemExit):  # noqa: BLE001 -- reported like a failed process's exit
                traceback.print_exc(file=log)
                return False
    finally:  # the script's log handler writes to `log`, closed next: a new one on the real stderr
        logging.basicConfig(force=True)


# ------------------------------------------------------------------------------------------------ statistics

# Two-sided 95% quantiles of Student's t by degrees of freedom (scipy is not a dependency; the standard library has
# only the normal distribution, used beyond 30).
T_975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
         2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def t_975(degrees_of_freedom: int) -> float:
    return T_975[degrees_of_freedom - 1] if degrees_of_freedom <= len(T_975) else statistics.NormalDist().inv_cdf(0.975)


def mean_interval(values: list[float]) -> tuple[float, float]:
    """Mean and the half-width of its 95% t-interval over independent runs (nan for a single run, or a metric a
    method does not have)."""
    mean = statistics.fmean(values)
    if len(values) < 2 or math.isnan(mean):
        return mean, math.nan
    return mean, t_975(len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values))


def difference_interval(a: list[float], b: list[float]) -> tuple[float, float]:
    """mean(a - b) over seeds and the half-width of its 95% t-interval, a[i] and b[i] being runs with seed i.

    Paired by seed: a seed's evaluations sample every method with the same random numbers on the same prompts, so
    what sampling adds to both rewards (spreading SFT's mean reward over ~0.1 between seeds) mostly cancels in their
    difference. The pairs are independent across seeds, so the interval holds however correlated a and b are."""
    if len(a) != len(b):
        raise ValueError(f"paired runs needed: {len(a)} and {len(b)} seeds")
    return mean_interval([x - y for x, y in zip(a, b)])


# ------------------------------------------------------------------------------------------------ the study

def pair_token_counts(pairs_file: str, sft_dir: str) -> dict:
    """Pairs labelled, and token totals of the pairs trained on (the train split), for the budgets."""
    from utils.cli import parse_args
    from utils.data import DataArguments, load_preference_data
    from utils.modeling import ModelArguments, load_tokenizer

    (data_args,) = parse_args((DataArguments,), data_flags(pairs_file))  # as the runs read them
    splits = load_preference_data(data_args, load_tokenizer(ModelArguments(model_name_or_path=sft_dir)))
    train = splits["train"]
    return {"pairs": sum(map(len, splits.values())), "train_pairs": len(train),
            "prompt": sum(map(len, train["prompt_input_ids"])), "chosen": sum(map(len, train["chosen_input_ids"])),
            "rejected": sum(map(len, train["rejected_input_ids"]))}


def best_of_n(sft_dir: str, reward_dir: str, size: dict, seed: int) -> dict:
    """Sample N completions per held-out prompt from SFT, keep the one the learned reward likes best."""
    import torch

    from eval_policy import EvalArguments, make_judge
    from utils import toy_task
    from utils.generation import sample_completions
    from utils.modeling import ModelArguments, load_model, load_tokenizer

    tokenizer = load_tokenizer(ModelArguments(model_name_or_path=sft_dir))
    policy = load_model(ModelArguments(model_name_or_path=sft_dir), tokenizer)
    judge = make_judge(reward_dir)
    prompts = toy_task.make_prompts(size["eval_prompts"], seed=EvalArguments.prompt_seed)
    torch.manual_seed(seed)
    candidates = [sample_completions(policy, tokenizer, prompts, max_new_tokens=size["max_new_tokens"])
                  for _ in range(size["best_of_n"])]
    scores = [judge(prompts, texts) for texts in candidates]
    best = [max(range(len(candidates)), key=lambda k: scores[k][i]) for i in range(len(prompts))]
    chosen = [candidates[k][i] for i, k in enumerate(best)]
    n = size["best_of_n"]
    rewards = toy_task.ground_truth_reward(chosen)
    # KL of best-of-n to its base policy, the standard analytic value (Stiennon et al. 2020)
    return {"mean_reward": statistics.fmean(rewards), "kl": math.log(n) - (n - 1) / n, "win_rate": math.nan,
            "reward_queries": n * len(prompts), "tokens": n * len(prompts) * size["max_new_tokens"]}


def eval_arguments(policy: str, reference: str, size: dict, seed: int, **overrides):
    """eval_policy's arguments for the study's evaluations: `size`'s prompts and lengths, the seed's samples, no
    held-out pairs; `overrides` last."""
    from eval_policy import EvalArguments

    return EvalArguments(**{**dict(policy_path=policy, reference_path=reference, sample_seed=seed, num_eval_pairs=0,
                                   num_prompts=size["eval_prompts"], max_new_tokens=size["max_new_tokens"]),
                            **overrides})


def evaluation(policy: str, reference: str, size: dict, logs: str, seed: int, **overrides) -> dict:
    """eval_policy's results for `policy` on the test prompts (or as `overrides` say), also written to the logs."""
    from eval_policy import evaluate_policy

    results = evaluate_policy(eval_arguments(policy, reference, size, seed, **overrides))
    name = os.path.basename(policy) + "".join(f"_{key}" for key in overrides)  # e.g. _judge_prompt_seed
    with open(os.path.join(logs, f"eval_{name}_seed{seed}.json"), "w") as f:
        json.dump(results, f, indent=2)
    return results


def evaluate(policy: str, reference: str, size: dict, logs: str, seed: int, **overrides) -> dict:
    results = evaluation(policy, reference, size, logs, seed, **overrides)
    return {"mean_reward": results["mean_reward"], "kl": results["kl"], "win_rate": results["win_rate"]}


def prepare(size: dict, out: str, steps: Steps) -> dict:
    """The SFT policy and the preference pairs that every run shares."""
    sft, pairs_file = os.path.join(out, "sft"), os.path.join(out, "pairs.jsonl")
    sft_seconds = steps.run("sft", "train_sft.py", "configs/sft_toy.yaml", "--model_name_or_path", size["preset"],
                            "--toy_num_reviews", size["sft_reviews"], "--output_dir", sft)
    steps.run("pairs", "make_toy_pairs.py", "--source", "policy", "--model_name_or_path", sft, "--num_pairs",
              size["pairs"], "--max_new_tokens", size["max_new_tokens"], "--output_file", pairs_file)
    return {"sft": sft, "sft_seconds": sft_seconds, "pairs_file": pairs_file, "data": data_flags(pairs_file),
            "tokens": pair_token_counts(pairs_file, sft)}


def ppo_flags(size: dict) -> list:
    return ["--total_episodes", size["ppo_episodes"], "--response_length", size["max_new_tokens"],
            "--per_device_train_batch_size", size["ppo_batch"][0],
            "--gradient_accumulation_steps", size["ppo_batch"][1]]


def data_flags(pairs_file: str) -> list:
    return ["--dataset_name", pairs_file, *DATA_FLAGS]


# One training step each, into <out>/<name>, from the policy `init`, on `data` (data_flags); extra flags go last, so
# they override the config's and these.
def submit_dpo(steps: Steps, name: str, out: str, init: str, data: list, beta: float, seed: int, *flags, after=(),
               priority: int = 0):
    return steps.submit(name, "train_dpo.py", "configs/dpo_toy.yaml", "--model_name_or_path", init, "--beta", beta,
                        "--seed", seed, "--output_dir", os.path.join(out, name), "--toy_reward_prompts", 0,
                        "--eval_strategy", "no", "--ref_logps_cache_dir", os.path.join(out, "ref_cache"), *data,
                        *flags, after=after, priority=priority)


def submit_ppo(steps: Steps, name: str, out: str, init: str, reward: str, data: list, kl_coef: float, seed: int,
               size: dict, *flags, after=(), priority: int = 0):
    return steps.submit(name, "train_ppo.py", PPO_CONFIG, "--model_name_or_path", init, "--reward_model_path",
                        reward, "--kl_coef", kl_coef, "--seed", seed, *ppo_flags(size), "--output_dir",
                        os.path.join(out, name), *data, *flags, after=after, priority=priority)


def submit_reward_model(steps: Steps, name: str, out: str, init: str, data: list, seed: int, after=(),
                        priority: int = 0):
    return steps.submit(name, "train_reward.py", "configs/reward_toy.yaml", "--model_name_or_path", init, "--seed",
                        seed, "--output_dir", os.path.join(out, name), *data, after=after, priority=priority)


def submit_preferred_ft(steps: Steps, name: str, out: str, init: str, data: list, seed: int, after=(),
                        priority: int = 0):
    """SFT on the chosen completions of the pairs (train_sft.py on preference data)."""
    return steps.submit(name, "train_sft.py", "--model_name_or_path", init, "--output_dir", os.path.join(out, name),
                        "--num_train_epochs", 1, "--learning_rate", 5e-4, "--seed", seed, *data, after=after,
                        priority=priority)


def ppo_budget(size: dict, tokens: dict) -> tuple[float, int]:
    """PPO's estimated forward/backward tokens and its reward queries: the normalisation samples, then per episode
    generation, reference, reward and value forwards and num_ppo_epochs policy+value forward+backward passes."""
    with open(PPO_CONFIG) as f:
        ppo_config = yaml.safe_load(f)
    normalization_samples = min(ppo_config.get("reward_normalization_samples", 0), tokens["train_pairs"])
    sequence = tokens["prompt"] / tokens["train_pairs"] + size["max_new_tokens"]
    ppo_tokens = sequence * (2 * normalization_samples + (4 + 2 * ppo_config["num_ppo_epochs"]) * size["ppo_episodes"])
    return ppo_tokens, normalization_samples + size["ppo_episodes"]


def submit_seed(seed: int, shared: dict, size: dict, out: str, steps: Steps) -> dict:
    """Every method's training with one seed, submitted to the pool. Returns the reward model (path, future) and,
    per method, (checkpoint, future of wall seconds, tokens, preference pairs, reward queries)."""
    sft, data, tokens = shared["sft"], shared["data"], shared["tokens"]
    pair_tokens = 2 * tokens["prompt"] + tokens["chosen"] + tokens["rejected"]
    ppo_tokens, ppo_queries = ppo_budget(size, tokens)
    methods = {}

    reward_future = submit_reward_model(steps, f"reward_seed{seed}", out, sft, data, seed)  # first: PPO needs it
    reward = os.path.join(out, f"reward_seed{seed}")
    for beta in size["betas"]:
        name = f"dpo_beta{beta}_seed{seed}"
        future = submit_dpo(steps, name, out, sft, data, beta, seed, "--save_at_fractions", *FRACTIONS)
        # 2 epochs of forward+backward on every pair, plus one reference forward
        methods[f"DPO beta={beta}"] = (os.path.join(out, name), future, 3 * pair_tokens, tokens["pairs"], 0)

    name = f"preferred_ft_seed{seed}"
    future = submit_preferred_ft(steps, name, out, sft, data, seed)
    methods["Preferred-FT"] = (os.path.join(out, name), future, tokens["prompt"] + tokens["chosen"], tokens["pairs"],
                               0)

    reward_tokens = 2 * pair_tokens  # 2 epochs over both sides of every pair
    for kl_coef in size["kl_coefs"]:
        for method, reward_path, prefix in ((f"PPO kl={kl_coef}", reward, "ppo"),
                                            (f"PPO-GT kl={kl_coef}", "ground_truth", "ppo_gt")):
            name = f"{prefix}_kl{kl_coef}_seed{seed}"
            learned = reward_path == reward  # reward model + PPO also pays for the reward model and uses the pairs
            future = submit_ppo(steps, name, out, sft, reward_path, data, kl_coef, seed, size, "--save_at_fractions",
                                *FRACTIONS,
                                after=[reward_future] if learned else [])
            methods[method] = (os.path.join(out, name), future, reward_tokens * learned + ppo_tokens,
                               tokens["pairs"] * learned, ppo_queries)
    return {"reward": (reward, reward_future), "reward_tokens": reward_tokens, "methods": methods}


def trajectory(method: str, run: str, sft: str, size: dict, seed: int) -> list[dict]:
    """A run's checkpoints along training (checkpoint-<step>, from --save_at_fractions), each evaluated as `evaluate`
    does, without the win rate: the curve that leads to the run's end point."""
    from eval_policy import evaluate_policy
    from utils.checkpointing import checkpoints

    rows = []
    for checkpoint in reversed(checkpoints(run)):  # oldest first
        results = evaluate_policy(eval_arguments(checkpoint, sft, size, seed, sample_reference=False))
        rows.append({"method": method, "seed": seed, "step": int(checkpoint.rsplit("-", 1)[1]),
                     "mean_reward": results["mean_reward"], "kl": results["kl"]})
    return rows


def evaluate_seed(seed: int, submitted: dict, shared: dict, size: dict, logs: str) -> list[dict]:
    """Every method of one seed evaluated on the test prompts (with that seed's samples): one row per method, and
    DPO's and PPO's checkpoints along training (rows with a `step`)."""
    sft, pairs = shared["sft"], shared["tokens"]["pairs"]
    reward, reward_future = submitted["reward"]
    reward_seconds = reward_future.result()
    rows = [{"method": "SFT", "seed": seed, **evaluate(sft, sft, size, logs, seed), "wall_s": shared["sft_seconds"],
             "tokens": 0, "pairs": 0, "reward_queries": 0}]
    for method, (path, future, method_tokens, method_pairs, queries) in submitted["methods"].items():
        seconds = future.result() + (reward_seconds if method.startswith("PPO kl") else 0)
        rows.append({"method": method, "seed": seed, **evaluate(path, sft, size, logs, seed), "wall_s": seconds,
                     "tokens": int(method_tokens), "pairs": method_pairs, "reward_queries": queries})
        print(f"{method} seed {seed}: reward {rows[-1]['mean_reward']:.3f}, KL {rows[-1]['kl']:.2f}", flush=True)
        if method.startswith(("DPO", "PPO")):
            rows += trajectory(method, path, sft, size, seed)
    start = time.perf_counter()
    bon = best_of_n(sft, reward, size, seed)
    rows.append({"method": f"Best-of-{size['best_of_n']}", "seed": seed, "mean_reward": bon["mean_reward"],
                 "kl": bon["kl"], "win_rate": bon["win_rate"], "wall_s": reward_seconds + time.perf_counter() - start,
                 "tokens": int(submitted["reward_tokens"] + bon["tokens"]), "pairs": pairs,
                 "reward_queries": bon["reward_queries"]})
    return rows


def summarize(rows: list[dict]) -> list[dict]:
    """One row per method (in first-seen order): mean and 95% half-width of reward, KL and win rate over seeds."""
    methods = list(dict.fromkeys(row["method"] for row in rows))
    summary = []
    for method in methods:
        runs = [row for row in rows if row["method"] == method]
        entry = {"method": method, "seeds": len(runs)}
        for metric in ("mean_reward", "kl", "win_rate"):
            entry[metric], entry[f"{metric}_ci95"] = mean_interval([row[metric] for row in runs])
        entry["wall_s"] = statistics.fmean(row["wall_s"] for row in runs)
        for budget in ("tokens", "pairs", "reward_queries"):
            entry[budget] = runs[0][budget]
        summary.append(entry)
    return summary


def plus_minus(mean: float, half_width: float, digits: int) -> str:
    if math.isnan(mean):
        return "–"
    return f"{mean:.{digits}f}" + ("" if math.isnan(half_width) else f" ± {half_width:.{digits}f}")


def comparisons(rows: list[dict], size: dict) -> list[str]:
    """Markdown: reward differences between methods, each with its 95% interval (paired by seed)."""
    def values(method, metric="mean_reward"):
        return [row[metric] for row in sorted(rows, key=lambda row: row["seed"]) if row["method"] == method]

    def cell(a, b):
        difference, half_width = difference_interval(values(a), values(b))
        text = plus_minus(difference, half_width, 3)
        return f"**{text}**" if half_width < abs(difference) else text  # bold: the interval excludes 0

    dpo = [f"DPO beta={beta}" for beta in size["betas"]]
    others = ["SFT", "Preferred-FT", *(f"{m} kl={c}" for m in ("PPO", "PPO-GT") for c in size["kl_coefs"]),
              f"Best-of-{size['best_of_n']}"]
    lines = ["", "Mean ground-truth reward of the row's method minus the column's, with the 95% t-interval of the "
                 "per-seed differences (bold: it excludes 0). KL to SFT, for reading each difference at its KL budget:",
             "", "| | " + " | ".join(f"{m} (KL {statistics.fmean(values(m, 'kl')):.2f})" for m in others) + " |",
             "| --- |" + " ---: |" * len(others)]
    lines += [f"| {a} (KL {statistics.fmean(values(a, 'kl')):.2f}) | " + " | ".join(cell(a, b) for b in others)
              + " |" for a in dpo]
    lines += ["", "PPO on the ground truth minus PPO on the learned reward, same KL coefficient: reward "
                  "and KL differences:", "", "| kl_coef | reward | KL |", "| --- | ---: | ---: |"]
    for kl_coef in size["kl_coefs"]:
        gt, rm = f"PPO-GT kl={kl_coef}", f"PPO kl={kl_coef}"
        kl_difference = difference_interval(values(gt, "kl"), values(rm, "kl"))
        lines.append(f"| {kl_coef} | {cell(gt, rm)} | {plus_minus(*kl_difference, 2)} |")
    return lines


def write_csv(path: str, rows: list[dict]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(dict.fromkeys(key for row in rows for key in row)))
        writer.writeheader()
        writer.writerows(rows)


def write_outputs(rows: list[dict], out: str, args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = [row for row in rows if "step" in row]
    rows = [row for row in rows if "step" not in row]
    summary = summarize(rows)
    write_csv(os.path.join(out, "frontier_curves.csv"), curves)
    write_csv(os.path.join(out, "frontier_seeds.csv"), rows)
    write_csv(os.path.join(out, "frontier.csv"), summary)
    seeds = summary[0]["seeds"]
    lines = [f"Mean over {seeds} seed{'s' if seeds > 1 else ''}" + (" ± the half-width of its 95% t-interval"
                                                                     if seeds > 1 else " (no interval from one seed)")
             + f"; {args.size['eval_prompts']} test prompts per evaluation.", "",
             "| method | mean GT reward | KL to SFT (nats) | win rate vs SFT | preference pairs | reward queries "
             "| fwd/bwd tokens (est.) | wall time (s) |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in summary:
        lines.append(f"| {r['method']} | {plus_minus(r['mean_reward'], r['mean_reward_ci95'], 3)} | "
                     f"{plus_minus(r['kl'], r['kl_ci95'], 2)} | {plus_minus(r['win_rate'], r['win_rate_ci95'], 2)} | "
                     f"{r['pairs']:,} | {r['reward_queries']:,} | {r['tokens']:,} | {r['wall_s']:.0f} |")
    if seeds > 1:
        lines += comparisons(rows, args.size)
    with open(os.path.join(out, "frontier.md"), "w") as f:
        f.write("\n".join(lines) + "\n")

    paths = {}  # method -> its mean (KL, reward) over seeds at each checkpoint along training, in step order
    for method, step in sorted({(c["method"], c["step"]) for c in curves}):
        at_step = [c for c in curves if c["method"] == method and c["step"] == step]
        paths.setdefault(method, []).append(tuple(statistics.fmean(c[key] for c in at_step)
                                                  for key in ("kl", "mean_reward")))
    figure, axes = plt.subplots(figsize=(7, 4.8))
    sft = next(r for r in summary if r["method"] == "SFT")
    for family, marker in (("DPO", "o"), ("PPO kl", "s"), ("PPO-GT", "^"), ("Preferred-FT", "D"), ("Best-of", "*"),
                           ("SFT", "x")):
        points = sorted((r["kl"], r["mean_reward"], r["kl_ci95"], r["mean_reward_ci95"]) for r in summary
                        if r["method"].startswith(family))
        if not points:
            continue
        kl, reward, kl_error, reward_error = zip(*points)
        markers = axes.errorbar(kl, reward, xerr=[0 if math.isnan(e) else e for e in kl_error],
                                yerr=[0 if math.isnan(e) else e for e in reward_error], marker=marker, capsize=3,
                                linestyle="", label=family.replace(" kl", ""))
        for r in summary:  # each end point's path along training: SFT, its checkpoints, the end
            if r["method"].startswith(family) and r["method"] in paths:
                axes.plot(*zip((sft["kl"], sft["mean_reward"]), *paths[r["method"]], (r["kl"], r["mean_reward"])),
                          color=markers[0].get_color(), alpha=0.5, linewidth=1)
    axes.set_xlabel("KL(policy || SFT), nats per completion")
    axes.set_ylabel("mean ground-truth reward (VADER)")
    axes.set_title("Toy sentiment frontier" + (" (--quick)" if args.quick else "")
                   + (f": mean of {seeds} seeds, 95% intervals" if seeds > 1 else "")
                   + "; lines: each run along training", fontsize=10)
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(os.path.join(out, "frontier.png"), dpi=120)
    print("\n".join(lines))
    print(f"wrote {out}/frontier.png, frontier.csv, frontier_seeds.csv, frontier_curves.csv, frontier.md")


# ------------------------------------------------------------------------------------------------ PPO tuning

def reward_model_baseline(sft: str, reward: str, size: dict, prompt_seed: int) -> tuple[float, float]:
    """Mean and standard deviation of the learned reward over SFT's samples for the given prompts: the scale the
    tuning objective measures reward in (PPO trains on the reward normalised the same way)."""
    import torch

    from eval_policy import make_judge
    from utils import toy_task
    from utils.generation import sample_completions
    from utils.modeling import ModelArguments, load_model, load_tokenizer

    tokenizer = load_tokenizer(ModelArguments(model_name_or_path=sft))
    policy = load_model(ModelArguments(model_name_or_path=sft), tokenizer)
    prompts = toy_task.make_prompts(size["eval_prompts"], seed=prompt_seed)
    torch.manual_seed(0)
    scores = make_judge(reward)(prompts, sample_completions(policy, tokenizer, prompts,
                                                            max_new_tokens=size["max_new_tokens"]))
    return statistics.fmean(scores), statistics.stdev(scores)


def tune_ppo(shared: dict, size: dict, out: str, steps: Steps, logs: str) -> None:
    """PPO (seed 0, the middle KL coefficient) for every grid setting, evaluated on validation prompts."""
    import itertools

    sft = shared["sft"]
    reward_future = submit_reward_model(steps, "reward_seed0", out, sft, shared["data"], seed=0)
    reward = os.path.join(out, "reward_seed0")
    kl_coef = size["kl_coefs"][len(size["kl_coefs"]) // 2]
    runs = {}
    for learning_rate, epochs in itertools.product(*TUNING_GRID.values()):
        name = f"tune_lr{learning_rate}_epochs{epochs}"
        runs[learning_rate, epochs] = name, submit_ppo(
            steps, name, out, sft, reward, shared["data"], kl_coef, 0, size, "--learning_rate", learning_rate,
            "--num_ppo_epochs", epochs, after=reward_future)
    concurrent.futures.wait([future for _, future in runs.values()])
    reward_mean, reward_std = reward_model_baseline(sft, reward, size, VALIDATION_PROMPT_SEED)
    rows = []
    for (learning_rate, epochs), (name, future) in runs.items():
        path = os.path.join(out, name)
        learned = evaluate(path, sft, size, logs, 0, judge=reward, prompt_seed=VALIDATION_PROMPT_SEED)
        truth = evaluate(path, sft, size, logs, 0, prompt_seed=VALIDATION_PROMPT_SEED)  # the same samples
        # PPO's objective E[r] - kl_coef * KL with r the learned reward normalised on SFT's samples, relative to SFT
        normalized = (learned["mean_reward"] - reward_mean) / reward_std
        rows.append({"learning_rate": learning_rate, "num_ppo_epochs": epochs,
                     "objective": normalized - kl_coef * learned["kl"], "learned_reward": normalized,
                     "kl": learned["kl"], "gt_reward": truth["mean_reward"], "wall_s": future.result()})
        print(f"{name}: objective {rows[-1]['objective']:.3f}, GT reward {truth['mean_reward']:.3f}, "
              f"KL {learned['kl']:.2f}", flush=True)
    best = max(rows, key=lambda row: row["objective"])
    write_csv(os.path.join(out, "ppo_tuning.csv"), rows)
    lines = [f"PPO against the learned reward (seed 0), kl_coef {kl_coef}, {size['ppo_episodes']} episodes, evaluated "
             f"on {size['eval_prompts']} validation prompts (prompt seed {VALIDATION_PROMPT_SEED}, not the test "
             f"prompts). Objective: the learned reward normalised on SFT's samples (raw mean {reward_mean:.3f}, std "
             f"{reward_std:.3f}) minus {kl_coef} x KL, relative to SFT; the ground-truth (GT) columns are shown, not "
             f"used. Bold: chosen.", "",
             "| learning rate | PPO epochs | objective | learned reward (norm.) | KL | GT reward | wall time (s) |",
             "| ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        mark = "**" if r is best else ""
        lines.append(f"| {mark}{r['learning_rate']:g}{mark} | {mark}{r['num_ppo_epochs']}{mark} | "
                     f"{mark}{r['objective']:.3f}{mark} | {r['learned_reward']:.3f} | {r['kl']:.2f} | "
                     f"{r['gt_reward']:.3f} | {r['wall_s']:.0f} |")
    with open(os.path.join(out, "ppo_tuning.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"chosen: learning_rate {best['learning_rate']:g}, num_ppo_epochs {best['num_ppo_epochs']}; "
          f"wrote {out}/ppo_tuning.csv, ppo_tuning.md")


def main():
    args = parse()
    os.environ.setdefault("TQDM_DISABLE", "1")  # our runs print one line each; their logs have the details
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    size, out = args.size, os.path.abspath(args.output_dir)
    logs = os.path.join(out, "logs")
    os.makedirs(logs, exist_ok=True)
    start = time.perf_counter()
    steps = Steps(args.jobs, logs)
    try:
        shared = prepare(size, out, steps)
        if args.tune_ppo:
            tune_ppo(shared, size, out, steps, logs)
        else:
            submitted = [submit_seed(seed, shared, size, out, steps) for seed in range(args.seeds)]
            # every training run first, so that evaluations neither slow them down nor are slowed by them
            concurrent.futures.wait([future for seed in submitted for _, future, *_ in seed["methods"].values()])
            rows = [row for seed, runs in enumerate(submitted) for row in evaluate_seed(seed, runs, shared, size, logs)]
            write_outputs(rows, out, args)
    except RuntimeError as error:  # a step failed: its log says why
        steps.pool.shutdown(cancel_futures=True)
        sys.exit(str(error))
    print(f"total: {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
