"""DPO training speed and memory: this toolkit against the installed TRL's DPOTrainer.

    .venv/bin/python bench/bench_dpo.py                    # the full comparison (~10 minutes on 2 CPU cores)
    .venv/bin/python bench/bench_dpo.py --quick            # a smoke run on the tiny preset
    python3 bench/bench_dpo.py --preset mixtral-1b --pair_lengths real --batch_size 16 --precision bf16   # GPU

Each configuration runs in its own process (fresh memory high-water mark, fresh caches) on the same
model weights, pairs, batch size, max_length, steps, threads and precision, and prints one JSON
line; this driver prints the table and, last, a machine-readable line:
    speedup_vs_trl=<x> speedup_vs_trl_precompute=<y> peak_rss_ratio=<z>
(ours with padding-free against TRL's defaults, against TRL with precompute_ref_log_probs, and
ours' peak resident memory over TRL default's.)
"""

import argparse
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

CONFIGS = {  # name -> (implementation, options)
    "trl": ("trl", {"precompute": False}),
    "trl_precompute": ("trl", {"precompute": True}),
    "ours_padded": ("ours", {"padding_free": False}),
    "ours_padding_free": ("ours", {"padding_free": True}),
}


def parse():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny preset, few steps: a smoke test")
    parser.add_argument("--preset", default="mixtral-small")
    parser.add_argument("--steps", type=int, default=12, help="timed training steps (after --warmup)")
    parser.add_argument("--warmup", type=int, default=2, help="steps left out of the timing")
    parser.add_argument("--batch_size", type=int, default=8, help="pairs per step")
    parser.add_argument("--max_length", type=int, default=256)
    parser.add_argument("--pair_lengths", choices=["toy", "real"], default="toy",
                        help="toy: prompts of 1-4 sentences, completions of 1-8 (~10-60 tokens); real: UltraFeedback's "
                             "lengths, prompts of ~150-250 tokens and completions of ~150-300 (needs --max_length >= "
                             "550)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated subset of " + ",".join(CONFIGS))
    parser.add_argument("--profile", action="store_true", help="print the PyTorch profiler's top ops per config")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help="prepare the checkpoint and pairs here, or reuse those an earlier run with the "
                                          "same --preset, --pair_lengths, --steps, --warmup and --batch_size left")
    args = parser.parse_args()
    if args.quick:
        args.preset, args.steps, args.warmup, args.batch_size, args.max_length = "mixtral-tiny", 3, 1, 4, 128
    return args


# ------------------------------------------------------------------------------------------- the setup

def variable_length_pairs(num_pairs: int, seed: int = 0) -> list[dict]:
    """Toy pairs with prompts of 1-4 sentences and completions of 1-8: real data's length spread."""
    from utils import toy_task

    rng = random.Random(seed)
    pairs = []
    for _ in range(num_pairs):
        prompt = toy_task.make_opening(rng) + toy_task.make_continuation(rng, num_sentences=rng.randint(0, 3))
        chosen, rejected = (toy_task.make_continuation(rng, "positive", rng.randint(1, 8)),
                            toy_task.make_continuation(rng, "negative", rng.randint(1, 8)))
        pairs.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    return pairs


def real_length_pairs(num_pairs: int, tokenizer, seed: int = 0) -> list[dict]:
    """Toy pairs with real data's lengths (UltraFeedback's): prompts of ~150-250 tokens, completions of ~150-300."""
    from utils import toy_task

    rng = random.Random(seed)

    def text(tokens: int, sentiment: str | None = None, start: str = "") -> str:
        while tokens > 0:  # a sentence's tokens counted alone: close enough to its count in context
            sentence = toy_task.make_continuation(rng, sentiment, 1)
            start, tokens = start + sentence, tokens - len(tokenizer(sentence)["input_ids"])
        return start

    return [{"prompt": text(rng.randint(150, 250), start=toy_task.make_opening(rng)),
             "chosen": text(rng.randint(150, 300), "positive"), "rejected": text(rng.randint(150, 300), "negative")}
            for _ in range(num_pairs)]


