"""Bradley-Terry preference model: the reward-model loss and its evaluation helpers.

P(chosen preferred over rejected) = sigmoid(r_chosen - r_rejected). Training minimises
the negative log-likelihood, optionally with a margin that asks for a wider gap on pairs
people separated clearly: -log sigmoid(r_chosen - r_rejected - margin).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def preference_probability(r_a: torch.Tensor, r_b: torch.Tensor) -> torch.Tensor:
    """P(a preferred over b) = sigmoid(r_a - r_b), elementwise; shapes broadcast."""
    return torch.sigmoid(r_a - r_b)


def bradley_terry_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor,
                       margin: torch.Tensor | float | None = None, reduction: str = "mean") -> torch.Tensor:
    """-log sigmoid(r_chosen - r_rejected - margin); r_* shape (B,), margin scalar or (B,).

    Computed as softplus(-(diff)) so large gaps neither overflow nor lose precision.
    """
    diff = r_chosen - r_rejected
    if margin is not None:
        diff = diff - margin
    loss = F.softplus(-diff)
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    if reduction == "none":
        return loss
    raise ValueError(f"reduction={reduction!r}: must be 'mean', 'sum' or 'none'")


def pairwise_accuracy(r_chosen: torch.Tensor, r_rejected: torch.Tensor) -> float:
    """Fraction of pairs where the chosen response scores higher (ties count half)."""
    diff = r_chosen - r_rejected
    return float(((diff > 0).float() + 0.5 * (diff == 0).float()).mean())


def wilson_interval(successes: float, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion (95% by default)."""
    if n <= 0:
        raise ValueError(f"n={n}: need at least one trial")
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def expected_calibration_error(probs: torch.Tensor, labels: torch.Tensor, n_bins: int = 10) -> float:
    """ECE of predicted probabilities against 0/1 outcomes, equal-width bins on [0, 1].

    sum over bins of (bin size / N) * |mean predicted - observed frequency|.
    """
    probs = probs.detach().double().flatten()
    labels = labels.detach().double().flatten()
    if probs.numel() == 0:
        raise ValueError("no predictions")
    # bin k holds p in [k/n, (k+1)/n); p == 1 goes to the last bin.
    idx = torch.clamp((probs * n_bins).long(), max=n_bins - 1)
    ece = 0.0
    for k in range(n_bins):
        sel = idx == k
        cnt = int(sel.sum())
        if cnt:
            ece += cnt / probs.numel() * abs(float(probs[sel].mean()) - float(labels[sel].mean()))
    return ece


def brier_score(probs: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean squared error between predicted probabilities and 0/1 outcomes."""
    return float(((probs.detach().double() - labels.detach().double()) ** 2).mean())
