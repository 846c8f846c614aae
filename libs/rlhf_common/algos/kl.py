"""Per-token KL estimators between the current policy and the reference.

With log_ratio = logp - ref_logp on tokens sampled from the policy:
  k1 = log_ratio                         (unbiased, high variance, can be negative)
  k2 = 0.5 * log_ratio**2                (biased, low variance)
  k3 = exp(-log_ratio) - 1 + log_ratio   (unbiased, always >= 0)
"""

from __future__ import annotations

from typing import Literal

import torch

Estimator = Literal["k1", "k2", "k3"]


def kl_per_token(logp: torch.Tensor, ref_logp: torch.Tensor, estimator: Estimator = "k3") -> torch.Tensor:
    log_ratio = logp - ref_logp
    if estimator == "k1":
        return log_ratio
    if estimator == "k2":
        return 0.5 * log_ratio.pow(2)
    if estimator == "k3":
        return torch.exp(-log_ratio) - 1.0 + log_ratio
    raise ValueError(f"unknown KL estimator {estimator!r}; use k1, k2 or k3")
