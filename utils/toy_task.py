"""The toy sentiment world: a CPU-sized miniature of the DPO paper's IMDb experiment.

Reviews are generated from a small grammar with positive, negative and neutral words; prompts are
review openings; the ground-truth reward of a completion is VADER's compound sentiment (its lexicon
ships with the package, so nothing is downloaded). Preference pairs come from the generator
(no model needed) or, labelled by `build_pairs`, from a policy's own samples (make_toy_pairs.py).
It imports nothing of ours: every other module may use it.
"""

import math
import random
import re

from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

TOY_DATASET_NAME = "toy-sentiment"

NOUNS = ["movie", "film", "plot", "story", "acting", "cast", "ending", "music", "script", "director",
         "main character", "dialogue", "soundtrack", "lead actor", "villain", "camera work"]
ADJECTIVES = {
    "positive": ["great", "wonderful", "brilliant", "excellent", "beautiful", "funny", "charming",
                 "amazing", "superb", "delightful", "fantastic", "lovely", "moving", "clever"],
    "negative": ["terrible", "awful", "boring", "horrible", "dull", "bad", "stupid", "painful",
                 "weak", "disappointing", "ugly", "annoying", "pathetic", "worst"],
    "neutral": ["long", "quiet", "simple", "ordinary", "familiar", "short", "loud", "different",
                "predictable", "strange", "old", "dark", "slow", "typical"],
}
VERBS = {
    "positive": ["loved", "enjoyed", "liked", "admired", "adored", "appreciated"],
    "negative": ["hated", "disliked", "regretted", "despised", "resented", "mocked"],
    "neutral": ["watched", "saw", "remembered", "noticed", "followed", "described"],
}
INTENSIFIERS = ["", "", "", "really ", "very ", "truly ", "quite ", "so "]
SENTENCES = [
    "the {noun} was {intensifier}{adj}.",
    "i {verb} the {noun}.",
    "the {noun} felt {intensifier}{adj}.",
    "i {verb} every minute of it.",
    "overall it was a {adj} {noun}.",
    "the {noun} and the {noun2} were {adj}.",
]
OPENINGS = [
    "i watched this movie last night.",
    "i saw this film with my {friend}.",
    "this film came out in {year}.",
    "i rented this movie on a {day}.",
    "my {friend} told me to watch this film.",
    "i went to see this movie at the cinema.",
    "the trailer for this film was everywhere.",
    "i had heard a lot about this movie.",
]
FRIENDS = ["sister", "brother", "friends", "parents", "wife", "husband", "roommate", "kids"]
DAYS = ["monday", "friday", "rainy sunday", "long weekend", "quiet evening"]
SENTIMENTS = ("positive", "negative", "neutral")


def _pick(rng: random.Random, table: dict, sentiment: str) -> str:
    # Mostly words of the sentence's own sentiment, sometimes the other kinds, as in real reviews.
    roll = rng.random()
    if roll < 0.7:
        kind = sentiment
    else:
        kind = rng.choice([s for s in SENTIMENTS if s != sentiment])
    return rng.choice(table[kind])


def make_sentence(rng: random.Random, sentiment: str) -> str:
    noun, noun2 = rng.sample(NOUNS, 2)
    return rng.choice(SENTENCES).format(
        noun=noun, noun2=noun2, adj=_pick(rng, ADJECTIVES, sentiment), verb=_pick(rng, VERBS, sentiment),
        intensifier=rng.choice(INTENSIFIERS))


def make_opening(rng: random.Random) -> str:
    return rng.choice(OPENINGS).format(
        friend=rng.choice(FRIENDS), year=rng.randint(1960, 2025), day=rng.choice(DAYS))


def make_continuation(rng: random.Random, sentiment: str | None = None, num_sentences: int = 2) -> str:
    """A completion for an opening: a leading space, then `num_sentences` sentences."""
    sentiment = sentiment or rng.choice(SENTIMENTS)
    return "".join(" " + make_sentence(rng, sentiment) for _ in range(num_sentences))


def make_review(rng: random.Random) -> str:
    return make_opening(rng) + make_continuation(rng, num_sentences=rng.randint(2, 3))


