import dataclasses
import hashlib
import json
import logging
import os
import re
import shutil
from unittest.mock import ANY
import threading
import time

import huggingface_hub
import pytest
import safetensors
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, FineGrainedFP8Config

from helpers import loop_logps
from utils import reference
from utils.reference import add_reference_columns
from utils.data import DataArguments, PreferenceCollator, load_preference_data
from utils.modeling import AUTOCAST_GROUPED_MM, ModelArguments, apply_lora, load_model, load_tokenizer



def setup(num_pairs=24, model_init_seed=0, **data_overrides):
    model_args = ModelArguments(model_name_or_path="mixtral-tiny", model_init_seed=model_init_seed)
    data_args = DataArguments(**{"toy_num_train_pairs": num_pairs, "toy_num_eval_pairs": 8, "max_length": 64,
                                 **data_overrides})
    tokenizer = load_tokenizer(model_args)
    model = load_model(model_args, tokenizer)
    dataset = load_preference_data(data_args, tokenizer)
    return model_args, data_args, tokenizer, model, dataset


def score(model, dataset_dict, model_args, data_args, cache_dir, tokenizer):
    return add_reference_columns(model, dataset_dict, PreferenceCollator(tokenizer.pad_token_id),
                                 model_args=model_args, data_args=data_args,
                                 cache_dir=str(cache_dir), batch_size=5)


def test_precomputed_logps_equal_an_independent_loop(tmp_path):
    model_args, data_args, tokenizer, model, dataset = setup()
    scored = score(model, dataset, model_args, data_args, tmp_path, tokenizer)
    for split in ("train", "test"):
        for row in scored[split]:
            for side in ("chosen", "rejected"):
                expected = loop_logps(model, row["prompt_input_ids"], row[f"{side}_input_ids"])
                assert row[f"ref_{side}_logps"] == pytest.approx(expected, abs=1e-4)


def count_scoring(monkeypatch):
    calls = []
    original = reference.score_dataset

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(reference, "score_dataset", counting)
    return calls


def test_cache_hit_on_identical_rerun_and_miss_on_changes(tmp_path, monkeypatch):
    calls = count_scoring(monkeypatch)
    model_args, data_args, tokenizer, model, dataset = setup()
    first = score(model, dataset, model_args, data_args, tmp_path, tokenizer)
    assert len(calls) == 2  # train and test scored
    assert len(os.listdir(tmp_path)) == 2

    model_args, data_args, tokenizer, model, dataset = setup()  # everything rebuilt from scratch, identical
    second = score(model, dataset, model_args, data_args, tmp_path, tokenizer)
    assert len(calls) == 2  # nothing rescored
    assert second["train"]["ref_chosen_logps"] == first["train"]["ref_chosen_logps"]

    changes = {"data": dict(toy_seed=5), "model": dict(model_init_seed=1)}
    for name, change in changes.items():
        before = len(calls)
        model_args, data_args, tokenizer, model, dataset = setup(**change)
        score(model, dataset, model_args, data_args, tmp_path, tokenizer)
        assert len(calls) > before, f"changing the {name} must recompute"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """mixtral-tiny saved as a checkpoint folder, and the toy pairs: all shorter than 64 tokens, so neither
    max_length 64 nor 128 nor either truncation mode changes them."""
    model_args, data_args, tokenizer, model, dataset = setup(num_pairs=6)
    folder = tmp_path_factory.mktemp("identity") / "ckpt"
    model.save_pretrained(folder)
    return str(folder), tokenizer, data_args, dataset["train"]


def folder_fingerprint(folder, tokenizer, data_args, dataset, dtype=torch.float32, **model_overrides):
    model_args = ModelArguments(model_name_or_path=folder, **model_overrides)
    model = load_model(model_args, tokenizer)
    return reference.reference_fingerprint(model_args, model, dataset, data_args, dtype)


