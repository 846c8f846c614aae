"""The policy's rollout worker against the real broker, with the trainer's side played by
hand: it runs at most RLHF_POLICY_MAX_GROUPS_AHEAD groups ahead of what the trainer has
announced as consumed, waits (prompts stay in Kafka), and loses no prompt."""

from __future__ import annotations

import time

import grpc
import pytest

from rlhf.events.v1 import events_pb2
from rlhf.policy.v1 import policy_pb2, policy_pb2_grpc
from rlhf_common.bus import Producer, now_ms
from rlhf_devstack.models import tiny_prompts
from rlhf_devstack.stack import Stack, StackSpec, seed_prompts
from rlhf_common.topics import Topics
from rlhf_common.weights import digest

from tests.helpers import metric_value, read_topic, scrape

pytestmark = [pytest.mark.integration, pytest.mark.slow]

AHEAD = 2
GROUP = 3
PROMPTS = 6


def _rollouts(st, at_least: int) -> list[events_pb2.Rollout]:
    return read_topic(st.bus, Topics().rollouts, events_pb2.Rollout, until=lambda rs: len(rs) >= at_least,
                      timeout_s=60)


def _announce(st, version: int, groups_consumed: int) -> None:
    """What the trainer publishes after a step: new weights and how many groups it consumed."""
    p = Producer(st.bus, "test-trainer")
    try:
        p.send(Topics().weights, "policy", events_pb2.WeightUpdate(
            model_name="policy", version=version, uri=str(st.spec.policy_model), sha256=digest(st.spec.policy_model),
            format=events_pb2.WeightUpdate.FORMAT_FULL, step=version, groups_consumed=groups_consumed,
            created_unix_ms=now_ms()))
    finally:
        p.close()


def test_worker_waits_for_the_trainer_and_drops_nothing(tmp_path):
    spec = StackSpec(run_dir=tmp_path, services=("policy",), rollout_n=GROUP, max_groups_ahead=AHEAD, max_tokens=8)
    with Stack(spec) as st:
        stub = policy_pb2_grpc.PolicyServiceStub(grpc.insecure_channel(st.addrs["policy"]))
        ids = seed_prompts(st.bus, tiny_prompts(PROMPTS, seed=5))

        # Nothing consumed yet: exactly AHEAD groups, then the worker waits.
        first = _rollouts(st, AHEAD * GROUP)
        time.sleep(3.0)
        assert len(_rollouts(st, AHEAD * GROUP)) == AHEAD * GROUP
        assert metric_value(scrape(st.metrics_ports["policy"]), "rlhf_policy_rollout_groups_ahead") == AHEAD
        assert {r.policy_version for r in first} == {0}

        # The trainer consumed those groups and published version 1: AHEAD more, on version 1.
        _announce(st, 1, groups_consumed=AHEAD)
        second = _rollouts(st, 2 * AHEAD * GROUP)
        time.sleep(3.0)
        assert len(_rollouts(st, 2 * AHEAD * GROUP)) == 2 * AHEAD * GROUP
        assert stub.GetVersion(policy_pb2.GetVersionRequest()).version == 1
        assert {r.policy_version for r in second[AHEAD * GROUP:]} == {1}

        # Everything consumed: the rest of the prompts, and every prompt got exactly one full group.
        _announce(st, 2, groups_consumed=2 * AHEAD)
        done = _rollouts(st, PROMPTS * GROUP)
        time.sleep(2.0)
        done = _rollouts(st, PROMPTS * GROUP)
        assert len(done) == PROMPTS * GROUP
        by_prompt: dict[str, list[events_pb2.Rollout]] = {}
        for r in done:
            by_prompt.setdefault(r.prompt_id, []).append(r)
        assert set(by_prompt) == set(ids)
        for group in by_prompt.values():
            assert sorted(r.group_index for r in group) == list(range(GROUP))
            assert {r.group_size for r in group} == {GROUP}
            assert len({r.policy_version for r in group}) == 1  # a group comes from one version
            assert all(len(r.behaviour_logprobs) == len(r.response_token_ids) > 0 for r in group)
        assert metric_value(scrape(st.metrics_ports["policy"]), "rlhf_policy_rollouts_total") == PROMPTS * GROUP
