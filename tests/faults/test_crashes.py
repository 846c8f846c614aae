"""Crashes, as an operator's bad day brings them, on the whole supervised stack (broker,
policy, reward, reference, trainer, feedback): a policy killed between writing rollouts and
committing its prompts, a trainer killed between publishing and committing, kill -9 of each
service in turn, and a storm of kills at random moments. The stack restarts what dies, as
Kubernetes would. After each: every prompt trained once, every feedback item one label."""

from __future__ import annotations

import collections
import os
import random
import signal
import time

import pytest

from rlhf.events.v1 import events_pb2
from rlhf_common.topics import Topics

from tests.faults.conftest import GROUP
from tests.faults.traffic import Traffic, account, running
from tests.helpers import read_topic

pytestmark = [pytest.mark.faults, pytest.mark.slow]

STORM_SERVICES = ("reward", "reference", "trainer", "feedback")
STORM_KILLS = 10  # per service
# A policy restart (vLLM start-up) takes a minute on 2 cores: `make test` kills it 2 times at
# random moments, `make reliability` (the published table) 10 times.
POLICY_STORM_KILLS = int(os.environ.get("RLHF_FAULTS_POLICY_KILLS", "2"))


def test_policy_and_trainer_killed_inside_their_commit_windows(stack, reliability):
    traffic = Traffic(stack)
    traffic.seed(6)
    account(stack, traffic, "policy killed between writing rollouts and committing prompts; trainer killed "
             "between publishing weights and committing offsets", reliability,
             note="failpoints `policy.rollouts_written` and `trainer.weights_published`, each fired once")
    # Both windows were hit: the markers exist, and the prompts of the policy's first batch
    # were sampled twice (two groups on the topic), yet trained once (asserted above).
    assert sorted(os.listdir(stack.once)) == ["policy.rollouts_written", "trainer.weights_published"]
    rollouts = read_topic(stack.bus, Topics().rollouts, events_pb2.Rollout, until=lambda rs: False, timeout_s=5)
    groups = collections.Counter(r.prompt_id for r in rollouts)
    assert any(n > GROUP for n in groups.values()), groups
    assert all(stack.restarts.get(s) for s in ("policy", "trainer")), stack.restarts


def test_each_service_killed_in_turn(stack, reliability):
    traffic = Traffic(stack)
    for name in ("policy", "reward", "reference", "trainer", "feedback"):
        traffic.seed(2)
        traffic.serve_and_rate()
        before = len(stack.restarts.get(name, []))
        stack.kill(name)
        traffic.seed(1)
        traffic.serve_and_rate()
        stack.wait_healthy(name, 300)
        assert len(stack.restarts.get(name, [])) == before + 1
    account(stack, traffic, "kill -9 of policy, reward, reference, trainer, feedback in turn", reliability)


def _storm(stack, services: tuple[str, ...], kills: int, gap_s: tuple[float, float], reliability, fault: str,
           when_ready: bool = False):
    """Kill the services in a shuffled order at random moments while clients send prompts and
    feedback; with `when_ready`, each kill waits until the service is serving again first."""
    traffic = Traffic(stack)
    rng = random.Random(7)
    plan = [s for s in services for _ in range(kills)]
    rng.shuffle(plan)
    with running(traffic, clients=2):
        for name in plan:
            if when_ready:
                stack.wait_healthy(name, 300)
            time.sleep(rng.uniform(*gap_s))
            p = stack.procs[name]
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
            else:  # still down from the last kill: wait for the restart, then kill that one
                stack.wait_healthy(name, 300)
                stack.kill(name)
    account(stack, traffic, fault, reliability, note=f"{len(plan)} kills: " + ", ".join(
        f"{s} {plan.count(s)}" for s in services))


def test_kill_storm(stack, reliability):
    _storm(stack, STORM_SERVICES, STORM_KILLS, (0.5, 4.0), reliability,
           "kill -9 at random moments: reward, reference, trainer, feedback")


def test_policy_kill_storm(stack, reliability):
    _storm(stack, ("policy",), POLICY_STORM_KILLS, (0.0, 10.0), reliability, "kill -9 at random moments: policy",
           when_ready=True)
