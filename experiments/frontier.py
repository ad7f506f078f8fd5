"""The DPO paper's controlled-sentiment study (its Figure 2) at toy scale: reward vs KL frontier.

    .venv/bin/python experiments/frontier.py            # default sizes: ~30-45 minutes on 2 CPU cores
    .venv/bin/python experiments/frontier.py --quick    # a reduced run in a few minutes (used by the tests)

SFT on the toy corpus; preference pairs sampled from the SFT policy for toy prompts and labelled by
the ground truth (VADER); then DPO at several beta, reward model + PPO at several KL coefficients,
PPO-GT (PPO on the ground-truth reward), Preferred-FT (SFT on the chosen completions) and best-of-N
sampling from SFT under the learned reward. Every policy is evaluated by eval_policy.py on held-out
prompts: mean ground-truth reward (y) against KL to the SFT policy (x). Writes frontier.png,
frontier.csv and frontier.md (with compute: wall time, estimated forward/backward tokens, and the
preference pairs or reward queries each method used) to --output_dir.
"""

import argparse
import csv
import json
import math
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

SIZES = {  # default / --quick
    "preset": ("mixtral-toy", "mixtral-tiny"),
    "sft_reviews": (4000, 256),
    "pairs": (2000, 128),
    "betas": ((0.05, 0.1, 0.5, 2.0), (0.1, 1.0)),
    "kl_coefs": ((0.02, 0.1, 0.5), (0.1,)),
    "ppo_episodes": (1024, 64),
    "ppo_batch": ((16, 4), (8, 2)),  # per_device_train_batch_size, gradient_accumulation_steps
    "eval_prompts": (256, 16),
    "best_of_n": (16, 4),
    "max_new_tokens": (32, 12),
}


def parse():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="reduced sizes (a few minutes)")
    parser.add_argument("--output_dir", default="outputs/frontier")
    args = parser.parse_args()
    args.size = {key: value[1 if args.quick else 0] for key, value in SIZES.items()}
    return args


def run(step: str, script: str, *flags, log_dir: str) -> float:
    """Run one of our scripts in its own process; its output goes to <log_dir>/<step>.log. Returns wall seconds."""
    start = time.perf_counter()
    with open(os.path.join(log_dir, f"{step}.log"), "w") as log:
        result = subprocess.run([sys.executable, os.path.join(REPO, script), *map(str, flags)], cwd=REPO,
                                stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ, TQDM_DISABLE="1"))
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        sys.exit(f"{step} failed (exit {result.returncode}); see {log_dir}/{step}.log")
    print(f"{step}: {seconds:.0f} s", flush=True)
    return seconds


def pair_token_counts(pairs_file: str, sft_dir: str) -> dict:
    """Token totals of the pairs, for the compute estimates."""
    from utils.data import DataArguments, load_preference_data
    from utils.modeling import ModelArguments, load_tokenizer

    pairs = load_preference_data(DataArguments(dataset_name=pairs_file),
                                 load_tokenizer(ModelArguments(model_name_or_path=sft_dir)))["train"]
    prompt = sum(map(len, pairs["prompt_input_ids"]))
    return {"pairs": len(pairs), "prompt": prompt, "chosen": sum(map(len, pairs["chosen_input_ids"])),
            "rejected": sum(map(len, pairs["rejected_input_ids"]))}


def best_of_n(sft_dir: str, reward_dir: str, size: dict, seed: int = 0) -> dict:
    """Sample N completions per held-out prompt from SFT, keep the one the learned reward likes best."""
    import torch

    from eval_policy import EvalArguments, make_judge
    from utils import toy_task
    from utils.generation import sample_completions
    from utils.modeling import ModelArguments, load_model, load_tokenizer

    tokenizer = load_tokenizer(ModelArguments(model_name_or_path=sft_dir))
    policy = load_model(ModelArguments(model_name_or_path=sft_dir), tokenizer)
    judge = make_judge(reward_dir, tokenizer)
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
    return {"mean_reward": sum(rewards) / len(rewards), "kl": math.log(n) - (n - 1) / n,
            "reward_queries": n * len(prompts), "tokens": n * len(prompts) * size["max_new_tokens"]}


