"""RLOO: REINFORCE with a leave-one-out baseline inside each prompt's group."""

from __future__ import annotations

import torch

from .groups import group_indices


def rloo_advantages(rewards: torch.Tensor, group_ids: list[str]) -> torch.Tensor:
    """A_i = r_i - mean_{j != i, same group} r_j. A group of one gets advantage 0."""
    adv = torch.zeros_like(rewards)
    for idx in group_indices(group_ids):
        k = len(idx)
        if k < 2:
            continue
        r = rewards[idx]
        baseline = (r.sum() - r) / (k - 1)
        adv[idx] = r - baseline
    return adv