def prepare(args, workdir: str) -> str:
    """The shared inputs: one checkpoint folder and one JSONL file of pairs. Returns a line describing the model."""
    from utils.modeling import ModelArguments, load_model, load_tokenizer

    model_args = ModelArguments(model_name_or_path=args.preset)
    tokenizer = load_tokenizer(model_args)
    model = load_model(model_args, tokenizer)
    model.save_pretrained(os.path.join(workdir, "model"))
    tokenizer.save_pretrained(os.path.join(workdir, "model"))
    described = (f"preset {args.preset}: {model.num_parameters() / 1e6:.1f}M parameters, {model.config.num_hidden_layers}"
                 f" layers of hidden {model.config.hidden_size}, vocab {model.config.vocab_size}")
    num_pairs = (args.steps + args.warmup) * args.batch_size
    pairs = real_length_pairs(num_pairs, tokenizer) if args.pair_lengths == "real" else variable_length_pairs(num_pairs)
    with open(os.path.join(workdir, "pairs.jsonl"), "w") as f:
        for pair in pairs:
            f.write(json.dumps(pair) + "\n")
    with open(os.path.join(workdir, "model.txt"), "w") as f:  # written last: the folder is complete
        f.write(described)
    return described


def device():
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def matmul_peak_gflops(dtype_name: str, repeats: int = 10) -> float:
    """Measured peak of this machine for the precision used: a square matmul, best of `repeats`."""
    import torch

    dtype = torch.bfloat16 if dtype_name == "bf16" else torch.float32
    size = 8192 if device().type == "cuda" else 2048
    a, b = torch.randn(size, size, dtype=dtype, device=device()), torch.randn(size, size, dtype=dtype, device=device())
    best = float("inf")
    for _ in range(repeats + 1):  # the first call warms up
        start = time.perf_counter()
        torch.mm(a, b)
        if device().type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return 2 * size ** 3 / best / 1e9


def flops_per_token(config) -> tuple[float, float]:
    """Forward FLOPs per token of the active weights: (body: attention projections, top-k experts, router;
    output layer)."""
    h, kv = config.hidden_size, config.num_key_value_heads * (config.hidden_size // config.num_attention_heads)
    attention = 2 * h * (2 * h + 2 * kv)
    experts = config.num_experts_per_tok * 3 * 2 * h * config.intermediate_size + 2 * h * config.num_local_experts
    return config.num_hidden_layers * (attention + experts), 2 * h * config.vocab_size


def attention_score_flops(config, sequence_length: int) -> float:
    """Forward FLOPs of one sequence's causal attention scores and weighted sum (QK^T and AV, half the square)."""
    return config.num_hidden_layers * 2 * 2 * sequence_length ** 2 / 2 * config.hidden_size


# ------------------------------------------------------------------------------------------ one worker

class Phases:
    """Times (and with --profile profiles) the two phases of a run: the reference scoring, wherever the
    trainer does it, and the training steps."""

    def __init__(self, profile: bool):
        from transformers import TrainerCallback

        self.profile, self.steps, self.scoring_seconds, self.profiler = profile, [], 0.0, None
        phases = self

        class Callback(TrainerCallback):
            def on_train_begin(self, *args, **kwargs):  # after the model is prepared (and ours has scored)
                phases.profiler = start_profiler() if profile else None

            def on_step_begin(self, *args, **kwargs):
                phases.start = time.perf_counter()

            def on_step_end(self, *args, **kwargs):
                phases.steps.append(time.perf_counter() - phases.start)

            def on_train_end(self, *args, **kwargs):
                if phases.profiler is not None:
                    print_profile(phases.profiler, "training")

        self.callback = Callback()

    def time_scoring(self, cls, method: str) -> None:
        """Make `cls.method`, the trainer's reference scoring, count (and be profiled) as the scoring phase."""
        original = getattr(cls, method)
        phases = self

        def timed(trainer, *args, **kwargs):
            profiler = start_profiler() if phases.profile else None
            start = time.perf_counter()
            result = original(trainer, *args, **kwargs)
            phases.scoring_seconds += time.perf_counter() - start
            if profiler is not None:
                print_profile(profiler, "reference scoring")
            return result

        setattr(cls, method, timed)


def start_profiler():
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device().type == "cuda" else [])
    profiler = profile(activities=activities)
    profiler.start()
    return profiler


def print_profile(profiler, phase: str) -> None:
    """The PyTorch profiler's top ops of one phase (by device time on a GPU), printed to stderr (the driver shows
    them)."""
    profiler.stop()
    sort_by = "self_device_time_total" if device().type == "cuda" else "self_cpu_time_total"
    print(f"[{phase}]\n" + profiler.key_averages().table(sort_by=sort_by, row_limit=15), file=sys.stderr)