# the biggest tensor, and one that no window of the file's even spread covers (as an attention-only LoRA merge)
@pytest.mark.parametrize("tensor", ["lm_head.weight", "model.layers.0.self_attn.q_proj.weight"])
def test_checkpoint_overwritten_in_place_with_its_old_times_is_a_cache_miss(tensor, checkpoint, tmp_path):
    """Same names, sizes and modification times (as `cp -p` or `rsync -a` leave them): only `tensor` differs."""
    source, tokenizer, data_args, dataset = checkpoint
    folder = shutil.copytree(source, tmp_path / "ckpt")
    before = folder_fingerprint(str(folder), tokenizer, data_args, dataset)
    assert folder_fingerprint(str(folder), tokenizer, data_args, dataset) == before
    files = {path: path.stat() for path in folder.iterdir()}
    model = load_model(ModelArguments(model_name_or_path=str(folder)), tokenizer)
    with torch.no_grad():  # other weights of the same shapes
        model.get_parameter(tensor).mul_(2)
    model.save_pretrained(folder)
    for path, stat in files.items():
        assert path.stat().st_size == stat.st_size
        os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert folder_fingerprint(str(folder), tokenizer, data_args, dataset) != before


def identity_change(name, checkpoint):
    """(model_args, model, dataset, data_args, dtype) of the base case (the checkpoint as loaded by load_model,
    scored in float32) with only `name` changed."""
    folder, tokenizer, data_args, dataset = checkpoint
    model_args, dtype = ModelArguments(model_name_or_path=folder), torch.float32
    if name == "data":
        dataset = load_preference_data(dataclasses.replace(data_args, toy_seed=5), tokenizer)["train"]
    elif name in ("max_length", "truncation_mode"):  # tokenised again under the new setting: the same tokens
        other_value = {"max_length": 128, "truncation_mode": "keep_end"}[name]
        data_args = dataclasses.replace(data_args, **{name: other_value})
        dataset = load_preference_data(data_args, tokenizer)["train"]
    elif name == "dtype":
        dtype = torch.bfloat16
    elif name == "attn_implementation":
        model_args = ModelArguments(model_name_or_path=folder, attn_implementation="eager")
    elif name == "weights_dtype":
        model_args = ModelArguments(model_name_or_path=folder, dtype="bfloat16")
    model = load_model(model_args, tokenizer)
    if name == "experts_implementation":
        model.set_experts_implementation("batched_mm")
    elif name == "quantization":  # FP8 dequantized on load (CPU): the same float32 weights, but a quantizer
        model = AutoModelForCausalLM.from_pretrained(folder, quantization_config=FineGrainedFP8Config(dequantize=True))
        model.set_experts_implementation(AUTOCAST_GROUPED_MM)  # as load_model sets it: only the quantizer differs
    return model_args, model, dataset, data_args, dtype


@pytest.mark.parametrize("name", ["data", "max_length", "truncation_mode", "dtype", "attn_implementation",
                                  "experts_implementation", "weights_dtype", "quantization"])
def test_each_identity_field_alone_makes_a_cache_miss(name, checkpoint, tmp_path):
    dataset = checkpoint[3]
    base = identity_change(None, checkpoint)
    changed = identity_change(name, checkpoint)
    if name != "data":  # the tokens are the same: only the field itself can tell the two apart
        assert reference.dataset_token_hash(changed[2]) == reference.dataset_token_hash(dataset)
    base_fingerprint = reference.reference_fingerprint(*base)
    changed_fingerprint = reference.reference_fingerprint(*changed)
    assert changed_fingerprint != base_fingerprint

    tensors = {column: torch.randn(len(dataset)) for column in reference.REF_COLUMNS}
    reference.save_cache(str(tmp_path / f"{base_fingerprint}.safetensors"), tensors, base_fingerprint)
    assert reference.load_cached_logps(dataset, fingerprint=base_fingerprint, cache_dir=str(tmp_path),
                                       split="train") is not None
    assert reference.load_cached_logps(changed[2], fingerprint=changed_fingerprint, cache_dir=str(tmp_path),
                                       split="train") is None


def test_peft_reference_is_the_base_model_with_adapters_disabled(tmp_path):
    model_args, data_args, tokenizer, base, dataset = setup(num_pairs=6)
    base_logps = [loop_logps(base, row["prompt_input_ids"], row["chosen_input_ids"]) for row in dataset["train"]]
    peft_model = apply_lora(base, ModelArguments(model_name_or_path="mixtral-tiny", use_peft=True))
    with torch.no_grad():  # make the adapter matter: LoRA starts as an exact no-op (B = 0)
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    adapted_logps = [loop_logps(peft_model, row["prompt_input_ids"], row["chosen_input_ids"])
                     for row in dataset["train"]]
    assert max(abs(a - b) for a, b in zip(adapted_logps, base_logps)) > 1e-2

    scored = score(peft_model, dataset, model_args, data_args, tmp_path, tokenizer)
    assert scored["train"]["ref_chosen_logps"] == pytest.approx(base_logps, abs=1e-4)


