"""Ordering strategies of the rating queue on reward models whose uncertainty is known."""

from __future__ import annotations

import math
import random
from collections import Counter

import pytest

from rlhf_feedback.active import STRATEGIES, disagreement, rank, select, uncertainty


class LinearBT:
    """A Bradley-Terry reward model with known per-answer rewards: P(A > B) = sigmoid(r_A - r_B)."""

    def __init__(self, rewards: dict[str, float]):
        self.rewards = rewards

    def prob(self, a: str, b: str) -> float:
        return 1.0 / (1.0 + math.exp(-(self.rewards[a] - self.rewards[b])))

    def probs(self, pairs: list[tuple[str, str]]) -> list[float]:
        return [self.prob(a, b) for a, b in pairs]


PAIRS = [("a", "b"), ("c", "d"), ("e", "f"), ("g", "h"), ("i", "j")]


def test_uncertainty_asks_the_pairs_nearest_a_coin_flip_first():
    # reward gaps 3, 0.1, -2, 0.6, -0.3: |gap| orders the distance of P(A) from 0.5
    rm = LinearBT({"a": 3, "b": 0, "c": 1.1, "d": 1.0, "e": 0, "f": 2, "g": 0.6, "h": 0, "i": 0, "j": 0.3})
    probs = [rm.probs(PAIRS)]
    order = rank("uncertainty", probs, random.Random(0))
    assert order == [1, 4, 3, 2, 0]
    assert select("uncertainty", probs, 2, random.Random(5)) == [1, 4]
    u = uncertainty(probs)
    assert u[1] == pytest.approx(0.5 - abs(1 / (1 + math.exp(-0.1)) - 0.5))
    assert max(u) <= 0.5 and min(u) >= 0


def test_uncertainty_averages_the_ensemble():
    # member 1 is sure of pair 0 one way, member 2 the other way: the mean is 0.5, the most uncertain
    probs = [[0.95, 0.7, 0.6], [0.05, 0.7, 0.6]]
    assert rank("uncertainty", probs, random.Random(0)) == [0, 2, 1]


def test_disagreement_asks_where_the_heads_differ_most():
    heads = [LinearBT({"a": 0, "b": 0, "c": 2, "d": 0, "e": 0, "f": 0.2, "g": -1, "h": 0, "i": 0, "j": 0}),
             LinearBT({"a": 0, "b": 0, "c": -2, "d": 0, "e": 0, "f": -0.2, "g": -1, "h": 0, "i": 0, "j": 0}),
             LinearBT({"a": 0, "b": 0, "c": 0, "d": 0, "e": 0, "f": 0, "g": -1, "h": 0, "i": 0, "j": 0})]
    probs = [h.probs(PAIRS) for h in heads]
    spread = disagreement(probs)
    # pairs 0, 3 and 4: every head agrees, so no spread, even though pairs 0 and 4 are coin flips
    assert spread[0] == spread[3] == spread[4] == 0
    assert spread[1] > spread[2] > 0
    order = rank("disagreement", probs, random.Random(0))
    assert order[:2] == [1, 2]
    # among agreeing pairs, the more uncertain first (0 and 4 are exact coin flips, 3 is not)
    assert set(order[2:4]) == {0, 4} and order[4] == 3
    # with two members (live and previous version) the spread is |p1 - p2| / 2
    assert disagreement([[0.9, 0.5], [0.3, 0.5]]) == pytest.approx([0.3, 0.0])


def test_uncertainty_and_disagreement_differ_where_they_should():
    # pair 0: the ensemble agrees it is a coin flip; pair 1: the heads disagree strongly
    probs = [[0.5, 0.9], [0.5, 0.1]]
    assert rank("uncertainty", [[0.5, 0.8]], random.Random(0)) == [0, 1]
    assert rank("disagreement", probs, random.Random(0)) == [1, 0]


def test_random_is_seeded_and_uniform():
    probs = [[0.01, 0.5, 0.99, 0.3, 0.7, 0.45]]
    assert rank("random", probs, random.Random(7)) == rank("random", probs, random.Random(7))
    assert rank("random", probs, random.Random(7)) != rank("random", probs, random.Random(8))
    firsts = Counter(rank("random", probs, random.Random(s))[0] for s in range(6000))
    # each of 6 candidates is first about 1000 times; 6 sd of a binomial(6000, 1/6) is about 173
    assert set(firsts) == set(range(6))
    assert all(abs(n - 1000) < 173 for n in firsts.values()), firsts


def test_ties_are_broken_by_the_seed_not_by_position():
    probs = [[0.5, 0.5, 0.5, 0.5]]
    firsts = {rank("uncertainty", probs, random.Random(s))[0] for s in range(50)}
    assert firsts == {0, 1, 2, 3}


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="strategy='loudest'"):
        rank("loudest", [[0.5]], random.Random(0))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"probs\[1\] has 1 candidates"):
        rank("uncertainty", [[0.5, 0.5], [0.5]], random.Random(0))
    with pytest.raises(ValueError, match=r"probs\[0\]\[0\]=1.5"):
        uncertainty([[1.5]])
    assert set(STRATEGIES) == {"random", "uncertainty", "disagreement"}
