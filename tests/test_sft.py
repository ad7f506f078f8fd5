"""train_sft.py: a short run learns and saves a loadable checkpoint; Preferred-FT masks the prompt."""

import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer, DataCollatorForSeq2Seq, MixtralForCausalLM

import train_sft
from utils import toy_task
from utils.cli import parse_args
from utils.data import DataArguments, load_preference_data
from utils.modeling import ModelArguments, load_model

REPO_ROOT = Path(__file__).resolve().parents[1]


def run_sft(tmp_path, *flags) -> Path:
    """train_sft.py's main as a user runs it (in process: a subprocess would add only its imports)."""
    output_dir = tmp_path / "sft"
    train_sft.main(["--model_name_or_path", "mixtral-tiny", "--output_dir", str(output_dir), "--report_to", "none",
                    "--num_samples_to_show", "1", "--seed", "0", "--dataloader_num_workers", "0", *flags])
    return output_dir


def logged_losses(output_dir: Path) -> list[float]:
    state = json.loads((output_dir / "trainer_state.json").read_text())
    return [entry["loss"] for entry in state["log_history"] if "loss" in entry]


@torch.no_grad()
def lm_loss(model, tokenizer, texts) -> float:
    model.eval()
    losses = []
    for text in texts:
        ids = torch.tensor([tokenizer(text)["input_ids"] + [tokenizer.eos_token_id]])
        losses.append(model(input_ids=ids, labels=ids, output_router_logits=False).loss.item())
    return sum(losses) / len(losses)


def test_toy_sft_learns_and_saves_a_loadable_checkpoint(tmp_path, tokenizer):
    # 256 reviews / batch 8 = 32 steps, a loss logged every 4
    output_dir = run_sft(tmp_path, "--toy_num_reviews", "256", "--per_device_train_batch_size", "8",
                         "--num_train_epochs", "1", "--logging_steps", "4", "--warmup_steps", "2")
    losses = logged_losses(output_dir)
    assert len(losses) == 8 and all(math.isfinite(loss) for loss in losses)
    assert losses[-1] < losses[0] - 0.5, losses  # the toy grammar is very learnable

    model = AutoModelForCausalLM.from_pretrained(output_dir)
    saved_tokenizer = AutoTokenizer.from_pretrained(output_dir)
    assert isinstance(model, MixtralForCausalLM)
    assert saved_tokenizer.get_vocab() == tokenizer.get_vocab()
    assert saved_tokenizer.chat_template == tokenizer.chat_template

    # the saved weights are the trained ones: held-out reviews are likelier than under the initial weights
    held_out = toy_task.make_corpus(8, seed=999)
    initial = load_model(ModelArguments(model_name_or_path="mixtral-tiny"), tokenizer)
    reloaded = load_model(ModelArguments(model_name_or_path=str(output_dir)), saved_tokenizer)
    assert lm_loss(reloaded, tokenizer, held_out) < lm_loss(initial, tokenizer, held_out) - 0.5
    assert lm_loss(model, tokenizer, held_out) == pytest.approx(lm_loss(reloaded, tokenizer, held_out))


def test_toy_corpus_is_reviews_ending_in_eos(tokenizer):
    corpus = train_sft.toy_corpus(tokenizer, 5, seed=2)
    for row, review in zip(corpus, toy_task.make_corpus(5, seed=2)):
        assert row["input_ids"] == tokenizer(review)["input_ids"] + [tokenizer.eos_token_id]
        assert row["labels"] == row["input_ids"]


# ------------------------------------------------------------------------------------------- Preferred-FT

PAIRS = [
    {"prompt": "i saw this film with my sister.", "chosen": " the acting was wonderful.",
     "rejected": " the acting was terrible."},
    {"prompt": "this film came out in 1999. my friends told me to watch it.", "chosen": " i loved it.",
     "rejected": " the plot was dull and the music was annoying and the ending was bad."},
]


