"""Arguments: `python script.py [config.yaml | --config config.yaml] [--flag value ...]`, flags overriding the YAML
file, as TRL's `trl dpo --config` reads them (its `env:` block and `datasets:` mixture included)."""

import argparse
import dataclasses
import difflib
import logging
import os
import sys
import typing

import datasets
import transformers
import yaml
from trl import TrlParser
from trl.scripts.utils import DatasetMixtureConfig

from utils.errors import ConfigError, DataError, NonFiniteError


def warmup_ratio_as_steps(value) -> float:
    """transformers 5 dropped warmup_ratio: a warmup_steps below 1 is the fraction of the run, 1 or more a count."""
    ratio = float(value)
    if not 0 <= ratio < 1:
        raise ConfigError(f"warmup_ratio must be in [0, 1) (it becomes warmup_steps, where 1 or more is a count of "
                          f"steps), got {value}")
    return ratio


# Public recipes' names for our options (alignment-handbook's, TRL's before its 1.x renames, transformers 4's):
# {recipe name: (our name, its value in our terms)}. Either name works in a YAML file and as a flag.
ALIASES = {
    # null: from_pretrained's default when the recipes were written (transformers 4), float32, as TRL's ModelConfig
    "torch_dtype": ("dtype", lambda value: "float32" if value is None else value),
    "warmup_ratio": ("warmup_steps", warmup_ratio_as_steps),
    "evaluation_strategy": ("eval_strategy", None),
    "preprocessing_num_workers": ("dataset_num_proc", None),
}
# Options of TRL's DPOConfig/ModelConfig and of transformers 4 that recipes use and no script here implements:
# refused with the reason, never ignored.
UNSUPPORTED = {
    "load_in_8bit": "8-bit bitsandbytes loading is not wired in; use load_in_4bit (QLoRA) or load_in_fp8",
    "lora_target_parameters": "LoRA on raw parameters (fused MoE experts) is not supported; use lora_target_modules",
    "lora_task_type": "each script sets it (CAUSAL_LM; SEQ_CLS for train_reward.py)",
    "model_init_kwargs": "give the loading options as their own keys (dtype, attn_implementation, model_revision, "
                         "trust_remote_code, load_in_4bit)",
    **dict.fromkeys(("sync_ref_model", "ref_model_mixup_alpha", "ref_model_sync_steps"),
                    "the reference is the initial policy: TR-DPO's reference updates are not implemented"),
    "use_weighting": "WPO's per-pair weights are not implemented",
    **dict.fromkeys(("f_divergence_type", "f_alpha_divergence_coef"),
                    "only the reverse KL (standard DPO) is implemented; the losses are in utils/losses.py LOSSES"),
    "ld_alpha": "LD-DPO's length weighting is not implemented; sigmoid_norm, ipo and simpo average over tokens",
    "discopop_tau": "the discopop loss is not implemented (utils/losses.py LOSSES lists those that are)",
    "activation_offloading": "not implemented; activation_checkpointing is",
    "overwrite_output_dir": "removed in transformers 5; a run resumes only with resume_from_checkpoint",
    "dataset_streaming": "the pairs are tokenised and the reference scored once, before training: no streaming",
    "ignore_bias_buffers": "TRL's workaround that has DDP ignore boolean buffers is not implemented",
    "pad_token": "deprecated in TRL 1.x; the tokenizer's pad token (or eos) is used",
}


def bare_name(arg: str) -> str:
    """`--some-flag=1` -> `some_flag`."""
    return arg.split("=")[0].lstrip("-").replace("-", "_")


def add_negative_flags(parser: TrlParser) -> None:
    """--no_<flag> for every boolean option, whatever its default: HfArgumentParser makes one only for options that
    default to true, and TRL's docs write e.g. --no_remove_unused_columns, which defaults to false here."""
    options = {option for action in parser._actions for option in action.option_strings}
    for dataclass_type in parser.dataclass_types:
        types = typing.get_type_hints(dataclass_type)
        for field in dataclasses.fields(dataclass_type):
            if field.init and types[field.name] in (bool, bool | None) and f"--no_{field.name}" not in options:
                parser.add_argument(f"--no_{field.name}", action="store_false", dest=field.name,
                                    default=argparse.SUPPRESS, help=f"Set --{field.name} false.")


