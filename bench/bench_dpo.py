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
import math
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
    parser.add_argument("--preset", default="mixtral-small", help="a utils/modeling.py preset, or smollm2-135m-shape "
                                                                       "(DENSE_SHAPES)")
    parser.add_argument("--steps", type=int, default=12, help="timed training steps (after --warmup)")
    parser.add_argument("--warmup", type=int, default=2, help="steps left out of the timing")
    parser.add_argument("--batch_size", type=int, default=8, help="pairs per step")
    parser.add_argument("--max_length", type=int, default=256)
    parser.add_argument("--model_name_or_path", help="a checkpoint folder to train instead of --preset's fresh model "
                                                     "(e.g. SmolLM2-135M-Instruct, bench/real_checkpoint.py)")
    parser.add_argument("--pair_lengths", default="toy",
                        help="toy: prompts of 1-4 sentences, completions of 1-8 (~10-60 tokens); real: UltraFeedback's "
                             "typical lengths, prompts of ~150-250 tokens and completions of ~150-300 (needs "
                             "--max_length >= 550); hh, ultrafeedback: those sets' length distributions (PAIR_LENGTHS), "
                             "answers cut to fit --max_length; length:L, ~L tokens a sequence (what --lengths runs)")
    parser.add_argument("--lengths", help="a sweep, e.g. 256,512,1024,2048,4096: per length L, pairs whose sequences "
                                          "are ~L tokens (max_length L), TRL's precompute and ours padded and packed")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated subset of " + ",".join(CONFIGS))
    parser.add_argument("--count_flops", action="store_true",
                        help="count the FLOPs of the first step's and the scoring's matmuls (PyTorch's FLOP counter) "
                             "against the needed work; slows the counted step")
    parser.add_argument("--torch_compile", action="store_true", help="both trainers with the Trainer's torch_compile")
    parser.add_argument("--profile", action="store_true", help="print the PyTorch profiler's top ops per config")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help="prepare the checkpoint and pairs here, or reuse those an earlier run with the "
                                          "same --preset, --pair_lengths, --steps, --warmup and --batch_size left")
    args = parser.parse_args()
    if args.pair_lengths not in ("toy", *PAIR_LENGTHS) and not args.pair_lengths.startswith("length:"):
        parser.error(f"--pair_lengths: one of toy, {', '.join(PAIR_LENGTHS)}, length:L")
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


def _lognormal(rng: random.Random, median: float, sigma: float, low: int, high: int) -> int:
    return min(high, max(low, round(rng.lognormvariate(math.log(median), sigma))))


# name -> rng -> (turns of the prompt, its tokens, chosen's tokens, rejected's tokens)
PAIR_LENGTHS = {
    # UltraFeedback's typical lengths, uniform: prompts ~150-250 tokens, completions ~150-300
    "real": lambda rng: (1, rng.randint(150, 250), rng.randint(150, 300), rng.randint(150, 300)),
    # Anthropic HH-RLHF: 1-4 Human/Assistant turns of ~50-400 tokens in all (median ~140), answers ~10-200 (median ~60)
    "hh": lambda rng: (rng.randint(1, 4), _lognormal(rng, 140, 0.6, 50, 400),
                       *(_lognormal(rng, 60, 0.8, 10, 200) for _ in range(2))),
    # UltraFeedback: one instruction (median ~120 tokens, long tail), answers of median ~250, up to ~700
    "ultrafeedback": lambda rng: (1, _lognormal(rng, 120, 0.8, 15, 600),
                                  *(_lognormal(rng, 250, 0.6, 30, 700) for _ in range(2))),
}


