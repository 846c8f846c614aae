"""Prometheus metrics of the reference service (prefix rlhf_reference_), registered into a given registry."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge

from rlhf_common.metrics import RpcMetrics


class ReferenceMetrics(RpcMetrics):
    def __init__(self, registry: CollectorRegistry):
        super().__init__("rlhf_reference", registry)
        self.tokens = Counter("rlhf_reference_scored_tokens_total", "Response tokens scored", registry=registry)
        self.version = Gauge("rlhf_reference_version", "Policy version the reference was taken from",
                             registry=registry)
        self.refreshes = Counter("rlhf_reference_refreshes_total", "Reference refreshes by trigger and outcome",
                                 ["trigger", "outcome"], registry=registry)
