"""Preference data: load (Hub, local file or folder, built-in toy task, or a mixture of these), normalise every
format to prompt / chosen / rejected, tokenise once, and collate into padded chosen+rejected batches.

The prompt/completion boundary is decided here, once, at tokenisation: every other module reads
`prompt_input_ids`, `chosen_input_ids` and `rejected_input_ids` (completions end in eos), and `source` and
`row_index`, the dataset split a pair comes from (`name [split]`, a mixture's part) and its row there.

The row policy for real data is decided here too:
- a broken schema (missing field, wrong type, invalid JSON, unknown role, a conversation not ending in an
  assistant turn) raises DataError before any training, naming the source, row and field;
- an empty or blank answer is a preference (nothing beats the other answer): it trains as an eos-only
  completion, counted in one warning;
- a pair that cannot train (chosen equals rejected, no room for a completion token, or chosen and rejected equal
  as the tokens kept) is dropped, counted in one warning per reason; DataError only when nothing is left.
Warnings name the first few rows (and their lines, for a JSON Lines file).
"""

import functools
import json
import logging
import os
from dataclasses import dataclass, field, fields

import datasets
import numpy as np
import pyarrow.compute as pc
import torch
from accelerate import PartialState
from datasets import Dataset, DatasetDict
from trl.scripts.utils import DatasetConfig

from utils import toy_task
from utils.errors import ConfigError, DataError

logger = logging.getLogger(__name__)

FORMATS = ("auto", "explicit", "implicit", "conversational")
LOCAL_FILE_TYPES = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}
ROLES = ("system", "user", "assistant", "tool")
IMPLICIT_ASSISTANT_TURN = "\n\nAssistant:"  # HH-RLHF's marker of an assistant turn
MIXTURE_KEYS = ("datasets", "seed", "test_split_size")  # alignment-handbook's dataset_mixture
MIXTURE_DATASET_KEYS = ("id", "config", "split", "columns", "weight")
MIXER_SEED = 42  # alignment-handbook shuffles a dataset_mixer's splits with this fixed seed
ROWS_NAMED = 5  # rows a warning names
PAIR_COLUMNS = ["prompt", "chosen", "rejected", "prompt_input_ids", "chosen_input_ids", "rejected_input_ids",
                "source", "row_index"]  # what a prepared split holds

# Why a pair is dropped (the `drop` column: 0 keeps it), and how to keep such pairs.
KEPT, SAME_TEXTS, NO_ROOM, SAME_KEPT_TOKENS, SAME_TOKENS = range(5)
DROP_REASONS = {
    SAME_TEXTS: ("whose chosen equals rejected", ""),
    NO_ROOM: ("whose prompt leaves no room for a completion within max_length {max_length}",
              "raise --max_length, set --max_prompt_length or use --truncation_mode keep_end to keep them"),
    SAME_KEPT_TOKENS: ("whose chosen and rejected differ as texts but not as the tokens kept by max_length "
                       "{max_length}", "raise --max_length to keep them"),
    SAME_TOKENS: ("whose chosen and rejected differ as texts but tokenise the same (such as an answer with and "
                  "without the eos text, which every completion ends in)",
                  "no flag keeps them: they carry no preference, so make the answers differ or leave them out"),
}


@dataclass
class DataArguments:
    dataset_name: str = field(
        default=toy_task.TOY_DATASET_NAME,
        metadata={"help": f"Hub dataset name, local .json/.jsonl/.parquet/.csv file or folder, or "
                          f"'{toy_task.TOY_DATASET_NAME}' (built in). Ignored with a dataset mixture."})
    dataset_config: str | None = field(default=None, metadata={"help": "Hub dataset configuration name."})
    dataset_train_split: str = field(default="train", metadata={"help": "Split to train on."})
    dataset_test_split: str = field(default="test", metadata={"help": "Split to evaluate on, if present."})
    eval_fraction: float = field(
        default=0.0, metadata={"help": "Hold out this fraction of train for evaluation when no test split exists "
                                       "(a mixture's test_split_size comes first)."})
    dataset_mixture: dict | str | None = field(
        default=None,
        metadata={"help": "alignment-handbook's dataset mixture, a YAML mapping (or JSON on the command line): "
                          "datasets: a list of {id, config, split (train), columns, weight (the fraction of the "
                          "split's rows kept, shuffled with seed)}, seed (0), test_split_size (held out of the "
                          "mixture). Each id is anything --dataset_name takes."})
    dataset_mixer: dict | str | None = field(
        default=None,
        metadata={"help": "alignment-handbook's older mixture: {id: fraction of its train rows kept (the first "
                          "ones)}, reading --dataset_splits of each id (with --dataset_configs)."})
    dataset_splits: list[str] = field(
        default_factory=lambda: ["train", "test"],
        metadata={"help": "With --dataset_mixer: the splits to read; names containing 'train' train, names "
                          "containing 'test' evaluate."})
    dataset_configs: list[str] | None = field(
        default=None, metadata={"help": "With --dataset_mixer: one configuration name per dataset."})
    dataset_format: str = field(
        default="auto", metadata={"help": "explicit (prompt/chosen/rejected strings), implicit (chosen/rejected "
                                          "share the prompt as prefix), conversational (message lists), or auto.",
                                  "choices": list(FORMATS)})
    prompt_column: str = field(default="prompt", metadata={"help": "Column holding the prompt."})
    chosen_column: str = field(default="chosen", metadata={"help": "Column holding the preferred completion."})
    rejected_column: str = field(default="rejected", metadata={"help": "Column holding the other completion."})
    max_length: int = field(default=1024, metadata={"help": "Max tokens of prompt + completion (TRL's default)."})
    max_prompt_length: int | None = field(
        default=None,
        metadata={"help": "Cut prompts from the left to this many tokens (bos kept and counted) before fitting "
                          "completions into max_length, as TRL and alignment-handbook recipes mean it. Off by "
                          "default."})
    truncation_mode: str = field(
        default="keep_start",
        metadata={"help": "Pairs longer than max_length: keep_start keeps the whole prompt and cuts completions' "
                          "ends (a pair whose prompt alone fills max_length is dropped); keep_end first cuts the "
                          "prompt from the left, down to max_length // 2 tokens, then cuts completions' ends. "
                          "--max_prompt_length applies first; bos is never cut.",
                  "choices": ["keep_start", "keep_end"]})
    dataset_num_proc: int | None = field(default=None, metadata={"help": "Processes for tokenisation."})
    toy_num_train_pairs: int = field(default=2000, metadata={"help": "Toy task: training pairs to generate."})
    toy_num_eval_pairs: int = field(default=200, metadata={"help": "Toy task: evaluation pairs to generate."})
    toy_pair_labeling: str = field(
        default="deterministic", metadata={"help": "Toy task: chosen = higher true reward (deterministic) or "
                                                   "sampled Bradley-Terry style (bradley_terry).",
                                           "choices": ["deterministic", "bradley_terry"]})
    toy_bt_temperature: float = field(default=0.1, metadata={"help": "Toy task: Bradley-Terry temperature."})
    toy_seed: int = field(default=0, metadata={"help": "Toy task: generator seed."})

    def __post_init__(self):
        self.dataset_mixture = _mapping(self.dataset_mixture, "dataset_mixture")
        self.dataset_mixer = _mapping(self.dataset_mixer, "dataset_mixer")
        if self.dataset_mixture is not None and self.dataset_mixer is not None:
            raise ConfigError("set one of dataset_mixture and dataset_mixer, not both")
        if self.max_length is None:
            raise ConfigError("max_length: null (TRL: no truncation) is not supported: give a length (TRL's default "
                              "is 1024)")
        if self.max_prompt_length is not None and self.max_prompt_length < 1:
            raise ConfigError(f"--max_prompt_length must be >= 1, got {self.max_prompt_length}")
        mixture_parts(self)  # a mixture that cannot be read fails here, before any model is loaded