def run_worker(args, name: str, workdir: str) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    implementation, options = CONFIGS[name]
    model_dir, data_file = os.path.join(workdir, "model"), os.path.join(workdir, "pairs.jsonl")
    common = dict(output_dir=os.path.join(workdir, name), per_device_train_batch_size=args.batch_size,
                  max_steps=args.steps + args.warmup, learning_rate=1e-6, bf16=args.precision == "bf16",
                  logging_steps=10 ** 6, save_strategy="no", report_to="none", disable_tqdm=True,
                  dataloader_pin_memory=False, seed=0, use_cpu=device().type == "cpu")  # bf16 on CPU needs use_cpu
    phases = Phases(args.profile)
    build = build_ours if implementation == "ours" else build_trl
    trainer = build(args, options, model_dir, data_file, common, phases)
    trainer.train()
    scored = implementation == "ours" or options["precompute"]
    ref_seconds = phases.scoring_seconds if scored else None
    timed = phases.steps[args.warmup:]
    prefix = "" if implementation == "trl" else "input_"
    columns = [trainer.train_dataset[f"{side}_{prefix}ids"] for side in ("prompt", "chosen", "rejected")]
    pairs = len(columns[0])
    tokens_per_step = sum(2 * len(p) + len(c) + len(r) for p, c, r in zip(*columns)) / pairs * args.batch_size
    completion_tokens_per_step = sum(len(c) + len(r) for _, c, r in zip(*columns)) / pairs * args.batch_size
    median_step = statistics.median(timed)
    # Model FLOPs: the work the math needs, whoever does more (the output layer is needed on completion
    # tokens only, attention within each sequence); forward + backward = 3 forwards, plus a reference forward
    # per step where it runs then.
    config = trainer.model.config
    body, head = flops_per_token(config)
    score_flops_per_step = sum(attention_score_flops(config, len(p) + len(c)) + attention_score_flops(
        config, len(p) + len(r)) for p, c, r in zip(*columns)) / pairs * args.batch_size
    forward_flops = body * tokens_per_step + head * completion_tokens_per_step + score_flops_per_step
    step_flops = (3 + (0 if scored else 1)) * forward_flops
    # Scoring is one forward over every pair: the same model FLOPs per pair as a step's forward.
    scoring_gflops = forward_flops / args.batch_size * pairs / ref_seconds / 1e9 if scored else None
    return {"config": name, "tokens_per_second": tokens_per_step / median_step, "median_step_s": median_step,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "peak_gpu_mb": torch.cuda.max_memory_allocated() / 2 ** 20 if torch.cuda.is_available() else None,
            "ref_scoring_s": ref_seconds, "scoring_gflops": scoring_gflops,
            "achieved_gflops": step_flops / median_step / 1e9}


def build_ours(args, options, model_dir, data_file, common, phases):
    """train_dpo.py's DPOTrainer as the script builds it: it scores the reference inside train(), once
    accelerate has prepared the model, into an empty cache (a real scoring)."""
    from train_dpo import DPOArguments, DPOTrainer
    from utils.data import DataArguments, PreferenceCollator, load_preference_data
    from utils.modeling import ModelArguments, load_model, load_tokenizer

    model_args = ModelArguments(model_name_or_path=model_dir)
    data_args = DataArguments(dataset_name=data_file, max_length=args.max_length)
    tokenizer = load_tokenizer(model_args)
    model = load_model(model_args, tokenizer, packed=options["padding_free"])
    collator = PreferenceCollator(tokenizer.pad_token_id, padding_free=options["padding_free"])
    dataset = load_preference_data(data_args, tokenizer)
    phases.time_scoring(DPOTrainer, "score_reference")
    os.makedirs(common["output_dir"], exist_ok=True)
    dpo_args = DPOArguments(padding_free=options["padding_free"], precompute_ref_batch_size=4 * args.batch_size,
                            ref_logps_cache_dir=tempfile.mkdtemp(dir=common["output_dir"]), **common)
    return DPOTrainer(model=model, args=dpo_args, train_dataset=dataset["train"], data_collator=collator,
                      processing_class=tokenizer, callbacks=[phases.callback], model_args=model_args,
                      data_args=data_args)


