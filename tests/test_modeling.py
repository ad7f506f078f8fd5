"""utils/modeling.py: presets, toy tokenizer, checkpoints, LoRA, attention, experts; no pickle, no remote code."""

import copy
import dataclasses
import logging
import re
from pathlib import Path

import pytest
import torch
from transformers import (BitsAndBytesConfig, MistralConfig, MistralForCausalLM, MixtralConfig, MixtralForCausalLM,
                          MixtralForSequenceClassification)

import train_dpo
from utils import modeling, toy_task
from utils.cli import run_script
from utils.errors import ConfigError
from utils.data import DataArguments, PreferenceCollator, load_preference_data
from utils.logprobs import model_logps
from utils.modeling import (PRESETS, ModelArguments, apply_lora, load_model, load_tokenizer, preset_config,
                            resolve_attn_implementation)

REPO = Path(__file__).resolve().parents[1]
TINY = ModelArguments(model_name_or_path="mixtral-tiny")


def tiny(tokenizer, **overrides):
    args = ModelArguments(model_name_or_path="mixtral-tiny", **overrides)
    return load_model(args, tokenizer)


def encode_batch(tokenizer, texts):
    return tokenizer(texts, return_tensors="pt", padding=True)


@torch.no_grad()
def logits(model, batch):
    model.eval()
    return model(**batch).logits


# ------------------------------------------------------------------------------------------------ presets

@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_are_mixtral_shaped(name, tokenizer):
    config = preset_config(name, tokenizer)
    assert isinstance(config, MixtralConfig)
    assert config.num_local_experts >= 4 and config.num_experts_per_tok == 2
    assert config.num_key_value_heads < config.num_attention_heads
    assert config.num_attention_heads % config.num_key_value_heads == 0
    assert config.vocab_size >= len(tokenizer)  # every token id has an embedding row
    assert (config.pad_token_id, config.eos_token_id) == (tokenizer.pad_token_id, tokenizer.eos_token_id)


def test_tiny_preset_builds_a_mixtral_causal_lm(tokenizer):
    model = load_model(TINY, tokenizer)
    assert isinstance(model, MixtralForCausalLM)
    assert model.dtype == torch.float32
    assert model.get_input_embeddings().weight.shape[0] >= len(tokenizer)
    batch = encode_batch(tokenizer, ["i loved the movie.", "the plot was dull and slow."])
    out = logits(model, batch)
    assert out.shape == (*batch["input_ids"].shape, model.config.vocab_size)
    assert torch.isfinite(out).all()


def test_same_seed_same_weights_other_seed_other_weights(tokenizer):
    first = tiny(tokenizer, model_init_seed=3).state_dict()
    torch.rand(100)  # the global RNG moved on in between: the preset reseeds anyway
    again = tiny(tokenizer, model_init_seed=3).state_dict()
    other = tiny(tokenizer, model_init_seed=4).state_dict()
    assert first.keys() == again.keys() == other.keys()
    assert all(torch.equal(first[k], again[k]) for k in first)
    random_init = [k for k in first if first[k].std() > 0]  # (norms start at 1 whatever the seed)
    assert random_init and all(not torch.equal(first[k], other[k]) for k in random_init)


def test_explicit_dtype(tokenizer):
    model = tiny(tokenizer, dtype="bfloat16")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


# ---------------------------------------------------------------------------------------------- tokenizer

def test_toy_tokenizer_special_tokens_and_template(tokenizer):
    handed_out = load_tokenizer(TINY)
    assert handed_out is not tokenizer and handed_out.get_vocab() == tokenizer.get_vocab()
    handed_out.padding_side = "left"  # a caller's change must not leak into the cached tokenizer
    assert load_tokenizer(TINY).padding_side == tokenizer.padding_side == "right"
    ids = {tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.bos_token_id}
    assert None not in ids and len(ids) == 3  # pad, eos and bos are distinct tokens
    assert tokenizer.chat_template
    assert tokenizer(tokenizer.eos_token, add_special_tokens=False)["input_ids"] == [tokenizer.eos_token_id]
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                             add_generation_prompt=True)
    assert "hi" in rendered and rendered != tokenizer.apply_chat_template([{"role": "user", "content": "hi"}],
                                                                          tokenize=False)


