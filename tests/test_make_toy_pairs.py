"""make_toy_pairs.py: the generator source writes valid pairs that load through utils.data."""

import json
import sys

import make_toy_pairs
from utils import toy_task
from utils.data import DataArguments, load_preference_data


def run(monkeypatch, *flags):
    monkeypatch.setattr(sys, "argv", ["make_toy_pairs.py", *flags])
    make_toy_pairs.main()


def test_generator_pairs_file_loads(tmp_path, monkeypatch, tokenizer):
    output = tmp_path / "new" / "folder" / "pairs.jsonl"  # missing folders are created
    run(monkeypatch, "--output_file", str(output), "--num_pairs", "25", "--seed", "3")
    lines = output.read_text().splitlines()
    assert len(lines) == 25
    pairs = [json.loads(line) for line in lines]
    assert all(set(pair) == {"prompt", "chosen", "rejected"} for pair in pairs)
    rewards = zip(toy_task.ground_truth_reward([p["chosen"] for p in pairs]),
                  toy_task.ground_truth_reward([p["rejected"] for p in pairs]))
    assert all(chosen > rejected for chosen, rejected in rewards)  # deterministic labeling by default

    train = load_preference_data(DataArguments(dataset_name=str(output)), tokenizer)["train"]
    assert len(train) == 25
    assert [{k: row[k] for k in ("prompt", "chosen", "rejected")} for row in train] == pairs
    assert all(row["chosen_input_ids"][-1] == tokenizer.eos_token_id for row in train)


def test_seed_and_labeling_flags_reach_the_generator(tmp_path, monkeypatch):
    def pairs(*flags):
        output = tmp_path / "pairs.jsonl"
        run(monkeypatch, "--output_file", str(output), "--num_pairs", "40", *flags)
        return [json.loads(line) for line in output.read_text().splitlines()]

    assert pairs("--seed", "1") == pairs("--seed", "1")
    assert pairs("--seed", "1") != pairs("--seed", "2")
    sampled = pairs("--seed", "1", "--labeling", "bradley_terry", "--bt_temperature", "1000")
    assert sampled == toy_task.generator_pairs(40, seed=1, labeling="bradley_terry", bt_temperature=1000)
    assert sampled != pairs("--seed", "1")


def test_policy_pairs_are_labelled_by_the_ground_truth_named(tmp_path, monkeypatch):
    import pytest

    from utils.errors import ConfigError

    output = tmp_path / "pairs.jsonl"
    run(monkeypatch, "--output_file", str(output), "--source", "policy", "--model_name_or_path", "mixtral-tiny",
        "--num_pairs", "16", "--max_new_tokens", "8", "--ground_truth", "brevity")
    pairs = [json.loads(line) for line in output.read_text().splitlines()]
    assert pairs and all(len(p["chosen"].split()) < len(p["rejected"].split()) for p in pairs)
    with pytest.raises(ConfigError, match="generator labels by sentiment only"):
        run(monkeypatch, "--output_file", str(output), "--ground_truth", "topic")
