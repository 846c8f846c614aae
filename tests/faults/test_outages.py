"""The broker paused (SIGSTOP) for 20 s under traffic, and poison records on every topic."""

from __future__ import annotations

import os
import signal
import time
import uuid

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from rlhf.events.v1 import events_pb2
from rlhf_common.bus import Producer
from rlhf_common.topics import Topics
from rlhf_feedback.join import label_id

from tests.faults.conftest import GROUP, Row
from tests.faults.traffic import Traffic, account, dead_letters, labels_of, running, wait_trained

pytestmark = [pytest.mark.faults, pytest.mark.slow]


def _health(addr: str) -> int:
    with grpc.insecure_channel(addr) as ch:
        try:
            return health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=""), timeout=2).status
        except grpc.RpcError:
            return -1


def test_broker_paused_for_20s_under_traffic(stack, reliability):
    traffic = Traffic(stack)
    traffic.seed(2)
    traffic.serve_and_rate()
    Traffic(stack).seed(1)  # a partner for a last odd group (steps take groups two at a time)
    done, _ = wait_trained(stack, traffic.prompts)  # settled: any armed failpoint has fired by now
    assert set(traffic.prompts) <= set(done)
    for name in stack.spec.services:
        stack.wait_healthy(name, 300)
    pids = {n: p.pid for n, p in stack.procs.items()}
    restarts = {n: len(v) for n, v in stack.restarts.items()}
    with running(traffic):
        time.sleep(2)
        os.kill(stack.broker.proc.pid, signal.SIGSTOP)
        try:
            time.sleep(8)
            # Readiness says what is true: the policy cannot record answers, nor the feedback
            # service accept feedback, without the broker; the others go on serving.
            for name in ("policy", "feedback"):
                assert _health(stack.addrs[name]) == health_pb2.HealthCheckResponse.NOT_SERVING, name
            assert _health(stack.addrs["reward"]) == health_pb2.HealthCheckResponse.SERVING
            time.sleep(12)
        finally:
            os.kill(stack.broker.proc.pid, signal.SIGCONT)
        time.sleep(5)
    deadline = time.monotonic() + 120
    while any(_health(stack.addrs[n]) != health_pb2.HealthCheckResponse.SERVING for n in stack.spec.services) \
            and time.monotonic() < deadline:
        time.sleep(1)
    for name in stack.spec.services:
        assert _health(stack.addrs[name]) == health_pb2.HealthCheckResponse.SERVING, name
    # No service was restarted: each rode out the outage in place.
    assert {n: p.pid for n, p in stack.procs.items()} == pids
    assert {n: len(v) for n, v in stack.restarts.items()} == restarts
    account(stack, traffic, "broker paused (SIGSTOP) for 20 s under traffic", reliability,
            note="no service restarted; policy and feedback were NOT_SERVING while the broker was away")


def test_poison_records_on_every_topic_are_dead_lettered(stack, reliability):
    topics = Topics(stack.bus.topic_prefix)
    p = Producer(stack.bus, client_id="poisoner")
    garbage = b"\xff\x00 not a protobuf \x8f\x9f"
    keys = {}
    for topic in (topics.prompts, topics.rollouts, topics.weights, topics.generations, topics.feedback,
                  topics.labels):
        key = f"poison-{uuid.uuid4().hex[:8]}"
        p._p.send(topic, key=key.encode(), value=garbage).get(timeout=30)
        keys[key] = topic
    # Well-formed but unusable: a group whose token ids are outside the vocabulary.
    bad_prompt = f"poison-{uuid.uuid4().hex}"
    for i in range(GROUP):
        p.send(topics.rollouts, bad_prompt, events_pb2.Rollout(
            rollout_id=uuid.uuid4().hex, prompt_id=bad_prompt, policy_version=0, prompt_text="x",
            response_text="y", prompt_token_ids=[1, 2], response_token_ids=[10 ** 9], behaviour_logprobs=[-0.5],
            group_index=i, group_size=GROUP))
    p.close()
    # Good records after the poison still go through.
    traffic = Traffic(stack)
    traffic.seed(3)
    traffic.serve_and_rate()
    Traffic(stack).seed(1)  # a partner for a last odd group (steps take groups two at a time)
    done, _ = wait_trained(stack, traffic.prompts)
    labels = labels_of(stack, traffic.feedback)
    deadline = time.monotonic() + 60
    letters = dead_letters(stack)
    while time.monotonic() < deadline and not (set(keys) <= {d.key.decode() for d in letters}
                                               and sum(d.key.decode() == bad_prompt for d in letters) >= GROUP):
        time.sleep(1)
        letters = dead_letters(stack)
    by_key = {}
    for d in letters:
        by_key.setdefault(d.key.decode(), []).append(d)
    missing = [k for k in keys if k not in by_key]
    rollout_letters = by_key.get(bad_prompt, [])
    lost_good = [x for x in traffic.prompts if x not in done]
    got = {x.label_id for x in labels}
    lost_fb = [f for f in traffic.feedback if label_id(f) not in got]
    reliability(Row("poison records: undecodable bytes on all 6 topics, a rollout group with token ids outside "
                    "the vocabulary", len(keys) + GROUP + len(traffic.prompts) + len(traffic.feedback),
                    len(traffic.prompts) - len(lost_good) + len(traffic.feedback) - len(lost_fb),
                    len(keys) - len(missing) + min(GROUP, len(rollout_letters)),
                    len(missing) + max(0, GROUP - len(rollout_letters)) + len(lost_good) + len(lost_fb),
                    0, traffic.errors, note="each consumer of a topic dead-letters what it cannot use, with the reason"))
    assert not missing, (missing, keys)
    for k, topic in keys.items():
        assert all(d.topic == topic and d.error and d.consumer for d in by_key[k]), by_key[k]
    assert len(rollout_letters) >= GROUP and all("outside the vocabulary" in d.error for d in rollout_letters)
    assert bad_prompt not in done
    assert not lost_good and not lost_fb
