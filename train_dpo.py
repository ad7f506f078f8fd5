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
from transformers import TrainingArguments

from utils import toy_task
from utils.checkpointing import (GracefulInterrupt, ResumableTrainer, exit_if_interrupted, latest_checkpoint,
                                 resolve_resume)
from utils.cli import parse_args, report_metrics, run_script, setup_logging
from utils.data import DataArguments, PreferenceCollator, load_preference_data
from utils.generation import sample_completions
from utils.errors import ConfigError, NonFiniteError
from utils.logprobs import model_logps
from utils.losses import LENGTH_AVERAGED_LOSSES, LOSS_TYPES, dpo_loss
from utils.modeling import (PACKING_ATTENTION, ModelArguments, apply_lora, load_model, load_tokenizer,
                            packed_rows_by_default, resolve_attn_implementation, router_kwargs)
from utils.precision import bf16_field, default_bf16
from utils.reference import (REF_COLUMNS, default_cache_dir, load_cached_logps, reference_fingerprint, reference_mode,
                             score_and_cache)

logger = logging.getLogger("train_dpo")


@dataclass
class DPOArguments(TrainingArguments):
    """TrainingArguments plus DPO's knobs, named as in TRL's DPOConfig where the concept is the same."""
    output_dir: str = field(default="outputs/dpo", metadata={"help": "Where the model, logs and results go."})
    learning_rate: float = 1e-6
    logging_steps: float = 10
    remove_unused_columns: bool = False  # the collator needs the token-id and reference columns
    bf16: bool | None = bf16_field()  # reference scoring too
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
    padding_free: bool | None = field(
        default=None, metadata={"help": "Pack each batch's sequences into one row: no compute on padding. Default: "
                                        "on where CUDA has a variable-length flash kernel (attention then costs "
                                        "the sequences' own lengths), off on CPU.", "nargs": "?", "const": True})
    # The non-finite guard (utils/guards.py) stops on such a loss; the Trainer's filter reads every step's loss on
    # the host, a device sync per step.
    logging_nan_inf_filter: bool = False
    logps_chunk_size: int = field(
        default=4096, metadata={"help": "Completion tokens per chunk through the output layer: bounds the logits' "
                                        "memory (4096 x 32k vocab x fp32 = 0.5 GB); beyond one chunk, each is "
                                        "recomputed in backward."})
    disable_dropout: bool = field(default=True, metadata={"help": "Zero all dropout so log-probs are deterministic."})
    toy_reward_prompts: int = field(
        default=0, metadata={"help": "Toy task: sample this many held-out prompts before and after training and "
                                     "log the mean ground-truth reward (0: off)."})


    def __post_init__(self):
        self.bf16 = default_bf16(self)
        super().__post_init__()
        if self.padding_free is None:
            self.padding_free = packed_rows_by_default(self.use_cpu, self.bf16 or self.fp16)
        if self.dataloader_pin_memory and not self.use_cpu and torch.cuda.is_available():
            # batches reach the GPU from pinned memory without waiting: a blocking copy syncs the stream
            self.accelerator_config.non_blocking = True


def check_arguments(model_args: ModelArguments, args: DPOArguments) -> None:
    """Flag combinations that cannot work, refused before anything is loaded or written."""
    if args.beta <= 0:
        raise ConfigError(f"--beta must be > 0, got {args.beta}")
    if args.loss_type in ("sigmoid", "robust") and not 0 <= args.label_smoothing < 0.5:
        raise ConfigError(f"--loss_type {args.loss_type} needs 0 <= --label_smoothing < 0.5 (a label-flip "
                          f"probability), got {args.label_smoothing}")
    if args.loss_type not in ("sigmoid", "robust") and args.label_smoothing != 0:
        raise ConfigError(f"--label_smoothing has no meaning for --loss_type {args.loss_type} (only sigmoid and "
                          f"robust); got {args.label_smoothing}")
    if args.rpo_alpha is not None and args.rpo_alpha < 0:
        raise ConfigError(f"--rpo_alpha must be >= 0, got {args.rpo_alpha}")
    for name in ("logps_chunk_size", "precompute_ref_batch_size"):
        if getattr(args, name) is not None and getattr(args, name) <= 0:
            raise ConfigError(f"--{name} must be > 0, got {getattr(args, name)}")
    attention = resolve_attn_implementation(model_args.attn_implementation, args.padding_free)
    if args.padding_free and attention not in PACKING_ATTENTION:
        raise ConfigError(f"--padding_free needs --attn_implementation in {PACKING_ATTENTION}, not {attention}")


