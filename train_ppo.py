"""PPO: the RLHF baseline, with TRL's PPOTrainer.

    python train_ppo.py [config.yaml] [--flags]

The policy starts from the SFT model; the reference is a frozen copy of it (with LoRA: the policy with its adapters
off). Completions are scored by a train_reward.py model (--reward_model_path), or with `--reward_model_path
ground_truth` by the toy task's true reward (PPO-GT, as in the DPO paper). The value model starts as the reward model
(PPO-GT: as the policy's body with a new head). Prompts are the prompt column of the preference data.
"""

import copy
import dataclasses
import warnings
from dataclasses import dataclass, field
from typing import Literal

from accelerate import PartialState
from transformers import AutoTokenizer, DataCollatorWithPadding
from trl.import_utils import TRLExperimentalWarning

from utils.cli import parse_args, run_script, setup_logging
from utils.data import DataArguments, load_preference_data
from utils.modeling import ModelArguments, apply_lora, load_model, load_tokenizer
from utils.rewards import GroundTruthReward

# PPOTrainer exists only in trl.experimental, and trl is pinned to 1.12 (its last release with it): nothing to warn of.
with warnings.catch_warnings():
    warnings.simplefilter("ignore", TRLExperimentalWarning)
    from trl.experimental.ppo import PPOConfig, PPOTrainer

GROUND_TRUTH = "ground_truth"


@dataclass
class PPOArguments(PPOConfig):
    output_dir: str = field(default="outputs/ppo", metadata={"help": "Where the policy and logs go."})
    reward_model_path: str = field(
        default="outputs/reward",
        metadata={"help": f"A train_reward.py output folder, or '{GROUND_TRUTH}': score completions with the toy "
                          f"task's true reward (PPO-GT)."})
    learning_rate: float = 1e-4
    total_episodes: int | None = 1024
    per_device_train_batch_size: int = 16
    gradient_accumulation_steps: int = 4
    response_length: int = 32
    stop_token: Literal["eos"] | None = field(
        default="eos", metadata={"help": "'eos': completions end at the tokenizer's eos (None: they run "
                                         "response_length tokens)."})
    save_strategy: str = "no"
    # TRL turns these on by default; on CPU and small models they only cost time (--activation_checkpointing, --bf16).
    gradient_checkpointing: bool | None = field(default=None, metadata={"help": "Deprecated alias of "
                                                                               "activation_checkpointing."})
    bf16: bool | None = False
    # The policy is --model_name_or_path, and DataArguments owns --dataset_num_proc (TRL's trainer reads neither).
    sft_model_path: str = field(default="", init=False)
    dataset_num_proc: int | None = field(default=None, init=False)


def load_reward_model(model_args: ModelArguments, path: str, tokenizer):
    """A train_reward.py folder as a sequence classifier; it must share the policy's tokenizer, as TRL feeds it the
    policy's token ids."""
    if AutoTokenizer.from_pretrained(path).get_vocab() != tokenizer.get_vocab():
        raise ValueError(f"{path}: its tokenizer differs from the policy's ({model_args.model_name_or_path})")
    return load_model(dataclasses.replace(model_args, model_name_or_path=path), tokenizer, num_labels=1)


def main(argv: list[str] | None = None):
    model_args, data_args, training_args = parse_args((ModelArguments, DataArguments, PPOArguments), argv)
    setup_logging(training_args)

    tokenizer = load_tokenizer(model_args)
    tokenizer.padding_side = "left"  # completions are generated after the prompts, so prompts must end at one column
    policy = load_model(model_args, tokenizer)
    # PPO's loss has no router term, and transformers 5.23's generate() crashes on Mixtral with router logits on.
    if hasattr(policy.config, "output_router_logits"):
        policy.config.output_router_logits = False
    if model_args.use_peft:
        policy = apply_lora(policy, model_args)

    pairs = load_preference_data(data_args, tokenizer)
    prompts = pairs.select_columns(["prompt_input_ids"]).rename_column("prompt_input_ids", "input_ids")

    if training_args.reward_model_path == GROUND_TRUTH:
        prompt_length = max(len(ids) for split in prompts.values() for ids in split["input_ids"])
        reward_model = GroundTruthReward(tokenizer, prompt_length)
        # every prompt padded to prompt_length tokens, so that GroundTruthReward finds completions at that column
        collator = DataCollatorWithPadding(tokenizer, padding="max_length", max_length=prompt_length)
        value_model = load_model(model_args, tokenizer, num_labels=1)  # no reward model: the policy's body, a new head
    else:
        reward_model = load_reward_model(model_args, training_args.reward_model_path, tokenizer)
        collator = DataCollatorWithPadding(tokenizer)
        value_model = copy.deepcopy(reward_model)

    rollout_batch = (training_args.per_device_train_batch_size * training_args.gradient_accumulation_steps
                     * PartialState().num_processes)
    if len(prompts["train"]) < rollout_batch:
        # TRL drops the last partial batch and then waits forever for a full one
        raise ValueError(f"{data_args.dataset_name}: {len(prompts['train'])} training prompts, fewer than one rollout "
                         f"batch (per_device_train_batch_size x gradient_accumulation_steps x processes = "
                         f"{rollout_batch})")
    trainer = PPOTrainer(args=training_args, processing_class=tokenizer, model=policy,
                         ref_model=None,  # TRL makes a frozen copy, or with LoRA turns the adapters off
                         reward_model=reward_model, value_model=value_model, data_collator=collator,
                         train_dataset=prompts["train"], eval_dataset=prompts.get("test"))
    trainer.train()

    if model_args.use_peft:
        # A standalone policy: a preset base exists on no Hub, so adapters alone could not be reloaded.
        trainer.model.policy = trainer.model.policy.merge_and_unload()
    trainer.save_model()
    trainer.save_state()


if __name__ == "__main__":
    run_script(main)
