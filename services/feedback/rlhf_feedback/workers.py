"""Kafka-facing parts of the feedback service.

- FeedbackSender writes accepted items to rlhf.feedback and waits for every acknowledgement.
- JoinLoop (a background thread) reads rlhf.generations and rlhf.feedback for this
  replica's partitions, feeds them to the SQLite-backed `Join`, and writes the labels it
  makes to rlhf.labels and what it refuses to rlhf.dlq.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

from rlhf.events.v1 import events_pb2
from rlhf_common.bus import AckedSender, Consumer, Producer, now_ms
from rlhf_common.config import BusConfig
from rlhf_common.errors import NotReady
from rlhf_common.loops import BackgroundLoop
from rlhf_common.topics import Topics

from .config import FeedbackConfig
from .join import Batch, Incoming, Join
from .metrics import FeedbackMetrics
from .prompts import load_filter, production_prompt

log = logging.getLogger(__name__)


class FeedbackSender:
    """Blocking: called from a worker thread by the core. The producer is rebuilt after a
    failed send (see `AckedSender`)."""

    def __init__(self, bus: BusConfig, timeout_s: float):
        self.bus, self.timeout_s = bus, timeout_s
        self.topic = Topics(bus.topic_prefix).feedback
        self.sender = AckedSender(bus, client_id="feedback-gateway", timeout_s=timeout_s)

    def __call__(self, records: list[events_pb2.Feedback]) -> None:
        """Return once the broker has acknowledged every record (acks from all in-sync
        replicas); raise NotReady otherwise."""
        left = self.sender.send_batch(self.topic, [(r.generation_id, r) for r in records])
        if left:
            log.warning("broker at %s did not take %d of %d feedback records", self.bus.bootstrap, len(left),
                        len(records))
            raise NotReady("the broker did not acknowledge the feedback; nothing was accepted: retry with the "
                           "same feedback ids")

    def close(self) -> None:
        self.sender.close()


class JoinLoop(BackgroundLoop):
    """Feeds this replica's partitions of rlhf.generations and rlhf.feedback to the join.

    Both topics are keyed by generation id with the same partition count, so a replica that
    owns partition p of both sees every generation and every feedback item of that
    partition. Restart-safe without consumer groups: the next offsets are stored in the
    join's database in the same transaction as the state they produced; on start the
    consumers seek to them, and labels staged but not yet acknowledged are sent again
    (their ids derive from the feedback ids, so a repeat is recognisable downstream).
    """

    def __init__(self, cfg: FeedbackConfig, bus: BusConfig, metrics: FeedbackMetrics, expire_every_s: float = 1.0):
        super().__init__("feedback-join")
        self.cfg, self.bus, self.metrics = cfg, bus, metrics
        self.expire_every_s = expire_every_s
        self.topics = Topics(bus.topic_prefix)
        parts = cfg.partition_list
        name = "all" if not parts else "-".join(map(str, parts))
        self.db_path = Path(cfg.state_dir) / f"join-{name}.sqlite"
        # What /v1/feedback/stats shows for the join: replaced after every batch, read from
        # other threads without touching the database.
        self.latest_stats: dict[tuple[str, str], int] = {}
        self.latest_sources: dict[str, int] = {}
        # Called with every batch of served answers read (the rating queue's intake); on this thread.
        self.on_generations: list = []
        self.ready = threading.Event()
        self.keep_prompt = load_filter(cfg.prompt_filter)
        self.unsent = 0  # labels of the last send the broker did not acknowledge

    def loop_body(self) -> None:
        join = Join(self.db_path, wait_s=self.cfg.wait_s, retention_s=self.cfg.retention_s,
                    max_generations=self.cfg.max_generations)
        parts = self.cfg.partition_list or None
        wait_ms, poll_ms, most = self.cfg.join_fetch_wait_ms, self.cfg.join_poll_ms, self.cfg.join_max_records
        gens = Consumer(self.bus, self.topics.generations, events_pb2.Generation, group_id=None,
                        client_id="feedback-join-generations", partitions=parts, fetch_max_wait_ms=wait_ms)
        fbs = Consumer(self.bus, self.topics.feedback, events_pb2.Feedback, group_id=None,
                       client_id="feedback-join-feedback", partitions=parts, fetch_max_wait_ms=wait_ms)
        out = Producer(self.bus, client_id="feedback-join")
        try:
            stored = join.offsets()
            for kind, consumer in (("generation", gens), ("feedback", fbs)):
                consumer.seek({p: o for (k, p), o in stored.items() if k == kind})
            self._send(join, out, join.outbox(), [])
            self._publish_stats(join)
            self.ready.set()
            last_expire = 0.0
            busy = False
            while not self.stopping.is_set():
                # The two topics are polled in turn. While records come in, neither poll waits
                # (records of one topic do not wait for the other's poll to time out); when both
                # were idle, each waits up to poll_ms.
                t = 0 if busy else poll_ms
                items = [Incoming("generation", r.partition, r.offset, r.record)
                         for r in gens.poll(timeout_ms=t, max_records=most)]
                items += [Incoming("feedback", r.partition, r.offset, r.record)
                          for r in fbs.poll(timeout_ms=0 if items else t, max_records=most)]
                busy = bool(items)
                if items:
                    self._handle(join, out, join.process(items))
                    served = [i.record for i in items if i.kind == "generation"]
                    self._sample_prompts(out, served)
                    for fn in self.on_generations:
                        if served:
                            fn(served)
                if time.monotonic() - last_expire >= self.expire_every_s:
                    if self.unsent:
                        self._send(join, out, join.outbox(), [])
                    self._handle(join, out, join.expire())
                    last_expire = time.monotonic()
        finally:
            gens.close()
            fbs.close()
            out.close()
            join.close()

    def _handle(self, join: Join, out: Producer, batch: Batch) -> None:
        self._send(join, out, batch.labels, batch.dead)
        for (kind, outcome), n in batch.counts.items():
            if n and outcome != "waiting":
                self.metrics.joined.labels(kind, outcome).inc(n)
        for source, n in batch.sources.items():
            self.metrics.labels_by_source.labels(source).inc(n)
        if batch.counts or batch.labels or batch.dead:
            self._publish_stats(join)

    def _send(self, join: Join, out: Producer, labels: list[events_pb2.Label],
              dead: list[tuple[events_pb2.Feedback, str, str]]) -> None:
        """Labels and dead letters to the broker. A label leaves the outbox only once the
        broker has acknowledged it; the others are sent again at the next expiry tick."""
        if not labels and not dead:
            return
        sent = [(label.label_id, out.send(self.topics.labels, label.label_id, label, wait=False)) for label in labels]
        for fb, outcome, reason in dead:
            log.warning("dead-lettering feedback %s (%s): %s", fb.feedback_id, outcome, reason)
            out.send(self.topics.dlq, fb.generation_id, events_pb2.DeadLetter(
                topic=self.topics.feedback, partition=-1, offset=-1, key=fb.generation_id.encode(),
                value=fb.SerializeToString(), error=f"{outcome}: {reason}", consumer="feedback-join",
                created_unix_ms=now_ms()), wait=False)
        try:
            out.flush(out.timeout_s)
        except Exception as e:  # the broker is away: what was not acknowledged stays in the outbox
            log.warning("labels not acknowledged yet (%s); they stay in the outbox", e)
        acked = [i for i, f in sent if f.is_done and not f.failed()]
        join.mark_sent(acked)
        self.unsent = len(sent) - len(acked)
        self.metrics.labels.inc(len(acked))

    def _sample_prompts(self, out: Producer, gens: list[events_pb2.Generation]) -> None:
        """A share of served prompts to rlhf.prompts (at least once; the rollout worker dedups by id)."""
        self.metrics.generations.inc(len(gens))
        if not self.cfg.prompt_sample_rate:
            return
        chosen: dict[str, events_pb2.Prompt] = {}
        for g in gens:
            prompt, outcome = production_prompt(g, self.cfg.prompt_sample_rate, self.keep_prompt,
                                                self.cfg.prompt_max_chars, now_ms())
            if prompt is not None:
                if prompt.prompt_id in chosen:
                    continue  # another answer of the same request
                chosen[prompt.prompt_id] = prompt
            self.metrics.prompts.labels(outcome).inc()
        for prompt in chosen.values():
            out.send(self.topics.prompts, prompt.prompt_id, prompt, wait=False)
        if chosen:
            out.flush(out.timeout_s)

    def _publish_stats(self, join: Join) -> None:
        self.latest_stats = join.stats()
        self.latest_sources = join.source_stats()
        self.metrics.waiting.set(join.waiting())
