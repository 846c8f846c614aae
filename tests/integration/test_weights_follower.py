"""The library's one follower of rlhf.weights, against the real broker."""

from __future__ import annotations

import socket
import threading
import time

import pytest

from rlhf.events.v1 import events_pb2
from rlhf_common.bus import Producer
from rlhf_common.config import BusConfig
from rlhf_common.topics import Topics
from rlhf_common.weights_follower import WeightsFollower

pytestmark = pytest.mark.integration


def _update(name: str, version: int) -> events_pb2.WeightUpdate:
    return events_pb2.WeightUpdate(model_name=name, version=version, uri=f"/w/{name}/{version}")


def _wait(cond, timeout_s=20.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while not cond() and time.monotonic() < deadline:
        time.sleep(0.05)
    return cond()


def test_catches_up_with_the_newest_update_per_model_then_hands_over_live_updates(bus):
    topic = Topics(bus.topic_prefix).weights
    p = Producer(bus, client_id="test-weights")
    for name, v in (("a", 1), ("b", 1), ("c", 1), ("a", 2), ("a", 3)):
        p.send(topic, name, _update(name, v))
    got: list[tuple[str, int]] = []
    lock = threading.Lock()

    def on_update(u):
        with lock:
            got.append((u.model_name, u.version))

    f = WeightsFollower(bus, ["a", "c"], on_update, client_id="test-follower")
    f.start()
    try:
        assert f.caught_up.wait(20)
        # What was on the topic: the newest of each model only (a restarted replica never
        # replays versions long since pruned), b left out.
        assert got == [("a", 3), ("c", 1)]
        p.send(topic, "b", _update("b", 2))
        p.send(topic, "c", _update("c", 2))
        assert _wait(lambda: len(got) == 3)
        assert got[-1] == ("c", 2) and f.error is None
    finally:
        f.stop()
        f.join(10)
        p.close()
    assert not f.is_alive()


def test_a_failing_callback_ends_the_follower_with_its_error(bus):
    Producer(bus, client_id="test-weights").send(Topics(bus.topic_prefix).weights, "a", _update("a", 1))

    def on_update(u):
        raise RuntimeError(f"cannot apply v{u.version}")

    f = WeightsFollower(bus, ["a"], on_update, client_id="test-follower-fails")
    f.start()
    f.join(20)
    assert not f.is_alive() and isinstance(f.error, RuntimeError) and "v1" in str(f.error)


def test_keeps_trying_while_the_broker_is_away():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens here
    f = WeightsFollower(BusConfig(bootstrap=f"127.0.0.1:{port}"), ["a"], lambda u: None,
                        client_id="test-follower-away", retry_s=0.2, connect_timeout_s=1.0)
    f.start()
    time.sleep(3)
    assert f.is_alive() and f.error is None and not f.caught_up.is_set()
    f.stop()
    f.join(5)  # the connection attempt in progress gives up within connect_timeout_s
    assert not f.is_alive()
