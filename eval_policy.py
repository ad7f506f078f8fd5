"""Evaluate a policy against its reference on the toy task (the DPO paper's reward/KL axes).

    python eval_policy.py --policy_path outputs/dpo --reference_path outputs/sft [--judge ground_truth|<reward model>]

For held-out prompts it samples one completion from each model and reports, as JSON:
- mean_reward: the judge's mean score of the policy's completions (ground truth or a reward model);
- kl: sequence-level KL(policy || reference), estimated from the policy's own samples as the mean of
  sum_t [log pi(y_t | x, y_<t) - log pi_ref(y_t | x, y_<t)] (unbiased when sampling at temperature 1, top_p 1);
- kl_full: the same KL estimated from the same samples as the mean of sum_t KL(pi(. | x, y_<t) || pi_ref(. | x, y_<t)),
  each term exact over the vocabulary: the same expectation (the tower rule: the sampled token's log-ratio averages to
  the full-distribution KL at its position), without the noise of which token was sampled, so it is never negative
  and varies less between samples; kl_std and kl_full_std are the per-sample standard deviations of the two;
- mean_length: the completions' mean length in tokens (eos included); distinct_2: distinct bigrams over all bigrams
  of the completions' words (Li et al. 2016), a measure of diversity;
- win_rate: how often the judge prefers the policy's completion to the reference's on the same prompt (ties 1/2);
- preference_accuracy: on held-out preference pairs, how often the implicit DPO reward
  log pi(y|x) - log pi_ref(y|x) ranks the chosen completion above the rejected one.
"""

import json
import math
import logging
import os
from dataclasses import dataclass, field

import torch

from utils import toy_task
from utils.cli import parse_args, run_script
from utils.data import DataArguments, PreferenceCollator, collate_completions, load_preference_data
from utils.generation import sample
from utils.logprobs import model_logps
from utils.modeling import ModelArguments, load_model, load_tokenizer
from utils.reference import score_dataset
from utils.rewards import GROUND_TRUTH, make_judge

logger = logging.getLogger("eval_policy")


@dataclass
class EvalArguments:
    policy_path: str = field(default="outputs/dpo", metadata={"help": "Policy checkpoint folder (or preset)."})
    reference_path: str = field(default="outputs/sft", metadata={"help": "Reference checkpoint folder (or preset)."})
    judge: str = field(default=GROUND_TRUTH, metadata={"help": "ground_truth, or a train_reward.py output folder."})
    num_prompts: int = field(default=256, metadata={"help": "Held-out toy prompts to sample."})
    prompt_seed: int = field(default=10_000, metadata={"help": "Seed of the held-out prompts (not a training seed)."})
    sample_seed: int = 0
    max_new_tokens: int = 32
    temperature: float = 1.0
    top_p: float = 1.0
    batch_size: int = 64
    sample_reference: bool = field(default=True, metadata={
        "help": "Also sample the reference, for the win rate (off: win_rate is nan and the evaluation samples half "
                "as much)."})
    num_eval_pairs: int = field(default=256, metadata={"help": "Held-out pairs for preference accuracy (0: skip)."})
    output_file: str | None = field(default=None, metadata={"help": "JSON results; default <policy_path>/eval_policy.json."})


def kl_estimate(policy_logps: torch.Tensor, reference_logps: torch.Tensor) -> float:
    """Monte-Carlo KL(policy || reference) from samples of the policy: mean of the sequence log-ratios."""
    return (policy_logps - reference_logps).mean().item()


def full_kl_per_token(policy_logits: torch.Tensor, reference_logits: torch.Tensor) -> torch.Tensor:
    """KL(softmax(policy_logits) || softmax(reference_logits)) of each row, exact over the last dimension."""
    policy_logps, reference_logps = policy_logits.float().log_softmax(-1), reference_logits.float().log_softmax(-1)
    return (policy_logps.exp() * (policy_logps - reference_logps)).sum(-1)


def distinct_n(texts: list[str], n: int = 2) -> float:
    """Distinct word n-grams over all word n-grams of the texts (0 when none has n words)."""
    ngrams = [tuple(words[i:i + n]) for words in (text.split() for text in texts) for i in range(len(words) - n + 1)]
    return len(set(ngrams)) / len(ngrams) if ngrams else 0.0


def win_rate(policy_scores: list[float], reference_scores: list[float]) -> float:
    """Fraction of prompts where the policy's completion scores higher; a tie counts as half a win."""
    wins = sum(1.0 if p > r else 0.5 if p == r else 0.0 for p, r in zip(policy_scores, reference_scores))
    return wins / len(policy_scores)


@torch.no_grad()
def sampled_logps(model, completions, pad_token_id: int, batch_size: int) -> torch.Tensor:
    """log pi(y|x) of each sampled completion, from the sampled token ids themselves (no re-tokenising)."""
    sums = []
    for start in range(0, len(completions), batch_size):
        chunk = completions[start:start + batch_size]
        batch = collate_completions([c.prompt_ids for c in chunk], [c.completion_ids for c in chunk], pad_token_id)
        batch = {key: value.to(model.device) for key, value in batch.items()}
        sums.append(model_logps(model, batch)[0].cpu())
    return torch.cat(sums)


