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
        self.labels_by_source = Counter("rlhf_feedback_labels_by_source_total",
                                        "Labels made by the join, by the source of the feedback (human, ai)",
                                        ["source"], registry=registry)
        self.rate_pairs = Gauge("rlhf_feedback_rate_open_pairs", "Pairs in the rating queue no human has rated yet",
                                registry=registry)
        self.rate_choices = Counter("rlhf_feedback_rate_choices_total",
                                    "Choices made on the rating page, by kind (first, repeat)", ["kind"],
                                    registry=registry)
        self.rate_ranked = Counter("rlhf_feedback_rate_ranked_total",
                                   "Pairs of the rating queue ranked by the active-sampling strategy",
                                   registry=registry)
        self.rate_self_agreement = Gauge("rlhf_feedback_rate_self_agreement",
                                         "Share of repeated pairs the raters answered as the first time (all raters)",
                                         registry=registry)
        self.ai_judgements = Counter("rlhf_feedback_ai_judgements_total",
                                     "Pairs judged by the AI labeller, by outcome (sent, audit, unparsed, failed)",
                                     ["outcome"], registry=registry)
        self.ai_agreement = Gauge("rlhf_feedback_ai_agreement",
                                  "Share of pairs judged by both a human and the AI labeller where they agree",
                                  registry=registry)
        for source in ("human", "ai"):
            self.labels_by_source.labels(source)
        self.prompts = Counter("rlhf_feedback_prompts_total",
                               "Served prompts considered for rlhf.prompts, by outcome (sampled, unsampled, filtered)",
                               ["outcome"], registry=registry)
        self.generations = Counter("rlhf_feedback_generations_total", "Served answers read from rlhf.generations",
                                   registry=registry)
