"""GRPO: group-relative advantages (the clipped surrogate and KL penalty are in ppo.py / kl.py)."""

from __future__ import annotations

import torch

from .groups import group_indices


def group_advantages(rewards: torch.Tensor, group_ids: list[str], eps: float = 1e-6,
                     scale_by_std: bool = True) -> torch.Tensor:
    """(r - mean_group) / (std_group + eps) for each sample; shape (B,) like rewards.

    A group of one sample, or a group whose rewards are all equal, gets advantage 0.
    """
    adv = torch.zeros_like(rewards)
    for idx in group_indices(group_ids):
        r = rewards[idx]
        centered = r - r.mean()
        if scale_by_std and len(idx) > 1:
            centered = centered / (r.std(unbiased=True) + eps)
        adv[idx] = centered
    return adv


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum() / mask.sum().clamp(min=1.0)