def real_length_pairs(num_pairs: int, tokenizer, kind: str = "real", max_length: int | None = None,
                      seed: int = 0) -> list[dict]:
    """Toy sentences at real data's lengths (`PAIR_LENGTHS[kind]`, or "length:L": every sequence ~0.9-1.0 L
    tokens, a quarter of them prompt). Answers are cut so that prompt + answer fits `max_length`: both trainers
    then see the same, untruncated tokens (they truncate differently)."""
    from utils import toy_task

    rng = random.Random(seed)

    def text(tokens: int, sentiment: str | None = None, start: str = "") -> str:
        while tokens > 0:  # a sentence's tokens counted alone: close enough to its count in context
            sentence = toy_task.make_continuation(rng, sentiment, 1)
            start, tokens = start + sentence, tokens - len(tokenizer(sentence)["input_ids"])
        return start

    if kind.startswith("length:"):
        length = int(kind.split(":")[1])
        draw = lambda rng: (1, length // 4, *(round(length * 3 / 4 * rng.uniform(0.85, 0.95)) for _ in range(2)))  # noqa: E731
    else:
        draw = PAIR_LENGTHS[kind]
    pairs = []
    for _ in range(num_pairs):
        turns, prompt_tokens, chosen_tokens, rejected_tokens = draw(rng)
        if turns == 1:
            prompt = text(prompt_tokens, start=toy_task.make_opening(rng))
        else:  # HH's raw format: alternating turns, ending where the assistant answers
            per_turn = prompt_tokens // (2 * turns - 1)
            prompt = "".join(f"\n\nHuman: {text(per_turn)}\n\nAssistant: {text(per_turn)}" for _ in range(turns - 1))
            prompt += f"\n\nHuman: {text(per_turn)}\n\nAssistant:"
        room = (max_length or 10 ** 9) - len(tokenizer(prompt)["input_ids"]) - 16  # eos; a sentence's overshoot
        pairs.append({"prompt": prompt, "chosen": " " + text(min(room, chosen_tokens), "positive"),
                      "rejected": " " + text(min(room, rejected_tokens), "negative")})
    return pairs


# SmolLM2-135M-Instruct's shapes (Llama, tied embeddings), for a machine without its checkpoint (the GPU's):
# the same FLOPs and memory, random weights, the mixtral-small preset's tokenizer (ids < the vocabulary)
DENSE_SHAPES = {"smollm2-135m-shape": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                                           num_attention_heads=9, num_key_value_heads=3, vocab_size=49152,
                                           tie_word_embeddings=True, max_position_embeddings=8192,
                                           rms_norm_eps=1e-5)}


def prepare(args, workdir: str) -> str:
    """The shared inputs: one checkpoint folder and one JSONL file of pairs. Returns a line describing the model."""
    from utils.modeling import ModelArguments, load_model, load_tokenizer

    if args.preset in DENSE_SHAPES and not args.model_name_or_path:  # random weights at a real model's shapes
        from transformers import LlamaConfig, LlamaForCausalLM

        tokenizer = load_tokenizer(ModelArguments(model_name_or_path="mixtral-small"))
        model = LlamaForCausalLM(LlamaConfig(**DENSE_SHAPES[args.preset], pad_token_id=tokenizer.pad_token_id,
                                             bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id))
    else:
        model_args = ModelArguments(model_name_or_path=args.model_name_or_path or args.preset)
        tokenizer = load_tokenizer(model_args)
        model = load_model(model_args, tokenizer)
    if not args.model_name_or_path:
        model.save_pretrained(os.path.join(workdir, "model"))
        tokenizer.save_pretrained(os.path.join(workdir, "model"))
    described = (f"{args.model_name_or_path or 'preset ' + args.preset}: {model.num_parameters() / 1e6:.1f}M parameters, "
                 f"{model.config.num_hidden_layers} layers of hidden {model.config.hidden_size}, vocab "
                 f"{model.config.vocab_size}")
    num_pairs = (args.steps + args.warmup) * args.batch_size
    pairs = (variable_length_pairs(num_pairs) if args.pair_lengths == "toy" else
             real_length_pairs(num_pairs, tokenizer, args.pair_lengths, args.max_length))
    with open(os.path.join(workdir, "pairs.jsonl"), "w") as f:
        for pair in pairs:
            f.write(json.dumps(pair) + "\n")
    with open(os.path.join(workdir, "model.txt"), "w") as f:  # written last: the folder is complete
        f.write(described)
    return described