def make_corpus(num_reviews: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [make_review(rng) for _ in range(num_reviews)]


def make_prompts(num_prompts: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [make_opening(rng) for _ in range(num_prompts)]


_ANALYZER = None


def ground_truth_reward(completions: list[str]) -> list[float]:
    """VADER compound sentiment in [-1, 1] of each completion: the toy task's true reward."""
    global _ANALYZER
    if _ANALYZER is None:  # the lexicon takes ~0.1 s to load; do it once per process
        _ANALYZER = SentimentIntensityAnalyzer()
    return [_ANALYZER.polarity_scores(text)["compound"] for text in completions]


# A topic the reader does not want to hear about, for a world whose ground truth penalises it (the claim that DPO
# learns from bad examples): reviews that mention the music.
TOPIC_WORDS = ("music", "soundtrack")
TOPIC_PENALTY = 1.0  # as large as VADER's whole positive range: a mention outweighs any sentiment gain


def mentions_topic(text: str, words: tuple[str, ...] = TOPIC_WORDS) -> bool:
    return any(re.search(rf"\b{re.escape(word)}\b", text) for word in words)


def topic_penalised_reward(completions: list[str]) -> list[float]:
    """Sentiment, less TOPIC_PENALTY for a completion that mentions the topic."""
    return [reward - TOPIC_PENALTY * mentions_topic(text)
            for text, reward in zip(completions, ground_truth_reward(completions))]


def brevity_reward(completions: list[str]) -> list[float]:
    """A second preference, for the adaptation claim: fewer words are better (minus the word count)."""
    return [-float(len(text.split())) for text in completions]


# The toy world's ground truths by name (make_toy_pairs.py --ground_truth): each maps completions to rewards.
GROUND_TRUTHS = {"sentiment": ground_truth_reward, "topic": topic_penalised_reward, "brevity": brevity_reward}


def label_pair(rng: random.Random, reward_a: float, reward_b: float, labeling: str, bt_temperature: float) -> bool:
    """True when completion a is preferred. `bradley_terry` samples P(a > b) = sigmoid((r_a - r_b) / T)."""
    if labeling == "deterministic":
        return reward_a > reward_b
    if labeling == "bradley_terry":
        z = (reward_a - reward_b) / bt_temperature  # sigmoid(z) written so that exp() cannot overflow
        probability = 1.0 / (1.0 + math.exp(-z)) if z >= 0 else math.exp(z) / (1.0 + math.exp(z))
        return rng.random() < probability
    raise ValueError(f"unknown pair labeling {labeling!r}: use 'deterministic' or 'bradley_terry'")


def build_pairs(prompts: list[str], completions_a: list[str], completions_b: list[str], *, seed: int,
                labeling: str = "deterministic", bt_temperature: float = 0.1, reward=ground_truth_reward) -> list[dict]:
    """Label two completions per prompt with `reward` (completions -> scores; default the ground truth); pairs with
    equal rewards carry no signal and are skipped, as are pairs with an empty completion."""
    rng = random.Random(seed)
    rewards_a, rewards_b = reward(completions_a), reward(completions_b)
    pairs = []
    for prompt, a, b, r_a, r_b in zip(prompts, completions_a, completions_b, rewards_a, rewards_b):
        if r_a == r_b or a == b or not a.strip() or not b.strip():  # a policy may stop at once: no completion
            continue
        a_wins = label_pair(rng, r_a, r_b, labeling, bt_temperature)
        chosen, rejected = (a, b) if a_wins else (b, a)
        pairs.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    return pairs


def generator_pairs(num_pairs: int, seed: int = 0, labeling: str = "deterministic",
                    bt_temperature: float = 0.1) -> list[dict]:
    """Preference pairs from the grammar alone: no model needed (the default for quick runs)."""
    rng = random.Random(seed)
    pairs = []
    while len(pairs) < num_pairs:  # a few draws tie and are skipped; top up until we have enough
        need = num_pairs - len(pairs)
        prompts = [make_opening(rng) for _ in range(need)]
        completions_a = [make_continuation(rng) for _ in range(need)]
        completions_b = [make_continuation(rng) for _ in range(need)]
        pairs += build_pairs(prompts, completions_a, completions_b, seed=rng.randrange(2**31),
                             labeling=labeling, bt_temperature=bt_temperature)
    return pairs[:num_pairs]

