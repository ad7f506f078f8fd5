"""DPO paths beyond the default run, each checked end to end through `train_dpo.main(argv)` or the trainer:
reference-free, padding-free (full and LoRA), and resume under padding-free with gradient accumulation (every loss
against TRL's DPOTrainer: tests/test_dpo.py)."""

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import train_dpo
from helpers import loop_logps, tiny_run_args
from train_dpo import DPOTrainer
from utils.modeling import ModelArguments, load_model, load_tokenizer

TINY = ModelArguments(model_name_or_path="mixtral-tiny")
# Plain SGD with a large constant step: weights move far enough that a wrong path shows, and nothing else
# (momentum, schedule, clipping) blurs the comparison.
SGD = ["--optim", "sgd", "--learning_rate", "0.5", "--max_grad_norm", "0", "--lr_scheduler_type", "constant"]


def run(tmp_path, name: str, *extra) -> DPOTrainer:
    """The tiny run on 16 pairs in batches of 4, in process, writing to tmp_path/name, with its own reference cache
    tmp_path/cache-name."""
    return train_dpo.main(tiny_run_args(tmp_path, "--toy_num_train_pairs", "16", "--toy_num_eval_pairs", "2",
                                        "--per_device_train_batch_size", "4", *extra, output=name,
                                        cache=f"cache-{name}"))


def weights(trainer) -> dict:
    return {name: p.detach().clone() for name, p in trainer.model.named_parameters()}


def train_losses(trainer) -> list[float]:
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


def assert_same_weights(a: dict, b: dict):
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-6, msg=name)


# ------------------------------------------------------------------------------------------ reference-free

def test_reference_free_rewards_are_beta_times_policy_logps(tmp_path):
    beta = 0.2
    trainer = run(tmp_path, "free", "--reference_free", "--max_steps", "1", "--per_device_train_batch_size", "16",
                  "--beta", str(beta), "--router_aux_loss_coef", "0")
    first = trainer.state.log_history[0]  # step 1: all 16 pairs, at the initial weights
    start = load_model(TINY, load_tokenizer(TINY))
    rows = [trainer.train_dataset[i] for i in range(16)]
    chosen = torch.tensor([loop_logps(start, r["prompt_input_ids"], r["chosen_input_ids"]) for r in rows])
    rejected = torch.tensor([loop_logps(start, r["prompt_input_ids"], r["rejected_input_ids"]) for r in rows])
    assert first["rewards/chosen"] == pytest.approx(beta * chosen.mean().item(), rel=1e-4)
    assert first["rewards/rejected"] == pytest.approx(beta * rejected.mean().item(), rel=1e-4)
    assert first["loss"] == pytest.approx(-F.logsigmoid(beta * (chosen - rejected)).mean().item(), rel=1e-4)


# ------------------------------------------------------------------------------------------ padding-free

def assert_packs_without_padding(trainer, packed: bool):
    rows = [trainer.train_dataset[i] for i in range(4)]
    tokens = 2 * sum(len(r["prompt_input_ids"]) for r in rows) + sum(
        len(r["chosen_input_ids"]) + len(r["rejected_input_ids"]) for r in rows)
    batch_tokens = trainer.data_collator(rows)["input_ids"].numel()
    assert batch_tokens == tokens if packed else batch_tokens > tokens  # the padded batch does pad these rows


def test_padding_free_run_ends_with_the_padded_runs_weights(tmp_path):
    padded = run(tmp_path, "padded", "--padding_free", "false", "--max_steps", "2", *SGD)
    packed = run(tmp_path, "packed", "--padding_free", "true", "--max_steps", "2", *SGD)
    assert_packs_without_padding(padded, packed=False)
    assert_packs_without_padding(packed, packed=True)
    assert train_losses(packed) == pytest.approx(train_losses(padded), abs=1e-5)
    start = load_model(TINY, load_tokenizer(TINY))
    assert (padded.model.lm_head.weight - start.lm_head.weight).abs().max() > 1e-3  # the steps did move it
    assert_same_weights(weights(packed), weights(padded))


@pytest.mark.parametrize("precompute", ["true", "false"], ids=["precomputed-reference", "adapters-off-each-step"])
def test_padding_free_lora_trains_like_padded_lora_and_keeps_base_weights(tmp_path, precompute):
    flags = ["--use_peft", "--max_steps", "2", "--precompute_ref_log_probs", precompute, *SGD]
    padded = run(tmp_path, "padded", "--padding_free", "false", *flags)
    packed = run(tmp_path, "packed", "--padding_free", "true", *flags)
    assert_packs_without_padding(packed, packed=True)
    # LoRA B starts at zero: at step 1 the policy is the reference, scored through the same packed path
    assert packed.state.log_history[0]["rewards/margins"] == pytest.approx(0, abs=1e-5)
    assert train_losses(packed) == pytest.approx(train_losses(padded), abs=1e-5)
    packed_weights = weights(packed)
    assert_same_weights(packed_weights, weights(padded))
    start = load_model(TINY, load_tokenizer(TINY)).state_dict()
    base = {name.replace(".base_layer", ""): value for name, value in packed.model.get_base_model().state_dict().items()
            if "lora_" not in name}
    assert base.keys() == start.keys()
    for name, value in start.items():
        assert torch.equal(base[name], value), name
    lora_b = [value for name, value in packed_weights.items() if "lora_B" in name]
    assert lora_b and all(value.abs().sum() > 0 for value in lora_b)  # B starts at zero: it trained


# ------------------------------------------------------------------------------------------ resume

def test_padding_free_accumulating_run_resumes_to_the_uninterrupted_weights(tmp_path, monkeypatch):
    flags = ["--padding_free", "true", "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "2",
             "--save_steps", "2", "--learning_rate", "1e-2", "--lr_scheduler_type", "constant"]
    run(tmp_path, "uninterrupted", *flags, "--max_steps", "4")
    run(tmp_path, "resumed", *flags, "--max_steps", "2")  # stops after checkpoint-2, as an interrupted run would

    trained_micro_batches = []
    compute_loss = DPOTrainer.compute_loss

    def counting_compute_loss(self, model, inputs, *args, **kwargs):
        if model.training:
            trained_micro_batches.append(self.state.global_step)
        return compute_loss(self, model, inputs, *args, **kwargs)

    monkeypatch.setattr(DPOTrainer, "compute_loss", counting_compute_loss)
    run(tmp_path, "resumed", *flags, "--max_steps", "4", "--resume_from_checkpoint", "latest")
    assert trained_micro_batches == [2, 2, 3, 3]  # steps 3 and 4 only, two micro-batches each: it did resume

    resumed = load_file(tmp_path / "resumed" / "model.safetensors")
    at_checkpoint = load_file(tmp_path / "resumed" / "checkpoint-2" / "model.safetensors")
    expected = load_file(tmp_path / "uninterrupted" / "model.safetensors")
    assert resumed.keys() == expected.keys()
    for name in resumed:
        assert torch.equal(resumed[name], expected[name]), name
    assert not torch.equal(resumed["lm_head.weight"], at_checkpoint["lm_head.weight"])  # steps 3-4 did train
