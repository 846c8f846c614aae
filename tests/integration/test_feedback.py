"""The feedback service as a real process on the real broker: the gateway (REST and gRPC),
idempotency, and the join of feedback to the generations it judges."""

from __future__ import annotations

import socket
import time
import uuid

import grpc
import httpx
import pytest

from rlhf.events.v1 import events_pb2
from rlhf.feedback.v1 import feedback_pb2, feedback_pb2_grpc
from rlhf_common.bus import Producer, ensure_topics, now_ms
from rlhf_common.config import BusConfig
from rlhf_common.topics import Topics
from rlhf_devstack.devbroker import DevBroker
from rlhf_feedback.config import FeedbackConfig
from rlhf_feedback.join import label_id

from tests.helpers import read_topic, start_service

pytestmark = pytest.mark.integration

KEY = "feedback-key-1"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cfg(tmp, **kw) -> FeedbackConfig:
    return FeedbackConfig(server={"port": _free_port(), "metrics_port": _free_port()}, http_port=_free_port(),
                          state_dir=str(tmp), **kw)


@pytest.fixture(scope="module")
def service(broker, tmp_path_factory):
    bus = BusConfig(bootstrap=broker.bootstrap, topic_prefix="fbsvc")
    ensure_topics(bus)
    cfg = _cfg(tmp_path_factory.mktemp("feedback"), wait_s=3.0, api_keys=KEY, prompt_sample_rate=1.0,
               prompt_filter="tests.integration.prompt_filters:no_passwords")
    proc = start_service("rlhf_feedback", cfg, tmp_path_factory.mktemp("logs") / "feedback.log", bus)
    yield cfg, bus
    proc.terminate()
    assert proc.wait(30) == 0


def _post(cfg, items, key=KEY):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(f"http://127.0.0.1:{cfg.http_port}/v1/feedback", json={"items": items}, headers=headers,
                      timeout=30)