@pytest.mark.parametrize("text", ["i watched this movie last night. the plot was really brilliant.",
                                  "Anything at all: naïve café, 42%, tabs\tand\nnewlines 🎬"])
def test_toy_tokenizer_round_trips_text(text, tokenizer):
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text


def test_toy_words_are_single_tokens(tokenizer):
    words = {w for table in (toy_task.ADJECTIVES, toy_task.VERBS) for kind in table.values() for w in kind}
    words |= {w for noun in toy_task.NOUNS for w in noun.split()}
    assert all(len(tokenizer(" " + word)["input_ids"]) == 1 for word in words)


# ---------------------------------------------------------------------------------------------- checkpoints

def test_saved_checkpoint_reloads_with_identical_logits(tmp_path, tokenizer):
    model = load_model(TINY, tokenizer)
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)

    args = ModelArguments(model_name_or_path=str(tmp_path))
    assert not args.is_preset
    reloaded_tokenizer = load_tokenizer(args)
    reloaded = load_model(args, reloaded_tokenizer)

    text = ["i saw this film with my sister. the ending was moving.", "short one."]
    assert reloaded_tokenizer(text)["input_ids"] == tokenizer(text)["input_ids"]
    assert reloaded_tokenizer.chat_template == tokenizer.chat_template
    assert (reloaded_tokenizer.pad_token_id, reloaded_tokenizer.eos_token_id) == (tokenizer.pad_token_id,
                                                                                  tokenizer.eos_token_id)
    assert isinstance(reloaded, MixtralForCausalLM) and reloaded.dtype == torch.float32
    batch = encode_batch(tokenizer, text)
    assert torch.equal(logits(model, batch), logits(reloaded, batch))


# --------------------------------------------------------------------------------------------------- LoRA

def test_lora_trains_only_adapters_and_starts_as_the_base_model(tokenizer):
    args = ModelArguments(model_name_or_path="mixtral-tiny", use_peft=True, lora_r=4)
    model = load_model(args, tokenizer)
    batch = encode_batch(tokenizer, ["i loved the movie."])
    base_logits = logits(model, batch)
    base_names = {name for name, _ in model.named_parameters()}

    peft_model = apply_lora(model, args)
    trainable = {name: p for name, p in peft_model.named_parameters() if p.requires_grad}
    frozen = [name for name, p in peft_model.named_parameters() if not p.requires_grad]
    assert trainable and all("lora_" in name for name in trainable)
    assert len(frozen) == len(base_names)  # every original weight is frozen
    assert {p.shape[0] for name, p in trainable.items() if "lora_A" in name} == {4}
    targets = {name.split(".lora_")[0].rsplit(".", 1)[-1] for name in trainable}
    assert targets == set(modeling.LORA_TARGETS_MIXTRAL)
    assert torch.allclose(logits(peft_model, batch), base_logits)  # B starts at zero


def test_lora_on_a_classifier_also_trains_the_head(tokenizer):
    args = ModelArguments(model_name_or_path="mixtral-tiny", use_peft=True, lora_r=4)
    model = apply_lora(load_model(args, tokenizer, num_labels=1), args, modules_to_save=["score"])
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert any("score" in name for name in trainable)
    assert all("lora_" in name or "score" in name for name in trainable)


# -------------------------------------------------------------------------------------- sequence classifier

def test_num_labels_gives_a_sequence_classifier(tokenizer):
    model = load_model(TINY, tokenizer, num_labels=1)
    assert isinstance(model, MixtralForSequenceClassification)
    assert model.config.pad_token_id == tokenizer.pad_token_id  # needed to find each row's last token
    batch = encode_batch(tokenizer, ["i loved it.", "the plot was dull and the acting was weak."])
    assert batch["attention_mask"][0].sum() < batch["attention_mask"][1].sum()  # padded batch
    scores = logits(model, batch)
    assert scores.shape == (2, 1)
    # a row's score does not depend on the padding added to it
    alone = logits(model, encode_batch(tokenizer, ["i loved it."]))
    assert torch.allclose(scores[0], alone[0], atol=1e-5)


