"""GRPO: group-relative advantages and the clipped surrogate with a KL penalty."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .kl import Estimator, kl_per_token


def group_advantages(rewards: torch.Tensor, group_ids: list[str], eps: float = 1e-6,
                     scale_by_std: bool = True) -> torch.Tensor:
    """(r - mean_group) / (std_group + eps) for each sample; shape (B,) like rewards.

    A group of one sample, or a group whose rewards are all equal, gets advantage 0.
    """
    adv = torch.zeros_like(rewards)
    groups: dict[str, list[int]] = {}
    for i, g in enumerate(group_ids):
        groups.setdefault(g, []).append(i)
    for idx in groups.values():
        r = rewards[idx]
        centered = r - r.mean()
        if scale_by_std and len(idx) > 1:
            centered = centered / (r.std(unbiased=True) + eps)
        adv[idx] = centered
    return adv


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum() / mask.sum().clamp(min=1.0)


@dataclass
class GRPOLossOut:
    loss: torch.Tensor
    kl: torch.Tensor
    clip_fraction: torch.Tensor
    ratio_mean: torch.Tensor


def grpo_loss(
    logp: torch.Tensor,
    behaviour_logp: torch.Tensor,
    ref_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_eps: float = 0.2,
    kl_beta: float = 0.05,
    kl_estimator: Estimator = "k3",
) -> GRPOLossOut:
    """Clipped surrogate with a per-token KL penalty in the loss.

    Shapes: logp, behaviour_logp, ref_logp, mask (B, T); advantages (B,).
    logp is from the current policy (with grad), behaviour_logp from the policy that
    sampled the tokens, ref_logp from the frozen reference.
    """
    ratio = torch.exp(logp - behaviour_logp)
    adv = advantages.unsqueeze(-1)
    unclipped = ratio * adv
    clipped = torch.clamp(ratio, 1.0 - clip_eps, 1.0 + clip_eps) * adv
    pg = -torch.minimum(unclipped, clipped)
    kl = kl_per_token(logp, ref_logp, kl_estimator)
    loss = masked_mean(pg + kl_beta * kl, mask)
    with torch.no_grad():
        clip_frac = masked_mean(((ratio - 1.0).abs() > clip_eps).float(), mask)
        ratio_mean = masked_mean(ratio, mask)
    return GRPOLossOut(loss, masked_mean(kl.detach(), mask), clip_frac, ratio_mean)
