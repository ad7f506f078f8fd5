"""train_reward.py and train_ppo.py: the reward model learns held-out preferences, PPO trains against it, and PPO-GT
scores every sampled completion, and only the completion, with the toy task's ground truth."""

import copy
import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

import eval_policy
import train_dpo
import train_ppo
import train_reward
import train_sft
from utils import precision, toy_task
from utils.cli import run_script
from utils.errors import ConfigError
from utils.data import DataArguments, load_preference_data
from utils.modeling import ModelArguments, load_model
from utils.rewards import GroundTruthReward

QUIET = ["--report_to", "none", "--disable_tqdm", "true"]
# 16 episodes in batches of 4 x 2 accumulation steps: 2 PPO updates
PPO_FLAGS = ["--model_name_or_path", "mixtral-tiny", "--toy_num_train_pairs", "64", "--toy_num_eval_pairs", "8",
             "--total_episodes", "16", "--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "2",
             "--num_ppo_epochs", "2", "--response_length", "12", "--learning_rate", "1e-3",
             "--num_sample_generations", "0", "--seed", "0", *QUIET]
PPO_UPDATES, PPO_BATCH_SIZE = 2, 8


def log_history(output_dir: Path) -> list[dict]:
    return json.loads((output_dir / "trainer_state.json").read_text())["log_history"]


@pytest.fixture(scope="module")
def reward_model_dir(tmp_path_factory) -> Path:
    """A mixtral-tiny reward model trained on 400 toy pairs for 3 epochs (about 40 steps)."""
    output_dir = tmp_path_factory.mktemp("reward")
    train_reward.main(["--model_name_or_path", "mixtral-tiny", "--toy_num_train_pairs", "400",
                       "--num_train_epochs", "3", "--seed", "0", "--output_dir", str(output_dir), *QUIET])
    return output_dir


def test_reward_model_learns_held_out_preferences(reward_model_dir):
    accuracy = json.loads((reward_model_dir / "eval_results.json").read_text())["eval_accuracy"]
    assert accuracy > 0.7, accuracy  # chance is 0.5; this seed gives about 0.8
    aux_losses = [entry["aux_loss"] for entry in log_history(reward_model_dir) if "aux_loss" in entry]
    assert aux_losses and all(loss > 0 for loss in aux_losses)


def test_reward_loss_adds_the_router_load_balancing_loss(tmp_path, tokenizer):
    model_args = ModelArguments(model_name_or_path="mixtral-tiny")
    model = load_model(model_args, tokenizer, num_labels=1)
    pairs = load_preference_data(DataArguments(toy_num_train_pairs=4, toy_num_eval_pairs=1), tokenizer)["train"]
    pairs = pairs.map(train_reward.whole_sequences, batched=True, remove_columns=pairs.column_names)
    args = train_reward.RewardArguments(output_dir=str(tmp_path), report_to="none", eval_strategy="no")
    trainer = train_reward.MoERewardTrainer(model=model, args=args, train_dataset=pairs, processing_class=tokenizer,
                                            router_aux_loss_coef=0.5)
    batch = trainer.data_collator(list(pairs))
    model.train()

    loss = trainer.compute_loss(model, batch)
    bradley_terry_loss = train_reward.RewardTrainer.compute_loss(trainer, model, batch)
    # independently: the backbone's router logits of every layer, through Mixtral's own loss function
    router_logits = model.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                output_router_logits=True).router_logits
    assert len(router_logits) == model.config.num_hidden_layers
    aux_loss = train_reward.load_balancing_loss_func(router_logits, model.config.num_local_experts,
                                                     model.config.num_experts_per_tok, batch["attention_mask"])
    torch.testing.assert_close(loss, bradley_terry_loss + 0.5 * aux_loss)
    assert trainer._metrics["train"]["aux_loss"][-1] == pytest.approx(aux_loss.item())


def test_ppo_trains_the_policy_and_logs_kl_and_scores(tmp_path, reward_model_dir, tokenizer):
    output_dir = tmp_path / "ppo"
    train_ppo.main([*PPO_FLAGS, "--reward_model_path", str(reward_model_dir), "--output_dir", str(output_dir)])

    logs = [entry for entry in log_history(output_dir) if "objective/kl" in entry]
    assert len(logs) == PPO_UPDATES
    assert all(math.isfinite(entry["objective/kl"]) and math.isfinite(entry["objective/scores"]) for entry in logs)

    initial = load_model(ModelArguments(model_name_or_path="mixtral-tiny"), tokenizer).state_dict()
    trained = AutoModelForCausalLM.from_pretrained(output_dir).state_dict()
    assert trained.keys() == initial.keys()
    changed = [name for name in initial if not torch.equal(initial[name], trained[name])]
    assert any("experts" in name for name in changed) and any("lm_head" in name for name in changed)


