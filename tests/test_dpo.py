import copy
import importlib.util

import pytest
import torch
from torch.overrides import TorchFunctionMode
from transformers import TrainerCallback

import train_dpo
from helpers import loop_logps, tiny_run_args
from train_dpo import DPOArguments, DPOTrainer
from utils.cli import parse_args
from utils.losses import LOSSES
from utils.data import DataArguments, PreferenceCollator, load_preference_data
from utils.modeling import PACKED_ROW_ATTENTIONS, ModelArguments, load_model, load_tokenizer
from utils.reference import add_reference_columns


def build(tmp_path, policy_seed=0, ref_seed=1, **dpo_kwargs):
    """A DPOTrainer whose policy (seed `policy_seed`) differs from the reference (seed `ref_seed`), and a batch."""
    tokenizer = load_tokenizer(ModelArguments(model_name_or_path="mixtral-tiny"))
    policy = load_model(ModelArguments(model_name_or_path="mixtral-tiny", model_init_seed=policy_seed), tokenizer)
    ref_args = ModelArguments(model_name_or_path="mixtral-tiny", model_init_seed=ref_seed)
    ref = load_model(ref_args, tokenizer)
    data_args = DataArguments(toy_num_train_pairs=8, toy_num_eval_pairs=4, max_length=64)
    collator = PreferenceCollator(tokenizer.pad_token_id)
    dataset = add_reference_columns(ref, load_preference_data(data_args, tokenizer), collator,
                                    model_args=ref_args, data_args=data_args,
                                    cache_dir=str(tmp_path / "cache"), batch_size=4)
    args = DPOArguments(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, report_to="none",
                        **dpo_kwargs)
    trainer = DPOTrainer(model=policy, args=args, train_dataset=dataset["train"], data_collator=collator,
                         processing_class=tokenizer)
    rows = [dataset["train"][i] for i in range(4)]
    return trainer, collator(rows), rows, ref


TRL_CASES = [pytest.param([name], None, 0.5 if name == "ipo" else 0.1, 0.0, id=name)
             for name, spec in LOSSES.items() if spec.in_trl]
TRL_CASES += [pytest.param(["robust"], None, 0.1, 0.2, id="robust-label-smoothing"),
              pytest.param(["sigmoid", "sft"], [1.0, 0.7], 0.1, 0.0, id="rpo")]


