"""utils/cli.py: public recipes (alignment-handbook, TRL) parse with their meaning; what we do not implement is an
error naming it; a YAML file then flags (flags win), unknown keys and flags, values outside their choices, flag
combinations and config files that cannot work; --log_level reaches the libraries; run_script's one-line errors (exit
status 2, no traceback)."""

import dataclasses
import json
import logging
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import datasets
import pytest
import torch
import transformers
import yaml

import make_toy_pairs
import train_dpo
from helpers import subprocess_env, tiny_run_args
from train_dpo import DPOArguments
from utils import modeling
from utils.cli import parse_args, run_script, setup_logging
from utils.data import DataArguments, load_preference_data
from utils.errors import ConfigError, DataError, NonFiniteError
from utils.modeling import ModelArguments

REPO = Path(__file__).resolve().parents[1]
RECIPES = REPO / "configs" / "recipes"
GOOD = {"prompt": "i saw it.", "chosen": " good.", "rejected": " bad."}
# utils/data.py's keys, which the recipe parse tests leave to tests/test_data.py
DATA_KEYS = {"dataset_mixture", "dataset_mixer", "dataset_splits", "max_prompt_length"}
# huggingface/alignment-handbook recipes/zephyr-7b-beta/dpo/config_qlora.yaml (commit 95dc472) without its data keys;
# evaluation_strategy is the name in its earlier version (commit 4231254)
ZEPHYR_QLORA = """
model_name_or_path: alignment-handbook/zephyr-7b-sft-qlora
torch_dtype: bfloat16
attn_implementation: flash_attention_2
use_peft: true
load_in_4bit: true
lora_r: 128
lora_alpha: 128
lora_dropout: 0.05
lora_target_modules: [q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj]
preprocessing_num_workers: 12
bf16: true
beta: 0.01
do_eval: true
evaluation_strategy: steps
eval_steps: 100
gradient_accumulation_steps: 4
gradient_checkpointing: true
gradient_checkpointing_kwargs:
  use_reentrant: false
hub_model_id: zephyr-7b-dpo-qlora
learning_rate: 5.0e-6
log_level: info
logging_steps: 10
lr_scheduler_type: cosine
max_length: 1024
num_train_epochs: 1
optim: paged_adamw_32bit
output_dir: data/zephyr-7b-dpo-qlora
per_device_train_batch_size: 4
per_device_eval_batch_size: 8
push_to_hub: true
save_strategy: "steps"
save_steps: 100
save_total_limit: 1
seed: 42
warmup_ratio: 0.1
"""
# what each recipe name becomes here, by recipe: {recipe key: (our attribute, value)}
RENAMED = {"torch_dtype": "dtype", "warmup_ratio": "warmup_steps", "evaluation_strategy": "eval_strategy",
           "preprocessing_num_workers": "dataset_num_proc", "gradient_checkpointing": "activation_checkpointing",
           "gradient_checkpointing_kwargs": "activation_checkpointing_kwargs"}


def write_yaml(tmp_path, config: dict | str, name="config.yaml") -> str:
    path = tmp_path / name
    path.write_text(config if isinstance(config, str) else yaml.safe_dump(config))
    return str(path)


def without_data_keys(path: Path) -> dict:
    return {key: value for key, value in yaml.safe_load(path.read_text()).items() if key not in DATA_KEYS}


def parse_dpo(argv):
    return parse_args((ModelArguments, DataArguments, DPOArguments), argv)


def attribute(parsed, name):
    (value,) = [getattr(args, name) for args in parsed if hasattr(args, name)]
    return value


def assert_recipe_parses_to_its_values(parsed, recipe: dict, expected_renamed: dict):
    """Every key lands on the attribute of its name with its value, except the renamed ones, which land on ours
    with `expected_renamed`'s values."""
    for key, value in recipe.items():
        if key in expected_renamed:
            assert attribute(parsed, RENAMED[key]) == expected_renamed[key], key
        else:  # enums (eval_strategy, optim, ...) compare equal to their strings
            assert attribute(parsed, key) == value, key


