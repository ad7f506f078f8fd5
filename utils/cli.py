"""Arguments: `python script.py [config.yaml] [--flag value ...]`, flags overriding the YAML file."""

import logging
import sys

import datasets
import transformers
import yaml
from transformers import HfArgumentParser


def parse_args(dataclass_types, argv: list[str] | None = None):
    """Parse dataclasses from an optional leading YAML file plus flags.

    HfArgumentParser reads a YAML file or flags, not both; we load the file as parser defaults so that
    flags win, and reject keys that no dataclass defines instead of ignoring a typo.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = HfArgumentParser(dataclass_types)
    if argv and argv[0].endswith((".yaml", ".yml")):
        config_path = argv.pop(0)
        with open(config_path) as f:
            config = yaml.safe_load(f) or {}
        known = {action.dest for action in parser._actions}
        unknown = sorted(set(config) - known)
        if unknown:
            raise SystemExit(f"{config_path}: unknown key(s) {unknown}; see --help for the valid ones")
        for action in parser._actions:  # argparse checks choices on flags only, not on defaults
            if action.choices is not None and action.dest in config and config[action.dest] not in action.choices:
                raise SystemExit(f"{config_path}: {action.dest}: invalid choice {config[action.dest]!r} "
                                 f"(choose from {list(action.choices)})")
        parser.set_defaults(**config)
    return parser.parse_args_into_dataclasses(args=argv)


def setup_logging(training_args) -> None:
    # Our own progress at INFO on the main process; the libraries' INFO (config dumps) stays quiet.
    level = logging.INFO if training_args.should_log else logging.WARNING
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S",
                        handlers=[logging.StreamHandler(sys.stdout)], level=level, force=True)
    transformers.utils.logging.set_verbosity(max(training_args.get_process_log_level(), logging.WARNING))
    datasets.utils.logging.set_verbosity(logging.WARNING)