def _mapping(value, name: str) -> dict | None:
    """A YAML mapping arrives as a dict (parser defaults are not converted); a command-line value as JSON text."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as error:
            raise ConfigError(f"{name}: not a JSON mapping ({error})") from None
    if value is not None and not isinstance(value, dict):
        raise ConfigError(f"{name}: expected a mapping, got {type(value).__name__}")
    return value


# -------------------------------------------------------------------------------------------- mixtures

@dataclass(frozen=True)
class MixturePart:
    """One dataset split of a mixture: `weight` is the fraction of its rows kept, shuffled with `shuffle_seed`
    first, or the first rows where that is None (dataset_mixer)."""
    id: str
    config: str | None
    split: str
    role: str  # "train" or "test"
    weight: float | None = None
    columns: tuple[str, ...] | None = None
    shuffle_seed: int | None = None
    share: float | None = None  # TRL's `fraction`: this part's share of the mixture (apply_shares)


def mixture_parts(args: DataArguments) -> tuple[list[MixturePart], int, float | int | None] | None:
    """(parts, seed of the mixed splits' shuffle, test_split_size) as alignment-handbook reads its mixture keys,
    or None without a mixture. A malformed mixture is a ConfigError naming the dataset id. Entries with a `path`
    are TRL's DatasetConfig (a YAML's top-level `datasets:`, utils/cli.py): `trl_mixture_part`."""
    if args.dataset_mixture is not None:
        mixture = args.dataset_mixture
        _check_keys(mixture, MIXTURE_KEYS, "dataset_mixture")
        entries = mixture.get("datasets")
        if not isinstance(entries, list) or not entries:
            raise ConfigError("dataset_mixture: 'datasets' must be a non-empty list of {id, config, split, columns, "
                              "weight}, or TRL's {path, name, split, columns, fraction}")
        seed = mixture.get("seed", 0)
        if not isinstance(seed, int):
            raise ConfigError(f"dataset_mixture: seed must be an integer, got {seed!r}")
        parts = []
        trl_entries = [isinstance(entry, dict) and "path" in entry for entry in entries]
        if any(trl_entries):
            if not all(trl_entries):
                raise ConfigError("dataset_mixture: give every dataset in one form: TRL's {path, ...} or "
                                  "alignment-handbook's {id, ...}")
            parts = [trl_mixture_part(entry, number) for number, entry in enumerate(entries)]
            shares = [part.share for part in parts]
            if None in shares and any(share is not None for share in shares):
                raise ConfigError("datasets: set fraction for every dataset in the mixture or for none (as TRL)")
            if None not in shares and sum(shares) <= 0:
                raise ConfigError(f"datasets: the fractions {shares} must not all be 0")
            entries = []  # every part is read
        for number, entry in enumerate(entries):
            if not isinstance(entry, dict) or not isinstance(entry.get("id"), str):
                raise ConfigError(f"dataset_mixture: datasets[{number}] must be a mapping with a string 'id'")
            where = f"dataset_mixture: {entry['id']}"
            _check_keys(entry, MIXTURE_DATASET_KEYS, where)
            columns = entry.get("columns")
            if columns is not None and not (isinstance(columns, list) and all(isinstance(c, str) for c in columns)):
                raise ConfigError(f"{where}: columns must be a list of column names, got {columns!r}")
            parts.append(MixturePart(entry["id"], entry.get("config"), entry.get("split", "train"), "train",
                                     _weight(entry.get("weight"), where), tuple(columns) if columns else None, seed))
        test_split_size = mixture.get("test_split_size")
        valid = (isinstance(test_split_size, float) and 0 < test_split_size < 1
                 or isinstance(test_split_size, int) and not isinstance(test_split_size, bool) and test_split_size > 0)
        if test_split_size is not None and not valid:
            raise ConfigError(f"dataset_mixture: test_split_size must be a fraction in (0, 1) or a row count, "
                              f"got {test_split_size!r}")
        return parts, seed, test_split_size
    if args.dataset_mixer is not None:
        configs = args.dataset_configs or [None] * len(args.dataset_mixer)
        if len(configs) != len(args.dataset_mixer):
            raise ConfigError(f"dataset_configs: {len(configs)} names for {len(args.dataset_mixer)} datasets in "
                              f"dataset_mixer")
        parts = []
        for (name, fraction), config in zip(args.dataset_mixer.items(), configs):
            for split in args.dataset_splits:
                if "train" not in split and "test" not in split:
                    raise ConfigError(f"dataset_splits: {split!r} names neither a train nor a test split")
                role = "train" if "train" in split else "test"  # test splits are not subsampled
                weight = _weight(fraction, f"dataset_mixer: {name}") if role == "train" else None
                parts.append(MixturePart(name, config, split, role, weight))
        return parts, MIXER_SEED, None
    return None


def trl_mixture_part(entry: dict, number: int) -> MixturePart:
    """One entry of TRL's `datasets:` list, read by TRL's own DatasetConfig, as a part. `fraction` is TRL's share of
    the mixture; a generic builder with one local file (`path: json, data_files: pairs.jsonl`) reads that file."""
    try:
        dataset = DatasetConfig(**entry)
    except TypeError as error:  # an unknown or missing key
        raise ConfigError(f"datasets[{number}]: {error}; TRL's DatasetConfig has "
                          f"{[f.name for f in fields(DatasetConfig)]}") from None
    where = f"datasets: {dataset.path}"
    source = dataset.path
    if dataset.data_files is not None:
        if dataset.path not in LOCAL_FILE_TYPES.values() or not isinstance(dataset.data_files, str):
            raise ConfigError(f"{where}: data_files is read only as one local file with path "
                              f"{sorted(set(LOCAL_FILE_TYPES.values()))}; give a file or folder as path instead")
        source = dataset.data_files
    if dataset.data_dir is not None:
        raise ConfigError(f"{where}: data_dir is not supported; give the folder as path")
    if dataset.columns is not None and not (isinstance(dataset.columns, list)
                                            and all(isinstance(c, str) for c in dataset.columns)):
        raise ConfigError(f"{where}: columns must be a list of column names, got {dataset.columns!r}")
    share = dataset.fraction
    if share is not None and (isinstance(share, bool) or not isinstance(share, int | float) or share < 0):
        raise ConfigError(f"{where}: fraction must be a share >= 0, got {share!r}")
    return MixturePart(source, dataset.name, dataset.split, "train",
                       columns=tuple(dataset.columns) if dataset.columns else None, share=share)


def apply_shares(parts: list[tuple[str, "Source", Dataset]], shares: list[float]) -> list:
    """TRL's `fraction`s (trl.scripts.utils.get_dataset): shares normalised to sum to one, the mixture as large as
    it can be without repeating a row, and each part's first round(share x size) rows."""
    weights = [share / sum(shares) for share in shares]
    total = min(len(rows) / weight for (_, _, rows), weight in zip(parts, weights) if weight > 0)
    return [(role, source, rows.select(range(round(weight * total))))
            for (role, source, rows), weight in zip(parts, weights)]


