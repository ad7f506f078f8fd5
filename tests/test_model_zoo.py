"""The model zoo: tiny random configs (built here, seeded) of the causal-LM families transformers 5.23 ships that
people fine-tune with DPO. For each, our completion log-probs (padded rows, packed rows where the family takes them,
the reference paths: precomputed, a frozen copy, LoRA with its adapters off) equal the log-softmax of the model's own
`forward().logits`, and one DPO step through `train_dpo.main` at learning rate 0 logs implicit rewards of 0. The
output layer is scaled so that logits are of order 10: a transform the forward applies after it (Gemma's softcap,
Cohere's and Granite's scales) then moves the log-probs far beyond the tolerance."""

import copy

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

import train_dpo
from helpers import loop_logps
from utils.data import DataArguments, PreferenceCollator, load_preference_data
from utils.errors import ConfigError
from utils.families import UNMATCHED, check_model_family, packing_unfit
from utils.logprobs import model_logps
from utils.modeling import (ModelArguments, apply_lora, causal_lm_class, resolve_attn_implementation,
                            toy_tokenizer)
from utils.reference import reference_mode, score_dataset

VOCAB = 1088  # the toy tokenizer's, rounded up
SMALL = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=8, max_position_embeddings=256, tie_word_embeddings=False)
MOE = dict(num_experts=4, num_local_experts=4, num_experts_per_tok=2, moe_intermediate_size=32)
WINDOW = dict(sliding_window=8)  # shorter than the toy sequences, so a window that is not kept shows
# model_type -> what its tiny config sets beyond SMALL: the shape of its kind, and a post-head transform's parameter
# at the size real checkpoints have it where the default would hide it (Gemma 3's softcap, Granite's scaling).
FAMILIES = {
    "llama": {}, "mistral": WINDOW, "mixtral": MOE, "qwen2": {}, "qwen3": {},
    "qwen2_moe": dict(MOE, shared_expert_intermediate_size=32), "qwen3_moe": MOE,
    "gemma": {}, "gemma2": dict(WINDOW, final_logit_softcapping=30.0),
    "gemma3_text": dict(final_logit_softcapping=30.0),
    "cohere": {}, "cohere2": {}, "granite": dict(logits_scaling=8.0), "granitemoe": dict(MOE, logits_scaling=8.0),
    "phi3": {}, "phimoe": MOE, "olmo2": {}, "olmoe": MOE, "gpt_neox": {},
    "gpt2": dict(n_embd=32, n_layer=2, n_head=4, n_positions=256),
    "deepseek_v3": dict(MOE, num_key_value_heads=4, n_routed_experts=4, n_shared_experts=1, kv_lora_rank=16,
                        q_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8, first_k_dense_replace=1,
                        n_group=1, topk_group=1),
    "gpt_oss": MOE, "stablelm": {}, "starcoder2": {}, "smollm3": {}, "glm4": {}, "exaone4": {}, "ernie4_5": {},
    "helium": {}, "apertus": {}, "seed_oss": {}, "nemotron": {}, "minimax": MOE, "falcon": dict(head_dim=None),
}
DPO_REFUSED = {"phimoe": "PhimoeForCausalLM"}  # random expert choice while training: utils/families.py
LOGIT_STD = 8.0
RTOL = 1e-5


def tiny_config(model_type: str):
    tokenizer = toy_tokenizer()
    kwargs = {key: value for key, value in {**SMALL, **FAMILIES[model_type]}.items() if value is not None}
    return AutoConfig.for_model(model_type, pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                                eos_token_id=tokenizer.eos_token_id, **kwargs)


def tiny_model(model_type: str, packed: bool = False):
    """The family's tiny model in float32, seeded, with the attention our loader would pick, and its output layer
    scaled to logits of standard deviation LOGIT_STD."""
    config = tiny_config(model_type)
    model_class = AutoModelForCausalLM._model_mapping[type(config)]
    attention = resolve_attn_implementation(None, model_class, config, packed=packed)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=attention, dtype=torch.float32).eval()
    with torch.no_grad():
        probe = model(torch.arange(3, 35)[None]).logits
        model.get_output_embeddings().weight.mul_(LOGIT_STD / probe.std())
    return model


@pytest.fixture(scope="module")
def pairs():
    """Six tokenised toy pairs of different lengths (prompt + completion of 16 to 40 tokens)."""
    data = load_preference_data(DataArguments(toy_num_train_pairs=6, toy_num_eval_pairs=1, max_length=40),
                                toy_tokenizer())
    return data["train"]


def expected_logps(model, rows) -> torch.Tensor:
    """Each sequence alone through the model's own forward (helpers.loop_logps): chosen sums, then rejected."""
    return torch.tensor([loop_logps(model, row["prompt_input_ids"], row[f"{side}_input_ids"])
                         for side in ("chosen", "rejected") for row in rows], dtype=torch.float32)


def assert_logps(actual, expected, what):
    torch.testing.assert_close(actual, expected, rtol=RTOL, atol=1e-4, msg=lambda message: f"{what}: {message}")