@pytest.fixture
def cuda_with_bitsandbytes(monkeypatch):
    """Where --load_in_4bit can run, as far as the argument checks can tell."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    real_find_spec = modeling.importlib.util.find_spec
    monkeypatch.setattr(modeling.importlib.util, "find_spec",
                        lambda name: object() if name == "bitsandbytes" else real_find_spec(name))


# --------------------------------------------------------------------------------------------- recipes

def test_handbook_full_recipe_parses_every_non_data_key(tmp_path):
    recipe = without_data_keys(RECIPES / "zephyr_7b_beta_dpo_full.yaml")
    parsed = parse_dpo([write_yaml(tmp_path, recipe), "--use_cpu", "true"])  # its bf16: true needs a GPU or this
    assert_recipe_parses_to_its_values(parsed, recipe, {
        "torch_dtype": "float32",  # null: transformers 4's from_pretrained default, which the recipe was written for
        "warmup_ratio": 0.1,  # a warmup_steps below 1 is a fraction of the run
        "gradient_checkpointing": True, "gradient_checkpointing_kwargs": {"use_reentrant": False}})
    model_args, _, args = parsed
    assert model_args.model_name_or_path == "mixtral-tiny"
    assert (args.push_to_hub, args.hub_model_id, args.log_level) == (True, "zephyr-7b-dpo-full", "info")


def test_handbook_qlora_recipe_parses_every_non_data_key(tmp_path, cuda_with_bitsandbytes):
    recipe = yaml.safe_load(ZEPHYR_QLORA)
    parsed = parse_dpo([write_yaml(tmp_path, recipe), "--use_cpu", "true"])
    assert_recipe_parses_to_its_values(parsed, recipe, {
        "torch_dtype": "bfloat16", "warmup_ratio": 0.1, "evaluation_strategy": "steps",
        "preprocessing_num_workers": 12, "gradient_checkpointing": True,
        "gradient_checkpointing_kwargs": {"use_reentrant": False}})
    model_args = parsed[0]
    quantization = modeling.quantization_config(model_args)
    assert quantization.load_in_4bit and quantization.bnb_4bit_quant_type == "nf4"
    assert quantization.bnb_4bit_compute_dtype == torch.bfloat16 and not quantization.bnb_4bit_use_double_quant


def test_trl_dpo_config_yaml_parses_every_key(tmp_path):
    recipe = yaml.safe_load((RECIPES / "trl_dpo_lora.yaml").read_text())
    parsed = parse_dpo([str(RECIPES / "trl_dpo_lora.yaml")])
    assert_recipe_parses_to_its_values(parsed, recipe, {})
    assert set(recipe) & DATA_KEYS == set()


@pytest.mark.parametrize("recipe, peft", [("zephyr_7b_beta_dpo_full.yaml", False), ("trl_dpo_lora.yaml", True)])
def test_recipe_trains_here_with_warmup_as_a_ratio(recipe, peft, tmp_path):
    """The recipe as is, data keys included, the run's size aside: 20 steps, of which the handbook's warmup_ratio
    0.1 warms up 2; a held-out part of the mixture that fits the small data; no push to the Hub."""
    recipe_config = yaml.safe_load((RECIPES / recipe).read_text())
    if "dataset_mixture" in recipe_config:  # the UltraFeedback-layout folder its comment makes, small
        for split, num_pairs in (("train", 40), ("test", 16)):
            make_toy_pairs.main(["--conversational", "true", "--num_pairs", str(num_pairs), "--seed", str(len(split)),
                                 "--output_file", str(tmp_path / "toy_chat" / f"{split}.jsonl")])
        for part in recipe_config["dataset_mixture"]["datasets"]:
            part["id"] = str(tmp_path / "toy_chat")
        recipe_config["dataset_mixture"]["test_split_size"] = 8
    config = write_yaml(tmp_path, recipe_config)
    trainer = train_dpo.main([config, "--toy_num_train_pairs", "48",
                              "--toy_num_eval_pairs", "8", "--max_length", "64", "--max_steps", "20",
                              "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "1",
                              "--output_dir", str(tmp_path / "out"), "--ref_logps_cache_dir", str(tmp_path / "cache"),
                              "--push_to_hub", "false", "--use_cpu", "true", "--bf16", "false",
                              "--dataset_num_proc", "1",  # not the recipe's 12 processes on this CPU
                              "--report_to", "none", "--disable_tqdm", "true"])
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert losses and all(math.isfinite(loss) for loss in losses)
    assert (tmp_path / "out" / ("adapter_config.json" if peft else "config.json")).exists()
    warmup = 2 if "warmup_ratio" in without_data_keys(RECIPES / recipe) else 0
    factors = [trainer.lr_scheduler.lr_lambdas[0](step) for step in range(warmup + 1)]
    assert factors == [step / warmup for step in range(warmup)] + [1.0]  # linear up to the peak at step `warmup`
    unwrapped = trainer.accelerator.unwrap_model(trainer.model)
    assert unwrapped.is_gradient_checkpointing == bool(trainer.args.activation_checkpointing)


# ------------------------------------------------------------------------------------- TRL's defaults and CLI

# Where our defaults differ from TRL 1.12's on purpose (docs/recipes.md lists each with its reason); none changes the
# math of what is trained: the toy run's defaults, speed, memory and logging.
DEFAULTS_NOT_TRLS = {
    "model_name_or_path": "the toy preset (TRL requires a model)",
    "dataset_name": "the built-in toy task (TRL requires data)",
    "output_dir": "outputs/dpo (TRL: trainer_output)",
    "bf16": "on where CUDA supports it (TRL: on everywhere; bf16 on a CPU without bf16 units is ~100x slower)",
    "activation_checkpointing": "off: speed (TRL: on)",
    "gradient_checkpointing": "off: speed (TRL: on; transformers' alias of activation_checkpointing)",
    "padding_free": "None: decided by check_arguments, on where CUDA has a variable-length kernel: speed, the "
                    "same log-probs (TRL: off)",
    "precompute_ref_log_probs": "on: the reference is scored once and cached, the same log-probs (TRL: off)",
    "remove_unused_columns": "off: the collator reads the token-id columns (TRL's trainer keeps them too)",
    "logging_nan_inf_filter": "off: the non-finite guard stops the run instead (TRL: on)",
}


def test_defaults_are_trls_key_by_key_but_for_the_stated_exceptions():
    """Every option TRL's `trl dpo` reads (DPOConfig, ModelConfig, ScriptArguments, DatasetMixtureConfig) that we
    have defaults as the installed TRL's does, as resolved after __post_init__ (use_cpu on both, so that the bf16
    defaults compare alike on any machine; TRL's refuses a CPU otherwise); every other one of its options is read
    under another name or refused by name."""
    from trl import DatasetMixtureConfig, DPOConfig, ModelConfig, ScriptArguments

    from utils.cli import ALIASES, TRL_MIXTURE_KEYS, UNSUPPORTED

    ours = [ModelArguments(), DataArguments(), DPOArguments(use_cpu=True)]
    theirs = [ModelConfig(), ScriptArguments(), DatasetMixtureConfig(), DPOConfig(use_cpu=True)]
    differ, compared, unread = {}, 0, []
    for config in theirs:
        for field in dataclasses.fields(config):
            if not field.init:
                continue
            mine = [args for args in ours if hasattr(args, field.name)]
            if not mine:
                unread.append(field.name)
                continue
            compared += 1
            if getattr(mine[0], field.name) != getattr(config, field.name):
                differ[field.name] = (getattr(mine[0], field.name), getattr(config, field.name))
    assert compared > 100  # TrainingArguments' fields included
    assert set(differ) == set(DEFAULTS_NOT_TRLS), differ  # and the list of exceptions is not stale
    assert DataArguments().max_length == DPOConfig(use_cpu=True).max_length == 1024
    elsewhere = set(ALIASES) | set(UNSUPPORTED) | set(TRL_MIXTURE_KEYS)
    assert set(unread) <= elsewhere, sorted(set(unread) - elsewhere)


def test_trl_dpo_yaml_without_max_length_truncates_at_1024(tmp_path):
    """TRL's own LoRA YAML sets no max_length: the pairs are cut at TRL's 1024 tokens here too."""
    long = {"prompt": "the film was " * 300, "chosen": " good" * 1500, "rejected": " bad" * 1500}
    pairs = tmp_path / "long.jsonl"
    pairs.write_text(json.dumps(long) + "\n" + json.dumps(GOOD) + "\n")
    model_args, data_args, _ = parse_dpo([str(RECIPES / "trl_dpo_lora.yaml"), "--dataset_name", str(pairs)])
    assert data_args.max_length == 1024
    cut, short = load_preference_data(data_args, modeling.load_tokenizer(model_args))["train"]
    for side in ("chosen", "rejected"):
        assert len(cut["prompt_input_ids"]) + len(cut[f"{side}_input_ids"]) == 1024
        assert len(short["prompt_input_ids"]) + len(short[f"{side}_input_ids"]) < 1024  # cut only where too long
    with pytest.raises(ConfigError, match=r"max_length: null \(TRL: no truncation\) is not supported"):
        parse_dpo([write_yaml(tmp_path, {"max_length": None})])


@pytest.mark.parametrize("form", ["positional", "--config", "--config="])
def test_config_flag_reads_the_file_as_the_positional_one_does(form, tmp_path):
    config = write_yaml(tmp_path, {"beta": 0.3, "lora_r": 4, "max_length": 64})
    argv = {"positional": [config], "--config": ["--lora_r", "8", "--config", config],
            "--config=": [f"--config={config}", "--lora_r", "8"]}[form]
    model_args, data_args, args = parse_dpo([*argv, "--output_dir", str(tmp_path)])
    assert (args.beta, data_args.max_length) == (0.3, 64)
    assert model_args.lora_r == (4 if form == "positional" else 8)  # flags win, before or after --config
    with pytest.raises(ConfigError, match="two config files given"):
        parse_dpo([config, "--config", config])
    with pytest.raises(ConfigError, match="--config needs a YAML file"):
        parse_dpo(["--config"])


def test_env_block_sets_the_environment_before_the_arguments_are_built(tmp_path, monkeypatch):
    monkeypatch.delenv("DPO_TEST_ENV", raising=False)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: os.environ.get("CUDA_VISIBLE_DEVICES") != "")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: True)
    config = write_yaml(tmp_path, {"env": {"DPO_TEST_ENV": 7, "CUDA_VISIBLE_DEVICES": ""}, "beta": 0.2})
    (args,) = parse_args((DPOArguments,), ["--config", config, "--output_dir", str(tmp_path)])
    assert os.environ["DPO_TEST_ENV"] == "7" and args.beta == 0.2
    assert args.bf16 is False  # the bf16 default read CUDA_VISIBLE_DEVICES as the env block set it
    with pytest.raises(ConfigError, match=r"env: expected a mapping"):
        parse_args((DPOArguments,), [write_yaml(tmp_path, {"env": ["A=1"]})])


@pytest.mark.parametrize("flag, in_yaml", [("remove_unused_columns", None), ("use_peft", True), ("bf16", True),
                                           ("disable_dropout", None), ("reference_free", True)])
def test_no_flag_for_every_boolean_whatever_its_default(flag, in_yaml, tmp_path):
    """TRL's docs write --no_remove_unused_columns; HfArgumentParser makes --no_ flags only for true defaults."""
    argv = [write_yaml(tmp_path, {flag: in_yaml})] if in_yaml is not None else []
    parsed = parse_dpo([*argv, f"--no_{flag}", "--output_dir", str(tmp_path), "--use_cpu", "true"])
    assert attribute(parsed, flag) is False