@pytest.mark.parametrize("loss_type, loss_weights, beta, label_smoothing", TRL_CASES)
def test_first_batch_loss_metrics_and_gradients_match_trl(tmp_path, loss_type, loss_weights, beta, label_smoothing):
    """Every registry loss TRL 1.12's DPOTrainer has, on the same policy, frozen reference and pairs: the loss, the
    logged metrics (router aux loss included) and every parameter's gradient."""
    from datasets import Dataset
    from trl import DPOConfig
    from trl import DPOTrainer as TRLDPOTrainer

    tokenizer = load_tokenizer(ModelArguments(model_name_or_path="mixtral-tiny"))
    policy = load_model(ModelArguments(model_name_or_path="mixtral-tiny", model_init_seed=0), tokenizer)
    ref = load_model(ModelArguments(model_name_or_path="mixtral-tiny", model_init_seed=1), tokenizer)
    rows = list(load_preference_data(DataArguments(toy_num_train_pairs=4, toy_num_eval_pairs=1, max_length=64),
                                     tokenizer)["train"])
    trl_policy, trl_ref = copy.deepcopy(policy), copy.deepcopy(ref)

    args = DPOArguments(output_dir=str(tmp_path / "ours"), per_device_train_batch_size=4, report_to="none",
                        beta=beta, loss_type=loss_type, loss_weights=loss_weights, label_smoothing=label_smoothing,
                        precompute_ref_log_probs=False)  # the frozen reference scored each step, as TRL does
    ours = DPOTrainer(model=policy, ref_model=ref, args=args, data_collator=PreferenceCollator(tokenizer.pad_token_id),
                      processing_class=tokenizer)
    our_loss = ours.compute_loss(ours.model.train(), ours._prepare_inputs(ours.data_collator(rows)))

    texts = Dataset.from_list([{k: row[k] for k in ("prompt", "chosen", "rejected")} for row in rows])
    trl_args = DPOConfig(output_dir=str(tmp_path / "trl"), beta=beta, loss_type=loss_type, loss_weights=loss_weights,
                         label_smoothing=label_smoothing, bf16=False, gradient_checkpointing=False,
                         per_device_train_batch_size=4, max_length=64, report_to="none")
    trl = TRLDPOTrainer(model=trl_policy, ref_model=trl_ref, args=trl_args, train_dataset=texts,
                        processing_class=tokenizer)
    trl_batch = trl.data_collator([trl.train_dataset[i] for i in range(4)])
    trl_loss = trl.compute_loss(trl.model.train(), trl._prepare_inputs(trl_batch))

    assert our_loss.item() == pytest.approx(trl_loss.item(), abs=1e-5)
    ours.log({})  # what a logging step would write
    logged = ours.state.log_history[-1]
    assert abs(logged["rewards/margins"]) > 1e-5  # policy != reference: a real comparison
    # TRL's names mean TRL's quantities for every loss, per-token ones included (summed log-probs); but TRL scores
    # a reference for `sft` alone too, to log rewards, where we score none (it reads none)
    compared = ["aux_loss", "logps/chosen", "logps/rejected"]
    if LOSSES[loss_type[0]].uses_reference:
        compared += ["rewards/chosen", "rewards/rejected", "rewards/margins"]
    assert any(name.startswith("rewards_per_token/") for name in logged) == LOSSES[loss_type[0]].per_token
    for name in compared:
        assert logged[name] == pytest.approx(trl._metrics["train"][name][0], abs=1e-4), name
    our_loss.backward()
    trl_loss.backward()
    trl_grads = dict(trl.model.named_parameters())
    for name, param in ours.model.named_parameters():
        torch.testing.assert_close(param.grad, trl_grads[name].grad, rtol=1e-4, atol=1e-6, msg=name)
    assert ours.model.lm_head.weight.grad.abs().max() > 0


def policy_sums(trainer, rows):
    chosen = [loop_logps(trainer.model, r["prompt_input_ids"], r["chosen_input_ids"]) for r in rows]
    rejected = [loop_logps(trainer.model, r["prompt_input_ids"], r["rejected_input_ids"]) for r in rows]
    return torch.tensor(chosen), torch.tensor(rejected)


def test_ipo_averages_log_probs_over_completion_tokens(tmp_path):
    trainer, batch, rows, _ = build(tmp_path, loss_type="ipo", router_aux_loss_coef=0.0, beta=0.5)
    chosen, rejected = policy_sums(trainer, rows)
    n_chosen = torch.tensor([len(r["chosen_input_ids"]) for r in rows], dtype=torch.float64)
    n_rejected = torch.tensor([len(r["rejected_input_ids"]) for r in rows], dtype=torch.float64)
    ref_chosen = torch.tensor([r["ref_chosen_logps"] for r in rows], dtype=torch.float64)
    ref_rejected = torch.tensor([r["ref_rejected_logps"] for r in rows], dtype=torch.float64)
    margin = (chosen - ref_chosen) / n_chosen - (rejected - ref_rejected) / n_rejected
    expected = ((margin - 1 / (2 * 0.5)) ** 2).mean()
    assert trainer.compute_loss(trainer.model, batch).item() == pytest.approx(expected.item(), rel=1e-4)


