"""utils/data.py: loading, format normalisation, tokenisation, truncation, collation and errors."""

import copy
import itertools
import json
import logging
import math
import re

import pytest
import torch
import yaml
from datasets import Dataset

import train_dpo
from helpers import tiny_run_args
from utils import toy_task
from utils.cli import parse_args
from utils.data import DataArguments, PreferenceCollator, load_preference_data, prepare_split
from utils.errors import ConfigError, DataError
from utils.modeling import ModelArguments, load_tokenizer, toy_tokenizer

EXPLICIT_ROWS = [
    {"prompt": "i saw this film with my sister.", "chosen": " the acting was wonderful.",
     "rejected": " the acting was terrible."},
    {"prompt": "this film came out last year.", "chosen": " i loved the music and the ending.",
     "rejected": " i hated it."},
    {"prompt": "my friends told me to watch this movie.", "chosen": " the plot felt clever.",
     "rejected": " the plot felt really painful and the cast was bad."},
]


def prepare(rows, tokenizer, **kwargs):
    """In-memory rows through the same normalise/tokenise path as a file."""
    return prepare_split(Dataset.from_list(rows), DataArguments(dataset_name="inline", **kwargs), tokenizer, "train")


def ids(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


def system(text):
    return {"role": "system", "content": text}


def texts(dataset):
    return [{key: row[key] for key in ("prompt", "chosen", "rejected")} for row in dataset]


def assert_explicit_tokenisation(row, tokenizer):
    """Prompt ids then completion ids are the pair's text tokenised as read, plus one eos."""
    eos = tokenizer.eos_token_id
    assert row["prompt_input_ids"] == tokenizer(row["prompt"])["input_ids"]
    for side in ("chosen", "rejected"):
        completion = row[f"{side}_input_ids"]
        assert row["prompt_input_ids"] + completion == tokenizer(row["prompt"] + row[side])["input_ids"] + [eos]
        assert completion.count(eos) == 1


# --------------------------------------------------------------------------------------------- loading

@pytest.mark.parametrize("extension", ["jsonl", "json", "csv", "parquet"])
def test_explicit_file_formats(extension, rows_file, tokenizer):
    path = rows_file(f"pairs.{extension}", EXPLICIT_ROWS)
    data = load_preference_data(DataArguments(dataset_name=path), tokenizer)
    assert list(data) == ["train"]
    assert texts(data["train"]) == EXPLICIT_ROWS
    for row in data["train"]:
        assert_explicit_tokenisation(row, tokenizer)


def test_folder_with_train_and_test_files(tmp_path, rows_file, tokenizer):
    rows_file("pairs/train.jsonl", EXPLICIT_ROWS[:2])
    rows_file("pairs/test.jsonl", EXPLICIT_ROWS[2:])
    # a split the source has wins over eval_fraction
    data = load_preference_data(DataArguments(dataset_name=str(tmp_path / "pairs"), eval_fraction=0.5), tokenizer)
    assert texts(data["train"]) == EXPLICIT_ROWS[:2]
    assert texts(data["test"]) == EXPLICIT_ROWS[2:]


def test_folder_of_shards_is_one_train_split(tmp_path, rows_file, tokenizer):
    rows_file("shards/part-0.jsonl", EXPLICIT_ROWS[:1])
    rows_file("shards/part-1.jsonl", EXPLICIT_ROWS[1:])
    data = load_preference_data(DataArguments(dataset_name=str(tmp_path / "shards")), tokenizer)
    assert list(data) == ["train"]
    assert sorted(row["prompt"] for row in data["train"]) == sorted(row["prompt"] for row in EXPLICIT_ROWS)


def test_eval_fraction_holds_out_part_of_train(rows_file, tokenizer):
    rows = [{"prompt": f"prompt number {i}.", "chosen": f" good {i}.", "rejected": f" bad {i}."} for i in range(20)]
    path = rows_file("pairs.jsonl", rows)
    data = load_preference_data(DataArguments(dataset_name=path, eval_fraction=0.25), tokenizer)
    assert (len(data["train"]), len(data["test"])) == (15, 5)
    train_prompts, test_prompts = set(data["train"]["prompt"]), set(data["test"]["prompt"])
    assert not train_prompts & test_prompts
    assert train_prompts | test_prompts == {row["prompt"] for row in rows}
    assert list(load_preference_data(DataArguments(dataset_name=path), tokenizer)) == ["train"]


def test_missing_train_split(rows_file, tokenizer):
    path = rows_file("pairs.jsonl", EXPLICIT_ROWS)
    with pytest.raises(DataError, match="validation"):
        load_preference_data(DataArguments(dataset_name=path, dataset_train_split="validation"), tokenizer)


def test_toy_source(tokenizer):
    args = DataArguments(dataset_name=toy_task.TOY_DATASET_NAME, toy_num_train_pairs=12, toy_num_eval_pairs=4,
                         toy_seed=5)
    data = load_preference_data(args, tokenizer)
    assert texts(data["train"]) == toy_task.generator_pairs(12, seed=5)
    assert texts(data["test"]) == toy_task.generator_pairs(4, seed=6)
    assert not set(data["train"]["chosen"]) & set(data["test"]["chosen"])
    for row in data["train"]:
        assert_explicit_tokenisation(row, tokenizer)
        reward_chosen, reward_rejected = toy_task.ground_truth_reward([row["chosen"], row["rejected"]])
        assert reward_chosen > reward_rejected


def test_toy_source_passes_labeling_through(tokenizer):
    args = DataArguments(dataset_name=toy_task.TOY_DATASET_NAME, toy_num_train_pairs=200, toy_num_eval_pairs=1,
                         toy_pair_labeling="bradley_terry", toy_bt_temperature=1e3)
    train = load_preference_data(args, tokenizer)["train"]
    rewards = [toy_task.ground_truth_reward([row["chosen"], row["rejected"]]) for row in train]
    assert any(chosen < rejected for chosen, rejected in rewards)  # near-random labels at a huge temperature


@pytest.mark.parametrize("path", ["/nonexistent/dir/pairs.jsonl", "missing/pairs.jsonl", "./missing_folder",
                                  "some/deep/folder"])
def test_nonexistent_local_path(path, tmp_path, monkeypatch, tokenizer):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError, match=re.escape(path) + ": no such file or folder"):
        load_preference_data(DataArguments(dataset_name=path), tokenizer)


def test_unsupported_file_type(tmp_path, tokenizer):
    path = tmp_path / "pairs.txt"
    path.write_text("prompt chosen rejected\n")
    with pytest.raises(DataError, match=r"\.txt"):
        load_preference_data(DataArguments(dataset_name=str(path)), tokenizer)


# ------------------------------------------------------------------------------------- column mapping

def test_column_mapping_flags(rows_file, tokenizer):
    renamed = [{"question": r["prompt"], "good": r["chosen"], "bad": r["rejected"]} for r in EXPLICIT_ROWS]
    path = rows_file("renamed.jsonl", renamed)
    (args,) = parse_args((DataArguments,), ["--dataset_name", path, "--prompt_column", "question",
                                            "--chosen_column", "good", "--rejected_column", "bad"])
    train = load_preference_data(args, tokenizer)["train"]
    assert texts(train) == EXPLICIT_ROWS
    assert train.column_names[:3] == ["prompt", "chosen", "rejected"]  # normalised names downstream