def build_trl(args, options, model_dir, data_file, common, phases):
    import datasets
    from transformers import AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    phases.time_scoring(DPOTrainer, "_precompute_ref_logps")  # runs inside DPOTrainer.__init__
    config = DPOConfig(precompute_ref_log_probs=options["precompute"], precompute_ref_batch_size=4 * args.batch_size,
                       max_length=args.max_length, gradient_checkpointing=False, **common)
    return DPOTrainer(model=model_dir, args=config, processing_class=AutoTokenizer.from_pretrained(model_dir),
                      train_dataset=datasets.load_dataset("json", data_files=data_file)["train"],
                      callbacks=[phases.callback])


# ---------------------------------------------------------------------------------------------- driver

def main():
    args = parse()
    if args.worker:
        print("RESULT " + json.dumps(run_worker(args, args.worker, args.workdir)))
        return
    workdir = args.workdir or tempfile.mkdtemp(prefix="bench_dpo_")
    os.makedirs(workdir, exist_ok=True)
    if os.path.exists(os.path.join(workdir, "model.txt")):
        with open(os.path.join(workdir, "model.txt")) as f:
            described = f.read()
    else:
        described = prepare(args, workdir)
    peak = matmul_peak_gflops(args.precision)
    print(f"{described}; {args.batch_size} pairs/step of {args.pair_lengths} lengths, max_length {args.max_length}, "
          f"{args.steps} timed steps, {args.threads} threads, {args.precision}; measured {args.precision} matmul "
          f"peak {peak:.0f} GFLOP/s", flush=True)
    results, failed = {}, []
    for name in args.configs.split(","):
        env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), TQDM_DISABLE="1",
                   HF_DATASETS_CACHE=os.path.join(workdir, f"datasets_cache_{name}"))
        command = [sys.executable, os.path.abspath(__file__), "--worker", name, "--workdir", workdir,
                   *[arg for arg in sys.argv[1:] if arg != "--worker"]]
        output = subprocess.run(command, env=env, capture_output=True, text=True)
        if output.returncode != 0:  # the other configurations still run (e.g. one that runs out of GPU memory)
            print(f"{name} failed:\n{output.stderr[-4000:]}", flush=True)
            failed.append(name)
            continue
        if args.profile:
            print(f"--- profile: {name}\n{output.stderr[-12000:]}")
        line = next(line for line in output.stdout.splitlines() if line.startswith("RESULT "))
        results[name] = json.loads(line[len("RESULT "):])

    print(f"\n| config | tokens/s | median s/step | peak RSS MB | peak GPU MB | ref scoring s | MFU ({args.precision}) "
          f"| ref scoring MFU |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name, r in results.items():
        scored = r["ref_scoring_s"] is not None
        ref = f"{r['ref_scoring_s']:.1f}" if scored else "every step"
        ref_mfu = f"{100 * r['scoring_gflops'] / peak:.1f}%" if scored else "-"
        gpu = f"{r['peak_gpu_mb']:.0f}" if r["peak_gpu_mb"] is not None else "-"
        print(f"| {name} | {r['tokens_per_second']:.0f} | {r['median_step_s']:.3f} | {r['peak_rss_mb']:.0f} | {gpu} | "
              f"{ref} | {100 * r['achieved_gflops'] / peak:.1f}% | {ref_mfu} |")
    ours = results.get("ours_padding_free") or results.get("ours_padded")
    ratios = {}
    if ours and "trl" in results:
        ratios["speedup_vs_trl"] = ours["tokens_per_second"] / results["trl"]["tokens_per_second"]
        ratios["peak_rss_ratio"] = ours["peak_rss_mb"] / results["trl"]["peak_rss_mb"]
    if ours and "trl_precompute" in results:
        ratios["speedup_vs_trl_precompute"] = ours["tokens_per_second"] / results["trl_precompute"]["tokens_per_second"]
        ratios["ref_scoring_speedup"] = results["trl_precompute"]["ref_scoring_s"] / ours["ref_scoring_s"]
        if ours["peak_gpu_mb"] is not None:
            ratios["peak_gpu_ratio"] = ours["peak_gpu_mb"] / results["trl_precompute"]["peak_gpu_mb"]
    if "ref_scoring_speedup" in ratios:
        print(f"\nreference scoring: {ratios['ref_scoring_speedup']:.2f}x faster than TRL's precompute step")
    print("\n" + " ".join(f"{key}={ratios[key]:.2f}" for key in
                          ("speedup_vs_trl", "speedup_vs_trl_precompute", "peak_rss_ratio", "peak_gpu_ratio")
                          if key in ratios), flush=True)
    if failed:
        sys.exit(f"failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
