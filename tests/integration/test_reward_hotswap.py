"""Hot swap of the reward model under load, announced on rlhf.weights through the real broker."""

from __future__ import annotations

import threading
import time

import grpc
import httpx
import pytest
import torch

from rlhf.events.v1 import events_pb2
from rlhf.reward.v1 import reward_pb2, reward_pb2_grpc
from rlhf_common.bus import Producer, now_ms
from rlhf_reward.config import RewardConfig
from rlhf_devstack.models import make_tiny_reward_model
from rlhf_devstack.stack import free_port
from rlhf_common.topics import Topics
from rlhf_common.weights import WeightStore

from tests.helpers import metric_value, scrape
from tests.integration.reward_helpers import start_reward, stop

pytestmark = pytest.mark.integration

ITEMS = [("Tell me about the cat.", " The cat sings."), ("Help me plan a trip.", " Go by road, early.")]


class Client(threading.Thread):
    """Scores ITEMS over and over (gRPC or REST); records (model_version, scores) or the error."""

    def __init__(self, cfg: RewardConfig, kind: str, stop_event: threading.Event):
        super().__init__(daemon=True)
        self.cfg, self.kind, self.stop_event = cfg, kind, stop_event
        self.seen: list[tuple[str, tuple[float, ...]]] = []
        self.errors: list[str] = []

    def run(self):
        if self.kind == "grpc":
            ch = grpc.insecure_channel(f"127.0.0.1:{self.cfg.server.port}")
            stub = reward_pb2_grpc.RewardServiceStub(ch)
            req = reward_pb2.ScoreRequest(items=[reward_pb2.ScoreItem(prompt=p, response=r) for p, r in ITEMS])
        else:
            http = httpx.Client(base_url=f"http://127.0.0.1:{self.cfg.http_port}", timeout=30)
            body = {"items": [{"prompt": p, "response": r} for p, r in ITEMS]}
        while not self.stop_event.is_set():
            try:
                if self.kind == "grpc":
                    resp = stub.Score(req, timeout=30)
                    self.seen.append((resp.model_version, tuple(x.score for x in resp.results)))
                else:
                    r = http.post("/v1/score", json=body)
                    r.raise_for_status()
                    j = r.json()
                    self.seen.append((j["model_version"], tuple(x["score"] for x in j["results"])))
            except Exception as e:  # counted as a failed request
                self.errors.append(repr(e))


def _want_scores(folder) -> tuple[float, ...]:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForSequenceClassification.from_pretrained(folder, dtype=torch.float32).eval()
    out = []
    for p, r in ITEMS:
        with torch.no_grad():
            out.append(model(**tok(p, r, return_tensors="pt")).logits[0, 0].item())
    return tuple(out)


def test_hot_swap_under_load_fails_no_request(bus, tiny_models, tmp_path):
    policy, reward_v0 = tiny_models
    # The new version: another tiny reward model, published to the weight store as v1.
    new_src = make_tiny_reward_model(tmp_path / "reward-new", policy, seed=7)
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    store = WeightStore(tmp_path / "store")
    ckpt = store.save(AutoModelForSequenceClassification.from_pretrained(new_src),
                      AutoTokenizer.from_pretrained(new_src), "reward", 1, step=10)
    cfg = RewardConfig(server={"port": free_port(), "metrics_port": free_port()}, model=str(reward_v0),
                       http_port=free_port(), max_batch_size=16, max_wait_ms=2)
    proc = start_reward(cfg, tmp_path / "reward.log", bus=bus)
    stop_event = threading.Event()
    clients = [Client(cfg, kind, stop_event) for kind in ["grpc"] * 8 + ["rest"] * 8]
    producer = Producer(bus, client_id="test-weights")
    topic = Topics(bus.topic_prefix).weights
    try:
        for c in clients:
            c.start()
        time.sleep(2.0)
        # An update for another model is ignored; then the reward update.
        producer.send(topic, "policy", events_pb2.WeightUpdate(model_name="policy", version=9, uri="/nowhere",
                                                               sha256="0" * 64, created_unix_ms=now_ms()))
        producer.send(topic, "reward", events_pb2.WeightUpdate(
            model_name="reward", version=1, uri=str(ckpt.path), format=events_pb2.WeightUpdate.FORMAT_FULL,
            sha256=ckpt.sha256, step=ckpt.step, created_unix_ms=now_ms()))
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not all(c.seen and c.seen[-1][0] == "v00000001" for c in clients):
            time.sleep(0.1)
        time.sleep(1.0)  # keep the load on after the swap
    finally:
        stop_event.set()
        for c in clients:
            c.join(30)

    try:
        errors = [e for c in clients for e in c.errors]
        assert errors == []
        total = sum(len(c.seen) for c in clients)
        assert total > 100
        want_old, want_new = _want_scores(reward_v0), _want_scores(ckpt.path)
        for c in clients:
            versions = [v for v, _ in c.seen]
            assert versions[0] == reward_v0.name and versions[-1] == "v00000001", c.kind
            # one switch per client, never back
            switch = versions.index("v00000001")
            assert set(versions[:switch]) == {reward_v0.name} and set(versions[switch:]) == {"v00000001"}
            for v, scores in (c.seen[switch - 1], c.seen[-1]):
                want = want_new if v == "v00000001" else want_old
                assert scores == pytest.approx(want, abs=1e-4)
        text = scrape(cfg.server.metrics_port)
        assert metric_value(text, "rlhf_reward_model_swaps_total", {"outcome": "applied"}) == 1
        assert metric_value(text, "rlhf_reward_requests_total", {"method": "Score", "code": "OK"}) > 0
        assert (metric_value(text, "rlhf_reward_requests_total", {"method": "Score", "code": "INTERNAL"}) or 0) == 0
        info = reward_pb2_grpc.RewardServiceStub(grpc.insecure_channel(f"127.0.0.1:{cfg.server.port}")).GetModelInfo(
            reward_pb2.GetModelInfoRequest())
        assert info.version_number == 1 and info.sha256 == ckpt.sha256

        # A corrupt announcement (wrong sha256) is refused; the service keeps serving v1.
        producer.send(topic, "reward", events_pb2.WeightUpdate(
            model_name="reward", version=2, uri=str(ckpt.path), sha256="f" * 64, created_unix_ms=now_ms()))
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not metric_value(
                scrape(cfg.server.metrics_port), "rlhf_reward_model_swaps_total", {"outcome": "corrupt"}):
            time.sleep(0.2)
        assert metric_value(scrape(cfg.server.metrics_port), "rlhf_reward_model_swaps_total", {"outcome": "corrupt"}) == 1
        r = httpx.post(f"http://127.0.0.1:{cfg.http_port}/v1/score",
                       json={"items": [{"prompt": "a", "response": "b"}]})
        assert r.status_code == 200 and r.json()["model_version"] == "v00000001"
    finally:
        producer.close()
        assert stop(proc) == 0
