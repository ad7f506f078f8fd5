"""Everything about the reference pi_ref: its log-probs computed once before training and cached on disk, the cache's
identity, and `ReferenceScoring`, the Trainer mixin that owns the three ways a step gets them.

The reference is the initial policy (with PEFT: the same model with its new adapters disabled, or with a frozen
copy of the adapter a user brought), so scoring needs no second copy of the weights. Every rank scores its share
of length-sorted batches; the results are gathered back into dataset order, so N processes give what one process
gives.
Under FSDP or DeepSpeed ZeRO-3 `ReferenceScoring` scores through the model as the engine
wrapped it, so scoring runs on the sharded weights: no rank ever holds a full copy. The main process alone
looks in the cache, reads it and writes it; the other ranks get its answer.
This module alone decides the reference's identity (the cache fingerprint).

A cache file is written to a unique temporary name and renamed into place (atomic: readers see a whole
file or none, and concurrent writers of the same fingerprint cannot mix their bytes); its metadata holds
the fingerprint, the row count and a sha256 of the tensors. A file that fails to parse or to match them
(cut short, altered, another dataset) is never used: it is logged, recomputed and rewritten.
"""

import contextlib
import copy
import dataclasses
import hashlib
import json
import logging
import os
import tempfile
import time

import numpy as np
import pyarrow.compute as pc
import torch
import torch.distributed as dist
from accelerate import PartialState
from accelerate.utils import broadcast_object_list
from huggingface_hub import constants as hub_constants, try_to_load_from_cache
from peft import PeftModel
from safetensors import safe_open
from safetensors.torch import save_file
from torch.distributed.fsdp import FSDPModule
from tqdm.auto import tqdm
from transformers.integrations import is_deepspeed_zero3_enabled

from utils.attention import packs_linearly
from utils.errors import ConfigError
from utils.logprobs import model_logps
from utils.modeling import REFERENCE_ADAPTER, adapter_base
from utils.preflight import disk_full_as_error
from utils.precision import compute_dtype
from utils.trainer_hooks import HookedTrainer

logger = logging.getLogger(__name__)
ID_COLUMNS = ("prompt_input_ids", "chosen_input_ids", "rejected_input_ids")
REF_COLUMNS = ("ref_chosen_logps", "ref_rejected_logps")
WEIGHT_FILE_SUFFIXES = (".safetensors", ".bin", ".json", ".model", ".pt")


def default_cache_dir() -> str:
    from huggingface_hub.constants import HF_HOME

    return os.path.join(HF_HOME, "dpo-ref-logps")


# ------------------------------------------------------------------------------------------- identity

# A folder's content sample, read instead of hashing the weights (the whole point is to stay cheap): per
# .safetensors file its header (tensor names, dtypes, shapes, offsets) and the first and last
# TENSOR_SAMPLE_BYTES of every tensor; per other file (config, tokenizer, .bin/.pt) FILE_SAMPLE_WINDOWS windows of
# FILE_SAMPLE_BYTES spread evenly over it, the whole file when smaller. Bound: header + 512 B per tensor, 64 KiB
# per other file. A change confined to bytes outside the sample, with names, sizes and times unchanged, goes unseen.
TENSOR_SAMPLE_BYTES = 256
FILE_SAMPLE_WINDOWS = 16
FILE_SAMPLE_BYTES = 4096


def spread_windows(start: int, size: int, count: int, width: int) -> list[tuple[int, int]]:
    """`count` (offset, length) windows of `width` bytes spread evenly over [start, start + size), first and
    last included; the whole range when it is no bigger than the windows."""
    if size <= count * width:
        return [(start, size)]
    step = (size - width) / (count - 1)
    return [(start + round(i * step), width) for i in range(count)]


def safetensors_windows(file, size: int) -> list[tuple[int, int]]:
    """The header and the first and last TENSOR_SAMPLE_BYTES of every tensor; [] where the file does not
    parse as safetensors (the even spread alone then samples it)."""
    header_size = int.from_bytes(file.read(8), "little")
    if not 0 < header_size <= size - 8:
        return []
    try:
        header = json.loads(file.read(header_size))
        spans = [entry["data_offsets"] for name, entry in header.items() if name != "__metadata__"]
    except (ValueError, TypeError, KeyError):
        return []
    data_start = 8 + header_size
    return [(0, data_start)] + [window for begin, end in spans
                                for window in spread_windows(data_start + begin, end - begin, 2, TENSOR_SAMPLE_BYTES)]