class DPOTrainer(ResumableTrainer):
    """The DPO loss on the Trainer. With `precompute_ref_log_probs`, datasets without reference columns get them
    at the start of train(): from the cache if there (`model_args` and `data_args` identify the reference), else
    scored through the model as the engine (DDP, FSDP, DeepSpeed) has prepared it, so no rank holds an
    unsharded copy."""

    def __init__(self, *args, ref_model=None, model_args=None, data_args=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.reference_identity = (model_args, data_args)
        if ref_model is not None and (self.is_deepspeed_enabled or self.is_fsdp_enabled):
            raise ValueError("a frozen reference model (--precompute_ref_log_probs false without LoRA) would be a "
                             "full unsharded copy on every rank under DeepSpeed/FSDP: keep the default "
                             "--precompute_ref_log_probs true, or use --use_peft")
        # compute_loss returns a per-pair mean, so the Trainer must average it over accumulation steps
        self.model_accepts_loss_kwargs = False
        self.ref_model = ref_model
        if ref_model is not None:
            self.ref_model = ref_model.to(self.accelerator.device).eval().requires_grad_(False)
        router_coef = getattr(self.model.config, "router_aux_loss_coef", 0.0)
        self.router_aux_loss_coef = self.args.router_aux_loss_coef if self.args.router_aux_loss_coef is not None \
            else router_coef
        self.use_router_aux_loss = bool(router_kwargs(self.model, True)) and self.router_aux_loss_coef != 0
        # per metric: its sum so far on the device (no host sync per step) and its count on the host
        self._metric_sums = {"train": {}, "eval": {}}
        self._metric_counts = {"train": defaultdict(int), "eval": defaultdict(int)}

    # ------------------------------------------------------------ reference log-probs, precomputed once

    def _splits(self) -> dict:
        splits = {"train": self.train_dataset}
        if isinstance(self.eval_dataset, dict):
            splits.update({f"eval_{name}": dataset for name, dataset in self.eval_dataset.items()})
        elif self.eval_dataset is not None:
            splits["eval"] = self.eval_dataset
        return splits

    def _set_split(self, split: str, dataset) -> None:
        if split == "train":
            self.train_dataset = dataset
        elif split == "eval":
            self.eval_dataset = dataset
        else:
            self.eval_dataset = {**self.eval_dataset, split.removeprefix("eval_"): dataset}

    @property
    def compute_dtype(self) -> torch.dtype:
        """The training's precision, in which the policy and every kind of reference compute their log-probs."""
        return torch.bfloat16 if self.args.bf16 else torch.float16 if self.args.fp16 else torch.float32

    def _reference_settings(self) -> tuple[str, torch.dtype, int]:
        """Cache folder, scoring dtype (the training's precision) and batch size of reference scoring."""
        return (self.args.ref_logps_cache_dir or default_cache_dir(), self.compute_dtype,
                self.args.precompute_ref_batch_size or 4 * self.args.per_device_eval_batch_size)

    def load_cached_reference(self, include_train: bool = True) -> dict[str, str]:
        """Add cached reference columns to the datasets that lack them; return {split: fingerprint} of those that
        must still be scored. Runs no forward pass, so it works before any engine has touched the model."""
        if not self.args.precompute_ref_log_probs or self.args.reference_free:
            return {}
        unscored = {split: dataset for split, dataset in self._splits().items()
                    if (include_train or split != "train") and hasattr(dataset, "column_names")
                    and not set(REF_COLUMNS) <= set(dataset.column_names)}
        if not unscored:
            return {}
        model_args, data_args = self.reference_identity
        if model_args is None or data_args is None:
            raise ValueError("DPOTrainer: to precompute reference log-probs, pass model_args and data_args (the "
                             "reference's identity), or datasets that already have ref_chosen_logps/ref_rejected_logps")
        cache_dir, dtype, _ = self._reference_settings()
        unwrapped = self.accelerator.unwrap_model(self.model)
        pending = {}
        for split, dataset in unscored.items():
            fingerprint = reference_fingerprint(model_args, unwrapped, dataset, data_args, dtype)
            cached = load_cached_logps(dataset, fingerprint=fingerprint, cache_dir=cache_dir, split=split)
            if cached is None:
                pending[split] = fingerprint
            else:
                self._set_split(split, cached)
        return pending

    def score_reference(self, model, pending: dict[str, str]) -> None:
        """Score the reference on the `pending` splits ({split: fingerprint}) through `model`, the model as the
        engine wrapped it: every rank scores its share of the batches on the sharded weights."""
        cache_dir, dtype, batch_size = self._reference_settings()
        unwrapped = self.accelerator.unwrap_model(model)
        splits = self._splits()
        was_training = model.training
        with reference_mode(unwrapped):
            for split, fingerprint in pending.items():
                self._set_split(split, score_and_cache(
                    splits[split], model, self.data_collator, fingerprint=fingerprint, cache_dir=cache_dir,
                    batch_size=batch_size, split=split, dtype=dtype, unwrapped=unwrapped,
                    chunk_size=self.args.logps_chunk_size))
        model.train(was_training)

    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        self._reference_pending = pending = self.load_cached_reference()
        if pending and resume_from_checkpoint:  # the weights are no longer the reference's
            raise ValueError(f"resuming from a checkpoint, but the reference log-probs of {sorted(pending)} are not in "
                             f"the cache {self._reference_settings()[0]}: point --ref_logps_cache_dir at the first "
                             "run's cache")
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def _prepare_for_training(self, max_steps, train_dataloader, resume_from_checkpoint):
        # transformers 5.23 Trainer internals: on return, accelerate has wrapped, placed and sharded the model
        # (DDP, FSDP2, DeepSpeed engine) and no step has run: the moment to score the reference through it.
        model, train_dataloader = super()._prepare_for_training(max_steps, train_dataloader, resume_from_checkpoint)
        pending, self._reference_pending = getattr(self, "_reference_pending", {}), {}
        if pending:
            self.score_reference(model, pending)
            if "train" in pending:  # the loop's dataloader was built over the unscored rows: rebuild it
                stale, train_dataloader = train_dataloader, self.get_train_dataloader()
                if stale in getattr(self.accelerator, "_dataloaders", []):
                    self.accelerator._dataloaders.remove(stale)
                self.callback_handler.train_dataloader = train_dataloader
        return model, train_dataloader

    def evaluate(self, eval_dataset=None, *args, **kwargs):
        if eval_dataset is None and self.load_cached_reference(include_train=False):
            raise RuntimeError("reference log-probs of the eval set are neither cached nor scored yet: they are "
                               "scored when train() has prepared the model, so call train() first")
        return super().evaluate(eval_dataset, *args, **kwargs)

    def reference_logps(self, model, inputs, num_pairs: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self.args.reference_free:
            zeros = torch.zeros(num_pairs, device=inputs["input_ids"].device)
            return zeros, zeros
        if "ref_chosen_logps" in inputs:
            return inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]
        scoring = dict(chunk_size=self.args.logps_chunk_size, dtype=self.compute_dtype)
        with torch.no_grad():
            if self.ref_model is None:  # PEFT: the reference is the policy with its adapters off
                unwrapped = self.accelerator.unwrap_model(model)
                with unwrapped.disable_adapter():
                    sums, _, _ = model_logps(model, inputs, unwrapped=unwrapped, **scoring)
            else:  # the frozen copy, which accelerate never prepared, computes at the policy's precision too
                sums, _, _ = model_logps(self.ref_model, inputs, **scoring)
        return sums.chunk(2)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        sums, num_tokens, aux_loss = model_logps(model, inputs, unwrapped=self.accelerator.unwrap_model(model),
                                                 router_aux_loss=self.use_router_aux_loss,
                                                 chunk_size=self.args.logps_chunk_size, dtype=self.compute_dtype)
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
        if not model.training:
            # per pair, so that evaluation averages over pairs (store_metrics); the Trainer's own eval_loss repeats
            # each batch's mean, duplicates included, and is replaced by this one when logged
            metrics["loss"] = (losses + (loss - losses.mean())).detach()
        self.store_metrics(metrics, "train" if model.training else "eval")
        return (loss, metrics) if return_outputs else loss

    def store_metrics(self, metrics: dict[str, torch.Tensor], mode: str) -> None:
        """Add this batch's metrics (per pair, or one value per batch) to the running sums, on the device.

        Evaluation gathers per-pair values with `gather_for_metrics`, which drops the samples that pad the last
        batch of an eval set that does not divide by the number of processes; per-batch values (aux_loss, nll_loss)
        are gathered from every rank. Training sums are reduced over ranks when logged (`log`)."""
        sums = self._metric_sums[mode]
        for name, value in metrics.items():
            value = value.detach().float()
            if mode == "eval":
                value = self.accelerator.gather_for_metrics(value) if value.dim() else self.accelerator.gather(value[None])
            sums[name] = sums[name] + value.sum() if name in sums else value.sum()
            self._metric_counts[mode][name] += value.numel()

    def metric_means(self, mode: str) -> dict[str, float]:
        """Each metric's mean since the last log, over all ranks (one device sync: the values reach the host here)."""
        sums, counts = self._metric_sums[mode], self._metric_counts[mode]
        if not sums:
            return {}
        totals = torch.stack([torch.stack(list(sums.values())),
                              torch.tensor([float(counts[name]) for name in sums], device=self.args.device)])
        if mode == "train":  # evaluation gathered its values already
            totals = self.accelerator.reduce(totals, reduction="sum")
        return {name: total / count for name, (total, count) in zip(sums, totals.T.tolist())}

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    def log(self, logs: dict, start_time: float | None = None) -> None:
        # The Trainer logs only the loss; add the DPO metrics averaged since the last log.
        mode = "eval" if any(key.startswith("eval_") for key in logs) else "train"
        prefix = "eval_" if mode == "eval" else ""
        logs.update({prefix + name: mean for name, mean in self.metric_means(mode).items()})
        self._metric_sums[mode].clear()
        self._metric_counts[mode].clear()
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
    check_arguments(model_args, args)
    resume_from = resolve_resume(args.resume_from_checkpoint, args.output_dir)

    # model
    tokenizer = load_tokenizer(model_args)
    model = load_model(model_args, tokenizer, packed=args.padding_free)
    if model_args.use_peft:
        model = apply_lora(model, model_args)
    if args.disable_dropout:  # LoRA's dropout included
        for module in model.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
    ref_model = None
    if not args.precompute_ref_log_probs and not args.reference_free and not model_args.use_peft:
        ref_model = copy.deepcopy(model)  # only here: the frozen reference scored at every step

    # data; the trainer adds reference log-probs (cached, or scored once the engine has sharded the model)
    dataset = load_preference_data(data_args, tokenizer)
    collator = PreferenceCollator(tokenizer.pad_token_id, padding_free=args.padding_free)

    interrupt = GracefulInterrupt()  # SIGTERM/SIGINT: checkpoint at the end of the step, then stop
    trainer = DPOTrainer(model=model, ref_model=ref_model, args=args, train_dataset=dataset["train"],
                         eval_dataset=dataset.get("test"), data_collator=collator, processing_class=tokenizer,
                         model_args=model_args, data_args=data_args,
                         callbacks=[interrupt])
    if args.toy_reward_prompts:
        reward_before = toy_reward_report(model, tokenizer, args.toy_reward_prompts, args.seed + 1, "before")

    # train
    try:
        with interrupt:
            result = trainer.train(resume_from_checkpoint=resume_from)
    except NonFiniteError:
        logger.error("last good checkpoint: %s", latest_checkpoint(args.output_dir) or "none saved")
        raise
    exit_if_interrupted(trainer, interrupt)
    report_metrics(trainer, result, evaluate="test" in dataset)
    if args.toy_reward_prompts:
        reward_after = toy_reward_report(model, tokenizer, args.toy_reward_prompts, args.seed + 1, "after")
        logger.info("mean ground-truth reward: %.3f before DPO -> %.3f after", reward_before, reward_after)

    # save
    if trainer.is_fsdp_enabled:  # checkpoints stay sharded; the final model is one Hugging Face checkpoint
        trainer.accelerator.state.fsdp_plugin.set_state_dict_type("FULL_STATE_DICT")
    trainer.save_model()
    trainer.save_state()
    logger.info("saved to %s", os.path.abspath(args.output_dir))
    return trainer


if __name__ == "__main__":
    run_script(main)
