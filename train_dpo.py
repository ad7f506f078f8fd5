"""Direct Preference Optimization as a transformers.Trainer subclass.

    python train_dpo.py [config.yaml] [--flags]          (accelerate launch train_dpo.py ... for several GPUs)

args -> tokenizer + policy -> preference pairs -> reference log-probs (once, cached) -> train -> save.
"""

import logging
import os
from dataclasses import dataclass, field

import torch
from transformers import TrainingArguments

from utils import toy_task
from utils.checkpointing import (ExactCheckpointLoading, GracefulInterrupt, SaveAtFractions, SaveAtFractionsArguments,
                                 exit_if_interrupted, latest_checkpoint, resolve_resume)
from utils.cli import parse_args, report_metrics, run_script, setup_logging
from utils.data import DataArguments, PreferenceCollator, load_preference_data
from utils.dry_run import dry_run_report
from utils.errors import ConfigError, NonFiniteError
from utils.families import check_model_family, packing_unfit
from utils.generation import sample_completions
from utils.guards import FirstBatchChecks, NonFiniteGuard
from utils.logprobs import model_logps
from utils.losses import FLAG_DEFAULTS, LOSSES, PairLogps, logged_metrics, preference_loss, uses_reference
from utils.metrics import DeviceMetrics
from utils.modeling import (PACKED_ROW_ATTENTIONS, ModelArguments, apply_lora, causal_lm_class, disable_dropout,
                            load_model, load_tokenizer, model_attention, model_sliding_window, packed_rows_by_default,
                            router_kwargs)
from utils.precision import bf16_field, compute_dtype, default_bf16
from utils.preflight import check_ranges, check_writable, disk_full_as_error
from utils.reference import ReferenceScoring, default_cache_dir
from utils.speed import SpeedMeter

logger = logging.getLogger("train_dpo")