# ----------------------------------------------------------------------------------- adapters as users have them

def save_base(folder, tokenizer, model_init_seed: int) -> None:
    model = load_model(ModelArguments(model_name_or_path="mixtral-tiny", model_init_seed=model_init_seed), tokenizer)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def save_adapter(folder, base_folder, tokenizer) -> None:
    """A LoRA adapter of the checkpoint `base_folder` (named in its adapter_config.json), with weights that matter
    (LoRA starts as a no-op: B = 0), and the tokenizer: what `train_dpo.py --use_peft` saves."""
    model = apply_lora(load_model(ModelArguments(model_name_or_path=str(base_folder)), tokenizer),
                       ModelArguments(model_name_or_path=str(base_folder), use_peft=True))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.5)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


@pytest.fixture
def adapter(tmp_path):
    """(adapter folder, base folder, tokenizer): a LoRA adapter of a mixtral-tiny checkpoint."""
    tokenizer = load_tokenizer(ModelArguments(model_name_or_path="mixtral-tiny"))
    save_base(tmp_path / "base", tokenizer, model_init_seed=0)
    save_adapter(tmp_path / "adapter", tmp_path / "base", tokenizer)
    return tmp_path / "adapter", tmp_path / "base", tokenizer


def test_an_adapter_s_reference_identity_holds_its_base_model(adapter, tmp_path, monkeypatch):
    """The adapter folder's files stay the same while its base is re-trained: the cache must miss; the same base
    hits."""
    folder, base_folder, tokenizer = adapter
    calls = count_scoring(monkeypatch)
    model_args = ModelArguments(model_name_or_path=str(folder))
    data_args = DataArguments(toy_num_train_pairs=6, toy_num_eval_pairs=2, max_length=64)

    def score_adapter():
        model = load_model(model_args, tokenizer)
        return score(model, load_preference_data(data_args, tokenizer), model_args, data_args, tmp_path / "cache",
                     tokenizer)["train"]["ref_chosen_logps"]

    first = score_adapter()
    assert score_adapter() == first and len(calls) == 2  # the same base: a cache hit (train and test scored once)
    save_base(base_folder, tokenizer, model_init_seed=1)  # the base re-trained in place
    assert score_adapter() != first and len(calls) == 4


def chosen_logps(model, dataset) -> list[float]:
    return [loop_logps(model, row["prompt_input_ids"], row["chosen_input_ids"]) for row in dataset]


@pytest.mark.parametrize("flags", [[], ["--use_peft"], ["--precompute_ref_log_probs", "false"]],
                         ids=["adapter", "adapter-use-peft", "adapter-reference-each-step"])
def test_dpo_on_an_adapter_folder_trains_that_adapter_against_it(adapter, tmp_path, flags):
    """The policy starts as base + adapter (not the base alone, nor a new adapter), its reference is that same
    model (implicit rewards 0 at the first step), and the adapter trains while the base stays as it is."""
    import train_dpo
    from peft import PeftModel
    from helpers import tiny_run_args

    folder, base_folder, tokenizer = adapter
    base = AutoModelForCausalLM.from_pretrained(base_folder)
    user_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_folder), folder)
    eval_pairs = load_preference_data(DataArguments(toy_num_train_pairs=64, toy_num_eval_pairs=16, max_length=64),
                                      tokenizer)["test"]
    expected = chosen_logps(user_model, eval_pairs)
    assert max(abs(a - b) for a, b in zip(expected, chosen_logps(base, eval_pairs))) > 1e-2  # the adapter matters

    trainer = train_dpo.main(tiny_run_args(
        tmp_path, "--model_name_or_path", str(folder), "--max_steps", "2", "--learning_rate", "1e-2",
        "--eval_on_start", "true", "--per_device_eval_batch_size", "16", "--save_strategy", "no", *flags))
    start = trainer.state.log_history[0]  # the evaluation before any step
    assert start["eval_logps/chosen"] == pytest.approx(sum(expected) / len(expected), rel=1e-5)
    assert abs(start["eval_rewards/chosen"]) < 1e-6 and abs(start["eval_rewards/rejected"]) < 1e-6
    step_one = next(entry for entry in trainer.state.log_history if "rewards/chosen" in entry)
    assert abs(step_one["rewards/margins"]) < 1e-6  # the reference is the initial policy: base + adapter
    trained = load_file(str(tmp_path / "out" / "adapter_model.safetensors"))
    loaded = load_file(str(folder / "adapter_model.safetensors"))
    assert trained.keys() == loaded.keys()
    assert any(not torch.equal(trained[name], loaded[name]) for name in loaded)  # the user's adapter trained
    for name, param in trainer.model.get_base_model().named_parameters():
        if "lora_" not in name:  # the base weights as loaded
            torch.testing.assert_close(param, base.get_parameter(name.replace(".base_layer", "")), rtol=0, atol=0)


