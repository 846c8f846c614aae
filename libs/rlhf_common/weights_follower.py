"""The one follower of the rlhf.weights topic: every service that swaps models uses it.

It reads the compacted topic from the beginning, so that a restarted replica finds the
latest update of each model; while it catches up with what was on the topic when it
connected, it keeps only the newest update per model and hands over that one (a replica
that restarts late never replays versions long since pruned). After that it hands every
update for the given model names to a callback, on its own thread. `caught_up` is set once
the callback has had the newest update of each model: a service's readiness waits for it. The callback decides what an update means (apply, skip as old, refresh).
While the broker is away, at start or later, the follower logs and tries again: the
service keeps serving what it has. An exception from the callback ends the follower, and
with it the service (exit 1), so that its supervisor restarts it from committed state.
"""

from __future__ import annotations

import logging
import threading
from typing import Callable, Collection

from kafka.errors import KafkaError

from rlhf.events.v1 import events_pb2

from .bus import Consumer
from .config import BusConfig
from .loops import BackgroundLoop
from .topics import Topics

log = logging.getLogger(__name__)


class WeightsFollower(BackgroundLoop):
    def __init__(self, bus: BusConfig, model_names: Collection[str],
                 on_update: Callable[[events_pb2.WeightUpdate], None], client_id: str,
                 fetch_max_wait_ms: int = 500, retry_s: float = 5.0, connect_timeout_s: float = 5.0):
        super().__init__(f"{client_id}-follower")
        if not model_names:
            raise ValueError("a weights follower needs at least one model name")
        self.bus, self.model_names, self.on_update = bus, frozenset(model_names), on_update
        self.client_id, self.fetch_max_wait_ms, self.retry_s = client_id, fetch_max_wait_ms, retry_s
        # Short, so that a stop is noticed soon while the broker is away.
        self.connect_timeout_s = connect_timeout_s
        # Set once the updates already on the topic have been handed over (a poll came back
        # empty), so a caller can tell catching up from live updates.
        self.caught_up = threading.Event()

    def _connect(self) -> Consumer | None:
        topic = Topics(self.bus.topic_prefix).weights
        try:
            return Consumer(self.bus, topic, events_pb2.WeightUpdate, group_id=None, client_id=self.client_id,
                            fetch_max_wait_ms=self.fetch_max_wait_ms, connect_timeout_s=self.connect_timeout_s)
        except (KafkaError, ConnectionError) as e:
            log.warning("cannot read %s at %s (%s); retrying in %.0fs", topic, self.bus.bootstrap, e, self.retry_s)
            return None

    def loop_body(self) -> None:
        while not self.stopping.is_set():
            c = self._connect()
            if c is None:
                self.stopping.wait(self.retry_s)
                continue
            try:
                self._follow(c)
            except (KafkaError, ConnectionError) as e:
                log.warning("lost %s at %s (%s); reconnecting in %.0fs", c.topic, self.bus.bootstrap, e, self.retry_s)
                self.stopping.wait(self.retry_s)
            finally:
                c.close()

    def _follow(self, c: Consumer) -> None:
        ends = c.end_offsets()
        newest: dict[str, events_pb2.WeightUpdate] = {}  # while catching up: the last update per model
        catching_up = True
        while not self.stopping.is_set():
            for rec in c.poll(timeout_ms=200):
                if rec.record.model_name not in self.model_names:
                    continue
                if catching_up:
                    newest[rec.record.model_name] = rec.record
                else:
                    self.on_update(rec.record)
            if catching_up and all(pos >= ends.get(p, 0) for p, pos in c.positions().items()):
                for u in newest.values():
                    self.on_update(u)
                catching_up = False
                newest.clear()
                self.caught_up.set()
