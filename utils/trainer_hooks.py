"""The one place that lists the private parts of transformers' Trainer (pinned: 5.23) and TRL that we rely on, and
overrides the Trainer's private methods.

Each private method we override is overridden here once and handed to a named hook that our trainers override
instead; tests/test_trainer_hooks.py checks every entry below against the installed libraries, so an upgrade that
renames or reshapes one fails there, loudly, not in a silent training bug.
"""

from transformers import Trainer

# name -> (its parameters after self, what we use it for)
PRIVATE_TRAINER_METHODS = {
    "_prepare_for_training": (("max_steps", "train_dataloader", "resume_from_checkpoint"),
                              "on return the engine (DDP, FSDP2, DeepSpeed) has wrapped the model and no step has run: "
                              "reference scoring goes there (on_engine_ready)"),
    "_get_grad_norm": (("model", "grad_norm"), "the gradient norm the Trainer computes anyway: the non-finite guard "
                                               "(on_grad_norm)"),
    "_load_from_checkpoint": (("resume_from_checkpoint", "model"), "exact reload of MoE checkpoints "
                                                                   "(load_checkpoint_weights)"),
    "_load_best_model": ((), "the same for load_best_model_at_end (load_checkpoint_weights)"),
    "_prepare_inputs": (("inputs",), "called, not overridden: DPOTrainer.prediction_step moves a batch to the device "
                                     "as training_step does"),
}
# TRL's RewardTrainer keeps the metrics it logs in this private dict; train_reward.py adds the router's aux loss to it
TRL_REWARD_METRICS = "_metrics"
# accelerate keeps every prepared dataloader in this private list; a replaced one must leave it
ACCELERATOR_DATALOADERS = "_dataloaders"


class HookedTrainer(Trainer):
    """A Trainer whose private methods call named hooks; every hook's default does what the Trainer does."""

    def on_engine_ready(self, model, train_dataloader):
        """The model as the engine prepared it, before the first step; returns the train dataloader to use."""
        return train_dataloader

    def on_grad_norm(self, grad_norm) -> None:
        """Called once per optimizer step, before the optimizer steps, with the gradient norm."""

    def load_checkpoint_weights(self, checkpoint: str | None, model) -> bool:
        """Load a checkpoint's weights into `model` and return True, or False to let the Trainer do it."""
        return False

    def replace_train_dataloader(self, stale):
        """A new train dataloader over the current train_dataset, in place of `stale` (already prepared)."""
        prepared = getattr(self.accelerator, ACCELERATOR_DATALOADERS, [])
        if stale in prepared:
            prepared.remove(stale)
        train_dataloader = self.get_train_dataloader()
        self.callback_handler.train_dataloader = train_dataloader
        return train_dataloader

    # ---------------------------------------------------------------- the private methods (see above)

    def _prepare_for_training(self, max_steps, train_dataloader, resume_from_checkpoint):
        model, train_dataloader = super()._prepare_for_training(max_steps, train_dataloader, resume_from_checkpoint)
        return model, self.on_engine_ready(model, train_dataloader)

    def _get_grad_norm(self, model, grad_norm=None):
        grad_norm = super()._get_grad_norm(model, grad_norm)
        self.on_grad_norm(grad_norm)
        return grad_norm

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        if not self.load_checkpoint_weights(resume_from_checkpoint, self.model if model is None else model):
            super()._load_from_checkpoint(resume_from_checkpoint, model)

    def _load_best_model(self):
        if not self.load_checkpoint_weights(self.state.best_model_checkpoint, self.model):
            super()._load_best_model()
