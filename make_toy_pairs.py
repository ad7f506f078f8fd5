"""Write toy-task preference pairs to a JSONL file, from the generator or sampled from a policy.

    python make_toy_pairs.py --output_file pairs.jsonl --num_pairs 2000                       # generator
    python make_toy_pairs.py --output_file pairs.jsonl --model_name_or_path outputs/sft       # policy samples
    python make_toy_pairs.py --output_file chat/train.jsonl --conversational true              # UltraFeedback layout

The file then feeds any script through --dataset_name pairs.jsonl.
"""

import json
import logging
import os
import sys
from dataclasses import dataclass, field

import torch

from utils import toy_task
from utils.cli import parse_args, run_script
from utils.errors import ConfigError
from utils.generation import sample_completions
from utils.modeling import ModelArguments, load_model, load_tokenizer
from utils.rewards import make_judge

logger = logging.getLogger("make_toy_pairs")


@dataclass
class PairArguments:
    output_file: str = field(default="outputs/toy_pairs.jsonl", metadata={"help": "JSONL file to write."})
    source: str = field(default="generator", metadata={"help": "generator, or policy (--model_name_or_path).",
                                                      "choices": ["generator", "policy"]})
    num_pairs: int = field(default=2000, metadata={"help": "Pairs (generator) or prompts (policy) to make."})
    labeling: str = field(default="deterministic", metadata={"choices": ["deterministic", "bradley_terry"]})
    ground_truth: str = field(default="sentiment", metadata={"help": "The reward that labels the pairs.",
                                                             "choices": list(toy_task.GROUND_TRUTHS)})
    reward_model_path: str | None = field(
        default=None, metadata={"help": "Label policy samples by this train_reward.py model instead of a ground "
                                        "truth (iterative DPO: no ground-truth query)."})
    bt_temperature: float = 0.1
    seed: int = 0
    max_new_tokens: int = 32
    temperature: float = 1.0
    top_p: float = 1.0
    conversational: bool = field(
        default=False, metadata={"help": "Write UltraFeedback's layout: a prompt string and chosen/rejected message "
                                         "lists (the user's prompt, then the assistant's answer)."})


def as_conversation(pair: dict) -> dict:
    """A prompt/chosen/rejected pair in UltraFeedback's layout."""
    user = {"role": "user", "content": pair["prompt"]}
    return {"prompt": pair["prompt"],
            **{side: [user, {"role": "assistant", "content": pair[side]}] for side in ("chosen", "rejected")}}


def policy_pairs(model, tokenizer, prompts: list[str], *, seed: int, labeling: str = "deterministic",
                 bt_temperature: float = 0.1, reward=toy_task.ground_truth_reward, **sampling) -> list[dict]:
    """Preference pairs from a policy's own samples: two completions per prompt, labelled by `reward` (completions
    -> scores; default the ground truth)."""
    torch.manual_seed(seed)
    completions_a = sample_completions(model, tokenizer, prompts, **sampling)
    completions_b = sample_completions(model, tokenizer, prompts, **sampling)
    return toy_task.build_pairs(prompts, completions_a, completions_b, seed=seed, labeling=labeling,
                                bt_temperature=bt_temperature, reward=reward)


def main(argv: list[str] | None = None):
    pair_args, model_args = parse_args((PairArguments, ModelArguments), argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO, force=True,
                        handlers=[logging.StreamHandler(sys.stdout)])
    labels = dict(labeling=pair_args.labeling, bt_temperature=pair_args.bt_temperature)
    if pair_args.source == "generator":
        if pair_args.ground_truth != "sentiment" or pair_args.reward_model_path:
            raise ConfigError("--ground_truth, --reward_model_path: the generator labels by sentiment only; use "
                              "--source policy")
        pairs = toy_task.generator_pairs(pair_args.num_pairs, pair_args.seed, **labels)
    else:
        tokenizer = load_tokenizer(model_args)
        model = load_model(model_args, tokenizer)
        prompts = toy_task.make_prompts(pair_args.num_pairs, seed=pair_args.seed)
        if pair_args.reward_model_path:
            judge = make_judge(pair_args.reward_model_path)
            reward = lambda completions: judge(prompts, completions)  # noqa: E731 -- the prompts of these samples
        else:
            reward = toy_task.GROUND_TRUTHS[pair_args.ground_truth]
        pairs = policy_pairs(model, tokenizer, prompts, seed=pair_args.seed, **labels, reward=reward,
                             max_new_tokens=pair_args.max_new_tokens, temperature=pair_args.temperature,
                             top_p=pair_args.top_p)
    if pair_args.conversational:
        pairs = [as_conversation(pair) for pair in pairs]
    os.makedirs(os.path.dirname(os.path.abspath(pair_args.output_file)), exist_ok=True)
    with open(pair_args.output_file, "w") as f:
        for pair in pairs:
            f.write(json.dumps(pair) + "\n")
    logger.info("wrote %d pairs (%s) to %s", len(pairs), pair_args.source, pair_args.output_file)


if __name__ == "__main__":
    run_script(main)
