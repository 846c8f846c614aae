"""Evaluation on held-out prompts: win rate against the SFT (initial) policy, KL, length.

The baseline answers of the initial policy are generated once, when the evaluator is made,
before any update. Each evaluation samples the current policy on the same prompts (fixed
seed), scores both with the reward service, and measures the per-token KL of the current
answers to the reference. Held-out prompts are never trained on: the trainer skips
rollouts whose prompt text is in the held-out set.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from rlhf_common.algos.kl import kl_per_token
from rlhf_common.sampling import Samples, sample
from rlhf_common.text import pad_id

from .clients import ReferenceClient, RewardClient


@dataclass(frozen=True)
class EvalResult:
    step: int
    version: int
    win_rate: float  # share of prompts where the current answer outscores the SFT answer (ties count 1/2)
    kl: float  # mean per-token KL(current || reference) on the current answers, nats (the trainer's estimator)
    response_length: float
    reward_mean: float
    baseline_reward_mean: float
    prompts: int
    seconds: float


class Evaluator:
    def __init__(self, prompts: list[str], tokenizer, model, reward: RewardClient, max_tokens: int,
                 log_path: Path, seed: int = 1234, kl_estimator: str = "k3"):
        self.texts = prompts
        self.heldout = set(prompts)
        self.tokenizer = tokenizer
        self.pad_id = pad_id(tokenizer)
        self.kl_estimator = kl_estimator
        self.ids = [tokenizer(p).input_ids for p in prompts]
        self.max_tokens = max_tokens
        self.log_path = log_path
        self.seed = seed
        base = self._sample(model)
        self.baseline_scores = self._score(reward, base)

    def _sample(self, model) -> Samples:
        was_training = model.training
        model.eval()
        try:
            return sample(model, self.ids, 1, self.max_tokens, self.tokenizer.eos_token_id, self.pad_id,
                          temperature=1.0, seed=self.seed)
        finally:
            model.train(was_training)

    def _score(self, reward: RewardClient, s: Samples) -> dict[str, float]:
        texts = [self.tokenizer.decode(r, skip_special_tokens=True) for r in s.responses]
        scores, _ = reward.score([(self.texts[int(g)], t) for g, t in zip(s.group_ids, texts)])
        return dict(zip(s.group_ids, scores))

    def evaluate(self, model, reward: RewardClient, reference: ReferenceClient, step: int,
                 version: int) -> EvalResult:
        t0 = time.perf_counter()
        cur = self._sample(model)
        scores = self._score(reward, cur)
        ref = reference.logprobs(cur.prompts, cur.responses)
        kl_sum, n_tok = 0.0, 0
        for lp, rl in zip(cur.logprobs, ref):
            kl_sum += float(kl_per_token(torch.tensor(lp), torch.tensor(rl), self.kl_estimator).sum())
            n_tok += len(lp)
        wins = [1.0 if scores[g] > self.baseline_scores[g] else 0.5 if scores[g] == self.baseline_scores[g] else 0.0
                for g in scores if g in self.baseline_scores]
        res = EvalResult(
            step=step, version=version, win_rate=sum(wins) / max(1, len(wins)), kl=kl_sum / max(1, n_tok),
            response_length=n_tok / max(1, len(cur.responses)),
            reward_mean=sum(scores.values()) / max(1, len(scores)),
            baseline_reward_mean=sum(self.baseline_scores.values()) / max(1, len(self.baseline_scores)),
            prompts=len(wins), seconds=time.perf_counter() - t0,
        )
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(asdict(res)) + "\n")
        return res
