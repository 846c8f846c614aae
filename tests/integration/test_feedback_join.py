"""The join under failure and scale-out, on the real broker: kill -9 mid-stream loses nothing
and makes every label once (a repeat keeps its id); two replicas share the partitions."""

from __future__ import annotations

import signal
import socket
import threading
import time
import uuid

import httpx
import pytest

from rlhf.events.v1 import events_pb2
from rlhf_common.bus import Producer, ensure_topics, now_ms
from rlhf_common.config import BusConfig
from rlhf_common.topics import Topics
from rlhf_feedback.config import FeedbackConfig
from rlhf_feedback.join import label_id

from tests.helpers import read_topic, start_service

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cfg(state, **kw) -> FeedbackConfig:
    return FeedbackConfig(server={"port": _free_port(), "metrics_port": 0}, http_port=_free_port(),
                          state_dir=str(state), wait_s=60, **kw)


def _generations(n: int) -> list[events_pb2.Generation]:
    return [events_pb2.Generation(generation_id=uuid.uuid4().hex, request_id=f"r{i}", prompt=f"Question {i}?",
                                  response=f"Answer {i}.", policy_version=i % 3, created_unix_ms=now_ms())
            for i in range(n)]


def _post_until_accepted(port: int, items: list[dict], deadline: float) -> None:
    """A client that retries, with the same ids, until the service has the items."""
    while True:
        try:
            r = httpx.post(f"http://127.0.0.1:{port}/v1/feedback", json={"items": items}, timeout=10)
            if r.status_code == 200:
                return
            assert r.status_code == 503, r.text
        except httpx.HTTPError:
            pass  # the service is down: try again
        assert time.monotonic() < deadline, "feedback never accepted"
        time.sleep(0.2)


def _stats(port: int) -> dict[tuple[str, str], int]:
    r = httpx.get(f"http://127.0.0.1:{port}/v1/feedback/stats", timeout=10)
    return {(c["kind"], c["outcome"]): c["count"] for c in r.json()["counts"]}


def _check_labels(bus: BusConfig, gens, feedback_ids: list[str]) -> list[events_pb2.Label]:
    want = {label_id(f) for f in feedback_ids}
    labels = read_topic(bus, Topics(bus.topic_prefix).labels, events_pb2.Label,
                        until=lambda ls: want <= {x.label_id for x in ls}, timeout_s=120)
    assert {x.label_id for x in labels} == want  # nothing lost, nothing extra
    by_gen = {g.generation_id: g for g in gens}
    for x in labels:
        g = by_gen[x.responses[0].generation_id]
        assert (x.prompt, x.responses[0].text, x.responses[0].policy_version) == (g.prompt, g.response,
                                                                                   g.policy_version)
    # a label sent again after a crash is the same label under the same id
    first: dict[str, events_pb2.Label] = {}
    for x in labels:
        y = first.setdefault(x.label_id, x)
        assert (y.prompt, list(y.responses), y.thumb, list(y.feedback_ids)) == (
            x.prompt, list(x.responses), x.thumb, list(x.feedback_ids))
    return labels


def test_kill_9_mid_stream_loses_no_feedback_and_labels_each_once(broker, tmp_path):
    bus = BusConfig(bootstrap=broker.bootstrap, topic_prefix="fbkill")
    ensure_topics(bus)
    cfg = _cfg(tmp_path / "state")
    log = tmp_path / "feedback.log"
    gens = _generations(60)
    items = [{"feedback_id": f"k-{i}", "generation_id": g.generation_id, "thumb": "up" if i % 2 else "down"}
             for i, g in enumerate(gens)]
    proc = start_service("rlhf_feedback", cfg, log, bus)
    deadline = time.monotonic() + 240
    stop = threading.Event()

    def serve_answers():  # the policy's records arrive while feedback streams in
        p = Producer(bus, client_id="test-policy")
        for g in gens:
            p.send(Topics("fbkill").generations, g.generation_id, g)
            if stop.wait(0.03):
                break
        p.close()

    def send_feedback():
        for start in range(0, len(items), 3):
            _post_until_accepted(cfg.http_port, items[start:start + 3], deadline)
            time.sleep(0.05)

    threads = [threading.Thread(target=serve_answers), threading.Thread(target=send_feedback)]
    for t in threads:
        t.start()
    try:
        time.sleep(0.8)
        assert all(t.is_alive() for t in threads)  # answers and feedback still streaming in
        proc.kill()  # kill -9, mid-stream
        assert proc.wait(10) == -signal.SIGKILL
        time.sleep(0.5)
        proc = start_service("rlhf_feedback", cfg, tmp_path / "feedback-2.log", bus)
        for t in threads:
            t.join(240)
        assert not any(t.is_alive() for t in threads)
        records = read_topic(bus, Topics("fbkill").feedback, events_pb2.Feedback,
                             until=lambda rs: {x.feedback_id for x in rs} >= {i["feedback_id"] for i in items})
        assert {x.feedback_id for x in records} == {i["feedback_id"] for i in items}
        _check_labels(bus, gens, [i["feedback_id"] for i in items])
        deadline = time.monotonic() + 30
        while sum(n for (k, o), n in _stats(cfg.http_port).items() if o == "joined") < len(items):
            assert time.monotonic() < deadline, _stats(cfg.http_port)
            time.sleep(0.5)
        stats = _stats(cfg.http_port)
        assert stats[("thumb", "joined")] == len(items)  # each joined once, whatever was read twice
        assert stats.get(("thumb", "waiting"), 0) == 0
    finally:
        stop.set()
        proc.terminate()
        proc.wait(30)


def test_two_replicas_each_join_their_own_partitions(broker, tmp_path):
    bus = BusConfig(bootstrap=broker.bootstrap, topic_prefix="fbtwo", partitions=2)
    ensure_topics(bus)
    cfgs = [_cfg(tmp_path / f"state{p}", join_partitions=str(p)) for p in (0, 1)]
    procs = [start_service("rlhf_feedback", c, tmp_path / f"feedback{p}.log", bus) for p, c in enumerate(cfgs)]
    try:
        gens = _generations(40)
        p = Producer(bus, client_id="test-policy")
        for g in gens:
            p.send(Topics("fbtwo").generations, g.generation_id, g, wait=False)
        p.flush()
        p.close()
        items = [{"feedback_id": f"two-{i}", "generation_id": g.generation_id, "thumb": "up"}
                 for i, g in enumerate(gens)]
        deadline = time.monotonic() + 120
        for i, item in enumerate(items):  # any replica's gateway takes any feedback
            _post_until_accepted(cfgs[i % 2].http_port, [item], deadline)
        _check_labels(bus, gens, [i["feedback_id"] for i in items])
        while True:
            joined = [_stats(c.http_port).get(("thumb", "joined"), 0) for c in cfgs]
            if sum(joined) >= len(items) or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert sum(joined) == len(items) and min(joined) > 0, joined  # each replica did its share, once
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(30)
