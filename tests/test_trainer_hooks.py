"""utils/trainer_hooks.py: every private Trainer method we override still exists with the parameters we pass, and the
Trainer still calls each one where our named hooks expect it. A transformers upgrade that breaks one fails here."""

import inspect

import pytest
import torch
from accelerate import Accelerator
from transformers import Trainer, TrainingArguments

from utils.trainer_hooks import ACCELERATOR_DATALOADERS, PRIVATE_TRAINER_METHODS, TRL_REWARD_METRICS, HookedTrainer


@pytest.mark.parametrize("name", list(PRIVATE_TRAINER_METHODS))
def test_each_private_method_exists_with_our_parameters(name):
    parameters, _ = PRIVATE_TRAINER_METHODS[name]
    assert hasattr(Trainer, name), f"transformers' Trainer has no {name} any more: see utils/trainer_hooks.py"
    assert tuple(inspect.signature(getattr(Trainer, name)).parameters)[1:] == parameters


def test_accelerate_keeps_its_prepared_dataloaders_in_a_list():
    assert isinstance(getattr(Accelerator(cpu=True), ACCELERATOR_DATALOADERS), list)


def test_trl_reward_trainer_logs_from_its_metrics_dict():
    from trl import RewardTrainer

    source = inspect.getsource(RewardTrainer)
    assert f"self.{TRL_REWARD_METRICS}[mode][" in source and f"self.{TRL_REWARD_METRICS}[mode].clear()" in source


class Regression(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(2, 1)

    def forward(self, x, labels):
        return {"loss": ((self.linear(x).squeeze(-1) - labels) ** 2).mean()}


class Recording(HookedTrainer):
    calls: list

    def on_engine_ready(self, model, train_dataloader):
        self.calls.append(("engine_ready", model.training is not None))
        return self.replace_train_dataloader(train_dataloader)

    def on_grad_norm(self, grad_norm):
        self.calls.append(("grad_norm", float(grad_norm) >= 0))

    def load_checkpoint_weights(self, checkpoint, model):
        self.calls.append(("load", checkpoint))
        return False


def test_the_trainer_calls_every_hook(tmp_path):
    rows = [{"x": torch.randn(2), "labels": torch.randn(())} for _ in range(8)]
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, max_steps=2, per_device_train_batch_size=4,
                             save_steps=1, report_to="none", logging_steps=1)
    first = Recording(model=Regression(), args=args, train_dataset=rows)
    first.calls = []
    first.train()
    assert first.calls == [("engine_ready", True), ("grad_norm", True), ("grad_norm", True)]

    args.max_steps = 3
    resumed = Recording(model=Regression(), args=args, train_dataset=rows)
    resumed.calls = []
    resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    assert resumed.calls == [("load", str(tmp_path / "checkpoint-2")), ("engine_ready", True), ("grad_norm", True)]