def test_ppo_gt_scores_every_sampled_completion_with_the_ground_truth(tmp_path, monkeypatch, rows_file):
    # pairs made before counting starts (the toy generator labels them with the ground truth too)
    pairs_file = rows_file("pairs.jsonl", toy_task.generator_pairs(64, seed=0))
    ground_truth_reward, calls = toy_task.ground_truth_reward, []

    def counting_ground_truth(completions):
        rewards = ground_truth_reward(completions)
        calls.append(rewards)
        return rewards

    monkeypatch.setattr(toy_task, "ground_truth_reward", counting_ground_truth)
    output_dir = tmp_path / "ppo_gt"
    train_ppo.main([*PPO_FLAGS, "--dataset_name", pairs_file, "--reward_model_path", "ground_truth",
                    "--output_dir", str(output_dir)])

    # one call per update (the rollout is scored in one batch); each scores every sampled completion once
    assert [len(rewards) for rewards in calls] == [PPO_BATCH_SIZE] * PPO_UPDATES
    logged_scores = [entry["objective/scores"] for entry in log_history(output_dir) if "objective/scores" in entry]
    assert logged_scores == pytest.approx([sum(rewards) / len(rewards) for rewards in calls], abs=1e-6)


def test_ground_truth_reward_scores_the_completion_not_the_prompt(tokenizer):
    from trl.experimental.utils import get_reward  # here: train_ppo imported trl.experimental without its notice

    prompts = ["i hated this awful movie.", "i loved it."]  # sentiment opposite to the completions'
    completions = [" the acting was wonderful and the music was great.", " the plot was terrible."]
    prompt_ids = [tokenizer(prompt)["input_ids"] for prompt in prompts]
    completion_ids = [tokenizer(text)["input_ids"] + [tokenizer.eos_token_id] for text in completions]
    prompt_length = max(map(len, prompt_ids)) + 2  # wider than any prompt, as a padded batch may be
    width = max(map(len, completion_ids)) + 3  # completions end in eos, then padding, as TRL's rollouts do
    pad = tokenizer.pad_token_id
    rows = [[pad] * (prompt_length - len(p)) + p + c + [pad] * (width - len(c))
            for p, c in zip(prompt_ids, completion_ids)]

    _, scores, _ = get_reward(GroundTruthReward(tokenizer, prompt_length), torch.tensor(rows), pad, prompt_length)

    expected = toy_task.ground_truth_reward(completions)
    assert expected[0] > 0.5 and expected[1] < -0.3
    torch.testing.assert_close(scores, torch.tensor(expected))


# ------------------------------------------------------------------------------- the judge (eval_policy)

def test_judge_agrees_with_the_reward_models_own_held_out_evaluation(reward_model_dir, tokenizer):
    """make_judge scores what the reward model was trained on (prompt + completion ids ending in eos, as
    utils/data.py tokenises them), so its held-out accuracy is the one train_reward.py reported."""
    pairs = load_preference_data(DataArguments(toy_num_train_pairs=400), tokenizer)["test"]  # the fixture's split
    assert len(pairs) % train_reward.RewardArguments.per_device_eval_batch_size == 0  # TRL averages equal batches
    judge = eval_policy.make_judge(str(reward_model_dir), batch_size=32)
    chosen, rejected = judge(pairs["prompt"], pairs["chosen"]), judge(pairs["prompt"], pairs["rejected"])

    accuracy = sum(c > r for c, r in zip(chosen, rejected)) / len(pairs)
    reported = json.loads((reward_model_dir / "eval_results.json").read_text())["eval_accuracy"]
    assert accuracy == pytest.approx(reported, abs=1e-6)  # TRL averages in float32; one pair is 1/200
    # independently: each row's training ids alone through the saved classifier, read at its last token (eos)
    classifier = AutoModelForSequenceClassification.from_pretrained(reward_model_dir).eval()
    for row, score in list(zip(pairs, chosen))[:8]:
        ids = torch.tensor([row["prompt_input_ids"] + row["chosen_input_ids"]])
        assert ids[0, -1] == tokenizer.eos_token_id
        with torch.no_grad():
            assert classifier(input_ids=ids).logits[0, 0].item() == pytest.approx(score, abs=1e-5)