def add_alias_flags(parser: TrlParser) -> dict:
    """Add --<alias> flags writing to their options (where this parser has the option and not the alias itself);
    returns {alias: (option, convert)} for those."""
    actions = {action.dest: action for action in parser._actions}
    aliases = {alias: (dest, convert) for alias, (dest, convert) in ALIASES.items()
               if dest in actions and alias not in actions}
    for alias, (dest, convert) in aliases.items():
        target = actions[dest]
        parser.add_argument(f"--{alias}", dest=dest, default=argparse.SUPPRESS, type=convert or target.type,
                            choices=target.choices, nargs=target.nargs, const=target.const,
                            metavar=None if target.choices else alias.upper(),
                            help=f"Recipes' name for --{dest}.")
    return aliases


def resolve_aliases(config: dict, aliases: dict, config_path: str) -> dict:
    """`config` with recipe names replaced by ours and their values converted; both names with different values
    are an error."""
    config = dict(config)
    for alias, (dest, convert) in aliases.items():
        if alias not in config:
            continue
        value = config.pop(alias)
        try:
            value = convert(value) if convert else value
        except ConfigError as error:
            raise ConfigError(f"{config_path}: {error}") from None
        if dest in config and config[dest] != value:
            raise ConfigError(f"{config_path}: {alias}: {value!r} and {dest}: {config[dest]!r} disagree (one is the "
                              f"other's recipe name): give one")
        config[dest] = value
    return config


def unknown_names_error(names: list[str], known: set[str], kind: str, where: str = "") -> ConfigError:
    """The error for names no dataclass defines: the reason for each we knowingly do not support, the closest valid
    names for the others."""
    unsupported = [name for name in names if bare_name(name) in UNSUPPORTED]
    others = [name for name in names if name not in unsupported]
    parts = [f"{bare_name(name)} is not supported here: {UNSUPPORTED[bare_name(name)]}" for name in unsupported]
    if others:
        parts.append(f"unknown {kind}(s) {others}{did_you_mean(others, known)}; see --help for the valid ones")
    return ConfigError(where + "; ".join(parts))


def pop_config_path(argv: list[str]) -> str | None:
    """The YAML file's path, removed from `argv`: a leading positional file, or TRL's `--config FILE`."""
    paths = [argv.pop(0)] if argv and argv[0].endswith((".yaml", ".yml")) and not argv[0].startswith("-") else []
    for number, arg in reversed(list(enumerate(argv))):
        if arg == "--config":
            if number + 1 == len(argv):
                raise ConfigError("--config needs a YAML file")
            paths.append(argv.pop(number + 1))
            argv.pop(number)
        elif arg.startswith("--config="):
            paths.append(argv.pop(number).split("=", 1)[1])
    if len(paths) > 1:
        raise ConfigError(f"two config files given ({' and '.join(paths)}): give one")
    return paths[0] if paths else None


def set_config_env(env, config_path: str) -> None:
    """A config file's `env:` mapping into the environment, before any argument is built, as TrlParser does (a
    variable a library reads when it is imported, e.g. OMP_NUM_THREADS or HF_HOME, belongs in the shell)."""
    if not isinstance(env, dict):
        raise ConfigError(f"{config_path}: env: expected a mapping of variable names to values, got "
                          f"{type(env).__name__}")
    for name, value in env.items():
        os.environ[str(name)] = str(value)


# TRL's dataset mixture (trl's DatasetMixtureConfig: `datasets:`, `streaming:`, `test_split_size:` at the top level)
TRL_MIXTURE_KEYS = tuple(field.name for field in dataclasses.fields(DatasetMixtureConfig))


def trl_mixture_as_dataset_mixture(config: dict, config_path: str) -> dict:
    """`config` with TRL's top-level mixture keys moved into `dataset_mixture`, which utils/data.py reads (each
    `datasets` entry there as TRL's DatasetConfig: path, name, split, columns, fraction)."""
    given = [key for key in TRL_MIXTURE_KEYS if key in config]
    if not given:
        return config
    config = dict(config)
    mixture = {key: config.pop(key) for key in given}
    if "dataset_mixture" in config:
        raise ConfigError(f"{config_path}: {', '.join(given)} (TRL's mixture) and dataset_mixture both given: give "
                          f"one")
    if mixture.pop("streaming", False):
        raise ConfigError(f"{config_path}: streaming is not supported: the pairs are tokenised and the reference "
                          f"scored once, before training")
    config["dataset_mixture"] = mixture
    return config


