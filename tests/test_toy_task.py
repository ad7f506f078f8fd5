"""utils/toy_task.py: the ground-truth reward, generator pairs and their labeling, determinism by seed."""

import math
import random

import pytest

from utils import toy_task
from utils.toy_task import build_pairs, generator_pairs, ground_truth_reward, label_pair, make_corpus, make_prompts

NUM_PAIRS = 2000  # Bradley-Terry agreement rates: standard error ~0.011 at this size


def rewards_of(pairs):
    chosen = ground_truth_reward([p["chosen"] for p in pairs])
    rejected = ground_truth_reward([p["rejected"] for p in pairs])
    return list(zip(chosen, rejected))


def agreement(pairs) -> float:
    return sum(c > r for c, r in rewards_of(pairs)) / len(pairs)


def test_reward_ranks_positive_above_neutral_above_negative():
    positive, neutral, negative = ground_truth_reward([
        " the acting was really wonderful. i loved every minute of it.",
        " the movie was long. i watched the film.",
        " the acting was terrible. i hated every minute of it.",
    ])
    assert positive > neutral > negative
    assert positive > 0 > negative
    assert all(-1 <= r <= 1 for r in (positive, neutral, negative))


def test_deterministic_generator_pairs_prefer_the_higher_reward():
    pairs = generator_pairs(300, seed=0)
    assert len(pairs) == 300
    assert all(c > r for c, r in rewards_of(pairs))
    for pair in pairs:
        assert set(pair) == {"prompt", "chosen", "rejected"}
        assert pair["chosen"] != pair["rejected"]
        assert pair["chosen"].startswith(" ") and pair["rejected"].startswith(" ")  # continue the opening
        assert not pair["prompt"].startswith(" ") and pair["prompt"].endswith(".")


def test_build_pairs_skips_ties_and_orders_by_reward():
    prompts = ["p1", "p2", "p3"]
    a = [" i loved it. it was wonderful.", " the film was long.", " same text."]
    b = [" i hated it. it was awful.", " the movie was long.", " same text."]
    pairs = build_pairs(prompts, a, b, seed=0)
    assert [p["prompt"] for p in pairs] == ["p1"]  # p2: equal (zero) rewards, p3: identical texts
    assert pairs[0]["chosen"] == a[0] and pairs[0]["rejected"] == b[0]
    (flipped,) = build_pairs(prompts[:1], b[:1], a[:1], seed=0)
    assert flipped["chosen"] == a[0]  # the order of the inputs does not matter


def test_labelings_give_the_same_pairs_in_possibly_other_order():
    deterministic = generator_pairs(200, seed=7)
    sampled = generator_pairs(200, seed=7, labeling="bradley_terry", bt_temperature=1.0)
    assert [p["prompt"] for p in deterministic] == [p["prompt"] for p in sampled]
    assert [{p["chosen"], p["rejected"]} for p in deterministic] == [{p["chosen"], p["rejected"]} for p in sampled]
    assert deterministic != sampled


@pytest.mark.parametrize("temperature", [1e3, 0.1, 1e-3])
def test_bradley_terry_agreement_matches_its_probability(temperature):
    """The chosen side agrees with the reward order at the rate sigmoid(|r_a - r_b| / T) predicts."""
    pairs = generator_pairs(NUM_PAIRS, seed=11, labeling="bradley_terry", bt_temperature=temperature)
    probabilities = [1 / (1 + math.exp(-abs(c - r) / temperature)) for c, r in rewards_of(pairs)]
    expected = sum(probabilities) / len(pairs)
    standard_error = math.sqrt(sum(p * (1 - p) for p in probabilities)) / len(pairs)
    assert abs(agreement(pairs) - expected) <= 5 * standard_error + 1e-9


def test_bradley_terry_agreement_moves_with_temperature():
    rates = {t: agreement(generator_pairs(NUM_PAIRS, seed=11, labeling="bradley_terry", bt_temperature=t))
             for t in (1e3, 0.1, 1e-3)}
    assert 0.44 < rates[1e3] < 0.56  # coin flips
    assert rates[1e-3] > 0.97  # all but near-ties follow the reward
    assert rates[1e3] + 0.1 < rates[0.1] < rates[1e-3]


def test_label_pair_rejects_an_unknown_labeling():
    with pytest.raises(ValueError, match="majority"):
        label_pair(random.Random(0), 0.5, 0.1, "majority", 0.1)


def test_everything_is_deterministic_by_seed():
    assert make_corpus(50, seed=3) == make_corpus(50, seed=3)
    assert make_corpus(50, seed=3) != make_corpus(50, seed=4)
    assert make_prompts(50, seed=3) == make_prompts(50, seed=3)
    assert make_prompts(50, seed=3) != make_prompts(50, seed=4)
    for labeling in ("deterministic", "bradley_terry"):
        assert generator_pairs(50, seed=3, labeling=labeling) == generator_pairs(50, seed=3, labeling=labeling)
        assert generator_pairs(50, seed=3, labeling=labeling) != generator_pairs(50, seed=4, labeling=labeling)


def test_corpus_reviews_are_openings_plus_sentences():
    openings = {o.split("{")[0] for o in toy_task.OPENINGS}
    for review in make_corpus(100, seed=0):
        assert any(review.startswith(prefix) for prefix in openings)
        assert 3 <= review.count(".") <= 4  # an opening and two or three sentences
    assert len(set(make_corpus(100, seed=0))) > 90  # varied


def test_topic_is_a_whole_word_and_costs_the_penalty():
    texts = [" the music was great.", " the soundtrack was great.", " the musical score was great.",
             " the acting was great."]
    assert [toy_task.mentions_topic(text) for text in texts] == [True, True, False, False]
    sentiment = ground_truth_reward(texts)
    penalised = toy_task.topic_penalised_reward(texts)
    assert penalised == pytest.approx([s - toy_task.TOPIC_PENALTY * m for s, m in zip(sentiment, [1, 1, 0, 0])])


def test_build_pairs_labels_by_the_reward_it_is_given():
    prompts = ["p1", "p2"]
    a = [" i loved the music. it was wonderful.", " the film was long and slow and quiet."]
    b = [" the plot was fine.", " the film was long."]
    by_sentiment = build_pairs(prompts, a, b, seed=0)
    assert by_sentiment[0]["chosen"] == a[0]  # the more positive, despite the music
    by_topic = build_pairs(prompts, a, b, seed=0, reward=toy_task.topic_penalised_reward)
    assert by_topic[0]["chosen"] == b[0]  # the topic's penalty outweighs the sentiment
    by_brevity = build_pairs(prompts, a, b, seed=0, reward=toy_task.brevity_reward)
    assert [p["chosen"] for p in by_brevity] == [b[0], b[1]]  # fewer words
    assert toy_task.brevity_reward(b) == [-4.0, -4.0]
    assert set(toy_task.GROUND_TRUTHS) == {"sentiment", "topic", "brevity"}