def _check_keys(mapping: dict, known: tuple[str, ...], where: str) -> None:
    unknown = sorted(set(mapping) - set(known))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; expected {list(known)}")


def _weight(weight, where: str) -> float | None:
    if weight is None:
        return None
    if isinstance(weight, bool) or not isinstance(weight, int | float) or not 0 < weight <= 1:
        raise ConfigError(f"{where}: weight must be a fraction of the rows in (0, 1], got {weight!r}")
    return float(weight)


# ----------------------------------------------------------------------------------------------- load

@dataclass(frozen=True)
class Source:
    """Where rows come from, as messages name them: `name [split] row R`, and `(line L)` for a JSON Lines file."""
    name: str
    split: str
    jsonl_path: str | None = None

    def __str__(self) -> str:
        return f"{self.name} [{self.split}]"

    def rows(self, indices) -> str:
        """'row 3 (line 5)', or 'rows 3 (line 5), 8 (line 10), ...' past ROWS_NAMED of them."""
        lines = jsonl_line_numbers(self.jsonl_path) if self.jsonl_path else None
        named = [f"{i} (line {lines[i]})" if lines else str(i) for i in map(int, indices[:ROWS_NAMED])]
        return ("row " if len(indices) == 1 else "rows ") + ", ".join(named) + (", ..." * (len(indices) > ROWS_NAMED))


@dataclass(frozen=True)
class RowName:
    """'source [split] row R (line L)', formatted only when a message is (a JSON Lines file is read for L)."""
    source: Source
    index: int

    def __str__(self) -> str:
        return f"{self.source} {self.source.rows([self.index])}"


def jsonl_line_numbers(path: str) -> list[int]:
    """The line number of each row of a JSON Lines file (`datasets` skips blank lines)."""
    stat = os.stat(path)
    return _jsonl_line_numbers(path, stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=4)
def _jsonl_line_numbers(path: str, *version) -> list[int]:
    # Split at '\n' only, as JSON Lines is: a string may hold a raw U+2028, which str.splitlines splits at.
    with open(path, encoding="utf-8", errors="replace") as f:
        return [number for number, line in enumerate(f.read().split("\n"), start=1) if line.strip()]


def is_json_lines(path: str) -> bool:
    if not path.endswith((".json", ".jsonl")):
        return False
    with open(path, encoding="utf-8", errors="replace") as f:
        return not f.read(4096).lstrip().startswith("[")


