"""Reward whitening with running statistics of the reward model in service.

The reward model changes while the policy trains (online reward learning publishes new
versions), and a new version can score on another scale. The trainer therefore learns from
(score - running mean) / running std, with statistics kept per reward-model version and
started afresh when the version changes, so a new scale does not jolt the policy.
"""

from __future__ import annotations

from rlhf_common.running_stats import RunningStats


class RewardWhitener:
    def __init__(self, eps: float = 1e-6):
        self.eps = eps
        self.version = ""
        self.stats = RunningStats()
        self.resets = 0

    def state_dict(self) -> dict:
        return {"version": self.version, "stats": self.stats.state_dict(), "resets": self.resets}

    def load_state_dict(self, state: dict) -> None:
        self.version, self.resets = state["version"], int(state["resets"])
        self.stats.load_state_dict(state["stats"])

    def __call__(self, scores: list[float], model_version: str) -> list[float]:
        """Whitened scores; the batch itself joins the statistics first."""
        if model_version != self.version:
            if self.version:
                self.resets += 1
            self.version = model_version
            self.stats.reset()
        self.stats.update(scores)
        s = self.stats.snapshot()
        if s.count < 2:
            return [0.0 for _ in scores]
        return [(x - s.mean) / (s.std + self.eps) for x in scores]