@dataclass
class DPOArguments(SaveAtFractionsArguments, TrainingArguments):
    """TrainingArguments plus DPO's knobs, named as in TRL's DPOConfig where the concept is the same."""
    output_dir: str = field(default="outputs/dpo", metadata={"help": "Where the model, logs and results go."})
    learning_rate: float = 1e-6
    logging_steps: float = 10
    remove_unused_columns: bool = False  # the collator needs the token-id and reference columns
    bf16: bool | None = bf16_field()  # reference scoring too
    beta: float = field(default=0.1, metadata={"help": "Strength of the KL constraint to the reference."})
    loss_type: list[str] = field(
        default_factory=lambda: ["sigmoid"],
        metadata={"help": "Preference loss, or several summed with --loss_weights (TRL's form: [sigmoid, sft] is RPO).",
                  "choices": list(LOSSES)})
    loss_weights: list[float] | None = field(
        default=None, metadata={"help": "One weight per --loss_type entry; default 1 each."})
    label_smoothing: float = field(
        default=0.0, metadata={"help": "Assumed label-flip probability (conservative DPO with sigmoid, robust DPO)."})
    simpo_gamma: float | None = field(
        default=None, metadata={"help": f"SimPO's target margin gamma; default {FLAG_DEFAULTS['simpo_gamma']}."})
    rpo_alpha: float | None = field(
        default=None, metadata={"help": "Shorthand: append sft to --loss_type with this weight (RPO); None: off."})
    reference_free: bool = field(default=False, metadata={"help": "Take reference log-probs as zero (any loss)."})
    precompute_ref_log_probs: bool = field(
        default=True, metadata={"help": "Score the reference once before training (false: keep a frozen copy and "
                                        "score it every step)."})
    precompute_ref_batch_size: int | None = field(
        default=None, metadata={"help": "Batch size of reference scoring; default 4x per_device_eval_batch_size."})
    ref_logps_cache_dir: str | None = field(
        default=None, metadata={"help": "Cache of reference log-probs; default <HF_HOME>/dpo-ref-logps."})
    router_aux_loss_coef: float = field(
        default=0.001, metadata={"help": "Weight of the MoE load-balancing loss (TRL's default, not the model "
                                         "config's: docs/recipes.md); 0: off."})
    padding_free: bool | None = field(
        default=None, metadata={"help": "Pack each batch's sequences into one row: no compute on padding. Default: "
                                        "on where CUDA has a variable-length flash kernel (attention then costs "
                                        "the sequences' own lengths), off on CPU; decided in check_arguments.",
                                        "nargs": "?", "const": True})
    # The non-finite guard (utils/guards.py) stops on such a loss; the Trainer's filter reads every step's loss on
    # the host, a device sync per step.
    logging_nan_inf_filter: bool = False
    pad_to_multiple_of: int | None = field(
        default=None, metadata={"help": "Pad each batch's width up to a multiple of this (repeating shapes)."})
    logps_chunk_size: int = field(
        default=4096, metadata={"help": "Completion tokens per chunk through the output layer: bounds the logits' "
                                        "memory (4096 x 32k vocab x fp32 = 0.5 GB); beyond one chunk, each is "
                                        "recomputed in backward."})
    disable_dropout: bool = field(default=True, metadata={"help": "Zero all dropout so log-probs are deterministic."})
    check_logps: bool = field(
        default=True, metadata={"help": "Before the first step, check our log-probs of the first batch against the "
                                        "model's own forward() (one extra forward of the batch); a mismatch stops."})
    check_step0_rewards: bool = field(
        default=True, metadata={"help": "At a fresh start, check that step 0's implicit rewards are 0 (the reference "
                                        "scores what the initial policy scores); otherwise stop. Costs nothing."})
    dry_run: bool = field(
        default=False, metadata={"help": "Load and tokenise the data, apply the row policy, look up the reference "
                                         "cache and estimate the memory of a step; print the report and stop, "
                                         "writing nothing."})
    toy_reward_prompts: int = field(
        default=0, metadata={"help": "Toy task: sample this many held-out prompts before and after training and "
                                     "log the mean ground-truth reward (0: off)."})


    def __post_init__(self):
        self.bf16 = default_bf16(self)
        super().__post_init__()
        if isinstance(self.loss_type, str):  # a YAML recipe's `loss_type: sigmoid`
            self.loss_type = [self.loss_type]
        if self.rpo_alpha is not None:
            if self.rpo_alpha < 0:
                raise ValueError(f"--rpo_alpha must be >= 0, got {self.rpo_alpha}")
            self.loss_weights = [*(self.loss_weights or [1.0] * len(self.loss_type)), self.rpo_alpha]
            self.loss_type = [*self.loss_type, "sft"]
            self.rpo_alpha = None  # now in the lists: a second __post_init__ (to_dict round trip) adds nothing
        if self.dataloader_pin_memory and not self.use_cpu and torch.cuda.is_available():
            # batches reach the GPU from pinned memory without waiting: a blocking copy syncs the stream
            self.accelerator_config.non_blocking = True


