"""WeightSubscriber: reads rlhf.weights and hot-swaps the reward model in its own thread.

A new checkpoint is checked (sha256) and loaded here, off the request path; only the
final reference swap touches the serving core, so no request waits or fails for it.
"""

from __future__ import annotations

import logging
import threading
import time

from kafka.errors import KafkaError

from rlhf.events.v1 import events_pb2
from rlhf_common.bus import Consumer
from rlhf_common.config import BusConfig, RewardConfig
from rlhf_common.errors import WeightsCorrupt
from rlhf_common.metrics import RewardMetrics
from rlhf_common.topics import Topics
from rlhf_common.weights import local_path, verify

from .core import RewardCore, RewardModel

log = logging.getLogger(__name__)


class WeightSubscriber(threading.Thread):
    def __init__(self, cfg: RewardConfig, bus: BusConfig, core: RewardCore, metrics: RewardMetrics | None,
                 retry_s: float = 5.0):
        super().__init__(name="reward-weight-subscriber", daemon=True)
        self.cfg, self.bus, self.core, self.metrics = cfg, bus, core, metrics
        self.retry_s = retry_s
        self.stopping = threading.Event()
        self.error: BaseException | None = None

    def stop(self) -> None:
        self.stopping.set()

    def run(self) -> None:
        try:
            self._run()
        except BaseException as e:  # surfaced through health (the service exits 1) and logs
            self.error = e
            log.exception("%s died", self.name)

    def _run(self) -> None:
        topic = Topics(self.bus.topic_prefix).weights
        while not self.stopping.is_set():
            # The broker being away does not stop scoring: the service keeps serving the
            # model it has and tries again.
            try:
                c = Consumer(self.bus, topic, events_pb2.WeightUpdate, group_id=None, client_id="reward-weights")
            except (KafkaError, ConnectionError) as e:
                log.warning("cannot read %s at %s (%s); retrying in %.0fs", topic, self.bus.bootstrap, e,
                            self.retry_s)
                self.stopping.wait(self.retry_s)
                continue
            try:
                while not self.stopping.is_set():
                    for rec in c.poll(timeout_ms=200):
                        if rec.record.model_name == self.cfg.model_name:
                            self.apply(rec.record)
            finally:
                c.close()

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
            path = local_path(u.uri)
            verify(path, u.sha256)
            model = RewardModel(path, self.cfg.max_length, version_number=u.version, sha256=u.sha256)
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