def write_pairs(path: Path, prompts: list[str]) -> str:
    path.write_text("".join(json.dumps({"prompt": p, "chosen": " good.", "rejected": " bad."}) + "\n"
                            for p in prompts))
    return str(path)


def test_trl_datasets_mixture_selects_the_rows_trls_get_dataset_selects(tmp_path):
    """TRL's top-level `datasets:` list (its DatasetMixtureConfig), `fraction`s as TRL's shares of the mixture; the
    rows equal those of trl's own get_dataset on the same files."""
    from trl import DatasetMixtureConfig, get_dataset

    first = write_pairs(tmp_path / "first.jsonl", [f"first {i}" for i in range(10)])
    second = write_pairs(tmp_path / "second.jsonl", [f"second {i}" for i in range(4)])
    entries = [{"path": "json", "data_files": first, "fraction": 0.75},
               {"path": second, "fraction": 0.25, "columns": ["prompt", "chosen", "rejected"]}]
    config = write_yaml(tmp_path, {"datasets": entries, "test_split_size": 2, "max_length": 64})
    model_args, data_args, _ = parse_dpo(["--config", config, "--output_dir", str(tmp_path)])
    data = load_preference_data(data_args, modeling.load_tokenizer(model_args))
    ours = sorted(row["prompt"] for split in data.values() for row in split)
    theirs = get_dataset(DatasetMixtureConfig(datasets=[{**entries[0]}, {**entries[1], "path": "json",
                                                                          "data_files": second}]))
    assert len(data["test"]) == 2
    assert ours == sorted(row["prompt"] for split in theirs.values() for row in split)
    assert sum(prompt.startswith("second") for prompt in ours) == 3  # 0.25 of the largest mixture: 12 rows
    with pytest.raises(ConfigError, match=r"set fraction for every dataset .* or for none"):
        parse_dpo([write_yaml(tmp_path, {"datasets": [entries[0], {"path": second}]})])
    with pytest.raises(ConfigError, match=r"datasets\[0\]: .*unexpected keyword argument 'weight'"):
        parse_dpo([write_yaml(tmp_path, {"datasets": [{"path": second, "weight": 0.5}]})])
    with pytest.raises(ConfigError, match=r"streaming is not supported"):
        parse_dpo([write_yaml(tmp_path, {"datasets": [{"path": second}], "streaming": True})])