def test_column_mapping_implicit(tokenizer):
    rows = [{"good": "\n\nHuman: hi\n\nAssistant: hello there", "bad": "\n\nHuman: hi\n\nAssistant: go away"}]
    (row,) = prepare(rows, tokenizer, chosen_column="good", rejected_column="bad")
    assert (row["prompt"], row["chosen"], row["rejected"]) == ("\n\nHuman: hi\n\nAssistant:", " hello there",
                                                               " go away")


def test_mapped_column_missing_is_named(tokenizer):
    with pytest.raises(DataError, match=r"row 0: missing field 'question'"):
        prepare(EXPLICIT_ROWS, tokenizer, prompt_column="question", dataset_format="explicit")


# ----------------------------------------------------------------------------------- implicit prompts

HH_CASES = [
    pytest.param("\n\nHuman: What is the capital of France?\n\nAssistant: Paris is the capital.",
                 "\n\nHuman: What is the capital of France?\n\nAssistant: I don't know.",
                 "\n\nHuman: What is the capital of France?\n\nAssistant:", " Paris is the capital.",
                 " I don't know.", id="single-turn"),
    pytest.param("\n\nHuman: hi\n\nAssistant: hello!\n\nHuman: tell me a joke\n\nAssistant: Why did the chicken "
                 "cross the road?",
                 "\n\nHuman: hi\n\nAssistant: hello!\n\nHuman: tell me a joke\n\nAssistant: No.",
                 "\n\nHuman: hi\n\nAssistant: hello!\n\nHuman: tell me a joke\n\nAssistant:",
                 " Why did the chicken cross the road?", " No.", id="multi-turn"),
    # the prompt ends at the last assistant turn both share: words the answers share belong to the answers
    pytest.param("\n\nHuman: How is it?\n\nAssistant: It is fine", "\n\nHuman: How is it?\n\nAssistant: It is four",
                 "\n\nHuman: How is it?\n\nAssistant:", " It is fine", " It is four", id="answers-share-words"),
    pytest.param("\n\nHuman: Can you?\n\nAssistant: Sure.", "\n\nHuman: Can you?\n\nAssistant: Sure. But no.",
                 "\n\nHuman: Can you?\n\nAssistant:", " Sure.", " Sure. But no.", id="answer-is-prefix-of-other"),
    pytest.param("\n\nHuman: hi\n\nAssistant: hello!\n\nHuman: a joke?\n\nAssistant: No.",
                 "\n\nHuman: hi\n\nAssistant: go away.", "\n\nHuman: hi\n\nAssistant:",
                 " hello!\n\nHuman: a joke?\n\nAssistant: No.", " go away.", id="differ-in-an-earlier-turn"),
    # no assistant turn marked: the shared prefix back to a word boundary before the shorter text ends
    pytest.param("Review: It is fine", "Review: It is four", "Review: It is", " fine", " four",
                 id="unmarked-diverge-mid-word"),
    pytest.param("Review: Sure.", "Review: Sure. But no.", "Review:", " Sure.", " Sure. But no.",
                 id="unmarked-answer-is-prefix-of-other"),
]


@pytest.mark.parametrize("chosen, rejected, prompt, chosen_completion, rejected_completion", HH_CASES)
def test_implicit_prompt_extraction(chosen, rejected, prompt, chosen_completion, rejected_completion, rows_file,
                                    tokenizer):
    path = rows_file("hh.jsonl", [{"chosen": chosen, "rejected": rejected}])
    (row,) = load_preference_data(DataArguments(dataset_name=path), tokenizer)["train"]
    assert (row["prompt"], row["chosen"], row["rejected"]) == (prompt, chosen_completion, rejected_completion)
    eos = tokenizer.eos_token_id
    assert row["prompt_input_ids"] + row["chosen_input_ids"] == tokenizer(chosen)["input_ids"] + [eos]
    assert row["prompt_input_ids"] + row["rejected_input_ids"] == tokenizer(rejected)["input_ids"] + [eos]


def test_identical_implicit_pairs_are_dropped_with_a_warning(rows_file, tokenizer, caplog):
    same = "\n\nHuman: hi\n\nAssistant: hello"
    path = rows_file("hh.jsonl", [HH_GOOD, {"chosen": same, "rejected": same}])
    with caplog.at_level(logging.WARNING, logger="utils.data"):
        (row,) = load_preference_data(DataArguments(dataset_name=path), tokenizer)["train"]
    assert (row["chosen"], row["rejected"], row["row_index"]) == (" hello", " go away", 0)
    assert any("dropped 1 of 2 pairs whose chosen equals rejected" in r.getMessage() for r in caplog.records), \
        caplog.text


# ------------------------------------------------------------------------------------- conversational

