"""Prometheus metrics of the reward service (prefix rlhf_reward_), registered into a given registry."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from rlhf_common.metrics import BATCH_BUCKETS, LATENCY_BUCKETS, SYNC_BUCKETS, HttpMetrics, RpcMetrics

REWARD_DIFF_BUCKETS = (-4, -2, -1, -0.5, -0.25, -0.1, -0.05, 0, 0.05, 0.1, 0.25, 0.5, 1, 2, 4)


class RewardMetrics(RpcMetrics, HttpMetrics):
    """gRPC metrics (from RpcMetrics), REST requests, batching, hot swaps, shadow scoring,
    and the running reward statistics of the live model."""

    def __init__(self, registry: CollectorRegistry):
        RpcMetrics.__init__(self, "rlhf_reward", registry)
        HttpMetrics.__init__(self, "rlhf_reward", registry)
        self.items = Counter("rlhf_reward_scored_items_total", "Items scored", registry=registry)
        self.truncated = Counter("rlhf_reward_truncated_items_total", "Items truncated to the model limit",
                                 registry=registry)
        self.batch_size = Histogram("rlhf_reward_batch_items", "Items per model forward pass (dynamic batching)",
                                    buckets=BATCH_BUCKETS, registry=registry)
        self.batch_seconds = Histogram("rlhf_reward_batch_seconds", "Seconds per model forward pass",
                                       buckets=LATENCY_BUCKETS, registry=registry)
        self.queue_wait = Histogram("rlhf_reward_queue_wait_seconds", "Seconds a request waited for its batch",
                                    buckets=LATENCY_BUCKETS, registry=registry)
        self.model_cpu = Counter("rlhf_reward_model_cpu_seconds_total",
                                 "CPU seconds the model threads spent scoring batches (forward passes)",
                                 registry=registry)
        self.tokenizer_cpu = Counter("rlhf_reward_tokenizer_cpu_seconds_total",
                                     "CPU seconds the tokenizer thread spent tokenizing requests", registry=registry)
        self.queued_items = Gauge("rlhf_reward_queued_items", "Items waiting to be scored", registry=registry)
        self.swaps = Counter("rlhf_reward_model_swaps_total", "Reward-model updates by outcome",
                             ["outcome"], registry=registry)
        self.swap_seconds = Histogram("rlhf_reward_model_swap_seconds",
                                      "Seconds from WeightUpdate received to serving the new model",
                                      buckets=SYNC_BUCKETS, registry=registry)
        self.shadow_diff = Histogram("rlhf_reward_shadow_diff", "Live score minus shadow score, per item",
                                     buckets=REWARD_DIFF_BUCKETS, registry=registry)
        self.shadow_items = Counter("rlhf_reward_shadow_items_total", "Items scored by the shadow model, by outcome",
                                    ["outcome"], registry=registry)
        self.score_mean = Gauge("rlhf_reward_score_mean", "Running mean of live scores since the last swap",
                                registry=registry)
        self.score_std = Gauge("rlhf_reward_score_std", "Running std of live scores since the last swap",
                               registry=registry)
        self.score_count = Gauge("rlhf_reward_score_samples", "Live scores in the running statistics",
                                 registry=registry)