def test_chosen_completions_mask_the_prompt(rows_file, tokenizer):
    pairs = load_preference_data(DataArguments(dataset_name=rows_file("pairs.jsonl", PAIRS)), tokenizer)["train"]
    sft = pairs.map(train_sft.chosen_completions, batched=True, remove_columns=pairs.column_names)
    assert sft.column_names == ["input_ids", "labels"]
    for pair, row in zip(pairs, sft):
        prompt, chosen = pair["prompt_input_ids"], pair["chosen_input_ids"]
        assert row["input_ids"] == prompt + chosen  # the rejected completion plays no part
        assert row["labels"] == [train_sft.IGNORE_INDEX] * len(prompt) + chosen
        assert chosen[-1] == tokenizer.eos_token_id  # the model learns to stop

    # after padding, the loss still sees exactly the chosen tokens of each row
    batch = DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=train_sft.IGNORE_INDEX)(list(sft))
    for i, pair in enumerate(pairs):
        trained = batch["labels"][i] != train_sft.IGNORE_INDEX
        assert batch["input_ids"][i][trained].tolist() == pair["chosen_input_ids"]
        assert batch["labels"][i][trained].tolist() == pair["chosen_input_ids"]


def test_preferred_ft_run_on_a_preference_file(tmp_path, rows_file):
    path = rows_file("pairs.jsonl", toy_task.generator_pairs(16, seed=0))
    output_dir = run_sft(tmp_path, "--dataset_name", path, "--per_device_train_batch_size", "4",
                         "--max_steps", "6", "--logging_steps", "2", "--warmup_steps", "0")
    state = json.loads((output_dir / "trainer_state.json").read_text())
    assert state["global_step"] == 6
    losses = logged_losses(output_dir)
    assert len(losses) == 3 and all(math.isfinite(loss) and loss > 0 for loss in losses)
    assert isinstance(AutoModelForCausalLM.from_pretrained(output_dir), MixtralForCausalLM)


# ---------------------------------------------------------------------------------------------------- config

def test_sft_config_file_parses(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # nothing gets written next to the config
    config_path = REPO_ROOT / "configs" / "sft_toy.yaml"
    parsed = parse_args((ModelArguments, DataArguments, train_sft.SFTArguments), [str(config_path)])
    for key, value in yaml.safe_load(config_path.read_text()).items():
        owners = [args for args in parsed if hasattr(args, key)]
        assert owners and all(getattr(args, key) == value for args in owners), key


def test_save_at_fractions_writes_model_only_checkpoints_at_those_steps(tmp_path):
    """32 steps: 1/16, 1/4 and 1/2 of them are steps 2, 8 and 16; the checkpoints hold the weights of that step
    (not the final ones) and no optimizer state (--save_strategy no)."""
    output_dir = run_sft(tmp_path, "--toy_num_reviews", "256", "--per_device_train_batch_size", "8",
                         "--num_train_epochs", "1", "--save_strategy", "no", "--save_at_fractions", "0.0625", "0.25",
                         "0.5")
    checkpoints = sorted((path for path in output_dir.iterdir() if path.name.startswith("checkpoint-")),
                         key=lambda path: int(path.name.split("-")[1]))
    assert [path.name for path in checkpoints] == ["checkpoint-2", "checkpoint-8", "checkpoint-16"]
    assert not any((path / "optimizer.pt").exists() for path in checkpoints)
    assert json.loads((checkpoints[0] / "trainer_state.json").read_text())["global_step"] == 2
    weights = [AutoModelForCausalLM.from_pretrained(path).lm_head.weight for path in (*checkpoints, output_dir)]
    assert all(not torch.equal(a, b) for a, b in zip(weights, weights[1:]))  # training went on between them


def test_save_at_fractions_outside_zero_one_is_refused():
    with pytest.raises(ValueError, match="save_at_fractions"):
        train_sft.SFTArguments(output_dir="unused", save_at_fractions=[1.5])