def load_source(name: str, config: str | None, args: DataArguments) -> tuple[DatasetDict, str | None]:
    """All splits of one dataset as they come, before any normalisation, and the path of the JSON Lines file they
    come from, if they do (to name rows by line)."""
    if name == toy_task.TOY_DATASET_NAME:
        kwargs = dict(labeling=args.toy_pair_labeling, bt_temperature=args.toy_bt_temperature)
        splits = {"train": Dataset.from_list(toy_task.generator_pairs(args.toy_num_train_pairs, args.toy_seed, **kwargs)),
                  "test": Dataset.from_list(toy_task.generator_pairs(args.toy_num_eval_pairs, args.toy_seed + 1, **kwargs))}
        return DatasetDict(splits), None
    if os.path.isfile(name):
        extension = os.path.splitext(name)[1].lower()
        if extension not in LOCAL_FILE_TYPES:
            raise DataError(f"{name}: unsupported file type {extension!r}; use one of {sorted(LOCAL_FILE_TYPES)}")
        check_data_file(name)
        raw = load_local(name, [name], LOCAL_FILE_TYPES[extension], data_files=name)
        return raw, name if is_json_lines(name) else None
    if os.path.isdir(name):
        files = sorted(os.path.join(root, file) for root, _, names in os.walk(name) for file in names)
        data_files = [path for path in files if path.lower().endswith(tuple(LOCAL_FILE_TYPES))]
        if not data_files:
            found = f"it holds {[os.path.relpath(path, name) for path in files[:ROWS_NAMED]]}" if files else "it is empty"
            raise DataError(f"{name}: no data file ({', '.join(sorted(LOCAL_FILE_TYPES))}) in this folder; {found}")
        for path in data_files:
            check_data_file(path)
        return load_local(name, files, name, config), None
    if name.endswith(tuple(LOCAL_FILE_TYPES)) or name.startswith(("/", ".", "~")) or name.count("/") > 1:
        raise DataError(f"{name}: no such file or folder")  # a path, not a Hub name: don't ask the Hub
    return datasets.load_dataset(name, config), None


def load_local(name: str, files: list[str], *load_args, **load_kwargs) -> DatasetDict:
    """datasets.load_dataset on a local file or folder; a file it cannot read is a DataError naming the file
    (and, for JSON, the first line that does not parse) instead of a DatasetGenerationError."""
    try:
        return datasets.load_dataset(*load_args, **load_kwargs)
    except (datasets.exceptions.DatasetGenerationError, ValueError) as error:  # ValueError: e.g. the JSON fallback
        for path in files:
            if path.endswith((".json", ".jsonl")):
                check_json_file(path)
        if "corresponds to no data" in str(error):  # e.g. a CSV file with its header only
            raise DataError(f"{name}: no rows") from None
        cause = error.__cause__ or error
        raise DataError(f"{name}: cannot be read: {type(cause).__name__}: {cause}") from error


def check_data_file(path: str) -> None:
    """Refuse, naming the file (and line), what `datasets` reports as a bare StopIteration or UnicodeDecodeError,
    or not at all until a row is read: an empty file, and a text file (JSON, CSV) that is not UTF-8."""
    if os.path.getsize(path) == 0:
        raise DataError(f"{path}: empty file, no rows")
    if not path.lower().endswith((".json", ".jsonl", ".csv")):
        return
    blank = True
    with open(path, "rb") as f:
        for number, line in enumerate(f, start=1):
            try:
                text = line.decode("utf-8")
            except UnicodeDecodeError as error:
                raise DataError(f"{path} line {number}: not UTF-8 text (byte {line[error.start]:#04x} at column "
                                f"{error.start + 1}); save the file as UTF-8") from None
            blank = blank and not text.strip()
    if blank:
        raise DataError(f"{path}: empty file, no rows")


def check_json_file(path: str) -> None:
    """Raise a DataError at the first line of `path` that is not a JSON object (JSON Lines), unless the whole
    file is one JSON document (a .json array of rows). A byte order mark is not part of line 1's JSON."""
    with open(path, encoding="utf-8-sig", errors="replace") as f:
        text = f.read()
    if text.lstrip().startswith("["):
        try:
            json.loads(text)
        except json.JSONDecodeError as error:
            raise DataError(f"{path} line {error.lineno}: invalid JSON ({error.msg}, column {error.colno})") from None
        return
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise DataError(f"{path} line {number}: invalid JSON ({error.msg}, column {error.colno})") from None
        if not isinstance(row, dict):
            raise DataError(f"{path} line {number}: expected a JSON object (one row), got {type(row).__name__}")


def with_row_index(raw: Dataset) -> Dataset:
    """`raw` with its rows' indices as the `row_index` column, added before any subsampling or split, so that
    every message (and the NaN guard) names the row in the source."""
    if "row_index" in raw.column_names:
        raw = raw.remove_columns("row_index")
    return raw.add_column("row_index", np.arange(len(raw)))


