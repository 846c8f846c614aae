"""Active preference sampling: which pair to ask a rater next.

Every candidate pair (two answers to one prompt) has, per member of a reward ensemble, the
probability that answer A is preferred to answer B (Bradley-Terry: sigmoid(r_A - r_B)). A
strategy turns that matrix into an order, most informative first:

- "random": a seeded shuffle, the baseline;
- "uncertainty": the ensemble's mean probability closest to 0.5 first (the model cannot tell
  the two answers apart, so a label moves it most);
- "disagreement": the members' spread first (standard deviation of their probabilities; with
  two members, the live and the previous reward version, |p1 - p2|); ties on spread fall back
  to uncertainty.

Pure Python, no model: the feedback service ranks its rating queue with it, and the study in
bench/active ranks chitchat pairs with it, so both use one definition.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from typing import Literal

Strategy = Literal["random", "uncertainty", "disagreement"]
STRATEGIES: tuple[Strategy, ...] = ("random", "uncertainty", "disagreement")


def _check(probs: Sequence[Sequence[float]]) -> int:
    """probs[m][i]: member m's P(A preferred) for candidate i. Returns the number of candidates."""
    if not probs:
        raise ValueError("probs: at least one ensemble member is required")
    n = len(probs[0])
    for m, row in enumerate(probs):
        if len(row) != n:
            raise ValueError(f"probs[{m}] has {len(row)} candidates, probs[0] has {n}")
        for i, p in enumerate(row):
            if not (math.isfinite(p) and 0.0 <= p <= 1.0):
                raise ValueError(f"probs[{m}][{i}]={p!r}: must be a probability in [0, 1]")
    return n


def mean_probability(probs: Sequence[Sequence[float]]) -> list[float]:
    n = _check(probs)
    return [sum(row[i] for row in probs) / len(probs) for i in range(n)]


def uncertainty(probs: Sequence[Sequence[float]]) -> list[float]:
    """Per candidate, 0.5 - |mean P(A) - 0.5|: 0.5 for a coin flip, 0 for a sure call."""
    return [0.5 - abs(p - 0.5) for p in mean_probability(probs)]


def disagreement(probs: Sequence[Sequence[float]]) -> list[float]:
    """Per candidate, the population standard deviation of the members' P(A) (0 with one member)."""
    n = _check(probs)
    out = []
    for i in range(n):
        col = [row[i] for row in probs]
        mu = sum(col) / len(col)
        out.append(math.sqrt(sum((p - mu) ** 2 for p in col) / len(col)))
    return out


def informativeness(strategy: Strategy, probs: Sequence[Sequence[float]]) -> list[float]:
    """The strategy's score per candidate, higher = ask sooner (all 0 for random)."""
    if strategy == "random":
        return [0.0] * _check(probs)
    if strategy == "uncertainty":
        return uncertainty(probs)
    if strategy == "disagreement":
        return disagreement(probs)
    raise ValueError(f"strategy={strategy!r}: must be one of {', '.join(STRATEGIES)}")


def rank(strategy: Strategy, probs: Sequence[Sequence[float]], rng: random.Random) -> list[int]:
    """Candidate indices, most informative first. Exact ties (and the whole order, for
    "random") are broken by `rng`, so the order is reproducible from its seed."""
    score = informativeness(strategy, probs)
    tie = list(range(len(score)))
    rng.shuffle(tie)
    if strategy == "disagreement":
        unc = uncertainty(probs)
        return sorted(range(len(score)), key=lambda i: (-round(score[i], 12), -round(unc[i], 12), tie[i]))
    return sorted(range(len(score)), key=lambda i: (-round(score[i], 12), tie[i]))


def select(strategy: Strategy, probs: Sequence[Sequence[float]], k: int, rng: random.Random) -> list[int]:
    """The k candidates to ask next (a batch)."""
    if k < 0:
        raise ValueError(f"k={k}: must be >= 0")
    return rank(strategy, probs, rng)[:k]


def priorities(strategy: Strategy, probs: Sequence[Sequence[float]], rng: random.Random) -> list[float]:
    """Per candidate, a priority comparable across calls (the rating queue ranks its pairs in
    slices and serves the highest first): the strategy's score, with uncertainty as the second
    key of disagreement; a uniform draw for random."""
    if strategy == "random":
        return [rng.random() for _ in range(_check(probs))]
    score = informativeness(strategy, probs)
    if strategy == "disagreement":
        return [s + 1e-6 * u for s, u in zip(score, uncertainty(probs))]
    return score
