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


class FixedKLController:
    """A constant beta."""

    def __init__(self, beta: float):
        if beta < 0:
            raise ValueError(f"beta={beta}: must be >= 0")
        self.beta = beta

    def update(self, current_kl: float, n_steps: int) -> float:
        return self.beta

    def state_dict(self) -> dict:
        return {"beta": self.beta}

    def load_state_dict(self, state: dict) -> None:
        self.beta = float(state["beta"])


class AdaptiveKLController(FixedKLController):
    """Proportional controller that moves beta so the measured KL tracks a target
    (Ziegler et al. 2019): e = clip(KL / target - 1, -0.2, 0.2); beta *= 1 + e * n / horizon."""

    def __init__(self, beta: float, target: float, horizon: int = 10_000):
        super().__init__(beta)
        if target <= 0:
            raise ValueError(f"target={target}: must be > 0")
        if horizon <= 0:
            raise ValueError(f"horizon={horizon}: must be > 0")
        self.target = target
        self.horizon = horizon

    def update(self, current_kl: float, n_steps: int) -> float:
        error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.beta *= 1.0 + error * n_steps / self.horizon
        return self.beta

    def state_dict(self) -> dict:
        return {"beta": self.beta, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state: dict) -> None:
        self.beta = float(state["beta"])
        self.target = float(state["target"])
        self.horizon = int(state["horizon"])
