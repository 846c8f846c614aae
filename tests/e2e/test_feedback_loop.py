"""Production feedback end to end: answers served through the policy API, feedback of every
kind posted to the feedback service, labels joined to the exact answer and weights version,
counts in = counts out, and the reward model advancing because of that feedback."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid

import grpc
import httpx
import pytest

from rlhf.events.v1 import events_pb2
from rlhf.policy.v1 import policy_pb2, policy_pb2_grpc
from rlhf.reward.v1 import reward_pb2, reward_pb2_grpc
from rlhf.reward_learner.v1 import reward_learner_pb2, reward_learner_pb2_grpc
from rlhf.trainer.v1 import trainer_pb2, trainer_pb2_grpc
from rlhf_common.topics import Topics
from rlhf_devstack.models import tiny_prompts
from rlhf_devstack.stack import Stack, StackSpec
from rlhf_feedback.join import label_id
from rlhf_reward.core import RewardModel, ScoreItem
from rlhf_reward_learner.examples import held_out

from tests.helpers import read_topic

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

N_PROMPTS = 30
HELD_OUT = 0.2
GOOD = ["good great happy thanks yes", "nice kind warm bright good", "great friend loves happy song"]
BAD = ["bad sad no cold dark", "sad bad late dark no", "no bad cold sad night"]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("feedback-stack")
    spec = StackSpec(run_dir=run_dir, services=("reward", "reference", "trainer", "feedback", "reward_learner",
                                                "policy"),
                     rollout_enabled=False, max_tokens=12,
                     extra_env={"RLHF_TRAINER_LEARN_FROM": "labels", "RLHF_TRAINER_PREFERENCE_BATCH": "1",
                                "RLHF_FEEDBACK_WAIT_S": "4", "RLHF_REWARD_LEARNER_HELD_OUT_FRACTION": str(HELD_OUT),
                                "RLHF_REWARD_LEARNER_MIN_HELDOUT_PAIRS": "3", "RLHF_REWARD_LEARNER_LR": "3e-3",
                                "RLHF_REWARD_LEARNER_EPOCHS": "4", "RLHF_REWARD_LEARNER_MAX_LENGTH": "64"})
    with Stack(spec) as st:
        policy = policy_pb2_grpc.PolicyServiceStub(grpc.insecure_channel(st.addrs["policy"]))
        answers = []
        for i, prompt in enumerate(tiny_prompts(N_PROMPTS, seed=3)):
            r = policy.Generate(policy_pb2.GenerateRequest(prompt=prompt, sampling=policy_pb2.SamplingParams(
                temperature=1.0, max_tokens=12, n=2, seed=i)))
            answers.append((prompt, r))
        yield st, answers


def _post(st, items):
    port = st.configs["feedback"].http_port
    return httpx.post(f"http://127.0.0.1:{port}/v1/feedback", json={"items": items}, timeout=30)


def _stats(st) -> dict[tuple[str, str], int]:
    port = st.configs["feedback"].http_port
    return {(c["kind"], c["outcome"]): c["count"]
            for c in httpx.get(f"http://127.0.0.1:{port}/v1/feedback/stats", timeout=10).json()["counts"]}


def test_feedback_becomes_labels_on_the_exact_answers_and_a_new_reward_model(served):
    st, answers = served
    # Users edit answers into sentences of one kind; pick the kind the untrained reward model
    # does not already prefer over the policy's answers, so that preferring it is learned.
    untrained = RewardModel(st.spec.reward_model, 64)

    def live_accuracy(sentences):
        items = [ScoreItem(p, s) for (p, r), s in zip(answers, sentences * N_PROMPTS)]
        items += [ScoreItem(p, r.completions[0].text) for p, r in answers]
        scores = [x.score for x in untrained.score(items)]
        return sum(a > b for a, b in zip(scores[:N_PROMPTS], scores[N_PROMPTS:])) / N_PROMPTS

    edits = min((GOOD, BAD), key=live_accuracy)
    items, expect = [], {}  # feedback id -> (generation ids, policy versions) its label must carry
    expect_kind: dict[str, str] = {}
    for i, (prompt, r) in enumerate(answers):
        a, b = r.completions[0], r.completions[1]
        v = r.policy_version
        fid = f"e2e-{uuid.uuid4().hex}"
        items.append({"feedback_id": fid, "generation_id": a.generation_id,
                      "edit": {"edited_response": edits[i % 3]}})
        expect[fid] = ([a.generation_id, ""], [v, -1])
        expect_kind[fid] = "edit"
        if held_out(prompt, HELD_OUT):
            continue  # held-out prompts get edits only: the gate judges what users taught
        more = [
            {"generation_id": a.generation_id, "thumb": "up"},
            {"generation_id": b.generation_id, "thumb": "down", "comment": "off topic", "user_id": f"u{i}"},
            {"generation_id": a.generation_id, "rating": {"value": 5, "scale_min": 1, "scale_max": 5}},
            {"generation_id": a.generation_id, "pairwise": {"other_generation_id": b.generation_id, "choice": "a"}},
        ]
        for m in more:
            fid = f"e2e-{uuid.uuid4().hex}"
            items.append({"feedback_id": fid, **m})
            gens = [m["generation_id"]] + ([b.generation_id] if "pairwise" in m else [])
            expect[fid] = (gens, [v] * len(gens))
            expect_kind[fid] = next(k for k in ("thumb", "rating", "pairwise") if k in m)
    for start in range(0, len(items), 16):
        r = _post(st, items[start:start + 16])
        assert r.status_code == 200 and not any(x["duplicate"] for x in r.json()["results"]), r.text
    # a duplicate, a conflicting duplicate and an orphan
    assert _post(st, [items[0]]).json()["results"][0]["duplicate"] is True
    assert _post(st, [{**items[0], "edit": {"edited_response": "something else"}}]).status_code == 409
    orphan = {"feedback_id": f"e2e-{uuid.uuid4().hex}", "generation_id": "never-served", "thumb": "up"}
    assert _post(st, [orphan]).status_code == 200

    labels = read_topic(st.bus, Topics().labels, events_pb2.Label,
                        until=lambda ls: {label_id(f) for f in expect} <= {x.label_id for x in ls}, timeout_s=90)
    by_id = {x.label_id: x for x in labels}
    assert set(by_id) == {label_id(f) for f in expect}  # one label per item; none for the orphan
    texts = {c.generation_id: c.text for _, r in answers for c in r.completions}
    for fid, (gens, versions) in expect.items():
        x = by_id[label_id(fid)]
        assert [r.generation_id for r in x.responses] == gens and [r.policy_version for r in x.responses] == versions
        assert all(r.text == texts[g] for r, g in zip(x.responses, gens) if g)
        assert list(x.feedback_ids) == [fid] and x.source == events_pb2.LABEL_SOURCE_HUMAN
        assert x.prompt == next(p for p, r in answers if gens[0] in {c.generation_id for c in r.completions})

    deadline = time.monotonic() + 60
    while (stats := _stats(st)).get(("thumb", "orphan"), 0) < 1:
        assert time.monotonic() < deadline, stats
        time.sleep(0.5)
    accepted = sum(n for (k, o), n in stats.items() if o == "accepted")
    joined = sum(n for (k, o), n in stats.items() if o == "joined")
    waiting = sum(n for (k, o), n in stats.items() if o == "waiting")
    assert accepted == len(items) + 1 and joined == len(items) and waiting == 0
    assert accepted == joined + stats[("thumb", "orphan")] + waiting  # counts in = counts out
    assert stats[("edit", "duplicate")] == 1 and stats[("edit", "conflict")] == 1

    learner = reward_learner_pb2_grpc.RewardLearnerServiceStub(grpc.insecure_channel(st.addrs["reward_learner"]))
    result = learner.Train(reward_learner_pb2.TrainRequest(), timeout=600)
    assert result.published and result.published_version == 1, result
    assert result.candidate_accuracy >= 0.9 and result.candidate_accuracy >= result.live_accuracy
    assert result.train_pairs > 0 and result.train_points == 0 and result.heldout_pairs >= 3
    reward = reward_pb2_grpc.RewardServiceStub(grpc.insecure_channel(st.addrs["reward"]))
    while reward.GetModelInfo(reward_pb2.GetModelInfoRequest()).version_number != 1:
        assert time.monotonic() < deadline + 120, "the reward service did not swap to the learned version"
        time.sleep(0.3)

    # the policy learns from the same labels: one DPO step per A/B choice or edit, each a new
    # version that the policy serves
    n_pairs = sum(1 for i in items if "pairwise" in i or "edit" in i)
    trainer = trainer_pb2_grpc.TrainerServiceStub(grpc.insecure_channel(st.addrs["trainer"]))
    policy = policy_pb2_grpc.PolicyServiceStub(grpc.insecure_channel(st.addrs["policy"]))
    deadline = time.monotonic() + 240
    while (status := trainer.Status(trainer_pb2.StatusRequest())).step < n_pairs:
        assert time.monotonic() < deadline, status
        time.sleep(0.5)
    assert status.step == n_pairs and all(x.kind == "labels" for x in status.recent)
    while policy.GetVersion(policy_pb2.GetVersionRequest()).version < status.version:
        assert time.monotonic() < deadline, "the policy did not serve the version learned from feedback"
        time.sleep(0.3)

    # one command traces an answer to its feedback, labels and the versions that learned from them
    prompt, r = next((p, r) for p, r in answers if not held_out(p, HELD_OUT))
    gid = r.completions[0].generation_id
    env = {**os.environ, **st.bus.to_env()}
    out = subprocess.run([sys.executable, "-m", "rlhf_feedback.trace", gid, "--weight-store",
                          str(st.spec.run_dir / "weights"), "--json"], env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    t = json.loads(out.stdout)
    mine = {f for f, (gens, _) in expect.items() if gid in gens}
    assert t["generation"]["generation_id"] == gid and t["generation"]["prompt"] == prompt
    assert int(t["generation"].get("policy_version", 0)) == r.policy_version
    assert {f["feedback_id"] for f in t["feedback"]} == mine and len(mine) == 4  # edit, thumb, rating, pairwise
    assert {x["label_id"] for x in t["labels"]} == {label_id(f) for f in mine}
    # a lone rating of an answer makes no example (ratings pair up between answers), so the
    # reward model learned from the other three
    rating = next(x["label_id"] for x in t["labels"] if "rating" in x)
    assert set(t["reward_versions"]) == {"1"}
    assert set(t["reward_versions"]["1"]) == {label_id(f) for f in mine} - {rating}
    pairs_of_answer = {label_id(f) for f in mine if "pairwise" in expect_kind[f] or "edit" in expect_kind[f]}
    assert len(pairs_of_answer) == 2 and len(t["policy_versions"]) == 2  # one DPO step each
    assert {i for ids in t["policy_versions"].values() for i in ids} == pairs_of_answer
    text = subprocess.run([sys.executable, "-m", "rlhf_feedback.trace", gid, "--weight-store",
                           str(st.spec.run_dir / "weights")], env=env, capture_output=True, text=True, timeout=120)
    assert "reward-model versions trained on them: v1 (3 labels)" in text.stdout, text.stdout
    assert "policy versions trained on them: v" in text.stdout, text.stdout
