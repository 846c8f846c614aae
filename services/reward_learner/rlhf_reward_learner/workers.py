"""The reward learner's loop: labels in, rounds on a schedule (or on request), versions out.

It reads rlhf.labels from the beginning at every start (the examples are rebuilt, not
stored; labels repeat-sent after a crash are skipped by id), starts from the newest version
in the weight store, and runs a round when `train_every_labels` new examples have come in
(examples from labels the newest version had read, recorded in its lineage, are not new),
or `train_every_s` after the last round if any came in. A round that passes the gate saves
the new version to the weight store and announces it on rlhf.weights with the gate's
numbers; the reward service then hot-swaps to it.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import queue
import threading
import time

from rlhf.events.v1 import events_pb2
from rlhf_common.bus import Consumer, Producer, now_ms
from rlhf_common.config import BusConfig
from rlhf_common.loops import BackgroundLoop
from rlhf_common.topics import Topics
from rlhf_common.weights import WeightStore, fetch

from .config import RewardLearnerConfig
from .examples import ExampleBook
from .learner import RewardModelState, RoundResult, TrainSettings, train_round
from .metrics import RewardLearnerMetrics

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Progress:
    """What Status shows; replaced as a whole after every change."""

    version: int = 0
    labels_read: int = 0
    train_pairs: int = 0
    train_points: int = 0
    heldout_pairs: int = 0
    skipped: dict = dataclasses.field(default_factory=dict)
    last_round: RoundResult | None = None
    published_version: int = 0


class LearnLoop(BackgroundLoop):
    def __init__(self, cfg: RewardLearnerConfig, bus: BusConfig, metrics: RewardLearnerMetrics):
        super().__init__("reward-learner")
        self.cfg, self.bus, self.metrics = cfg, bus, metrics
        self.settings = TrainSettings(lr=cfg.lr, epochs=cfg.epochs, batch_pairs=cfg.batch_size,
                                      point_weight=cfg.point_weight, max_length=cfg.max_length,
                                      min_heldout_pairs=cfg.min_heldout_pairs, seed=cfg.seed)
        self.book = ExampleBook(cfg.held_out_fraction, cfg.min_rating_gap, max_examples=cfg.max_examples,
                                ai_weight=cfg.ai_weight)
        self.store = WeightStore(cfg.weight_store)
        # The reward model's one writer: saves a killed predecessor left half-done go.
        for p in self.store.remove_unfinished(cfg.model_name):
            log.warning("removed an unfinished save: %s", p)
        self.progress = Progress()
        self.requests: queue.Queue[concurrent.futures.Future] = queue.Queue()
        self.learned: set[str] = set()  # label ids some published version learned from
        self.known_upto: dict[int, int] = {}  # partition -> label offset the newest version had read
        self.read_upto: dict[int, int] = {}  # partition -> label offset read so far
        self.ready = threading.Event()
        self.rounds = 0

    def train_now(self) -> concurrent.futures.Future:
        """A round after every label on the topic so far is read; the future gets its RoundResult."""
        fut: concurrent.futures.Future = concurrent.futures.Future()
        self.requests.put(fut)
        return fut

    def loop_body(self) -> None:
        latest = self.store.latest(self.cfg.model_name)
        # The newest version as a local folder (downloaded and checked when the store is object storage).
        live = RewardModelState(fetch(str(latest.path), latest.sha256) if latest else self.cfg.model,
                                latest.version if latest else 0)
        self.rounds = latest.step if latest else 0
        lineage = self.store.lineage(self.cfg.model_name)
        self.learned = {i for e in lineage for i in e.get("new_label_ids", [])}
        # Labels the newest version had read are not new after a restart: re-reading them
        # rebuilds the examples without starting a round.
        self.known_upto = {int(p): o for p, o in (lineage[-1].get("label_offsets", {}) if lineage else {}).items()}
        self.metrics.version.set(live.version)
        topics = Topics(self.bus.topic_prefix)
        labels = Consumer(self.bus, topics.labels, events_pb2.Label, group_id=None, client_id="reward-learner",
                          id_of=lambda x: x.label_id)
        out = Producer(self.bus, client_id="reward-learner")
        self._publish_progress(live, None)
        self.ready.set()
        new, last_round = 0, time.monotonic()
        try:
            while not self.stopping.is_set():
                read, made = self._read(labels, timeout_ms=200)
                new += made
                asked = self._take_requests()
                due = new >= self.cfg.train_every_labels or (
                    new > 0 and time.monotonic() - last_round >= self.cfg.train_every_s)
                if asked:
                    while (caught := self._read(labels, timeout_ms=300))[0]:  # catch up on the topic first
                        new += caught[1]
                if asked or due:
                    result = self._round(live, out, topics.weights)
                    new, last_round = 0, time.monotonic()
                    for fut in asked:
                        fut.set_result(result)
                elif read:
                    self._publish_progress(live, self.progress.last_round)
        finally:
            for fut in self._take_requests():
                fut.set_exception(RuntimeError("the reward learner is stopping"))
            labels.close()
            out.close()

    def _read(self, labels: Consumer, timeout_ms: int) -> tuple[int, int]:
        """(labels read, new examples made) from one poll; examples from labels a published
        version had already read are not new."""
        made = n = 0
        for rec in labels.poll(timeout_ms=timeout_ms, max_records=500):
            n += 1
            examples = self.book.add(rec.record)
            if rec.offset >= self.known_upto.get(rec.partition, 0):
                made += examples
            self.read_upto[rec.partition] = max(self.read_upto.get(rec.partition, 0), rec.offset + 1)
        self.metrics.labels.inc(n)
        return n, made

    def _take_requests(self) -> list[concurrent.futures.Future]:
        out = []
        while True:
            try:
                out.append(self.requests.get_nowait())
            except queue.Empty:
                return out

    def _round(self, live: RewardModelState, out: Producer, topic: str) -> RoundResult:
        self.rounds += 1
        result, candidate = train_round(live, self.book, self.settings, self.rounds)
        self.metrics.round_seconds.observe(result.seconds)
        if result.live_accuracy == result.live_accuracy:  # evaluated (not NaN)
            self.metrics.accuracy.labels("live").set(result.live_accuracy)
            self.metrics.accuracy.labels("candidate").set(result.candidate_accuracy)
        published = 0
        if candidate is not None:
            published = self._publish(live, candidate, result, out, topic)
            live.model, live.version = candidate, published
            self.metrics.version.set(published)
        outcome = "published" if published else ("gated" if result.live_accuracy == result.live_accuracy
                                                 else "skipped")
        self.metrics.rounds.labels(outcome).inc()
        log.info("round %d: %s (%s); held-out %d pairs, trained on %d pairs + %d points, loss %.4f -> %.4f, "
                 "%.1fs", result.round, outcome, result.reason, result.heldout_pairs, result.train_pairs,
                 result.train_points, result.loss_first, result.loss_last, result.seconds)
        self._publish_progress(live, result, published)
        return result

    def _publish(self, live: RewardModelState, candidate, r: RoundResult, out: Producer, topic: str) -> int:
        newest = self.store.latest(self.cfg.model_name)
        version = max(live.version, newest.version if newest else 0) + 1
        gate = {"heldout_accuracy": r.candidate_accuracy, "live_heldout_accuracy": r.live_accuracy,
                "heldout_pairs": float(r.heldout_pairs), "train_pairs": float(r.train_pairs),
                "train_points": float(r.train_points)}
        ckpt = self.store.save(candidate, live.tokenizer, self.cfg.model_name, version, step=r.round,
                               extra={"gate": gate, "based_on_version": live.version})
        # The labels this version is the first to learn from (later versions build on it), kept
        # in the lineage, which outlives pruned versions.
        used = {i for p in self.book.pairs[False] for i in p.label_ids} | {p.label_id for p in self.book.points[False]}
        new = sorted(used - self.learned)
        self.store.append_lineage(self.cfg.model_name, {"version": version, "round": r.round, "gate": gate,
                                                        "new_label_ids": new,
                                                        "label_offsets": dict(self.read_upto)})
        self.learned.update(new)
        out.send(topic, self.cfg.model_name, events_pb2.WeightUpdate(
            model_name=self.cfg.model_name, version=version, uri=str(ckpt.path),
            format=events_pb2.WeightUpdate.FORMAT_FULL, sha256=ckpt.sha256, step=r.round,
            created_unix_ms=now_ms(), metrics=gate))
        self.store.prune(self.cfg.model_name, self.cfg.keep_versions)
        return version

    def _publish_progress(self, live: RewardModelState, last: RoundResult | None, published: int = 0) -> None:
        b = self.book
        self.progress = Progress(version=live.version, labels_read=len(b.seen), train_pairs=len(b.pairs[False]),
                                 train_points=len(b.points[False]), heldout_pairs=len(b.pairs[True]),
                                 skipped=dict(b.skipped), last_round=last,
                                 published_version=published or self.progress.published_version)
        for split, held in (("train", False), ("heldout", True)):
            self.metrics.examples.labels(split, "pair").set(len(b.pairs[held]))
            self.metrics.examples.labels(split, "point").set(len(b.points[held]))