# ---------------------------------------------------------------------------------------------- aliases

@pytest.mark.parametrize("ratio, total, warmup", [(0.1, 40, 4), (0.05, 30, 2), (0.0, 40, 0)])
def test_warmup_ratio_gives_the_scheduler_that_many_warmup_steps(ratio, total, warmup, tmp_path):
    for argv in ([write_yaml(tmp_path, {"warmup_ratio": ratio})], ["--warmup_ratio", str(ratio)]):
        (args,) = parse_args((DPOArguments,), argv + ["--output_dir", str(tmp_path)])
        assert args.warmup_steps == ratio and args.get_warmup_steps(total) == warmup == math.ceil(ratio * total)


@pytest.mark.parametrize("ratio", [1.0, 1.5, -0.1])
def test_warmup_ratio_outside_0_1_is_refused(ratio, tmp_path):
    """A ratio of 1 would become warmup_steps 1: one step, not the whole run."""
    config = write_yaml(tmp_path, {"warmup_ratio": ratio})
    with pytest.raises(ConfigError, match=rf"{config}: warmup_ratio must be in \[0, 1\).*got {ratio}"):
        parse_args((DPOArguments,), [config])
    with pytest.raises(ConfigError, match=r"warmup_ratio must be in \[0, 1\)"):
        parse_args((DPOArguments,), ["--warmup_ratio", str(ratio)])


