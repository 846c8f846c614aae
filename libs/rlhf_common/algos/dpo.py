"""DPO and IPO losses on preference pairs.

Inputs are sequence log-probs (sums over response tokens), shape (B,):
  h = (logp_chosen - ref_chosen) - (logp_rejected - ref_rejected)
  DPO: -log sigmoid(beta * h)            (Rafailov et al. 2023)
  IPO: (h - 1 / (2 * beta))^2            (Azar et al. 2023)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F


@dataclass
class PreferenceLossOut:
    loss: torch.Tensor
    chosen_reward: torch.Tensor  # beta * (logp_c - ref_c), mean over the batch
    rejected_reward: torch.Tensor
    accuracy: torch.Tensor  # share of pairs whose implicit reward prefers chosen


def preference_loss(logp_chosen: torch.Tensor, logp_rejected: torch.Tensor, ref_chosen: torch.Tensor,
                    ref_rejected: torch.Tensor, beta: float = 0.1,
                    kind: Literal["dpo", "ipo"] = "dpo") -> PreferenceLossOut:
    if beta <= 0:
        raise ValueError(f"beta={beta}: must be > 0")
    c = logp_chosen - ref_chosen
    r = logp_rejected - ref_rejected
    h = c - r
    if kind == "dpo":
        losses = -F.logsigmoid(beta * h)
    elif kind == "ipo":
        losses = (h - 1.0 / (2.0 * beta)) ** 2
    else:
        raise ValueError(f"unknown preference loss {kind!r}; use dpo or ipo")
    with torch.no_grad():
        acc = (h > 0).float().mean()
    return PreferenceLossOut(losses.mean(), (beta * c).detach().mean(), (beta * r).detach().mean(), acc)


def sequence_logprob(token_logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sum of per-token log-probs over the masked (response) tokens: (B, T) -> (B,)."""
    return (token_logp * mask).sum(-1)
