"""utils/guards.py: a non-finite loss or gradient stops the run, naming the step and its batch's rows, before
anything of that step is saved; before the first step, log-probs that are not the model's own forward() or a reference
that does not score what the initial policy scores stop it in one line."""

import json

import pytest
import torch

import train_dpo
from helpers import tiny_run_args
from utils.errors import ConfigError, NonFiniteError


def test_non_finite_loss_stops_naming_step_and_rows(tmp_path, monkeypatch):
    batches = []
    original = train_dpo.DPOTrainer.compute_loss

    def compute_loss(self, model, inputs, *args, **kwargs):
        loss = original(self, model, inputs, *args, **kwargs)
        if model.training:
            batches.append(sorted(inputs["row_index"].tolist()))
            if len(batches) == 3:
                loss = loss * float("nan")
        return loss

    monkeypatch.setattr(train_dpo.DPOTrainer, "compute_loss", compute_loss)
    with pytest.raises(NonFiniteError) as error:
        train_dpo.main(tiny_run_args(tmp_path, "--max_steps", "5", "--save_steps", "1"))
    assert f"non-finite loss (nan) at step 3; the step's batch holds rows {batches[2]}" in str(error.value)
    assert len(batches) == 3 and len(batches[2]) == 8
    checkpoints = sorted(p.name for p in (tmp_path / "out").iterdir() if p.name.startswith("checkpoint"))
    assert checkpoints == ["checkpoint-1", "checkpoint-2"]  # the last good one is kept, nothing of step 3
    assert not (tmp_path / "out" / "model.safetensors").exists()


def test_non_finite_gradient_stops_before_the_optimizer_step(tmp_path, monkeypatch):
    batches = []
    original = train_dpo.DPOTrainer.training_step

    def training_step(self, model, inputs, *args, **kwargs):
        batches.append(sorted(inputs["row_index"].tolist()))
        loss = original(self, model, inputs, *args, **kwargs)
        if self.state.global_step == 1:  # step 2: a finite loss, but one NaN in a gradient
            model.lm_head.weight.grad[0, 0] = float("nan")
        return loss

    monkeypatch.setattr(train_dpo.DPOTrainer, "training_step", training_step)
    with pytest.raises(NonFiniteError) as error:
        train_dpo.main(tiny_run_args(tmp_path, "--max_steps", "4", "--save_steps", "1", "--max_grad_norm", "0"))
    assert f"non-finite gradient norm (nan) at step 2; the step's batch holds rows {batches[1]}" in str(error.value)
    checkpoints = sorted(p.name for p in (tmp_path / "out").iterdir() if p.name.startswith("checkpoint"))
    assert checkpoints == ["checkpoint-1"]


# ------------------------------------------------------------------------------------------ the first batch

def test_a_transform_after_the_output_layer_that_our_path_skips_stops_the_run(tmp_path, monkeypatch):
    from transformers import MixtralForCausalLM

    forward = MixtralForCausalLM.forward

    def softcapped_forward(self, *args, **kwargs):  # a family we have not seen: it caps its logits
        outputs = forward(self, *args, **kwargs)
        outputs.logits = torch.tanh(outputs.logits / 0.5) * 0.5
        return outputs

    monkeypatch.setattr(MixtralForCausalLM, "forward", softcapped_forward)
    run = tiny_run_args(tmp_path, "--toy_num_train_pairs", "16", "--max_steps", "1", "--save_strategy", "no")
    with pytest.raises(ConfigError, match=r"^MixtralForCausalLM: our completion log-probs differ from its own "
                                          r"forward\(\) by up to \d.* nats on the first batch .*POST_HEAD_TRANSFORMS"):
        train_dpo.main(run)
    assert not (tmp_path / "out" / "model.safetensors").exists()
    trainer = train_dpo.main(run + ["--check_logps", "false"])  # off: it trains on the unseen transform
    assert trainer.state.global_step == 1


def test_a_reference_scored_in_another_precision_stops_the_run_at_step_0(tmp_path, monkeypatch):
    from utils.reference import ReferenceScoring

    settings = ReferenceScoring._reference_settings
    monkeypatch.setattr(ReferenceScoring, "_reference_settings",  # a bf16 reference for a float32 policy
                        lambda self: (settings(self)[0], torch.bfloat16, settings(self)[2]))
    run = tiny_run_args(tmp_path, "--toy_num_train_pairs", "16", "--max_steps", "1", "--save_strategy", "no",
                        "--learning_rate", "0")
    with pytest.raises(ConfigError, match=r"^step 0's implicit rewards are not 0: the reference's log-probs differ "
                                          r"from the initial policy's by up to .*stale reference cache"):
        train_dpo.main(run)
    trainer = train_dpo.main(run + ["--check_step0_rewards", "false", "--output_dir", str(tmp_path / "off")])
    rewards = abs(trainer.state.log_history[0]["rewards/chosen"])
    assert rewards > 1e-5  # what the check stopped: at learning rate 0, rewards far from float32 rounding


def test_the_first_batch_checks_pass_on_packed_rows_and_a_frozen_reference(tmp_path):
    trainer = train_dpo.main(tiny_run_args(tmp_path, "--toy_num_train_pairs", "16", "--max_steps", "1",
                                           "--padding_free", "--precompute_ref_log_probs", "false",
                                           "--learning_rate", "0", "--save_strategy", "no"))
    assert trainer.reference_is_initial_policy and abs(trainer.state.log_history[0]["rewards/chosen"]) < 1e-5


def test_a_mixture_s_rows_are_named_by_their_dataset(tmp_path, rows_file, monkeypatch):
    """Row numbers restart in each part of a mixture: the message names each row's dataset with it."""
    files = [rows_file(f"{name}.jsonl", [{"prompt": f"{name} said {i}.", "chosen": " good.", "rejected": " bad."}
                                         for i in range(6)]) for name in ("a", "b")]
    batches = []
    original = train_dpo.DPOTrainer.compute_loss

    def compute_loss(self, model, inputs, *args, **kwargs):
        loss = original(self, model, inputs, *args, **kwargs)
        if model.training:
            batches.append(list(zip(inputs["source"], inputs["row_index"].tolist())))
            loss = loss * float("nan")
        return loss

    monkeypatch.setattr(train_dpo.DPOTrainer, "compute_loss", compute_loss)
    mixture = json.dumps({"datasets": [{"id": path} for path in files], "seed": 0})
    with pytest.raises(NonFiniteError) as error:
        train_dpo.main(tiny_run_args(tmp_path, "--dataset_mixture", mixture, "--max_steps", "1"))
    (batch,) = batches
    assert {source for source, _ in batch} == {f"{path} [train]" for path in files}  # both parts in the batch
    named = ", ".join(f"rows {sorted(row for source, row in batch if source == f'{path} [train]')} of {path} [train]"
                      for path in sorted(files))
    assert f"at step 1; the step's batch holds {named}." in str(error.value)
