"""The reference service's use of rlhf.weights: explicit refresh events and periodic refresh.

The library's WeightsFollower hands updates of the reference and of the policy to
`ReferenceRefresher.apply` on its own thread.
"""

from __future__ import annotations

import logging

from rlhf.events.v1 import events_pb2
from rlhf_common.config import BusConfig
from rlhf_common.weights_follower import WeightsFollower

from .config import ReferenceConfig
from .core import ReferenceModel
from .metrics import ReferenceMetrics

log = logging.getLogger(__name__)

REFERENCE_MODEL_NAME = "reference"


class ReferenceRefresher:
    def __init__(self, cfg: ReferenceConfig, model: ReferenceModel, metrics: ReferenceMetrics):
        self.cfg, self.model, self.metrics = cfg, model, metrics

    def follower(self, bus: BusConfig) -> WeightsFollower:
        return WeightsFollower(bus, [REFERENCE_MODEL_NAME, self.cfg.policy_model_name], self.apply,
                               client_id="reference-refresh")

    def trigger(self, u: events_pb2.WeightUpdate) -> str | None:
        """Why this update should move the reference, or None."""
        if u.model_name == REFERENCE_MODEL_NAME:
            return "event"
        if (u.model_name == self.cfg.policy_model_name and self.cfg.refresh_every
                and u.version >= self.model.version + self.cfg.refresh_every):
            return "periodic"
        return None

    def apply(self, u: events_pb2.WeightUpdate) -> None:
        why = self.trigger(u)
        if why is None:
            return
        try:
            applied = self.model.refresh(u.uri, u.version, u.sha256)
        except Exception:
            log.exception("refresh to v%d from %s failed", u.version, u.uri)
            self.metrics.refreshes.labels(why, "failed").inc()
            return
        self.metrics.refreshes.labels(why, "applied" if applied else "skipped").inc()
        self.metrics.version.set(self.model.version)