def expected_conversation(tokenizer, prompt_messages, answer):
    prompt = tokenizer.apply_chat_template(prompt_messages, tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template(prompt_messages + [answer], tokenize=False)
    assert full.startswith(prompt)
    return prompt, full[len(prompt):]


def assert_conversation_row(row, tokenizer, prompt_messages, chosen, rejected):
    eos = tokenizer.eos_token_id
    prompt, chosen_rest = expected_conversation(tokenizer, prompt_messages, chosen)
    _, rejected_rest = expected_conversation(tokenizer, prompt_messages, rejected)
    assert row["prompt"] == prompt
    # the remainder of the rendered conversation, ending at the turn's eos (the template's newline after it
    # is not part of what the model generates)
    for side, rest, message in (("chosen", chosen_rest, chosen), ("rejected", rejected_rest, rejected)):
        assert row[side] == rest.rstrip()
        assert row[side].startswith(message["content"]) and row[side].endswith(tokenizer.eos_token)
        completion_ids = row[f"{side}_input_ids"]
        assert row["prompt_input_ids"] == ids(tokenizer, prompt)
        assert row["prompt_input_ids"] + completion_ids == ids(tokenizer, prompt + row[side])
        assert completion_ids[-1] == eos and completion_ids.count(eos) == 1, "eos once, not appended again"


def test_conversational_ultrafeedback_style(rows_file, tokenizer):
    history = [system("you review films."), user("hi"), assistant("hello! which film?"), user("the new one")]
    good, bad = assistant("it was wonderful, go see it."), assistant("no idea.")
    path = rows_file("uf.jsonl", [{"chosen": history + [good], "rejected": history + [bad]}])
    (row,) = load_preference_data(DataArguments(dataset_name=path), tokenizer)["train"]
    assert_conversation_row(row, tokenizer, history, good, bad)
    assert "the new one" in row["prompt"] and "hello! which film?" in row["prompt"]


def test_conversational_trl_style(rows_file, tokenizer):
    prompt = [user("what did you think of the film?")]
    good, bad = assistant("the acting was brilliant."), assistant("the acting was dull.")
    path = rows_file("trl.jsonl", [{"prompt": prompt, "chosen": [good], "rejected": [bad]}])
    (row,) = load_preference_data(DataArguments(dataset_name=path), tokenizer)["train"]
    assert_conversation_row(row, tokenizer, prompt, good, bad)


# ------------------------------------------------------------------------------------------ eos, ids

def test_eos_not_doubled_when_completion_ends_in_eos(tokenizer):
    eos = tokenizer.eos_token
    rows = [{"prompt": "i saw this film.", "chosen": " it was great." + eos, "rejected": " it was bad."}]
    (row,) = prepare(rows, tokenizer)
    for side in ("chosen", "rejected"):
        assert row[f"{side}_input_ids"][-1] == tokenizer.eos_token_id
        assert row[f"{side}_input_ids"].count(tokenizer.eos_token_id) == 1


def test_completion_tokenised_alone_when_a_token_would_straddle_the_boundary(tokenizer):
    # "Review: " alone ends in a lone-space token that "Review: great" does not contain
    rows = [{"prompt": "Review: ", "chosen": "great", "rejected": "awful"}]
    (row,) = prepare(rows, tokenizer)
    assert row["prompt_input_ids"] == tokenizer("Review: ")["input_ids"]
    assert row["chosen_input_ids"] == ids(tokenizer, "great") + [tokenizer.eos_token_id]
    assert tokenizer.decode(row["prompt_input_ids"] + row["chosen_input_ids"]) == "Review: great" + tokenizer.eos_token


SPECIAL_TOKEN_SETTINGS = [pytest.param(True, False, id="bos"), pytest.param(True, True, id="bos+eos"),
                          pytest.param(False, True, id="eos")]


def toy_tokenizer_adding(bos: bool, eos: bool):
    """The toy tokenizer with a Llama-style post-processor (add_bos_token / add_eos_token)."""
    special = copy.deepcopy(toy_tokenizer())
    special.add_bos_token, special.add_eos_token = bos, eos
    text_ids = ids(special, "i saw it.")
    assert special("i saw it.")["input_ids"] == [special.bos_token_id] * bos + text_ids + [special.eos_token_id] * eos
    return special


@pytest.mark.parametrize("bos, eos", SPECIAL_TOKEN_SETTINGS)
def test_sequence_is_bos_prompt_completion_and_one_eos_whatever_the_special_token_settings(bos, eos, tokenizer):
    special = toy_tokenizer_adding(bos, eos)
    plain_rows, special_rows = ([*prepare(EXPLICIT_ROWS, each), *prepare([HH_GOOD], each)]
                                for each in (tokenizer, special))
    bos_ids = [special.bos_token_id] * bos
    for plain_row, row in zip(plain_rows, special_rows, strict=True):
        # the toy tokenizer's ids (which it tokenises without special tokens), with bos in front where it adds one
        assert row["prompt_input_ids"] == bos_ids + plain_row["prompt_input_ids"]
        for side in ("chosen", "rejected"):
            assert row[f"{side}_input_ids"] == plain_row[f"{side}_input_ids"]
            sequence = row["prompt_input_ids"] + row[f"{side}_input_ids"]
            assert sequence == bos_ids + ids(special, row["prompt"] + row[side]) + [special.eos_token_id]
            assert sequence.count(special.eos_token_id) == 1 and sequence.count(special.bos_token_id) == bos


def test_keep_end_keeps_bos_when_it_cuts_the_prompt(tokenizer):
    special = toy_tokenizer_adding(bos=True, eos=True)
    rows = [{"prompt": LONG_PROMPT, "chosen": " good.", "rejected": " very bad."}]
    (full,) = untruncated(rows, tokenizer)
    max_length = 16
    (row,) = prepare(rows, special, max_length=max_length, truncation_mode="keep_end")
    longest = max(len(full["chosen_input_ids"]), len(full["rejected_input_ids"]))
    kept = max_length - longest - 1  # the prompt's tokens after bos
    assert row["prompt_input_ids"] == [special.bos_token_id] + full["prompt_input_ids"][-kept:]
    assert (row["chosen_input_ids"], row["rejected_input_ids"]) == (full["chosen_input_ids"],
                                                                    full["rejected_input_ids"])


# ------------------------------------------------------------------------------------------- collator

@pytest.mark.parametrize("pad_is_eos", [False, True], ids=["pad", "pad=eos"])
def test_collator_masks_exactly_the_completion_tokens(pad_is_eos, tokenizer):
    rows = list(prepare(EXPLICIT_ROWS, tokenizer))
    pad_id = tokenizer.eos_token_id if pad_is_eos else tokenizer.pad_token_id
    batch = PreferenceCollator(pad_token_id=pad_id)(rows)
    n = len(rows)
    lengths = [len(r["prompt_input_ids"]) + len(r[f"{side}_input_ids"]) for side in ("chosen", "rejected")
               for r in rows]
    assert len(set(lengths)) > 1, "the rows must need padding for this test to mean anything"
    assert batch["input_ids"].shape == (2 * n, max(lengths))
    flat_ids = batch["input_ids"].flatten()
    for i in range(2 * n):
        side, row = ("chosen", rows[i]) if i < n else ("rejected", rows[i - n])  # chosen rows first
        prompt, completion = row["prompt_input_ids"], row[f"{side}_input_ids"]
        width = batch["input_ids"].shape[1]
        padding = width - len(prompt) - len(completion)
        assert batch["input_ids"][i].tolist() == prompt + completion + [pad_id] * padding
        assert batch["attention_mask"][i].tolist() == [1] * (len(prompt) + len(completion)) + [0] * padding
        kept = flat_ids[batch["completion_positions"][batch["completion_sequence"] == i]].tolist()
        assert kept == completion and kept[-1] == tokenizer.eos_token_id
    assert "ref_chosen_logps" not in batch


def test_collator_rounds_padded_widths_up(tokenizer):
    rows = list(prepare(EXPLICIT_ROWS, tokenizer))
    exact = PreferenceCollator(pad_token_id=tokenizer.pad_token_id)(rows)
    rounded = PreferenceCollator(pad_token_id=tokenizer.pad_token_id, pad_to_multiple_of=64)(rows)
    width = exact["input_ids"].shape[1]
    assert rounded["input_ids"].shape[1] == -(-width // 64) * 64 > width
    assert torch.equal(rounded["input_ids"][:, :width], exact["input_ids"])
    assert torch.equal(rounded["completion_sequence"], exact["completion_sequence"])
    assert torch.equal(rounded["input_ids"].flatten()[rounded["completion_positions"]],
                       exact["input_ids"].flatten()[exact["completion_positions"]])  # the same tokens, wider rows


def test_padding_free_collator_packs_the_same_sequences_into_one_row(tokenizer):
    rows = list(prepare(EXPLICIT_ROWS, tokenizer))
    padded = PreferenceCollator(pad_token_id=tokenizer.pad_token_id)(rows)
    packed = PreferenceCollator(pad_token_id=tokenizer.pad_token_id, padding_free=True)(rows)
    assert "attention_mask" not in packed
    assert packed["input_ids"].shape[0] == packed["position_ids"].shape[0] == 1
    real = padded["attention_mask"].bool()  # the padded batch's non-padding tokens, row by row
    assert packed["input_ids"][0].tolist() == padded["input_ids"][real].tolist()
    lengths = real.sum(dim=1).tolist()
    assert packed["position_ids"][0].tolist() == [p for n in lengths for p in range(n)]  # restart per sequence
    assert packed["cu_seq_lens_q"].dtype == torch.int32  # flash kernels' type
    assert packed["cu_seq_lens_q"].tolist() == packed["cu_seq_lens_k"].tolist() == [0, *itertools.accumulate(lengths)]
    assert packed["max_length_q"] == packed["max_length_k"] == max(lengths)
    # the same completion tokens, of the same sequences
    assert torch.equal(packed["completion_sequence"], padded["completion_sequence"])
    assert torch.equal(packed["input_ids"][0][packed["completion_positions"]],
                       padded["input_ids"].flatten()[padded["completion_positions"]])


def test_collator_passes_reference_logps_through(tokenizer):
    rows = [dict(row, ref_chosen_logps=-1.5 - i, ref_rejected_logps=-2.5 - i)
            for i, row in enumerate(prepare(EXPLICIT_ROWS[:2], tokenizer))]
    batch = PreferenceCollator(pad_token_id=tokenizer.pad_token_id)(rows)
    assert torch.equal(batch["ref_chosen_logps"], torch.tensor([-1.5, -2.5]))
    assert torch.equal(batch["ref_rejected_logps"], torch.tensor([-2.5, -3.5]))


# ------------------------------------------------------------------------------------------ truncation

LONG_PROMPT = "i watched this movie last night with my sister and my brother and my parents and my kids."
LONG_ANSWER = " the acting was wonderful and the music was lovely and the ending was moving and clever."


def untruncated(rows, tokenizer):
    return list(prepare(rows, tokenizer, max_length=10_000))


def test_keep_start_cuts_completion_ends(tokenizer):
    rows = [{"prompt": "i saw this film.", "chosen": LONG_ANSWER, "rejected": " bad."}]
    (full,) = untruncated(rows, tokenizer)
    max_length = len(full["prompt_input_ids"]) + 6
    assert len(full["chosen_input_ids"]) > 6 >= len(full["rejected_input_ids"])
    (row,) = prepare(rows, tokenizer, max_length=max_length, truncation_mode="keep_start")
    assert row["prompt_input_ids"] == full["prompt_input_ids"]
    assert row["chosen_input_ids"] == full["chosen_input_ids"][:6]
    assert row["rejected_input_ids"] == full["rejected_input_ids"]


def test_keep_start_drops_a_pair_whose_prompt_fills_max_length(tokenizer, caplog):
    rows = [{"prompt": "i saw it.", "chosen": " good.", "rejected": " bad."},
            {"prompt": "same", "chosen": " x", "rejected": " x"},  # dropped too: must not shift the row numbers
            {"prompt": LONG_PROMPT, "chosen": " good.", "rejected": " bad."}]
    max_length = len(tokenizer(LONG_PROMPT)["input_ids"])
    with caplog.at_level(logging.WARNING, logger="utils.data"):
        data = prepare(rows, tokenizer, max_length=max_length, truncation_mode="keep_start")
    assert data["row_index"] == [0] and texts(data) == rows[:1]
    assert (f"inline [train]: dropped 1 of 3 pairs whose prompt leaves no room for a completion within max_length "
            f"{max_length} (row 2); raise --max_length") in caplog.text
    assert "inline [train]: dropped 1 of 3 pairs whose chosen equals rejected (row 1)" in caplog.text
    assert len(prepare(rows, tokenizer, max_length=max_length + 1)) == 2  # one token of room: it trains
    with pytest.raises(DataError, match=rf"inline \[train\]: no pair left to train on: all 2 pairs were dropped: 1 "
                                        rf"whose chosen equals rejected, 1 whose prompt leaves no room for a "
                                        rf"completion within max_length {max_length}"):
        prepare(rows[1:], tokenizer, max_length=max_length)


def test_keep_end_cuts_the_prompt_from_the_left(tokenizer):
    rows = [{"prompt": LONG_PROMPT, "chosen": " good.", "rejected": " very bad."}]
    (full,) = untruncated(rows, tokenizer)
    longest = max(len(full["chosen_input_ids"]), len(full["rejected_input_ids"]))
    max_length = 16
    assert len(full["prompt_input_ids"]) + longest > max_length and longest < max_length // 2
    (row,) = prepare(rows, tokenizer, max_length=max_length, truncation_mode="keep_end")
    assert row["prompt_input_ids"] == full["prompt_input_ids"][-(max_length - longest):]
    assert (row["chosen_input_ids"], row["rejected_input_ids"]) == (full["chosen_input_ids"],
                                                                    full["rejected_input_ids"])


def test_keep_end_keeps_half_for_the_prompt_then_cuts_completions(tokenizer):
    rows = [{"prompt": LONG_PROMPT, "chosen": LONG_ANSWER, "rejected": " bad." + LONG_ANSWER}]
    (full,) = untruncated(rows, tokenizer)
    max_length = 16
    (row,) = prepare(rows, tokenizer, max_length=max_length, truncation_mode="keep_end")
    assert row["prompt_input_ids"] == full["prompt_input_ids"][-(max_length // 2):]
    room = max_length - max_length // 2
    assert row["chosen_input_ids"] == full["chosen_input_ids"][:room]
    assert row["rejected_input_ids"] == full["rejected_input_ids"][:room]


TRUNCATED_ALIKE = {"prompt": "i saw it.", "chosen": " the acting was wonderful.", "rejected": " the acting was awful."}


def test_pairs_identical_after_truncation_are_dropped_with_a_warning(tokenizer, caplog):
    rows = [TRUNCATED_ALIKE, {**GOOD, "rejected": GOOD["chosen"]}, GOOD]
    (full,) = untruncated([TRUNCATED_ALIKE], tokenizer)
    shared = 0  # leading completion tokens the two answers have in common
    while full["chosen_input_ids"][shared] == full["rejected_input_ids"][shared]:
        shared += 1
    max_length = len(full["prompt_input_ids"]) + shared
    with caplog.at_level(logging.WARNING, logger="utils.data"):
        data = prepare(rows, tokenizer, max_length=max_length)
    assert texts(data) == [GOOD] and data["row_index"] == [2]
    messages = [record.getMessage() for record in caplog.records]
    assert any("dropped 1 of 3 pairs whose chosen equals rejected" in m for m in messages), caplog.text
    assert any(f"dropped 1 of 3 pairs whose chosen and rejected differ as texts but not as the tokens kept by "
               f"max_length {max_length}" in m for m in messages), caplog.text
    # one more token tells the answers apart: nothing dropped for truncation
    assert len(prepare(rows, tokenizer, max_length=max_length + 1)) == 2
    with pytest.raises(DataError, match=rf"all 1 pairs were dropped: 1 whose chosen and rejected differ as texts but "
                                        rf"not as the tokens kept by max_length {max_length}"):
        prepare([TRUNCATED_ALIKE], tokenizer, max_length=max_length)


def test_pairs_that_differ_only_in_a_trailing_eos_are_dropped_without_advice_to_raise_max_length(tokenizer, caplog):
    # every completion ends in eos, so " great" and " great</s>" are the same tokens however long max_length is
    rows = [{"prompt": "i saw it.", "chosen": " great", "rejected": " great" + tokenizer.eos_token}, GOOD]
    with caplog.at_level(logging.WARNING, logger="utils.data"):
        data = prepare(rows, tokenizer, max_length=10_000)
    assert texts(data) == [GOOD]
    (message,) = [record.getMessage() for record in caplog.records if "dropped" in record.getMessage()]
    assert "dropped 1 of 2 pairs whose chosen and rejected differ as texts but tokenise the same" in message, message
    assert "(row 0); no flag keeps them" in message and "max_length" not in message, message


# ------------------------------------------------------------------------------------------------ errors

GOOD = {"prompt": "i saw it.", "chosen": " good.", "rejected": " bad."}
HH_GOOD = {"chosen": "\n\nHuman: hi\n\nAssistant: hello", "rejected": "\n\nHuman: hi\n\nAssistant: go away"}
CONV_GOOD = {"chosen": [user("hi"), assistant("hello")], "rejected": [user("hi"), assistant("go away")]}

ERROR_CASES = [
    pytest.param([{"prompt": "p", "chosen": " a"}] * 2, 0, "rejected", "missing field", id="missing-column"),
    pytest.param([GOOD, {**GOOD, "prompt": ""}], 1, "prompt", "is empty", id="empty-prompt"),
    pytest.param([GOOD, {**GOOD, "chosen": None}], 1, "chosen", "must be a str", id="null-chosen"),
    pytest.param([{**GOOD, "rejected": 3}, {**GOOD, "rejected": 4}], 0, "rejected", "must be a str, got int",
                 id="int-rejected"),
    pytest.param([HH_GOOD, {"chosen": "hello there", "rejected": "goodbye"}], 1, "chosen", "share no prompt",
                 id="implicit-no-shared-prompt"),
    pytest.param([CONV_GOOD, {**CONV_GOOD, "rejected": [{"role": "human", "content": "hi"}, assistant("no")]}], 1,
                 "rejected", "role 'human'", id="wrong-role"),
    pytest.param([CONV_GOOD, {"chosen": [user("hi"), assistant("a"), user("and?")],
                              "rejected": [user("hi"), assistant("a"), user("so?")]}], 1, "chosen",
                 "must end with an assistant turn", id="ultrafeedback-not-ending-in-assistant"),
    pytest.param([{"prompt": [user("hi")], "chosen": [assistant("hello")], "rejected": [assistant("bye")]},
                  {"prompt": [user("hi")], "chosen": [assistant("hello")], "rejected": [user("bye")]}], 1,
                 "rejected", "must end with an assistant turn", id="trl-not-ending-in-assistant"),
    pytest.param([CONV_GOOD, {"chosen": [user("hi"), assistant("hello")], "rejected": [user("hey"), assistant("x")]}],
                 1, "chosen", "do not share a prompt", id="conversations-differ-before-final-turn"),
    pytest.param([CONV_GOOD, {"chosen": [], "rejected": [user("hi"), assistant("x")]}], 1, "chosen", "is empty",
                 id="empty-conversation"),
]


@pytest.mark.parametrize("rows, index, field, message", ERROR_CASES)
def test_bad_rows_raise_data_error_naming_row_and_field(rows, index, field, message, tokenizer):
    with pytest.raises(DataError) as error:
        prepare(rows, tokenizer)
    text = str(error.value)
    assert re.search(rf"\brow {index}\b", text), text
    assert f"'{field}'" in text and message in text, text
    assert text.startswith("inline [train]"), text  # names the source


def test_error_from_a_file_names_the_file(rows_file, tokenizer):
    path = rows_file("pairs.jsonl", [GOOD, GOOD, {**GOOD, "chosen": None}])
    with pytest.raises(DataError, match=re.escape(path) + r" \[train\] row 2 \(line 3\): field 'chosen' must be a str"):
        load_preference_data(DataArguments(dataset_name=path), tokenizer)


def test_identical_pairs_are_dropped_with_a_warning(tokenizer, caplog):
    rows = [EXPLICIT_ROWS[0], {**GOOD, "rejected": GOOD["chosen"]}, EXPLICIT_ROWS[1],
            {**GOOD, "prompt": "another", "rejected": GOOD["chosen"]}]
    with caplog.at_level(logging.WARNING, logger="utils.data"):
        data = prepare(rows, tokenizer)
    assert texts(data) == EXPLICIT_ROWS[:2]
    assert any("dropped 2 of 4" in record.getMessage() for record in caplog.records), caplog.text


def test_no_warning_without_identical_pairs(tokenizer, caplog):
    with caplog.at_level(logging.WARNING, logger="utils.data"):
        prepare(EXPLICIT_ROWS, tokenizer)
    assert not [r for r in caplog.records if "dropped" in r.getMessage()]


# ----------------------------------------------------------------------------------------- row policy

def test_empty_answers_train_as_eos_only_completions_and_both_empty_is_an_identical_pair(tokenizer, caplog):
    eos = tokenizer.eos_token_id
    rows = [GOOD, {**GOOD, "chosen": ""}, {**GOOD, "rejected": "   "}, {**GOOD, "chosen": "", "rejected": " \n"}]
    with caplog.at_level(logging.WARNING, logger="utils.data"):
        data = prepare(rows, tokenizer)
    assert data["row_index"] == [0, 1, 2]
    (good, empty_chosen, blank_rejected) = data
    assert empty_chosen["chosen_input_ids"] == [eos] and empty_chosen["chosen"] == ""
    assert empty_chosen["rejected_input_ids"] == good["rejected_input_ids"]
    assert blank_rejected["rejected_input_ids"] == [eos]
    assert blank_rejected["chosen_input_ids"] == good["chosen_input_ids"]
    assert ("inline [train]: 2 of 4 pairs have an empty answer (rows 1, 2): it trains as an eos-only completion"
            in caplog.text)
    assert "inline [train]: dropped 1 of 4 pairs whose chosen equals rejected (row 3)" in caplog.text


def test_empty_final_answers_of_implicit_and_conversational_rows_train(tokenizer, caplog):
    eos = tokenizer.eos_token_id
    hh_empty = {"chosen": "\n\nHuman: hi\n\nAssistant:", "rejected": "\n\nHuman: hi\n\nAssistant: go away"}
    (row,) = prepare([hh_empty], tokenizer)
    assert (row["prompt"], row["chosen_input_ids"]) == ("\n\nHuman: hi\n\nAssistant:", [eos])
    assert row["rejected_input_ids"] == ids(tokenizer, " go away") + [eos]
    conversation = {"chosen": [user("hi"), assistant(" ")], "rejected": [user("hi"), assistant("go away")]}
    with caplog.at_level(logging.WARNING, logger="utils.data"):
        (row,) = prepare([conversation], tokenizer)
    assert row["chosen_input_ids"] == [eos] and row["rejected_input_ids"][-1] == eos
    assert "1 of 1 pairs have an empty answer (row 0)" in caplog.text


def test_warnings_name_at_most_five_rows(tokenizer, caplog):
    rows = [GOOD] + [{**GOOD, "rejected": GOOD["chosen"]}] * 7
    with caplog.at_level(logging.WARNING, logger="utils.data"):
        prepare(rows, tokenizer)
    assert "dropped 7 of 8 pairs whose chosen equals rejected (rows 1, 2, 3, 4, 5, ...)" in caplog.text


def test_rows_are_named_by_their_row_and_line_in_the_file_whatever_the_split(tmp_path, tokenizer, caplog):
    rows = [{"prompt": f"prompt number {i}.", "chosen": f" good {i}.", "rejected": f" bad {i}."} for i in range(30)]
    rows[20]["rejected"] = rows[20]["chosen"]
    lines = []  # the file's lines, with blank lines that `datasets` skips
    for i, row in enumerate(rows):
        lines += [json.dumps(row)] + [""] * (i % 7 == 3)
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join(lines) + "\n")
    line_of_row = [number for number, line in enumerate(lines, start=1) if line]
    args = DataArguments(dataset_name=str(path), eval_fraction=0.3)
    with caplog.at_level(logging.WARNING, logger="utils.data"):
        data = load_preference_data(args, tokenizer)
    assert f"dropped 1 of 30 pairs whose chosen equals rejected (row 20 (line {line_of_row[20]}))" in caplog.text
    assert (len(data["train"]), len(data["test"])) == (20, 9)
    for split in ("train", "test"):  # row_index (the NaN guard's too) is the file's row in both parts
        for row in data[split]:
            assert row["prompt"] == rows[row["row_index"]]["prompt"]
    assert sorted([*data["train"]["row_index"], *data["test"]["row_index"]]) == [i for i in range(30) if i != 20]
    rows[27]["chosen"] = None
    path.write_text("\n\n".join(json.dumps(row) for row in rows) + "\n")  # a blank line between rows: row r, line 2r+1
    with pytest.raises(DataError, match=re.escape(f"{path} [train] row 27 (line 55): field 'chosen' must be a str")):
        load_preference_data(args, tokenizer)


# ---------------------------------------------------------------------------------- max_prompt_length

def test_max_prompt_length_cuts_prompts_from_the_left_keeping_bos(tokenizer):
    special = toy_tokenizer_adding(bos=True, eos=False)
    rows = [{"prompt": LONG_PROMPT, "chosen": " good.", "rejected": " very bad."},
            {"prompt": "i saw it.", "chosen": " good.", "rejected": " bad."}]
    full_long, full_short = untruncated(rows, tokenizer)
    bos = special.bos_token_id
    long_row, short_row = prepare(rows, special, max_length=10_000, max_prompt_length=6)
    assert long_row["prompt_input_ids"] == [bos] + full_long["prompt_input_ids"][-5:]  # 6 tokens, bos counted
    assert short_row["prompt_input_ids"] == [bos] + full_short["prompt_input_ids"]  # short prompts stay whole
    for row, full in ((long_row, full_long), (short_row, full_short)):
        assert (row["chosen_input_ids"], row["rejected_input_ids"]) == (full["chosen_input_ids"],
                                                                        full["rejected_input_ids"])


@pytest.mark.parametrize("mode", ["keep_start", "keep_end"])
def test_max_prompt_length_applies_before_max_length(mode, tokenizer):
    rows = [{"prompt": LONG_PROMPT, "chosen": LONG_ANSWER, "rejected": " bad."}]
    (full,) = untruncated(rows, tokenizer)
    max_length = len(full["prompt_input_ids"])  # keep_start alone has no room for a completion here
    with pytest.raises(DataError, match="no room for a completion"):
        prepare(rows, tokenizer, max_length=max_length, truncation_mode="keep_start")
    (row,) = prepare(rows, tokenizer, max_length=max_length, max_prompt_length=4, truncation_mode=mode)
    # a 4-token prompt leaves max_length - 4 for completions, which keep_end does not cut further into the prompt
    assert row["prompt_input_ids"] == full["prompt_input_ids"][-4:]
    assert row["chosen_input_ids"] == full["chosen_input_ids"][:max_length - 4]
    assert row["rejected_input_ids"] == full["rejected_input_ids"]


def test_max_prompt_length_must_be_positive():
    with pytest.raises(ConfigError, match="--max_prompt_length must be >= 1"):
        parse_args((DataArguments,), ["--max_prompt_length", "0"])


# ------------------------------------------------------------------------------------------- mixtures

def explicit_rows(tag: str, n: int) -> list[dict]:
    return [{"prompt": f"{tag} prompt {i}.", "chosen": f" {tag} good {i}.", "rejected": f" {tag} bad {i}."}
            for i in range(n)]


def hh_rows_with_a_prompt_column(n: int) -> list[dict]:
    """Implicit rows plus a 'prompt' column that would make them explicit: `columns` must select it away."""
    return [{"prompt": "a distracting column", "chosen": f"\n\nHuman: question {i}?\n\nAssistant: yes {i}.",
             "rejected": f"\n\nHuman: question {i}?\n\nAssistant: no {i}."} for i in range(n)]


def test_dataset_mixture_from_a_yaml_recipe(tmp_path, rows_file, tokenizer):
    a_rows, b_rows = explicit_rows("a", 20), hh_rows_with_a_prompt_column(10)
    a, b = rows_file("a.jsonl", a_rows), rows_file("b.jsonl", b_rows)
    mixture = {"datasets": [{"id": a, "weight": 0.5}, {"id": b, "columns": ["chosen", "rejected"]},
                            {"id": toy_task.TOY_DATASET_NAME, "split": "test", "weight": 0.25}],
               "seed": 3, "test_split_size": 0.2}
    config = tmp_path / "recipe.yaml"
    config.write_text(yaml.safe_dump({"dataset_mixture": mixture, "max_length": 64, "toy_num_eval_pairs": 8}))
    (args,) = parse_args((DataArguments,), [str(config)])
    assert args.dataset_mixture == mixture  # the YAML mapping arrives intact
    data = load_preference_data(args, tokenizer)
    total = 10 + 10 + 2
    assert (len(data["train"]), len(data["test"])) == (total - math.ceil(0.2 * total), math.ceil(0.2 * total))
    mixed = [row for split in ("train", "test") for row in data[split]]
    # a: the rows alignment-handbook keeps, the split shuffled with the mixture's seed, then its first half
    kept_a = Dataset.from_list(a_rows).shuffle(seed=3).select(range(10))["prompt"]
    assert sorted(row["prompt"] for row in mixed if row["prompt"].startswith("a ")) == sorted(kept_a)
    # b: with the 'prompt' column selected away, implicit rows whose prompt is the shared dialog
    b_prompts = sorted(row["prompt"] for row in mixed if row["prompt"].startswith("\n\nHuman:"))
    assert b_prompts == sorted(f"\n\nHuman: question {i}?\n\nAssistant:" for i in range(10))
    for row in mixed:  # each row names its dataset split and its row there (row numbers repeat across parts)
        path, source = (a, a_rows) if row["prompt"].startswith("a ") else (b, b_rows) if row["prompt"].startswith(
            "\n") else (toy_task.TOY_DATASET_NAME, None)
        assert row["source"] == f"{path} [{'test' if source is None else 'train'}]"
        if source is not None:
            assert row["chosen"] in source[row["row_index"]]["chosen"]  # row_index is the source's row
    toy_prompts = [row["prompt"] for row in mixed if not row["prompt"].startswith(("a ", "\n"))]
    assert len(toy_prompts) == 2 and set(toy_prompts) <= {row["prompt"] for row in toy_task.generator_pairs(8, seed=1)}


def test_dataset_mixture_errors_name_the_dataset(rows_file, tokenizer):
    a = rows_file("a.jsonl", explicit_rows("a", 4))
    bad = rows_file("bad.jsonl", [*explicit_rows("b", 3), {"prompt": "p", "chosen": 5, "rejected": " r"}])

    def load(*datasets_):
        return load_preference_data(DataArguments(dataset_mixture={"datasets": list(datasets_)}), tokenizer)

    with pytest.raises(DataError, match=re.escape(f"{bad} [train] row 3 (line 4): field 'chosen' must be a str")):
        load({"id": a}, {"id": bad})
    with pytest.raises(DataError, match=re.escape(f"{a}: no split 'validation'")):
        load({"id": a, "split": "validation"})
    with pytest.raises(DataError, match=re.escape(f"{a} [train]: no column(s) ['question'] to select")):
        load({"id": a, "columns": ["question", "chosen"]})
    with pytest.raises(ConfigError, match=re.escape(f"dataset_mixture: {a}: weight must be a fraction")):
        load({"id": a, "weight": 1.5})
    with pytest.raises(ConfigError, match=re.escape(f"dataset_mixture: {a}: unknown key(s) ['wieght']")):
        load({"id": a, "wieght": 0.5})
    with pytest.raises(ConfigError, match=r"dataset_mixture: datasets\[0\] must be a mapping with a string 'id'"):
        load({"name": a})


def test_dataset_mixture_parses_as_json_on_the_command_line_and_help_works(rows_file, capsys):
    mixture = {"datasets": [{"id": rows_file("a.jsonl", explicit_rows("a", 2)), "weight": 0.5}], "seed": 1}
    (args,) = parse_args((DataArguments,), ["--dataset_mixture", json.dumps(mixture)])
    assert args.dataset_mixture == mixture
    with pytest.raises(ConfigError, match="dataset_mixture: not a JSON mapping"):
        parse_args((DataArguments,), ["--dataset_mixture", "{datasets: oops"])
    with pytest.raises(SystemExit) as exit_info:
        parse_args((DataArguments,), ["--help"])
    assert exit_info.value.code == 0
    help_text = " ".join(capsys.readouterr().out.split())
    assert "--dataset_mixture" in help_text and "--max_prompt_length" in help_text and "--dataset_mixer" in help_text


def test_dataset_mixer_keeps_the_first_rows_of_each_train_split_and_every_test_row(tmp_path, rows_file, tokenizer):
    splits = {name: {"train": explicit_rows(f"{name} train", 10), "test": explicit_rows(f"{name} test", 3)}
              for name in ("a", "b")}
    for name, by_split in splits.items():
        for split, rows in by_split.items():
            rows_file(f"{name}/{split}.jsonl", rows)
    config = tmp_path / "recipe.yaml"
    config.write_text(yaml.safe_dump({"dataset_mixer": {str(tmp_path / "a"): 0.3, str(tmp_path / "b"): 1.0},
                                      "dataset_splits": ["train", "test"]}))
    (args,) = parse_args((DataArguments,), [str(config)])
    data = load_preference_data(args, tokenizer)
    expected_train = splits["a"]["train"][:3] + splits["b"]["train"]  # the first int(0.3 * 10) rows of a
    assert sorted(row["prompt"] for row in data["train"]) == sorted(row["prompt"] for row in expected_train)
    assert sorted(texts(data["test"]), key=str) == sorted(splits["a"]["test"] + splits["b"]["test"], key=str)
    assert data["train"]["prompt"] != [row["prompt"] for row in expected_train]  # shuffled (seed 42)
    with pytest.raises(ConfigError, match=r"dataset_splits: 'dev' names neither a train nor a test split"):
        DataArguments(dataset_mixer={"a": 1.0}, dataset_splits=["train", "dev"])
    with pytest.raises(ConfigError, match=r"dataset_configs: 1 names for 2 datasets"):
        DataArguments(dataset_mixer={"a": 1.0, "b": 0.5}, dataset_configs=["x"])


# ------------------------------------------------------------------------------ an HH-RLHF-like split

HH_ROWS = 24
HH_EMPTY_CHOSEN, HH_EMPTY_REJECTED, HH_IDENTICAL, HH_LONG = (5, 13), (21,), 9, 17


def hh_rlhf_like_rows() -> tuple[list[dict], list[str]]:
    """HH-RLHF's layout: chosen and rejected are whole dialogs ('\\n\\nHuman: ...\\n\\nAssistant: ...') that differ
    in the final answer only; some final answers are empty, one pair is identical and one dialog is very long.
    Returns the rows and each row's prompt (the dialog up to its last assistant turn), known by construction."""
    utterances = iter(review.split(". ")[0] for review in toy_task.make_corpus(400, seed=7))
    rows, prompts = [], []
    for i in range(HH_ROWS):
        exchanges = 14 if i == HH_LONG else 2 + i % 3
        dialog = "".join(f"\n\nHuman: {next(utterances)}\n\nAssistant: {next(utterances)}" for _ in range(exchanges))
        prompt = dialog + f"\n\nHuman: {next(utterances)}\n\nAssistant:"
        chosen, rejected = " yes, " + next(utterances), " no, " + next(utterances)
        chosen = "" if i in HH_EMPTY_CHOSEN else chosen
        rejected = "" if i in HH_EMPTY_REJECTED else chosen if i == HH_IDENTICAL else rejected
        rows.append({"chosen": prompt + chosen, "rejected": prompt + rejected})
        prompts.append(prompt)
    return rows, prompts


HH_MAX_LENGTH = 192  # more than any dialog's prompt but the long one's


def test_hh_rlhf_like_split_keeps_the_rows_that_can_train_and_names_the_others(rows_file, tokenizer, caplog):
    rows, prompts = hh_rlhf_like_rows()
    too_long = [i for i, prompt in enumerate(prompts) if len(ids(tokenizer, prompt)) >= HH_MAX_LENGTH]
    assert too_long == [HH_LONG]  # the fixture is what it says
    path = rows_file("harmless-base/test.jsonl", rows)
    with caplog.at_level(logging.WARNING, logger="utils.data"):
        train = load_preference_data(DataArguments(dataset_name=path, max_length=HH_MAX_LENGTH), tokenizer)["train"]
    assert train["row_index"] == [i for i in range(HH_ROWS) if i not in (HH_IDENTICAL, HH_LONG)]
    eos = tokenizer.eos_token_id
    for row in train:
        assert row["prompt"] == prompts[row["row_index"]]
        assert row["prompt_input_ids"] == ids(tokenizer, row["prompt"])
        for side, empty_rows in (("chosen", HH_EMPTY_CHOSEN), ("rejected", HH_EMPTY_REJECTED)):
            completion = row[f"{side}_input_ids"]
            if row["row_index"] in empty_rows:
                assert completion == [eos]
            else:
                assert completion == ids(tokenizer, rows[row["row_index"]][side][len(row["prompt"]):]) + [eos]
    source = f"{path} [train]"  # rows of a JSON Lines file are named with their line (row + 1 here)
    assert f"{source}: dropped 1 of 24 pairs whose chosen equals rejected (row 9 (line 10))" in caplog.text
    assert (f"{source}: dropped 1 of 24 pairs whose prompt leaves no room for a completion within max_length "
            f"{HH_MAX_LENGTH} (row 17 (line 18))") in caplog.text
    assert (f"{source}: 3 of 24 pairs have an empty answer (rows 5 (line 6), 13 (line 14), 21 (line 22)): it trains "
            f"as an eos-only completion") in caplog.text


def test_hh_rlhf_like_split_trains_under_default_flags(tmp_path, rows_file):
    import train_dpo

    path = rows_file("harmless-base/test.jsonl", hh_rlhf_like_rows()[0])
    trainer = train_dpo.main(["--dataset_name", path, "--model_name_or_path", "mixtral-tiny", "--max_length",
                              str(HH_MAX_LENGTH), "--max_steps", "2", "--per_device_train_batch_size", "4",
                              "--use_cpu", "true", "--report_to", "none", "--logging_steps", "1", "--disable_tqdm",
                              "true", "--output_dir", str(tmp_path / "out"), "--ref_logps_cache_dir",
                              str(tmp_path / "cache")])
    assert trainer.state.global_step == 2
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert losses and all(math.isfinite(loss) for loss in losses)
# ---------------------------------------------------------------- bad input through train_dpo, row indices

OTHER = {"prompt": "this film came out last year.", "chosen": " i loved it.", "rejected": " i hated it."}
USER, ASSISTANT = user("hi"), assistant("hello")

BAD_DATA = [  # rows, flags, error message (regex)
    pytest.param([{"prompt": "p", "chosen": " a"}] * 2, [], r"row 0 \(line 1\): missing field 'rejected'",
                 id="missing-column"),
    pytest.param([GOOD, {"prompt": "p", "chosen": " a"}], [], r"row 1 \(line 2\): field 'rejected' must be a str, "
                 r"got null or missing", id="missing-in-one-row"),
    pytest.param([GOOD, {**GOOD, "chosen": None}], [], r"row 1 \(line 2\): field 'chosen' must be a str, got null",
                 id="null"),
    pytest.param([GOOD, GOOD, {**GOOD, "prompt": 7}], [], r"row 2 \(line 3\): field 'prompt' must be a str, got int",
                 id="non-string"),
    pytest.param([{"chosen": [USER, ASSISTANT], "rejected": [{"role": "human", "content": "hi"}, ASSISTANT]}], [],
                 r"row 0 \(line 1\): field 'rejected' message 0 has role 'human'", id="unknown-role"),
    pytest.param([{"prompt": [USER], "chosen": [ASSISTANT], "rejected": [USER]}], [],
                 r"row 0 \(line 1\): field 'rejected' must end with an assistant turn", id="not-ending-in-assistant"),
    pytest.param([{**GOOD, "prompt": "i watched this movie last night with my sister and my brother " * 3}] * 2,
                 ["--max_length", "12"], r"no pair left to train on: all 2 pairs were dropped: 2 whose prompt leaves "
                 r"no room for a completion within max_length 12", id="every-prompt-longer-than-max-length"),
    pytest.param([{**GOOD, "rejected": GOOD["chosen"]}] * 2, [], r"no pair left to train on: all 2 pairs were dropped: "
                 r"2 whose chosen equals rejected", id="every-chosen-identical-to-rejected"),
]


@pytest.mark.parametrize("rows, flags, message", BAD_DATA)
def test_bad_rows_fail_before_anything_is_written(rows, flags, message, tmp_path, rows_file):
    path = rows_file("pairs.jsonl", rows)
    with pytest.raises(DataError, match=re.escape(path) + r" \[train\]:? " + message):
        train_dpo.main(tiny_run_args(tmp_path, "--dataset_name", path, *flags))
    assert not (tmp_path / "out").exists() and not (tmp_path / "cache").exists()


def test_corrupt_jsonl_line_is_named(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps(GOOD) + "\n" + json.dumps(OTHER) + "\n" + '{"prompt": "x", "chosen": \n'
                    + json.dumps(GOOD) + "\n")
    with pytest.raises(DataError, match=re.escape(str(path)) + r" line 3: invalid JSON \(Expecting value"):
        train_dpo.main(tiny_run_args(tmp_path, "--dataset_name", str(path)))
    assert not (tmp_path / "out").exists()


def test_corrupt_json_array_file_is_named(tmp_path):
    path = tmp_path / "pairs.json"
    path.write_text("[\n" + json.dumps(GOOD) + ",\n" + json.dumps(OTHER)[:-1] + ",,\n]\n")
    with pytest.raises(DataError, match=re.escape(str(path)) + r" line 3: invalid JSON"):
        load_preference_data(DataArguments(dataset_name=str(path)), load_tokenizer(ModelArguments()))


def test_missing_dataset_path(tmp_path):
    path = str(tmp_path / "nowhere" / "pairs.jsonl")
    with pytest.raises(DataError, match=re.escape(path) + ": no such file or folder"):
        train_dpo.main(tiny_run_args(tmp_path, "--dataset_name", path))
    assert not (tmp_path / "out").exists()


def test_row_index_names_source_rows_and_reaches_the_batch(tokenizer):
    rows = [GOOD, {**GOOD, "rejected": GOOD["chosen"]}, OTHER]  # the identical pair (row 1) is dropped
    pairs = prepare_split(Dataset.from_list(rows), DataArguments(dataset_name="inline"), tokenizer, "train")
    assert pairs["row_index"] == [0, 2] and pairs["source"] == ["inline [train]"] * 2
    batch = PreferenceCollator(tokenizer.pad_token_id)(list(pairs))
    assert batch["row_index"].tolist() == [0, 2] and batch["source"] == ["inline [train]"] * 2


def _latin1_pairs(path):
    path.write_bytes(json.dumps(GOOD).encode() + b"\n" + json.dumps({**OTHER, "prompt": "caf\xe9"}, ensure_ascii=False)
                     .encode("latin-1") + b"\n")


def _bom_and_broken_line_5(path):
    lines = [json.dumps(GOOD), json.dumps(OTHER)] * 3
    lines[4] = '{"prompt": "x", "chosen": '
    path.write_text("\n".join(lines) + "\n", encoding="utf-8-sig")


def _readme_only(path):
    path.mkdir()
    (path / "README.txt").write_text("pairs for the demo\n")


@pytest.mark.parametrize("name, make, message", [
    ("pairs.jsonl", lambda path: path.write_text(""), "{path}: empty file, no rows"),
    ("pairs.jsonl", lambda path: path.write_text("\n  \n"), "{path}: empty file, no rows"),
    ("pairs.csv", lambda path: path.write_text("prompt,chosen,rejected\n"), "{path}: no rows"),
    ("pairs", lambda path: path.mkdir(), "{path}: no data file (.csv, .json, .jsonl, .parquet) in this folder; "
                                         "it is empty"),
    ("pairs", _readme_only, "{path}: no data file (.csv, .json, .jsonl, .parquet) in this folder; it holds "
                            "['README.txt']"),
    ("pairs.jsonl", _latin1_pairs, "{path} line 2: not UTF-8 text (byte 0xe9 at column 16); save the file as UTF-8"),
    ("pairs.jsonl", _bom_and_broken_line_5, "{path} line 5: invalid JSON (Expecting value, column 27)"),
], ids=["empty-file", "blank-lines", "header-only", "empty-folder", "readme-only", "not-utf8", "bom-broken-line-5"])
def test_a_data_source_that_cannot_be_read_is_one_line_naming_file_and_line(name, make, message, tmp_path, capsys):
    from utils.cli import run_script

    path = tmp_path / name
    make(path)
    with pytest.raises(SystemExit) as exit_info:
        run_script(lambda: train_dpo.main(tiny_run_args(tmp_path, "--dataset_name", str(path))))
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "Traceback" not in err
    assert [line for line in err.splitlines() if line.startswith("error:")] == ["error: " + message.format(path=path)]
    assert not (tmp_path / "out").exists() and not (tmp_path / "cache").exists()


def test_a_byte_order_mark_is_not_part_of_the_first_row(tmp_path, tokenizer):
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps(GOOD) + "\n" + json.dumps(OTHER) + "\n", encoding="utf-8-sig")
    assert load_preference_data(DataArguments(dataset_name=str(path)), tokenizer)["train"]["prompt"] == \
        [GOOD["prompt"], OTHER["prompt"]]
