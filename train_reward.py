"""Reward model: the learned reward of the PPO baseline, trained on the same preference pairs as DPO.

    python train_reward.py [config.yaml] [--flags]

A sequence classifier with one output (the policy's body plus a `score` head) is trained with TRL's RewardTrainer
on the Bradley-Terry loss; for a mixture of experts the router load-balancing loss is added. Held-out pairwise
accuracy is logged and written to eval_results.json.
"""

import logging
from dataclasses import dataclass, field

from accelerate.utils import is_peft_model
from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func
from trl import RewardConfig, RewardTrainer

from utils.checkpointing import SaveAtFractions, SaveAtFractionsArguments
from utils.cli import parse_args, report_metrics, run_script, setup_logging
from utils.data import DataArguments, load_preference_data
from utils.modeling import ModelArguments, apply_lora, load_model, load_tokenizer, router_kwargs
from utils.precision import bf16_field, compute_dtype, default_bf16

logger = logging.getLogger("train_reward")


@dataclass
class RewardArguments(SaveAtFractionsArguments, RewardConfig):
    output_dir: str = field(default="outputs/reward", metadata={"help": "Where the reward model and logs go."})
    num_train_epochs: float = 2.0
    learning_rate: float = 1e-3
    warmup_steps: float = 10
    per_device_train_batch_size: int = 32
    per_device_eval_batch_size: int = 50  # TRL averages accuracy per batch: 200 toy test pairs make 4 equal ones
    logging_steps: float = 20
    eval_strategy: str = "epoch"
    save_strategy: str = "no"
    # TRL turns it on by default; on CPU and small models it only costs time (--activation_checkpointing).
    gradient_checkpointing: bool | None = field(default=None, metadata={"help": "Deprecated alias of "
                                                                               "activation_checkpointing."})
    bf16: bool | None = bf16_field()  # TRL's default is on everywhere; ours is every script's (utils/precision.py)
    router_aux_loss_coef: float | None = field(
        default=None, metadata={"help": "Weight of the MoE load-balancing loss; default the model config's; 0: off."})
    # Owned by DataArguments and ModelArguments (one flag each): the trainer gets tokenised pairs and a built model.
    max_length: int | None = field(default=None, init=False)
    dataset_num_proc: int | None = field(default=None, init=False)
    trust_remote_code: bool = field(default=False, init=False)

    def __post_init__(self):
        self.bf16 = default_bf16(self)
        super().__post_init__()


class MoERewardTrainer(RewardTrainer):
    """RewardTrainer plus the router load-balancing loss (`router_aux_loss_coef * aux_loss`, logged as `aux_loss`).

    MixtralForCausalLM adds this loss itself, but MixtralForSequenceClassification drops its backbone's router logits
    (its output has no `aux_loss`), so a forward hook on the backbone collects them.
    """

    def __init__(self, *args, router_aux_loss_coef: float, **kwargs):
        super().__init__(*args, **kwargs)
        self.router_aux_loss_coef = router_aux_loss_coef

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        classifier = self.accelerator.unwrap_model(model)
        if is_peft_model(classifier):
            classifier = classifier.get_base_model()
        router_logits = []
        hook = classifier.base_model.register_forward_hook(
            lambda module, args, output: router_logits.extend(output.router_logits))
        try:
            loss, outputs = super().compute_loss(model, {**inputs, **router_kwargs(classifier, True)},
                                                 return_outputs=True)
        finally:
            hook.remove()
        aux_loss = load_balancing_loss_func(tuple(router_logits), classifier.config.num_local_experts,
                                            classifier.config.num_experts_per_tok, inputs["attention_mask"])
        mode = "train" if self.model.training else "eval"
        self._metrics[mode]["aux_loss"].append(self.accelerator.gather_for_metrics(aux_loss.detach()).mean().item())
        loss = loss + self.router_aux_loss_coef * aux_loss
        return (loss, outputs) if return_outputs else loss


def whole_sequences(rows: dict) -> dict:
    """Prompt + completion ids as RewardTrainer's pre-tokenised columns, keeping utils.data's prompt boundary."""
    return {"chosen_ids": [p + c for p, c in zip(rows["prompt_input_ids"], rows["chosen_input_ids"])],
            "rejected_ids": [p + r for p, r in zip(rows["prompt_input_ids"], rows["rejected_input_ids"])]}


def main(argv: list[str] | None = None):
    model_args, data_args, training_args = parse_args((ModelArguments, DataArguments, RewardArguments), argv)
    setup_logging(training_args)

    tokenizer = load_tokenizer(model_args, pad_apart_from_eos=True)  # TRL masks by pad_token_id
    model = load_model(model_args, tokenizer, num_labels=1, autocast_dtype=compute_dtype(training_args))
    if model_args.use_peft:
        model = apply_lora(model, model_args, modules_to_save=["score"])  # the new head must train in full

    pairs = load_preference_data(data_args, tokenizer)
    pairs = pairs.map(whole_sequences, batched=True, remove_columns=pairs["train"].column_names)
    if "test" not in pairs:
        training_args.eval_strategy = "no"
        logger.warning("%s has no test split: no held-out accuracy (set --eval_fraction to hold some out)",
                       data_args.dataset_name)

    router_coef = training_args.router_aux_loss_coef
    if router_coef is None:
        router_coef = getattr(model.config, "router_aux_loss_coef", 0.0)
    trainer_kwargs = dict(model=model, args=training_args, train_dataset=pairs["train"],
                          eval_dataset=pairs.get("test"), processing_class=tokenizer,
                          callbacks=[SaveAtFractions(training_args.save_at_fractions)])
    if router_kwargs(model, True) and router_coef != 0:
        trainer = MoERewardTrainer(**trainer_kwargs, router_aux_loss_coef=router_coef)
    else:
        trainer = RewardTrainer(**trainer_kwargs)
    result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    metrics = report_metrics(trainer, result, evaluate="test" in pairs)
    if metrics is not None:
        logger.info("held-out pairwise accuracy: %.3f on %d pairs", metrics["eval_accuracy"], len(pairs["test"]))

    if model_args.use_peft:
        # A standalone reward model for PPO: a preset base exists on no Hub, so adapters alone could not be reloaded.
        trainer.model = trainer.model.merge_and_unload()
    trainer.save_model()
    trainer.save_state()


if __name__ == "__main__":
    run_script(main)
