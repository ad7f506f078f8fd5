"""utils/checkpointing.py: SIGTERM and SIGINT save a checkpoint and exit; a run killed after a checkpoint resumes
to the same weights; the best model comes back whole; "latest" skips incomplete checkpoints."""

import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerControl, TrainerState, TrainingArguments

import train_dpo
from helpers import subprocess_env, tiny_run_args
from utils.checkpointing import GracefulInterrupt, latest_checkpoint, resolve_resume
from utils.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


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


@pytest.mark.parametrize("when", ["checkpoint", "final"])
def test_a_full_disk_at_save_time_is_one_line_naming_the_folder(when, tmp_path, capsys, monkeypatch):
    """The disk fills while the model is written (transformers' save_pretrained): one `error:` line naming the
    output folder and its free space, exit status 2, no traceback."""
    import transformers.modeling_utils

    from utils.cli import run_script

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", full_disk)
    save = ["--save_strategy", "steps", "--save_steps", "1"] if when == "checkpoint" else ["--save_strategy", "no"]
    with pytest.raises(SystemExit) as exit_info:
        run_script(lambda: train_dpo.main(tiny_run_args(tmp_path, "--max_steps", "1", *save)))
    err = capsys.readouterr().err  # progress bars aside: one error line, no traceback
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    what = "a checkpoint" if when == "checkpoint" else "the model"
    assert exit_info.value.code == 2 and len(errors) == 1 and "Traceback" not in err
    assert re.fullmatch(rf"error: no space left on the device of {tmp_path / 'out'} while saving {what} "
                        r"\(\d+\.\d\d GiB free\): .*", errors[0])
