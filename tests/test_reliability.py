"""Failure modes: bad input fails fast and writes nothing; SIGTERM/SIGINT checkpoint and exit; a run killed
after a checkpoint resumes to the same weights; damaged reference caches are recomputed; non-finite losses
and gradients stop the run naming the step and rows; no pickle."""

import json
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from safetensors.torch import load_file, save_file
from transformers import TrainerControl, TrainerState, TrainingArguments

import train_dpo
from helpers import add_reference_columns, subprocess_env, tiny_run_args
from utils import reference
from utils.checkpointing import GracefulInterrupt, latest_checkpoint, resolve_resume
from utils.cli import run_script
from utils.data import DataArguments, PreferenceCollator, load_preference_data, prepare_split
from utils.errors import ConfigError, DataError, NonFiniteError
from utils.modeling import ModelArguments, load_model, load_tokenizer

REPO = Path(__file__).resolve().parents[1]
GOOD = {"prompt": "i saw it.", "chosen": " good.", "rejected": " bad."}
OTHER = {"prompt": "this film came out last year.", "chosen": " i loved it.", "rejected": " i hated it."}
USER, ASSISTANT = {"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}


def write_jsonl(path: Path, rows: list) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


# ------------------------------------------------------------------------------------------ bad input

BAD_DATA = [  # rows, flags, error message (regex)
    pytest.param([{"prompt": "p", "chosen": " a"}] * 2, [], r"row 0: missing field 'rejected'", id="missing-column"),
    pytest.param([GOOD, {"prompt": "p", "chosen": " a"}], [], r"row 1: field 'rejected' must be a str, got null or "
                 r"missing", id="missing-in-one-row"),
    pytest.param([GOOD, {**GOOD, "chosen": None}], [], r"row 1: field 'chosen' must be a str, got null", id="null"),
    pytest.param([GOOD, {**GOOD, "rejected": "  "}], [], r"row 1: field 'rejected' is empty", id="empty"),
    pytest.param([GOOD, GOOD, {**GOOD, "prompt": 7}], [], r"row 2: field 'prompt' must be a str, got int",
                 id="non-string"),
    pytest.param([{"chosen": [USER, ASSISTANT], "rejected": [{"role": "human", "content": "hi"}, ASSISTANT]}], [],
                 r"row 0: field 'rejected' message 0 has role 'human'", id="unknown-role"),
    pytest.param([{"prompt": [USER], "chosen": [ASSISTANT], "rejected": [USER]}], [],
                 r"row 0: field 'rejected' must end with an assistant turn", id="not-ending-in-assistant"),
    pytest.param([GOOD, {**GOOD, "prompt": "i watched this movie last night with my sister and my brother " * 3}],
                 ["--max_length", "12"], r"row 1: field 'prompt' has \d+ tokens, max_length is 12",
                 id="prompt-longer-than-max-length"),
    pytest.param([{**GOOD, "rejected": GOOD["chosen"]}] * 2, [], r"all 2 pairs have chosen identical to rejected",
                 id="every-chosen-identical-to-rejected"),
]


@pytest.mark.parametrize("rows, flags, message", BAD_DATA)
def test_bad_rows_fail_before_anything_is_written(rows, flags, message, tmp_path):
    path = write_jsonl(tmp_path / "pairs.jsonl", rows)
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


BAD_FLAGS = [
    pytest.param(["--loss_type", "robust", "--label_smoothing", "0.5"], r"robust needs 0 <= --label_smoothing < 0.5",
                 id="robust-smoothing-0.5"),
    pytest.param(["--label_smoothing", "-0.1"], r"sigmoid needs 0 <= --label_smoothing", id="negative-smoothing"),
    pytest.param(["--loss_type", "ipo", "--label_smoothing", "0.1"], r"no meaning for --loss_type ipo",
                 id="ipo-with-smoothing"),
    pytest.param(["--beta", "0"], r"--beta must be > 0", id="beta-zero"),
    pytest.param(["--rpo_alpha", "-1"], r"--rpo_alpha must be >= 0", id="negative-rpo-alpha"),
    pytest.param(["--logps_chunk_size", "0"], r"--logps_chunk_size must be > 0", id="chunk-size-zero"),
    pytest.param(["--padding_free", "true", "--attn_implementation", "flex_attention"], r"--padding_free needs",
                 id="padding-free-attention"),
    pytest.param(["--load_best_model_at_end", "true", "--eval_strategy", "steps", "--save_strategy", "epoch"],
                 r"invalid arguments: .*load_best_model_at_end", id="training-arguments-own-check"),
    pytest.param(["--resume_from_checkpoint", "latest"], r"no complete checkpoint in", id="resume-without-checkpoint"),
]


@pytest.mark.parametrize("flags, message", BAD_FLAGS)
def test_flag_combinations_that_cannot_work(flags, message, tmp_path):
    with pytest.raises(ConfigError, match=message):
        train_dpo.main(tiny_run_args(tmp_path, *flags))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("text, message", [("beta: 0.1\nlearning_rat: 0.1\n", r"unknown key\(s\) \['learning_rat'\]"),
                                           ("beta: [0.1\n", r"invalid YAML"),
                                           ("- beta\n", r"expected a mapping")], ids=["unknown-key", "yaml", "list"])
def test_bad_config_file(text, message, tmp_path):
    config = tmp_path / "dpo.yaml"
    config.write_text(text)
    with pytest.raises(ConfigError, match=re.escape(str(config)) + ": " + message):
        train_dpo.main([str(config), *tiny_run_args(tmp_path)])
    with pytest.raises(ConfigError, match="no such config file"):
        train_dpo.main([str(tmp_path / "missing.yaml"), *tiny_run_args(tmp_path)])
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("error, status", [(DataError("pairs.jsonl [train] row 3: field 'chosen' is empty"), 2),
                                           (ConfigError("--beta must be > 0, got 0.0"), 2),
                                           (NonFiniteError("non-finite loss (nan) at step 3"), 1)])
def test_run_script_prints_one_line_and_exits(error, status, capsys):
    def main():
        raise error

    with pytest.raises(SystemExit) as exit_info:
        run_script(main)
    assert exit_info.value.code == status
    assert capsys.readouterr().err == f"error: {error}\n"


def test_run_script_keeps_tracebacks_of_bugs():
    def main():
        raise KeyError("a bug")

    with pytest.raises(KeyError):
        run_script(main)


def test_command_line_error_is_one_line_without_traceback(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps(GOOD) + "\nnot json\n")
    result = subprocess.run([sys.executable, "train_dpo.py", *tiny_run_args(tmp_path, "--dataset_name", str(path))],
                            cwd=REPO, capture_output=True, text=True, timeout=300, env=subprocess_env())
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == f"error: {path} line 2: invalid JSON (Expecting value, column 1)"
    assert not (tmp_path / "out").exists()


def test_row_index_names_source_rows_and_reaches_the_batch(tokenizer):
    rows = [GOOD, {**GOOD, "rejected": GOOD["chosen"]}, OTHER]  # the identical pair (row 1) is dropped
    pairs = prepare_split(Dataset.from_list(rows), DataArguments(dataset_name="inline"), tokenizer, "train")
    assert pairs["row_index"] == [0, 2]
    batch = PreferenceCollator(tokenizer.pad_token_id)(list(pairs))
    assert batch["row_index"].tolist() == [0, 2]


# ------------------------------------------------------------------------------------ interruption

# train_dpo.py as a user runs it, except that it waits `pause` seconds in every training step ("step") or after
# its first checkpoint ("save"), and touches `marker` when it does, so the test knows when to send a signal.
DRIVER = """
import pathlib, sys, time
import train_dpo
from utils.cli import run_script
marker, pause, where = pathlib.Path(sys.argv[1]), float(sys.argv[2]), sys.argv[3]
sys.argv = ["train_dpo.py"] + sys.argv[4:]
name = "training_step" if where == "step" else "_save_checkpoint"
original = getattr(train_dpo.DPOTrainer, name)
def patched(self, *args, **kwargs):
    if where == "step":
        marker.touch(); time.sleep(pause)
    result = original(self, *args, **kwargs)
    if where == "save":
        marker.touch(); time.sleep(pause)
    return result
setattr(train_dpo.DPOTrainer, name, patched)
run_script(train_dpo.main)
"""


def start_run(tmp_path, where: str, pause: float, *flags) -> tuple[subprocess.Popen, Path]:
    marker = tmp_path / "marker"
    command = [sys.executable, "-c", DRIVER, str(marker), str(pause), where, *tiny_run_args(tmp_path, *flags)]
    process = subprocess.Popen(command, cwd=REPO, env=subprocess_env(), stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while not marker.exists():
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            out, err = process.communicate()
            pytest.fail(f"the run never reached {where}: {out[-2000:]}{err[-2000:]}")
        time.sleep(0.05)
    return process, marker


def test_sigterm_saves_a_checkpoint_and_exits_cleanly(tmp_path):
    process, _ = start_run(tmp_path, "step", 0.5, "--max_steps", "50")
    process.send_signal(signal.SIGTERM)  # during step 1
    out, err = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGTERM, out[-2000:] + err[-2000:]
    assert "Traceback" not in err
    checkpoint = tmp_path / "out" / "checkpoint-1"
    assert json.loads((checkpoint / "trainer_state.json").read_text())["global_step"] == 1
    assert (checkpoint / "model.safetensors").exists() and (checkpoint / "optimizer.pt").exists()
    assert not (tmp_path / "out" / "model.safetensors").exists()  # no "final" model from an interrupted run
    assert "--resume_from_checkpoint latest" in out and str(checkpoint) in out


def test_sigint_handler_asks_the_trainer_to_save_and_stop():
    interrupt, control = GracefulInterrupt(), TrainerControl()
    args, state = TrainingArguments(output_dir="unused", report_to="none"), TrainerState()
    with interrupt:
        interrupt.on_step_end(args, state, control)
        assert not control.should_save and not control.should_training_stop  # no signal, no change
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.01)  # Python runs the handler between bytecodes
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # a second Ctrl-C acts at once
        interrupt.on_step_end(args, state, control)
    assert interrupt.signum == signal.SIGINT
    assert control.should_save and control.should_training_stop
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_killed_run_resumes_from_its_checkpoint_to_the_same_weights(tmp_path, capsys):
    flags = ["--max_steps", "6", "--save_steps", "2", "--learning_rate", "1e-2"]
    process, _ = start_run(tmp_path, "save", 300, *flags)  # waits after writing checkpoint-2
    process.kill()  # SIGKILL: no handler, no cleanup
    process.communicate(timeout=60)
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("checkpoint")) == ["checkpoint-2"]
    assert not (out / "model.safetensors").exists()

    capsys.readouterr()
    train_dpo.main(tiny_run_args(tmp_path, *flags, "--resume_from_checkpoint", "latest"))
    log = capsys.readouterr().out
    assert f"resuming from {out / 'checkpoint-2'}" in log
    assert "reference log-probs (train): loaded from cache" in log and "computed for" not in log  # no rescoring

    train_dpo.main(tiny_run_args(tmp_path, *flags, output="uninterrupted"))
    resumed, uninterrupted = load_file(out / "model.safetensors"), load_file(tmp_path / "uninterrupted" /
                                                                             "model.safetensors")
    at_checkpoint = load_file(out / "checkpoint-2" / "model.safetensors")
    assert resumed.keys() == uninterrupted.keys()
    for name in resumed:
        assert torch.equal(resumed[name], uninterrupted[name]), name
    assert not torch.equal(resumed["lm_head.weight"], at_checkpoint["lm_head.weight"])  # steps 3-6 did train


