"""Arguments: `python script.py [config.yaml] [--flag value ...]`, flags overriding the YAML file."""

import difflib
import logging
import sys

import datasets
import transformers
import yaml
from transformers import HfArgumentParser

from utils.errors import ConfigError, DataError, NonFiniteError


def parse_args(dataclass_types, argv: list[str] | None = None):
    """Parse dataclasses from an optional leading YAML file plus flags.

    HfArgumentParser reads a YAML file or flags, not both; we load the file as parser defaults so that
    flags win, and reject keys that no dataclass defines instead of ignoring a typo.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = HfArgumentParser(dataclass_types)
    if argv and argv[0].endswith((".yaml", ".yml")):
        config_path = argv.pop(0)
        config = read_config(config_path)
        known = {action.dest for action in parser._actions}
        unknown = sorted(set(config) - known)
        if unknown:
            raise ConfigError(f"{config_path}: unknown key(s) {unknown}{did_you_mean(unknown, known)}; "
                              "see --help for the valid ones")
        for action in parser._actions:  # argparse checks choices on flags only, not on defaults
            if action.choices is None or action.dest not in config:
                continue
            values = config[action.dest] if isinstance(config[action.dest], list) else [config[action.dest]]
            for value in values:
                if value not in action.choices:
                    raise ConfigError(f"{config_path}: {action.dest}: invalid choice {value!r} "
                                      f"(choose from {list(action.choices)})")
        parser.set_defaults(**config)
    try:
        *parsed, unknown_flags = parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=True)
    except ValueError as error:  # a dataclass's own check, e.g. TrainingArguments' "At most one of fp16 and bf16"
        raise ConfigError(f"invalid arguments: {' '.join(str(error).split())}") from error
    if unknown_flags:
        flags = [arg for arg in unknown_flags if arg.startswith("-")] or unknown_flags
        known = {option for action in parser._actions for option in action.option_strings}
        raise ConfigError(f"unknown argument(s) {flags}{did_you_mean(flags, known)}; see --help for the valid ones")
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
    # Our own progress at INFO on the main process; the libraries' INFO (config dumps) stays quiet.
    level = logging.INFO if training_args.should_log else logging.WARNING
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S",
                        handlers=[logging.StreamHandler(sys.stdout)], level=level, force=True)
    transformers.utils.logging.set_verbosity(max(training_args.get_process_log_level(), logging.WARNING))
    datasets.utils.logging.set_verbosity(logging.WARNING)


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
