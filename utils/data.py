"""Preference data: load (Hub, local file or folder, built-in toy task), normalise every format to
prompt / chosen / rejected, tokenise once, and collate into padded chosen+rejected batches.

The prompt/completion boundary is decided here, once, at tokenisation: every other module reads
`prompt_input_ids`, `chosen_input_ids` and `rejected_input_ids` (completions end in eos).
"""

import json
import logging
import operator
import os
from dataclasses import dataclass, field

import datasets
import torch
from datasets import Dataset, DatasetDict

from utils import toy_task
from utils.errors import DataError

logger = logging.getLogger(__name__)

FORMATS = ("auto", "explicit", "implicit", "conversational")
LOCAL_FILE_TYPES = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}
ROLES = ("system", "user", "assistant", "tool")
IMPLICIT_ASSISTANT_TURN = "\n\nAssistant:"  # HH-RLHF's marker of an assistant turn


@dataclass
class DataArguments:
    dataset_name: str = field(
        default=toy_task.TOY_DATASET_NAME,
        metadata={"help": f"Hub dataset name, local .json/.jsonl/.parquet/.csv file or folder, or "
                          f"'{toy_task.TOY_DATASET_NAME}' (built in)."})
    dataset_config: str | None = field(default=None, metadata={"help": "Hub dataset configuration name."})
    dataset_train_split: str = field(default="train", metadata={"help": "Split to train on."})
    dataset_test_split: str = field(default="test", metadata={"help": "Split to evaluate on, if present."})
    eval_fraction: float = field(
        default=0.0, metadata={"help": "Hold out this fraction of train for evaluation when no test split exists."})
    dataset_format: str = field(
        default="auto", metadata={"help": "explicit (prompt/chosen/rejected strings), implicit (chosen/rejected "
                                          "share the prompt as prefix), conversational (message lists), or auto.",
                                  "choices": list(FORMATS)})
    prompt_column: str = field(default="prompt", metadata={"help": "Column holding the prompt."})
    chosen_column: str = field(default="chosen", metadata={"help": "Column holding the preferred completion."})
    rejected_column: str = field(default="rejected", metadata={"help": "Column holding the other completion."})
    max_length: int = field(default=256, metadata={"help": "Max tokens of prompt + completion."})
    truncation_mode: str = field(
        default="keep_start",
        metadata={"help": "Pairs longer than max_length: keep_start keeps the whole prompt and cuts completions' "
                          "ends (a prompt that alone fills max_length is an error); keep_end first cuts the prompt "
                          "from the left, down to max_length // 2 tokens, then cuts completions' ends.",
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


# ----------------------------------------------------------------------------------------------- load

def load_raw_dataset(args: DataArguments) -> DatasetDict:
    """Train (and test, where one exists or is split off) as they come, before any normalisation."""
    name = args.dataset_name
    if name == toy_task.TOY_DATASET_NAME:
        kwargs = dict(labeling=args.toy_pair_labeling, bt_temperature=args.toy_bt_temperature)
        splits = {"train": Dataset.from_list(toy_task.generator_pairs(args.toy_num_train_pairs, args.toy_seed, **kwargs)),
                  "test": Dataset.from_list(toy_task.generator_pairs(args.toy_num_eval_pairs, args.toy_seed + 1, **kwargs))}
        return DatasetDict(splits)
    if os.path.isfile(name):
        extension = os.path.splitext(name)[1].lower()
        if extension not in LOCAL_FILE_TYPES:
            raise DataError(f"{name}: unsupported file type {extension!r}; use one of {sorted(LOCAL_FILE_TYPES)}")
        raw = load_local(name, [name], LOCAL_FILE_TYPES[extension], data_files=name)
    elif os.path.isdir(name):
        files = sorted(os.path.join(root, file) for root, _, names in os.walk(name) for file in names)
        raw = load_local(name, files, name, args.dataset_config)
    elif name.endswith(tuple(LOCAL_FILE_TYPES)) or name.startswith(("/", ".", "~")) or name.count("/") > 1:
        raise DataError(f"{name}: no such file or folder")  # a path, not a Hub name: don't ask the Hub
    else:
        raw = datasets.load_dataset(name, args.dataset_config)
    if args.dataset_train_split not in raw:
        raise DataError(f"{name}: no split {args.dataset_train_split!r}; it has {sorted(raw)}")
    splits = {"train": raw[args.dataset_train_split]}
    if args.dataset_test_split in raw:
        splits["test"] = raw[args.dataset_test_split]
    elif args.eval_fraction > 0:
        split = splits["train"].train_test_split(test_size=args.eval_fraction, seed=args.toy_seed)
        splits = {"train": split["train"], "test": split["test"]}
    return DatasetDict(splits)


def load_local(name: str, files: list[str], *load_args, **load_kwargs) -> DatasetDict:
    """datasets.load_dataset on a local file or folder; a file it cannot read is a DataError naming the file
    (and, for JSON, the first line that does not parse) instead of a DatasetGenerationError."""
    try:
        return datasets.load_dataset(*load_args, **load_kwargs)
    except (datasets.exceptions.DatasetGenerationError, ValueError) as error:  # ValueError: e.g. the JSON fallback
        for path in files:
            if path.endswith((".json", ".jsonl")):
                check_json_file(path)
        cause = error.__cause__ or error
        raise DataError(f"{name}: cannot be read: {type(cause).__name__}: {cause}") from error


def check_json_file(path: str) -> None:
    """Raise a DataError at the first line of `path` that is not a JSON object (JSON Lines), unless the whole
    file is one JSON document (a .json array of rows)."""
    with open(path, encoding="utf-8", errors="replace") as f:
        text = f.read()
    if text.lstrip().startswith("["):
        try:
            json.loads(text)
        except json.JSONDecodeError as error:
            raise DataError(f"{path} line {error.lineno}: invalid JSON ({error.msg}, column {error.colno})") from None
        return
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise DataError(f"{path} line {number}: invalid JSON ({error.msg}, column {error.colno})") from None
        if not isinstance(row, dict):
            raise DataError(f"{path} line {number}: expected a JSON object (one row), got {type(row).__name__}")


# ------------------------------------------------------------------------------------------ normalise

def detect_format(row: dict, args: DataArguments) -> str:
    if args.dataset_format != "auto":
        return args.dataset_format
    if isinstance(row.get(args.chosen_column), list):
        return "conversational"
    return "explicit" if args.prompt_column in row else "implicit"


def _field(row: dict, column: str, where: str, kind: type):
    if column not in row:
        raise DataError(f"{where}: missing field {column!r} (columns: {sorted(row)})")
    value = row[column]
    if not isinstance(value, kind):
        got = "null or missing" if value is None else type(value).__name__  # JSON rows lacking a key read as null
        raise DataError(f"{where}: field {column!r} must be a {kind.__name__}, got {got}")
    if len(value) == 0 or (kind is str and not value.strip()):
        raise DataError(f"{where}: field {column!r} is empty")
    return value


def _check_messages(messages: list, where: str, column: str) -> None:
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


def normalize_row(row: dict, index: int, args: DataArguments, tokenizer, source: str) -> dict:
    """One raw row -> {'prompt', 'chosen', 'rejected'} texts (conversations rendered by the chat template)."""
    where = f"{source} row {index}"
    fmt = detect_format(row, args)
    if fmt == "explicit":
        prompt = _field(row, args.prompt_column, where, str)
        chosen = _field(row, args.chosen_column, where, str)
        rejected = _field(row, args.rejected_column, where, str)
    elif fmt == "implicit":
        prompt, chosen, rejected = split_implicit_prompt(_field(row, args.chosen_column, where, str),
                                                         _field(row, args.rejected_column, where, str))
        if not prompt:
            raise DataError(f"{where}: fields {args.chosen_column!r} and {args.rejected_column!r} share no prompt")
    else:
        prompt, chosen, rejected = _render_conversation(row, args, tokenizer, where)
    if not chosen.strip() or not rejected.strip():
        empty = args.chosen_column if not chosen.strip() else args.rejected_column
        raise DataError(f"{where}: field {empty!r} has an empty completion after the prompt")
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


def _render_conversation(row: dict, args: DataArguments, tokenizer, where: str) -> tuple[str, str, str]:
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


def truncate_pair(prefix_ids, prompt_ids, chosen_ids, rejected_ids, max_length: int, mode: str, where: str):
    """Fit prefix + prompt + each completion into max_length; returns (prefix + prompt, chosen, rejected).
    The prefix (special tokens such as bos) is never cut."""
    longest = max(len(chosen_ids), len(rejected_ids))
    if len(prefix_ids) + len(prompt_ids) + longest > max_length:
        if mode == "keep_end":
            keep = max(max_length - longest, max_length // 2) - len(prefix_ids)
            prompt_ids = prompt_ids[max(len(prompt_ids) - keep, 0):]
        elif len(prefix_ids) + len(prompt_ids) >= max_length:
            raise DataError(f"{where}: field 'prompt' has {len(prefix_ids) + len(prompt_ids)} tokens, max_length is "
                            f"{max_length}: no room for a completion; raise --max_length or use --truncation_mode "
                            f"keep_end")
        room = max_length - len(prefix_ids) - len(prompt_ids)
        chosen_ids, rejected_ids = chosen_ids[:room], rejected_ids[:room]
    return prefix_ids + prompt_ids, chosen_ids, rejected_ids


def tokenize_row(row: dict, index: int, tokenizer, max_length: int, truncation_mode: str, prefix_ids: list[int],
                 source: str) -> dict:
    """Texts -> prefix_ids + prompt ids, and completion ids ending in the one eos of the sequence. The texts are
    tokenised without special tokens: a post-processor that appends eos (Llama's add_eos_token) would put one
    between prompt and completion."""
    prompt_ids = tokenizer(row["prompt"], add_special_tokens=False)["input_ids"]
    chosen_ids = tokenize_completion(tokenizer, row["prompt"], row["chosen"], prompt_ids)
    rejected_ids = tokenize_completion(tokenizer, row["prompt"], row["rejected"], prompt_ids)
    prompt_ids, chosen_ids, rejected_ids = truncate_pair(prefix_ids, prompt_ids, chosen_ids, rejected_ids, max_length,
                                                         truncation_mode, f"{source} row {index}")
    return {"prompt_input_ids": prompt_ids, "chosen_input_ids": chosen_ids, "rejected_input_ids": rejected_ids,
            "row_index": index}  # the row in the source split, for error messages during training


def prepare_split(raw: Dataset, args: DataArguments, tokenizer, split: str) -> Dataset:
    """Raw rows -> validated texts -> token ids. Cached by `datasets` for file and Hub sources."""
    source = f"{args.dataset_name} [{split}]"
    if len(raw) == 0:
        raise DataError(f"{source}: no rows")
    fmt = detect_format(raw[0], args)
    texts = raw.map(normalize_row, with_indices=True, remove_columns=raw.column_names, num_proc=args.dataset_num_proc,
                    fn_kwargs=dict(args=args, tokenizer=tokenizer, source=source),
                    desc=f"Normalising {split} ({fmt})")
    # A chat template writes the conversation's special tokens itself.
    prefix_ids = [] if fmt == "conversational" else special_prefix_ids(tokenizer)
    # Tokenise before dropping pairs, so that an error names the row's index in the source.
    tokenized = texts.map(tokenize_row, with_indices=True, num_proc=args.dataset_num_proc,
                          fn_kwargs=dict(tokenizer=tokenizer, max_length=args.max_length,
                                         truncation_mode=args.truncation_mode, prefix_ids=prefix_ids, source=source),
                          desc=f"Tokenising {split}")
    # A pair the model sees as the same tokens (identical texts, or texts that differ only past max_length)
    # gives no gradient and counts as wrong in rewards/accuracies.
    distinct_texts = tokenized.filter(operator.ne, input_columns=["chosen", "rejected"],
                                      num_proc=args.dataset_num_proc)
    distinct = distinct_texts.filter(operator.ne, input_columns=["chosen_input_ids", "rejected_input_ids"],
                                     num_proc=args.dataset_num_proc)
    if len(distinct) == 0:
        raise DataError(f"{source}: all {len(texts)} pairs have chosen identical to rejected, as texts or as the "
                        f"tokens kept by max_length {args.max_length}: nothing to learn from")
    if len(distinct_texts) < len(texts):
        logger.warning("%s: dropped %d of %d pairs whose chosen equals rejected", source,
                       len(texts) - len(distinct_texts), len(texts))
    if len(distinct) < len(distinct_texts):
        logger.warning("%s: dropped %d of %d pairs whose chosen and rejected differ as texts but not as the tokens "
                       "kept by max_length %d (raise it to keep them)", source, len(distinct_texts) - len(distinct),
                       len(texts), args.max_length)
    return distinct


def load_preference_data(args: DataArguments, tokenizer) -> DatasetDict:
    raw = load_raw_dataset(args)
    return DatasetDict({split: prepare_split(dataset, args, tokenizer, split) for split, dataset in raw.items()})


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
    Reference log-prob columns and `row_index` (the rows' indices in their source split) pass through."""
    pad_token_id: int
    padding_free: bool = False
    pad_to_multiple_of: int | None = None

    def __call__(self, rows: list[dict]) -> dict:
        # Per-pair tensors first: the Trainer takes the batch size from the first tensor it finds.
        batch = {key: torch.tensor([row[key] for row in rows], dtype=dtype) for key, dtype in
                 (("row_index", torch.long), ("ref_chosen_logps", torch.float32), ("ref_rejected_logps", torch.float32))
                 if key in rows[0]}
        prompts = [row["prompt_input_ids"] for row in rows] * 2
        completions = [row["chosen_input_ids"] for row in rows] + [row["rejected_input_ids"] for row in rows]
        batch.update(collate_completions(prompts, completions, self.pad_token_id, self.padding_free,
                                         self.pad_to_multiple_of))
        return batch