def raw_parts(args: DataArguments, mixture) -> list[tuple[str, Source, Dataset]]:
    """(role, source, rows with `row_index`) for every dataset split the run reads, role 'train' or 'test': the
    train split and the test split where the source has one, or every part of `mixture` (`mixture_parts`; weights
    applied)."""
    if mixture is None:
        raw, jsonl_path = load_source(args.dataset_name, args.dataset_config, args)
        if args.dataset_train_split not in raw:
            raise DataError(f"{args.dataset_name}: no split {args.dataset_train_split!r}; it has {sorted(raw)}")
        roles = {"train": args.dataset_train_split, "test": args.dataset_test_split}
        return [(role, Source(args.dataset_name, split, jsonl_path), with_row_index(raw[split]))
                for role, split in roles.items() if split in raw]
    parts = []
    for part in mixture[0]:
        raw, jsonl_path = load_source(part.id, part.config, args)
        source = Source(part.id, part.split, jsonl_path)
        if part.split not in raw:
            raise DataError(f"{part.id}: no split {part.split!r}; it has {sorted(raw)}")
        rows = with_row_index(raw[part.split])
        if part.columns is not None:
            missing = sorted(set(part.columns) - set(rows.column_names))
            if missing:
                raise DataError(f"{source}: no column(s) {missing} to select; it has {rows.column_names}")
            rows = rows.select_columns([*part.columns, "row_index"])
        if part.weight is not None:
            if part.shuffle_seed is not None:
                rows = rows.shuffle(seed=part.shuffle_seed)
            rows = rows.select(range(int(part.weight * len(rows))))
        parts.append((part.role, source, rows))
    shares = [part.share for part in mixture[0]]
    return apply_shares(parts, shares) if None not in shares else parts


# ------------------------------------------------------------------------------------------ normalise

def detect_format(row: dict, args: DataArguments) -> str:
    if args.dataset_format != "auto":
        return args.dataset_format
    if isinstance(row.get(args.chosen_column), list):
        return "conversational"
    return "explicit" if args.prompt_column in row else "implicit"


def _field(row: dict, column: str, where: RowName, kind: type, may_be_blank: bool = False):
    if column not in row:
        raise DataError(f"{where}: missing field {column!r} (columns: {sorted(set(row) - {'row_index'})})")
    value = row[column]
    if not isinstance(value, kind):
        got = "null or missing" if value is None else type(value).__name__  # JSON rows lacking a key read as null
        raise DataError(f"{where}: field {column!r} must be a {kind.__name__}, got {got}")
    blank = len(value) == 0 if kind is list else not value.strip()
    if blank and not may_be_blank:
        raise DataError(f"{where}: field {column!r} is empty")
    return value


def _check_messages(messages: list, where: RowName, column: str) -> None:
    for turn, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("content"), str):
            raise DataError(f"{where}: field {column!r} message {turn} must be a dict with string 'content'")
        if message.get("role") not in ROLES:
            raise DataError(f"{where}: field {column!r} message {turn} has role {message.get('role')!r}; "
                            f"expected one of {ROLES}")


def split_implicit_prompt(chosen: str, rejected: str) -> tuple[str, str, str]:
    """HH-RLHF style: the prompt is the shared prefix up to the last assistant turn both texts share, as HH
    itself marks it; without such a turn, the shared prefix cut back to a word boundary strictly before the
    shorter text ends (one answer may be a prefix of the other), so that completions start at a word (with
    its leading space)."""
    common = os.path.commonprefix([chosen, rejected])
    turn = common.rfind(IMPLICIT_ASSISTANT_TURN)
    if turn >= 0:
        cut = turn + len(IMPLICIT_ASSISTANT_TURN)
    else:
        cut = len(common)
        while cut > 0 and not common[cut - 1].isspace():
            cut -= 1
        while cut > 0 and common[cut - 1].isspace():
            cut -= 1
    return chosen[:cut], chosen[cut:], rejected[cut:]


def normalize_row(row: dict, args: DataArguments, tokenizer, source: Source) -> dict:
    """One raw row -> {'prompt', 'chosen', 'rejected'} texts (conversations rendered by the chat template), an
    empty or blank answer as '' (it becomes an eos-only completion), `empty_answer`, whether one is, and `source`,
    the split it comes from (its row being `row_index`: in a mixture, row numbers alone repeat across parts)."""
    where = RowName(source, row["row_index"])
    fmt = detect_format(row, args)
    if fmt == "explicit":
        prompt = _field(row, args.prompt_column, where, str)
        chosen = _field(row, args.chosen_column, where, str, may_be_blank=True)
        rejected = _field(row, args.rejected_column, where, str, may_be_blank=True)
    elif fmt == "implicit":
        prompt, chosen, rejected = split_implicit_prompt(_field(row, args.chosen_column, where, str),
                                                         _field(row, args.rejected_column, where, str))
        if not prompt:
            raise DataError(f"{where}: fields {args.chosen_column!r} and {args.rejected_column!r} share no prompt")
    else:
        prompt, chosen, rejected = _render_conversation(row, args, tokenizer, where)
    chosen, rejected = (text if text.strip() else "" for text in (chosen, rejected))
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected, "empty_answer": "" in (chosen, rejected),
            "source": str(source)}


def _render_conversation(row: dict, args: DataArguments, tokenizer, where: RowName) -> tuple[str, str, str]:
    if tokenizer.chat_template is None:
        raise DataError(f"{where}: conversational data needs a tokenizer with a chat template")
    chosen = _field(row, args.chosen_column, where, list)
    rejected = _field(row, args.rejected_column, where, list)
    _check_messages(chosen, where, args.chosen_column)
    _check_messages(rejected, where, args.rejected_column)
    if isinstance(row.get(args.prompt_column), list):  # TRL style: prompt turns apart from the answer turns
        prompt = row[args.prompt_column]
        _check_messages(prompt, where, args.prompt_column)
    else:  # UltraFeedback style: each side holds the whole conversation; the prompt is all but the last turn
        prompt = chosen[:-1]
        if rejected[:-1] != prompt:
            raise DataError(f"{where}: fields {args.chosen_column!r} and {args.rejected_column!r} differ before "
                            f"their final turn, so they do not share a prompt")
        chosen, rejected = chosen[-1:], rejected[-1:]
    for column, messages in ((args.chosen_column, chosen), (args.rejected_column, rejected)):
        if messages[-1]["role"] != "assistant":
            raise DataError(f"{where}: field {column!r} must end with an assistant turn, "
                            f"not {messages[-1]['role']!r}")
    prompt_text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    completions = []
    for column, messages in ((args.chosen_column, chosen), (args.rejected_column, rejected)):
        if not any(message["content"].strip() for message in messages):  # an empty answer: eos only
            completions.append("")
            continue
        full_text = tokenizer.apply_chat_template(prompt + messages, tokenize=False)
        if not full_text.startswith(prompt_text):
            raise DataError(f"{where}: field {column!r}: the chat template does not render the prompt as a prefix "
                            f"of the conversation, so the completion cannot be separated")
        completion = full_text[len(prompt_text):]
        # Templates often follow a turn's eos with a newline: end the completion at that eos, as generation
        # stops there, so that tokenisation does not append a second eos after the newline.
        if tokenizer.eos_token and completion.rstrip().endswith(tokenizer.eos_token):
            completion = completion.rstrip()
        completions.append(completion)
    return prompt_text, completions[0], completions[1]


