"""PPO: the RLHF baseline, with TRL's PPOTrainer.

    python train_ppo.py [config.yaml] [--flags]

The policy starts from the SFT model; the reference is a frozen copy of it (with LoRA: the policy with its adapters
off). Completions are scored by a train_reward.py model (--reward_model_path), or with `--reward_model_path
ground_truth` by the toy task's true reward (PPO-GT, as in the DPO paper). The value model starts as the reward model
(PPO-GT: as the policy's body with a new head). Prompts are the prompt column of the preference data.
"""

import copy
import dataclasses
import logging
import os
import warnings
from dataclasses import dataclass, field
from typing import Literal

from accelerate import PartialState
from transformers import DataCollatorWithPadding
from trl.import_utils import TRLExperimentalWarning

from utils.checkpointing import SaveAtFractions, SaveAtFractionsArguments
from utils.cli import parse_args, run_script, setup_logging
from utils.errors import ConfigError
from utils.data import DataArguments, load_preference_data
from utils.modeling import ModelArguments, apply_lora, check_left_padding, load_model, load_tokenizer
from utils.precision import bf16_field, default_bf16
from utils.rewards import GroundTruthReward, normalize_reward

# PPOTrainer exists only in trl.experimental, and trl is pinned to 1.12 (its last release with it): nothing to warn of.
with warnings.catch_warnings():
    warnings.simplefilter("ignore", TRLExperimentalWarning)
    from trl.experimental.ppo import PPOConfig, PPOTrainer

logger = logging.getLogger("train_ppo")
GROUND_TRUTH = "ground_truth"


@dataclass
class PPOArguments(SaveAtFractionsArguments, PPOConfig):
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
    # TRL turns it on by default; on CPU and small models it only costs time (--activation_checkpointing).
    gradient_checkpointing: bool | None = field(default=None, metadata={"help": "Deprecated alias of "
                                                                               "activation_checkpointing."})
    bf16: bool | None = bf16_field()  # TRL's default is on everywhere; ours is every script's (utils/precision.py)
    # The policy is --model_name_or_path, and DataArguments owns --dataset_num_proc (TRL's trainer reads neither).
    sft_model_path: str = field(default="", init=False)
    dataset_num_proc: int | None = field(default=None, init=False)
    reward_normalization_samples: int = field(
        default=0, metadata={"help": "Rescale the reward to mean 0, std 1 on this many samples of the initial policy, "
                                     "so that kl_coef weighs the same for any reward (0: raw scores)."})

    def __post_init__(self):
        self.bf16 = default_bf16(self)
        super().__post_init__()


def fit_rollout_batch(args: PPOArguments, num_prompts: int, num_processes: int) -> tuple[int, int]:
    """(per_device_train_batch_size, gradient_accumulation_steps) of a rollout batch that the prompts and
    total_episodes can fill: the flags' own where they can, else the largest smaller batch.

    Each process rolls out per_device_train_batch_size x gradient_accumulation_steps prompts per update, split into
    num_mini_batches PPO mini-batches. TRL drops a last partial batch of prompts (with fewer prompts than one
    batch it then waits forever for a full one) and runs whole batches only (more episodes than asked), so a batch
    must fit both. A smaller one keeps the micro-batch (per_device_train_batch_size) at most the flag's, so that
    memory stays bounded.
    """
    per_device, accumulation, mini_batches = (args.per_device_train_batch_size, args.gradient_accumulation_steps,
                                              args.num_mini_batches)
    local_batch = per_device * accumulation
    if local_batch % mini_batches:
        raise ConfigError(f"--num_mini_batches {mini_batches} must divide the rollout batch per process, "
                          f"per_device_train_batch_size x gradient_accumulation_steps = {local_batch}")
    episodes = args.total_episodes if args.total_episodes is not None else int(args.num_train_epochs * num_prompts)
    room = min(num_prompts, episodes) // num_processes // mini_batches * mini_batches  # per process
    if room == 0:
        raise ConfigError(f"{num_prompts} training prompts and {episodes} episodes (--total_episodes) are fewer than "
                          f"one rollout of --num_mini_batches {mini_batches} on each of {num_processes} processes: "
                          f"nothing to train on")
    if local_batch > room:
        mini_batch = room // mini_batches
        per_device = max(size for size in range(1, min(per_device, mini_batch) + 1) if mini_batch % size == 0)
        local_batch, accumulation = room, room // per_device
    if args.whiten_rewards and local_batch // mini_batches < 8:  # TRL's own check is an assert
        raise ConfigError(f"--whiten_rewards needs at least 8 episodes per PPO mini-batch and process, got "
                          f"{local_batch // mini_batches}")
    return per_device, accumulation


