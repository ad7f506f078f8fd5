import json
import os
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from helpers import loop_logps
from utils import reference
from utils.data import DataArguments, PreferenceCollator, load_preference_data
from utils.modeling import ModelArguments, apply_lora, load_model, load_tokenizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def setup(num_pairs=24, model_init_seed=0, **data_overrides):
    model_args = ModelArguments(model_name_or_path="mixtral-tiny", model_init_seed=model_init_seed)
    data_args = DataArguments(**{"toy_num_train_pairs": num_pairs, "toy_num_eval_pairs": 8, "max_length": 64,
                                 **data_overrides})
    tokenizer = load_tokenizer(model_args)
    model = load_model(model_args, tokenizer)
    dataset = load_preference_data(data_args, tokenizer)
    return model_args, data_args, tokenizer, model, dataset


def score(model, dataset_dict, model_args, data_args, cache_dir, tokenizer):
    return reference.add_reference_columns(model, dataset_dict, PreferenceCollator(tokenizer.pad_token_id),
                                           model_args=model_args, data_args=data_args, device=torch.device("cpu"),
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

    changes = {"data": dict(toy_seed=5), "max_length": dict(max_length=12), "model": dict(model_init_seed=1)}
    for name, change in changes.items():
        before = len(calls)
        model_args, data_args, tokenizer, model, dataset = setup(**change)
        score(model, dataset, model_args, data_args, tmp_path, tokenizer)
        assert len(calls) > before, f"changing the {name} must recompute"


def test_checkpoint_identity_changes_when_its_weights_are_rewritten(tmp_path):
    model_args, data_args, tokenizer, model, dataset = setup()
    model.save_pretrained(tmp_path / "ckpt")
    args = ModelArguments(model_name_or_path=str(tmp_path / "ckpt"))
    loaded = load_model(args, tokenizer)
    before = reference.reference_fingerprint(args, loaded, dataset["train"], data_args, torch.float32)
    assert before == reference.reference_fingerprint(args, loaded, dataset["train"], data_args, torch.float32)
    with torch.no_grad():
        model.lm_head.weight.mul_(2)
    model.save_pretrained(tmp_path / "ckpt")
    assert reference.reference_fingerprint(args, loaded, dataset["train"], data_args, torch.float32) != before


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


def test_two_processes_score_like_one(tmp_path):
    """torchrun with 2 CPU processes (gloo): the cached reference log-probs equal a one-process run."""
    common = [os.path.join(REPO, "train_dpo.py"), "--model_name_or_path", "mixtral-tiny", "--toy_num_train_pairs",
              "40", "--toy_num_eval_pairs", "8", "--max_length", "64", "--max_steps", "1",
              "--precompute_ref_batch_size", "4", "--per_device_train_batch_size", "2", "--report_to", "none",
              "--use_cpu", "true"]  # without it accelerate starts no process group on CPU: two separate runs
    env = dict(os.environ, OMP_NUM_THREADS="1")
    with socket.socket() as probe:  # a free port, so that concurrent test runs don't collide
        probe.bind(("127.0.0.1", 0))
        port = str(probe.getsockname()[1])
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", port]
    for name, launcher in (("one", [sys.executable]), ("two", torchrun)):
        subprocess.run(launcher + common + ["--ref_logps_cache_dir", str(tmp_path / name),
                                            "--output_dir", str(tmp_path / f"out_{name}")],
                       check=True, env=env, cwd=REPO, capture_output=True)
    files = sorted(os.listdir(tmp_path / "one"))
    assert files == sorted(os.listdir(tmp_path / "two")) and len(files) == 2
    for name in files:
        one, two = load_file(tmp_path / "one" / name), load_file(tmp_path / "two" / name)
        for column in reference.REF_COLUMNS:
            torch.testing.assert_close(one[column], two[column], rtol=0, atol=1e-5)
    state = json.loads((tmp_path / "out_two" / "trainer_state.json").read_text())
    assert state["global_step"] == 1
