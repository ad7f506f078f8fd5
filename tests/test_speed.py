"""utils/speed.py: the needed-work formula against PyTorch's FLOP counter, and the logged tokens/s and share of the
matmul peak against tokens counted from the batches and the time between logs (properties, not speed)."""

import time

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import LlamaConfig, LlamaForCausalLM, TrainerCallback

from train_dpo import DPOArguments, DPOTrainer
from utils.data import DataArguments, PreferenceCollator, load_preference_data
from utils.modeling import ModelArguments, load_model, load_tokenizer
from utils.speed import forward_flops, matmul_peak_flops


def test_forward_flops_match_the_flop_counter_on_a_dense_model():
    config = LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=100, attn_implementation="eager")
    model, length = LlamaForCausalLM(config).eval(), 12
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.randint(100, (1, length)), use_cache=False)
    body, head, scores = forward_flops(config)
    # the counter sees every logit and eager attention's full [L, L] scores (the formula counts the causal half)
    assert counter.get_total_flops() == length * (body + head) + 2 * scores * length ** 2


class LogTimes(TrainerCallback):
    def __init__(self):
        self.times = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.times.append(time.perf_counter())


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_logged_tokens_per_second_are_the_batches_tokens_over_the_time_between_logs(tmp_path, packed):
    tokenizer = load_tokenizer(ModelArguments(model_name_or_path="mixtral-tiny"))
    model_args = ModelArguments(model_name_or_path="mixtral-tiny")
    data_args = DataArguments(toy_num_train_pairs=24, toy_num_eval_pairs=4, max_length=64)
    rows = load_preference_data(data_args, tokenizer)["train"]
    args = DPOArguments(output_dir=str(tmp_path / "out"), ref_logps_cache_dir=str(tmp_path / "cache"),
                        per_device_train_batch_size=4, max_steps=4, logging_steps=1, save_strategy="no",
                        report_to="none", padding_free=packed, use_cpu=True, train_sampling_strategy="sequential")
    log_times = LogTimes()
    trainer = DPOTrainer(model=load_model(model_args, tokenizer, packed=packed), args=args, train_dataset=rows,
                         data_collator=PreferenceCollator(tokenizer.pad_token_id, packed), processing_class=tokenizer,
                         model_args=model_args, data_args=data_args, callbacks=[log_times])
    result = trainer.train()
    body, head, scores = forward_flops(trainer.model.config)
    peak = matmul_peak_flops(trainer.accelerator.device, torch.float32)
    logged = [log for log in trainer.state.log_history if "tokens_per_second" in log]
    assert len(logged) == 4
    total_tokens = total_seconds = 0
    for step in range(4):
        pairs = rows.select(range(4 * step, 4 * step + 4))  # the sequential sampler's batch
        lengths = [len(p) + len(c) for side in ("chosen", "rejected")
                   for p, c in zip(pairs["prompt_input_ids"], pairs[f"{side}_input_ids"])]
        completions = sum(len(c) for side in ("chosen", "rejected") for c in pairs[f"{side}_input_ids"])
        seconds = sum(lengths) / logged[step]["tokens_per_second"]
        total_tokens, total_seconds = total_tokens + sum(lengths), total_seconds + seconds
        if step:  # from the second log on, the time counted is the time between two logs
            assert seconds == pytest.approx(log_times.times[step] - log_times.times[step - 1], rel=0.05)
        flops = 3 * (body * sum(lengths) + head * completions + scores * sum(n * n for n in lengths))
        assert logged[step]["matmul_peak_share"] == pytest.approx(flops / seconds / peak, rel=1e-6)
    # train_results.json's: the whole run's
    assert result.metrics["train_tokens_per_second"] == pytest.approx(total_tokens / total_seconds, rel=1e-6)
    assert 0 < result.metrics["train_matmul_peak_share"] < 1
