"""Supervised fine-tuning: token-level negative log-likelihood of the responses."""

from __future__ import annotations

import torch

from .grpo import masked_mean


def sft_loss(token_logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over response tokens of -log p(token): token_logp and mask (B, T)."""
    return -masked_mean(token_logp, mask)