@torch.no_grad()
def sampled_full_kls(policy, reference, completions, pad_token_id: int, batch_size: int) -> torch.Tensor:
    """Per completion: sum over its tokens of KL(pi(. | x, y_<t) || pi_ref(. | x, y_<t)), from both models' logits at
    the positions that predict the sampled tokens."""
    sums = []
    for start in range(0, len(completions), batch_size):
        chunk = completions[start:start + batch_size]
        batch = collate_completions([c.prompt_ids for c in chunk], [c.completion_ids for c in chunk], pad_token_id)
        positions = batch["completion_positions"] - 1  # the logits at t - 1 predict token t
        token_kls = full_kl_per_token(
            *(model(input_ids=batch["input_ids"].to(model.device), attention_mask=batch["attention_mask"].to(
                model.device), use_cache=False).logits.flatten(0, 1).index_select(0, positions.to(model.device)).cpu()
              for model in (policy, reference)))
        sums.append(torch.zeros(len(chunk)).index_add(0, batch["completion_sequence"], token_kls))
    return torch.cat(sums)


def evaluate_policy(args: EvalArguments) -> dict:
    tokenizer = load_tokenizer(ModelArguments(model_name_or_path=args.policy_path))
    policy = load_model(ModelArguments(model_name_or_path=args.policy_path), tokenizer).eval()
    reference = load_model(ModelArguments(model_name_or_path=args.reference_path), tokenizer).eval()
    judge = make_judge(args.judge, batch_size=args.batch_size)
    prompts = toy_task.make_prompts(args.num_prompts, seed=args.prompt_seed)
    sampling = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                    batch_size=args.batch_size)

    torch.manual_seed(args.sample_seed)
    policy_samples = sample(policy, tokenizer, prompts, **sampling)
    policy_scores = judge(prompts, [s.text for s in policy_samples])
    reference_scores = (judge(prompts, [s.text for s in sample(reference, tokenizer, prompts, **sampling)])
                        if args.sample_reference else None)
    logps = (sampled_logps(policy, policy_samples, tokenizer.pad_token_id, args.batch_size),
             sampled_logps(reference, policy_samples, tokenizer.pad_token_id, args.batch_size))
    log_ratios = logps[0] - logps[1]
    full_kls = sampled_full_kls(policy, reference, policy_samples, tokenizer.pad_token_id, args.batch_size)
    texts = [s.text for s in policy_samples]
    results = {
        "policy": args.policy_path, "reference": args.reference_path, "judge": args.judge,
        "num_prompts": args.num_prompts, "mean_reward": sum(policy_scores) / len(policy_scores),
        "reference_mean_reward": sum(reference_scores) / len(reference_scores) if reference_scores else math.nan,
        "kl": kl_estimate(*logps), "kl_full": full_kls.mean().item(),
        "kl_std": log_ratios.std().item() if len(prompts) > 1 else 0.0,
        "kl_full_std": full_kls.std().item() if len(prompts) > 1 else 0.0,
        "win_rate": win_rate(policy_scores, reference_scores) if reference_scores else math.nan,
        "mean_length": sum(len(s.completion_ids) for s in policy_samples) / len(policy_samples),
        "distinct_2": distinct_n(texts, 2),
        "samples": [{"prompt": p, "completion": text, "score": r}
                    for p, text, r in list(zip(prompts, texts, policy_scores))[:5]],
        # every sample's text and KL terms, for statistics of one's own (experiments/claims.py)
        "completions": texts, "log_ratios": log_ratios.tolist(), "full_kls": full_kls.tolist(),
    }
    if args.num_eval_pairs:
        pairs = load_preference_data(DataArguments(toy_num_train_pairs=1, toy_num_eval_pairs=args.num_eval_pairs,
                                                   toy_seed=args.prompt_seed), tokenizer)["test"]
        collator = PreferenceCollator(tokenizer.pad_token_id)
        policy_chosen, policy_rejected = score_dataset(policy, pairs, collator, args.batch_size)
        reference_chosen, reference_rejected = score_dataset(reference, pairs, collator, args.batch_size)
        margins = (policy_chosen - reference_chosen) - (policy_rejected - reference_rejected)
        results["preference_accuracy"] = (margins > 0).float().mean().item()
    return results


def main(argv: list[str] | None = None) -> dict:
    (args,) = parse_args((EvalArguments,), argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    results = evaluate_policy(args)
    output_file = args.output_file or os.path.join(args.policy_path, "eval_policy.json")
    os.makedirs(os.path.dirname(os.path.abspath(output_file)), exist_ok=True)
    with open(output_file, "w") as f:
        json.dump(results, f, indent=2)
    logger.info("mean reward %.3f (reference %.3f), KL %.2f nats (full-distribution estimate %.2f), win rate %.2f, "
                "preference accuracy %s -> %s", results["mean_reward"], results["reference_mean_reward"],
                results["kl"], results["kl_full"], results["win_rate"],
                f"{results['preference_accuracy']:.2f}" if "preference_accuracy" in results else "-", output_file)
    return results


if __name__ == "__main__":
    run_script(main)
