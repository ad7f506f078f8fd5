"""utils/rewards.py normalize_reward: any reward rescaled to mean 0, std 1 on the initial policy's samples, so that one
kl_coef weighs the same for the learned reward and the ground truth; train_ppo.py trains on the rescaled reward."""

import copy
import json
import statistics
from types import SimpleNamespace

import pytest
import torch
from datasets import Dataset
from transformers import DataCollatorWithPadding

import train_ppo
from utils import toy_task
from utils.modeling import ModelArguments, load_model
from utils.rewards import GroundTruthReward, normalize_reward

# after train_ppo, which imports trl.experimental without its notice
from trl.experimental.utils import get_reward  # noqa: E402

QUIET = ["--report_to", "none", "--disable_tqdm", "true"]


@pytest.fixture
def recorded_rewards(monkeypatch):
    """The toy ground truth replaced by a spread-out stand-in (an untrained model's samples are mostly neutral to
    VADER), recording every completion it scores and the score given."""
    calls = []

    def length_reward(completions):
        rewards = [float(len(text) % 7 - 3) for text in completions]
        calls.append(list(zip(completions, rewards)))
        return rewards

    monkeypatch.setattr(toy_task, "ground_truth_reward", length_reward)
    return calls


def test_normalize_reward_rescales_by_the_initial_policys_samples(tokenizer, recorded_rewards):
    tokenizer = copy.deepcopy(tokenizer)  # the shared one stays as it is
    tokenizer.padding_side = "left"
    policy = load_model(ModelArguments(model_name_or_path="mixtral-tiny"), tokenizer)
    policy.config.output_router_logits = False
    prompts = Dataset.from_dict({"input_ids": [tokenizer(p)["input_ids"] for p in toy_task.make_prompts(24, seed=3)]})
    prompt_length = max(map(len, prompts["input_ids"]))
    reward = GroundTruthReward(tokenizer, prompt_length)
    collator = DataCollatorWithPadding(tokenizer, padding="max_length", max_length=prompt_length)
    args = SimpleNamespace(reward_normalization_samples=16, seed=0, response_length=8, temperature=1.0,
                           local_rollout_forward_batch_size=8, stop_token="eos")

    mean, std = normalize_reward(reward, policy, tokenizer, collator, prompts, args)

    (scored,) = recorded_rewards  # one batch of the policy's completions
    raw = [score for _, score in scored]
    assert len(raw) == 16 and len({text for text, _ in scored}) > 1
    assert mean == pytest.approx(statistics.fmean(raw)) and std == pytest.approx(statistics.stdev(raw))
    # the model now scores (raw - mean) / std: check on completions of our own, through TRL's reader
    completions = [" the plot was great.", " i hated it, really.", " ok."]
    rows = [[tokenizer.pad_token_id] * prompt_length + tokenizer(text)["input_ids"] + [tokenizer.eos_token_id]
            for text in completions]
    width = max(map(len, rows))
    rows = torch.tensor([row + [tokenizer.pad_token_id] * (width - len(row)) for row in rows])
    _, scores, _ = get_reward(reward, rows, tokenizer.pad_token_id, prompt_length)
    expected = [(float(len(text) % 7 - 3) - mean) / std for text in completions]
    torch.testing.assert_close(scores, torch.tensor(expected), rtol=1e-5, atol=1e-5)


def test_ppo_gt_trains_on_the_normalised_ground_truth(tmp_path, rows_file, recorded_rewards):
    pairs_file = rows_file("pairs.jsonl", [{"prompt": prompt, "chosen": " good.", "rejected": " bad."}
                                           for prompt in toy_task.make_prompts(32, seed=1)])
    output_dir = tmp_path / "ppo_gt"
    train_ppo.main(["--model_name_or_path", "mixtral-tiny", "--dataset_name", pairs_file, "--reward_model_path",
                    "ground_truth", "--reward_normalization_samples", "12", "--total_episodes", "16",
                    "--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "2", "--num_ppo_epochs",
                    "1", "--response_length", "8", "--num_sample_generations", "0", "--seed", "0",
                    "--output_dir", str(output_dir), *QUIET])

    normalization, *updates = [[score for _, score in call] for call in recorded_rewards]
    assert len(normalization) == 12 and [len(update) for update in updates] == [8, 8]
    mean, std = statistics.fmean(normalization), statistics.stdev(normalization)
    history = json.loads((output_dir / "trainer_state.json").read_text())["log_history"]
    logged = [entry["objective/scores"] for entry in history if "objective/scores" in entry]
    # PPO's scores are the updates' ground truth on the initial policy's scale, not the raw values
    assert logged == pytest.approx([(statistics.fmean(update) - mean) / std for update in updates], abs=1e-5)


def test_ppo_value_model_starts_as_the_normalised_reward_model(tmp_path, tokenizer, rows_file, monkeypatch):
    """The value model is copied from the reward model after the rescaling, so both start on one scale."""
    reward_dir = tmp_path / "reward"  # an untrained classifier will do: its scores are spread out
    load_model(ModelArguments(model_name_or_path="mixtral-tiny"), tokenizer, num_labels=1).save_pretrained(reward_dir)
    tokenizer.save_pretrained(reward_dir)
    pairs_file = rows_file("pairs.jsonl", toy_task.generator_pairs(32, seed=0))
    captured = {}

    class Captured(Exception):
        pass

    def capture_trainer(**kwargs):
        captured.update(kwargs)
        raise Captured

    monkeypatch.setattr(train_ppo, "PPOTrainer", capture_trainer)
    with pytest.raises(Captured):
        train_ppo.main(["--model_name_or_path", "mixtral-tiny", "--dataset_name", pairs_file, "--reward_model_path",
                        str(reward_dir), "--reward_normalization_samples", "8", "--response_length", "8",
                        "--output_dir", str(tmp_path / "ppo"), *QUIET])

    reward, value = captured["reward_model"], captured["value_model"]
    assert value is not reward
    ids = tokenizer(toy_task.make_prompts(4, seed=5), padding=True, return_tensors="pt")["input_ids"]
    _, reward_scores, _ = get_reward(reward, ids, tokenizer.pad_token_id, 1)
    _, value_scores, _ = get_reward(value, ids, tokenizer.pad_token_id, 1)
    torch.testing.assert_close(value_scores, reward_scores)
    raw = load_model(ModelArguments(model_name_or_path=str(reward_dir)), tokenizer, num_labels=1)
    _, raw_scores, _ = get_reward(raw, ids, tokenizer.pad_token_id, 1)
    assert not torch.allclose(raw_scores, reward_scores)  # rescaled, not the raw classifier