def file_content_sample(path: str) -> str:
    """sha256 of the sampled bytes of `path` (see TENSOR_SAMPLE_BYTES)."""
    digest = hashlib.sha256()
    size = os.path.getsize(path)
    with open(path, "rb") as file:
        windows = spread_windows(0, size, FILE_SAMPLE_WINDOWS, FILE_SAMPLE_BYTES)
        if path.endswith(".safetensors"):
            windows += safetensors_windows(file, size)
        for offset, length in windows:
            file.seek(offset)
            digest.update(file.read(length))
    return digest.hexdigest()


def folder_files(path: str, suffixes: tuple[str, ...]) -> dict:
    """{name: (size, mtime, content sample)} of the files in `path` ending in `suffixes`; a Hub snapshot's links
    are followed to the files (blobs) they point to."""
    files = {}
    for name in sorted(os.listdir(path)):
        if name.endswith(suffixes):
            file_path = os.path.join(path, name)
            stat = os.stat(file_path)
            files[name] = (stat.st_size, stat.st_mtime_ns, file_content_sample(file_path))
    return files


def hub_snapshot(repo_id: str, revision: str) -> str | None:
    """The local Hub cache's folder of the commit `revision` points to: what from_pretrained has just loaded (it
    records a branch's commit under refs/ as it downloads). None where the model is not in the cache."""
    for name in ("config.json", "adapter_config.json"):  # a model's, or an adapter's
        config_path = try_to_load_from_cache(repo_id, name, revision=revision)
        if isinstance(config_path, str):
            return os.path.dirname(config_path)
    return None


def model_identity(model_args, model) -> dict:
    """What makes the reference's weights what they are, cheaply: never a hash of the weights themselves. A Hub
    model is the commit loaded (transformers 5 no longer names it in the config) and its snapshot's files; with
    trust_remote_code, the model's code (.py) too."""
    if model_args.is_preset:  # built from a config: the config and the seed fix the weights
        identity = {"preset": model_args.model_name_or_path, "seed": model_args.model_init_seed,
                    "config": model.config.to_json_string(use_diff=False)}
        if is_deepspeed_zero3_enabled():  # built partitioned (deepspeed.zero.Init): other random draws
            identity["zero3_init"] = True
        return identity
    suffixes = WEIGHT_FILE_SUFFIXES + ((".py",) if model_args.trust_remote_code else ())
    identity = checkpoint_identity(model_args.model_name_or_path, model_args.model_revision, suffixes)
    base = adapter_base(model_args)
    if base is not None:  # an adapter's files say nothing of the weights it adapts
        identity["base"] = checkpoint_identity(*base, suffixes)
    return identity


def checkpoint_identity(path: str, revision: str, suffixes: tuple[str, ...]) -> dict:
    """A local folder's files (names, sizes, times and samples), or the Hub commit loaded and its snapshot's."""
    if os.path.isdir(path):
        return {"folder": os.path.abspath(path), "files": folder_files(path, suffixes)}
    snapshot = hub_snapshot(path, revision)
    if snapshot is None:
        logger.warning("%s (revision %s) is not in the Hub cache %s: its commit is unknown, so these reference "
                       "log-probs are scored afresh and never reused", path, revision, hub_constants.HF_HUB_CACHE)
        return {"hub": path, "unresolved": os.urandom(16).hex()}
    return {"hub": path, "commit": os.path.basename(snapshot), "files": folder_files(snapshot, suffixes)}


def quantization_identity(model) -> dict | None:
    """The quantization the weights were loaded with (on the fly or pre-quantized), None for plain weights."""
    quantizer = getattr(model, "hf_quantizer", None)
    config = quantizer.quantization_config if quantizer is not None \
        else getattr(model.config, "quantization_config", None)
    if config is None:
        return None
    return config if isinstance(config, dict) else config.to_dict()