def test_torch_dtype_is_dtype(tmp_path):
    assert parse_args((ModelArguments,), [write_yaml(tmp_path, {"torch_dtype": "bfloat16"})])[0].dtype == "bfloat16"
    assert parse_args((ModelArguments,), ["--torch_dtype", "float16"])[0].dtype == "float16"
    same = write_yaml(tmp_path, {"torch_dtype": "bfloat16", "dtype": "bfloat16"})
    assert parse_args((ModelArguments,), [same])[0].dtype == "bfloat16"
    # flags win over the file, whichever name either uses
    assert parse_args((ModelArguments,), [same, "--torch_dtype", "float32"])[0].dtype == "float32"
    with pytest.raises(ConfigError, match=r"invalid choice 'float8'"):
        parse_args((ModelArguments,), [write_yaml(tmp_path, {"torch_dtype": "float8"})])


def test_both_names_with_different_values_are_an_error(tmp_path):
    config = write_yaml(tmp_path, {"torch_dtype": "bfloat16", "dtype": "float32"})
    with pytest.raises(ConfigError, match=r"torch_dtype: 'bfloat16' and dtype: 'float32' disagree"):
        parse_args((ModelArguments,), [config])
    with pytest.raises(ConfigError, match=r"warmup_ratio: 0.1 and warmup_steps: 5 disagree"):
        parse_args((DPOArguments,), [write_yaml(tmp_path, {"warmup_ratio": 0.1, "warmup_steps": 5})])
    with pytest.raises(ConfigError, match=r"--torch_dtype and --dtype both given"):
        parse_args((ModelArguments,), ["--torch_dtype", "float16", "--dtype", "float16"])


