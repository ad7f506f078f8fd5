"""utils/cli.py: flag combinations and config files that cannot work, and run_script's one-line errors (exit status
2, no traceback)."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

import train_dpo
from helpers import subprocess_env, tiny_run_args
from utils.cli import run_script
from utils.errors import ConfigError, DataError, NonFiniteError

REPO = Path(__file__).resolve().parents[1]
GOOD = {"prompt": "i saw it.", "chosen": " good.", "rejected": " bad."}


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
