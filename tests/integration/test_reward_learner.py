"""The reward learner as a real process: labels in from the broker, a gated round, a new
version announced with the gate's numbers, and the reward service swapping to it."""

from __future__ import annotations

import dataclasses
import random
import socket
import time

import grpc
import pytest

from rlhf.events.v1 import events_pb2
from rlhf.reward.v1 import reward_pb2, reward_pb2_grpc
from rlhf.reward_learner.v1 import reward_learner_pb2, reward_learner_pb2_grpc
from rlhf_common.bus import Producer, ensure_topics
from rlhf_common.config import BusConfig
from rlhf_common.topics import Topics
from rlhf_reward.config import RewardConfig
from rlhf_reward.core import RewardModel, ScoreItem
from rlhf_reward_learner.config import RewardLearnerConfig

from tests.helpers import read_topic, start_service

pytestmark = pytest.mark.integration

GOOD = ["good great happy thanks yes", "nice kind warm bright good", "great friend loves happy song"]
BAD = ["bad sad no cold dark", "sad bad late dark no", "no bad cold sad night"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _labels(n: int, winners: list[str], losers: list[str]) -> list[events_pb2.Label]:
    rng = random.Random(0)
    out = []
    for i in range(n):
        good, bad = rng.choice(winners), rng.choice(losers)
        a_good = i % 2 == 0
        out.append(events_pb2.Label(
            label_id=f"lbl-{i}", prompt=f"Tell me about thing {i}.", source=events_pb2.LABEL_SOURCE_HUMAN,
            responses=[events_pb2.LabelResponse(generation_id=f"g{i}a", text=good if a_good else bad, policy_version=1),
                       events_pb2.LabelResponse(generation_id=f"g{i}b", text=bad if a_good else good, policy_version=1)],
            pairwise=events_pb2.Pairwise(other_generation_id=f"g{i}b",
                                         choice=events_pb2.CHOICE_A if a_good else events_pb2.CHOICE_B)))
    return out


def test_labels_train_a_gated_version_that_the_reward_service_serves(broker, tiny_models, tmp_path):
    _, reward_model = tiny_models
    bus = BusConfig(bootstrap=broker.bootstrap, topic_prefix="rlearn")
    ensure_topics(bus)
    # Users prefer the kind of answer the untrained model scores lower, so that a model that
    # ranks them right has learned it from the labels.
    untrained = RewardModel(reward_model, 32).score([ScoreItem("Tell me about thing 1.", GOOD[0]),
                                                     ScoreItem("Tell me about thing 1.", BAD[0])])
    winners, losers = (BAD, GOOD) if untrained[0].score > untrained[1].score else (GOOD, BAD)
    p = Producer(bus, client_id="test-join")
    labels = _labels(160, winners, losers)
    for x in labels + labels[:10]:  # the last ten sent twice, as after a crash of the join
        p.send(Topics("rlearn").labels, x.label_id, x, wait=False)
    p.flush()
    p.close()
    store = tmp_path / "weights"
    lcfg = RewardLearnerConfig(server={"port": _free_port(), "metrics_port": 0}, model=str(reward_model),
                               weight_store=str(store), train_every_labels=100_000, min_heldout_pairs=8,
                               held_out_fraction=0.25, lr=3e-3, epochs=3, max_length=32)
    rcfg = RewardConfig(server={"port": _free_port(), "metrics_port": 0}, model=str(reward_model), http_port=0,
                        max_length=32)
    reward = start_service("rlhf_reward", rcfg, tmp_path / "reward.log", bus)
    learner = start_service("rlhf_reward_learner", lcfg, tmp_path / "learner.log", bus)
    try:
        stub = reward_learner_pb2_grpc.RewardLearnerServiceStub(grpc.insecure_channel(f"127.0.0.1:{lcfg.server.port}"))
        r = stub.Train(reward_learner_pb2.TrainRequest(), timeout=300)
        assert r.published and r.published_version == 1 and r.live_version == 0, r
        assert r.live_accuracy <= 0.5 and r.candidate_accuracy >= 0.9, r
        assert r.train_pairs + r.heldout_pairs == len(labels) and r.heldout_pairs >= 8
        st = stub.Status(reward_learner_pb2.StatusRequest())
        assert st.version == 1 and st.labels_read == len(labels) and st.last_round.round == r.round
        updates = read_topic(bus, Topics("rlearn").weights, events_pb2.WeightUpdate,
                             until=lambda us: any(u.model_name == "reward" for u in us))
        u = next(u for u in updates if u.model_name == "reward")
        assert u.version == 1 and u.format == events_pb2.WeightUpdate.FORMAT_FULL and len(u.sha256) == 64
        assert u.metrics["heldout_accuracy"] == pytest.approx(r.candidate_accuracy)
        assert u.metrics["live_heldout_accuracy"] == pytest.approx(r.live_accuracy)
        # the reward service swaps to it and scores with it
        rstub = reward_pb2_grpc.RewardServiceStub(grpc.insecure_channel(f"127.0.0.1:{rcfg.server.port}"))
        deadline = time.monotonic() + 60
        while rstub.GetModelInfo(reward_pb2.GetModelInfoRequest()).version_number != 1:
            assert time.monotonic() < deadline, "the reward service did not swap to the learned version"
            time.sleep(0.3)
        scores = rstub.Score(reward_pb2.ScoreRequest(items=[
            reward_pb2.ScoreItem(prompt="Tell me about thing 999.", response=winners[1]),
            reward_pb2.ScoreItem(prompt="Tell me about thing 999.", response=losers[1])]))
        assert scores.results[0].score > scores.results[1].score
        # a restart builds on the published version and reads the labels again
        learner.kill()
        learner.wait(10)
        # (now with a schedule that a re-read of the old labels would trigger, if they counted as new)
        lcfg2 = dataclasses.replace(lcfg, train_every_labels=20)
        learner = start_service("rlhf_reward_learner", lcfg2, tmp_path / "learner2.log", bus)
        deadline = time.monotonic() + 60
        while (st := stub.Status(reward_learner_pb2.StatusRequest())).labels_read < len(labels):
            assert time.monotonic() < deadline
            time.sleep(0.3)
        time.sleep(2)
        st = stub.Status(reward_learner_pb2.StatusRequest())
        assert st.version == 1 and st.train_pairs + st.heldout_pairs == len(labels)
        assert not st.HasField("last_round")  # re-reading what v1 learned from starts no round
    finally:
        for proc in (learner, reward):
            proc.terminate()
            proc.wait(30)
