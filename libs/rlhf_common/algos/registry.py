"""Algorithms by name: advantage estimators and policy losses, and the algorithms made of them.

An algorithm is one advantage estimator plus one policy loss. Adding one is one registered
entry, not a new branch in the learner:

    @ADVANTAGES.register("my_estimator")
    def my_estimator(x: AdvantageInputs) -> Advantages: ...

    ALGORITHMS.register("my_algo", Algorithm(advantage="my_estimator", loss="clipped"))

Shapes: per-token tensors are (B, T) on the shifted-target positions of the packed batch,
with a float mask (B, T) that is 1 on response tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Generic, TypeVar

import torch

from .dpo import PreferenceLossOut, preference_loss
from .grpo import group_advantages
from .ppo import PolicyLossOut, gae, kl_shaped_rewards, policy_loss, whiten
from .rloo import rloo_advantages

T = TypeVar("T")


class Registry(Generic[T]):
    """Named entries of one kind; an unknown name is an error that lists the known ones."""

    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, T] = {}

    def register(self, name: str, entry: T | None = None):
        """`register(name, entry)`, or `@register(name)` on a function."""
        def add(e: T) -> T:
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} is registered already")
            self._entries[name] = e
            return e

        return add(entry) if entry is not None else add

    def get(self, name: str) -> T:
        try:
            return self._entries[name]
        except KeyError:
            raise KeyError(f"unknown {self.kind} {name!r}; known: {self.names()}") from None

    def names(self) -> list[str]:
        return sorted(self._entries)


@dataclass(frozen=True)
class AdvantageInputs:
    scores: torch.Tensor  # (B,) sequence scores from the reward model
    kl: torch.Tensor  # (B, T) per-token KL of the pre-update policy to the reference, masked
    mask: torch.Tensor  # (B, T)
    group_ids: list[str]  # (B,) samples of one prompt share an id
    beta: float  # KL weight in force
    kl_in_reward: bool  # fold -beta * KL into the reward (else the learner adds it to the loss)
    values: torch.Tensor | None  # (B, T) pre-update value estimates, masked; for estimators with a critic
    gamma: float
    lam: float


@dataclass(frozen=True)
class Advantages:
    advantages: torch.Tensor  # (B, T), zero off the mask
    returns: torch.Tensor | None = None  # (B, T) value targets, for estimators with a critic


@dataclass(frozen=True)
class LossInputs:
    logp: torch.Tensor  # (B, T) current policy, with gradients
    old_logp: torch.Tensor  # (B, T) pre-update policy
    advantages: torch.Tensor  # (B, T)
    mask: torch.Tensor  # (B, T)
    is_weights: torch.Tensor  # (B, T) truncated importance weights, pre-update vs behaviour policy
    clip_eps: float


@dataclass(frozen=True)
class Estimator:
    fn: Callable[[AdvantageInputs], Advantages]
    needs_values: bool = False  # the learner then trains a value head and passes `values`


@dataclass(frozen=True)
class Algorithm:
    advantage: str  # a name in ADVANTAGES
    loss: str  # a name in POLICY_LOSSES

    @property
    def estimator(self) -> Estimator:
        return ADVANTAGES.get(self.advantage)

    @property
    def loss_fn(self) -> Callable[[LossInputs], PolicyLossOut]:
        return POLICY_LOSSES.get(self.loss)


@dataclass(frozen=True)
class PreferenceInputs:
    logp_chosen: torch.Tensor  # (B,) sequence log-probs of the policy, with gradients
    logp_rejected: torch.Tensor
    ref_chosen: torch.Tensor  # (B,) sequence log-probs of the reference
    ref_rejected: torch.Tensor
    beta: float


ADVANTAGES: Registry[Estimator] = Registry("advantage estimator")
POLICY_LOSSES: Registry[Callable[[LossInputs], PolicyLossOut]] = Registry("policy loss")
ALGORITHMS: Registry[Algorithm] = Registry("algorithm")
# Losses on preference pairs (feedback labels): the trainer's steps on labels use one by name.
PREFERENCE_LOSSES: Registry[Callable[[PreferenceInputs], PreferenceLossOut]] = Registry("preference loss")


def _sequence_scores(x: AdvantageInputs) -> torch.Tensor:
    return x.scores - x.beta * x.kl.sum(-1) if x.kl_in_reward else x.scores


def _grpo(x: AdvantageInputs) -> Advantages:
    """Group-relative: (r - mean) / std within each prompt's group, on every response token."""
    return Advantages(group_advantages(_sequence_scores(x), x.group_ids).unsqueeze(-1) * x.mask)


def _rloo(x: AdvantageInputs) -> Advantages:
    """Leave-one-out baseline within each prompt's group, on every response token."""
    return Advantages(rloo_advantages(_sequence_scores(x), x.group_ids).unsqueeze(-1) * x.mask)


def _gae(x: AdvantageInputs) -> Advantages:
    """GAE over per-token rewards (the score on the last token, -beta * KL per token when
    KL is in the reward) against the value head's estimates; advantages whitened."""
    kl = x.kl if x.kl_in_reward else torch.zeros_like(x.kl)
    adv, returns = gae(kl_shaped_rewards(x.scores, kl, x.mask, x.beta), x.values, x.mask, x.gamma, x.lam)
    return Advantages(whiten(adv, x.mask), returns)


def _clipped(x: LossInputs) -> PolicyLossOut:
    """PPO's clipped surrogate, weighted by the truncated importance weights."""
    return policy_loss(x.logp, x.old_logp, x.advantages, x.mask, x.clip_eps, is_weights=x.is_weights)


ADVANTAGES.register("grpo", Estimator(_grpo))
ADVANTAGES.register("rloo", Estimator(_rloo))
ADVANTAGES.register("gae", Estimator(_gae, needs_values=True))
POLICY_LOSSES.register("clipped", _clipped)
ALGORITHMS.register("grpo", Algorithm(advantage="grpo", loss="clipped"))
ALGORITHMS.register("rloo", Algorithm(advantage="rloo", loss="clipped"))
ALGORITHMS.register("ppo", Algorithm(advantage="gae", loss="clipped"))
for _kind in ("dpo", "ipo"):
    PREFERENCE_LOSSES.register(_kind, lambda x, kind=_kind: preference_loss(
        x.logp_chosen, x.logp_rejected, x.ref_chosen, x.ref_rejected, beta=x.beta, kind=kind))