def test_rpo_adds_chosen_nll_and_router_aux_loss_is_added(tmp_path):
    base, batch, rows, _ = build(tmp_path, router_aux_loss_coef=0.0)
    plain = base.compute_loss(base.model, batch).item()

    rpo, _, _, _ = build(tmp_path, router_aux_loss_coef=0.0, rpo_alpha=0.7)
    chosen, _ = policy_sums(rpo, rows)
    nll = -chosen.sum() / sum(len(r["chosen_input_ids"]) for r in rows)
    assert rpo.compute_loss(rpo.model, batch).item() == pytest.approx(plain + 0.7 * nll.item(), rel=1e-5)

    moe, _, _, _ = build(tmp_path, router_aux_loss_coef=0.5)
    with torch.no_grad():
        aux = moe.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                        output_router_logits=True).aux_loss.item()
    assert aux > 0
    assert moe.compute_loss(moe.model, batch).item() == pytest.approx(plain + 0.5 * aux, rel=1e-5)
    assert moe.metrics.means("train")["aux_loss"] == pytest.approx(aux, rel=1e-5)


def test_short_run_lowers_loss_raises_accuracy_and_writes_outputs(tmp_path, capsys):
    trainer = train_dpo.main(tiny_run_args(tmp_path, "--learning_rate", "3e-3", "--num_train_epochs", "3",
                                           "--beta", "0.5"))
    history = [entry for entry in trainer.state.log_history if "loss" in entry]
    first, last = history[:3], history[-3:]
    mean = lambda entries, key: sum(e[key] for e in entries) / len(entries)
    assert mean(last, "loss") < mean(first, "loss") - 0.1
    assert mean(last, "rewards/accuracies") > mean(first, "rewards/accuracies")
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected",
                "aux_loss"):
        assert key in history[0]
    eval_entry = next(e for e in trainer.state.log_history if "eval_loss" in e)
    assert "eval_rewards/accuracies" in eval_entry and "eval_aux_loss" in eval_entry
    out = tmp_path / "out"
    for name in ("model.safetensors", "tokenizer.json", "trainer_state.json", "train_results.json",
                 "all_results.json", "eval_results.json"):
        assert (out / name).exists(), name
    assert "computed for 64 pairs, saved to cache" in capsys.readouterr().out

    train_dpo.main(tiny_run_args(tmp_path, "--max_steps", "1", "--output_dir", str(tmp_path / "again")))
    assert "reference log-probs (train): loaded from cache" in capsys.readouterr().out


def final_weights(tmp_path, *extra) -> dict:
    trainer = train_dpo.main(tiny_run_args(tmp_path, "--max_steps", "1", "--optim", "sgd", "--learning_rate", "0.5",
                                           "--max_grad_norm", "0", "--lr_scheduler_type", "constant",
                                           "--router_aux_loss_coef", "0", *extra))
    return {name: p.detach().clone() for name, p in trainer.model.named_parameters()}