def test_an_alias_exists_only_where_its_option_does(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown argument\(s\) \['--preprocessing_num_workers'\]"):
        parse_args((ModelArguments,), ["--preprocessing_num_workers", "4"])
    (data_args,) = parse_args((DataArguments,), ["--preprocessing_num_workers", "4"])
    assert data_args.dataset_num_proc == 4


# ------------------------------------------------------------------------------------------ unsupported

@pytest.mark.parametrize("key, reason", [("load_in_8bit", "use load_in_4bit"), ("sync_ref_model", "TR-DPO"),
                                         ("lora_target_parameters", "use lora_target_modules"),
                                         ("overwrite_output_dir", "removed in transformers 5"),
                                         ("f_divergence_type", "only the reverse KL"), ("ld_alpha", "LD-DPO")])
def test_options_we_do_not_implement_are_refused_by_name(key, reason, tmp_path):
    config = write_yaml(tmp_path, {"beta": 0.1, key: True})
    with pytest.raises(ConfigError, match=rf"{config}: {key} is not supported here: .*{reason}"):
        parse_dpo([config])
    with pytest.raises(ConfigError, match=rf"^{key} is not supported here: .*{reason}"):
        parse_dpo([f"--{key}", "true"])


def test_unsupported_and_unknown_keys_are_named_together(tmp_path):
    config = write_yaml(tmp_path, {"load_in_8bit": True, "learning_rat": 0.1})
    with pytest.raises(ConfigError, match=r"load_in_8bit is not supported here: .*; unknown key\(s\) "
                                          r"\['learning_rat'\] \(did you mean learning_rate\?\)"):
        parse_dpo([config])


# ------------------------------------------------------------------------------------------------ logging

def test_log_level_reaches_the_libraries(tmp_path):
    before = transformers.utils.logging.get_verbosity(), datasets.utils.logging.get_verbosity()
    try:
        for flags, level in ((["--log_level", "info"], logging.INFO), ([], logging.WARNING),
                             (["--log_level", "error"], logging.ERROR)):
            (args,) = parse_args((DPOArguments,), ["--output_dir", str(tmp_path), *flags])
            setup_logging(args)
            assert transformers.utils.logging.get_verbosity() == level
            assert datasets.utils.logging.get_verbosity() == level
    finally:
        transformers.utils.logging.set_verbosity(before[0])
        datasets.utils.logging.set_verbosity(before[1])


# ------------------------------------------------------------------------------------------- flags and files

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
    with pytest.raises(ConfigError, match=r"unknown argument\(s\) \['--zzz_flag'\]; see --help"):
        parse_args((ModelArguments,), ["--zzz_flag", "1"])
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