# --------------------------------------------------------------------------- PPO on a small data set

def ppo_flags_without_batch_sizes() -> list[str]:
    flags = list(PPO_FLAGS)
    for name in ("--per_device_train_batch_size", "--gradient_accumulation_steps", "--total_episodes"):
        del flags[flags.index(name):flags.index(name) + 2]
    return flags


def test_ppo_fits_its_rollout_batch_to_a_small_file(tmp_path, rows_file, capsys):
    """32 prompts and 16 episodes with the default rollout batch of 16 x 4: one update of 16 episodes."""
    pairs_file = rows_file("pairs.jsonl", toy_task.generator_pairs(32, seed=0))
    output_dir = tmp_path / "ppo"
    train_ppo.main([*ppo_flags_without_batch_sizes(), "--dataset_name", pairs_file, "--total_episodes", "16",
                    "--reward_model_path", "ground_truth", "--output_dir", str(output_dir)])
    assert "per_device_train_batch_size 16 x gradient_accumulation_steps 4 x 1 processes is more than 32 training " \
           "prompts and --total_episodes 16 can fill: using 16 x 1" in capsys.readouterr().out
    logs = [entry for entry in log_history(output_dir) if "objective/kl" in entry]
    assert [entry["episode"] for entry in logs] == [16]


@pytest.mark.parametrize("per_device, accumulation, mini_batches, processes, prompts, episodes, expected", [
    (16, 4, 1, 1, 1000, 1024, (16, 4)),  # fits: the flags' own
    (16, 4, 1, 1, 32, 1024, (16, 2)),  # fewer prompts: accumulation shrinks first
    (16, 4, 1, 1, 1000, 10, (10, 1)),  # fewer episodes: then the micro-batch
    (4, 4, 2, 2, 25, 1024, (3, 4)),  # 12 per process in 2 mini-batches of 6: micro-batches of 3 (divide 6, <= 4)
])
def test_fit_rollout_batch(per_device, accumulation, mini_batches, processes, prompts, episodes, expected):
    args = SimpleNamespace(per_device_train_batch_size=per_device, gradient_accumulation_steps=accumulation,
                           num_mini_batches=mini_batches, total_episodes=episodes, num_train_epochs=1,
                           whiten_rewards=False)
    assert train_ppo.fit_rollout_batch(args, prompts, processes) == expected


@pytest.mark.parametrize("flags, message", [
    (["--num_mini_batches", "4", "--toy_num_train_pairs", "3"], "3 training prompts and 1024 episodes .* nothing to "
                                                                "train on"),
    (["--num_mini_batches", "3"], "--num_mini_batches 3 must divide the rollout batch per process"),
    (["--whiten_rewards", "true", "--toy_num_train_pairs", "6"], "--whiten_rewards needs at least 8 episodes"),
    (["--reward_model_path", "no/such/reward"], "--reward_model_path no/such/reward: no such folder"),
    (["--model_name_or_path", "missing/sft"], "missing/sft: no tokenizer there: not a preset"),
    (["--attn_implementation", "varlen", "--total_episodes", "8", "--per_device_train_batch_size", "4",
      "--gradient_accumulation_steps", "1", "--response_length", "4"],
     "varlen ignores padding masks, and this script's batches are left-padded"),
])
def test_ppo_runs_that_cannot_work_end_with_one_line_and_status_2(flags, message, tmp_path, capsys):
    argv = ["--model_name_or_path", "mixtral-tiny", "--reward_model_path", "ground_truth",
            "--output_dir", str(tmp_path / "ppo"), *QUIET, *flags]
    with pytest.raises(ConfigError, match=message):
        train_ppo.main(argv)
    with pytest.raises(SystemExit) as exit_info:
        run_script(lambda: train_ppo.main(argv))
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert error.startswith("error: ") and error.count("\n") == 1
    assert not (tmp_path / "ppo").exists()


def test_ppo_refuses_a_reward_model_with_another_tokenizer(tmp_path, tokenizer):
    other = copy.deepcopy(tokenizer)
    other.add_tokens(["<extra>"])
    other.save_pretrained(tmp_path / "reward")
    with pytest.raises(ConfigError, match="reward: its tokenizer differs from the policy's \\(mixtral-tiny\\)"):
        train_ppo.main([*PPO_FLAGS, "--reward_model_path", str(tmp_path / "reward"),
                        "--output_dir", str(tmp_path / "ppo")])


