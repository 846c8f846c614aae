"""Kafka bus on kafka-python: protobuf records, topic creation, dead letters, dedup.

Delivery is at least once. Consumers assign partitions by hand (no group rebalance),
read their committed offsets from their consumer group, and commit only after the
caller says a record's effect is durable. A record that cannot be decoded is sent to
the dead-letter topic with the reason, and consumption goes on.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Generic, Iterator, TypeVar

from google.protobuf.message import DecodeError, Message
from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer, TopicPartition
from kafka.admin import NewTopic
from kafka.errors import TopicAlreadyExistsError
from kafka.structs import OffsetAndMetadata

from rlhf.events.v1 import events_pb2

from .config import BusConfig
from .loops import BackgroundLoop
from .topics import Topics

log = logging.getLogger(__name__)

M = TypeVar("M", bound=Message)


def now_ms() -> int:
    return int(time.time() * 1000)


def ensure_topics(cfg: BusConfig, timeout_s: float = 30.0) -> None:
    """Create every topic the system uses (idempotent); rlhf.weights is compacted."""
    topics = Topics(cfg.topic_prefix)
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            admin = KafkaAdminClient(client_id="rlhf-admin", **cfg.client_options())
            break
        except Exception as e:  # broker not up yet
            if time.monotonic() > deadline:
                raise ConnectionError(f"Kafka at {cfg.bootstrap!r} not reachable: {e}") from e
            time.sleep(0.2)
    try:
        existing = set(admin.list_topics())
        new = [
            NewTopic(
                name,
                cfg.partitions,
                1,
                topic_configs={"cleanup.policy": "compact"} if name in topics.compacted() else {},
            )
            for name in topics.all()
            if name not in existing
        ]
        if new:
            try:
                admin.create_topics(new)
            except TopicAlreadyExistsError:
                pass
    finally:
        admin.close()


class Producer:
    """Sends protobuf records; `send` returns once the broker has acknowledged."""

    def __init__(self, cfg: BusConfig, client_id: str, timeout_s: float = 30.0):
        """`timeout_s` bounds how long a send may block or wait for its acknowledgement."""
        self.timeout_s = timeout_s
        ms = int(timeout_s * 1000)
        self._p = KafkaProducer(
            **cfg.client_options(),
            client_id=client_id,
            acks="all",
            linger_ms=2,
            retries=5,
            max_block_ms=ms,
            request_timeout_ms=max(1000, ms // 2),
            delivery_timeout_ms=ms,
            bootstrap_timeout_ms=ms,
        )

    def send(self, topic: str, key: str, record: Message, wait: bool = True):
        """With wait=False, returns kafka-python's future (`failed()`, `exception`) without waiting."""
        fut = self._p.send(topic, key=key.encode(), value=record.SerializeToString())
        if wait:
            fut.get(timeout=self.timeout_s)
        return fut

    def flush(self, timeout_s: float | None = None) -> None:
        """Wait until every queued record is acknowledged or failed (at most `timeout_s`)."""
        self._p.flush(timeout=timeout_s)

    def close(self) -> None:
        self._p.close(timeout=self.timeout_s)


class AckedSender:
    """Sends batches of records and says whether the broker acknowledged all of them.

    After a failure the producer is rebuilt before the next batch: a producer that lost its
    broker can be left in a state it does not leave by itself (for example when the broker
    came back without its producer ids), and a fresh one reconnects cleanly.
    """

    def __init__(self, cfg: BusConfig, client_id: str, timeout_s: float = 30.0):
        self.cfg, self.client_id, self.timeout_s = cfg, client_id, timeout_s
        self._producer: Producer | None = None

    def send_batch(self, topic: str, items: list[tuple[str, Message]]) -> list[tuple[str, Message]]:
        """Send (key, record) pairs; returns those the broker did not acknowledge (empty: all
        were acknowledged)."""
        try:
            if self._producer is None:
                self._producer = Producer(self.cfg, client_id=self.client_id, timeout_s=self.timeout_s)
            futures = [self._producer.send(topic, k, r, wait=False) for k, r in items]
            self._producer.flush(self.timeout_s)
            left = [item for item, f in zip(items, futures) if not f.succeeded()]
        except Exception as e:  # the producer could not even queue them (broker away)
            log.warning("sending %d records to %s failed: %s", len(items), topic, e)
            left = list(items)
        if left:
            self.close()
        return left

    def close(self) -> None:
        if self._producer is not None:
            producer, self._producer = self._producer, None
            try:
                producer.close()
            except Exception as e:  # closing a producer that lost its broker may fail; it is dropped anyway
                log.warning("closing producer %s: %s", self.client_id, e)