def test_gradient_accumulation_equals_the_larger_batch(tmp_path):
    # The router aux loss is left out: load balancing over a micro-batch is not linear in the batch.
    big = final_weights(tmp_path, "--per_device_train_batch_size", "8")
    accumulated = final_weights(tmp_path, "--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "2")
    start = load_model(ModelArguments(model_name_or_path="mixtral-tiny"), load_tokenizer(ModelArguments()))
    assert not torch.equal(big["lm_head.weight"], start.lm_head.weight)  # the step did move the weights
    for name in big:
        torch.testing.assert_close(accumulated[name], big[name], rtol=1e-5, atol=1e-6)


def test_frozen_reference_model_trains_like_precomputed_log_probs(tmp_path):
    precomputed = final_weights(tmp_path, "--max_steps", "2")
    frozen = final_weights(tmp_path, "--max_steps", "2", "--precompute_ref_log_probs", "false")
    for name in precomputed:
        torch.testing.assert_close(frozen[name], precomputed[name], rtol=1e-5, atol=1e-6)


def test_peft_trains_adapters_and_leaves_base_weights_unchanged(tmp_path):
    trainer = train_dpo.main(tiny_run_args(tmp_path, "--use_peft", "--max_steps", "3", "--learning_rate", "1e-2"))
    start = load_model(ModelArguments(model_name_or_path="mixtral-tiny"), load_tokenizer(ModelArguments()))
    base = {name.replace(".base_layer", ""): value for name, value in
            trainer.model.get_base_model().state_dict().items() if "lora_" not in name}
    assert base.keys() == start.state_dict().keys()
    for name, value in start.state_dict().items():
        torch.testing.assert_close(base[name], value, rtol=0, atol=0)
    lora_b = [p for n, p in trainer.model.named_parameters() if "lora_B" in n]
    assert lora_b and any(p.abs().sum() > 0 for p in lora_b)  # LoRA B starts at zero: it trained
    assert (tmp_path / "out" / "adapter_model.safetensors").exists()


def packing_implementations() -> list[str]:
    """Every attention implementation that keeps packed sequences apart and runs on this machine."""
    runs_here = [name for name in PACKED_ROW_ATTENTIONS if name != "flash_attention_2"]
    if torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None:
        runs_here.append("flash_attention_2")
    return runs_here


@pytest.mark.parametrize("attention", packing_implementations())
def test_padding_free_gives_the_padded_loss_and_gradients(tmp_path, attention):
    trainer, padded_batch, rows, _ = build(tmp_path, router_aux_loss_coef=0.3)
    trainer.model.set_attn_implementation(attention)
    assert trainer.model.config._attn_implementation == attention
    packed_batch = PreferenceCollator(trainer.processing_class.pad_token_id, padding_free=True)(rows)
    assert packed_batch["input_ids"].shape[0] == 1 and "attention_mask" not in packed_batch
    assert packed_batch["input_ids"].numel() == padded_batch["attention_mask"].sum()  # not one pad token

    results = []
    for batch in (padded_batch, packed_batch):
        trainer.model.zero_grad()
        loss = trainer.compute_loss(trainer.model, batch)
        loss.backward()
        results.append((loss.item(), {n: p.grad.clone() for n, p in trainer.model.named_parameters()}))
    (padded_loss, padded_grads), (packed_loss, packed_grads) = results
    assert packed_loss == pytest.approx(padded_loss, abs=1e-5)
    for name, grad in padded_grads.items():
        torch.testing.assert_close(packed_grads[name], grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("flags, expected", [([], False), (["--bf16"], True), (["--bf16", "false"], False)],
                         ids=["default-on-cpu", "bare-flag", "explicit-false"])
def test_bf16_flag_parses_like_the_trainers_other_bool_flags(flags, expected):
    (args,) = parse_args((DPOArguments,), [*flags, "--use_cpu"])
    assert args.bf16 is expected


@pytest.mark.parametrize("units, flags, warned", [(False, ["--bf16"], True), (True, ["--bf16"], False),
                                                  (None, ["--bf16"], False), (False, [], False)],
                         ids=["no-units", "units", "unknown", "float32"])
def test_bf16_on_a_cpu_without_bf16_units_warns_once(units, flags, warned, monkeypatch, caplog):
    from utils import precision

    monkeypatch.setattr(precision, "cpu_has_bf16_units", lambda: units)
    precision.warn_slow_cpu_bf16.cache_clear()
    for _ in range(2):  # a second parse (the scripts build their arguments more than once) does not warn again
        parse_args((DPOArguments,), [*flags, "--use_cpu"])
    messages = [record.getMessage() for record in caplog.records if "bf16 units" in record.getMessage()]
    assert len(messages) == warned
    assert not warned or "slower than float32" in messages[0] and "--bf16 false" in messages[0]
    precision.warn_slow_cpu_bf16.cache_clear()


@pytest.mark.parametrize("reference_flags", [["--precompute_ref_log_probs", "false"],
                                             ["--precompute_ref_log_probs", "false", "--use_peft"]],
                         ids=["frozen-copy", "lora-adapters-off"])
def test_bf16_step_zero_rewards_are_exactly_zero(tmp_path, reference_flags):
    # One precision path: at learning rate 0 the reference scored on the same batch is the policy, bit for bit,
    # so beta * (log pi - log pi_ref) is exactly 0 (the output layer once ran outside autocast, in float32).
    trainer = train_dpo.main(tiny_run_args(tmp_path, "--bf16", "--use_cpu", "true", "--learning_rate", "0",
                                           "--max_steps", "1", "--eval_strategy", "no", *reference_flags))
    logged = trainer.state.log_history[0]
    assert logged["logps/chosen"] != 0  # a real forward
    for name in ("rewards/chosen", "rewards/rejected", "rewards/margins"):
        assert logged[name] == 0.0, name


class DeviceReads(TorchFunctionMode):
    """Records the Python-level calls that make a GPU wait for the host: reading a tensor's values (.item(),
    .tolist(), bool(), int(), float(), .numpy(), .cpu()) and ops whose output size depends on values (nonzero,
    masked_select, boolean-mask indexing). On a CPU they cost nothing, but the code is the GPU's."""
    READS = {"item", "tolist", "__bool__", "__int__", "__float__", "__index__", "numpy", "cpu", "nonzero",
             "masked_select"}

    def __init__(self):
        super().__init__()
        self.reads = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        boolean_index = name in ("__getitem__", "__setitem__") and any(
            isinstance(index, torch.Tensor) and index.dtype == torch.bool
            for index in (args[1] if isinstance(args[1], tuple) else (args[1],)))
        if name in self.READS or boolean_index:
            self.reads.append(name)
        return func(*args, **(kwargs or {}))


class CountDeviceReads(TrainerCallback):
    """The device reads of each optimizer step from the second on (the first builds caches)."""

    def __init__(self):
        self.per_step, self.mode = [], None

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step >= 1:
            self.mode = DeviceReads().__enter__()

    def on_step_end(self, args, state, control, **kwargs):
        if self.mode is not None:
            self.mode.__exit__(None, None, None)
            self.per_step.append(self.mode.reads)
            self.mode = None


@pytest.mark.parametrize("precompute", [True, False], ids=["precomputed-reference", "frozen-reference"])
def test_a_packed_training_step_reads_the_device_at_most_twice(tmp_path, precompute):
    tokenizer = load_tokenizer(ModelArguments(model_name_or_path="mixtral-tiny"))
    model_args = ModelArguments(model_name_or_path="mixtral-tiny")
    model = load_model(model_args, tokenizer, packed=True)
    data_args = DataArguments(toy_num_train_pairs=32, toy_num_eval_pairs=4, max_length=64)
    dataset = load_preference_data(data_args, tokenizer)
    # SGD: Adam's step counters are host tensors (on a GPU too) that it reads every step
    args = DPOArguments(output_dir=str(tmp_path / "out"), ref_logps_cache_dir=str(tmp_path / "cache"),
                        per_device_train_batch_size=4, gradient_accumulation_steps=2, max_steps=4, optim="sgd",
                        logging_steps=1000, save_strategy="no", report_to="none", padding_free=True, use_cpu=True,
                        precompute_ref_log_probs=precompute)
    counter = CountDeviceReads()
    trainer = DPOTrainer(model=model, ref_model=None if precompute else copy.deepcopy(model), args=args,
                         train_dataset=dataset["train"], data_collator=PreferenceCollator(tokenizer.pad_token_id, True),
                         processing_class=tokenizer, model_args=model_args, data_args=data_args, callbacks=[counter])
    trainer.train()
    assert len(counter.per_step) == 3
    assert all(len(reads) <= 2 for reads in counter.per_step), counter.per_step


@pytest.mark.parametrize("extra", [[], ["--rpo_alpha", "0.5"], ["--rpo_alpha", "0.5", "--precompute_ref_log_probs",
                                                                   "false"]],
                         ids=["simpo", "simpo-nll", "simpo-nll-no-precompute"])
def test_simpo_scores_no_reference_and_trains(tmp_path, capsys, extra):
    # with an NLL term (sft, which reads no reference either) and no precomputing: no frozen copy is made, so
    # FSDP/ZeRO-3, which refuse one, are not refused
    trainer = train_dpo.main(tiny_run_args(tmp_path, "--loss_type", "simpo", "--beta", "2.0", "--simpo_gamma", "0.3",
                                           "--max_steps", "2", "--learning_rate", "1e-3", *extra))
    assert not trainer.uses_reference and trainer.ref_model is None
    assert "reference log-probs" not in capsys.readouterr().out  # neither scored nor looked up
    assert not (tmp_path / "cache").exists()
    assert "ref_chosen_logps" not in trainer.train_dataset.column_names


@pytest.mark.parametrize("flags, message", [
    (["--loss_type", "sigmoid", "--simpo_gamma", "0.5"], r"--simpo_gamma has no meaning for --loss_type sigmoid"),
    (["--loss_type", "sigmoid", "sft", "--loss_weights", "1.0"], r"must be one weight >= 0 per --loss_type"),
    (["--loss_type", "ipo", "--label_smoothing", "0.1"], r"--label_smoothing has no meaning for --loss_type ipo"),
    (["--loss_type", "simpo", "--label_smoothing", "0.5"], r"--loss_type simpo needs 0 <= --label_smoothing < 0.5"),
])
def test_the_registry_decides_which_flags_apply(tmp_path, flags, message):
    with pytest.raises(SystemExit, match=message):
        train_dpo.main(tiny_run_args(tmp_path, *flags))


def test_rpo_alpha_is_the_sigmoid_sft_list():
    rpo, = parse_args((DPOArguments,), ["--output_dir", "x", "--rpo_alpha", "0.7"])
    assert (rpo.loss_type, rpo.loss_weights) == (["sigmoid", "sft"], [1.0, 0.7])


def test_a_frozen_reference_under_fsdp_is_one_error_line(tmp_path, monkeypatch, capsys):
    from transformers import Trainer

    from utils.cli import run_script

    prepare = Trainer.create_accelerator_and_postprocess

    def as_if_fsdp(self):  # FSDP needs accelerator devices: pretend the engine is on
        prepare(self)
        self.is_fsdp_enabled = True

    monkeypatch.setattr(Trainer, "create_accelerator_and_postprocess", as_if_fsdp)
    with pytest.raises(SystemExit) as exit_info:
        run_script(lambda: train_dpo.main(tiny_run_args(tmp_path, "--precompute_ref_log_probs", "false")))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: a frozen reference model") and "--use_peft" in err[0]


def test_resuming_without_the_reference_cache_is_one_error_line(tmp_path, capsys):
    from utils.cli import run_script

    train_dpo.main(tiny_run_args(tmp_path, "--max_steps", "1", "--save_steps", "1"))
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        run_script(lambda: train_dpo.main(tiny_run_args(tmp_path, "--max_steps", "2", "--resume_from_checkpoint",
                                                        "latest", "--ref_logps_cache_dir", str(tmp_path / "other"))))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not in the cache" in err[0] and "--ref_logps_cache_dir" in err[0]


def test_padding_free_default_reads_the_models_sliding_window(tmp_path, monkeypatch):
    from transformers import MistralConfig

    MistralConfig(sliding_window=4, num_hidden_layers=1, hidden_size=16, intermediate_size=32,
                  num_attention_heads=2, num_key_value_heads=1).save_pretrained(tmp_path / "mistral")
    seen = []
    monkeypatch.setattr(train_dpo, "packed_rows_by_default", lambda *args: seen.append(args[-1]) or False)
    model_args, args = ModelArguments(model_name_or_path=str(tmp_path / "mistral")), \
        DPOArguments(output_dir=str(tmp_path / "out"))
    train_dpo.check_arguments(model_args, args)
    assert seen == [4] and args.padding_free is False
