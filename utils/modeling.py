"""Tokenizer and policy: a seeded Mixtral-style preset built from a config, or any checkpoint.

This module alone decides the attention and experts implementations, the weights' dtype and the LoRA setup.
"""

import contextlib
import copy
import functools
import importlib.util
import json
import logging
from dataclasses import dataclass, field

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer,
                          BitsAndBytesConfig, FineGrainedFP8Config, MixtralConfig, MixtralForCausalLM,
                          PreTrainedTokenizerFast)
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS, grouped_mm_experts_forward
from transformers.models.auto.auto_factory import _get_model_class
from transformers.utils import find_adapter_config_file, is_flash_attn_2_available

from utils import toy_task
from utils.attention import VARLEN_ATTENTION, cuda_varlen_kernel_available
from utils.errors import ConfigError
from utils.families import VARLEN_UNFIT, check_model_family

logger = logging.getLogger(__name__)

# Mixtral's shape in miniature: 4+ experts, top-2 routing, grouped-query attention (fewer kv heads).
PRESETS = {
    # unit tests: a forward+backward in milliseconds
    "mixtral-tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2),
    # the demo: big enough to learn the toy grammar in a minute on 2 cores
    "mixtral-toy": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
                        num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2),
    # benchmarks: ~45M parameters with Mixtral's 32k vocabulary, so logits cost what they cost in real runs
    "mixtral-small": dict(hidden_size=384, intermediate_size=768, num_hidden_layers=4, num_attention_heads=6,
                          num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, vocab_size=32000),
    # GPU benchmarks: ~1.3B parameters (~0.45B active per token), Mixtral's 8 experts and 32k vocabulary
    "mixtral-1b": dict(hidden_size=2048, intermediate_size=2816, num_hidden_layers=8, num_attention_heads=16,
                       num_key_value_heads=4, num_local_experts=8, num_experts_per_tok=2, vocab_size=32000),
    # GPU benchmarks on Mixtral-8x7B's exact layer shapes (so the kernels are the real run's), 2 of its 32 layers:
    # ~3.2B parameters (1.45B per layer, 0.26B of embeddings and output layer)
    "mixtral-8x7b-2l": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=2, num_attention_heads=32,
                            num_key_value_heads=8, num_local_experts=8, num_experts_per_tok=2, vocab_size=32000),
}
TOY_TOKENIZER_VOCAB_SIZE = 1024
PAD, BOS, EOS = "<pad>", "<s>", "</s>"
ROLE_TOKENS = ["<|system|>", "<|user|>", "<|assistant|>"]
# Zephyr-style template; every turn ends in eos, so a rendered assistant turn is a complete completion.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
LORA_TARGETS_MIXTRAL = ["q_proj", "k_proj", "v_proj", "o_proj"]
REFERENCE_ADAPTER = "reference"  # a loaded adapter's frozen copy: the reference while that adapter trains
# The implementations that keep packed sequences apart: ours and flash_attention_2 read the collator's cu_seq_lens; transformers' sdpa and
# eager build a dense block mask from position_ids (only with no attention_mask and no KV cache).
PACKED_ROW_ATTENTIONS = (VARLEN_ATTENTION, "flash_attention_2", "sdpa", "eager")