class BrokerWatch(BackgroundLoop):
    """Asks the broker for its cluster metadata every `every_s`; `unreachable()` says why the
    last ask failed (a readiness condition for services whose API needs the broker)."""

    def __init__(self, cfg: BusConfig, client_id: str, every_s: float = 2.0, timeout_s: float = 3.0):
        super().__init__(client_id)
        self.cfg, self.client_id, self.every_s, self.timeout_s = cfg, client_id, every_s, timeout_s
        self._why: str | None = "broker not contacted yet"

    def unreachable(self) -> str | None:
        return self._why

    def loop_body(self) -> None:
        admin = None
        while not self.stopping.is_set():
            try:
                if admin is None:
                    admin = KafkaAdminClient(client_id=self.client_id, request_timeout_ms=int(self.timeout_s * 1000),
                                             **self.cfg.client_options())
                admin.describe_cluster()
                self._why = None
            except Exception as e:  # any failure to get an answer means not reachable
                if self._why is None:
                    log.warning("broker at %s unreachable: %s", self.cfg.bootstrap, e)
                self._why = f"broker at {self.cfg.bootstrap} unreachable ({type(e).__name__})"
                if admin is not None:
                    admin.close()
                    admin = None
            self.stopping.wait(self.every_s)
        if admin is not None:
            admin.close()


@dataclass
class Received(Generic[M]):
    record: M
    topic: str
    partition: int
    offset: int
    key: str


