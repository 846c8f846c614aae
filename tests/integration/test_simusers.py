"""Simulated users against a real stack (policy and feedback on the tiny model): every answer
comes from the policy's Generate, every judgement reaches the feedback service's REST API,
and the join turns each one into a label on rlhf.labels tied to the users' generation ids."""

from __future__ import annotations

import threading
from collections import Counter

import grpc
import httpx
import pytest

from rlhf.events.v1 import events_pb2
from rlhf.policy.v1 import policy_pb2_grpc
from rlhf_common.topics import Topics
from rlhf_devstack.models import tiny_prompts
from rlhf_devstack.simusers import (Calibration, GoldSettings, NoiseModel, SimulatedUsers, calibrate, evaluate,
                                    load_or_train, win_rate)
from rlhf_devstack.stack import Stack, StackSpec
from rlhf_feedback.join import label_id

from tests.helpers import read_topic

pytestmark = [pytest.mark.integration, pytest.mark.slow]

KEY = "sim-users-key-1"
INTERACTIONS = 40
LABEL_KIND = {"thumbs": "thumb", "rating": "rating", "pairwise": "pairwise"}


@pytest.fixture(scope="module")
def stack_and_judge(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("simusers")
    judge: dict = {}

    def train():  # while the policy's engine starts
        judge["judge"] = load_or_train(run_dir / "gold", GoldSettings(conversations=200, seed=0), progress=False)

    trainer = threading.Thread(target=train)
    trainer.start()
    spec = StackSpec(run_dir=run_dir, services=("policy", "feedback"), rollout_enabled=False, max_tokens=12,
                     service_env={"feedback": {"RLHF_FEEDBACK_API_KEYS": KEY}})
    with Stack(spec) as st:
        trainer.join()
        yield st, judge["judge"]


def _feedback_url(st) -> str:
    return f"http://127.0.0.1:{st.configs['feedback'].http_port}"


def test_simulated_users_feedback_of_every_kind_becomes_labels_on_their_answers(stack_and_judge):
    st, judge = stack_and_judge
    prompts = tiny_prompts(12, seed=4)
    stub = policy_pb2_grpc.PolicyServiceStub(grpc.insecure_channel(st.addrs["policy"]))
    cal = calibrate(stub, prompts[:6], judge, samples=2, max_tokens=12)
    assert cal.n == 12 and cal.boundaries == tuple(sorted(cal.boundaries))

    users = SimulatedUsers(st.addrs["policy"], _feedback_url(st), KEY, prompts, judge, cal,
                           mix={"thumbs": 0.4, "rating": 0.3, "pairwise": 0.3}, feedback_share=0.8, seed=1,
                           noise=NoiseModel(), max_tokens=12)
    report = users.run(users=3, interactions=INTERACTIONS)
    assert report.interactions == INTERACTIONS and not report.failures, report.summary()
    assert set(report.accepted) == {"thumbs", "rating", "pairwise"}, report.accepted
    assert sum(report.accepted.values()) == len(report.sent) < INTERACTIONS  # a share got no feedback
    assert Counter(e.kind for e in report.events)["none"] == INTERACTIONS - len(report.sent)
    assert report.answers == INTERACTIONS + report.accepted["pairwise"]  # two answers per A/B choice
    assert all(e.policy_version == 0 and e.gold == e.gold for e in report.events)
    assert not any(s.duplicate for s in report.sent)

    sent = {label_id(s.feedback_id): s for s in report.sent}
    labels = read_topic(st.bus, Topics().labels, events_pb2.Label, until=lambda ls: set(sent) <= {x.label_id
                                                                                                 for x in ls},
                        timeout_s=60)
    ours = {x.label_id: x for x in labels if x.label_id in sent}
    assert set(ours) == set(sent)  # every accepted item was joined into a label
    for lid, x in ours.items():
        s = sent[lid]
        assert x.WhichOneof("signal") == LABEL_KIND[s.kind]
        assert [r.generation_id for r in x.responses] == list(s.generation_ids)
        assert all(r.policy_version == s.policy_version for r in x.responses)
        assert list(x.feedback_ids) == [s.feedback_id] and x.source == events_pb2.LABEL_SOURCE_HUMAN
        if s.kind == "thumbs":
            assert x.thumb == (events_pb2.THUMB_UP if s.value == "up" else events_pb2.THUMB_DOWN)
        elif s.kind == "rating":
            assert (x.rating.value, x.rating.scale_min, x.rating.scale_max) == (float(s.value), 1, cal.levels)
        else:
            assert x.pairwise.choice == (events_pb2.CHOICE_A if s.value == "a" else events_pb2.CHOICE_B)
    # counts in = counts out: the gateway accepted and the join joined what the users counted
    stats = httpx.get(f"{_feedback_url(st)}/v1/feedback/stats", headers={"authorization": f"Bearer {KEY}"},
                      timeout=10).json()
    counts = {(c["kind"], c["outcome"]): c["count"] for c in stats["counts"]}
    for kind, n in report.accepted.items():
        assert counts[(LABEL_KIND[kind], "accepted")] == n
    assert Counter(x.WhichOneof("signal") for x in ours.values()) == {LABEL_KIND[k]: n
                                                                      for k, n in report.accepted.items()}


def test_refused_feedback_is_counted_with_its_status_and_body(stack_and_judge):
    st, judge = stack_and_judge
    users = SimulatedUsers(st.addrs["policy"], _feedback_url(st), "wrong-key-0000", tiny_prompts(3, seed=4), judge,
                           Calibration.from_scores([0.0, 1.0]), mix={"thumbs": 1.0}, feedback_share=1.0, seed=2,
                           max_tokens=8)
    report = users.run(users=1, interactions=3)
    assert report.interactions == 3 and report.answers == 3 and not report.sent
    assert report.failed == {"feedback/thumbs": 3}
    assert all(f.stage == "feedback" and f.error.startswith("HTTP 401") and "invalid API key" in f.error
               for f in report.failures), report.failures


def test_gold_evaluation_of_the_served_policy(stack_and_judge):
    st, judge = stack_and_judge
    stub = policy_pb2_grpc.PolicyServiceStub(grpc.insecure_channel(st.addrs["policy"]))
    prompts = tiny_prompts(6, seed=9)
    ev = evaluate(stub, prompts, judge, samples=1, max_tokens=8)  # greedy
    assert len(ev.answers) == 6 and ev.policy_versions == (0,)
    assert ev.low <= ev.mean <= ev.high
    again = evaluate(stub, prompts, judge, samples=1, max_tokens=8)
    assert [a.text for a in again.answers] == [a.text for a in ev.answers]  # greedy: the same answers
    w = win_rate(ev.answers, again.answers, judge)
    assert (w.rate, w.ties, w.n) == (0.5, 6, 6)
