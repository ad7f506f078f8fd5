"""--dry_run: the run before the run. The data is loaded and tokenised exactly as training loads it (the same
`load_preference_data`, the same row policy), the reference cache is looked up under the fingerprint training
would use, and the memory of a step is estimated from a meta-device model (no weights). One report is printed;
nothing is trained, scored or written (the `datasets` cache aside, which training would write the same way).
"""

import os

import numpy as np
import pyarrow.compute as pc
from accelerate import PartialState

from utils.data import DROP_REASONS, load_preference_data
from utils.losses import uses_reference
from utils.memory import estimate_peak_memory
from utils.modeling import apply_lora, load_model, load_tokenizer
from utils.precision import compute_dtype
from utils.reference import default_cache_dir, load_cache, reference_fingerprint

PERCENTILES = (50, 90, 99, 100)


def percentiles(values: np.ndarray) -> str:
    if len(values) == 0:
        return "none"
    return " / ".join(str(int(np.percentile(values, q, method="higher"))) for q in PERCENTILES)


def row_report(tally, max_length: int) -> list[str]:
    """Kept and dropped pairs of one source split (the row policy's own counts), token lengths before truncation
    and how many pairs truncation cut, per side."""
    kept = len(tally.lengths)
    lines = [f"{tally.source}: {kept} of {tally.total} pairs kept"]
    for reason, rows in tally.dropped.items():
        if len(rows):
            why = DROP_REASONS[reason][0].format(max_length=max_length)
            lines.append(f"  dropped {len(rows)} {why}: {tally.source.rows(rows)}")
    if len(tally.empty):
        lines.append(f"  {len(tally.empty)} kept with an empty answer (eos only): {tally.source.rows(tally.empty)}")
    full, cut = tally.untruncated_lengths, tally.untruncated_lengths > tally.lengths
    completions = np.concatenate([full[:, 1], full[:, 2]])
    lines.append(f"  tokens before truncation, p50 / p90 / p99 / max: prompt {percentiles(full[:, 0])}, "
                 f"completion {percentiles(completions)}, total {percentiles(full[:, 0] + full[:, 1:].max(1))}")
    lines.append(f"  pairs truncation cut: prompt {int(cut[:, 0].sum())}, chosen {int(cut[:, 1].sum())}, "
                 f"rejected {int(cut[:, 2].sum())} (max_length {max_length})")
    return lines


def micro_batches(dataset, batch_size: int, seed: int) -> list[tuple[int, int, int, int]]:
    """(padded tokens, real tokens, completion tokens, longest sequence) of each micro-batch of one epoch in a
    shuffled order (the Trainer's sampler shuffles too): chosen and rejected of B pairs as 2B rows."""
    table = dataset.select_columns(["prompt_input_ids", "chosen_input_ids", "rejected_input_ids"]).with_format(
        "arrow")[:]
    prompt, chosen, rejected = (pc.list_value_length(column).to_numpy() for column in table.columns)
    order = np.random.default_rng(seed).permutation(len(prompt))
    batches = []
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        lengths = np.concatenate([prompt[rows] + chosen[rows], prompt[rows] + rejected[rows]])
        completion = int(chosen[rows].sum() + rejected[rows].sum())
        batches.append((int(lengths.max()) * len(lengths), int(lengths.sum()), completion, int(lengths.max())))
    return batches


def step_report(batches, args, world_size: int) -> list[str]:
    per_step = args.gradient_accumulation_steps * world_size
    padded, real = (np.array([batch[i] for batch in batches]) for i in (0, 1))
    steps = max(len(batches) // per_step, 1)
    used = "packed" if args.padding_free else "padded"
    return [f"tokens per optimizer step ({args.per_device_train_batch_size} pairs x {args.gradient_accumulation_steps}"
            f" accumulation x {world_size} process(es), {steps} steps per epoch; this run: {used} rows):",
            f"  padded rows: {padded.sum() / steps:.0f} tokens, {1 - real.sum() / padded.sum():.1%} of them padding",
            f"  packed rows: {real.sum() / steps:.0f} tokens, no padding"]


def reference_report(model_args, data_args, args, model, dataset) -> list[str]:
    """Per split: whether training would find its reference log-probs in the cache (the fingerprint it would use)."""
    if args.reference_free or not uses_reference(args.loss_type):
        return ["reference: none is scored for this loss"]
    if not args.precompute_ref_log_probs:
        return ["reference: scored every step (--precompute_ref_log_probs false): no cache"]
    cache_dir = args.ref_logps_cache_dir or default_cache_dir()
    lines = []
    for split, rows in dataset.items():
        name = "train" if split == "train" else "eval"
        fingerprint = reference_fingerprint(model_args, model, rows, data_args, compute_dtype(args))
        path = os.path.join(cache_dir, f"{fingerprint}.safetensors")
        _, why = load_cache(path, fingerprint, len(rows))
        lines.append(f"reference log-probs ({name}): " + ("cache hit" if not why else f"cache miss ({why}), "
                     f"{len(rows)} pairs would be scored") + f": {path}")
    return lines


def dry_run_report(model_args, data_args, args) -> str:
    """The report of --dry_run (see the module docstring)."""
    world_size = PartialState().num_processes
    tokenizer = load_tokenizer(model_args)
    tallies = []
    dataset = load_preference_data(data_args, tokenizer, tallies=tallies)
    lines = ["dry run: nothing trained, scored or written", "rows per source split:"]
    for tally in tallies:
        lines += ["  " + line for line in row_report(tally, data_args.max_length)]
    lines.append("splits: " + ", ".join(f"{split} {len(rows)} pairs" for split, rows in dataset.items()))
    batches = micro_batches(dataset["train"], args.per_device_train_batch_size, args.seed)
    lines += step_report(batches, args, world_size)

    model = load_model(model_args, tokenizer, packed=args.padding_free, autocast_dtype=compute_dtype(args), meta=True)
    if model_args.use_peft:
        model = apply_lora(model, model_args)
    model.config.use_cache = args.use_cache  # as the Trainer sets it before the fingerprint is taken
    lines += reference_report(model_args, data_args, args, model, dataset)
    index = 1 if args.padding_free else 0  # the largest micro-batch as this run collates it
    largest = max(batches, key=lambda batch: batch[index])
    frozen_reference = (not args.precompute_ref_log_probs and not args.reference_free
                        and uses_reference(args.loss_type) and not model_args.use_peft)
    estimate, engine = estimate_peak_memory(model, args, tokens=largest[index], completion_tokens=largest[2],
                                            sequence_length=largest[3], world_size=world_size,
                                            frozen_reference=frozen_reference)
    parameters = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    lines.append(f"peak memory per device, estimated ({engine}; {parameters / 1e6:.1f}M parameters, "
                 f"{trainable / 1e6:.1f}M trainable, {model.dtype}, compute {compute_dtype(args)}, largest "
                 f"micro-batch {largest[index]} tokens; formula: docs/scaling.md):")
    lines.append("  " + estimate.line())
    return "\n".join(lines)
