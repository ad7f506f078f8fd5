"""utils/memory.py: the estimate's parts are the model's own counts (a meta-device model counts as the real one),
and its per-layer activation count is what a decoder layer saves for backward."""

import pytest
import torch

from utils.data import PreferenceCollator
from utils.logprobs import model_logps
from utils.memory import activation_elements_per_token, estimate_peak_memory
from utils.modeling import ModelArguments, apply_lora, load_model, load_tokenizer
from train_dpo import DPOArguments


def args(**overrides) -> DPOArguments:
    return DPOArguments(output_dir="unused", use_cpu=True, report_to="none", **overrides)


@pytest.mark.parametrize("use_peft", [False, True])
def test_states_are_the_real_model_s_bytes(use_peft):
    model_args = ModelArguments(model_name_or_path="mixtral-tiny", use_peft=use_peft)
    tokenizer = load_tokenizer(model_args)
    real, meta = load_model(model_args, tokenizer), load_model(model_args, tokenizer, meta=True)
    if use_peft:
        real, meta = apply_lora(real, model_args), apply_lora(meta, model_args)
    weights = sum(p.numel() * 4 for p in real.parameters())
    trainable = sum(p.numel() * 4 for p in real.parameters() if p.requires_grad)
    estimate, engine = estimate_peak_memory(meta, args(optim="adamw_torch"), tokens=64, completion_tokens=32,
                                            sequence_length=16, world_size=1)
    assert (estimate.weights, estimate.gradients, estimate.optimizer) == (weights, trainable, 2 * trainable)
    assert (trainable < weights) == use_peft and engine == "ddp on 1 process(es)"
    sgd, _ = estimate_peak_memory(meta, args(optim="sgd"), tokens=64, completion_tokens=32, sequence_length=16,
                                  world_size=1)
    assert sgd.optimizer == 0
    frozen, _ = estimate_peak_memory(meta, args(), tokens=64, completion_tokens=32, sequence_length=16, world_size=1,
                                     frozen_reference=True)
    assert (estimate.reference_copy, frozen.reference_copy) == (0, weights)
    chunk = 32 * real.get_output_embeddings().out_features * (8 + 4)
    assert estimate.logps_chunk == chunk


@pytest.mark.parametrize("preset", ["mixtral-tiny", "mixtral-toy"])
def test_a_layer_s_activations_are_what_autograd_saves(preset):
    """Bytes the decoder layers save for backward (torch's saved-tensor hooks, each storage once, weights
    excluded), per token and layer, within 10% of the formula."""
    model_args = ModelArguments(model_name_or_path=preset)
    tokenizer = load_tokenizer(model_args)
    model = load_model(model_args, tokenizer)
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved, inside = {}, [False]
    for layer in model.model.layers:
        layer.register_forward_pre_hook(lambda *_: inside.__setitem__(0, True))
        layer.register_forward_hook(lambda *_: inside.__setitem__(0, False))

    def pack(tensor):
        storage = tensor.untyped_storage()
        if inside[0] and storage.data_ptr() not in weights:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    sequences = [list(range(5, 5 + 48))] * 4
    batch = PreferenceCollator(tokenizer.pad_token_id)([{"prompt_input_ids": s[:8], "chosen_input_ids": s[8:],
                                                         "rejected_input_ids": s[8:]} for s in sequences[:2]])
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model_logps(model, batch, router_aux_loss=True)
    tokens, layers = batch["input_ids"].numel(), model.config.num_hidden_layers
    per_layer, _ = activation_elements_per_token(model.config, "sdpa", batch["input_ids"].shape[1])
    assert sum(saved.values()) / 4 / tokens / layers == pytest.approx(per_layer, rel=0.1)
