"""train_reward.py and train_ppo.py: the reward model learns held-out preferences, PPO trains against it, and PPO-GT
scores every sampled completion, and only the completion, with the toy task's ground truth."""

import json
import math
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

import train_ppo
import train_reward
from utils import toy_task
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