def device():
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def matmul_peak_gflops(dtype_name: str) -> float:
    """Measured peak of this machine for the precision used (utils/speed.py's, as the training logs use)."""
    import torch

    from utils.speed import matmul_peak_flops

    return matmul_peak_flops(device(), torch.bfloat16 if dtype_name == "bf16" else torch.float32) / 1e9


# ------------------------------------------------------------------------------------------ one worker

class Phases:
    """Times (and with --profile profiles) the two phases of a run: the reference scoring, wherever the
    trainer does it, and the training steps."""

    def __init__(self, profile: bool, count_flops: bool = False):
        from transformers import TrainerCallback

        self.profile, self.steps, self.scoring_seconds, self.profiler = profile, [], 0.0, None
        self.count_flops, self.counted = count_flops, {}  # phase -> {module: GFLOP} of the matmuls that ran
        phases = self

        class Callback(TrainerCallback):
            def on_train_begin(self, *args, **kwargs):  # after the model is prepared (and ours has scored)
                phases.profiler = start_profiler() if profile else None

            def on_step_begin(self, *args, **kwargs):
                if count_flops and "training step" not in phases.counted:  # the first step's
                    phases.counter = start_flop_counter()
                phases.start = time.perf_counter()

            def on_step_end(self, *args, **kwargs):
                phases.steps.append(time.perf_counter() - phases.start)
                if count_flops and "training step" not in phases.counted:
                    phases.counted["training step"] = stop_flop_counter(phases.counter)

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
            counter = start_flop_counter() if phases.count_flops else None
            start = time.perf_counter()
            result = original(trainer, *args, **kwargs)
            phases.scoring_seconds += time.perf_counter() - start
            if counter is not None:
                phases.counted["reference scoring"] = stop_flop_counter(counter)
            if profiler is not None:
                print_profile(profiler, "reference scoring")
            return result

        setattr(cls, method, timed)