# ------------------------------------------------------------------------------------- Hub models' identity

def add_hub_commit(cache, repo_id: str, commit: str, folder) -> None:
    """Put `folder`'s files into the Hub cache `cache` as commit `commit` of `repo_id`, laid out as huggingface_hub
    downloads them (blobs named by content, snapshot links to them), and point refs/main at it."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    (repo / "snapshots" / commit).mkdir(parents=True)
    for path in sorted(folder.iterdir()):
        data = path.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (repo / "snapshots" / commit / path.name).symlink_to(os.path.relpath(blob, repo / "snapshots" / commit))
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(commit)


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An empty Hub cache that huggingface_hub and transformers read (the tests run with HF_HUB_OFFLINE=1)."""
    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    return cache


def saved_tiny_model(folder, tokenizer, seed: int):
    load_model(ModelArguments(model_name_or_path="mixtral-tiny", model_init_seed=seed), tokenizer).save_pretrained(folder)
    return folder


def test_hub_model_identity_is_the_commit_loaded(hub_cache, tmp_path, checkpoint):
    _, tokenizer, data_args, dataset = checkpoint
    repo_id, model_args = "org/tiny", ModelArguments(model_name_or_path="org/tiny")

    def fingerprint():
        model = load_model(model_args, tokenizer)  # from the cache, as a Hub model loads offline
        return reference.reference_fingerprint(model_args, model, dataset, data_args, torch.float32)

    add_hub_commit(hub_cache, repo_id, "a" * 40, saved_tiny_model(tmp_path / "v1", tokenizer, seed=0))
    first = fingerprint()
    assert fingerprint() == first  # the same commit: a hit

    add_hub_commit(hub_cache, repo_id, "b" * 40, saved_tiny_model(tmp_path / "v2", tokenizer, seed=1))
    assert fingerprint() != first  # main moved to a commit with other weights: a miss
    assert reference.model_identity(model_args, None)["commit"] == "b" * 40
    pinned = ModelArguments(model_name_or_path=repo_id, model_revision="a" * 40)
    assert reference.model_identity(pinned, None) == {**reference.model_identity(model_args, None),
                                                      "commit": "a" * 40, "files": ANY}


def test_remote_code_is_part_of_the_identity(hub_cache, tmp_path, checkpoint):
    """With trust_remote_code, the model's .py files decide its outputs as much as its weights do."""
    folder = saved_tiny_model(tmp_path / "remote", checkpoint[1], seed=0)
    (folder / "modeling_tiny.py").write_text("SCALE = 1.0\n")
    add_hub_commit(hub_cache, "org/remote", "c" * 40, folder)
    for path in (str(folder), "org/remote"):  # a local folder, and a snapshot in the Hub cache
        remote = ModelArguments(model_name_or_path=path, trust_remote_code=True)
        before = reference.model_identity(remote, None)
        code = folder / "modeling_tiny.py" if path == str(folder) \
            else hub_cache / "models--org--remote" / "snapshots" / ("c" * 40) / "modeling_tiny.py"
        code.resolve().write_text("SCALE = 2.0\n")
        assert reference.model_identity(remote, None) != before
        assert "modeling_tiny.py" not in reference.model_identity(ModelArguments(model_name_or_path=path), None)["files"]


