"""Direct Preference Optimization as a transformers.Trainer subclass.

    python train_dpo.py [config.yaml] [--flags]          (accelerate launch train_dpo.py ... for several GPUs)

args -> tokenizer + policy -> preference pairs -> reference log-probs (once, cached) -> train -> save.
"""

import copy
import logging
import os
from collections import defaultdict
from dataclasses import dataclass, field

import torch
from transformers import Trainer, TrainingArguments

from utils import toy_task
from utils.cli import parse_args, setup_logging
from utils.data import PACKING_ATTENTION, DataArguments, PreferenceCollator, load_preference_data
from utils.generation import sample_completions
from utils.logprobs import model_logps
from utils.losses import LENGTH_AVERAGED_LOSSES, LOSS_TYPES, dpo_loss
from utils.modeling import ModelArguments, apply_lora, load_model, load_tokenizer, router_kwargs
from utils.reference import add_reference_columns, default_cache_dir

logger = logging.getLogger("train_dpo")


@dataclass
class DPOArguments(TrainingArguments):
    """TrainingArguments plus DPO's knobs, named as in TRL's DPOConfig where the concept is the same."""
    output_dir: str = field(default="outputs/dpo", metadata={"help": "Where the model, logs and results go."})
    learning_rate: float = 1e-6
    logging_steps: float = 10
    remove_unused_columns: bool = False  # the collator needs the token-id and reference columns
    bf16: bool | None = field(
        default=None, metadata={"help": "bf16 mixed precision (reference scoring too); default: on where CUDA "
                                        "supports it."})
    beta: float = field(default=0.1, metadata={"help": "Strength of the KL constraint to the reference."})
    loss_type: str = field(default="sigmoid", metadata={"help": "Preference loss.", "choices": list(LOSS_TYPES)})
    label_smoothing: float = field(
        default=0.0, metadata={"help": "Assumed label-flip probability (conservative DPO with sigmoid, robust DPO)."})
    rpo_alpha: float | None = field(
        default=None, metadata={"help": "Weight of an NLL term on the chosen completions (RPO); None: off."})
    reference_free: bool = field(default=False, metadata={"help": "Take reference log-probs as zero."})
    precompute_ref_log_probs: bool = field(
        default=True, metadata={"help": "Score the reference once before training (false: keep a frozen copy and "
                                        "score it every step)."})
    precompute_ref_batch_size: int | None = field(
        default=None, metadata={"help": "Batch size of reference scoring; default 4x per_device_eval_batch_size."})
    ref_logps_cache_dir: str | None = field(
        default=None, metadata={"help": "Cache of reference log-probs; default <HF_HOME>/dpo-ref-logps."})
    router_aux_loss_coef: float | None = field(
        default=None, metadata={"help": "Weight of the MoE load-balancing loss; default the model config's; 0: off."})
    padding_free: bool = field(
        default=False, metadata={"help": "Pack each batch's sequences into one row: no compute on padding "
                                         "(needs sdpa, eager or flash_attention_2)."})
    logps_chunk_size: int = field(
        default=1024, metadata={"help": "Completion tokens per chunk through the output layer (bounds logits memory)."})
    disable_dropout: bool = field(default=True, metadata={"help": "Zero all dropout so log-probs are deterministic."})
    toy_reward_prompts: int = field(
        default=0, metadata={"help": "Toy task: sample this many held-out prompts before and after training and "
                                     "log the mean ground-truth reward (0: off)."})


    def __post_init__(self):
        if self.bf16 is None:
            self.bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported() and not self.fp16
        super().__post_init__()


class DPOTrainer(Trainer):
    def __init__(self, *args, ref_model=None, **kwargs):
        super().__init__(*args, **kwargs)
        # compute_loss returns a per-pair mean, so the Trainer must average it over accumulation steps
        self.model_accepts_loss_kwargs = False
        self.ref_model = ref_model
        if ref_model is not None:
            self.ref_model = ref_model.to(self.accelerator.device).eval().requires_grad_(False)
        router_coef = getattr(self.model.config, "router_aux_loss_coef", 0.0)
        self.router_aux_loss_coef = self.args.router_aux_loss_coef if self.args.router_aux_loss_coef is not None \
            else router_coef
        self.use_router_aux_loss = bool(router_kwargs(self.model, True)) and self.router_aux_loss_coef != 0
        self._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}

    def reference_logps(self, model, inputs, num_pairs: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self.args.reference_free:
            zeros = torch.zeros(num_pairs, device=inputs["input_ids"].device)
            return zeros, zeros
        if "ref_chosen_logps" in inputs:
            return inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]
        with torch.no_grad():
            if self.ref_model is None:  # PEFT: the reference is the policy with its adapters off
                unwrapped = self.accelerator.unwrap_model(model)
                with unwrapped.disable_adapter():
                    sums, _, _ = model_logps(model, inputs, unwrapped=unwrapped, chunk_size=self.args.logps_chunk_size)
            else:
                sums, _, _ = model_logps(self.ref_model, inputs, chunk_size=self.args.logps_chunk_size)
        return sums.chunk(2)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        sums, num_tokens, aux_loss = model_logps(model, inputs, unwrapped=self.accelerator.unwrap_model(model),
                                                 router_aux_loss=self.use_router_aux_loss,
                                                 chunk_size=self.args.logps_chunk_size)
        policy_chosen_logps, policy_rejected_logps = sums.chunk(2)
        ref_chosen_logps, ref_rejected_logps = self.reference_logps(model, inputs, len(policy_chosen_logps))
        chosen_tokens, rejected_tokens = num_tokens.chunk(2)
        if self.args.loss_type in LENGTH_AVERAGED_LOSSES:  # per-token averages, policy and reference alike
            policy_chosen_logps, ref_chosen_logps = policy_chosen_logps / chosen_tokens, ref_chosen_logps / chosen_tokens
            policy_rejected_logps = policy_rejected_logps / rejected_tokens
            ref_rejected_logps = ref_rejected_logps / rejected_tokens

        losses, chosen_rewards, rejected_rewards = dpo_loss(
            policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
            beta=self.args.beta, loss_type=self.args.loss_type, label_smoothing=self.args.label_smoothing)
        loss = losses.mean()
        metrics = {
            "rewards/chosen": chosen_rewards, "rewards/rejected": rejected_rewards,
            "rewards/accuracies": (chosen_rewards > rejected_rewards).float(),
            "rewards/margins": chosen_rewards - rejected_rewards,
            "logps/chosen": policy_chosen_logps.detach(), "logps/rejected": policy_rejected_logps.detach(),
        }
        if self.args.rpo_alpha is not None:
            nll_loss = -sums.chunk(2)[0].sum() / chosen_tokens.sum()
            loss = loss + self.args.rpo_alpha * nll_loss
            metrics["nll_loss"] = nll_loss.detach()
        if self.use_router_aux_loss:
            loss = loss + self.router_aux_loss_coef * aux_loss
            metrics["aux_loss"] = aux_loss.detach()
        self.store_metrics(metrics, "train" if model.training else "eval")
        return (loss, metrics) if return_outputs else loss

    def store_metrics(self, metrics: dict, mode: str) -> None:
        for name, value in metrics.items():
            self._metrics[mode][name].append(self.accelerator.gather_for_metrics(value.reshape(-1)).mean().item())

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    def log(self, logs: dict, start_time: float | None = None) -> None:
        # The Trainer logs only the loss; add the DPO metrics averaged since the last log.
        mode = "eval" if any(key.startswith("eval_") for key in logs) else "train"
        prefix = "eval_" if mode == "eval" else ""
        logs.update({prefix + name: sum(values) / len(values) for name, values in self._metrics[mode].items()})
        self._metrics[mode].clear()
        super().log(logs, start_time)