# ------------------------------------------------------------------- a tokenizer without a pad token

CHAT_PAIRS = [{"prompt": [{"role": "system", "content": "write a review."}, {"role": "user", "content": f"film {i}"}],
               "chosen": [{"role": "assistant", "content": "i loved it."}],
               "rejected": [{"role": "assistant", "content": "i hated it."}]} for i in range(8)]


@pytest.fixture(scope="module")
def no_pad_checkpoint(tmp_path_factory) -> str:
    """mixtral-tiny saved with a tokenizer and config that have no pad token, as many checkpoints are."""
    from utils.modeling import toy_tokenizer

    folder = tmp_path_factory.mktemp("no_pad")
    no_pad = copy.deepcopy(toy_tokenizer())
    no_pad.pad_token = None
    no_pad.save_pretrained(folder)
    model = load_model(ModelArguments(model_name_or_path="mixtral-tiny"), toy_tokenizer())
    model.config.pad_token_id = None
    model.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def no_pad_reward_dir(no_pad_checkpoint, tmp_path_factory) -> Path:
    output_dir = tmp_path_factory.mktemp("no_pad_reward")
    train_reward.main(["--model_name_or_path", no_pad_checkpoint, "--toy_num_train_pairs", "16",
                       "--toy_num_eval_pairs", "4", "--per_device_train_batch_size", "8", "--num_train_epochs", "1",
                       "--output_dir", str(output_dir), *QUIET])
    return output_dir


def score_at_last_token(classifier, ids: list[int]) -> float:
    """Independently: the score head on the backbone's last hidden state of one unpadded sequence."""
    with torch.no_grad():
        hidden = classifier.model(input_ids=torch.tensor([ids])).last_hidden_state
        return classifier.score(hidden[0, -1]).item()


def test_reward_model_without_a_pad_token_scores_at_eos(no_pad_reward_dir, tokenizer):
    saved_tokenizer = AutoTokenizer.from_pretrained(no_pad_reward_dir)
    assert saved_tokenizer.pad_token_id != saved_tokenizer.eos_token_id
    classifier = AutoModelForSequenceClassification.from_pretrained(no_pad_reward_dir).eval()
    ids = tokenizer("a fine film. i loved it.")["input_ids"] + [tokenizer.eos_token_id]
    with torch.no_grad():
        score = classifier(input_ids=torch.tensor([ids])).logits[0, 0].item()
    assert score == pytest.approx(score_at_last_token(classifier, ids), abs=1e-5)  # read at eos, not before it


def test_ppo_without_a_pad_token_keeps_eos_and_prompt_tokens(no_pad_checkpoint, no_pad_reward_dir, tmp_path,
                                                             rows_file, monkeypatch):
    """TRL masks by pad_token_id: the rollout's eos must end the response (not be padding) and the chat prompt's
    eos tokens must stay visible, so the reward is the reward model's score of the whole sequence, read at eos."""
    from trl.experimental.ppo.ppo_trainer import first_true_indices, get_reward, truncate_response

    built = {}
    monkeypatch.setattr(train_ppo.PPOTrainer, "train", lambda trainer: built.setdefault("trainer", trainer))
    train_ppo.main(["--model_name_or_path", no_pad_checkpoint, "--reward_model_path", str(no_pad_reward_dir),
                    "--dataset_name", rows_file("chat.jsonl", CHAT_PAIRS), "--output_dir", str(tmp_path / "ppo"),
                    "--total_episodes", "8", "--per_device_train_batch_size", "4", "--gradient_accumulation_steps",
                    "2", *QUIET])
    trainer = built["trainer"]
    tokenizer, eos = trainer.processing_class, trainer.processing_class.eos_token_id
    prompt_ids = trainer.train_dataset[0]["input_ids"]
    assert prompt_ids.count(eos) == 2  # the system and user turns end in eos
    response_ids = tokenizer(" i loved it.", add_special_tokens=False)["input_ids"] + [eos]
    sampled = torch.tensor([response_ids + tokenizer(" more words", add_special_tokens=False)["input_ids"]])

    response = truncate_response(eos, tokenizer.pad_token_id, sampled)  # as TRL's rollout does
    assert first_true_indices(response == tokenizer.pad_token_id).item() - 1 == len(response_ids) - 1  # eos kept
    _, score, _ = get_reward(trainer.reward_model, torch.cat([torch.tensor([prompt_ids]), response], 1),
                             tokenizer.pad_token_id, len(prompt_ids))
    assert score.item() == pytest.approx(score_at_last_token(trainer.reward_model, prompt_ids + response_ids),
                                         abs=1e-5)


