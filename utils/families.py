"""What a model family's forward() does around its output layer, which our fast log-prob path must do too.

`utils.logprobs` never asks a model for its whole [tokens, vocab] logits: it runs the output layer itself on the
completion tokens' hidden states. Some families' `forward()` transforms the logits after the output layer (Gemma 2/3
cap them with tanh, Cohere and Granite scale them); skipping that gives wrong log-probs without any error. So the
output layer and whatever the family's forward applies after it are one function here, `output_head`, which the
chunked path calls; a family whose forward we cannot reproduce is refused (`check_model_family`) before anything
loads. What this table does not foresee, the first-batch check (`utils.guards.FirstBatchChecks`) catches at run time.
"""

import torch

from utils.errors import ConfigError


def _softcap(cap: float | None, logits: torch.Tensor) -> torch.Tensor:
    return logits if cap is None else torch.tanh(logits / cap) * cap


# Causal-LM class -> what its forward() applies to the output layer's logits, as written in transformers 5.23's
# models/<family>/modeling_<family>.py (the lines after `logits = self.lm_head(...)`). To add a family: copy those
# lines here as (model, logits) -> logits, and add the family to tests/test_model_zoo.py, which checks it against
# the model's own forward().logits.
POST_HEAD_TRANSFORMS = {
    **dict.fromkeys(("Gemma2ForCausalLM", "Gemma3ForCausalLM", "VaultGemmaForCausalLM"),
                    lambda model, logits: _softcap(model.config.final_logit_softcapping, logits)),
    **dict.fromkeys(("CohereForCausalLM", "Cohere2ForCausalLM", "Cohere2MoeForCausalLM"),
                    lambda model, logits: logits * model.logit_scale),
    **dict.fromkeys(("GraniteForCausalLM", "GraniteMoeForCausalLM", "GraniteMoeSharedForCausalLM",
                     "GraniteMoeHybridForCausalLM"),
                    lambda model, logits: logits / model.config.logits_scaling),
    "FalconH1ForCausalLM": lambda model, logits: logits * model.model.lm_head_multiplier,
}

# Causal-LM classes whose forward() does, around the output layer, what a per-token head cannot reproduce (read
# from the same files): refused by name, with the reason.
UNMATCHED = {
    "ChameleonForConditionalGeneration": "its forward masks the image tokens' logits",
    "Gemma4AssistantForCausalLM": "its forward may score through a masked embedding instead of the output layer",
    "MiniCPM3ForCausalLM": "its forward scales the hidden states between the decoder and the output layer",
    "ModernBertDecoderForCausalLM": "its forward runs a prediction head before the output layer",
    "ClvpForCausalLM": "its forward normalises the hidden states between the decoder and the output layer",
    "InklingForCausalLM": "its forward cuts the logits to the unpadded vocabulary",
    "Inkling2ForCausalLM": "its forward caps and cuts the logits",
    "CsmDepthDecoderForCausalLM": "its forward picks one output head per codebook",
}


# Causal-LM classes whose packed rows (--padding_free: several sequences in one row) are not exact through any
# attention implementation, as tests/test_model_zoo.py finds them: their rows are padded.
PACKING_UNFIT = {
    "FalconForCausalLM": "its attention mask does not keep a packed row's sequences apart",
    "GptOssForCausalLM": "its attention mask does not keep a packed row's sequences apart",
    "MiniMaxForCausalLM": "its linear-attention layers carry their state across a packed row's sequences",
}
# ... and those whose packed rows `varlen` cannot keep apart (transformers' sdpa and eager can, from position_ids)
VARLEN_UNFIT = {
    "NemotronForCausalLM": "its decoder layers do not pass packed rows' boundaries on to the attention",
}


# Causal-LM classes whose training-mode forward is random beyond dropout: their log-probs while training are not the
# reference's, so DPO refuses them.
RANDOM_IN_TRAINING = {
    "PhimoeForCausalLM": "its router samples experts at random in training mode (Gumbel sparsemixer)",
}


def output_head(model):
    """hidden states -> the logits `model.forward()` returns for them: the output layer, then the family's
    transform (`POST_HEAD_TRANSFORMS`). `model` is the causal LM itself (not a PEFT or distributed wrapper)."""
    layer = model.get_output_embeddings()
    transform = POST_HEAD_TRANSFORMS.get(type(model).__name__)
    if transform is None:
        return layer
    return lambda hidden: transform(model, layer(hidden))


def check_model_family(model_class: type | None, training: bool = False) -> None:
    """Refuse a causal-LM class whose forward() our log-prob path cannot reproduce, or, `training` (DPO), whose
    training forward is random (None: unknown, let it through to the first-batch check)."""
    name = getattr(model_class, "__name__", None)
    if name in UNMATCHED:
        raise ConfigError(f"{name} is not supported: {UNMATCHED[name]}, which our completion log-probs (the output "
                          "layer run on completion tokens only) cannot reproduce")
    if training and name in RANDOM_IN_TRAINING:
        raise ConfigError(f"{name} is not supported for DPO: {RANDOM_IN_TRAINING[name]}, so the policy's log-probs "
                          "while training are not the reference's")


def packing_unfit(model_class: type | None) -> str | None:
    """Why packed rows would be wrong for this causal-LM class (`PACKING_UNFIT`), or None."""
    name = getattr(model_class, "__name__", None)
    return f"{name}: {PACKING_UNFIT[name]}" if name in PACKING_UNFIT else None
