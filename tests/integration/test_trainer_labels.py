"""The trainer learning from feedback labels as a real process: preference steps on A/B
choices and edits from rlhf.labels, each version's labels in the model's lineage,
and a kill -9 that neither loses a pair nor trains one twice."""

from __future__ import annotations

import time

import grpc
import pytest

from rlhf.events.v1 import events_pb2
from rlhf.trainer.v1 import trainer_pb2, trainer_pb2_grpc
from rlhf_common.bus import Producer
from rlhf_common.topics import Topics
from rlhf_common.weights import WeightStore
from rlhf_devstack.stack import Stack, StackSpec

pytestmark = pytest.mark.integration


def _labels(start: int, n: int) -> list[events_pb2.Label]:
    out = []
    for i in range(start, start + n):
        resp = [events_pb2.LabelResponse(generation_id=f"g{i}a", text="good great happy", policy_version=0),
                events_pb2.LabelResponse(generation_id=f"g{i}b", text="bad sad dark", policy_version=0)]
        if i % 3 == 2:
            x = events_pb2.Label(label_id=f"lbl-{i}", prompt=f"Tell me about the cat {i}.", responses=[
                resp[1], events_pb2.LabelResponse(text="good great happy", policy_version=-1)],
                edit=events_pb2.Edit(edited_response="good great happy"))
        else:
            x = events_pb2.Label(label_id=f"lbl-{i}", prompt=f"Tell me about the cat {i}.", responses=resp,
                                 pairwise=events_pb2.Pairwise(other_generation_id=f"g{i}b",
                                                              choice=events_pb2.CHOICE_A))
        out.append(x)
    return out


def _send(st, labels) -> None:
    p = Producer(st.bus, client_id="test-join")
    for x in labels:
        p.send(Topics().labels, x.label_id, x, wait=False)
    p.flush()
    p.close()


def _wait_steps(stub, steps: int, timeout_s: float = 120) -> trainer_pb2.StatusResponse:
    deadline = time.monotonic() + timeout_s
    while (s := stub.Status(trainer_pb2.StatusRequest())).step < steps:
        assert time.monotonic() < deadline, s
        time.sleep(0.2)
    return s


def test_preference_steps_on_labels_survive_a_kill_9(tmp_path):
    spec = StackSpec(run_dir=tmp_path, services=("reference", "trainer"),
                     extra_env={"RLHF_TRAINER_LEARN_FROM": "labels", "RLHF_TRAINER_PREFERENCE_BATCH": "4",
                                "RLHF_TRAINER_LR": "1e-3", "RLHF_TRAINER_CHECKPOINT_EVERY": "1"})
    with Stack(spec) as st:
        stub = trainer_pb2_grpc.TrainerServiceStub(grpc.insecure_channel(st.addrs["trainer"]))
        tie = events_pb2.Label(label_id="lbl-tie", prompt="A tie.", pairwise=events_pb2.Pairwise(
            choice=events_pb2.CHOICE_TIE), responses=[events_pb2.LabelResponse(text="x"),
                                                      events_pb2.LabelResponse(text="y")])
        thumb = events_pb2.Label(label_id="lbl-thumb", prompt="A thumb.", thumb=events_pb2.THUMB_UP,
                                 responses=[events_pb2.LabelResponse(text="x")])
        first = _labels(0, 8)
        _send(st, first[:4] + [tie, thumb] + first[4:] + first[:2])  # ties and thumbs make no pair; repeats
        s = _wait_steps(stub, 2)
        assert [x.kind for x in s.recent] == ["labels", "labels"] and s.version == 2
        store = WeightStore(tmp_path / "weights")
        lineage = store.lineage("policy")
        assert [(e["version"], e["kind"], e["label_ids"]) for e in lineage] == [
            (1, "labels", [x.label_id for x in first[:4]]), (2, "labels", [x.label_id for x in first[4:]])]

        assert st.kill("trainer") == -9
        st.restart("trainer")
        stub = trainer_pb2_grpc.TrainerServiceStub(grpc.insecure_channel(st.addrs["trainer"]))
        assert stub.Status(trainer_pb2.StatusRequest()).step == 2
        more = _labels(8, 4)
        _send(st, first[4:6] + more)  # two already trained, sent again
        s = _wait_steps(stub, 3)
        time.sleep(2)  # a fourth step would need pairs that were trained already
        s = stub.Status(trainer_pb2.StatusRequest())
        assert s.step == 3 and s.version == 3
        assert [(e["version"], e["label_ids"]) for e in store.lineage("policy")][2:] == [
            (3, [x.label_id for x in more])]  # nothing trained twice after the kill
        assert s.recent[-1].kind == "labels" and s.recent[-1].reward_mean > 0  # chosen over rejected