def test_an_added_pad_token_gets_an_embedding_row(tokenizer, tmp_path):
    full = load_model(ModelArguments(model_name_or_path="mixtral-tiny"), tokenizer)
    full.resize_token_embeddings(len(tokenizer))  # a checkpoint with no spare rows
    full.save_pretrained(tmp_path / "ckpt")
    with_pad = copy.deepcopy(tokenizer)
    with_pad.add_special_tokens({"pad_token": "<new_pad>"})
    model = load_model(ModelArguments(model_name_or_path=str(tmp_path / "ckpt")), with_pad)
    assert model.get_input_embeddings().num_embeddings == len(with_pad) == len(tokenizer) + 1
    assert model.config.pad_token_id == with_pad.pad_token_id == len(tokenizer)
    assert model(input_ids=torch.tensor([[5, 6, with_pad.pad_token_id]])).logits.shape[-1] == len(with_pad)


# --------------------------------------------------------------------------------------------- precision

SCRIPT_ARGUMENTS = [(train_sft, train_sft.SFTArguments), (train_dpo, train_dpo.DPOArguments),
                    (train_reward, train_reward.RewardArguments), (train_ppo, train_ppo.PPOArguments)]


@pytest.mark.parametrize("script, arguments", SCRIPT_ARGUMENTS)
def test_every_script_defaults_bf16_by_the_one_rule(script, arguments, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a machine with a bf16 GPU...
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: True)
    assert arguments(output_dir=str(tmp_path), use_cpu=True, report_to="none").bf16 is False  # ...left unused
    assert arguments(output_dir=str(tmp_path), use_cpu=True, report_to="none", bf16=True).bf16 is True
    assert script.default_bf16 is precision.default_bf16
    asked = []
    monkeypatch.setattr(script, "default_bf16", lambda args: asked.append(args) or True)
    args = arguments(output_dir=str(tmp_path), use_cpu=True, report_to="none")
    assert args.bf16 is True and asked == [args]


@pytest.mark.parametrize("cuda, bf16_supported, use_cpu, fp16, expected", [
    (True, True, False, False, True), (True, True, True, False, False), (True, True, False, True, False),
    (True, False, False, False, False), (False, False, False, False, False),
])
def test_bf16_default_rule(cuda, bf16_supported, use_cpu, fp16, expected, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: bf16_supported)
    assert precision.default_bf16(SimpleNamespace(bf16=None, use_cpu=use_cpu, fp16=fp16)) is expected


def test_varlen_reads_right_padded_reward_batches_exactly_and_left_padded_ones_wrongly(tokenizer):
    """Why train_ppo.py refuses --attn_implementation varlen and train_reward.py keeps it: transformers gives varlen no
    attention mask, so it reads padded rows as right-padded. TRL's reward batches are (scores match sdpa's); PPO's
    prompts are left-padded (real tokens would attend to the padding before them)."""
    from trl.trainer.reward_trainer import DataCollatorForPreference

    pairs = [{"chosen_ids": tokenizer("i loved it.")["input_ids"],
              "rejected_ids": tokenizer("the plot was dull and the acting was weak.")["input_ids"]}]
    right_padded = DataCollatorForPreference(pad_token_id=tokenizer.pad_token_id)(pairs)
    lengths = right_padded["attention_mask"].sum(1)
    assert lengths[0] < lengths[1]
    left_padded = {key: torch.stack([row.roll(int(row.numel() - length)) for row, length in zip(value, lengths)])
                   for key, value in right_padded.items()}
    scores = {}
    for attn in ("sdpa", "varlen"):
        model = load_model(ModelArguments(model_name_or_path="mixtral-tiny", attn_implementation=attn), tokenizer,
                           num_labels=1).eval()
        with torch.no_grad():
            scores[attn] = {side: model(**batch).logits[:, 0] for side, batch in
                            (("right", right_padded), ("left", left_padded))}
    torch.testing.assert_close(scores["sdpa"]["left"], scores["sdpa"]["right"])  # sdpa masks either padding
    torch.testing.assert_close(scores["varlen"]["right"], scores["sdpa"]["right"])
    assert (scores["varlen"]["left"][0] - scores["sdpa"]["left"][0]).abs() > 1e-3  # the padded (shorter) row