def toy_reward_report(model, tokenizer, num_prompts: int, seed: int, when: str) -> float:
    """Sample held-out toy prompts, log a few completions and return the mean ground-truth reward."""
    prompts = toy_task.make_prompts(num_prompts, seed=seed)
    torch.manual_seed(seed)
    completions = sample_completions(model, tokenizer, prompts, max_new_tokens=32)
    rewards = toy_task.ground_truth_reward(completions)
    for prompt, completion, reward in list(zip(prompts, completions, rewards))[:3]:
        logger.info("%s DPO sample (reward %+.2f): %s|%s", when, reward, prompt, completion)
    mean_reward = sum(rewards) / len(rewards)
    logger.info("%s DPO: mean ground-truth reward %.3f over %d prompts", when, mean_reward, num_prompts)
    return mean_reward


def main(argv: list[str] | None = None) -> DPOTrainer:
    model_args, data_args, args = parse_args((ModelArguments, DataArguments, DPOArguments), argv)
    setup_logging(args)
    if args.loss_type == "robust" and not 0 <= args.label_smoothing < 0.5:
        raise SystemExit("--loss_type robust needs 0 <= --label_smoothing < 0.5")

    # model
    tokenizer = load_tokenizer(model_args)
    model = load_model(model_args, tokenizer)
    if model_args.use_peft:
        model = apply_lora(model, model_args)
    if args.disable_dropout:  # LoRA's dropout included
        for module in model.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
    ref_model = None
    if not args.precompute_ref_log_probs and not args.reference_free and not model_args.use_peft:
        ref_model = copy.deepcopy(model)  # only here: the frozen reference scored at every step

    # data, with reference log-probs computed once
    dataset = load_preference_data(data_args, tokenizer)
    if args.padding_free and model.config._attn_implementation not in PACKING_ATTENTION:
        raise SystemExit(f"--padding_free needs attention in {PACKING_ATTENTION}, "
                         f"not {model.config._attn_implementation}")
    collator = PreferenceCollator(tokenizer.pad_token_id, padding_free=args.padding_free)
    if args.precompute_ref_log_probs and not args.reference_free:
        dataset = add_reference_columns(
            model, dataset, collator, model_args=model_args, data_args=data_args, device=args.device,
            cache_dir=args.ref_logps_cache_dir or default_cache_dir(),
            batch_size=args.precompute_ref_batch_size or 4 * args.per_device_eval_batch_size,
            dtype=torch.bfloat16 if args.bf16 else torch.float16 if args.fp16 else torch.float32)

    trainer = DPOTrainer(model=model, ref_model=ref_model, args=args, train_dataset=dataset["train"],
                         eval_dataset=dataset.get("test"), data_collator=collator, processing_class=tokenizer)
    if args.toy_reward_prompts:
        reward_before = toy_reward_report(model, tokenizer, args.toy_reward_prompts, args.seed + 1, "before")

    # train
    result = trainer.train(resume_from_checkpoint=args.resume_from_checkpoint)
    trainer.log_metrics("train", result.metrics)
    trainer.save_metrics("train", result.metrics)
    if "test" in dataset:
        metrics = trainer.evaluate()
        trainer.log_metrics("eval", metrics)
        trainer.save_metrics("eval", metrics)
    if args.toy_reward_prompts:
        reward_after = toy_reward_report(model, tokenizer, args.toy_reward_prompts, args.seed + 1, "after")
        logger.info("mean ground-truth reward: %.3f before DPO -> %.3f after", reward_before, reward_after)

    # save
    trainer.save_model()
    trainer.save_state()
    logger.info("saved to %s", os.path.abspath(args.output_dir))
    return trainer


if __name__ == "__main__":
    main()