# ------------------------------------------------------------------------------------------- tokenise

def special_prefix_ids(tokenizer) -> list[int]:
    """The special tokens the tokenizer puts before a text (Llama's bos; none for GPT-2 style), read off a probe
    tokenised with and without them: tokenizers do not otherwise say what their post-processor adds."""
    with_specials = tokenizer("a", add_special_tokens=True)["input_ids"]
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    return with_specials[:with_specials.index(plain[0])]


def split_special_prefix(prompt_ids: list[int], added_prefix: list[int], bos_token_id: int | None):
    """(prefix, rest of the prompt): the sequence's start that truncation never cuts, once. `added_prefix` is what
    the tokenizer's post-processor puts before a text ([] for conversations, whose chat template writes its own):
    a prompt text that already starts with it (an explicit '<s>[INST] ...') does not get it twice; without it, a
    bos the text starts with (Llama-3's or Llama-2's chat template writes one) is the prefix."""
    if added_prefix:
        has_it = prompt_ids[:len(added_prefix)] == added_prefix
        return added_prefix, prompt_ids[len(added_prefix):] if has_it else prompt_ids
    if bos_token_id is not None and prompt_ids[:1] == [bos_token_id]:
        return prompt_ids[:1], prompt_ids[1:]
    return [], prompt_ids


def tokenize_completion(tokenizer, prompt: str, completion: str, prompt_ids: list[int]) -> list[int]:
    """Completion ids as the model sees them after the prompt's (`prompt_ids`, no special tokens), ending in eos.

    Tokenised jointly with the prompt (as the text is read) and split at the prompt's length; where a
    token would straddle the boundary, the completion is tokenised on its own instead.
    """
    full_ids = tokenizer(prompt + completion, add_special_tokens=False)["input_ids"]
    if full_ids[:len(prompt_ids)] == prompt_ids:
        ids = full_ids[len(prompt_ids):]
    else:
        ids = tokenizer(completion, add_special_tokens=False)["input_ids"]
    if not ids or ids[-1] != tokenizer.eos_token_id:
        ids = ids + [tokenizer.eos_token_id]
    return ids


