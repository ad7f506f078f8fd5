"""Supervised fine-tuning: the starting policy (and reference) for DPO and PPO.

    python train_sft.py [config.yaml] [--flags]

On the built-in toy task it learns to write movie reviews; on a preference dataset it trains on the
chosen completions with the prompt masked out (Preferred-FT).
"""

import logging
from dataclasses import dataclass, field

from datasets import Dataset
from transformers import DataCollatorForSeq2Seq, TrainingArguments

from utils import toy_task
from utils.checkpointing import (ExactCheckpointLoading, GracefulInterrupt, SaveAtFractions, SaveAtFractionsArguments,
                                 exit_if_interrupted, resolve_resume)
from utils.cli import parse_args, report_metrics, run_script, setup_logging
from utils.data import DataArguments, load_preference_data
from utils.generation import sample_completions
from utils.guards import NonFiniteGuard
from utils.modeling import ModelArguments, apply_lora, load_model, load_tokenizer
from utils.precision import bf16_field, compute_dtype, default_bf16

logger = logging.getLogger("train_sft")
IGNORE_INDEX = -100  # labels the loss skips (transformers' convention)


class SFTTrainer(NonFiniteGuard, ExactCheckpointLoading):
    """The Trainer's own next-token loss, guarded against non-finite steps, with exact checkpoint reloads."""


@dataclass
class SFTArguments(SaveAtFractionsArguments, TrainingArguments):
    output_dir: str = field(default="outputs/sft", metadata={"help": "Where the model and logs go."})
    num_train_epochs: float = 2.0
    learning_rate: float = 2e-3
    warmup_steps: float = 20
    per_device_train_batch_size: int = 32
    logging_steps: float = 20
    save_strategy: str = "no"
    bf16: bool | None = bf16_field()
    toy_num_reviews: int = field(default=4000, metadata={"help": "Toy task: reviews in the SFT corpus."})
    num_samples_to_show: int = field(default=4, metadata={"help": "Completions sampled and logged at the end."})

    def __post_init__(self):
        self.bf16 = default_bf16(self)
        super().__post_init__()


def toy_corpus(tokenizer, num_reviews: int, seed: int) -> Dataset:
    reviews = toy_task.make_corpus(num_reviews, seed=seed)
    ids = [tokenizer(text)["input_ids"] + [tokenizer.eos_token_id] for text in reviews]
    return Dataset.from_dict({"input_ids": ids, "labels": ids})


def chosen_completions(rows: dict) -> dict:
    """Preferred-FT: prompt + chosen, loss on the chosen tokens only."""
    input_ids = [p + c for p, c in zip(rows["prompt_input_ids"], rows["chosen_input_ids"])]
    labels = [[IGNORE_INDEX] * len(p) + c for p, c in zip(rows["prompt_input_ids"], rows["chosen_input_ids"])]
    return {"input_ids": input_ids, "labels": labels}


def main(argv: list[str] | None = None):
    model_args, data_args, training_args = parse_args((ModelArguments, DataArguments, SFTArguments), argv)
    setup_logging(training_args)
    resume_from = resolve_resume(training_args.resume_from_checkpoint, training_args.output_dir)

    tokenizer = load_tokenizer(model_args)
    model = load_model(model_args, tokenizer, autocast_dtype=compute_dtype(training_args))
    if hasattr(model.config, "output_router_logits"):
        model.config.output_router_logits = True  # the model then adds its load-balancing loss to the LM loss
    if model_args.use_peft:
        model = apply_lora(model, model_args)

    if data_args.dataset_name == toy_task.TOY_DATASET_NAME:
        train_dataset = toy_corpus(tokenizer, training_args.toy_num_reviews, data_args.toy_seed)
    else:
        pairs = load_preference_data(data_args, tokenizer)["train"]
        train_dataset = pairs.map(chosen_completions, batched=True, remove_columns=pairs.column_names)

    interrupt = GracefulInterrupt()  # SIGTERM/SIGINT: checkpoint at the end of the step, then stop
    trainer = SFTTrainer(model=model, args=training_args, train_dataset=train_dataset, processing_class=tokenizer,
                         data_collator=DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=IGNORE_INDEX),
                         callbacks=[interrupt, SaveAtFractions(training_args.save_at_fractions)])
    with interrupt:
        result = trainer.train(resume_from_checkpoint=resume_from)
    exit_if_interrupted(trainer, interrupt)
    if model_args.use_peft:  # DPO and PPO start from a full model: fold the adapters into the weights
        model = trainer.model = trainer.accelerator.unwrap_model(trainer.model).merge_and_unload()
    trainer.save_model()
    report_metrics(trainer, result, evaluate=False)
    trainer.save_state()

    prompts = toy_task.make_prompts(training_args.num_samples_to_show, seed=data_args.toy_seed + 7)
    for prompt, completion in zip(prompts, sample_completions(model, tokenizer, prompts)):
        logger.info("sample: %s|%s", prompt, completion)


if __name__ == "__main__":
    run_script(main)