def load_reward_model(model_args: ModelArguments, path: str, tokenizer):
    """A train_reward.py folder as a sequence classifier; it must share the policy's tokenizer, as TRL feeds it the
    policy's token ids."""
    reward_args = dataclasses.replace(model_args, model_name_or_path=path)
    if load_tokenizer(reward_args, pad_apart_from_eos=True).get_vocab() != tokenizer.get_vocab():
        raise ConfigError(f"--reward_model_path {path}: its tokenizer differs from the policy's "
                          f"({model_args.model_name_or_path})")
    return load_model(reward_args, tokenizer, num_labels=1)


def main(argv: list[str] | None = None):
    model_args, data_args, training_args = parse_args((ModelArguments, DataArguments, PPOArguments), argv)
    setup_logging(training_args)
    check_left_padding(model_args)  # the policy, reward and value models all see left-padded prompts
    reward_path = training_args.reward_model_path
    if reward_path != GROUND_TRUTH and not os.path.isdir(reward_path):
        raise ConfigError(f"--reward_model_path {reward_path}: no such folder; train one with train_reward.py, or "
                          f"pass {GROUND_TRUTH} to train on the toy task's true reward")

    tokenizer = load_tokenizer(model_args, pad_apart_from_eos=True)  # TRL masks by pad_token_id
    tokenizer.padding_side = "left"  # completions are generated after the prompts, so prompts must end at one column
    policy = load_model(model_args, tokenizer)
    # PPO's loss has no router term, and transformers 5.23's generate() crashes on Mixtral with router logits on.
    if hasattr(policy.config, "output_router_logits"):
        policy.config.output_router_logits = False
    if model_args.use_peft:
        policy = apply_lora(policy, model_args)

    pairs = load_preference_data(data_args, tokenizer)
    prompts = pairs.select_columns(["prompt_input_ids"]).rename_column("prompt_input_ids", "input_ids")

    num_processes = PartialState().num_processes
    per_device, accumulation = fit_rollout_batch(training_args, len(prompts["train"]), num_processes)
    if (per_device, accumulation) != (training_args.per_device_train_batch_size,
                                      training_args.gradient_accumulation_steps):
        logger.warning("a rollout batch of per_device_train_batch_size %d x gradient_accumulation_steps %d x %d "
                       "processes is more than %d training prompts and --total_episodes %s can fill: using %d x %d",
                       training_args.per_device_train_batch_size, training_args.gradient_accumulation_steps,
                       num_processes, len(prompts["train"]), training_args.total_episodes, per_device, accumulation)
        training_args.per_device_train_batch_size, training_args.gradient_accumulation_steps = per_device, accumulation

    if reward_path == GROUND_TRUTH:
        prompt_length = max(len(ids) for split in prompts.values() for ids in split["input_ids"])
        reward_model = GroundTruthReward(tokenizer, prompt_length)
        # every prompt padded to prompt_length tokens, so that GroundTruthReward finds completions at that column
        collator = DataCollatorWithPadding(tokenizer, padding="max_length", max_length=prompt_length)
        value_model = load_model(model_args, tokenizer, num_labels=1)  # no reward model: the policy's body, a new head
    else:
        reward_model = load_reward_model(model_args, reward_path, tokenizer)
        collator = DataCollatorWithPadding(tokenizer)
    if training_args.reward_normalization_samples:
        normalize_reward(reward_model, policy, tokenizer, collator, prompts["train"], training_args)
    if reward_path != GROUND_TRUTH:
        value_model = copy.deepcopy(reward_model)  # starts as the reward model, normalised with it

    trainer = PPOTrainer(args=training_args, processing_class=tokenizer, model=policy,
                         ref_model=None,  # TRL makes a frozen copy, or with LoRA turns the adapters off
                         reward_model=reward_model, value_model=value_model, data_collator=collator,
                         train_dataset=prompts["train"], eval_dataset=prompts.get("test"),
                         callbacks=[SaveAtFractions(training_args.save_at_fractions)])
    trainer.train()

    if model_args.use_peft:
        # A standalone policy: a preset base exists on no Hub, so adapters alone could not be reloaded.
        trainer.model.policy = trainer.model.policy.merge_and_unload()
    trainer.save_model()
    trainer.save_state()


if __name__ == "__main__":
    run_script(main)