def truncate_pair(prefix_ids, prompt_ids, chosen_ids, rejected_ids, max_length: int, mode: str,
                  max_prompt_length: int | None = None):
    """Fit prefix + prompt + each completion into max_length; returns (prefix + prompt, chosen, rejected), or None
    where no completion token fits. The prefix (special tokens such as bos) is never cut.

    1. max_prompt_length: the prompt is cut from the left to that many tokens, the prefix counted.
    2. If prefix + prompt + the longer completion still exceed max_length: keep_end cuts the prompt from the left
       again, to what leaves the completion whole but to no fewer than max_length // 2 tokens; keep_start keeps it.
    3. Completions are cut at the end to the room left (a cut completion has no eos: it was not finished).
    A cut that leaves the prompt starting with the prefix again (Llama-2 and Mistral templates write bos before
    every [INST] turn) drops that copy: the kept prefix already starts the sequence.
    """
    if max_prompt_length is not None:
        prompt_ids = cut_left(prompt_ids, max_prompt_length - len(prefix_ids), prefix_ids)
    longest = max(len(chosen_ids), len(rejected_ids))
    if len(prefix_ids) + len(prompt_ids) + longest > max_length:
        if mode == "keep_end":
            prompt_ids = cut_left(prompt_ids, max(max_length - longest, max_length // 2) - len(prefix_ids),
                                  prefix_ids)
        room = max_length - len(prefix_ids) - len(prompt_ids)
        if room <= 0:
            return None
        chosen_ids, rejected_ids = chosen_ids[:room], rejected_ids[:room]
    return prefix_ids + prompt_ids, chosen_ids, rejected_ids


def last(ids: list[int], count: int) -> list[int]:
    """The last `count` ids (none for count <= 0)."""
    return ids[max(len(ids) - max(count, 0), 0):]


def cut_left(prompt_ids: list[int], count: int, prefix_ids: list[int]) -> list[int]:
    """The last `count` prompt ids, less a copy of `prefix_ids` they start with where the cut removed something."""
    kept = last(prompt_ids, count)
    if prefix_ids and len(kept) < len(prompt_ids) and kept[:len(prefix_ids)] == prefix_ids:
        return kept[len(prefix_ids):]
    return kept


def tokenize_row(row: dict, tokenizer, added_prefix: list[int], max_length: int, truncation_mode: str,
                 max_prompt_length: int | None) -> dict:
    """Texts -> prefix + prompt ids, completion ids ending in the one eos of the sequence, and `drop`, why the
    pair cannot train (KEPT: it can). The texts are tokenised without special tokens: a post-processor that
    appends eos (Llama's add_eos_token) would put one between prompt and completion."""
    prompt_ids = tokenizer(row["prompt"], add_special_tokens=False)["input_ids"]
    chosen_ids = tokenize_completion(tokenizer, row["prompt"], row["chosen"], prompt_ids)
    rejected_ids = tokenize_completion(tokenizer, row["prompt"], row["rejected"], prompt_ids)
    prefix_ids, prompt_ids = split_special_prefix(prompt_ids, added_prefix, tokenizer.bos_token_id)
    fitted = truncate_pair(prefix_ids, prompt_ids, chosen_ids, rejected_ids, max_length, truncation_mode,
                           max_prompt_length)
    if row["chosen"] == row["rejected"]:  # no gradient, and counted as wrong in rewards/accuracies
        drop = SAME_TEXTS
    elif fitted is None:
        drop = NO_ROOM
    elif fitted[1] == fitted[2]:  # texts that differ only past max_length, or not as tokens at all
        drop = SAME_TOKENS if chosen_ids == rejected_ids else SAME_KEPT_TOKENS
    else:
        drop = KEPT
    untruncated_lengths = [len(prefix_ids) + len(prompt_ids), len(chosen_ids), len(rejected_ids)]
    prompt_ids, chosen_ids, rejected_ids = fitted or (prefix_ids + prompt_ids, [], [])
    return {"prompt_input_ids": prompt_ids, "chosen_input_ids": chosen_ids, "rejected_input_ids": rejected_ids,
            "drop": drop, "untruncated_lengths": untruncated_lengths}


@dataclass
class RowTally:
    """What the row policy did to one source split: `dropped` {reason: source rows}, `empty` the kept rows with an
    empty answer, and `untruncated_lengths` [kept pairs, 3] (prompt with its special tokens, chosen, rejected)
    beside `lengths`, the same as training sees them."""
    source: Source
    total: int
    dropped: dict[int, np.ndarray]
    empty: np.ndarray
    untruncated_lengths: np.ndarray
    lengths: np.ndarray


def apply_row_policy(tokenized: Dataset, source: Source, max_length: int, num_proc: int | None,
                     tallies: list[RowTally] | None = None) -> Dataset:
    """The pairs that train: each reason to drop a pair, and empty answers (which train), counted in one warning
    naming the first rows; a DataError when nothing is left. Reads three integer columns, not the rows. With
    `tallies`, appends this split's RowTally to it (for --dry_run)."""
    table = tokenized.select_columns(["drop", "empty_answer", "row_index"]).with_format("arrow")[:]
    drop, empty, row_index = (table.column(name).to_numpy() for name in ("drop", "empty_answer", "row_index"))
    total = len(drop)
    if tallies is not None:
        ids = ("prompt_input_ids", "chosen_input_ids", "rejected_input_ids")
        lengths = tokenized.select_columns(["untruncated_lengths", *ids]).with_format("arrow")[:]
        untruncated = pc.list_flatten(lengths.column("untruncated_lengths")).to_numpy().reshape(-1, 3)
        kept_lengths = np.stack([pc.list_value_length(lengths.column(name)).to_numpy() for name in ids], axis=1)
        kept = drop == KEPT
        tallies.append(RowTally(source, total, {reason: row_index[drop == reason] for reason in DROP_REASONS},
                                row_index[empty & kept], untruncated[kept], kept_lengths[kept]))
    counts = {}
    for reason, (why, how_to_keep) in DROP_REASONS.items():
        rows = row_index[drop == reason]
        if len(rows):
            counts[reason] = len(rows)
            why = why.format(max_length=max_length)
            logger.warning("%s: dropped %d of %d pairs %s (%s)%s", source, len(rows), total, why, source.rows(rows),
                           f"; {how_to_keep}" if how_to_keep else "")
    if counts and sum(counts.values()) == total:
        breakdown = ", ".join(f"{count} {DROP_REASONS[reason][0].format(max_length=max_length)}"
                              for reason, count in counts.items())
        raise DataError(f"{source}: no pair left to train on: all {total} pairs were dropped: {breakdown}")
    rows = row_index[empty & (drop == KEPT)]
    if len(rows):
        logger.warning("%s: %d of %d pairs have an empty answer (%s): it trains as an eos-only completion", source,
                       len(rows), total, source.rows(rows))
    if counts:
        tokenized = tokenized.filter(lambda drops: np.asarray(drops) == KEPT, input_columns="drop", batched=True,
                                     num_proc=num_proc)
    return tokenized.select_columns(PAIR_COLUMNS)


def prepare_split(raw: Dataset, args: DataArguments, tokenizer, split: str, source: Source | None = None,
                  tallies: list[RowTally] | None = None) -> Dataset:
    """Raw rows -> validated texts -> token ids, with the row policy applied. Cached by `datasets` for file and
    Hub sources. Rows without a `row_index` column are numbered here."""
    source = source or Source(args.dataset_name, split)
    if len(raw) == 0:
        raise DataError(f"{source}: no rows")
    if "row_index" not in raw.column_names:
        raw = with_row_index(raw)
    fmt = detect_format(raw[0], args)
    texts = raw.map(normalize_row, remove_columns=[c for c in raw.column_names if c != "row_index"],
                    num_proc=args.dataset_num_proc, fn_kwargs=dict(args=args, tokenizer=tokenizer, source=source),
                    desc=f"Normalising {source} ({fmt})")
    # A chat template writes the conversation's special tokens itself.
    added_prefix = [] if fmt == "conversational" else special_prefix_ids(tokenizer)
    tokenized = texts.map(tokenize_row, num_proc=args.dataset_num_proc,
                          fn_kwargs=dict(tokenizer=tokenizer, added_prefix=added_prefix, max_length=args.max_length,
                                         truncation_mode=args.truncation_mode,
                                         max_prompt_length=args.max_prompt_length),
                          desc=f"Tokenising {source}")
    return apply_row_policy(tokenized, source, args.max_length, args.dataset_num_proc, tallies)


def local_main_process_first(function):
    """`function` run by each machine's main process first, then by the others: the first tokenises into the
    `datasets` cache, the others read it, instead of every process tokenising and racing on the same cache files.
    accelerate's main_process_first, except that an error on the main process still releases the others (they then
    meet the same error) rather than leaving them waiting at the barrier."""
    @functools.wraps(function)
    def first_on_the_local_main_process(*args, **kwargs):
        state = PartialState()
        if not state.is_local_main_process:
            state.wait_for_everyone()
        try:
            return function(*args, **kwargs)
        finally:
            if state.is_local_main_process:
                state.wait_for_everyone()
    return first_on_the_local_main_process


@local_main_process_first
def load_preference_data(args: DataArguments, tokenizer, tallies: list[RowTally] | None = None) -> DatasetDict:
    """'train' (and 'test', where the source has one or one is held out) as token ids with `row_index`; with
    `tallies`, each source split's RowTally appended to it.

    Each source split is prepared on its own, so that messages name the source, split and row; a mixture's parts
    are then concatenated and shuffled, and a test split held out (test_split_size, or eval_fraction) last."""
    mixture = mixture_parts(args)
    parts = {"train": [], "test": []}
    for role, source, raw in raw_parts(args, mixture):
        parts[role].append(prepare_split(raw, args, tokenizer, source.split, source, tallies))
    data = DatasetDict()
    for role, prepared in parts.items():
        if prepared:
            data[role] = prepared[0] if mixture is None else datasets.concatenate_datasets(prepared).shuffle(
                seed=mixture[1])
    holdout = (mixture[2] if mixture else None) or args.eval_fraction
    if "test" not in data and holdout:
        seed = mixture[1] if mixture else args.toy_seed
        data = DatasetDict(data["train"].train_test_split(test_size=holdout, seed=seed))
    return data


# -------------------------------------------------------------------------------------------- collate

def pad(sequences: list[list[int]], value: int, width: int) -> torch.Tensor:
    return torch.tensor([s + [value] * (width - len(s)) for s in sequences], dtype=torch.long)


def collate_completions(prompts: list[list[int]], completions: list[list[int]], pad_token_id: int,
                        padding_free: bool = False, pad_to_multiple_of: int | None = None) -> dict:
    """prompt + completion sequences -> model inputs, and where the completion tokens are.

    `completion_positions` holds the flat (row-major) indices into `input_ids` of the tokens whose log-probs
    count (a sequence's completion, less its first token when the prompt is empty: nothing predicts it), and
    `completion_sequence` which sequence each is in. They are made here, on the host, so that the training
    step gathers the tokens by index, with no device sync (a boolean mask would need one).

    Padded: [N, width] and attention_mask, width the longest sequence (rounded up to `pad_to_multiple_of`, so
    that batch shapes repeat). Padding-free: all sequences in one row, `position_ids` restarting at each, and
    their boundaries as transformers' variable-length attention arguments (`cu_seq_lens_q/k`, `max_length_q/k`),
    so no compute goes to padding and attention keeps sequences apart.
    """
    sequences = [p + c for p, c in zip(prompts, completions)]
    lengths = torch.tensor([len(s) for s in sequences])
    if padding_free:
        starts = torch.cumsum(lengths, 0) - lengths
        cu_seq_lens = torch.cat([torch.zeros(1, dtype=torch.int32), torch.cumsum(lengths, 0, dtype=torch.int32)])
        longest = int(lengths.max())
        token_sequence = torch.repeat_interleave(torch.arange(len(sequences)), lengths)
        batch = {"input_ids": torch.tensor([[t for s in sequences for t in s]]),
                 "position_ids": (torch.arange(int(lengths.sum())) - starts[token_sequence]).unsqueeze(0),
                 "cu_seq_lens_q": cu_seq_lens, "cu_seq_lens_k": cu_seq_lens,
                 "max_length_q": longest, "max_length_k": longest}
    else:
        width = int(lengths.max())
        if pad_to_multiple_of:
            width = -(-width // pad_to_multiple_of) * pad_to_multiple_of
        starts = torch.arange(len(sequences)) * width
        batch = {"input_ids": pad(sequences, pad_token_id, width),
                 "attention_mask": pad([[1] * len(s) for s in sequences], 0, width)}
    first = starts + torch.tensor([max(len(p), 1) for p in prompts])  # the first counted token of each sequence
    counted = starts + lengths - first
    batch["completion_sequence"] = torch.repeat_interleave(torch.arange(len(sequences)), counted)
    offsets = torch.arange(int(counted.sum())) - (torch.cumsum(counted, 0) - counted)[batch["completion_sequence"]]
    batch["completion_positions"] = first[batch["completion_sequence"]] + offsets
    return batch


@dataclass
class PreferenceCollator:
    """Rows -> one batch of 2B sequences (`collate_completions`): B prompt+chosen, then B prompt+rejected.
    Reference log-prob columns, `row_index` and `source` (the rows' indices in their source split, and its name, a
    list of strings) pass through."""
    pad_token_id: int
    padding_free: bool = False
    pad_to_multiple_of: int | None = None

    def __call__(self, rows: list[dict]) -> dict:
        # Per-pair tensors first: the Trainer takes the batch size from the first tensor it finds.
        batch = {key: torch.tensor([row[key] for row in rows], dtype=dtype) for key, dtype in
                 (("row_index", torch.long), ("ref_chosen_logps", torch.float32), ("ref_rejected_logps", torch.float32))
                 if key in rows[0]}
        if "source" in rows[0]:
            batch["source"] = [row["source"] for row in rows]
        prompts = [row["prompt_input_ids"] for row in rows] * 2
        completions = [row["chosen_input_ids"] for row in rows] + [row["rejected_input_ids"] for row in rows]
        batch.update(collate_completions(prompts, completions, self.pad_token_id, self.padding_free,
                                         self.pad_to_multiple_of))
        return batch