def test_checkpoint_without_pad_token_pads_with_eos(tmp_path, tokenizer, caplog):
    no_pad = copy.deepcopy(tokenizer)
    no_pad.pad_token = None
    no_pad.save_pretrained(tmp_path)
    model = load_model(TINY, tokenizer)
    model.config.pad_token_id = None
    model.save_pretrained(tmp_path)

    args = ModelArguments(model_name_or_path=str(tmp_path))
    with caplog.at_level(logging.WARNING, logger="utils.modeling"):
        reloaded_tokenizer = load_tokenizer(args)
    assert reloaded_tokenizer.pad_token_id == tokenizer.eos_token_id
    assert "no pad token" in caplog.text
    classifier = load_model(args, reloaded_tokenizer, num_labels=1)
    assert isinstance(classifier, MixtralForSequenceClassification)
    assert classifier.config.pad_token_id == tokenizer.eos_token_id  # batched scoring can find last tokens
    batch = encode_batch(reloaded_tokenizer, ["i loved it.", "a longer review here."])
    assert logits(classifier, batch).shape == (2, 1)


# ---------------------------------------------------------------------------------------------- attention

def fake_gpu(monkeypatch, capability=(9, 0), flash_attn=True):
    """A CUDA GPU of `capability`, with flash-attn 2 as transformers finds it (or not)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *args: capability)
    monkeypatch.setattr(modeling, "is_flash_attn_2_available", lambda: flash_attn)


def test_attention_implementation(monkeypatch, tokenizer):
    from transformers import Gemma2ForCausalLM, LlamaForCausalLM

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_attn_implementation(None, LlamaForCausalLM) == "sdpa"
    assert resolve_attn_implementation(None, Gemma2ForCausalLM) == "eager"  # transformers' _supports_sdpa is False
    assert resolve_attn_implementation("eager", LlamaForCausalLM) == "eager"
    assert resolve_attn_implementation(None, LlamaForCausalLM, packed=True) == "varlen"
    bf16 = torch.bfloat16
    fake_gpu(monkeypatch)
    assert resolve_attn_implementation(None, LlamaForCausalLM, dtype=bf16) == "flash_attention_2"
    assert resolve_attn_implementation(None, Gemma2ForCausalLM, dtype=bf16) == "flash_attention_2"
    assert resolve_attn_implementation(None, LlamaForCausalLM) == "sdpa"  # float32 compute: flash kernels take none
    assert resolve_attn_implementation("sdpa", LlamaForCausalLM, dtype=bf16) == "sdpa"
    fake_gpu(monkeypatch, capability=(7, 5))  # Turing: below flash-attn 2's Ampere
    assert resolve_attn_implementation(None, LlamaForCausalLM, dtype=bf16) == "sdpa"
    fake_gpu(monkeypatch, flash_attn=False)  # e.g. flash_attn present but not a flash-attn 2 transformers takes
    assert resolve_attn_implementation(None, LlamaForCausalLM, dtype=bf16) == "sdpa"


@pytest.mark.parametrize("requested, model_class, dtype, message", [
    ("sdpa", "Gemma2ForCausalLM", torch.float32, r"^--attn_implementation sdpa: Gemma2ForCausalLM does not support it "
                                                 r"\(transformers' Gemma2ForCausalLM._supports_sdpa is False\)"),
    ("flash_attention_2", "LlamaForCausalLM", torch.float32, r"^--attn_implementation flash_attention_2 needs .*"
                                                             r"here the compute dtype is torch.float32"),
    ("varlen", "NemotronForCausalLM", torch.float32, r"^--attn_implementation varlen cannot serve NemotronForCausalLM"),
])
def test_an_attention_the_model_cannot_take_is_one_line(monkeypatch, requested, model_class, dtype, message):
    import transformers

    fake_gpu(monkeypatch)
    with pytest.raises(ConfigError, match=message):
        resolve_attn_implementation(requested, getattr(transformers, model_class), dtype=dtype)


def test_every_script_that_loads_a_float32_model_gets_no_flash_attention(monkeypatch, tokenizer):
    fake_gpu(monkeypatch)
    args = ModelArguments(model_name_or_path="mixtral-tiny")
    assert modeling.model_attention(args) == "sdpa"  # eval_policy, make_toy_pairs, utils/rewards: float32, no autocast
    assert modeling.model_attention(args, autocast_dtype=torch.bfloat16) == "flash_attention_2"  # a --bf16 run
    assert modeling.model_attention(dataclasses.replace(args, dtype="bfloat16")) == "flash_attention_2"


def test_cpu_default_and_explicit_attention_reach_the_model(tokenizer):
    if not torch.cuda.is_available():
        assert tiny(tokenizer).config._attn_implementation == "sdpa"
    assert tiny(tokenizer, attn_implementation="eager").config._attn_implementation == "eager"


# ------------------------------------------------------------------------------------------------- experts

def test_moe_experts_compute_in_the_autocast_dtype(tokenizer):
    # transformers' grouped_mm experts alone would stay in float32 under bf16 autocast (--bf16)
    model = tiny(tokenizer)
    assert model.config._experts_implementation == "autocast_grouped_mm"
    experts = model.model.layers[0].mlp.experts
    bf16_experts = copy.deepcopy(experts).to(torch.bfloat16)  # what autocast should compute: bf16 weights
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(24, experts.hidden_dim, generator=generator)
    top_k_index = torch.randint(0, experts.num_experts, (24, 2), generator=generator)
    top_k_weights = torch.rand(24, 2, generator=generator)

    with torch.autocast("cpu", dtype=torch.bfloat16):
        output = experts(hidden, top_k_index, top_k_weights)
    expected = bf16_experts(hidden.bfloat16(), top_k_index, top_k_weights)
    assert output.dtype == torch.float32  # the residual stream keeps its dtype
    torch.testing.assert_close(output, expected.float(), rtol=0, atol=0)
    assert not torch.allclose(output, experts(hidden, top_k_index, top_k_weights), rtol=0, atol=1e-6)  # not fp32

    output.square().sum().backward()
    expected.float().square().sum().backward()
    for name in ("gate_up_proj", "down_proj"):  # gradients reach the float32 weights through the cast
        grad, expected_grad = getattr(experts, name).grad, getattr(bf16_experts, name).grad
        assert grad.dtype == torch.float32
        torch.testing.assert_close(grad, expected_grad.float(), rtol=0, atol=0)



# ------------------------------------------------------------------------------------------- quantization

def one_error_line(argv, capsys) -> str:
    """train_dpo.py's stderr for `argv`, which must end the run with one `error:` line and status 2."""
    with pytest.raises(SystemExit) as exit_info:
        run_script(lambda: train_dpo.main(argv))
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert error.startswith("error: ") and error.count("\n") == 1, error
    return error