def _stats(cfg) -> dict[tuple[str, str], int]:
    r = httpx.get(f"http://127.0.0.1:{cfg.http_port}/v1/feedback/stats", headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 200
    return {(c["kind"], c["outcome"]): c["count"] for c in r.json()["counts"]}


def _stub(cfg):
    return feedback_pb2_grpc.FeedbackServiceStub(grpc.insecure_channel(f"127.0.0.1:{cfg.server.port}"))


def _generation(prompt: str, response: str, version: int) -> events_pb2.Generation:
    return events_pb2.Generation(generation_id=uuid.uuid4().hex, request_id=uuid.uuid4().hex, prompt=prompt,
                                 response=response, policy_version=version, created_unix_ms=now_ms())


def _serve(bus: BusConfig, gens: list[events_pb2.Generation]) -> None:
    """Write answers to rlhf.generations as the policy does for every answer it serves."""
    p = Producer(bus, client_id="test-policy")
    for g in gens:
        p.send(Topics(bus.topic_prefix).generations, g.generation_id, g, wait=False)
    p.flush()
    p.close()


def _id() -> str:
    return "fb-" + uuid.uuid4().hex


def test_every_kind_is_accepted_written_once_and_joined_to_its_generation(service):
    cfg, bus = service
    a, b = _generation("Name a colour.", "Blue.", 3), _generation("Name a colour.", "Green, I think.", 4)
    _serve(bus, [a, b])
    items = [
        {"feedback_id": _id(), "generation_id": a.generation_id, "thumb": "up", "comment": "nice",
         "user_id": "u1"},
        {"feedback_id": _id(), "generation_id": a.generation_id, "rating": {"value": 4, "scale_min": 1,
                                                                             "scale_max": 5}},
        {"feedback_id": _id(), "generation_id": a.generation_id,
         "pairwise": {"other_generation_id": b.generation_id, "choice": "b"}},
        {"feedback_id": _id(), "generation_id": b.generation_id, "edit": {"edited_response": "Green."}},
    ]
    r = _post(cfg, items)
    assert r.status_code == 200, r.text
    assert [x["duplicate"] for x in r.json()["results"]] == [False] * 4
    ids = {i["feedback_id"] for i in items}
    records = read_topic(bus, Topics("fbsvc").feedback, events_pb2.Feedback,
                         until=lambda rs: ids <= {x.feedback_id for x in rs})
    mine = [x for x in records if x.feedback_id in ids]
    assert len(mine) == 4 and {x.WhichOneof("signal") for x in mine} == {"thumb", "rating", "pairwise", "edit"}
    assert all(len(x.body_sha256) == 64 and x.source == events_pb2.LABEL_SOURCE_HUMAN for x in mine)

    labels = read_topic(bus, Topics("fbsvc").labels, events_pb2.Label,
                        until=lambda ls: {label_id(i) for i in ids} <= {x.label_id for x in ls})
    by_id = {x.label_id: x for x in labels}
    thumb, rating, pair, edit = (by_id[label_id(i["feedback_id"])] for i in items)
    assert thumb.thumb == events_pb2.THUMB_UP and thumb.prompt == "Name a colour."
    assert [(r.generation_id, r.text, r.policy_version) for r in thumb.responses] == [(a.generation_id, "Blue.", 3)]
    assert (rating.rating.value, rating.rating.scale_min, rating.rating.scale_max) == (4, 1, 5)
    assert [r.policy_version for r in pair.responses] == [3, 4] and pair.pairwise.choice == events_pb2.CHOICE_B
    assert [(r.text, r.policy_version) for r in edit.responses] == [("Green, I think.", 4), ("Green.", -1)]
    assert all(list(x.feedback_ids) == [i["feedback_id"]] for x, i in zip((thumb, rating, pair, edit), items))
    stats = _stats(cfg)
    for kind in ("thumb", "rating", "pairwise", "edit"):
        assert stats[(kind, "accepted")] >= 1 and stats[(kind, "joined")] >= 1


def test_resend_is_a_duplicate_and_another_body_under_the_same_id_conflicts(service):
    cfg, bus = service
    g = _generation("Say hi.", "Hi!", 1)
    _serve(bus, [g])
    item = {"feedback_id": _id(), "generation_id": g.generation_id, "thumb": "down"}
    assert _post(cfg, [item]).json()["results"] == [{"feedback_id": item["feedback_id"], "duplicate": False}]
    assert _post(cfg, [item]).json()["results"] == [{"feedback_id": item["feedback_id"], "duplicate": True}]
    # the same id twice in one request, same body: the second is a duplicate
    again = _post(cfg, [item, item]).json()["results"]
    assert [x["duplicate"] for x in again] == [True, True]
    r = _post(cfg, [{**item, "thumb": "up"}])
    assert r.status_code == 409 and item["feedback_id"] in r.json()["error"]["message"]
    with pytest.raises(grpc.RpcError) as e:
        _stub(cfg).Submit(feedback_pb2.SubmitRequest(items=[feedback_pb2.FeedbackItem(
            feedback_id=item["feedback_id"], generation_id=g.generation_id, thumb=events_pb2.THUMB_UP)]),
            metadata=[("authorization", f"Bearer {KEY}")])
    assert e.value.code() == grpc.StatusCode.ALREADY_EXISTS
    ok = _stub(cfg).Submit(feedback_pb2.SubmitRequest(items=[feedback_pb2.FeedbackItem(
        feedback_id=item["feedback_id"], generation_id=g.generation_id, thumb=events_pb2.THUMB_DOWN)]),
        metadata=[("authorization", f"Bearer {KEY}")])
    assert [x.duplicate for x in ok.results] == [True]
    # written to the broker once, joined once
    records = read_topic(bus, Topics("fbsvc").feedback, events_pb2.Feedback,
                         until=lambda rs: False, timeout_s=3)
    assert sum(x.feedback_id == item["feedback_id"] for x in records) == 1
    labels = read_topic(bus, Topics("fbsvc").labels, events_pb2.Label, until=lambda rs: False, timeout_s=3)
    assert sum(x.label_id == label_id(item["feedback_id"]) for x in labels) == 1


@pytest.mark.parametrize("item,needle", [
    ({"generation_id": "g1", "thumb": "up"}, "items.0.feedback_id: Field required"),
    ({"feedback_id": "has space", "generation_id": "g1", "thumb": "up"}, "items[0].feedback_id='has space'"),
    ({"feedback_id": "f1", "generation_id": "g1"}, "exactly one of thumb, rating, pairwise, edit"),
    ({"feedback_id": "f1", "generation_id": "g1", "thumb": "up", "edit": {"edited_response": "x"}},
     "(given: thumb, edit)"),
    ({"feedback_id": "f1", "generation_id": "g1", "rating": {"value": 9, "scale_min": 1, "scale_max": 5}},
     "items[0].rating.value=9: must be within the scale [1, 5]"),
    ({"feedback_id": "f1", "generation_id": "g1", "pairwise": {"other_generation_id": "g1", "choice": "a"}},
     "must differ from generation_id"),
    ({"feedback_id": "f1", "generation_id": "g1", "thumb": "sideways"}, "items.0.thumb"),
    ({"feedback_id": "f1", "generation_id": "g1", "thumb": "up", "mood": "happy"}, "items.0.mood"),
])
def test_bad_items_are_refused_naming_the_field(service, item, needle):
    cfg, _ = service
    r = _post(cfg, [item])
    assert r.status_code == 400 and needle in r.json()["error"]["message"], r.text


def test_bad_grpc_items_are_invalid_argument_and_keys_are_required(service):
    cfg, _ = service
    with pytest.raises(grpc.RpcError) as e:
        _stub(cfg).Submit(feedback_pb2.SubmitRequest(items=[feedback_pb2.FeedbackItem(
            feedback_id="f1", generation_id="g1", rating=events_pb2.Rating(value=1, scale_min=5, scale_max=1))]),
            metadata=[("authorization", f"Bearer {KEY}")])
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "scale_min=5" in e.value.details()
    with pytest.raises(grpc.RpcError) as e:
        _stub(cfg).Submit(feedback_pb2.SubmitRequest())
    assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert _post(cfg, [{"feedback_id": _id(), "generation_id": "g", "thumb": "up"}], key=None).status_code == 401
    assert _post(cfg, [{"feedback_id": _id(), "generation_id": "g", "thumb": "up"}], key="wrong-key-9").status_code \
        == 401


def test_feedback_before_its_generation_waits_and_one_without_is_dead_lettered(service):
    cfg, bus = service
    late = _generation("Count to two.", "One, two.", 7)
    early, orphan = _id(), _id()
    assert _post(cfg, [{"feedback_id": early, "generation_id": late.generation_id, "thumb": "up"},
                       {"feedback_id": orphan, "generation_id": "never-served", "thumb": "down"}]).status_code == 200
    time.sleep(1.0)
    _serve(bus, [late])  # the answer's record arrives after its feedback
    labels = read_topic(bus, Topics("fbsvc").labels, events_pb2.Label,
                        until=lambda ls: label_id(early) in {x.label_id for x in ls})
    assert [x.responses[0].policy_version for x in labels if x.label_id == label_id(early)] == [7]
    letters = read_topic(bus, Topics("fbsvc").dlq, events_pb2.DeadLetter,
                         until=lambda ds: any(orphan.encode() in d.value for d in ds), timeout_s=30)
    dead = [d for d in letters if orphan.encode() in d.value]
    assert len(dead) == 1 and dead[0].error.startswith("orphan: ") and "never-served" in dead[0].error
    assert label_id(orphan) not in {x.label_id for x in labels}
    assert _stats(cfg)[("thumb", "orphan")] >= 1


def test_served_prompts_feed_the_rl_loop_once_per_request_through_the_filter(service):
    cfg, bus = service
    a1, a2 = _generation("What is 2+2?", "4", 1), _generation("What is 2+2?", "Four.", 1)
    a2.request_id = a1.request_id  # two answers (n=2) of one request
    secret = _generation("My password is hunter2, is it strong?", "No.", 1)
    _serve(bus, [a1, a2, secret])
    prompts = read_topic(bus, Topics("fbsvc").prompts, events_pb2.Prompt,
                         until=lambda ps: any(p.text == "What is 2+2?" for p in ps))
    time.sleep(1.5)  # anything else would have arrived by now
    prompts = read_topic(bus, Topics("fbsvc").prompts, events_pb2.Prompt, until=lambda ps: False, timeout_s=2)
    mine = [p for p in prompts if p.text in ("What is 2+2?", secret.prompt)]
    assert [(p.text, p.source) for p in mine] == [("What is 2+2?", "production")]
    assert mine[0].prompt_id.startswith("prod-")


def test_docs_page_needs_no_internet(service):
    cfg, _ = service
    base = f"http://127.0.0.1:{cfg.http_port}"
    page = httpx.get(f"{base}/docs")
    assert page.status_code == 200 and "/docs-assets/swagger-ui-bundle.js" in page.text and "cdn" not in page.text
    assert httpx.get(f"{base}/docs-assets/swagger-ui-bundle.js").status_code == 200
    assert "/v1/feedback" in httpx.get(f"{base}/openapi.json").json()["paths"]


def test_broker_away_is_503_and_nothing_is_remembered(tmp_path):
    """A 2xx means the broker has the items; while it is away the call fails and the retry,
    with the same ids, is accepted as new once it is back."""
    port = _free_port()
    broker = DevBroker(port=port, log_path=tmp_path / "broker.log").start()
    bus = BusConfig(bootstrap=broker.bootstrap, topic_prefix="fbaway")
    ensure_topics(bus)
    cfg = _cfg(tmp_path / "state", broker_timeout_s=2.0, join_enabled=False)
    proc = start_service("rlhf_feedback", cfg, tmp_path / "feedback.log", bus)
    try:
        item = {"feedback_id": _id(), "generation_id": "g-away", "thumb": "up"}
        assert _post(cfg, [item], key=None).status_code == 200
        broker.stop()
        item2 = {"feedback_id": _id(), "generation_id": "g-away", "rating": {"value": 2, "scale_min": 1,
                                                                           "scale_max": 3}}
        t0 = time.monotonic()
        r = _post(cfg, [item2], key=None)
        assert r.status_code == 503 and "retry with the same feedback ids" in r.json()["error"]["message"]
        assert time.monotonic() - t0 < 15
        broker = DevBroker(port=port, log_path=tmp_path / "broker2.log").start()  # back, empty (in memory)
        ensure_topics(bus)
        deadline = time.monotonic() + 60
        while (r := _post(cfg, [item2], key=None)).status_code == 503 and time.monotonic() < deadline:
            time.sleep(1)
        assert r.status_code == 200 and r.json()["results"][0]["duplicate"] is False
        records = read_topic(bus, Topics("fbaway").feedback, events_pb2.Feedback,
                             until=lambda rs: any(x.feedback_id == item2["feedback_id"] for x in rs))
        assert [x.feedback_id for x in records] == [item2["feedback_id"]]
    finally:
        proc.terminate()
        proc.wait(30)
        broker.stop()