def test_a_hub_adapter_s_identity_holds_its_base_model_s_commit(hub_cache, tmp_path):
    from peft import PeftModel

    tokenizer = load_tokenizer(ModelArguments(model_name_or_path="mixtral-tiny"))
    add_hub_commit(hub_cache, "org/tiny", "a" * 40, saved_tiny_model(tmp_path / "v1", tokenizer, seed=0))
    save_adapter(tmp_path / "lora", tmp_path / "v1", tokenizer)
    config_path = tmp_path / "lora" / "adapter_config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), "base_model_name_or_path": "org/tiny"}))
    add_hub_commit(hub_cache, "org/tiny-lora", "c" * 40, tmp_path / "lora")
    model_args = ModelArguments(model_name_or_path="org/tiny-lora")
    model = load_model(model_args, tokenizer)  # the adapter and its base, both from the Hub cache
    assert isinstance(model, PeftModel)
    first = reference.model_identity(model_args, model)
    assert (first["commit"], first["base"]["commit"]) == ("c" * 40, "a" * 40)
    assert reference.model_identity(model_args, model) == first  # the same base: a hit
    add_hub_commit(hub_cache, "org/tiny", "b" * 40, saved_tiny_model(tmp_path / "v2", tokenizer, seed=1))
    moved = reference.model_identity(model_args, model)
    assert moved["base"]["commit"] == "b" * 40 and moved != first  # the base moved on, the adapter did not: a miss


def test_hub_model_missing_from_the_cache_is_never_reused(hub_cache, caplog):
    model_args = ModelArguments(model_name_or_path="org/absent")
    with caplog.at_level("WARNING", logger="utils.reference"):
        first = reference.model_identity(model_args, None)
    assert "not in the Hub cache" in caplog.text
    assert reference.model_identity(model_args, None) != first
# ---------------------------------------------------------------------- damaged caches, concurrent writers

def scored(tmp_path, num_pairs=8):
    model_args = ModelArguments(model_name_or_path="mixtral-tiny")
    data_args = DataArguments(toy_num_train_pairs=num_pairs, toy_num_eval_pairs=4, max_length=64)
    tokenizer = load_tokenizer(model_args)
    model = load_model(model_args, tokenizer)
    dataset = load_preference_data(data_args, tokenizer)
    result = add_reference_columns(model, dataset, PreferenceCollator(tokenizer.pad_token_id),
                                   model_args=model_args, data_args=data_args,
                                   cache_dir=str(tmp_path), batch_size=4)
    fingerprint = reference.reference_fingerprint(model_args, model, dataset["train"], data_args, torch.float32)
    return result, tmp_path / f"{fingerprint}.safetensors", fingerprint


def truncate(path, fingerprint):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def alter(path, fingerprint):
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x10  # one bit of the last reference log-prob
    path.write_bytes(bytes(data))


def fewer_rows(path, fingerprint):
    reference.save_cache(str(path), {k: v[:-1] for k, v in load_file(path).items()}, fingerprint)


def no_checksum(path, fingerprint):  # e.g. an old file, or one edited and re-saved
    tensors = load_file(path)
    save_file(tensors, str(path), metadata={"fingerprint": fingerprint, "rows": str(len(tensors["ref_chosen_logps"]))})


def garbage(path, fingerprint):
    path.write_bytes(b"not a safetensors file")


@pytest.mark.parametrize("damage, reason", [(truncate, "unreadable"), (alter, "checksum mismatch"),
                                            (fewer_rows, "expected \\d+ rows"), (no_checksum, "checksum mismatch"),
                                            (garbage, "unreadable")],
                         ids=["truncated", "altered", "wrong-row-count", "no-checksum", "garbage"])
def test_damaged_cache_is_recomputed_never_loaded(damage, reason, tmp_path, monkeypatch, caplog):
    first, path, fingerprint = scored(tmp_path)
    damage(path, fingerprint)
    calls = []
    original = reference.score_dataset
    monkeypatch.setattr(reference, "score_dataset", lambda *a, **k: calls.append(1) or original(*a, **k))
    with caplog.at_level(logging.WARNING, logger="utils.reference"):
        again, _, _ = scored(tmp_path)
    assert len(calls) == 1  # train recomputed; eval still loaded from its intact file
    assert re.search(rf"{re.escape(str(path))} not used.*{reason}.*recomputing", caplog.text), caplog.text
    assert again["train"]["ref_chosen_logps"] == first["train"]["ref_chosen_logps"]
    assert again["train"]["ref_rejected_logps"] == first["train"]["ref_rejected_logps"]
    tensors, problem = reference.load_cache(str(path), fingerprint, len(first["train"]))  # rewritten, valid
    assert tensors is not None and problem == ""
    scored(tmp_path)
    assert len(calls) == 1  # and used from then on
    assert not [name for name in os.listdir(tmp_path) if name.endswith(".tmp")]


