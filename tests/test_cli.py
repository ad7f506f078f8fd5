"""utils/cli.py: a YAML file then flags (flags win), unknown keys and flags, values outside their choices, flag
combinations and config files that cannot work, and run_script's one-line errors (exit status 2, no traceback)."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

import train_dpo
from helpers import subprocess_env, tiny_run_args
from utils.cli import parse_args, run_script
from utils.data import DataArguments
from utils.errors import ConfigError, DataError, NonFiniteError
from utils.modeling import ModelArguments

REPO = Path(__file__).resolve().parents[1]
GOOD = {"prompt": "i saw it.", "chosen": " good.", "rejected": " bad."}


def write_yaml(tmp_path, text):
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return str(path)


def test_yaml_then_flags_flags_win(tmp_path):
    config = write_yaml(tmp_path, "model_name_or_path: mixtral-tiny\nlora_r: 4\nuse_peft: true\n"
                                  "lora_target_modules: [q_proj, v_proj]\neval_fraction: 0.1\nmax_length: 64\n")
    model_args, data_args = parse_args((ModelArguments, DataArguments), [config, "--lora_r", "8",
                                                                         "--max_length", "128"])
    assert (model_args.lora_r, data_args.max_length) == (8, 128)  # flags win
    assert model_args.model_name_or_path == "mixtral-tiny" and model_args.use_peft is True  # from the file
    assert model_args.lora_target_modules == ["q_proj", "v_proj"]
    assert data_args.eval_fraction == 0.1
    assert model_args.lora_alpha == ModelArguments().lora_alpha  # neither: the default


def test_flags_only():
    (model_args,) = parse_args((ModelArguments,), ["--model_name_or_path", "mixtral-tiny", "--lora_r", "2"])
    assert (model_args.model_name_or_path, model_args.lora_r) == ("mixtral-tiny", 2)


def test_unknown_yaml_key_is_rejected(tmp_path):
    config = write_yaml(tmp_path, "model_name_or_path: mixtral-tiny\nlearning_rat: 0.1\n")
    with pytest.raises(SystemExit, match="learning_rat"):
        parse_args((ModelArguments, DataArguments), [config])


def test_yaml_value_outside_choices_is_rejected(tmp_path):
    config = write_yaml(tmp_path, "truncation_mode: keep_middle\n")
    with pytest.raises(SystemExit, match="truncation_mode.*keep_middle"):
        parse_args((ModelArguments, DataArguments), [config])
    config = write_yaml(tmp_path, "truncation_mode: keep_end\ndataset_format: implicit\n")
    (data_args,) = parse_args((DataArguments,), [config])
    assert (data_args.truncation_mode, data_args.dataset_format) == ("keep_end", "implicit")


def test_unknown_flag_is_rejected_with_the_closest_valid_one():
    with pytest.raises(ConfigError, match=r"unknown argument\(s\) \['--no_such_flag'\]; see --help"):
        parse_args((ModelArguments,), ["--no_such_flag", "1"])
    with pytest.raises(ConfigError, match=r"\['--max_lenght=64'\] \(did you mean --max_length\?\)"):
        parse_args((ModelArguments, DataArguments), ["--max_lenght=64"])


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
