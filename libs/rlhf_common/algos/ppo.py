"""PPO with a value head: GAE, clipped policy and value losses, entropy, KL-shaped rewards.

Shapes: every per-token tensor is (B, T) with a float mask (B, T) that is 1 on response
tokens. `old_logp` are log-probs of the policy that the minibatch epochs start from (the
trainer's own forward pass before the update); `behaviour_logp` are the sampler's
(vLLM's) log-probs of the same tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .grpo import masked_mean


def kl_shaped_rewards(scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, beta: float) -> torch.Tensor:
    """Per-token rewards: -beta * kl_t on every response token, plus the sequence score on
    the last response token. scores (B,), kl and mask (B, T)."""
    rewards = -beta * kl * mask
    last = (mask.cumsum(-1) == mask.sum(-1, keepdim=True)) & (mask > 0)
    return rewards + last.float() * scores.unsqueeze(-1)


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0,
        lam: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over masked token sequences.

    delta_t = r_t + gamma * V_{t+1} * m_{t+1} - V_t;  A_t = delta_t + gamma * lam * m_{t+1} * A_{t+1}.
    Returns (advantages, returns = advantages + values), both zero where mask is 0.
    """
    B, T = rewards.shape
    adv = torch.zeros_like(rewards)
    last = torch.zeros(B, dtype=rewards.dtype)
    for t in reversed(range(T)):
        if t + 1 < T:
            next_v, next_m = values[:, t + 1], mask[:, t + 1]
        else:
            next_v, next_m = torch.zeros(B, dtype=values.dtype), torch.zeros(B, dtype=mask.dtype)
        delta = rewards[:, t] + gamma * next_v * next_m - values[:, t]
        last = delta + gamma * lam * next_m * last
        adv[:, t] = last * mask[:, t]
    return adv, (adv + values) * mask


def whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * mask


@dataclass
class PolicyLossOut:
    loss: torch.Tensor
    clip_fraction: torch.Tensor
    approx_kl: torch.Tensor


def policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                clip_eps: float = 0.2, is_weights: torch.Tensor | None = None) -> PolicyLossOut:
    """Clipped surrogate: mean over tokens of -min(r*A, clip(r, 1-eps, 1+eps)*A), r = exp(logp - old_logp).

    `is_weights` (B, T), if given, multiply the per-token loss (truncated importance sampling
    between the trainer's old policy and the behaviour policy).
    """
    ratio = torch.exp(logp - old_logp)
    per_token = -torch.minimum(ratio * advantages, torch.clamp(ratio, 1 - clip_eps, 1 + clip_eps) * advantages)
    if is_weights is not None:
        per_token = per_token * is_weights
    with torch.no_grad():
        clip_frac = masked_mean(((ratio - 1).abs() > clip_eps).float(), mask)
        approx_kl = masked_mean(0.5 * (logp - old_logp) ** 2, mask)
    return PolicyLossOut(masked_mean(per_token, mask), clip_frac, approx_kl)


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
               clip_range: float = 0.2) -> torch.Tensor:
    """0.5 * mean over tokens of max((V - R)^2, (clip(V, V_old ± c) - R)^2)."""
    clipped = old_values + torch.clamp(values - old_values, -clip_range, clip_range)
    return 0.5 * masked_mean(torch.maximum((values - returns) ** 2, (clipped - returns) ** 2), mask)


def entropy(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean per-token entropy (nats) of the categorical distributions in logits (B, T, V)."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return masked_mean(-(logp.exp() * logp).sum(-1), mask)


def truncated_is_weights(old_logp: torch.Tensor, behaviour_logp: torch.Tensor, cap: float = 2.0) -> torch.Tensor:
    """min(pi_old / pi_behaviour, cap) per token: corrects for the sampler being a different
    (stale or numerically different) policy than the one the update starts from."""
    return torch.clamp(torch.exp(old_logp - behaviour_logp), max=cap).detach()
