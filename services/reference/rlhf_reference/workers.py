"""The reference service's rlhf.weights follower: explicit refresh events and periodic refresh."""

from __future__ import annotations

import logging

from rlhf.events.v1 import events_pb2

from rlhf_common.bus import Consumer
from rlhf_common.config import BusConfig, ReferenceConfig
from rlhf_common.loops import BackgroundLoop
from rlhf_common.metrics import ReferenceMetrics
from rlhf_common.topics import Topics

from .core import ReferenceModel

log = logging.getLogger(__name__)

REFERENCE_MODEL_NAME = "reference"


class RefreshSubscriber(BackgroundLoop):
    def __init__(self, cfg: ReferenceConfig, bus: BusConfig, model: ReferenceModel, metrics: ReferenceMetrics):
        super().__init__("reference-refresh")
        self.cfg, self.bus, self.model, self.metrics = cfg, bus, model, metrics

    def trigger(self, u: events_pb2.WeightUpdate) -> str | None:
        """Why this update should move the reference, or None."""
        if u.model_name == REFERENCE_MODEL_NAME:
            return "event"
        if (u.model_name == self.cfg.policy_model_name and self.cfg.refresh_every
                and u.version >= self.model.version + self.cfg.refresh_every):
            return "periodic"
        return None

    def loop_body(self) -> None:
        c = Consumer(self.bus, Topics(self.bus.topic_prefix).weights, events_pb2.WeightUpdate, group_id=None,
                     client_id="reference-refresh")
        try:
            while not self.stopping.is_set():
                for rec in c.poll(timeout_ms=200):
                    u = rec.record
                    why = self.trigger(u)
                    if why is None:
                        continue
                    try:
                        applied = self.model.refresh(u.uri, u.version, u.sha256)
                    except Exception:
                        log.exception("refresh to v%d from %s failed", u.version, u.uri)
                        self.metrics.refreshes.labels(why, "failed").inc()
                        continue
                    self.metrics.refreshes.labels(why, "applied" if applied else "skipped").inc()
                    self.metrics.version.set(self.model.version)
        finally:
            c.close()
