"""Reference log-probs, computed once before training and cached on disk.

The reference is the initial policy (with PEFT: the same model with adapters disabled), so scoring
needs no second copy of the weights. Every rank scores its share of length-sorted batches; the
results are gathered back into dataset order, so N processes give what one process gives.
This module alone decides the reference's identity (the cache fingerprint).
"""

import contextlib
import hashlib
import json
import logging
import os

import pyarrow.compute as pc
import torch
import torch.distributed as dist
from accelerate import PartialState
from peft import PeftModel
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from utils.logprobs import model_logps

logger = logging.getLogger(__name__)
ID_COLUMNS = ("prompt_input_ids", "chosen_input_ids", "rejected_input_ids")
REF_COLUMNS = ("ref_chosen_logps", "ref_rejected_logps")
WEIGHT_FILE_SUFFIXES = (".safetensors", ".bin", ".json", ".model", ".pt")


def default_cache_dir() -> str:
    from huggingface_hub.constants import HF_HOME

    return os.path.join(HF_HOME, "dpo-ref-logps")


# ------------------------------------------------------------------------------------------- identity

def model_identity(model_args, model) -> dict:
    """What makes the reference's weights what they are, cheaply: never a hash of the weights themselves."""
    if model_args.is_preset:  # built from a config: the config and the seed fix the weights
        return {"preset": model_args.model_name_or_path, "seed": model_args.model_init_seed,
                "config": model.config.to_json_string(use_diff=False)}
    path = model_args.model_name_or_path
    if os.path.isdir(path):  # a local checkpoint (or adapter) folder: its files' names, sizes and times
        files = sorted(name for name in os.listdir(path) if name.endswith(WEIGHT_FILE_SUFFIXES))
        stats = {name: (os.stat(os.path.join(path, name)).st_size, os.stat(os.path.join(path, name)).st_mtime_ns)
                 for name in files}
        return {"folder": os.path.abspath(path), "files": stats}
    commit = getattr(model.config, "_commit_hash", None)
    return {"hub": path, "revision": commit or model_args.model_revision}


def dataset_token_hash(dataset) -> str:
    """Hash of the tokenised pairs: captures the data, the tokenizer, max_length and truncation at once."""
    digest = hashlib.sha256()
    table = dataset.select_columns(list(ID_COLUMNS)).with_format("arrow")
    for batch in table.iter(batch_size=50_000):
        for column in ID_COLUMNS:
            array = batch[column].combine_chunks()
            digest.update(pc.list_value_length(array).to_numpy(zero_copy_only=False).tobytes())
            digest.update(pc.list_flatten(array).to_numpy(zero_copy_only=False).tobytes())
    return digest.hexdigest()


def reference_fingerprint(model_args, model, dataset, data_args, dtype: torch.dtype) -> str:
    identity = {
        "model": model_identity(model_args, model),
        "data": dataset_token_hash(dataset),
        "max_length": data_args.max_length,
        "truncation_mode": data_args.truncation_mode,
        "dtype": str(dtype),
        "attn_implementation": model.config._attn_implementation,
    }
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:32]


# -------------------------------------------------------------------------------------------- scoring

def length_sorted_batches(dataset, batch_size: int) -> list[list[int]]:
    """Row indices in batches of similar length (longest first), so little compute goes to padding."""
    lengths = [len(p) + max(len(c), len(r)) for p, c, r in
               zip(dataset["prompt_input_ids"], dataset["chosen_input_ids"], dataset["rejected_input_ids"])]
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    return [order[start:start + batch_size] for start in range(0, len(order), batch_size)]


@torch.no_grad()
def score_dataset(model, dataset, collator, batch_size: int, dtype: torch.dtype = torch.float32,
                  desc: str = "reference log-probs"):
    """(chosen_logps, rejected_logps), float32 tensors of shape [len(dataset)], in dataset order.

    `dtype` other than float32 scores under autocast, as mixed-precision training computes the policy."""
    state = PartialState()
    device = state.device
    model.eval()
    all_batches = length_sorted_batches(dataset, batch_size)
    my_batches = all_batches[state.process_index::state.num_processes]  # round-robin keeps ranks balanced
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
    indices, chosen, rejected = [], [], []
    for batch_indices in tqdm(my_batches, desc=desc, disable=not state.is_local_main_process):
        batch = {key: value.to(device) for key, value in collator([dataset[i] for i in batch_indices]).items()}
        with autocast:
            sums, _, _ = model_logps(model, batch)
        chosen_sums, rejected_sums = sums.float().cpu().chunk(2)
        indices += batch_indices
        chosen += chosen_sums.tolist()
        rejected += rejected_sums.tolist()
    if state.num_processes > 1:
        shards = [None] * state.num_processes
        dist.all_gather_object(shards, (indices, chosen, rejected))
        indices, chosen, rejected = ([x for shard in shards for x in shard[k]] for k in range(3))
    chosen_logps = torch.empty(len(dataset))
    rejected_logps = torch.empty(len(dataset))
    chosen_logps[indices] = torch.tensor(chosen)
    rejected_logps[indices] = torch.tensor(rejected)
    return chosen_logps, rejected_logps


# ---------------------------------------------------------------------------------------------- cache

def add_reference_logps(dataset, model, collator, *, fingerprint: str, cache_dir: str, batch_size: int, split: str,
                        dtype: torch.dtype = torch.float32):
    """`dataset` plus columns ref_chosen_logps / ref_rejected_logps, loaded from the cache or computed and saved."""
    state = PartialState()
    path = os.path.join(cache_dir, f"{fingerprint}.safetensors")
    state.wait_for_everyone()  # no rank may look while the main process is still writing a previous file
    if os.path.exists(path):
        tensors = load_file(path)
        logger.info("reference log-probs (%s): loaded from cache %s", split, path)
    else:
        chosen, rejected = score_dataset(model, dataset, collator, batch_size, dtype,
                                         desc=f"reference log-probs ({split})")
        tensors = {"ref_chosen_logps": chosen, "ref_rejected_logps": rejected}
        if state.is_main_process:
            os.makedirs(cache_dir, exist_ok=True)
            tmp_path = f"{path}.tmp{os.getpid()}"
            save_file(tensors, tmp_path, metadata={"fingerprint": fingerprint, "rows": str(len(dataset))})
            os.replace(tmp_path, path)  # atomic: readers see the whole file or none
            logger.info("reference log-probs (%s): computed for %d pairs, saved to cache %s", split, len(dataset), path)
    for column in REF_COLUMNS:
        if column in dataset.column_names:
            dataset = dataset.remove_columns(column)
        dataset = dataset.add_column(column, tensors[column].tolist())
    return dataset


def add_reference_columns(model, dataset_dict, collator, *, model_args, data_args, device, cache_dir: str,
                          batch_size: int, dtype: torch.dtype = torch.float32):
    """Every split of `dataset_dict` with its reference log-prob columns, scored by the initial `model`
    (with LoRA: the base model under it, adapters disabled) at the training's precision `dtype`."""
    model.to(device)
    reference = model.disable_adapter() if isinstance(model, PeftModel) else contextlib.nullcontext()
    with reference:
        for split in dataset_dict:
            fingerprint = reference_fingerprint(model_args, model, dataset_dict[split], data_args, dtype)
            dataset_dict[split] = add_reference_logps(dataset_dict[split], model, collator, fingerprint=fingerprint,
                                                      cache_dir=cache_dir, batch_size=batch_size, split=split,
                                                      dtype=dtype)
    return dataset_dict