def main():
    args = parse()
    size, out = args.size, os.path.abspath(args.output_dir)
    logs = os.path.join(out, "logs")
    os.makedirs(logs, exist_ok=True)
    sft, pairs_file, reward = os.path.join(out, "sft"), os.path.join(out, "pairs.jsonl"), os.path.join(out, "reward")
    policies = {}  # method label -> (checkpoint, wall seconds, tokens, pairs or reward queries)

    sft_seconds = run("sft", "train_sft.py", "configs/sft_toy.yaml", "--model_name_or_path", size["preset"],
                      "--toy_num_reviews", size["sft_reviews"], "--output_dir", sft, log_dir=logs)
    run("pairs", "make_toy_pairs.py", "--source", "policy", "--model_name_or_path", sft, "--num_pairs",
        size["pairs"], "--max_new_tokens", size["max_new_tokens"], "--output_file", pairs_file, log_dir=logs)
    tokens = pair_token_counts(pairs_file, sft)
    pair_tokens = 2 * tokens["prompt"] + tokens["chosen"] + tokens["rejected"]
    data = ["--dataset_name", pairs_file, "--eval_fraction", "0.1", "--max_length", "128"]

    for beta in size["betas"]:
        path = os.path.join(out, f"dpo_beta{beta}")
        seconds = run(f"dpo_beta{beta}", "train_dpo.py", "configs/dpo_toy.yaml", "--model_name_or_path", sft,
                      "--beta", beta, "--output_dir", path, "--toy_reward_prompts", 0, "--eval_strategy", "no",
                      "--ref_logps_cache_dir", os.path.join(out, "ref_cache"), *data, log_dir=logs)
        # 2 epochs of forward+backward on every pair, plus one reference forward
        policies[f"DPO beta={beta}"] = (path, seconds, 3 * pair_tokens, tokens["pairs"])

    path = os.path.join(out, "preferred_ft")
    seconds = run("preferred_ft", "train_sft.py", "--model_name_or_path", sft, "--output_dir", path,
                  "--num_train_epochs", 1, "--learning_rate", 5e-4, *data, log_dir=logs)
    policies["Preferred-FT"] = (path, seconds, tokens["prompt"] + tokens["chosen"], tokens["pairs"])

    reward_seconds = run("reward", "train_reward.py", "configs/reward_toy.yaml", "--model_name_or_path", sft,
                         "--output_dir", reward, *data, log_dir=logs)
    reward_tokens = 2 * pair_tokens  # 2 epochs over both sides of every pair
    # per PPO episode: generation, reference, reward and value forwards, 4 policy+value epochs of fwd+bwd
    episode_tokens = (tokens["prompt"] / tokens["pairs"] + size["max_new_tokens"]) * (4 + 4 * 2)
    ppo = ["--total_episodes", size["ppo_episodes"], "--response_length", size["max_new_tokens"],
           "--per_device_train_batch_size", size["ppo_batch"][0], "--gradient_accumulation_steps", size["ppo_batch"][1]]
    for kl_coef in size["kl_coefs"]:
        path = os.path.join(out, f"ppo_kl{kl_coef}")
        seconds = run(f"ppo_kl{kl_coef}", "train_ppo.py", "configs/ppo_toy.yaml", "--model_name_or_path", sft,
                      "--reward_model_path", reward, "--kl_coef", kl_coef, *ppo, "--output_dir", path, *data,
                      log_dir=logs)
        policies[f"PPO kl={kl_coef}"] = (path, reward_seconds + seconds,
                                         reward_tokens + episode_tokens * size["ppo_episodes"], tokens["pairs"])
    path = os.path.join(out, "ppo_gt")
    seconds = run("ppo_gt", "train_ppo.py", "configs/ppo_toy.yaml", "--model_name_or_path", sft,
                  "--reward_model_path", "ground_truth", "--kl_coef", size["kl_coefs"][0], *ppo, "--output_dir", path,
                  *data, log_dir=logs)
    policies["PPO-GT"] = (path, seconds, episode_tokens * size["ppo_episodes"], size["ppo_episodes"])

    rows = [{"method": "SFT", "kl": 0.0, **evaluate(sft, sft, size, logs), "wall_s": sft_seconds, "tokens": 0,
             "pairs_or_reward_queries": 0}]
    for method, (path, seconds, method_tokens, used) in policies.items():
        rows.append({"method": method, **evaluate(path, sft, size, logs), "wall_s": seconds,
                     "tokens": int(method_tokens), "pairs_or_reward_queries": used})
        print(f"{method}: reward {rows[-1]['mean_reward']:.3f}, KL {rows[-1]['kl']:.2f}", flush=True)
    start = time.perf_counter()
    bon = best_of_n(sft, reward, size)
    rows.append({"method": f"Best-of-{size['best_of_n']}", "mean_reward": bon["mean_reward"], "kl": bon["kl"],
                 "win_rate": float("nan"), "wall_s": reward_seconds + time.perf_counter() - start,
                 "tokens": int(reward_tokens + bon["tokens"]), "pairs_or_reward_queries": bon["reward_queries"]})
    write_outputs(rows, out, args)


def evaluate(policy: str, reference: str, size: dict, logs: str) -> dict:
    from eval_policy import EvalArguments, evaluate_policy

    results = evaluate_policy(EvalArguments(policy_path=policy, reference_path=reference,
                                            num_prompts=size["eval_prompts"], max_new_tokens=size["max_new_tokens"],
                                            num_eval_pairs=0))
    with open(os.path.join(logs, f"eval_{os.path.basename(policy)}.json"), "w") as f:
        json.dump(results, f, indent=2)
    return {"mean_reward": results["mean_reward"], "kl": results["kl"], "win_rate": results["win_rate"]}


def write_outputs(rows: list[dict], out: str, args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(os.path.join(out, "frontier.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    lines = ["| method | mean GT reward | KL to SFT (nats) | win rate vs SFT | wall time (s) | fwd/bwd tokens (est.) "
             "| pairs / reward queries |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['mean_reward']:.3f} | {r['kl']:.2f} | {r['win_rate']:.2f} | "
                     f"{r['wall_s']:.0f} | {r['tokens']:,} | {r['pairs_or_reward_queries']:,} |")
    with open(os.path.join(out, "frontier.md"), "w") as f:
        f.write("\n".join(lines) + "\n")

    figure, axes = plt.subplots(figsize=(6.5, 4.5))
    for family, marker in (("DPO", "o"), ("PPO kl", "s"), ("PPO-GT", "^"), ("Preferred-FT", "D"), ("Best-of", "*"),
                           ("SFT", "x")):
        points = sorted((r["kl"], r["mean_reward"]) for r in rows if r["method"].startswith(family))
        if points:
            axes.plot(*zip(*points), marker=marker, linestyle="-" if len(points) > 1 else "",
                      label=family.replace(" kl", ""))
    axes.set_xlabel("KL(policy || SFT), nats per completion")
    axes.set_ylabel("mean ground-truth reward (VADER)")
    axes.set_title("Toy sentiment frontier" + (" (--quick)" if args.quick else ""))
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(os.path.join(out, "frontier.png"), dpi=120)
    print("\n".join(lines))
    print(f"wrote {out}/frontier.png, frontier.csv, frontier.md")


if __name__ == "__main__":
    main()
