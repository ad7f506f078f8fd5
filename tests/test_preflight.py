"""utils/preflight.py: a flag out of its range or a folder the run cannot write ends the run before any model loads,
in one `error:` line with exit status 2, with nothing written; a full disk at save time is one line too."""

import errno
import os

import pytest

import train_dpo
from helpers import tiny_run_args
from utils import preflight
from utils.cli import run_script
from utils.errors import ConfigError


def run_main(argv, capsys, monkeypatch) -> tuple[int, list[str]]:
    """train_dpo as a command (run_script): its exit status and stderr lines. Loading a model is a failure here."""
    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded before the mistake was found")

    monkeypatch.setattr(train_dpo, "load_model", no_model)
    with pytest.raises(SystemExit) as exit_info:
        run_script(lambda: train_dpo.main(argv))
    return exit_info.value.code, capsys.readouterr().err.strip().splitlines()


@pytest.mark.parametrize("flags, message", [
    (["--beta", "nan"], "--beta must be a finite number, got nan"),
    (["--per_device_train_batch_size", "0"], "--per_device_train_batch_size must be > 0, got 0"),
    (["--gradient_accumulation_steps", "0"], "--gradient_accumulation_steps must be > 0, got 0"),
    (["--eval_fraction", "1.5"], "--eval_fraction must be in [0, 1), got 1.5"),
    (["--max_steps", "0"], "--max_steps must be > 0, or -1 to train --num_train_epochs, got 0"),
    (["--learning_rate=-1e-6"], "--learning_rate must be >= 0, got -1e-06"),
    (["--learning_rate", "inf"], "--learning_rate must be a finite number, got inf"),
    (["--num_train_epochs", "0"], "--num_train_epochs must be > 0 (or set --max_steps), got 0.0"),
    (["--loss_weights", "1", "nan", "--loss_type", "sigmoid", "sft"], "--loss_weights must be a finite number, got [1.0, nan]"),
    (["--max_length", "0"], "--max_length must be > 0, got 0"),
], ids=["beta-nan", "batch-0", "accumulation-0", "eval-fraction", "max-steps-0", "negative-lr", "inf-lr", "epochs-0",
        "nan-weight", "max-length-0"])
def test_a_flag_out_of_range_is_one_line_before_the_model(flags, message, tmp_path, capsys, monkeypatch):
    status, lines = run_main(tiny_run_args(tmp_path, *flags), capsys, monkeypatch)
    assert (status, lines) == (2, [f"error: {message}"])
    assert not (tmp_path / "out").exists() and not (tmp_path / "cache").exists()


def test_the_defaults_pass(tmp_path):
    parsed = train_dpo.parse_args((train_dpo.ModelArguments, train_dpo.DataArguments, train_dpo.DPOArguments),
                                  tiny_run_args(tmp_path))
    preflight.check_ranges(*parsed)


def test_a_file_in_place_of_the_output_folder(tmp_path, capsys, monkeypatch):
    (tmp_path / "out").write_text("not a folder")
    status, lines = run_main(tiny_run_args(tmp_path), capsys, monkeypatch)
    assert (status, lines) == (2, [f"error: --output_dir {tmp_path / 'out'}: is a file, not a folder"])
    assert (tmp_path / "out").read_text() == "not a folder" and not (tmp_path / "cache").exists()


def test_an_output_folder_below_a_file(tmp_path, capsys, monkeypatch):
    (tmp_path / "file").write_text("")
    status, lines = run_main(tiny_run_args(tmp_path, "--output_dir", str(tmp_path / "file" / "out")), capsys,
                             monkeypatch)
    assert (status, lines) == (2, [f"error: --output_dir {tmp_path / 'file' / 'out'}: cannot be created, "
                                   f"{tmp_path / 'file'} is a file"])


@pytest.mark.parametrize("flag, folder", [("output_dir", "out"), ("ref_logps_cache_dir", "cache")])
def test_a_read_only_folder(flag, folder, tmp_path, capsys, monkeypatch):
    """Tests run as root, whom chmod does not stop: the file system's answer for the folder is simulated as a
    read-only mount's (os.access says no, as it does for root on a read-only file system)."""
    (tmp_path / folder).mkdir()
    real_access = os.access
    monkeypatch.setattr(preflight.os, "access",
                        lambda path, mode: False if str(path) == str(tmp_path / folder) else real_access(path, mode))
    status, lines = run_main(tiny_run_args(tmp_path), capsys, monkeypatch)
    assert (status, lines) == (2, [f"error: --{flag} {tmp_path / folder}: {tmp_path / folder} is not writable "
                                   "(read-only or no permission)"])
    assert list((tmp_path / folder).iterdir()) == []


def test_a_cache_folder_below_a_file(tmp_path, capsys, monkeypatch):
    (tmp_path / "file").write_text("")
    cache = tmp_path / "file" / "cache"
    status, lines = run_main(tiny_run_args(tmp_path, "--ref_logps_cache_dir", str(cache)), capsys, monkeypatch)
    assert (status, lines) == (2, [f"error: --ref_logps_cache_dir {cache}: cannot be created, {tmp_path / 'file'} "
                                   "is a file"])
    assert not (tmp_path / "out").exists()


def test_no_cache_folder_is_checked_without_a_reference(tmp_path):
    (tmp_path / "file").write_text("")
    parsed = train_dpo.parse_args((train_dpo.ModelArguments, train_dpo.DataArguments, train_dpo.DPOArguments),
                                  tiny_run_args(tmp_path, "--loss_type", "simpo", "--ref_logps_cache_dir",
                                                str(tmp_path / "file" / "cache")))
    train_dpo.check_arguments(parsed[0], parsed[2])


def test_disk_full_names_the_folder_and_its_free_space(tmp_path):
    with pytest.raises(ConfigError, match=rf"no space left on the device of {tmp_path / 'x'} while saving the model "
                                          r"\(\d+\.\d\d GiB free\)"):
        with preflight.disk_full_as_error(str(tmp_path / "x"), "the model"):
            raise OSError(errno.ENOSPC, "No space left on device")
    with pytest.raises(OSError, match="Permission"):  # any other error is not a full disk
        with preflight.disk_full_as_error(str(tmp_path), "the model"):
            raise OSError(errno.EACCES, "Permission denied")