def test_best_model_at_end_is_loaded_whole(tmp_path):
    """load_best_model_at_end goes through the same conversion: the experts and router come back too."""
    trainer = train_dpo.main(tiny_run_args(tmp_path, "--max_steps", "3", "--save_steps", "1", "--eval_strategy",
                                           "steps", "--eval_steps", "1", "--load_best_model_at_end", "true",
                                           "--learning_rate", "1e-2", "--metric_for_best_model", "rewards/margins",
                                           "--greater_is_better", "false"))
    best = trainer.state.best_model_checkpoint
    assert best is not None and not best.endswith("checkpoint-3")  # not simply the last step's weights
    saved, final = load_file(os.path.join(best, "model.safetensors")), trainer.model.state_dict()
    experts = "model.layers.0.mlp.experts.gate_up_proj"
    assert experts in final and experts not in saved  # the checkpoint is in the Hub's per-expert layout
    again = type(trainer.model).from_pretrained(best)
    for name, value in again.state_dict().items():
        assert torch.equal(final[name], value), name


def test_latest_skips_an_incomplete_checkpoint(tmp_path, caplog):
    for step, complete in ((2, True), (4, True), (6, False)):
        folder = tmp_path / f"checkpoint-{step}"
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(b"")
        if complete:
            (folder / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    (tmp_path / "checkpoint-8").mkdir()
    (tmp_path / "checkpoint-8" / "trainer_state.json").write_text('{"global_step": ')  # killed mid-write
    with caplog.at_level(logging.WARNING, logger="utils.checkpointing"):
        assert resolve_resume("latest", str(tmp_path)) == str(tmp_path / "checkpoint-4")
    assert "checkpoint-8 is incomplete" in caplog.text and "checkpoint-6 is incomplete" in caplog.text
    assert resolve_resume("true", str(tmp_path)) == str(tmp_path / "checkpoint-4")
    assert resolve_resume(str(tmp_path / "checkpoint-2"), str(tmp_path)) == str(tmp_path / "checkpoint-2")
    with pytest.raises(ConfigError, match="not a complete checkpoint"):
        resolve_resume(str(tmp_path / "checkpoint-6"), str(tmp_path))
    with pytest.raises(ConfigError, match="no complete checkpoint"):
        resolve_resume("latest", str(tmp_path / "empty"))
    assert resolve_resume(None, str(tmp_path)) is None
    assert latest_checkpoint(str(tmp_path / "empty")) is None


# ---------------------------------------------------------------------------------------------- cache

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


# ------------------------------------------------------------------------------------ numerical guards

def test_non_finite_loss_stops_naming_step_and_rows(tmp_path, monkeypatch):
    batches = []
    original = train_dpo.DPOTrainer.compute_loss

    def compute_loss(self, model, inputs, *args, **kwargs):
        loss = original(self, model, inputs, *args, **kwargs)
        if model.training:
            batches.append(sorted(inputs["row_index"].tolist()))
            if len(batches) == 3:
                loss = loss * float("nan")
        return loss

    monkeypatch.setattr(train_dpo.DPOTrainer, "compute_loss", compute_loss)
    with pytest.raises(NonFiniteError) as error:
        train_dpo.main(tiny_run_args(tmp_path, "--max_steps", "5", "--save_steps", "1"))
    assert f"non-finite loss (nan) at step 3; the step's batch holds rows {batches[2]}" in str(error.value)
    assert len(batches) == 3 and len(batches[2]) == 8
    checkpoints = sorted(p.name for p in (tmp_path / "out").iterdir() if p.name.startswith("checkpoint"))
    assert checkpoints == ["checkpoint-1", "checkpoint-2"]  # the last good one is kept, nothing of step 3
    assert not (tmp_path / "out" / "model.safetensors").exists()


def test_non_finite_gradient_stops_before_the_optimizer_step(tmp_path, monkeypatch):
    batches = []
    original = train_dpo.DPOTrainer.training_step

    def training_step(self, model, inputs, *args, **kwargs):
        batches.append(sorted(inputs["row_index"].tolist()))
        loss = original(self, model, inputs, *args, **kwargs)
        if self.state.global_step == 1:  # step 2: a finite loss, but one NaN in a gradient
            model.lm_head.weight.grad[0, 0] = float("nan")
        return loss

    monkeypatch.setattr(train_dpo.DPOTrainer, "training_step", training_step)
    with pytest.raises(NonFiniteError) as error:
        train_dpo.main(tiny_run_args(tmp_path, "--max_steps", "4", "--save_steps", "1", "--max_grad_norm", "0"))
    assert f"non-finite gradient norm (nan) at step 2; the step's batch holds rows {batches[1]}" in str(error.value)
    checkpoints = sorted(p.name for p in (tmp_path / "out").iterdir() if p.name.startswith("checkpoint"))
    assert checkpoints == ["checkpoint-1"]


# -------------------------------------------------------------------------------------------- security

def test_no_pickle_and_no_remote_code_by_default():
    sources = [path for path in REPO.rglob("*.py") if ".venv" not in path.parts and "tests" not in path.parts]
    assert len(sources) > 5
    for path in sources:
        text = path.read_text()
        for pattern in ("torch.load(", "import pickle", "pickle.load", "dill.load", "trust_remote_code=True"):
            assert pattern not in text, f"{path.relative_to(REPO)} uses {pattern}"
    assert ModelArguments().trust_remote_code is False
