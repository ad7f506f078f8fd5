"""Several processes on CPU (gloo) through the shipped accelerate configs: DDP, FSDP2 and DeepSpeed ZeRO-3
train as one process does, the reference pass runs on the sharded weights, the cache is written once.

Every run starts from the same saved mixtral-tiny checkpoint, so that all engines load identical weights
(a preset built under ZeRO-3's partitioned init would draw other random numbers).
"""

import json
import os
import re
import socket
import subprocess
import sys

import pytest
import torch
from accelerate.commands.launch import _validate_launch_command, launch_command_parser
from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env
from safetensors.torch import load_file

from helpers import tiny_run_args
from utils.modeling import ModelArguments, load_model, load_tokenizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(REPO, "configs", "accelerate")
ENTRY = os.path.join(REPO, "tests", "dist_entry.py")
# sgd with a large step, no clipping, a constant rate: weight changes are exact sums of gradients
# 9 eval pairs: two processes pad the last eval batch with a duplicate, which metrics must not count
TRAIN = ["--toy_num_train_pairs", "48", "--toy_num_eval_pairs", "9", "--max_steps", "3",
         "--optim", "sgd", "--learning_rate", "0.5", "--max_grad_norm", "0", "--lr_scheduler_type", "constant",
         "--precompute_ref_batch_size", "4", "--save_strategy", "no"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt")
    args = ModelArguments(model_name_or_path="mixtral-tiny")
    tokenizer = load_tokenizer(args)
    load_model(args, tokenizer).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def free_port() -> str:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return str(probe.getsockname()[1])


def accelerate_env(config: str, launch=prepare_multi_gpu_env, **overrides) -> dict[str, str]:
    """The environment `accelerate launch --config_file <config>` gives its processes, from accelerate's own parser."""
    flags = ["--config_file", os.path.join(CONFIGS, config)]
    for name, value in overrides.items():
        flags += [f"--{name}", str(value)]
    args, defaults, _ = _validate_launch_command(launch_command_parser().parse_args(flags + ["train_dpo.py"]))
    if launch is prepare_deepspeed_cmd_env:
        args.deepspeed_fields_from_accelerate_config = ",".join(defaults.deepspeed_config)
        return launch(args)[1]
    return launch(args)


def launch(tmp_path, name: str, *flags, processes: int = 1, env: dict | None = None):
    """The tiny run of train_dpo (instrumented by dist_entry.py) with `flags`, writing to tmp_path/name, in
    `processes` processes: the finished process, its record file."""
    record = tmp_path / f"{name}.jsonl"
    launcher = [sys.executable]
    if processes > 1:
        launcher += ["-m", "torch.distributed.run", "--nproc_per_node", str(processes), "--master_port", free_port()]
    env = dict(env or os.environ, OMP_NUM_THREADS="1", DPO_TEST_RECORD=str(record))
    # a hung collective fails the test instead of waiting out gloo's 30-minute timeout
    result = subprocess.run(launcher + [ENTRY, *tiny_run_args(tmp_path, *flags, output=name)], env=env, cwd=REPO,
                            capture_output=True, text=True, timeout=600)
    return result, record


def run(tmp_path, name: str, *flags, processes: int = 1, env: dict | None = None) -> tuple[str, list[dict]]:
    """train_dpo (instrumented by dist_entry.py) in `processes` processes; its output folder and its record."""
    result, record = launch(tmp_path, name, *flags, processes=processes, env=env)
    out = tmp_path / name
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    events = [json.loads(line) for line in record.read_text().splitlines()] if record.exists() else []
    return str(out), events


def train_losses(out: str) -> list[float]:
    return [e["loss"] for e in json.load(open(os.path.join(out, "trainer_state.json")))["log_history"] if "loss" in e]


def assert_same_training(out: str, expected: str, checkpoint: str) -> None:
    weights, reference = load_file(os.path.join(out, "model.safetensors")), load_file(
        os.path.join(expected, "model.safetensors"))
    start = load_file(os.path.join(checkpoint, "model.safetensors"))
    assert not torch.equal(reference["lm_head.weight"], start["lm_head.weight"])  # the steps did move the weights
    assert weights.keys() == reference.keys()
    for name in reference:
        torch.testing.assert_close(weights[name], reference[name], rtol=1e-5, atol=1e-6, msg=name)
    assert train_losses(out) == pytest.approx(train_losses(expected), abs=1e-5)


def test_ddp_two_processes_train_like_one_and_write_the_cache_once(tmp_path, checkpoint):
    common = ["--model_name_or_path", checkpoint, *TRAIN, "--router_aux_loss_coef", "0",  # not linear in the batch
              "--ref_logps_cache_dir", str(tmp_path / "cache")]
    one, _ = run(tmp_path, "one", *common, "--per_device_train_batch_size", "8",
                 "--ref_logps_cache_dir", str(tmp_path / "cache_one"))
    # ddp.yaml's launch on CPU processes: --use_cpu makes accelerate's state gloo multi-CPU DDP
    two, events = run(tmp_path, "two", *common, "--per_device_train_batch_size", "4", "--use_cpu", "true",
                      processes=2, env=dict(os.environ, **accelerate_env("ddp.yaml", num_processes=2,
                                                                         mixed_precision="no")))
    assert_same_training(two, one, checkpoint)
    one_eval, two_eval = (json.load(open(os.path.join(out, "eval_results.json"))) for out in (one, two))
    for name in ("eval_loss", "eval_logps/chosen", "eval_logps/rejected", "eval_rewards/margins",
                 "eval_rewards/accuracies"):  # the duplicate that pads the last batch is not counted
        assert two_eval[name] == pytest.approx(one_eval[name], abs=1e-5), name
    scores = [e for e in events if e["event"] == "score"]
    assert sorted((e["rank"], e["rows"]) for e in scores) == [(0, 9), (0, 48), (1, 9), (1, 48)]  # each its share
    assert [(e["rank"], e["rows"]) for e in events if e["event"] == "write"] == [(0, 48), (0, 9)]  # main only, once
    for name in os.listdir(tmp_path / "cache_one"):  # the gathered scores are the one-process scores
        for column, values in load_file(tmp_path / "cache_one" / name).items():
            torch.testing.assert_close(load_file(tmp_path / "cache" / name)[column], values, rtol=0, atol=1e-5)

    _, events = run(tmp_path, "again", *common, "--per_device_train_batch_size", "4", "--use_cpu", "true",
                    "--max_steps", "1", processes=2)
    assert events == []  # a cache hit: no rank scores, nothing is written


def test_a_nan_loss_on_one_rank_stops_every_rank_with_the_same_error(tmp_path, checkpoint):
    # gradient accumulation: the first micro-batch's backward does not all-reduce, so a rank raising there
    # alone would leave the other waiting in the second's
    result, _ = launch(tmp_path, "nan", "--model_name_or_path", checkpoint, *TRAIN, "--per_device_train_batch_size",
                       "2", "--gradient_accumulation_steps", "2", "--use_cpu", "true",
                       "--ref_logps_cache_dir", str(tmp_path / "cache"), "--disable_tqdm", "true", processes=2,
                       env=dict(os.environ, DPO_TEST_NAN_RANK="1"))
    # the ranks write at the same moment: their lines may run together
    errors = re.findall(r"error: .*?nothing of this step was saved", result.stderr)
    assert result.returncode != 0 and len(errors) == 2, result.stderr[-3000:]
    assert errors[0] == errors[1]
    assert "non-finite loss (nan) on rank(s) [1] at step 2" in errors[0]


def engine_on_cpu(config: str, launch=prepare_multi_gpu_env) -> dict[str, str]:
    return dict(os.environ, DPO_TEST_ENGINE_ON_CPU="1",
                **accelerate_env(config, launch, num_processes=2, mixed_precision="no"))


@pytest.fixture(scope="module")
def ddp_with_router_loss(tmp_path_factory, checkpoint):
    """Two DDP processes with the router aux loss on: what any engine must reproduce with the same micro-batches."""
    tmp_path = tmp_path_factory.mktemp("ddp_aux")
    out, _ = run(tmp_path, "ddp", "--model_name_or_path", checkpoint, *TRAIN, "--per_device_train_batch_size", "4",
                 "--use_cpu", "true", "--ref_logps_cache_dir", str(tmp_path / "cache"), processes=2)
    return out


def test_fsdp2_scores_the_reference_on_shards_and_trains_like_ddp(tmp_path, checkpoint, ddp_with_router_loss):
    env = engine_on_cpu("fsdp.yaml")
    assert env["FSDP_VERSION"] == "2" and env["FSDP_TRANSFORMER_CLS_TO_WRAP"] == "MixtralDecoderLayer"
    out, events = run(tmp_path, "fsdp", "--model_name_or_path", checkpoint, *TRAIN,
                      "--per_device_train_batch_size", "4", "--ref_logps_cache_dir", str(tmp_path / "cache"),
                      processes=2, env=env)
    scores = [e for e in events if e["event"] == "score"]
    assert len(scores) == 4 and all(e["held"] < 0.6 * e["full"] for e in scores)  # each rank held about half
    assert [e["rank"] for e in events if e["event"] == "write"] == [0, 0]
    assert_same_training(out, ddp_with_router_loss, checkpoint)  # the final save gathered a full checkpoint


def test_zero3_scores_the_reference_on_partitions_and_trains_like_ddp(tmp_path, checkpoint, ddp_with_router_loss):
    pytest.importorskip("deepspeed", reason="DeepSpeed comes with requirements-gpu.txt")
    env = dict(engine_on_cpu("zero3.yaml", prepare_deepspeed_cmd_env), DS_ACCELERATOR="cpu")
    out, events = run(tmp_path, "zero3", "--model_name_or_path", checkpoint, *TRAIN,
                      "--per_device_train_batch_size", "4", "--ref_logps_cache_dir", str(tmp_path / "cache"),
                      processes=2, env=env)
    scores = [e for e in events if e["event"] == "score"]
    assert len(scores) == 4 and all(e["held"] < 0.6 * e["full"] for e in scores)
    assert [e["rank"] for e in events if e["event"] == "write"] == [0, 0]
    assert_same_training(out, ddp_with_router_loss, checkpoint)


def test_accelerate_parses_the_deepspeed_and_two_node_configs_without_a_gpu(monkeypatch):
    from accelerate.utils import DeepSpeedPlugin
    from accelerate.utils.dataclasses import get_module_class_from_name

    env = accelerate_env("zero3.yaml", prepare_deepspeed_cmd_env)
    assert env["ACCELERATE_USE_DEEPSPEED"] == "true" and env["ACCELERATE_DEEPSPEED_ZERO_STAGE"] == "3"
    for name, value in env.items():
        if name.startswith("ACCELERATE_"):
            monkeypatch.setenv(name, value)
    plugin = DeepSpeedPlugin()  # what TrainingArguments builds from that environment
    zero = plugin.deepspeed_config["zero_optimization"]
    assert plugin.zero_stage == 3 and zero["stage"] == 3 and plugin.zero3_init_flag
    assert zero["stage3_gather_16bit_weights_on_model_save"] is True  # the final save is one HF checkpoint
    names = env["ACCELERATE_DEEPSPEED_MOE_LAYER_CLS_NAMES"]
    assert names == "MixtralSparseMoeBlock"
    model = load_model(ModelArguments(model_name_or_path="mixtral-tiny"),
                       load_tokenizer(ModelArguments(model_name_or_path="mixtral-tiny")))
    leaf = get_module_class_from_name(model, names)  # what set_moe_leaf_modules looks up in the model
    assert leaf is not None and leaf.__name__ == "MixtralSparseMoeBlock"

    parser_args = launch_command_parser().parse_args(
        ["--config_file", os.path.join(CONFIGS, "two_node.yaml"), "--machine_rank", "1", "train_dpo.py"])
    args, _, _ = _validate_launch_command(parser_args)
    args.deepspeed_fields_from_accelerate_config = ""
    command, env = prepare_deepspeed_cmd_env(args)
    assert command is None  # the "standard" launcher: torchrun on each node, no pdsh/ssh
    assert (args.nnodes, args.nproc_per_node, args.node_rank) == ("2", "8", 1)
    assert env["ACCELERATE_DEEPSPEED_ZERO_STAGE"] == "3"


@pytest.mark.parametrize("recipe", ["dpo_toy.yaml", "dpo_mixtral_lora.yaml", "dpo_mixtral_full.yaml"])
def test_recipes_parse(recipe, tmp_path):
    from train_dpo import DPOArguments
    from utils.cli import parse_args
    from utils.data import DataArguments

    path = os.path.join(REPO, "configs", recipe)
    model_args, _, args = parse_args((ModelArguments, DataArguments, DPOArguments),
                                     [path, "--output_dir", str(tmp_path), "--bf16", "false",  # these two need
                                      "--load_in_fp8", "false"])  # a GPU, and the arguments check the machine
    if recipe != "dpo_toy.yaml":  # the Zephyr-7B-beta DPO recipes' values
        assert args.beta == 0.01 and args.warmup_steps == 0.1 and args.lr_scheduler_type == "cosine"
        batch = args.per_device_train_batch_size * args.gradient_accumulation_steps
        assert (args.learning_rate, batch) == ((5e-6, 32) if model_args.use_peft else (5e-7, 128 // 16))


def test_each_machine_tokenises_once_and_every_rank_reads_the_same_rows(tmp_path, rows_file):
    """Two processes on one machine: the local main process tokenises into the datasets cache, the other reads
    that cache (tokenises nothing), and both hold the same rows from the same cache files."""
    rows = [{"prompt": f"prompt {i}", "chosen": f" good {i}", "rejected": f" bad {i}"} for i in range(24)]
    path = rows_file("pairs.jsonl", rows)
    env = dict(os.environ, DPO_TEST_RECORD_DATA="1", HF_DATASETS_CACHE=str(tmp_path / "datasets"))
    _, events = run(tmp_path, "two", "--dataset_name", path, "--eval_fraction", "0.25", "--use_cpu", "true",
                    "--dry_run", processes=2, env=env)
    tokenised = sorted((e["rank"], e["row"]) for e in events if e["event"] == "tokenise")
    assert tokenised == [(0, row) for row in range(24)]  # rank 0 only, each row once
    splits = {(e["rank"], e["split"]): e for e in events if e["event"] == "split"}
    assert sorted(splits) == [(0, "test"), (0, "train"), (1, "test"), (1, "train")]
    for split in ("train", "test"):
        assert splits[0, split]["rows"] == splits[1, split]["rows"]
        assert splits[0, split]["cache_files"] == splits[1, split]["cache_files"] != []
    assert not (tmp_path / "two").exists() and not (tmp_path / "cache").exists()  # a dry run writes nothing