def start_flop_counter():
    """PyTorch's FLOP counter: what the matmuls (and attention kernels it knows) actually compute, by module."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    counter.__enter__()
    return counter


def stop_flop_counter(counter) -> dict:
    counter.__exit__(None, None, None)
    counts = counter.get_flop_counts()  # {"Global": {op: flops}, "Model.layer...": {op: flops}, ...}
    return {module: sum(ops.values()) / 1e9 for module, ops in counts.items() if module.count(".") <= 2}


def start_profiler():
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device().type == "cuda" else [])
    profiler = profile(activities=activities, record_shapes=True, profile_memory=True)
    profiler.start()
    return profiler


def print_profile(profiler, phase: str) -> None:
    """The PyTorch profiler's top ops of one phase (by device time on a GPU), printed to stderr (the driver shows
    them)."""
    profiler.stop()
    sort_by = "self_device_time_total" if device().type == "cuda" else "self_cpu_time_total"
    print(f"[{phase}]\n" + profiler.key_averages().table(sort_by=sort_by, row_limit=15), file=sys.stderr)
    # which matmuls: the top ones by input shapes (tokens x in @ in x out), and what each costs
    by_shape = [event for event in profiler.key_averages(group_by_input_shape=True) if event.key in ("aten::mm",
                                                                                                       "aten::addmm")]
    by_shape.sort(key=lambda event: -getattr(event, sort_by))
    print(f"[{phase}: matmuls by shape]", file=sys.stderr)
    for event in by_shape[:12]:
        print(f"  {event.key} {event.input_shapes} x{event.count} {getattr(event, sort_by) / 1e3:.0f} ms",
              file=sys.stderr)


def run_worker(args, name: str, workdir: str) -> dict:
    import torch

    from utils.speed import forward_flops

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    implementation, options = CONFIGS[name]
    model_dir = args.model_name_or_path or os.path.join(workdir, "model")
    data_file = os.path.join(workdir, "pairs.jsonl")
    common = dict(output_dir=os.path.join(workdir, name), per_device_train_batch_size=args.batch_size,
                  max_steps=args.steps + args.warmup, learning_rate=1e-6, bf16=args.precision == "bf16",
                  logging_steps=10 ** 6, save_strategy="no", report_to="none", disable_tqdm=True,
                  dataloader_pin_memory=False, seed=0, use_cpu=device().type == "cpu",  # bf16 on CPU needs use_cpu
                  train_sampling_strategy="sequential", torch_compile=args.torch_compile)  # the same pairs in the same batches, in both trainers
    phases = Phases(args.profile, args.count_flops)
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
    body, head, scores = forward_flops(trainer.model.config)
    squares_per_step = sum((len(p) + len(c)) ** 2 + (len(p) + len(r)) ** 2 for p, c, r in zip(*columns)) / pairs
    forward_flops_per_step = (body * tokens_per_step + head * completion_tokens_per_step
                              + scores * squares_per_step * args.batch_size)
    step_flops = (3 + (0 if scored else 1)) * forward_flops_per_step
    # Scoring is one forward over every pair: the same model FLOPs per pair as a step's forward.
    scoring_gflops = forward_flops_per_step / args.batch_size * pairs / ref_seconds / 1e9 if scored else None
    return {"config": name, "tokens_per_second": tokens_per_step / median_step, "median_step_s": median_step,
            "counted_gflop": phases.counted, "needed_step_gflop": 3 * forward_flops_per_step / 1e9,
            "needed_scoring_gflop": forward_flops_per_step / args.batch_size * pairs / 1e9,
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

def run_configs(args, workdir: str, configs: list[str], argv: list[str]) -> tuple[dict, list]:
    """Each configuration in its own process on the same inputs: {name: its result}, and the names that failed."""
    results, failed = {}, []
    for name in configs:
        env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), TQDM_DISABLE="1",
                   HF_DATASETS_CACHE=os.path.join(workdir, f"datasets_cache_{name}"))
        command = [sys.executable, os.path.abspath(__file__), *argv, "--worker", name, "--workdir", workdir]
        output = subprocess.run(command, env=env, capture_output=True, text=True)
        if output.returncode != 0:  # the other configurations still run (e.g. one that runs out of GPU memory)
            print(f"{name} failed:\n{output.stderr[-4000:]}", flush=True)
            failed.append(name)
            continue
        if args.profile:
            print(f"--- profile: {name}\n{output.stderr[-16000:]}")
        line = next(line for line in output.stdout.splitlines() if line.startswith("RESULT "))
        results[name] = json.loads(line[len("RESULT "):])
    return results, failed


def prepared(args, workdir: str) -> str:
    os.makedirs(workdir, exist_ok=True)
    if os.path.exists(os.path.join(workdir, "model.txt")):
        with open(os.path.join(workdir, "model.txt")) as f:
            return f.read()
    return prepare(args, workdir)


def load_average() -> str:
    return " ".join(f"{load:.1f}" for load in os.getloadavg())


def sweep(args, workdir: str) -> list[str]:
    """The length sweep: per length, TRL's precompute and ours padded and packed; a table row as each is done."""
    configs = ["trl_precompute", "ours_padded", "ours_padding_free"]
    failed = []
    print(f"\n{args.batch_size} pairs/step, {args.steps} timed steps, {args.precision}, {args.threads} threads")
    print("| L | TRL s/step, peak MB | ours padded s/step, MB | ours packed s/step, MB | step: TRL / padded, / packed "
          "| memory: padded / TRL, packed / TRL | load (1, 5, 15 min) before; after |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | --- |", flush=True)
    cell = lambda r: f"{r['median_step_s']:.2f}, {r['peak_rss_mb']:.0f}" if r else "failed"  # noqa: E731
    for length in map(int, args.lengths.split(",")):
        args.pair_lengths, args.max_length = f"length:{length}", length
        directory = os.path.join(workdir, f"length_{length}")
        prepared(args, directory)
        argv = [arg for arg in sys.argv[1:] if arg not in ("--lengths", args.lengths)]
        argv += ["--pair_lengths", args.pair_lengths, "--max_length", str(length)]
        before = load_average()
        results, failed_here = run_configs(args, directory, configs, argv)
        failed += [f"{name}@{length}" for name in failed_here]
        trl, padded, packed = (results.get(name) for name in configs)
        step = (f"{trl['median_step_s'] / padded['median_step_s']:.2f}, {trl['median_step_s'] / packed['median_step_s']:.2f}"
                if trl and padded and packed else "-")
        memory = (f"{padded['peak_rss_mb'] / trl['peak_rss_mb']:.2f}, {packed['peak_rss_mb'] / trl['peak_rss_mb']:.2f}"
                  if trl and padded and packed else "-")
        print(f"| {length} | {cell(trl)} | {cell(padded)} | {cell(packed)} | {step} | {memory} | {before}; "
              f"{load_average()} |", flush=True)
    return failed


