"""The simulated users' noise model and the gold judge (libs/rlhf_devstack/simusers.py)."""

from __future__ import annotations

import math
import random
import time
from collections import Counter

import pytest

from rlhf_devstack.simusers import (Answer, Calibration, GoldJudge, GoldSettings, NoiseModel, cached_settings,
                                    load_or_train, mean_interval, p_choose_a, p_thumb_up, pairwise, rating, thumb,
                                    train_gold_judge, wilson, win_rate)

CAL_SCORES = [i / 10 for i in range(-50, 51)]  # 101 evenly spread gold scores, median 0
CAL = Calibration.from_scores(CAL_SCORES)


def test_calibration_is_the_median_and_the_quintiles_of_the_scores():
    assert CAL.centre == 0.0 and CAL.n == 101 and CAL.levels == 5
    assert [round(b, 6) for b in CAL.boundaries] == [-3.0, -1.0, 1.0, 3.0]
    assert math.isclose(CAL.scale, 2.9297, abs_tol=1e-3)
    with pytest.raises(ValueError, match="at least two"):
        Calibration.from_scores([1.0])


def test_noise_parameters_are_checked():
    for bad in ({"thumb_temperature": -1.0}, {"rating_noise": math.nan}, {"pairwise_temperature": math.inf}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            NoiseModel(**bad)


def test_noise_relative_to_the_calibration_spread():
    noise = NoiseModel.scaled(CAL, temperature=0.5, rating_noise=0.25)
    assert math.isclose(noise.thumb_temperature, 0.5 * CAL.scale)
    assert noise.pairwise_temperature == noise.thumb_temperature
    assert math.isclose(noise.rating_noise, 0.25 * CAL.scale)
    assert math.isclose(p_thumb_up(CAL.centre + CAL.scale, CAL, noise), 1 / (1 + math.exp(-2)))


def test_thumb_up_probability_is_a_sigmoid_around_the_centre_and_monotone():
    noise = NoiseModel(thumb_temperature=0.5)
    assert p_thumb_up(CAL.centre, CAL, noise) == 0.5
    assert math.isclose(p_thumb_up(0.5, CAL, noise), 1 / (1 + math.exp(-1)))
    golds = [x / 4 for x in range(-20, 21)]
    probs = [p_thumb_up(g, CAL, noise) for g in golds]
    assert all(a < b for a, b in zip(probs, probs[1:]))
    assert probs[0] < 0.001 and probs[-1] > 0.999
    # noiseless users: a step at the centre
    assert [p_thumb_up(g, CAL, NoiseModel(thumb_temperature=0)) for g in (-0.1, 0.0, 0.1)] == [0.0, 0.0, 1.0]


def test_thumbs_follow_their_probability_and_are_reproducible_with_a_seed():
    noise = NoiseModel(thumb_temperature=1.0)
    draws = [thumb(1.0, CAL, noise, random.Random(7)) for _ in range(3)]
    assert len(set(draws)) == 1  # the same seed, the same thumb
    rng = random.Random(1)
    seq = [thumb(0.0, CAL, noise, rng) for _ in range(50)]
    rng = random.Random(1)
    assert seq == [thumb(0.0, CAL, noise, rng) for _ in range(50)]
    rng2 = random.Random(2)
    assert seq != [thumb(0.0, CAL, noise, rng2) for _ in range(50)]
    rng = random.Random(3)
    n = 4000
    for gold in (-2.0, 0.0, 1.0):
        ups = sum(thumb(gold, CAL, noise, rng) == "up" for _ in range(n))
        p = p_thumb_up(gold, CAL, noise)
        assert abs(ups / n - p) < 4 * math.sqrt(p * (1 - p) / n) + 1e-9, (gold, ups / n, p)
    # more thumbs up for better answers
    rng = random.Random(4)
    share = [sum(thumb(g, CAL, noise, rng) == "up" for _ in range(2000)) for g in (-2.0, 0.0, 2.0)]
    assert share[0] < share[1] < share[2]


def test_ratings_without_noise_are_the_quintiles_and_spread_evenly_over_the_calibration_answers():
    rng = random.Random(0)
    quiet = NoiseModel(rating_noise=0)
    assert [rating(g, CAL, quiet, rng) for g in (-4.0, -2.0, 0.0, 2.0, 4.0)] == [1, 2, 3, 4, 5]
    hist = Counter(rating(g, CAL, quiet, rng) for g in CAL_SCORES)
    assert sorted(hist) == [1, 2, 3, 4, 5]
    assert all(abs(hist[k] - 101 / 5) <= 1 for k in hist), hist  # flat: each level holds a fifth


def test_noisy_ratings_are_monotone_in_the_gold_score_and_keep_a_bell_around_the_true_level():
    noise = NoiseModel(rating_noise=1.0)
    rng = random.Random(5)
    means = []
    for gold in (-4.0, -2.0, 0.0, 2.0, 4.0):
        rs = [rating(gold, CAL, noise, rng) for _ in range(2000)]
        assert set(rs) <= {1, 2, 3, 4, 5}
        means.append(sum(rs) / len(rs))
    assert all(a < b for a, b in zip(means, means[1:])), means
    # an answer in the middle level is rated 3 most often, 2 and 4 less, 1 and 5 rarely
    hist = Counter(rating(0.0, CAL, noise, rng) for _ in range(4000))
    assert hist[3] > hist[2] > hist[1] and hist[3] > hist[4] > hist[5]
    assert hist[1] + hist[5] < 0.05 * 4000
    # the histogram of noisy ratings over the calibration answers still covers every level
    hist = Counter(rating(g, CAL, noise, rng) for g in CAL_SCORES * 20)
    assert all(0.1 < hist[k] / (101 * 20) < 0.3 for k in range(1, 6)), hist
    # reproducible
    assert [rating(0.3, CAL, noise, random.Random(9)) for _ in range(3)] == [rating(0.3, CAL, noise,
                                                                                    random.Random(9))] * 3


def test_pairwise_choices_are_bradley_terry():
    noise = NoiseModel(pairwise_temperature=2.0)
    assert p_choose_a(1.3, 1.3, noise) == 0.5
    assert math.isclose(p_choose_a(2.0, 0.0, noise), 1 / (1 + math.exp(-1)))
    assert math.isclose(p_choose_a(0.4, -1.1, noise) + p_choose_a(-1.1, 0.4, noise), 1.0)
    probs = [p_choose_a(d, 0.0, noise) for d in (-3, -1, 0, 1, 3)]
    assert all(a < b for a, b in zip(probs, probs[1:]))
    rng = random.Random(11)
    n = 4000
    for d in (-2.0, 0.0, 3.0):
        a_share = sum(pairwise(d, 0.0, noise, rng) == "a" for _ in range(n)) / n
        p = p_choose_a(d, 0.0, noise)
        assert abs(a_share - p) < 4 * math.sqrt(p * (1 - p) / n), (d, a_share, p)
    assert p_choose_a(0.1, 0.0, NoiseModel(pairwise_temperature=0)) == 1.0
    assert pairwise(0.0, 0.1, NoiseModel(pairwise_temperature=0), random.Random(0)) == "b"


def test_intervals():
    lo, hi = wilson(80, 100)
    assert 0.71 < lo < 0.72 and 0.86 < hi < 0.87
    assert wilson(0, 10)[0] == 0.0 and wilson(10, 10)[1] == 1.0
    m, lo, hi = mean_interval([1.0, 2.0, 3.0])
    assert m == 2.0 and math.isclose(hi - m, 4.30 / math.sqrt(3), rel_tol=1e-6) and math.isclose(m - lo, hi - m)


@pytest.fixture(scope="module")
def small_judge(tmp_path_factory):
    """A gold judge trained on a seeded sample of 300 conversations, cached in a folder."""
    folder = tmp_path_factory.mktemp("gold")
    settings = GoldSettings(conversations=300, seed=0)
    t0 = time.perf_counter()
    judge = load_or_train(folder, settings, progress=False)
    return judge, folder, settings, time.perf_counter() - t0


def test_a_gold_judge_from_300_conversations_beats_chance_on_held_out_prompts(small_judge):
    judge, _, _, _ = small_judge
    h = judge.meta["held_out"]
    assert h["accuracy"] > 0.6 and h["pairs"] >= 50 and h["prompts"] >= 2, h
    assert h["wilson95"][0] < h["accuracy"] < h["wilson95"][1]
    assert judge.meta["conversations_used"] == 300 and judge.meta["final_pairs"] > h["train_pairs"]
    # held-out prompts are prompts the head never saw while it was measured
    assert h["train_prompts"] + h["prompts"] == judge.meta["prompts"]


def test_the_cached_judge_loads_fast_and_scores_identically(small_judge):
    judge, folder, settings, _ = small_judge
    pairs = [("What is your favourite movie?", "I love old westerns, they are so much fun!"),
             ("What is your favourite movie?", "no."),
             ("Tell me about your weekend.", "I went hiking with friends and we saw a waterfall.")]
    scores = judge.score(pairs)
    assert len(scores) == 3 and len(set(scores)) == 3
    assert cached_settings(folder) == settings
    t0 = time.perf_counter()
    again = load_or_train(folder, settings, progress=False)
    assert time.perf_counter() - t0 < 10  # loaded, not trained again
    assert again.meta == judge.meta
    assert again.score(pairs) == scores
    reordered = GoldJudge.load(folder).score(pairs[::-1])[::-1]  # order within a batch changes no score
    assert all(math.isclose(x, y, rel_tol=1e-9) for x, y in zip(reordered, scores))
    assert cached_settings(folder / "missing") is None


def test_win_rate_pairs_answers_by_prompt(small_judge):
    judge, _, _, _ = small_judge
    p = "What is your favourite movie?"
    good, bad = "I love old westerns, they are so much fun! What about you?", "no."
    g_good, g_bad = judge.score([(p, good), (p, bad)])
    better, worse = (good, bad) if g_good > g_bad else (bad, good)
    a = [Answer(p, better, "g1", 0), (p, worse)]
    b = [(p, worse), Answer(p, worse, "g4", 1)]
    w = win_rate(a, b, judge)
    assert (w.wins, w.ties, w.n) == (1, 1, 2) and w.rate == 0.75 and w.low < 0.75 < w.high
    with pytest.raises(ValueError, match="different prompts"):
        win_rate([(p, good)], [("Another prompt", good)], judge)
    with pytest.raises(ValueError, match="same length"):
        win_rate([(p, good)], [], judge)


def test_training_needs_two_prompts():
    from rlhf_jobs.preference_data import RatedConversation

    convs = [RatedConversation(str(i), "Only prompt", f"A: hi {i}", float(i)) for i in range(5)]
    with pytest.raises(ValueError, match="two prompts"):
        train_gold_judge(GoldSettings(), progress=False, conversations=convs)