def dataset_token_hash(dataset) -> str:
    """Hash of the tokenised pairs: captures the data and the tokenizer (max_length and truncation only where
    they cut a pair, so the fingerprint holds them too)."""
    digest = hashlib.sha256()
    table = dataset.select_columns(list(ID_COLUMNS)).with_format("arrow")
    for batch in table.iter(batch_size=50_000):
        for column in ID_COLUMNS:
            array = batch[column].combine_chunks()
            digest.update(pc.list_value_length(array).to_numpy(zero_copy_only=False).tobytes())
            digest.update(pc.list_flatten(array).to_numpy(zero_copy_only=False).tobytes())
    return digest.hexdigest()


def reference_fingerprint(model_args, model, dataset, data_args, dtype: torch.dtype) -> str:
    """The cache key: everything that decides the reference log-probs, `dtype` being the scoring precision."""
    identity = {
        "model": model_identity(model_args, model),
        "data": dataset_token_hash(dataset),
        "max_length": data_args.max_length,
        "truncation_mode": data_args.truncation_mode,
        "dtype": str(dtype),
        "attn_implementation": model.config._attn_implementation,
        "experts_implementation": getattr(model.config, "_experts_implementation", None),
        "weights_dtype": str(model.dtype),  # the same checkpoint in float32 and bfloat16 scores differently
        "quantization": quantization_identity(model),  # e.g. --load_in_fp8
    }
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:32]


# -------------------------------------------------------------------------------------------- scoring

def length_sorted_batches(dataset, batch_size: int) -> list[list[int]]:
    """Row indices in batches of similar length (longest first), so little compute goes to padding. Lengths come
    from the Arrow columns' offsets: no token list is turned into Python objects."""
    table = dataset.select_columns(list(ID_COLUMNS)).with_format("arrow")
    lengths = []
    for batch in table.iter(batch_size=100_000):
        prompt, chosen, rejected = (pc.list_value_length(batch[column]).to_numpy(zero_copy_only=False)
                                    for column in ID_COLUMNS)
        lengths.append(prompt + np.maximum(chosen, rejected))
    order = np.argsort(-np.concatenate(lengths), kind="stable").tolist()
    return [order[start:start + batch_size] for start in range(0, len(order), batch_size)]


def scoring_collator(collator, model, device: torch.device, dtype: torch.dtype):
    """The collator for scoring: packed rows where attention costs no more than padded rows' (`packs_linearly`;
    the body's matmuls then see no padding), else length-sorted padded rows, whose widths are rounded up on GPUs so that shapes repeat (a new
    shape costs a new cuDNN attention plan, ~80 ms). A big batch in one packed row through a dense mask would cost
    the square of its total length."""
    if collator.padding_free and packs_linearly(model.config._attn_implementation, device, dtype):
        return collator
    return dataclasses.replace(collator, padding_free=False, pad_to_multiple_of=64 if device.type == "cuda" else None)