def check_arguments(model_args: ModelArguments, args: DPOArguments) -> None:
    """Flag combinations that cannot work and folders that cannot be written, refused before anything is loaded or
    written (which flags a loss reads comes from the registry, utils/losses.py; each flag's range is checked by
    utils/preflight.py check_ranges); and --padding_free's default, which depends on the model's config."""
    unknown = [name for name in args.loss_type if name not in LOSSES]
    if unknown:
        raise ConfigError(f"--loss_type {unknown}: unknown; choose from {list(LOSSES)}")
    if len(set(args.loss_type)) < len(args.loss_type):
        raise ConfigError(f"--loss_type {args.loss_type} names a loss twice")
    if args.loss_weights is not None and (len(args.loss_weights) != len(args.loss_type)
                                          or any(weight < 0 for weight in args.loss_weights)):
        raise ConfigError(f"--loss_weights {args.loss_weights} must be one weight >= 0 per --loss_type "
                          f"{args.loss_type}")
    readers = {flag: [name for name in args.loss_type if flag in LOSSES[name].flags] for flag in FLAG_DEFAULTS}
    if args.label_smoothing and not readers["label_smoothing"]:
        applies = [name for name, spec in LOSSES.items() if "label_smoothing" in spec.flags]
        raise ConfigError(f"--label_smoothing has no meaning for --loss_type {' '.join(args.loss_type)}; it applies "
                          f"to {applies}")
    if readers["label_smoothing"] and not 0 <= args.label_smoothing < 0.5:
        raise ConfigError(f"--loss_type {' '.join(readers['label_smoothing'])} needs 0 <= --label_smoothing < 0.5 "
                          f"(a label-flip probability), got {args.label_smoothing}")
    if args.simpo_gamma is not None and not readers["simpo_gamma"]:
        raise ConfigError(f"--simpo_gamma has no meaning for --loss_type {' '.join(args.loss_type)}; it applies to "
                          "simpo")
    model_class = causal_lm_class(model_args)  # from the config alone: nothing is loaded yet
    check_model_family(model_class, training=True)
    window, unfit = model_sliding_window(model_args), packing_unfit(model_class)
    if args.padding_free and unfit:
        raise ConfigError(f"--padding_free: {unfit}; its rows must be padded (leave --padding_free off)")
    if args.padding_free is None:
        args.padding_free = unfit is None and packed_rows_by_default(args.use_cpu, args.bf16 or args.fp16, window)
    attention = model_attention(model_args, args.padding_free, compute_dtype(args))
    if args.padding_free and attention not in PACKED_ROW_ATTENTIONS:
        raise ConfigError(f"--padding_free needs --attn_implementation in {PACKED_ROW_ATTENTIONS}, not {attention}")
    check_writable(args.output_dir, "output_dir")
    if args.precompute_ref_log_probs and not args.reference_free and uses_reference(args.loss_type):
        check_writable(args.ref_logps_cache_dir or default_cache_dir(), "ref_logps_cache_dir")


class DPOTrainer(ReferenceScoring, NonFiniteGuard, FirstBatchChecks, ExactCheckpointLoading):
    """The DPO loss on the Trainer: one forward of chosen + rejected, completion log-probs, the registry's loss.

    The reference's log-probs come from `ReferenceScoring` (utils/reference.py: precomputed and cached, a frozen copy,
    or adapters off); `NonFiniteGuard` stops on a NaN step; `FirstBatchChecks` checks the first batch's log-probs
    against the model's own forward and step 0's rewards against 0; `ExactCheckpointLoading` reloads MoE
    checkpoints."""

    def __init__(self, *args, **kwargs):
        dpo_args = kwargs["args"]
        super().__init__(*args, uses_reference=not dpo_args.reference_free and uses_reference(dpo_args.loss_type),
                         **kwargs)
        # compute_loss returns a per-pair mean, so the Trainer must average it over accumulation steps
        self.model_accepts_loss_kwargs = False
        self.router_aux_loss_coef = self.args.router_aux_loss_coef
        self.use_router_aux_loss = bool(router_kwargs(self.model, True)) and self.router_aux_loss_coef != 0
        self.metrics = DeviceMetrics(self.accelerator)
        self.speed = SpeedMeter(self.model.config, self.accelerator, compute_dtype(self.args))

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        dtype = compute_dtype(self.args)
        policy = model_logps(model, inputs, unwrapped=self.accelerator.unwrap_model(model),
                             router_aux_loss=self.use_router_aux_loss, chunk_size=self.args.logps_chunk_size,
                             dtype=dtype)
        policy_chosen_logps, policy_rejected_logps = policy.sums.chunk(2)
        ref_chosen_logps, ref_rejected_logps = self.reference_logps(model, inputs, len(policy_chosen_logps))
        self.check_first_batch(model, inputs, policy.sums, policy.num_tokens, (ref_chosen_logps, ref_rejected_logps),
                               dtype)
        chosen_tokens, rejected_tokens = policy.num_tokens.chunk(2)
        logps = PairLogps(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
                          chosen_tokens, rejected_tokens)
        losses, _, _, terms = preference_loss(
            logps, self.args.loss_type, self.args.loss_weights, beta=self.args.beta,
            label_smoothing=self.args.label_smoothing, simpo_gamma=self.args.simpo_gamma)
        loss = losses.mean()
        metrics = logged_metrics(logps, self.args.loss_type, self.args.beta)  # TRL's names mean TRL's quantities
        if "sft" in terms:
            metrics["nll_loss"] = terms["sft"]
        # a MoE that balances its experts without a loss (DeepSeek-V3's routing bias) returns none
        if self.use_router_aux_loss and policy.aux_loss is not None:
            loss = loss + self.router_aux_loss_coef * policy.aux_loss
            losses = losses + self.router_aux_loss_coef * policy.aux_loss
            metrics["aux_loss"] = policy.aux_loss.detach()
        if not model.training:
            # per pair, so that evaluation averages over pairs; the Trainer's own eval_loss repeats each batch's
            # mean, duplicates included, and is replaced by this one when logged
            metrics["loss"] = losses.detach()
        self.metrics.add(metrics, "train" if model.training else "eval")
        if model.training:
            self.speed.add(inputs)
        return (loss, metrics) if return_outputs else loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    def log(self, logs: dict, start_time: float | None = None) -> None:
        # The Trainer logs only the loss; add the DPO metrics averaged since the last log.
        mode = "eval" if any(key.startswith("eval_") for key in logs) else "train"
        prefix = "eval_" if mode == "eval" else ""
        logs.update({prefix + name: mean for name, mean in self.metrics.pop_means(mode).items()})
        if mode == "eval":
            self.speed.restart()
        else:  # tokens/s and the share of the matmul peak since the last log; the run's in the final one
            speed = self.speed.pop()
            logs.update(self.speed.totals() if "train_runtime" in logs else speed)
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


