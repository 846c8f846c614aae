"""Hot swaps of the reward model: updates announced on rlhf.weights, applied off the request path.

The library's WeightsFollower hands each update for this model to `RewardUpdater.apply` on
its own thread. A new checkpoint is checked (sha256) and loaded there; only the final
reference swap touches the serving core, so no request waits or fails for it.
"""

from __future__ import annotations

import logging
import time

from rlhf.events.v1 import events_pb2
from rlhf_common.config import BusConfig
from rlhf_common.errors import WeightsCorrupt
from rlhf_common.weights import fetch, verify
from rlhf_common.weights_follower import WeightsFollower

from .config import RewardConfig
from .core import RewardCore, RewardModel
from .metrics import RewardMetrics

log = logging.getLogger(__name__)


class RewardUpdater:
    def __init__(self, cfg: RewardConfig, core: RewardCore, metrics: RewardMetrics | None):
        self.cfg, self.core, self.metrics = cfg, core, metrics

    def follower(self, bus: BusConfig, retry_s: float = 5.0) -> WeightsFollower:
        return WeightsFollower(bus, [self.cfg.model_name], self.apply, client_id="reward-weights", retry_s=retry_s)

    def apply(self, u: events_pb2.WeightUpdate) -> bool:
        """Load, check and swap in the announced version if it is newer; True when swapped."""
        if u.version <= self.core.live.version_number:
            return False
        t0 = time.perf_counter()
        if u.format not in (events_pb2.WeightUpdate.FORMAT_FULL, events_pb2.WeightUpdate.FORMAT_UNSPECIFIED):
            log.error("reward update v%d has format %s, which this service does not apply",
                      u.version, events_pb2.WeightUpdate.Format.Name(u.format))
            self._count("unsupported")
            return False
        try:
            path = fetch(u.uri, u.sha256)  # a local folder; one on object storage is downloaded, checked
            verify(path, u.sha256)
            model = RewardModel(path, self.cfg.max_length, version_number=u.version, sha256=u.sha256,
                                packed=self.cfg.packed)
        except WeightsCorrupt:
            log.exception("refusing reward update v%d from %s", u.version, u.uri)
            self._count("corrupt")
            return False
        except Exception:
            log.exception("failed to load reward update v%d from %s", u.version, u.uri)
            self._count("failed")
            return False
        self.core.swap(model)
        self._count("applied")
        if self.metrics is not None:
            self.metrics.swap_seconds.observe(time.perf_counter() - t0)
        log.info("serving reward model v%d (%s) from %s", u.version, u.sha256[:12], u.uri)
        return True

    def _count(self, outcome: str) -> None:
        if self.metrics is not None:
            self.metrics.swaps.labels(outcome).inc()
