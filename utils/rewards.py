"""Rewards: a judge that scores texts (the ground truth or a train_reward.py model: evaluation, pair labelling), the toy
task's ground-truth reward in the shape of a reward model for PPO-GT (the DPO paper's PPO baseline that is given the
true reward instead of a learned one), and the normalisation that puts any reward on one scale."""

import logging

import torch
from torch import nn
from transformers.modeling_outputs import BaseModelOutput

from utils import toy_task
from utils.data import collate_completions, special_prefix_ids, tokenize_completion
from utils.errors import ConfigError
from utils.modeling import ModelArguments, load_model, load_tokenizer

logger = logging.getLogger(__name__)
GROUND_TRUTH = "ground_truth"


def make_judge(judge: str, *, batch_size: int = 64):
    """A function (prompts, completions) -> scores, for plain-text prompts (the toy task's).

    A reward model scores what it was trained on: with its own tokenizer, prompt ids + completion ids ending in eos,
    split as utils/data.py tokenises a pair (a reward model reads its score at the last token, here eos)."""
    if judge == GROUND_TRUTH:
        return lambda prompts, completions: toy_task.ground_truth_reward(completions)
    model_args = ModelArguments(model_name_or_path=judge)
    tokenizer = load_tokenizer(model_args, pad_apart_from_eos=True)  # as train_reward.py loads it
    reward_model = load_model(model_args, tokenizer, num_labels=1).eval()
    prefix_ids = special_prefix_ids(tokenizer)

    @torch.no_grad()
    def score(prompts, completions):
        prompt_ids = [tokenizer(prompt, add_special_tokens=False)["input_ids"] for prompt in prompts]
        completion_ids = [tokenize_completion(tokenizer, prompt, completion, ids)
                          for prompt, completion, ids in zip(prompts, completions, prompt_ids)]
        scores = []
        for start in range(0, len(prompts), batch_size):
            batch = collate_completions([prefix_ids + ids for ids in prompt_ids[start:start + batch_size]],
                                        completion_ids[start:start + batch_size], tokenizer.pad_token_id)
            scores += reward_model(input_ids=batch["input_ids"].to(reward_model.device),
                                   attention_mask=batch["attention_mask"].to(reward_model.device)
                                   ).logits[:, 0].float().tolist()
        return scores

    return score


class GroundTruthReward(nn.Module):
    """Scores completions with `toy_task.ground_truth_reward` wherever TRL's PPOTrainer expects a reward model.

    TRL scores with `get_reward(model, query_responses, pad_token_id, context_length)`: it calls
    `getattr(model, model.base_model_prefix)` as the backbone, applies `model.score` to its last hidden states and
    reads each row at its completion's last token. Here that backbone is `score_completions`, which decodes each
    completion and puts its reward at every position, and `score` is the identity.

    `get_reward` does not pass `context_length` on, so prompts must be left-padded to exactly `prompt_length` tokens:
    every completion then starts at that column.
    """

    base_model_prefix = "score_completions"

    def __init__(self, tokenizer, prompt_length: int):
        super().__init__()
        self.tokenizer = tokenizer
        self.prompt_length = prompt_length
        self.score = nn.Identity()

    def score_completions(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **unused) -> BaseModelOutput:
        completions = input_ids[:, self.prompt_length:]
        # A completion ends at its first padding token, as TRL's sequence lengths do (it pads after the stop token).
        kept = attention_mask[:, self.prompt_length:].long().cumprod(dim=1).bool()
        texts = [self.tokenizer.decode(ids[mask], skip_special_tokens=True) for ids, mask in zip(completions, kept)]
        rewards = torch.tensor(toy_task.ground_truth_reward(texts), dtype=torch.float32, device=input_ids.device)
        return BaseModelOutput(hidden_states=(rewards[:, None, None].expand(-1, input_ids.shape[1], 1),))


@torch.no_grad()
def normalize_reward(reward_model: nn.Module, policy, tokenizer, collator, prompts, args) -> tuple[float, float]:
    """Rescale `reward_model`'s scores to mean 0 and standard deviation 1 over `args.reward_normalization_samples`
    completions of the initial policy, sampled and scored as TRL's PPOTrainer samples and scores a rollout. Returns
    the raw (mean, std).

    PPO's reward is score - kl_coef * KL, so kl_coef only means something relative to the score's spread: a learned
    reward model's logits and the toy ground truth (VADER, in [-1, 1]) differ ~6x in spread here, so the same kl_coef
    held PPO on the ground truth ~6x tighter. Normalising every reward on the initial policy's samples, as Ziegler
    et al. (2019, "Fine-Tuning Language Models from Human Preferences") did, makes one kl_coef sweep comparable across
    rewards. The rescaling is an affine layer after `score`, so a value model copied from the reward model starts on
    the same scale.
    """
    from transformers import GenerationConfig
    from trl.experimental.ppo.ppo_trainer import batch_generation, truncate_response
    from trl.experimental.utils import get_reward

    count = min(args.reward_normalization_samples, len(prompts))
    queries = collator([{"input_ids": ids} for ids in prompts.shuffle(seed=args.seed)["input_ids"][:count]])["input_ids"]
    generation = GenerationConfig(max_new_tokens=args.response_length, temperature=args.temperature + 1e-7, top_k=0,
                                  top_p=1.0, do_sample=True)  # PPOTrainer.train's sampling
    with torch.random.fork_rng():
        torch.manual_seed(args.seed)
        query_responses, _ = batch_generation(policy, queries.to(policy.device), args.local_rollout_forward_batch_size,
                                              tokenizer.pad_token_id, generation)
    responses = query_responses[:, queries.shape[1]:]
    if args.stop_token == "eos":
        responses = truncate_response(tokenizer.eos_token_id, tokenizer.pad_token_id, responses)
    _, scores, _ = get_reward(reward_model, torch.cat((queries.to(responses.device), responses), 1),
                              tokenizer.pad_token_id, queries.shape[1])
    mean, std = scores.float().mean().item(), scores.float().std().item()
    if not std > 0:
        raise ConfigError(f"--reward_normalization_samples: the reward gives all {count} samples of the initial "
                          f"policy the same score ({mean}), so there is no scale to normalise by; set it to 0")
    reference = next(reward_model.parameters(), torch.empty(0, device=responses.device))
    affine = nn.Linear(1, 1).to(device=reference.device, dtype=reference.dtype if reference.is_floating_point()
                                else torch.float32)
    affine.weight.fill_(1 / std)
    affine.bias.fill_(-mean / std)
    reward_model.score = nn.Sequential(reward_model.score, affine)
    logger.info("reward normalised on %d samples of the initial policy: raw mean %.4f, std %.4f", count, mean, std)
    return mean, std