def parse_args(dataclass_types, argv: list[str] | None = None):
    """Parse dataclasses from an optional YAML file (leading, or TRL's `--config FILE`) plus flags.

    The file's keys become TrlParser's defaults, so that flags win; its `env:` block is set first. We do not call
    TrlParser.parse_args_and_config, which passes unknown keys on as strings and a missing or invalid file as a
    traceback: keys that no dataclass defines are rejected instead of ignoring a typo. Recipes' names for our
    options (ALIASES) are read as ours; options we do not implement (UNSUPPORTED) are refused by name.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = TrlParser(dataclass_types)
    parser.add_argument("--config", default=argparse.SUPPRESS, metavar="FILE",  # for --help: read by pop_config_path
                        help="A YAML file of options (TRL's spelling of the leading positional file).")
    aliases = add_alias_flags(parser)
    add_negative_flags(parser)
    config_path = pop_config_path(argv)
    if config_path is not None:
        config = read_config(config_path)
        set_config_env(config.pop("env", {}), config_path)
        config = trl_mixture_as_dataset_mixture(config, config_path)
        config = resolve_aliases(config, aliases, config_path)
        known = {action.dest for action in parser._actions} - {"config"}
        unknown = sorted(set(config) - known)
        if unknown:
            raise unknown_names_error(unknown, known, "key", f"{config_path}: ")
        for action in parser._actions:  # argparse checks choices on flags only, not on defaults
            if action.choices is None or action.dest not in config:
                continue
            values = config[action.dest] if isinstance(config[action.dest], list) else [config[action.dest]]
            for value in values:
                if value not in action.choices:
                    raise ConfigError(f"{config_path}: {action.dest}: invalid choice {value!r} "
                                      f"(choose from {list(action.choices)})")
        parser.set_defaults_with_config(**config)
    given = {bare_name(arg) for arg in argv if arg.startswith("--")}
    for alias, (dest, _) in aliases.items():
        if {alias, dest} <= given:
            raise ConfigError(f"--{alias} and --{dest} both given (one is the other's recipe name): give one")
    try:
        *parsed, unknown_flags = parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=True)
    except ValueError as error:  # a dataclass's own check, e.g. TrainingArguments' "At most one of fp16 and bf16"
        raise ConfigError(f"invalid arguments: {' '.join(str(error).split())}") from error
    if unknown_flags:
        flags = [arg for arg in unknown_flags if arg.startswith("-")] or unknown_flags
        known = {option for action in parser._actions for option in action.option_strings}
        raise unknown_names_error(flags, known, "argument")
    return tuple(parsed)


def did_you_mean(unknown: list[str], known: set[str]) -> str:
    """' (did you mean ...?)' naming the closest valid names to typos, or '' when none is close."""
    close = [match for name in unknown for match in difflib.get_close_matches(name.split("=")[0], known, n=1)]
    return f" (did you mean {', '.join(close)}?)" if close else ""


def read_config(path: str) -> dict:
    try:
        with open(path) as f:
            config = yaml.safe_load(f)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: invalid YAML ({' '.join(str(error).split())})") from None
    if config is None:
        return {}
    if not isinstance(config, dict):
        raise ConfigError(f"{path}: expected a mapping of flag names to values, got {type(config).__name__}")
    return config


def run_script(main) -> None:
    """`main()` as a command: bad input (DataError, ConfigError) ends it with one line `error: ...` and exit
    status 2, a non-finite loss or gradient with `error: ...` and status 1, Ctrl-C outside training with 130;
    never with a traceback. Anything else is a bug and keeps its traceback."""
    try:
        main()
    except (DataError, ConfigError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    except NonFiniteError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:  # during training, utils/checkpointing.py turns it into a checkpoint instead
        print("interrupted", file=sys.stderr)
        sys.exit(130)


def setup_logging(training_args) -> None:
    # Our own progress at INFO on the main process; the libraries' at --log_level (default: warnings only).
    level = logging.INFO if training_args.should_log else logging.WARNING
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S",
                        handlers=[logging.StreamHandler(sys.stdout)], level=level, force=True)
    chosen = training_args.log_level if training_args.should_log else training_args.log_level_replica
    library_level = logging.WARNING if chosen == "passive" else training_args.get_process_log_level()
    transformers.utils.logging.set_verbosity(library_level)
    datasets.utils.logging.set_verbosity(library_level)


def report_metrics(trainer, train_result, evaluate: bool) -> dict | None:
    """Log the run's train metrics and, with `evaluate`, a final evaluation's, each also saved as
    `<split>_results.json` in the output folder; returns the evaluation's metrics."""
    trainer.log_metrics("train", train_result.metrics)
    trainer.save_metrics("train", train_result.metrics)
    if not evaluate:
        return None
    metrics = trainer.evaluate()
    trainer.log_metrics("eval", metrics)
    trainer.save_metrics("eval", metrics)
    return metrics