@torch.no_grad()
def score_dataset(model, dataset, collator, batch_size: int, dtype: torch.dtype = torch.float32,
                  desc: str = "reference log-probs", unwrapped=None, chunk_size: int = 4096):
    """(chosen_logps, rejected_logps), float32 tensors of shape [len(dataset)], in dataset order.

    `model` may be a distributed wrapper (DDP, FSDP, a DeepSpeed engine) of `unwrapped`. `dtype` is the
    training's compute precision and `chunk_size` its output-layer chunk (`utils.logprobs.model_logps`).
    The sums stay on the device until the end: no host sync per batch, so batches queue up on a GPU."""
    state = PartialState()
    device = state.device
    unwrapped = model if unwrapped is None else unwrapped
    model.eval()
    collator = scoring_collator(collator, unwrapped, device, dtype)
    id_columns = dataset.select_columns(list(ID_COLUMNS))
    all_batches = length_sorted_batches(dataset, batch_size)
    my_batches = all_batches[state.process_index::state.num_processes]  # round-robin keeps ranks balanced
    # Sharded engines gather weights inside every forward (a collective), and DDP syncs buffers: every rank
    # must run as many forwards. A rank one batch short reruns the shortest batch and drops the result.
    rounds = -(-len(all_batches) // state.num_processes)
    padded = my_batches + all_batches[-1:] * (rounds - len(my_batches))
    chosen, rejected = [], []
    for step, batch_indices in enumerate(tqdm(padded, desc=desc, disable=not state.is_local_main_process)):
        columns = id_columns[batch_indices]
        batch = collator([dict(zip(columns, values)) for values in zip(*columns.values())])
        batch = {key: to_device(value, device) for key, value in batch.items()}
        sums = model_logps(model, batch, unwrapped=unwrapped, chunk_size=chunk_size, dtype=dtype).sums
        if step < len(my_batches):
            chosen_sums, rejected_sums = sums.float().chunk(2)
            chosen.append(chosen_sums)
            rejected.append(rejected_sums)
    for module in model.modules():  # FSDP2 keeps the root's weights gathered after a forward: shard them again
        if isinstance(module, FSDPModule):
            module.reshard()
    indices = [i for batch_indices in my_batches for i in batch_indices]
    chosen = torch.cat(chosen).cpu() if chosen else torch.empty(0)  # one device-to-host copy
    rejected = torch.cat(rejected).cpu() if rejected else torch.empty(0)
    if state.num_processes > 1:
        shards = [None] * state.num_processes
        dist.all_gather_object(shards, (indices, chosen, rejected))
        indices = [i for shard in shards for i in shard[0]]
        chosen, rejected = torch.cat([shard[1] for shard in shards]), torch.cat([shard[2] for shard in shards])
    chosen_logps = torch.empty(len(dataset))
    rejected_logps = torch.empty(len(dataset))
    chosen_logps[indices] = chosen
    rejected_logps[indices] = rejected
    return chosen_logps, rejected_logps


def to_device(value, device: torch.device):
    """A batch value on `device`; on CUDA through pinned memory without waiting (a pageable copy syncs the stream)."""
    if not isinstance(value, torch.Tensor):
        return value
    if device.type == "cuda":
        return value.pin_memory().to(device, non_blocking=True)
    return value.to(device)


# ---------------------------------------------------------------------------------------------- cache

def tensors_checksum(tensors: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for name in sorted(tensors):
        digest.update(name.encode())
        digest.update(tensors[name].contiguous().numpy().tobytes())
    return digest.hexdigest()


def save_cache(path: str, tensors: dict[str, torch.Tensor], fingerprint: str) -> None:
    """Write to a temporary file unique to this writer, then rename it over `path` (atomic)."""
    directory = os.path.dirname(path) or "."
    os.makedirs(directory, exist_ok=True)
    fd, tmp_path = tempfile.mkstemp(dir=directory, prefix=os.path.basename(path) + ".", suffix=".tmp")
    os.close(fd)
    metadata = {"fingerprint": fingerprint, "rows": str(len(tensors[REF_COLUMNS[0]])),
                "sha256": tensors_checksum(tensors)}
    try:
        with disk_full_as_error(directory, "reference log-probs"):
            save_file(tensors, tmp_path, metadata=metadata)
            os.replace(tmp_path, path)
    finally:
        if os.path.exists(tmp_path):  # the write failed: leave no stray temporary file
            os.remove(tmp_path)
    remove_orphaned_temp_files(path)


def remove_orphaned_temp_files(path: str, min_age_s: float = 3600.0) -> None:
    """Delete temporary files of `path` left by writers that were killed mid-write (a SIGKILL skips the
    `finally` above). A write takes well under a second, so one untouched for an hour has no writer left;
    younger ones may belong to a concurrent writer and stay."""
    directory, prefix = os.path.dirname(path) or ".", os.path.basename(path) + "."
    now = time.time()
    for name in os.listdir(directory):
        candidate = os.path.join(directory, name)
        if name.startswith(prefix) and name.endswith(".tmp"):
            with contextlib.suppress(FileNotFoundError):  # another writer may clean up at the same moment
                if now - os.path.getmtime(candidate) > min_age_s:
                    os.remove(candidate)


def load_cache(path: str, fingerprint: str, rows: int) -> tuple[dict[str, torch.Tensor] | None, str]:
    """(tensors, "") from a verified cache file, or (None, why it cannot be used)."""
    if not os.path.exists(path):
        return None, "missing"
    try:
        with safe_open(path, framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except Exception as error:  # noqa: BLE001 -- cut short or garbled: whatever safetensors raises, don't use it
        return None, f"unreadable ({type(error).__name__}: {error})"
    if metadata.get("fingerprint") != fingerprint:
        return None, f"fingerprint {metadata.get('fingerprint')!r} in the file, expected {fingerprint!r}"
    if sorted(tensors) != sorted(REF_COLUMNS) or any(t.shape != (rows,) for t in tensors.values()) \
            or metadata.get("rows") != str(rows):
        shapes = {name: tuple(t.shape) for name, t in tensors.items()}
        return None, f"holds {shapes} (metadata rows {metadata.get('rows')}), expected {rows} rows of {REF_COLUMNS}"
    if metadata.get("sha256") != tensors_checksum(tensors):
        return None, "checksum mismatch (altered or damaged)"
    return tensors, ""


def _with_reference_columns(dataset, tensors: dict):
    for column in REF_COLUMNS:
        if column in dataset.column_names:
            dataset = dataset.remove_columns(column)
        dataset = dataset.add_column(column, tensors[column].tolist())
    return dataset


def load_cached_logps(dataset, *, fingerprint: str, cache_dir: str, split: str):
    """`dataset` plus its reference columns from the cache, or None where they are not cached.

    Only the main process looks and reads; the other ranks receive its answer, so all ranks take the same
    branch (one rank scoring alone would hang the others' collectives) even where the cache folder is
    local to the main node."""
    state = PartialState()
    path = os.path.join(cache_dir, f"{fingerprint}.safetensors")
    if os.path.isdir(path):  # checked on every rank, so that all stop here, before scoring
        raise ConfigError(f"{path}: a folder in place of the reference cache file: move it away")
    tensors = None
    if state.is_main_process:
        tensors, why = load_cache(path, fingerprint, len(dataset))
        if tensors is None and why != "missing":
            logger.warning("reference log-probs (%s): cache file %s not used, %s: recomputing", split, path, why)
    if state.num_processes > 1:
        shared = [tensors]
        broadcast_object_list(shared, from_process=0)
        tensors = shared[0]
    if tensors is None:
        return None
    logger.info("reference log-probs (%s): loaded from cache %s", split, path)
    return _with_reference_columns(dataset, tensors)


def score_and_cache(dataset, model, collator, *, fingerprint: str, cache_dir: str, batch_size: int, split: str,
                    dtype: torch.dtype = torch.float32, unwrapped=None, chunk_size: int = 4096):
    """Score `dataset` (no cache lookup: the caller has looked), save the cache file, add the columns."""
    chosen, rejected = score_dataset(model, dataset, collator, batch_size, dtype, desc=f"reference log-probs ({split})",
                                     unwrapped=unwrapped, chunk_size=chunk_size)
    tensors = {"ref_chosen_logps": chosen, "ref_rejected_logps": rejected}
    if PartialState().is_main_process:
        path = os.path.join(cache_dir, f"{fingerprint}.safetensors")
        save_cache(path, tensors, fingerprint)
        logger.info("reference log-probs (%s): computed for %d pairs, saved to cache %s", split, len(dataset), path)
    return _with_reference_columns(dataset, tensors)


def reference_mode(model):
    """A context in which `model` computes the reference, the initial policy: with new LoRA adapters, the base model
    (adapters disabled); where an adapter the user brought trains, its frozen copy (REFERENCE_ADAPTER)."""
    if not isinstance(model, PeftModel):
        return contextlib.nullcontext()
    if REFERENCE_ADAPTER in model.peft_config:
        return active_adapter(model, REFERENCE_ADAPTER)
    return model.disable_adapter()


@contextlib.contextmanager
def active_adapter(model, name: str):
    """`name` active (frozen) for a while; the trained adapter active and trainable again after."""
    trained = model.active_adapter
    model.set_adapter(name, inference_mode=True)  # peft freezes the inactive adapters: the trained one too
    try:
        yield
    finally:
        model.set_adapter(trained)


def add_reference_columns(model, dataset_dict, collator, *, model_args, data_args, cache_dir: str, batch_size: int,
                          dtype: torch.dtype = torch.float32):
    """Every split of `dataset_dict` with reference columns scored by `model` on one process, through the cache:
    this module's public steps without a Trainer (which scores through the engine's wrapped model), for tests and
    benchmarks."""
    with reference_mode(model):
        for split, dataset in dataset_dict.items():
            fingerprint = reference_fingerprint(model_args, model, dataset, data_args, dtype)
            cached = load_cached_logps(dataset, fingerprint=fingerprint, cache_dir=cache_dir, split=split)
            dataset_dict[split] = cached if cached is not None else score_and_cache(
                dataset, model, collator, fingerprint=fingerprint, cache_dir=cache_dir, batch_size=batch_size,
                split=split, dtype=dtype)
    return dataset_dict


class ReferenceScoring(HookedTrainer):
    """A Trainer mixin that gives each step the reference log-probs of its batch (`reference_logps`), one of three ways:

    - precomputed (`args.precompute_ref_log_probs`, the default): `train()` adds the columns ref_chosen_logps /
      ref_rejected_logps to every split that lacks them, from the cache where it holds them, else scored once
      through the model as the engine (DDP, FSDP, DeepSpeed) prepared it (`on_engine_ready`), so no rank holds
      an unsharded copy; `model_args` and `data_args` identify the reference (`reference_fingerprint`);
    - a frozen copy of the initial policy (`ref_model`, made here when not precomputing), scored every step;
    - with LoRA and no copy: the policy itself with its adapters off (or its loaded adapter's frozen copy: see
      `reference_mode`), scored every step.
    With `uses_reference=False` (--reference_free, or losses that need none) no reference is scored at all.
    Every way computes through `utils.logprobs.model_logps` at the training's precision: one precision path."""

    def __init__(self, *args, ref_model=None, model_args=None, data_args=None, uses_reference: bool = True,
                 **kwargs):
        super().__init__(*args, **kwargs)
        self.uses_reference = uses_reference
        self.reference_identity = (model_args, data_args)
        self._reference_pending: dict[str, str] = {}
        # Made here from the initial policy (scored by this trainer, its frozen copy or adapters off), not handed in:
        # then step 0's implicit rewards are 0 (checked by utils.guards.FirstBatchChecks).
        given_columns = set(REF_COLUMNS) <= set(getattr(self.train_dataset, "column_names", None) or ())
        self.reference_is_initial_policy = uses_reference and ref_model is None and not given_columns
        precompute = self.args.precompute_ref_log_probs
        if ref_model is None and uses_reference and not precompute and not isinstance(self.model, PeftModel):
            if self.is_deepspeed_enabled or self.is_fsdp_enabled:
                raise ConfigError("a frozen reference model (--precompute_ref_log_probs false without LoRA) would be "
                                  "a full unsharded copy on every rank under DeepSpeed/FSDP: keep the default "
                                  "--precompute_ref_log_probs true, or use --use_peft")
            ref_model = copy.deepcopy(self.model)
        self.ref_model = ref_model
        if ref_model is not None:
            self.ref_model = ref_model.to(self.accelerator.device).eval().requires_grad_(False)

    def _splits(self) -> dict:
        splits = {"train": self.train_dataset}
        if isinstance(self.eval_dataset, dict):
            splits.update({f"eval_{name}": dataset for name, dataset in self.eval_dataset.items()})
        elif self.eval_dataset is not None:
            splits["eval"] = self.eval_dataset
        return splits

    def _set_split(self, split: str, dataset) -> None:
        if split == "train":
            self.train_dataset = dataset
        elif split == "eval":
            self.eval_dataset = dataset
        else:
            self.eval_dataset = {**self.eval_dataset, split.removeprefix("eval_"): dataset}

    def _reference_settings(self) -> tuple[str, torch.dtype, int]:
        """Cache folder, scoring dtype (the training's precision) and batch size of reference scoring."""
        return (self.args.ref_logps_cache_dir or default_cache_dir(), compute_dtype(self.args),
                self.args.precompute_ref_batch_size or 4 * self.args.per_device_eval_batch_size)

    def load_cached_reference(self, include_train: bool = True) -> dict[str, str]:
        """Add cached reference columns to the datasets that lack them; return {split: fingerprint} of those that
        must still be scored. Runs no forward pass, so it works before any engine has touched the model."""
        if not self.args.precompute_ref_log_probs or not self.uses_reference:
            return {}
        unscored = {split: dataset for split, dataset in self._splits().items()
                    if (include_train or split != "train") and hasattr(dataset, "column_names")
                    and not set(REF_COLUMNS) <= set(dataset.column_names)}
        if not unscored:
            return {}
        model_args, data_args = self.reference_identity
        if model_args is None or data_args is None:
            raise ValueError("to precompute reference log-probs, pass model_args and data_args (the reference's "
                             "identity), or datasets that already have ref_chosen_logps/ref_rejected_logps")
        cache_dir, dtype, _ = self._reference_settings()
        unwrapped = self.accelerator.unwrap_model(self.model)
        pending = {}
        for split, dataset in unscored.items():
            fingerprint = reference_fingerprint(model_args, unwrapped, dataset, data_args, dtype)
            cached = load_cached_logps(dataset, fingerprint=fingerprint, cache_dir=cache_dir, split=split)
            if cached is None:
                pending[split] = fingerprint
            else:
                self._set_split(split, cached)
        return pending

    def score_reference(self, model, pending: dict[str, str]) -> None:
        """Score the reference on the `pending` splits ({split: fingerprint}) through `model`, the model as the
        engine wrapped it: every rank scores its share of the batches on the sharded weights."""
        cache_dir, dtype, batch_size = self._reference_settings()
        unwrapped = self.accelerator.unwrap_model(model)
        splits = self._splits()
        was_training = model.training
        with reference_mode(unwrapped):
            for split, fingerprint in pending.items():
                self._set_split(split, score_and_cache(
                    splits[split], model, self.data_collator, fingerprint=fingerprint, cache_dir=cache_dir,
                    batch_size=batch_size, split=split, dtype=dtype, unwrapped=unwrapped,
                    chunk_size=self.args.logps_chunk_size))
        model.train(was_training)

    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        self._reference_pending = pending = self.load_cached_reference()
        if pending and resume_from_checkpoint:  # the weights are no longer the reference's
            raise ConfigError(f"resuming from {resume_from_checkpoint}, but the reference log-probs of "
                              f"{sorted(pending)} are not in the cache {self._reference_settings()[0]}: the "
                              "checkpoint's weights are no longer the reference's; point --ref_logps_cache_dir at "
                              "the first run's cache, or start afresh")
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def on_engine_ready(self, model, train_dataloader):
        train_dataloader = super().on_engine_ready(model, train_dataloader)
        pending, self._reference_pending = self._reference_pending, {}
        if pending:
            self.score_reference(model, pending)
            if "train" in pending:  # the loop's dataloader was built over the unscored rows
                train_dataloader = self.replace_train_dataloader(train_dataloader)
        return train_dataloader

    def evaluate(self, eval_dataset=None, *args, **kwargs):
        if eval_dataset is None and self.load_cached_reference(include_train=False):
            raise RuntimeError("reference log-probs of the eval set are neither cached nor scored yet: they are "
                               "scored when train() has prepared the model, so call train() first")
        return super().evaluate(eval_dataset, *args, **kwargs)

    def reference_logps(self, model, inputs, num_pairs: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(ref_chosen_logps, ref_rejected_logps) of the batch `inputs`, [num_pairs] each."""
        if not self.uses_reference:
            zeros = torch.zeros(num_pairs, device=inputs["input_ids"].device)
            return zeros, zeros
        if "ref_chosen_logps" in inputs:
            return inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]
        scoring = dict(chunk_size=self.args.logps_chunk_size, dtype=compute_dtype(self.args))
        with torch.no_grad():
            if self.ref_model is None:  # LoRA: the policy in reference_mode
                unwrapped = self.accelerator.unwrap_model(model)
                with reference_mode(unwrapped):
                    sums = model_logps(model, inputs, unwrapped=unwrapped, **scoring).sums
            else:  # the frozen copy, which accelerate never prepared, computes at the policy's precision too
                sums = model_logps(self.ref_model, inputs, **scoring).sums
        return sums.chunk(2)
