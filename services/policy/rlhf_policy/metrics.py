"""Prometheus metrics of the policy service (prefix rlhf_policy_), registered into a given registry."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from rlhf_common.metrics import LATENCY_BUCKETS, SYNC_BUCKETS, RpcMetrics


class PolicyMetrics(RpcMetrics):
    def __init__(self, registry: CollectorRegistry):
        super().__init__("rlhf_policy", registry)
        self.version = Gauge("rlhf_policy_version", "Weight version being served", registry=registry)
        self.generated_tokens = Counter("rlhf_policy_generated_tokens_total", "Tokens generated",
                                        ["kind"], registry=registry)
        self.rollouts = Counter("rlhf_policy_rollouts_total", "Rollouts produced", registry=registry)
        self.weight_sync = Histogram("rlhf_policy_weight_sync_seconds",
                                     "Seconds from WeightUpdate received to serving the new version",
                                     buckets=SYNC_BUCKETS, registry=registry)
        self.weight_event_to_serving = Histogram(
            "rlhf_policy_weight_event_to_serving_seconds",
            "Seconds from a WeightUpdate's creation (producer clock) to serving it, Kafka delivery included",
            buckets=SYNC_BUCKETS, registry=registry)
        self.weight_updates = Counter("rlhf_policy_weight_updates_total", "Weight updates by outcome",
                                      ["outcome"], registry=registry)
        self.ttft = Histogram("rlhf_policy_time_to_first_token_seconds",
                              "Streaming requests: seconds from request to the first chunk",
                              buckets=LATENCY_BUCKETS, registry=registry)
        self.in_flight = Gauge("rlhf_policy_requests_in_flight", "Generation requests accepted and not finished",
                               registry=registry)
        self.waiting = Gauge("rlhf_policy_requests_waiting_for_update",
                             "Generation requests held while a weight update is applied", registry=registry)
        self.rollout_seconds = Histogram(
            "rlhf_policy_rollout_seconds",
            "Rollout worker time per batch of prompts by phase: generate (vLLM sampling the groups), kafka "
            "(rollouts sent and acknowledged, prompt offsets committed)", ["phase"], buckets=LATENCY_BUCKETS,
            registry=registry)
        self.groups_ahead = Gauge("rlhf_policy_rollout_groups_ahead",
                                  "Rollout groups produced but not yet consumed by the trainer",
                                  registry=registry)
