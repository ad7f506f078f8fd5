"""Peak memory per device of a DPO training step, estimated from the model's structure (a meta-device model: no
weights), its dtype, the micro-batch and the engine, for --dry_run. The formula and its check against measured
peaks on CPU are in docs/scaling.md ("Estimating a run's memory").

    weights     P x bytes per weight (sharded engines: / N); a frozen reference copy as much again
    gradients   T x bytes (T: trainable parameters)
    optimizer   T x state bytes (AdamW: 2 states of the weight's dtype; ZeRO-3 12 B fp32 master+m+v; sgd none)
    autocast    T x 2 bytes: bf16/fp16 copies of float32 trainable weights, cached for the step
    activations tokens x (8h + 2kv + k(2h + 4i)) x bytes per layer, L layers (h hidden, kv key/value width,
                k experts per token, i expert width); with gradient checkpointing L x tokens x h x bytes plus
                one layer's; plus one more layer's for backward's working set
    log-probs   C x V x (8 + bytes): one chunk of C completion tokens' logits and its float32 log-softmax and grad
    runtime     a fixed cost per process beyond these tensors (RUNTIME_BYTES)

The per-layer count is what a Mixtral decoder layer saves for backward under sdpa (norms 2h each, attention
3h + 2kv, the routed experts k(2h + 4i) + h), counted with torch's saved-tensor hooks; eager attention adds
heads x sequence length per token.
"""

import dataclasses
import os

import torch

GIB = 2**30
# Per process, beside the tensors counted: on CPU the Trainer's, optimizer's and autograd's own allocations, measured
# as the peak of a 1-pair mixtral-tiny step less its estimate (bench/memory_check.py); on CUDA the context, typical
# of recent GPUs and drivers, not measured here.
RUNTIME_BYTES = {"cpu": 54 * 2**20, "cuda": 512 * 2**20}


@dataclasses.dataclass
class MemoryEstimate:
    """Bytes per device, by part."""
    weights: float
    reference_copy: float
    gradients: float
    optimizer: float
    autocast_copies: float
    activations: float
    logps_chunk: float
    runtime: float

    @property
    def total(self) -> float:
        return sum(dataclasses.astuple(self))

    def line(self) -> str:
        unit, size = ("GiB", GIB) if self.total >= GIB else ("MiB", 2**20)
        parts = [f"{field.name} {getattr(self, field.name) / size:.2f}" for field in dataclasses.fields(self)]
        return f"{self.total / size:.2f} {unit} = " + " + ".join(parts)


def engine_sharding(args) -> tuple[str, int]:
    """(engine, ZeRO stage or 3 for FSDP full sharding, 0 for none), from the arguments or accelerate's launch
    environment."""
    if args.fsdp or os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        return "fsdp", 3
    if args.deepspeed or os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        stage = os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE") or getattr(
            getattr(args, "hf_deepspeed_config", None), "config", {}).get("zero_optimization", {}).get("stage", 0)
        return "deepspeed", int(stage)
    return "ddp", 0


def optimizer_state_bytes(optim: str, weight_bytes: int) -> float:
    """Bytes of optimizer state per trainable parameter (transformers' --optim names)."""
    if "8bit" in optim:
        return 2.0
    if optim.startswith("sgd") or optim.startswith("adafactor"):
        return 0.0  # plain SGD keeps none; Adafactor's factored moments are rows + columns, negligible
    return 2.0 * weight_bytes


def activation_elements_per_token(config, attention: str, sequence_length: int) -> tuple[int, int]:
    """(elements per token one decoder layer saves for backward, hidden size)."""
    hidden = config.hidden_size
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    kv = getattr(config, "num_key_value_heads", heads) * head_dim
    experts_per_token = getattr(config, "num_experts_per_tok", 1)
    intermediate = config.intermediate_size
    per_layer = 8 * hidden + 2 * kv + experts_per_token * (2 * hidden + 4 * intermediate)
    if attention == "eager":
        per_layer += heads * sequence_length
    return per_layer, hidden


def estimate_peak_memory(model, args, *, tokens: int, completion_tokens: int, sequence_length: int,
                         world_size: int, frozen_reference: bool = False) -> tuple[MemoryEstimate, str]:
    """(estimate per device, the engine it assumed) for a training step of `tokens` positions in the micro-batch
    (padding included, or not where rows are packed), `completion_tokens` of them through the output layer, the
    longest sequence `sequence_length`; `frozen_reference`: a copy of the weights scores the reference every step.
    `model` may live on the meta device."""
    parameters = list(model.parameters())
    weights = sum(p.numel() * p.element_size() for p in parameters)
    trainable = [p for p in parameters if p.requires_grad]
    trainable_count = sum(p.numel() for p in trainable)
    weight_bytes = trainable[0].element_size() if trainable else 4
    gradients = sum(p.numel() * p.element_size() for p in trainable)
    optimizer = trainable_count * optimizer_state_bytes(args.optim, weight_bytes)
    compute_bytes = 2 if (args.bf16 or args.fp16) else 4
    autocast = trainable_count * 2 if compute_bytes == 2 and weight_bytes == 4 else 0
    engine, stage = engine_sharding(args)
    shards = max(world_size, 1)
    if engine == "fsdp":  # accelerate keeps float32 shards: 4 B weights and gradients, 8 B Adam states
        weights, gradients, optimizer = (sum(p.numel() for p in parameters) * 4 / shards, trainable_count * 4 / shards,
                                         trainable_count * optimizer_state_bytes(args.optim, 4) / shards)
    elif engine == "deepspeed":
        if stage >= 1:
            optimizer = trainable_count * (12 if "8bit" not in args.optim else 6) / shards  # fp32 master + m + v
        if stage >= 2:
            gradients /= shards
        if stage >= 3:
            weights /= shards
    config = model.config
    per_layer, hidden = activation_elements_per_token(config, config._attn_implementation, sequence_length)
    layers = config.num_hidden_layers
    if args.activation_checkpointing:  # the layers' inputs, one layer recomputed
        saved = layers * hidden + per_layer
    else:
        saved = layers * per_layer
    activations = tokens * (saved + per_layer) * compute_bytes  # + one layer's gradients in backward
    chunk = min(completion_tokens, args.logps_chunk_size)
    vocab = model.get_output_embeddings().out_features
    logps_chunk = chunk * vocab * (8 + compute_bytes)
    runtime = RUNTIME_BYTES["cpu" if args.use_cpu or not torch.cuda.is_available() else "cuda"]
    reference_copy = weights if frozen_reference else 0
    estimate = MemoryEstimate(weights, reference_copy, gradients, optimizer, autocast, activations, logps_chunk,
                              runtime)
    return estimate, f"{engine}{f' ZeRO-{stage}' if engine == 'deepspeed' else ''} on {shards} process(es)"
