"""Prometheus metrics of the feedback service (prefix rlhf_feedback_), registered into a given registry."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge

from rlhf_common.metrics import HttpMetrics, RpcMetrics


class FeedbackMetrics(RpcMetrics, HttpMetrics):
    def __init__(self, registry: CollectorRegistry):
        RpcMetrics.__init__(self, "rlhf_feedback", registry)
        HttpMetrics.__init__(self, "rlhf_feedback", registry)
        self.items = Counter("rlhf_feedback_items_total",
                             "Feedback items at the gateway by kind and outcome (accepted, duplicate, conflict, "
                             "invalid, unavailable)", ["kind", "outcome"], registry=registry)
        self.joined = Counter("rlhf_feedback_join_total",
                              "Feedback records at the join by kind and outcome (joined, duplicate, conflict, "
                              "invalid, orphan, expired)", ["kind", "outcome"], registry=registry)
        self.waiting = Gauge("rlhf_feedback_join_waiting", "Feedback records waiting for their generation",
                             registry=registry)
        self.labels = Counter("rlhf_feedback_labels_total", "Labels written to rlhf.labels", registry=registry)
        self.prompts = Counter("rlhf_feedback_prompts_total",
                               "Served prompts considered for rlhf.prompts, by outcome (sampled, unsampled, filtered)",
                               ["outcome"], registry=registry)
        self.generations = Counter("rlhf_feedback_generations_total", "Served answers read from rlhf.generations",
                                   registry=registry)