def main():
    args = parse()
    if args.worker:
        print("RESULT " + json.dumps(run_worker(args, args.worker, args.workdir)))
        return
    workdir = args.workdir or tempfile.mkdtemp(prefix="bench_dpo_")
    import torch

    torch.set_num_threads(args.threads)  # the peak of the threads the workers use
    peak = matmul_peak_gflops(args.precision)
    print(f"measured {args.precision} matmul peak {peak:.0f} GFLOP/s; load average {load_average()}", flush=True)
    if args.lengths:
        failed = sweep(args, workdir)
        if failed:
            sys.exit(f"failed: {', '.join(failed)}")
        return
    described = prepared(args, workdir)
    print(f"{described}; {args.batch_size} pairs/step of {args.pair_lengths} lengths, max_length {args.max_length}, "
          f"{args.steps} timed steps, {args.threads} threads, {args.precision}", flush=True)
    results, failed = run_configs(args, workdir, args.configs.split(","), sys.argv[1:])
    print(f"load average after: {load_average()}")
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
    for name, r in results.items():
        if r["counted_gflop"]:
            print(f"\n{name}: needed GFLOP per step {r['needed_step_gflop']:.1f}, for the scoring "
                  f"{r['needed_scoring_gflop']:.1f}; counted (matmuls that ran, by module):")
            for phase, modules in r["counted_gflop"].items():
                print(f"  {phase}: " + ", ".join(f"{module} {gflop:.2f}" for module, gflop in modules.items()))
    ours = results.get("ours_padding_free") or results.get("ours_padded")
    ratios = {}
    if ours and "trl" in results:
        ratios["speedup_vs_trl"] = ours["tokens_per_second"] / results["trl"]["tokens_per_second"]
        ratios["peak_rss_ratio"] = ours["peak_rss_mb"] / results["trl"]["peak_rss_mb"]
    if ours and "trl_precompute" in results:
        trl = results["trl_precompute"]
        ratios["speedup_vs_trl_precompute"] = ours["tokens_per_second"] / trl["tokens_per_second"]
        ratios["peak_rss_ratio_vs_precompute"] = ours["peak_rss_mb"] / trl["peak_rss_mb"]
        ratios["ref_scoring_speedup"] = trl["ref_scoring_s"] / ours["ref_scoring_s"]
        if ours["peak_gpu_mb"] is not None:
            ratios["peak_gpu_ratio"] = ours["peak_gpu_mb"] / trl["peak_gpu_mb"]
    if "ref_scoring_speedup" in ratios:
        print(f"\nreference scoring: {ratios['ref_scoring_speedup']:.2f}x faster than TRL's precompute step")
    print("\n" + " ".join(f"{key}={value:.2f}" for key, value in ratios.items() if key != "ref_scoring_speedup"),
          flush=True)
    if failed:
        sys.exit(f"failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
