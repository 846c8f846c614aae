"""The Kafka bus against the real broker: serde, dead letters, dedup, committed offsets."""

from __future__ import annotations

import time

import pytest
from kafka import KafkaProducer

from rlhf.events.v1 import events_pb2
from rlhf_common.bus import Consumer, Producer, ensure_topics
from rlhf_common.topics import Topics

pytestmark = pytest.mark.integration


def _drain(c: Consumer, want: int, timeout_s: float = 15.0):
    out = []
    deadline = time.monotonic() + timeout_s
    while len(out) < want and time.monotonic() < deadline:
        out.extend(c.poll(timeout_ms=200))
    return out


def test_topics_created_idempotently(bus):
    from kafka import KafkaAdminClient

    ensure_topics(bus)  # second call is a no-op
    admin = KafkaAdminClient(bootstrap_servers=bus.bootstrap)
    try:
        assert set(Topics(bus.topic_prefix).all()) <= set(admin.list_topics())
    finally:
        admin.close()


def test_round_trip_dead_letter_and_dedup(bus):
    topics = Topics(bus.topic_prefix)
    p = Producer(bus, "test")
    p.send(topics.prompts, "a", events_pb2.Prompt(prompt_id="a", text="one"))
    raw = KafkaProducer(bootstrap_servers=bus.bootstrap)
    raw.send(topics.prompts, key=b"bad", value=b"\xff\xff\xff not protobuf")
    raw.send(topics.prompts, key=b"noid", value=events_pb2.Prompt(text="no id").SerializeToString())
    raw.flush()
    raw.close()
    p.send(topics.prompts, "a", events_pb2.Prompt(prompt_id="a", text="one again"))  # redelivery
    p.send(topics.prompts, "b", events_pb2.Prompt(prompt_id="b", text="two"))
    c = Consumer(bus, topics.prompts, events_pb2.Prompt, group_id=None, client_id="t", id_of=lambda r: r.prompt_id)
    got = _drain(c, 2)
    time.sleep(0.5)
    got += list(c.poll(timeout_ms=500))
    assert [(g.record.prompt_id, g.record.text) for g in got] == [("a", "one"), ("b", "two")]
    assert c.duplicates == 1 and c.dead_letters == 2
    c.close()
    dlq = Consumer(bus, topics.dlq, events_pb2.DeadLetter, group_id=None, client_id="t-dlq")
    letters = [d.record for d in _drain(dlq, 2)]
    dlq.close()
    assert [d.key for d in letters] == [b"bad", b"noid"]
    assert letters[0].value == b"\xff\xff\xff not protobuf"
    assert "DecodeError" in letters[0].error and "without an id" in letters[1].error
    assert all(d.topic == topics.prompts for d in letters)


def test_committed_offsets_resume_after_restart(bus):
    topics = Topics(bus.topic_prefix)
    p = Producer(bus, "test")
    for i in range(5):
        p.send(topics.rollouts, f"k{i}", events_pb2.Rollout(rollout_id=f"r{i}", prompt_id=f"k{i}"))
    c = Consumer(bus, topics.rollouts, events_pb2.Rollout, group_id="g-resume", client_id="t",
                 id_of=lambda r: r.rollout_id)
    got = _drain(c, 5)
    assert [g.record.rollout_id for g in got] == [f"r{i}" for i in range(5)]
    c.commit(got[:3])  # effect of the first three is durable
    c.close()
    c2 = Consumer(bus, topics.rollouts, events_pb2.Rollout, group_id="g-resume", client_id="t2",
                  id_of=lambda r: r.rollout_id)
    assert c2.committed() == {0: 3}
    again = _drain(c2, 2)
    c2.close()
    assert [g.record.rollout_id for g in again] == ["r3", "r4"]