@pytest.mark.parametrize("model_type", FAMILIES)
def test_our_logps_equal_the_models_own_forward(model_type, pairs, monkeypatch):
    rows = list(pairs)
    model = tiny_model(model_type)
    expected = expected_logps(model, rows)
    padded = PreferenceCollator(toy_tokenizer().pad_token_id)
    with torch.no_grad():
        assert_logps(model_logps(model, padded(rows)).sums, expected, "padded rows")
        assert_logps(model_logps(copy.deepcopy(model), padded(rows)).sums, expected, "frozen copy")
    chosen, rejected = score_dataset(model, pairs, padded, batch_size=4)
    assert_logps(torch.cat([chosen, rejected]), expected, "precomputed reference")

    lora = apply_lora(model, ModelArguments(use_peft=True, lora_dropout=0.0))
    for name, parameter in lora.named_parameters():
        if "lora_B" in name:  # adapters that change the output, so that "off" is tested
            parameter.data.normal_(std=0.5)
    with torch.no_grad():
        with reference_mode(lora):
            assert_logps(model_logps(lora, padded(rows)).sums, expected, "LoRA, adapters off")
        assert (model_logps(lora, padded(rows)).sums - expected).abs().max() > 1e-2  # on: another model

    if packing_unfit(type(model)):  # refused, in one line, before anything loads
        monkeypatch.setattr(train_dpo, "causal_lm_class", lambda args: type(model))
        with pytest.raises(ConfigError, match=f"^--padding_free: {type(model).__name__}: .* must be padded"):
            train_dpo.check_arguments(ModelArguments(model_name_or_path="unused"),
                                      train_dpo.DPOArguments(output_dir="unused", padding_free=True))
        return
    packed_model = tiny_model(model_type, packed=True)
    with torch.no_grad():
        packed = model_logps(packed_model, PreferenceCollator(toy_tokenizer().pad_token_id, padding_free=True)(rows))
    assert_logps(packed.sums, expected, f"packed rows ({packed_model.config._attn_implementation})")


@pytest.mark.parametrize("name", sorted(UNMATCHED))
def test_a_family_we_cannot_match_is_refused_in_one_line(name):
    with pytest.raises(ConfigError, match=f"^{name} is not supported: its forward"):
        check_model_family(type(name, (), {}))


# ------------------------------------------------------------------------------------- one step through main

@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """model_type -> a folder holding its tiny model and the toy tokenizer, as a user's checkpoint."""
    folders = {}
    for model_type in FAMILIES:
        folder = tmp_path_factory.mktemp(model_type)
        tiny_model(model_type).save_pretrained(folder)
        toy_tokenizer().save_pretrained(folder)
        folders[model_type] = str(folder)
    return folders


@pytest.mark.parametrize("model_type", FAMILIES)
def test_one_step_at_learning_rate_0_logs_rewards_of_0(model_type, checkpoints, tmp_path):
    if model_type in DPO_REFUSED:
        with pytest.raises(ConfigError, match=f"^{DPO_REFUSED[model_type]} is not supported for DPO: "):
            train_dpo.main(["--model_name_or_path", checkpoints[model_type], "--output_dir", str(tmp_path)])
        return
    trainer = train_dpo.main([
        "--model_name_or_path", checkpoints[model_type], "--toy_num_train_pairs", "4", "--toy_num_eval_pairs", "1",
        "--max_length", "32", "--per_device_train_batch_size", "4", "--max_steps", "1", "--learning_rate", "0",
        "--logging_steps", "1", "--save_strategy", "no", "--eval_strategy", "no", "--report_to", "none",
        "--disable_tqdm", "true", "--output_dir", str(tmp_path / "out"), "--ref_logps_cache_dir",
        str(tmp_path / "cache")])
    logged = trainer.state.log_history[0]
    assert causal_lm_class(ModelArguments(model_name_or_path=checkpoints[model_type])) is type(trainer.model)
    assert abs(logged["rewards/chosen"]) < 1e-4 and abs(logged["rewards/rejected"]) < 1e-4, logged
    assert logged["logps/chosen"] < -10  # log-probs of order 10 per token: rewards of 0 are not a vacuous 0 - 0


def test_gemma2_trains_a_step_with_default_flags(checkpoints, tmp_path):
    """transformers refuses sdpa for Gemma 2 (it caps attention scores): the default is what its class supports."""
    trainer = train_dpo.main(["--model_name_or_path", checkpoints["gemma2"], "--toy_num_train_pairs", "8",
                              "--toy_num_eval_pairs", "1", "--max_steps", "1", "--learning_rate", "1e-3",
                              "--output_dir", str(tmp_path / "out"), "--report_to", "none"])
    before = AutoModelForCausalLM.from_pretrained(checkpoints["gemma2"])
    assert trainer.model.config._attn_implementation == "eager" and trainer.state.global_step == 1
    moved = [name for name, parameter in trainer.model.named_parameters()
             if not torch.equal(parameter, before.get_parameter(name))]
    assert moved  # a step that trained