def main(argv: list[str] | None = None) -> DPOTrainer | None:
    model_args, data_args, args = parse_args((ModelArguments, DataArguments, DPOArguments), argv)
    setup_logging(args)
    check_ranges(model_args, data_args, args)
    check_arguments(model_args, args)
    resume_from = resolve_resume(args.resume_from_checkpoint, args.output_dir)
    if args.dry_run:  # the run before the run: rows, lengths, tokens per step, reference cache, memory
        report = dry_run_report(model_args, data_args, args)
        if args.should_log:
            print(report)
        return None

    # model
    tokenizer = load_tokenizer(model_args)
    model = load_model(model_args, tokenizer, packed=args.padding_free, autocast_dtype=compute_dtype(args))
    if model_args.use_peft:
        model = apply_lora(model, model_args)
    if args.disable_dropout:  # LoRA's dropout included
        disable_dropout(model)

    # data; the trainer adds reference log-probs (cached, or scored once the engine has sharded the model)
    dataset = load_preference_data(data_args, tokenizer)
    collator = PreferenceCollator(tokenizer.pad_token_id, padding_free=args.padding_free,
                                  pad_to_multiple_of=args.pad_to_multiple_of)

    interrupt = GracefulInterrupt()  # SIGTERM/SIGINT: checkpoint at the end of the step, then stop
    trainer = DPOTrainer(model=model, args=args, train_dataset=dataset["train"],
                         eval_dataset=dataset.get("test"), data_collator=collator, processing_class=tokenizer,
                         model_args=model_args, data_args=data_args,
                         callbacks=[interrupt, SaveAtFractions(args.save_at_fractions)])
    if args.toy_reward_prompts:
        reward_before = toy_reward_report(model, tokenizer, args.toy_reward_prompts, args.seed + 1, "before")

    # train
    try:
        with interrupt, disk_full_as_error(args.output_dir, "a checkpoint"):
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
    with disk_full_as_error(args.output_dir, "the model"):
        trainer.save_model()
        trainer.save_state()
    logger.info("saved to %s", os.path.abspath(args.output_dir))
    return trainer


if __name__ == "__main__":
    run_script(main)