def test_concurrent_writers_of_one_cache_file_do_not_corrupt_it(tmp_path):
    path, rows = str(tmp_path / "same.safetensors"), 200_000
    tensors = {"ref_chosen_logps": torch.randn(rows), "ref_rejected_logps": torch.randn(rows)}
    errors, reads = [], []

    def write():
        try:
            for _ in range(15):
                reference.save_cache(path, tensors, "fp")
        except Exception as error:  # noqa: BLE001 -- collected and asserted below
            errors.append(error)

    def read():
        for _ in range(40):
            reads.append(reference.load_cache(path, "fp", rows)[1])

    threads = [threading.Thread(target=write) for _ in range(4)] + [threading.Thread(target=read)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    assert set(reads) <= {"", "missing"}, set(reads)  # readers saw a whole file or none
    loaded, problem = reference.load_cache(path, "fp", rows)
    assert problem == "" and torch.equal(loaded["ref_chosen_logps"], tensors["ref_chosen_logps"])
    assert os.listdir(tmp_path) == ["same.safetensors"]  # no temporary files left behind


def test_temp_files_of_killed_writers_are_removed_by_the_next_save(tmp_path):
    path = str(tmp_path / "fp.safetensors")
    orphaned, in_flight, unrelated = (tmp_path / name for name in ("fp.safetensors.dead.tmp",
                                                                   "fp.safetensors.busy.tmp",
                                                                   "other.safetensors.dead.tmp"))
    for temp in (orphaned, in_flight, unrelated):
        temp.write_bytes(b"half a file")
    two_hours_ago = time.time() - 7200
    os.utime(orphaned, (two_hours_ago, two_hours_ago))  # a writer SIGKILLed mid-write, long ago
    os.utime(unrelated, (two_hours_ago, two_hours_ago))
    reference.save_cache(path, {"ref_chosen_logps": torch.zeros(3), "ref_rejected_logps": torch.ones(3)}, "fp")
    assert sorted(os.listdir(tmp_path)) == ["fp.safetensors", "fp.safetensors.busy.tmp",  # maybe still writing
                                            "other.safetensors.dead.tmp"]  # another file's, left to its writer


def run_as_command(argv, capsys) -> tuple[int, list[str]]:
    """train_dpo as a user runs it (run_script): exit status and stderr lines, less scoring's progress bars."""
    import train_dpo
    from utils.cli import run_script

    with pytest.raises(SystemExit) as exit_info:
        run_script(lambda: train_dpo.main(argv))
    lines = capsys.readouterr().err.strip().splitlines()
    return exit_info.value.code, [line for line in lines if not line.startswith("reference log-probs")]


@pytest.mark.parametrize("error", [OSError(28, "No space left on device"), safetensors.SafetensorError(
    'Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })')],
    ids=["oserror", "safetensors"])
def test_a_full_cache_disk_is_one_line_and_leaves_no_temporary_file(error, tmp_path, capsys, monkeypatch):
    from helpers import tiny_run_args

    def full_disk(tensors, path, *args, **kwargs):
        with open(path, "wb") as half_written:
            half_written.write(b"half a file")
        raise error

    monkeypatch.setattr(reference, "save_file", full_disk)
    status, lines = run_as_command(tiny_run_args(tmp_path, "--max_steps", "1"), capsys)
    assert status == 2 and len(lines) == 1
    assert re.fullmatch(rf"error: no space left on the device of {tmp_path / 'cache'} while saving reference "
                        r"log-probs \(\d+\.\d\d GiB free\): .*", lines[0])
    assert os.listdir(tmp_path / "cache") == [] and os.listdir(tmp_path / "out") == []  # the Trainer made it empty


def test_a_folder_in_place_of_the_cache_file_stops_before_scoring(tmp_path, capsys, monkeypatch):
    from helpers import tiny_run_args

    monkeypatch.setattr(reference, "reference_fingerprint", lambda *args: "fp")
    monkeypatch.setattr(reference, "score_dataset", lambda *args, **kwargs: pytest.fail("scored"))
    (tmp_path / "cache" / "fp.safetensors").mkdir(parents=True)
    status, lines = run_as_command(tiny_run_args(tmp_path), capsys)
    assert (status, lines) == (2, [f"error: {tmp_path / 'cache' / 'fp.safetensors'}: a folder in place of the "
                                   "reference cache file: move it away"])
    assert list((tmp_path / "cache" / "fp.safetensors").iterdir()) == []
