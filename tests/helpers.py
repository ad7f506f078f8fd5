"""Independent reference computations shared by tests (plain transformers, no project code paths)."""

import torch


def loop_logps(model, prompt_ids: list[int], completion_ids: list[int]) -> float:
    """One unpadded sequence through the model; the sum of its completion tokens' log-probs, in float64."""
    ids = torch.tensor([prompt_ids + completion_ids])
    with torch.no_grad():
        logprobs = torch.log_softmax(model(ids).logits[0].double(), dim=-1)
    return sum(logprobs[t - 1, ids[0, t]].item() for t in range(len(prompt_ids), ids.shape[1]))


def add_reference_columns(model, dataset_dict, collator, *, model_args, data_args, cache_dir: str, batch_size: int,
                          dtype: torch.dtype = torch.float32):
    """Every split of `dataset_dict` with reference columns scored by `model` on one process, through the cache: the
    reference module's public steps, without a Trainer (which scores through the engine's wrapped model)."""
    from utils import reference

    with reference.reference_mode(model):
        for split, dataset in dataset_dict.items():
            fingerprint = reference.reference_fingerprint(model_args, model, dataset, data_args, dtype)
            cached = reference.load_cached_logps(dataset, fingerprint=fingerprint, cache_dir=cache_dir, split=split)
            dataset_dict[split] = cached if cached is not None else reference.score_and_cache(
                dataset, model, collator, fingerprint=fingerprint, cache_dir=cache_dir, batch_size=batch_size,
                split=split, dtype=dtype)
    return dataset_dict