@dataclass
class ModelArguments:
    model_name_or_path: str = field(
        default="mixtral-toy",
        metadata={"help": f"A preset ({', '.join(PRESETS)}), a local checkpoint folder or a Hub name."})
    model_revision: str = field(default="main", metadata={"help": "Hub branch, tag or commit."})
    model_init_seed: int = field(default=0, metadata={"help": "Seed of a preset's random initial weights."})
    dtype: str = field(
        default="float32",
        metadata={"help": "Weights' dtype: float32 (TRL's default: with --bf16, float32 master weights under bf16 "
                          "autocast), bfloat16, float16, or auto (float32 for presets, the checkpoint's own "
                          "otherwise). Recipes' torch_dtype is read as this.",
                  "choices": ["auto", "float32", "bfloat16", "float16"]})
    attn_implementation: str | None = field(
        default=None,
        metadata={"help": "eager, sdpa, flash_attention_2 or varlen, if the model class supports it; default: varlen "
                          "for packed rows where it fits the model, else flash_attention_2 where transformers finds "
                          "flash-attn 2, the GPU is Ampere or newer and the compute dtype fp16/bf16, else sdpa where "
                          "the model class supports it, else eager."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Run model code shipped with a checkpoint."})
    use_peft: bool = field(default=False, metadata={"help": "Train LoRA adapters instead of all weights."})
    load_in_fp8: bool = field(
        default=False, metadata={"help": "LoRA over a frozen base quantized to FP8 while loading (transformers' "
                                         "FineGrainedFP8, 128x128 blocks, fused MoE experts included: half the bf16 "
                                         "memory); needs --use_peft and a GPU of compute capability >= 8.9 (H100)."})
    load_in_4bit: bool = field(
        default=False, metadata={"help": "QLoRA: LoRA over a frozen base quantized to 4 bits by bitsandbytes while "
                                         "loading; needs --use_peft, CUDA and bitsandbytes. Only nn.Linear layers are "
                                         "quantized: a MoE's fused experts stay in --dtype."})
    bnb_4bit_quant_type: str = field(
        default="nf4", metadata={"help": "4-bit data type of --load_in_4bit.", "choices": ["nf4", "fp4"]})
    use_bnb_nested_quant: bool = field(
        default=False, metadata={"help": "--load_in_4bit: quantize the quantization constants too (double quant)."})
    bnb_4bit_quant_storage: str | None = field(
        default=None, metadata={"help": "--load_in_4bit: dtype the packed 4-bit weights are stored in (FSDP needs "
                                        "the other weights' dtype); default uint8."})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA scaling numerator (scale = alpha / r)."})
    lora_dropout: float = field(default=0.05, metadata={"help": "Dropout on the LoRA branch."})
    lora_target_modules: list[str] | None = field(
        default=None, metadata={"help": f"Modules that get adapters; default {LORA_TARGETS_MIXTRAL} where the model "
                                        "has them, else PEFT's table for its family, else all linear layers."})
    lora_modules_to_save: list[str] | None = field(
        default=None, metadata={"help": "Modules trained in full beside the adapters (e.g. embed_tokens lm_head)."})
    use_rslora: bool = field(default=False, metadata={"help": "Rank-stabilised LoRA: scale = alpha / sqrt(r)."})
    use_dora: bool = field(default=False, metadata={"help": "DoRA: weight-decomposed LoRA."})

    def __post_init__(self):
        check_quantization(self)

    @property
    def is_preset(self) -> bool:
        return self.model_name_or_path in PRESETS


@functools.lru_cache(maxsize=1)
def toy_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level BPE trained on the toy corpus: any text encodes, toy words are single tokens."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=TOY_TOKENIZER_VOCAB_SIZE, special_tokens=[PAD, BOS, EOS, *ROLE_TOKENS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(toy_task.make_corpus(5000, seed=1234), trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token=PAD, bos_token=BOS, eos_token=EOS,
                                   additional_special_tokens=ROLE_TOKENS, chat_template=CHAT_TEMPLATE)


def load_tokenizer(args: ModelArguments, pad_apart_from_eos: bool = False):
    """The model's tokenizer. One without a pad token pads with eos, which is safe where padding is masked by
    lengths (DPO, SFT, sampling). TRL's reward and PPO code masks by `pad_token_id` instead: there eos as pad would
    hide the policy's eos, and with a chat template that ends turns in eos prompt tokens too. So with
    `pad_apart_from_eos` such a tokenizer gets a pad token of its own (`load_model` gives it an embedding row)."""
    if args.is_preset:
        tokenizer = copy.deepcopy(toy_tokenizer())  # callers may set padding_side etc.: keep the cached one pristine
    else:
        try:
            tokenizer = AutoTokenizer.from_pretrained(args.model_name_or_path, revision=args.model_revision,
                                                      trust_remote_code=args.trust_remote_code)
        except OSError as error:  # transformers' message for a missing local folder talks of the Hub only
            raise ConfigError(f"{args.model_name_or_path}: no tokenizer there: not a preset ({', '.join(PRESETS)}), "
                              f"a checkpoint folder or a Hub model ({' '.join(str(error).split())})") from None
    if tokenizer.eos_token is None:
        raise ConfigError(f"tokenizer of {args.model_name_or_path} has no eos token: completions cannot be ended")
    if pad_apart_from_eos and (tokenizer.pad_token is None or tokenizer.pad_token_id == tokenizer.eos_token_id):
        tokenizer.add_special_tokens({"pad_token": PAD})
        logger.warning("tokenizer of %s has no pad token apart from eos: added %r (id %d), as TRL masks padding by "
                       "its id", args.model_name_or_path, PAD, tokenizer.pad_token_id)
    elif tokenizer.pad_token is None:
        logger.warning("tokenizer of %s has no pad token: using eos %r", args.model_name_or_path, tokenizer.eos_token)
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def model_config(args: ModelArguments):
    """The model's config alone: no weights, no tokenizer, so that a script can decide before loading anything. A
    PEFT adapter's is its base model's. None for a preset (built from MixtralConfig when loaded) or where no config
    can be read (load_tokenizer, which runs next, names the problem in one line)."""
    if args.is_preset:
        return None
    name, revision = adapter_base(args) or (args.model_name_or_path, args.model_revision)
    try:
        return AutoConfig.from_pretrained(name, revision=revision, trust_remote_code=args.trust_remote_code)
    except OSError:
        return None


def model_sliding_window(args: ModelArguments) -> int | None:
    """The model's attention window (None: full causal attention), read from its config alone. The presets have
    none."""
    return getattr(model_config(args), "sliding_window", None)


def causal_lm_class(args: ModelArguments, config=None) -> type | None:
    """The class AutoModelForCausalLM builds for the model, known from its config before anything loads; None for
    code shipped with a checkpoint (--trust_remote_code) or a config no causal LM takes."""
    if args.is_preset:
        return MixtralForCausalLM
    config = model_config(args) if config is None else config
    if config is None or getattr(config, "auto_map", None) and args.trust_remote_code:
        return None
    try:
        return _get_model_class(config, AutoModelForCausalLM._model_mapping)
    except (KeyError, ValueError):
        return None


def flash_attention_2_usable(dtype) -> bool:
    """flash_attention_2 runs here: transformers finds flash-attn 2 (its package, a version it takes, CUDA), the GPU is
    Ampere or newer (the kernels' minimum) and the compute dtype is fp16/bf16 (flash kernels take no float32)."""
    return (dtype in (torch.float16, torch.bfloat16) and is_flash_attn_2_available() and torch.cuda.is_available()
            and torch.cuda.get_device_capability() >= (8, 0))


def varlen_unfit(model_class: type | None, config) -> str | None:
    """Why `varlen` (utils/attention.py) cannot compute this model's attention, or None: it has no sliding window and
    no attention softcapping, and it reads transformers' variable-length arguments only from models that call
    their attention through the AttentionInterface (transformers' `_supports_attention_backend`)."""
    if getattr(config, "sliding_window", None) is not None:
        return f"has no sliding window, and this model attends through one of {config.sliding_window} tokens"
    if getattr(config, "attn_logit_softcapping", None) is not None:
        return (f"has no attention softcapping, and this model caps its attention scores at "
                f"{config.attn_logit_softcapping}")
    if model_class is not None and model_class.__name__ in VARLEN_UNFIT:
        return f"cannot serve {model_class.__name__}: {VARLEN_UNFIT[model_class.__name__]}"
    if model_class is not None and not model_class._supports_attention_backend:
        return (f"reads packed rows' boundaries through transformers' attention interface, which "
                f"{model_class.__name__} does not call")
    return None


def resolve_attn_implementation(requested: str | None, model_class: type | None = None, config=None,
                                packed: bool = False, dtype=torch.float32) -> str:
    """The attention implementation, the one place that decides it: the requested one if the model class takes it
    (transformers' own `_supports_sdpa` / `_supports_flash_attn` / `_supports_flex_attn` flags), else one line;
    with none requested, `varlen` for packed (padding-free) rows where it fits the model (`varlen_unfit`), else
    flash_attention_2 where it is usable (`flash_attention_2_usable`, `dtype` being the compute precision), else
    sdpa if the class supports it, else eager. `model_class` None (code shipped with a checkpoint): no class check."""
    flags = {"sdpa": "_supports_sdpa", "flash_attention_2": "_supports_flash_attn",
             "flex_attention": "_supports_flex_attn"}

    def takes(name: str) -> bool:
        return model_class is None or name not in flags or getattr(model_class, flags[name])

    if requested == VARLEN_ATTENTION:
        unfit = varlen_unfit(model_class, config)
        if unfit is not None:
            raise ConfigError(f"--attn_implementation {VARLEN_ATTENTION} {unfit}: use sdpa, eager or "
                              "flash_attention_2")
        return requested
    if requested:
        if not takes(requested):
            usable = [name for name in ("eager", *flags) if takes(name)]
            raise ConfigError(f"--attn_implementation {requested}: {model_class.__name__} does not support it "
                              f"(transformers' {model_class.__name__}.{flags[requested]} is False); use one of "
                              f"{usable}")
        if requested == "flash_attention_2" and not flash_attention_2_usable(dtype):
            raise ConfigError(f"--attn_implementation flash_attention_2 needs flash-attn 2 installed, a CUDA GPU of "
                              f"compute capability >= 8.0 and fp16/bf16 compute (--bf16, --fp16 or such --dtype); "
                              f"here the compute dtype is {dtype}: use sdpa or eager")
        return requested
    if packed and varlen_unfit(model_class, config) is None:
        return VARLEN_ATTENTION
    if takes("flash_attention_2") and flash_attention_2_usable(dtype):
        return "flash_attention_2"
    return "sdpa" if takes("sdpa") else "eager"


def compute_dtype_of(args: ModelArguments, config, autocast_dtype=None) -> torch.dtype:
    """The dtype a model's attention computes in: the training's autocast dtype (--bf16, --fp16) where there is one,
    else the weights' (--dtype, or the checkpoint's own with auto)."""
    if autocast_dtype not in (None, torch.float32):
        return autocast_dtype
    dtype = resolve_dtype(args)
    if dtype == "auto":
        dtype = getattr(config, "dtype", None) or torch.float32
    return getattr(torch, dtype) if isinstance(dtype, str) else dtype


def model_attention(args: ModelArguments, packed: bool = False, autocast_dtype=None) -> str:
    """`resolve_attn_implementation` for the model `args` name, from its config and class alone (nothing loads);
    `autocast_dtype`: the training's mixed precision, None where the model runs in its weights' dtype."""
    config = model_config(args)
    return resolve_attn_implementation(args.attn_implementation, causal_lm_class(args, config), config, packed,
                                       compute_dtype_of(args, config, autocast_dtype))


def adapter_base(args: ModelArguments) -> tuple[str, str] | None:
    """(base model, its revision) that a PEFT adapter folder or Hub repo names in its adapter_config.json; None for
    a preset or a whole checkpoint."""
    if args.is_preset:
        return None
    adapter_config = find_adapter_config_file(args.model_name_or_path, revision=args.model_revision)
    if adapter_config is None:
        return None
    with open(adapter_config) as f:
        config = json.load(f)
    return config["base_model_name_or_path"], config.get("revision") or "main"


def packed_rows_by_default(use_cpu: bool, half_precision: bool, sliding_window: int | None = None) -> bool:
    """Padding-free is the default where packed rows run through a variable-length flash kernel: CUDA, in bf16 or
    fp16 (flash kernels take no float32); for a model with a sliding window (`model_sliding_window`), which ours
    lacks, only flash-attn's (flash_attention_2). Elsewhere packed rows attend through a dense block mask, so
    padded rows stay the default."""
    if use_cpu or not half_precision:
        return False
    if sliding_window is None:
        return cuda_varlen_kernel_available()
    return flash_attention_2_usable(torch.bfloat16)


def check_left_padding(args: ModelArguments) -> None:
    """Refuse the packed implementation for a script whose batches are left-padded (TRL's PPO: prompts end at one
    column). `varlen` gets no attention mask from transformers and reads padded rows as right-padded, so real tokens
    would attend to the padding before them."""
    if args.attn_implementation == VARLEN_ATTENTION:
        raise ConfigError(f"--attn_implementation {VARLEN_ATTENTION} ignores padding masks, and this script's batches "
                          "are left-padded: use sdpa, eager or flash_attention_2")


@contextlib.contextmanager
def generation_attention(model):
    """generate() left-pads its prompts, which the packed implementation (right padding only) cannot mask:
    sdpa stands in while generating."""
    implementation = model.config._attn_implementation
    if implementation != VARLEN_ATTENTION:
        yield
        return
    model.set_attn_implementation("sdpa")
    try:
        yield
    finally:
        model.set_attn_implementation(implementation)


def resolve_dtype(args: ModelArguments):
    if args.dtype == "auto":
        return torch.float32 if args.is_preset else "auto"
    return getattr(torch, args.dtype)


def preset_config(name: str, tokenizer) -> MixtralConfig:
    kwargs = dict(vocab_size=-(-len(tokenizer) // 64) * 64)  # round up to a multiple of 64 for matmul speed
    kwargs.update(PRESETS[name])
    return MixtralConfig(max_position_embeddings=2048, output_router_logits=True, tie_word_embeddings=False,
                         pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, **kwargs)


def autocast_grouped_mm_experts_forward(self, hidden_states, top_k_index, top_k_weights):
    """transformers' grouped_mm experts, computed in autocast's dtype while autocast is on.

    torch's grouped_mm is not autocast-enabled and transformers casts its input to the weights' dtype, so
    float32 weights under bf16 autocast (the Trainer's --bf16) ran the experts, most of a MoE layer's FLOPs,
    in float32. We cast the expert weights as autocast casts an nn.Linear's (gradients reach the float32
    weights through the cast)."""
    device_type = hidden_states.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        weights = {name: weight.to(dtype) for name, weight in self.named_parameters(recurse=False)
                   if weight.is_floating_point() and weight.dtype != dtype}
        if weights:  # call again on the cast weights: then this branch finds none left to cast
            output = torch.func.functional_call(self, weights, (hidden_states.to(dtype), top_k_index, top_k_weights))
            return output.to(hidden_states.dtype)
    return grouped_mm_experts_forward(self, hidden_states, top_k_index, top_k_weights)


AUTOCAST_GROUPED_MM = "autocast_grouped_mm"
ALL_EXPERTS_FUNCTIONS.register(AUTOCAST_GROUPED_MM, autocast_grouped_mm_experts_forward)


def check_quantization(args: ModelArguments) -> None:
    """Quantized loading that cannot work, refused when the arguments are made: before anything loads."""
    flags = [flag for flag in ("load_in_4bit", "load_in_fp8") if getattr(args, flag)]
    if not flags:
        return
    if len(flags) > 1:
        raise ConfigError("--load_in_4bit and --load_in_fp8 exclude each other: pick one quantization of the base")
    flag = flags[0]
    if args.is_preset or not args.use_peft:
        raise ConfigError(f"--{flag} quantizes a checkpoint's frozen weights under LoRA: it needs --use_peft and a "
                          f"checkpoint, not a preset (got {args.model_name_or_path}"
                          f"{'' if args.use_peft else ' without --use_peft'})")
    if not torch.cuda.is_available():
        raise ConfigError(f"--{flag} needs a CUDA GPU, and none is visible")
    if args.load_in_4bit and importlib.util.find_spec("bitsandbytes") is None:
        raise ConfigError("--load_in_4bit needs bitsandbytes, which is not installed (pip install bitsandbytes)")
    if args.load_in_fp8 and torch.cuda.get_device_capability() < (8, 9):
        major, minor = torch.cuda.get_device_capability()
        raise ConfigError(f"--load_in_fp8 needs a GPU of compute capability >= 8.9 (H100, L4), this one's is "
                          f"{major}.{minor} (transformers would silently keep the weights in bf16): use --load_in_4bit")


def quantization_config(args: ModelArguments):
    """How transformers quantizes the frozen base while loading (--load_in_fp8, --load_in_4bit), or None."""
    if args.load_in_fp8:  # 1 byte per weight (+ a scale per 128x128 block), bf16 compute, fused MoE experts included
        return FineGrainedFP8Config()
    if args.load_in_4bit:  # bitsandbytes replaces nn.Linear layers only: fused MoE experts keep --dtype
        compute_dtype = torch.bfloat16 if args.dtype == "auto" else getattr(torch, args.dtype)
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=args.bnb_4bit_quant_type,
                                  bnb_4bit_use_double_quant=args.use_bnb_nested_quant,
                                  bnb_4bit_compute_dtype=compute_dtype,
                                  bnb_4bit_quant_storage=args.bnb_4bit_quant_storage)
    return None


def load_model(args: ModelArguments, tokenizer, num_labels: int | None = None, packed: bool = False,
               autocast_dtype=None, meta: bool = False):
    """A causal LM (or, with `num_labels`, a sequence classifier sharing its body) from a preset or checkpoint;
    `packed`: it will see padding-free rows; `autocast_dtype`: the training's mixed precision, None where the model
    computes in its weights' dtype (see resolve_attn_implementation). `meta`: the same model's structure on the meta
    device, from the config alone (no weights read or allocated), for --dry_run."""
    auto_class = AutoModelForCausalLM if num_labels is None else AutoModelForSequenceClassification
    if num_labels is None:
        check_model_family(causal_lm_class(args))
    attn = model_attention(args, packed, autocast_dtype)
    dtype = resolve_dtype(args)
    extra = {} if num_labels is None else {"num_labels": num_labels}
    if args.is_preset or meta:
        if args.is_preset:
            config = preset_config(args.model_name_or_path, tokenizer)
        else:
            config = model_config(args)  # an adapter's: its base model's
            dtype = config.dtype if dtype == "auto" else dtype  # from_pretrained's "auto": the checkpoint's own
        for key, value in extra.items():
            setattr(config, key, value)
        torch.manual_seed(args.model_init_seed)
        with torch.device("meta") if meta else contextlib.nullcontext():
            model = auto_class.from_config(config, attn_implementation=attn, dtype=dtype,
                                           trust_remote_code=args.trust_remote_code)
    else:
        quantization = quantization_config(args)
        if quantization is not None:  # quantized while loading, onto this process's GPU
            from accelerate import PartialState

            extra.update(device_map={"": PartialState().local_process_index}, quantization_config=quantization)
        base = adapter_base(args) if num_labels is None else None
        name, revision = base or (args.model_name_or_path, args.model_revision)
        model = auto_class.from_pretrained(name, revision=revision, dtype=dtype, attn_implementation=attn,
                                           trust_remote_code=args.trust_remote_code, **extra)
        if base is not None:
            model = load_trainable_adapter(model, args)
    # The tokenizer decides padding: an embedding row for a pad token load_tokenizer added, and the config naming
    # it (a checkpoint's may name eos), as sequence classifiers find each row's last token by it.
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(len(tokenizer))
    model.config.pad_token_id = tokenizer.pad_token_id
    # transformers' default for MoE; quantized models (FP8 experts) dispatch through their own implementations
    if getattr(model.config, "_experts_implementation", None) == "grouped_mm" \
            and getattr(model, "hf_quantizer", None) is None:
        model.set_experts_implementation(AUTOCAST_GROUPED_MM)
    logger.info("model %s: %.1fM parameters, dtype %s, attention %s", args.model_name_or_path,
                model.num_parameters() / 1e6, model.dtype, attn)
    return model


def lora_target_modules(model, args: ModelArguments):
    """--lora_target_modules, else the attention projections: q/k/v/o_proj where the model has them (Mixtral, Llama
    and most families), else PEFT's own table for the model's family (GPT-2's c_attn, Falcon's query_key_value),
    else every linear layer (PEFT's "all-linear")."""
    if args.lora_target_modules:
        return args.lora_target_modules
    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    if set(LORA_TARGETS_MIXTRAL) <= names:
        return LORA_TARGETS_MIXTRAL
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as PEFT_TARGETS

    return PEFT_TARGETS.get(model.config.model_type, "all-linear")


def load_trainable_adapter(base_model, args: ModelArguments):
    """The adapter `args.model_name_or_path` on its loaded base model, trainable: the model a user brings is base +
    adapter, and training goes on from it, as TRL does with a PeftModel. A frozen copy of the adapter,
    REFERENCE_ADAPTER, is the reference: the initial policy, not the base alone (`utils.reference.reference_mode`)."""
    from peft import PeftModel

    model = PeftModel.from_pretrained(base_model, args.model_name_or_path, revision=args.model_revision,
                                      is_trainable=True)
    model.load_adapter(args.model_name_or_path, adapter_name=REFERENCE_ADAPTER, revision=args.model_revision,
                       is_trainable=False)
    logger.info("adapter %s on its base %s: the adapter trains, a frozen copy of it is the reference",
                args.model_name_or_path, base_model.name_or_path)
    return model


def apply_lora(model, args: ModelArguments, modules_to_save: list[str] | None = None):
    """LoRA adapters on `lora_target_modules`; `modules_to_save` (a classifier's new head) train in full, with
    --lora_modules_to_save. A model loaded with its own adapter (`load_trainable_adapter`) trains that one."""
    from peft import LoraConfig, PeftModel, get_peft_model

    if isinstance(model, PeftModel):  # a new adapter on top would start the loaded one afresh
        logger.info("LoRA: training the adapter %s as it is; the --lora_* flags do not apply", args.model_name_or_path)
        return model

    config = LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                        target_modules=lora_target_modules(model, args),
                        modules_to_save=[*(args.lora_modules_to_save or []), *(modules_to_save or [])] or None,
                        use_rslora=args.use_rslora, use_dora=args.use_dora,
                        task_type="CAUSAL_LM" if modules_to_save is None else "SEQ_CLS")
    model = get_peft_model(model, config)
    trainable, total = model.get_nb_trainable_parameters()
    logger.info("LoRA: %.2fM of %.1fM parameters trainable", trainable / 1e6, total / 1e6)
    return model


def disable_dropout(model) -> None:
    """Zero every dropout: nn.Dropout layers, and the rates modules and configs keep for functional dropout
    (SEED-OSS's residual_dropout, most families' attention_dropout), so that a training forward computes what an
    eval forward does."""
    for module in [model, *model.modules()]:
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        for owner in (module, getattr(module, "config", None)):
            rates = [name for name, value in vars(owner).items() if name.endswith("dropout")
                     and isinstance(value, float)] if owner is not None else []
            for name in rates:
                setattr(owner, name, 0.0)


def router_kwargs(model, enabled: bool) -> dict:
    """Forward kwargs asking a mixture-of-experts model for (or not) its router logits and aux loss."""
    return {"output_router_logits": enabled} if hasattr(model.config, "output_router_logits") else {}
