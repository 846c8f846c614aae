"""Policy optimisation steps on a transformers causal LM, for any registered algorithm
(GRPO, RLOO, PPO, and whatever `rlhf_common.algos.registry` gains).

Independent of Kafka and gRPC: the trainer service feeds it batches built from rollouts,
and the learning tests feed it batches sampled in-process. All maths lives in
`rlhf_common.algos`; this module wires it to a model, an optimizer and minibatches.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Literal

import torch

from rlhf_common.algos.grpo import masked_mean
from rlhf_common.algos.kl import AdaptiveKLController, FixedKLController, kl_per_token
from rlhf_common.algos.logprobs import ResponseBatch, gather_logprobs, pack_responses, response_forward
from rlhf_common.algos.ppo import entropy, truncated_is_weights, value_loss
from rlhf_common.algos.dpo import sequence_logprob
from rlhf_common.algos.registry import ALGORITHMS, PREFERENCE_LOSSES, AdvantageInputs, LossInputs, PreferenceInputs


@dataclass
class LearnerConfig:
    algorithm: str = "grpo"  # a name in rlhf_common.algos.registry.ALGORITHMS
    lr: float = 1e-4
    kl_beta: float = 0.05
    # None: fixed beta. A number: adaptive beta that tracks this KL (nats per token).
    kl_target: float | None = None
    kl_horizon: int = 10_000
    kl_estimator: Literal["k1", "k2", "k3"] = "k3"
    # "loss": beta * KL per token added to the loss (GRPO default).
    # "reward": -beta * KL per token folded into the reward (PPO/RLOO default).
    kl_in: Literal["loss", "reward"] = "loss"
    clip_eps: float = 0.2
    epochs: int = 1
    minibatch_size: int = 0  # 0: the whole batch
    gamma: float = 1.0
    lam: float = 0.95
    vf_coef: float = 0.1
    value_clip: float = 0.2
    entropy_coef: float = 0.0
    is_cap: float = 2.0  # truncated importance-sampling cap (behaviour vs old policy)
    max_grad_norm: float = 1.0
    seed: int = 0


@dataclass
class RolloutBatch:
    """One optimisation batch. Lists are per sample; token lists are (T_i,)."""

    prompts: list[list[int]]
    responses: list[list[int]]
    behaviour_logprobs: list[list[float]]  # from the sampler (vLLM) at the rollout's version
    ref_logprobs: list[list[float]]  # from the frozen reference
    scores: list[float]  # reward-model score per sample
    group_ids: list[str]  # prompt id: samples of one prompt form a group


@dataclass
class StepResult:
    loss: float
    kl: float  # mean per-token KL to the reference before the update (chosen estimator)
    entropy: float
    clip_fraction: float
    value_loss: float
    is_weight_mean: float
    beta: float
    # Per sample: mean |trainer log-prob - sampler log-prob| over its response tokens, before
    # the update. For a sample drawn from the weights the trainer holds, this is the
    # inference engine's numerical mismatch with the trainer.
    logprob_diff: list[float] = field(default_factory=list)
    extra: dict = field(default_factory=dict)


@dataclass
class PreferenceBatch:
    """Preference pairs from feedback labels. Token lists are (T_i,); references are (B,)."""

    prompts: list[list[int]]
    chosen: list[list[int]]
    rejected: list[list[int]]
    ref_chosen: list[float]  # reference sequence log-probs of the chosen responses
    ref_rejected: list[float]


class ValueHead(torch.nn.Module):
    def __init__(self, hidden: int):
        super().__init__()
        self.proj = torch.nn.Linear(hidden, 1)
        torch.nn.init.zeros_(self.proj.weight)
        torch.nn.init.zeros_(self.proj.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.proj(h.float()).squeeze(-1)


class PolicyLearner:
    def __init__(self, model, cfg: LearnerConfig, pad_id: int):
        self.model = model
        self.cfg = cfg
        self.pad_id = pad_id
        self.algorithm = ALGORITHMS.get(cfg.algorithm)
        self.estimator = self.algorithm.estimator
        self.loss_fn = self.algorithm.loss_fn
        self.value_head = ValueHead(model.config.hidden_size) if self.estimator.needs_values else None
        params = list(model.parameters()) + (list(self.value_head.parameters()) if self.value_head else [])
        self.params = [p for p in params if p.requires_grad]
        # fused: one kernel over all parameters instead of a loop of small ops (several
        # times faster on CPU for a 135M model; same algorithm and state layout).
        self.optimizer = torch.optim.Adam(self.params, lr=cfg.lr, fused=True)
        self.kl_ctl = (AdaptiveKLController(cfg.kl_beta, cfg.kl_target, cfg.kl_horizon)
                       if cfg.kl_target is not None else FixedKLController(cfg.kl_beta))
        self.rng = random.Random(cfg.seed)
        self.updates = 0

    # -- forward ------------------------------------------------------------------------
    def _forward(self, batch: ResponseBatch, want_values: bool):
        """Log-probs (B, R) and logits (B, R, V) of the response tokens, and the values
        (B, R) when asked (see ResponseBatch for what is computed and what is not)."""
        logits, hidden = response_forward(self.model, batch, output_hidden_states=want_values)
        logp = gather_logprobs(logits, batch.targets)
        values = self.value_head(hidden) if want_values else None
        return logp, logits, values

    # -- one step -------------------------------------------------------------------------
    def step(self, batch: RolloutBatch) -> StepResult:
        cfg = self.cfg
        packed = pack_responses(batch.prompts, batch.responses, self.pad_id)
        mask = packed.mask
        behaviour = packed.rows(batch.behaviour_logprobs)
        ref = packed.rows(batch.ref_logprobs)
        scores = torch.tensor(batch.scores, dtype=torch.float32)
        with_values = self.value_head is not None
        B = mask.shape[0]
        mb = cfg.minibatch_size or B
        # One epoch over one minibatch: the weights have not changed when the loss is taken,
        # so the log-probs and values "before the update" are those of the training forward
        # pass itself (detached). Exactly the same step, with one forward pass instead of two.
        one_pass = cfg.epochs == 1 and mb >= B
        if one_pass:
            first = self._forward(packed, want_values=with_values)
            old_logp, old_values = first[0].detach(), first[2].detach() if with_values else None
        else:
            with torch.no_grad():
                old_logp, _, old_values = self._forward(packed, want_values=with_values)
        with torch.no_grad():
            kl_old = kl_per_token(old_logp, ref, cfg.kl_estimator) * mask
            beta = self.kl_ctl.beta
            est = self.estimator.fn(AdvantageInputs(
                scores=scores, kl=kl_old, mask=mask, group_ids=batch.group_ids, beta=beta,
                kl_in_reward=cfg.kl_in == "reward", values=old_values * mask if with_values else None,
                gamma=cfg.gamma, lam=cfg.lam))
            adv, returns = est.advantages, est.returns
            is_w = truncated_is_weights(old_logp, behaviour, cfg.is_cap) * mask
            diff = ((old_logp - behaviour).abs() * mask).sum(-1) / mask.sum(-1).clamp(min=1)

        totals = {"loss": 0.0, "clip": 0.0, "vloss": 0.0, "ent": 0.0, "n": 0}
        for _ in range(cfg.epochs):
            order = list(range(B))
            self.rng.shuffle(order)
            for start in range(0, B, mb):
                if one_pass:
                    idx = torch.arange(B)
                    logp, logits, values = first
                else:
                    idx = torch.tensor(order[start:start + mb])
                    logp, logits, values = self._forward(packed.select(idx), want_values=with_values)
                m = mask[idx]
                pl = self.loss_fn(LossInputs(logp=logp, old_logp=old_logp[idx], advantages=adv[idx], mask=m,
                                             is_weights=is_w[idx], clip_eps=cfg.clip_eps))
                loss = pl.loss
                if cfg.kl_in == "loss" and beta > 0:
                    loss = loss + beta * masked_mean(kl_per_token(logp, ref[idx], cfg.kl_estimator), m)
                vl = torch.zeros(())
                if returns is not None:
                    vl = value_loss(values, old_values[idx], returns[idx], m, cfg.value_clip)
                    loss = loss + cfg.vf_coef * vl
                ent = entropy(logits, m)
                if cfg.entropy_coef > 0:
                    loss = loss - cfg.entropy_coef * ent
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(self.params, cfg.max_grad_norm)
                self.optimizer.step()
                self.updates += 1
                totals["loss"] += float(loss.detach())
                totals["clip"] += float(pl.clip_fraction)
                totals["vloss"] += float(vl.detach())
                totals["ent"] += float(ent.detach())
                totals["n"] += 1
        kl_mean = float(masked_mean(kl_old, mask))
        self.kl_ctl.update(kl_mean, 1)
        n = max(1, totals["n"])
        return StepResult(loss=totals["loss"] / n, kl=kl_mean, entropy=totals["ent"] / n,
                          clip_fraction=totals["clip"] / n, value_loss=totals["vloss"] / n,
                          is_weight_mean=float(masked_mean(is_w, mask)), beta=beta, logprob_diff=diff.tolist())

    # -- a step on preference pairs -----------------------------------------------------------
    def preference_step(self, batch: PreferenceBatch, loss: str, beta: float) -> dict:
        """One step of a registered preference loss (DPO, IPO) with the same model and
        optimizer as the RL steps, so both kinds of step can be interleaved."""
        fn = PREFERENCE_LOSSES.get(loss)
        n = len(batch.prompts)
        packed = pack_responses(batch.prompts + batch.prompts, batch.chosen + batch.rejected, self.pad_id)
        logp, _, _ = self._forward(packed, want_values=False)
        seq = sequence_logprob(logp, packed.mask)
        out = fn(PreferenceInputs(seq[:n], seq[n:], torch.tensor(batch.ref_chosen), torch.tensor(batch.ref_rejected),
                                  beta))
        self.optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, self.cfg.max_grad_norm)
        self.optimizer.step()
        self.updates += 1
        return {"loss": float(out.loss.detach()), "accuracy": float(out.accuracy),
                "chosen_reward": float(out.chosen_reward), "rejected_reward": float(out.rejected_reward)}

    # -- state ------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "optimizer": self.optimizer.state_dict(),
            "value_head": self.value_head.state_dict() if self.value_head else None,
            "kl_ctl": self.kl_ctl.state_dict(),
            "rng": self.rng.getstate(),
            "updates": self.updates,
        }

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        if self.value_head is not None and state.get("value_head") is not None:
            self.value_head.load_state_dict(state["value_head"])
        self.kl_ctl.load_state_dict(state["kl_ctl"])
        self.rng.setstate(state["rng"])
        self.updates = int(state["updates"])
