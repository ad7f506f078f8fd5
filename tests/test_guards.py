"""utils/guards.py: a non-finite loss or gradient stops the run, naming the step and its batch's rows, before
anything of that step is saved."""

import json

import pytest

import train_dpo
from helpers import tiny_run_args
from utils.errors import NonFiniteError


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