class Consumer(Generic[M]):
    """Reads one topic into protobuf records of type `record_type`.

    `id_of` gives each record's id; records whose id was seen recently are skipped
    (idempotent handling under at-least-once delivery). Call `commit(received)` once
    the record's effect is durable. `partitions` limits it to some of the topic's partitions
    (a replica's share); by default it reads all of them.
    """

    def __init__(
        self,
        cfg: BusConfig,
        topic: str,
        record_type: type[M],
        group_id: str | None,
        client_id: str,
        id_of: Callable[[M], str] | None = None,
        from_beginning: bool = True,
        dedup_window: int = 100_000,
        fetch_max_wait_ms: int = 500,
        connect_timeout_s: float = 30.0,
        partitions: list[int] | None = None,
    ):
        self.topic = topic
        self.record_type = record_type
        self.client_id = client_id
        self.id_of = id_of
        self._seen: OrderedDict[str, None] = OrderedDict()
        self._dedup_window = dedup_window
        self.duplicates = 0
        self.dead_letters = 0
        self._c = KafkaConsumer(
            **cfg.client_options(),
            group_id=group_id,
            client_id=client_id,
            enable_auto_commit=False,
            auto_offset_reset="earliest" if from_beginning else "latest",
            fetch_max_wait_ms=fetch_max_wait_ms,
            bootstrap_timeout_ms=int(connect_timeout_s * 1000),
        )
        deadline = time.monotonic() + connect_timeout_s
        parts = self._c.partitions_for_topic(topic)
        while not parts:
            if time.monotonic() > deadline:
                raise ConnectionError(f"topic {topic!r} has no partitions on {cfg.bootstrap!r}")
            time.sleep(0.2)
            parts = self._c.partitions_for_topic(topic)
        if partitions is not None:
            missing = sorted(set(partitions) - set(parts))
            if missing:
                raise ValueError(f"topic {topic!r} has no partitions {missing} (it has {sorted(parts)})")
            parts = partitions
        self.partitions = [TopicPartition(topic, p) for p in sorted(parts)]
        self._c.assign(self.partitions)
        self._dlq = Producer(cfg, client_id=f"{client_id}-dlq")
        self._dlq_topic = Topics(cfg.topic_prefix).dlq

    def poll(self, timeout_ms: int = 200, max_records: int = 64) -> Iterator[Received[M]]:
        batches = self._c.poll(timeout_ms=timeout_ms, max_records=max_records)
        for tp, msgs in batches.items():
            for m in msgs:
                key = m.key.decode("utf-8", "replace") if m.key else ""
                try:
                    rec = self.record_type()
                    rec.ParseFromString(m.value or b"")
                    rid = self.id_of(rec) if self.id_of else None
                    if self.id_of is not None and not rid:
                        raise ValueError(f"{self.record_type.__name__} without an id")
                except (DecodeError, ValueError, UnicodeDecodeError) as e:
                    self._dead_letter(m, key, e)
                    continue
                if rid is not None:
                    if rid in self._seen:
                        self.duplicates += 1
                        continue
                    self._seen[rid] = None
                    if len(self._seen) > self._dedup_window:
                        self._seen.popitem(last=False)
                yield Received(rec, tp.topic, tp.partition, m.offset, key)

    def _dead_letter(self, m, key: str, err: Exception) -> None:
        self.dead_letters += 1
        log.warning("dead-lettering %s[%d]@%d: %s", m.topic, m.partition, m.offset, err)
        dl = events_pb2.DeadLetter(
            topic=m.topic,
            partition=m.partition,
            offset=m.offset,
            key=m.key or b"",
            value=m.value or b"",
            error=f"{type(err).__name__}: {err}",
            consumer=self.client_id,
            created_unix_ms=now_ms(),
        )
        self._dlq.send(self._dlq_topic, key, dl)

    def reject(self, rec: Received[M], err: Exception) -> None:
        """Send a decoded record that cannot be handled (bad content) to the dead-letter topic."""
        self.dead_letters += 1
        log.warning("dead-lettering %s[%d]@%d: %s", rec.topic, rec.partition, rec.offset, err)
        self._dlq.send(self._dlq_topic, rec.key, events_pb2.DeadLetter(
            topic=rec.topic, partition=rec.partition, offset=rec.offset, key=rec.key.encode(),
            value=rec.record.SerializeToString(), error=f"{type(err).__name__}: {err}", consumer=self.client_id,
            created_unix_ms=now_ms()))

    def commit(self, upto: list[Received[M]]) -> None:
        """Commit the offsets after the given records (per partition, the highest + 1)."""
        offsets: dict[TopicPartition, OffsetAndMetadata] = {}
        for r in upto:
            tp = TopicPartition(r.topic, r.partition)
            if tp not in offsets or offsets[tp].offset <= r.offset:
                offsets[tp] = OffsetAndMetadata(r.offset + 1, "", -1)
        if offsets:
            self._c.commit(offsets)

    def seek(self, offsets: dict[int, int]) -> None:
        """Continue from explicit next-offsets by partition number (e.g. from a checkpoint)."""
        for p, o in offsets.items():
            self._c.seek(TopicPartition(self.topic, p), o)

    def remember(self, ids) -> None:
        """Treat these record ids as already handled (e.g. restored from a checkpoint)."""
        for rid in ids:
            self._seen[rid] = None
        while len(self._seen) > self._dedup_window:
            self._seen.popitem(last=False)

    def commit_offsets(self, offsets: dict[int, int]) -> None:
        """Commit explicit next-offsets by partition number."""
        if offsets:
            self._c.commit({TopicPartition(self.topic, p): OffsetAndMetadata(o, "", -1) for p, o in offsets.items()})

    def end_offsets(self) -> dict[int, int]:
        """Per partition, the offset the next record written will get."""
        return {tp.partition: o for tp, o in self._c.end_offsets(self.partitions).items()}

    def positions(self) -> dict[int, int]:
        """Per partition, the offset of the next record this consumer will read."""
        return {tp.partition: self._c.position(tp) for tp in self.partitions}

    def committed(self) -> dict[int, int | None]:
        return {tp.partition: self._c.committed(tp) for tp in self.partitions}

    def close(self) -> None:
        self._c.close()
        self._dlq.close()