@pytest.fixture
def cuda_with_bitsandbytes(monkeypatch):
    """A GPU of compute capability 9.0 with bitsandbytes, as far as the argument checks can tell."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    real_find_spec = modeling.importlib.util.find_spec
    monkeypatch.setattr(modeling.importlib.util, "find_spec",
                        lambda name: object() if name == "bitsandbytes" else real_find_spec(name))


@pytest.mark.parametrize("flag", ["--load_in_fp8", "--load_in_4bit"])
@pytest.mark.parametrize("flags, message", [
    (["--model_name_or_path", "mixtral-tiny", "--use_peft"], r"needs --use_peft and a checkpoint, not a preset "
                                                             r"\(got mixtral-tiny\)"),
    (["--model_name_or_path", "org/model"], r"needs --use_peft and a checkpoint, not a preset "
                                            r"\(got org/model without --use_peft\)"),
])
def test_quantized_loading_without_lora_or_of_a_preset_ends_in_one_line(flag, flags, message, tmp_path, capsys):
    error = one_error_line([*flags, flag, "--output_dir", str(tmp_path / "out")], capsys)
    assert re.search(f"{flag} quantizes a checkpoint's frozen weights under LoRA: it {message}", error)
    assert not (tmp_path / "out").exists()  # refused when the arguments are read, before anything loads


@pytest.mark.parametrize("flag, environment, message", [
    ("--load_in_fp8", {}, "--load_in_fp8 needs a CUDA GPU, and none is visible"),
    ("--load_in_4bit", {}, "--load_in_4bit needs a CUDA GPU, and none is visible"),
    ("--load_in_fp8", {"capability": (8, 0)}, r"compute capability >= 8.9 \(H100, L4\), this one's is 8.0"),
    ("--load_in_4bit", {"cuda": True}, "--load_in_4bit needs bitsandbytes, which is not installed"),
])
def test_quantized_loading_where_it_cannot_run_ends_in_one_line(flag, environment, message, monkeypatch, tmp_path,
                                                                capsys):
    if environment:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "get_device_capability",
                            lambda device=None: environment.get("capability", (9, 0)))
        monkeypatch.setattr(modeling.importlib.util, "find_spec", lambda name: None)  # no bitsandbytes
    elif torch.cuda.is_available():
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    error = one_error_line(["--model_name_or_path", "org/model", "--use_peft", flag,
                            "--output_dir", str(tmp_path / "out")], capsys)
    assert re.search(message, error)


def test_one_quantization_at_a_time(cuda_with_bitsandbytes):
    with pytest.raises(ConfigError, match="--load_in_4bit and --load_in_fp8 exclude each other"):
        ModelArguments(model_name_or_path="org/model", use_peft=True, load_in_4bit=True, load_in_fp8=True)


def test_4bit_loading_hands_transformers_bitsandbytes_config_and_this_gpu(cuda_with_bitsandbytes, monkeypatch,
                                                                         tokenizer):
    args = ModelArguments(model_name_or_path="org/model", use_peft=True, load_in_4bit=True, dtype="float16",
                          bnb_4bit_quant_type="fp4", use_bnb_nested_quant=True, bnb_4bit_quant_storage="bfloat16")
    loaded = {}

    def from_pretrained(name, **kwargs):  # stands in for the download and the quantization
        loaded.update(kwargs, name=name)
        raise StopIteration

    monkeypatch.setattr(modeling, "model_sliding_window", lambda args: None)  # no config to read for org/model
    monkeypatch.setattr(modeling.AutoModelForCausalLM, "from_pretrained", from_pretrained)
    with pytest.raises(StopIteration):
        load_model(args, tokenizer)
    quantization = loaded["quantization_config"]
    assert isinstance(quantization, BitsAndBytesConfig) and quantization.load_in_4bit
    assert (quantization.bnb_4bit_quant_type, quantization.bnb_4bit_use_double_quant) == ("fp4", True)
    assert (quantization.bnb_4bit_compute_dtype, quantization.bnb_4bit_quant_storage) == (torch.float16,
                                                                                          torch.bfloat16)
    assert loaded["device_map"] == {"": 0} and loaded["dtype"] == torch.float16
    assert modeling.quantization_config(dataclasses.replace(args, dtype="auto")).bnb_4bit_compute_dtype \
        == torch.bfloat16


def test_lora_modules_to_save_rslora_and_dora_reach_peft(tokenizer):
    args = ModelArguments(model_name_or_path="mixtral-tiny", use_peft=True, lora_r=4, lora_alpha=8, use_rslora=True,
                          lora_modules_to_save=["embed_tokens"])
    model = apply_lora(load_model(args, tokenizer), args)
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert any("embed_tokens.modules_to_save" in name for name in trainable)
    assert model.base_model.model.model.layers[0].self_attn.q_proj.scaling["default"] == pytest.approx(8 / 2)
    classifier = apply_lora(load_model(args, tokenizer, num_labels=1), args, modules_to_save=["score"])
    assert {"embed_tokens", "score"} <= {name.split(".modules_to_save")[0].rsplit(".", 1)[-1]
                                         for name, p in classifier.named_parameters() if p.requires_grad
                                         and "modules_to_save" in name}
    dora = dataclasses.replace(args, use_rslora=False, use_dora=True, lora_modules_to_save=None)
    assert any("lora_magnitude_vector" in name for name, _ in apply_lora(load_model(dora, tokenizer),
                                                                          dora).named_parameters())


# ---------------------------------------------------------------------------------------- sliding window

@pytest.fixture(scope="module")
def windowed_checkpoint(tmp_path_factory, tokenizer):
    """A tiny Mistral checkpoint attending through a 4-token sliding window (Mistral-7B-v0.1's is 4096)."""
    config = MistralConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, sliding_window=4,
                           pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    folder = tmp_path_factory.mktemp("mistral")
    torch.manual_seed(0)
    MistralForCausalLM(config).save_pretrained(folder)
    return str(folder)


def test_a_sliding_window_model_defaults_to_padded_rows_and_packs_without_varlen(windowed_checkpoint, tokenizer,
                                                                               monkeypatch, tmp_path):
    args = ModelArguments(model_name_or_path=windowed_checkpoint)
    window = modeling.model_sliding_window(args)
    assert window == 4 and modeling.model_sliding_window(TINY) is None
    monkeypatch.setattr(modeling, "cuda_varlen_kernel_available", lambda: True)  # where packing is the default
    fake_gpu(monkeypatch, flash_attn=False)  # torch's varlen kernel, no flash-attn
    assert modeling.packed_rows_by_default(False, True, None)
    assert not modeling.packed_rows_by_default(False, True, window)
    fake_gpu(monkeypatch)
    assert modeling.packed_rows_by_default(False, True, window)  # flash_attention_2 packs with the window
    assert modeling.model_attention(args, packed=True, autocast_dtype=torch.bfloat16) == "flash_attention_2"
    monkeypatch.undo()

    # with --padding_free all the same, it packs through an attention that has the window
    model = load_model(args, tokenizer, packed=True).eval()
    assert model.config._attn_implementation == "sdpa"
    rows = list(load_preference_data(DataArguments(toy_num_train_pairs=4, toy_num_eval_pairs=1), tokenizer)["train"])
    assert min(len(row["prompt_input_ids"]) for row in rows) > window  # the window cuts every sequence
    with torch.no_grad():
        packed = model_logps(model, PreferenceCollator(tokenizer.pad_token_id, padding_free=True)(rows))[0]
        padded = model_logps(model, PreferenceCollator(tokenizer.pad_token_id)(rows))[0]
    torch.testing.assert_close(packed, padded)

    # a LoRA adapter of it: its base model's window
    adapter = tmp_path / "adapter"
    apply_lora(model, ModelArguments(use_peft=True, lora_target_modules=["q_proj"])).save_pretrained(adapter)
    assert modeling.model_sliding_window(ModelArguments(model_name_or_path=str(adapter))) == window
    adapted = load_model(ModelArguments(model_name_or_path=str(adapter)), tokenizer, packed=True)
    assert adapted.config._attn_implementation == model.config._attn_implementation

    with pytest.raises(ConfigError, match="--attn_implementation varlen has no sliding window, and this model "
                                          "attends through one of 4 tokens"):
        load_model(dataclasses.replace(args, attn_implementation="varlen"), tokenizer)


# ------------------------------------------------------------------------------------------------ security

def test_no_pickle_and_no_remote_code_by_default():
    sources = [path for path in REPO.rglob("*.py") if ".venv" not in path.parts and "tests" not in path.parts]
    assert len(sources) > 5
    for path in sources:
        text = path.read_text()
        for pattern in ("torch.load(", "import pickle", "pickle.load", "dill.load", "trust_remote_code=True"):
            assert pattern not in text, f"{path.relative_to(REPO)} uses {pattern}"
    assert ModelArguments().trust_remote_code is False
