"""Prometheus metrics of the reward learner (prefix rlhf_reward_learner_), registered into a given registry."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from rlhf_common.metrics import RpcMetrics

ROUND_BUCKETS = (1, 2, 5, 10, 30, 60, 120, 300, 600, 1800)


class RewardLearnerMetrics(RpcMetrics):
    def __init__(self, registry: CollectorRegistry):
        super().__init__("rlhf_reward_learner", registry)
        self.version = Gauge("rlhf_reward_learner_version", "Reward-model version the learner builds on",
                             registry=registry)
        self.labels = Counter("rlhf_reward_learner_labels_total", "Labels read from rlhf.labels", registry=registry)
        self.examples = Gauge("rlhf_reward_learner_examples", "Examples kept, by split and type",
                              ["split", "type"], registry=registry)
        self.rounds = Counter("rlhf_reward_learner_rounds_total", "Training rounds by outcome (published, gated, "
                              "skipped)", ["outcome"], registry=registry)
        self.accuracy = Gauge("rlhf_reward_learner_heldout_accuracy",
                              "Held-out pairwise accuracy in the last evaluated round, of the live model and of the "
                              "candidate", ["model"], registry=registry)
        self.round_seconds = Histogram("rlhf_reward_learner_round_seconds", "Seconds per training round",
                                       buckets=ROUND_BUCKETS, registry=registry)
