"""Reward and reference services as real processes on loopback ports."""

from __future__ import annotations

import os
import subprocess
import sys

import grpc
import pytest
import torch

from rlhf.reference.v1 import reference_pb2, reference_pb2_grpc
from rlhf.reward.v1 import reward_pb2, reward_pb2_grpc
from rlhf_common.bus import Producer, ensure_topics
from rlhf_common.config import BusConfig
from rlhf_reference.config import ReferenceConfig
from rlhf_reward.config import RewardConfig
from rlhf_devstack.stack import free_port, wait_healthy

from tests.helpers import metric_value, scrape

pytestmark = pytest.mark.integration


def _start(module: str, cfg, log_path, bus: BusConfig):
    env = {**os.environ, **bus.to_env(), **cfg.to_env(), "PYTHONUNBUFFERED": "1"}
    log = open(log_path, "wb")
    proc = subprocess.Popen([sys.executable, "-m", module], env=env, stdout=log, stderr=subprocess.STDOUT)
    wait_healthy(f"127.0.0.1:{cfg.server.port}", 120, proc, log_path)
    return proc


@pytest.fixture(scope="module")
def services(tiny_models, tmp_path_factory, broker):
    policy, reward = tiny_models
    logs = tmp_path_factory.mktemp("logs")
    bus = BusConfig(bootstrap=broker.bootstrap, topic_prefix="svc")
    ensure_topics(bus)
    rcfg = RewardConfig(server={"port": free_port(), "metrics_port": free_port()}, model=str(reward),
                        http_port=free_port(), max_length=24, max_batch_items=8)
    fcfg = ReferenceConfig(server={"port": free_port(), "metrics_port": free_port()}, model=str(policy),
                           max_batch_items=8)
    procs = [_start("rlhf_reward", rcfg, logs / "reward.log", bus),
             _start("rlhf_reference", fcfg, logs / "ref.log", bus)]
    yield rcfg, fcfg, policy, reward, bus
    for p in procs:
        p.terminate()
    for p in procs:
        assert p.wait(30) == 0  # graceful stop on SIGTERM


def test_reference_logprobs_equal_transformers(services):
    from transformers import AutoModelForCausalLM

    _, fcfg, policy, _, _ = services
    stub = reference_pb2_grpc.ReferenceServiceStub(grpc.insecure_channel(f"127.0.0.1:{fcfg.server.port}"))
    items = [([5, 17, 33], [40, 41, 42, 43]), ([9], [100, 7]), ([1, 2, 3, 4, 5, 6], [8])]
    resp = stub.LogProbs(reference_pb2.LogProbsRequest(items=[
        reference_pb2.LogProbsItem(prompt_token_ids=p, response_token_ids=r) for p, r in items]))
    model = AutoModelForCausalLM.from_pretrained(policy, dtype=torch.float32).eval()
    for (p, r), got in zip(items, resp.results):
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([p + r])).logits[0], -1)
        want = [logp[len(p) - 1 + i, t].item() for i, t in enumerate(r)]
        assert len(got.logprobs) == len(r)
        assert max(abs(a - b) for a, b in zip(got.logprobs, want)) < 1e-5


def test_reward_scores_equal_transformers_and_report_truncation(services):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    rcfg, _, _, reward, _ = services
    stub = reward_pb2_grpc.RewardServiceStub(grpc.insecure_channel(f"127.0.0.1:{rcfg.server.port}"))
    pairs = [("Tell me about the cat.", " The cat sings."), ("Hi", ""), ("Explain why " * 20, "because")]
    resp = stub.Score(reward_pb2.ScoreRequest(items=[reward_pb2.ScoreItem(prompt=p, response=r) for p, r in pairs]))
    tok = AutoTokenizer.from_pretrained(reward)
    model = AutoModelForSequenceClassification.from_pretrained(reward, dtype=torch.float32).eval()
    for (p, r), got in zip(pairs, resp.results):
        enc = tok(p, r, truncation="longest_first", max_length=24, return_tensors="pt")
        with torch.no_grad():
            want = model(**enc).logits[0, 0].item()
        assert got.score == pytest.approx(want, abs=1e-5)
    assert [x.truncated for x in resp.results] == [False, False, True]
    assert resp.model_version == reward.name


@pytest.mark.parametrize("request_items,needle", [
    ([], "at least one"),
    ([("", "")], "both empty"),
    ([("p", "r")] * 9, "exceed the limit of 8"),
])
def test_reward_bad_input_is_invalid_argument(services, request_items, needle):
    rcfg, _, _, _, _ = services
    stub = reward_pb2_grpc.RewardServiceStub(grpc.insecure_channel(f"127.0.0.1:{rcfg.server.port}"))
    with pytest.raises(grpc.RpcError) as e:
        stub.Score(reward_pb2.ScoreRequest(items=[reward_pb2.ScoreItem(prompt=p, response=r)
                                                  for p, r in request_items]))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert needle in e.value.details()
    # and the server keeps serving
    ok = stub.Score(reward_pb2.ScoreRequest(items=[reward_pb2.ScoreItem(prompt="a", response="b")]))
    assert len(ok.results) == 1


@pytest.mark.parametrize("p,r,needle", [
    ([], [1], "prompt_token_ids: must not be empty"),
    ([1], [], "response_token_ids: must not be empty"),
    ([1], [10 ** 6], "outside the vocabulary"),
])
def test_reference_bad_input_is_invalid_argument(services, p, r, needle):
    _, fcfg, _, _, _ = services
    stub = reference_pb2_grpc.ReferenceServiceStub(grpc.insecure_channel(f"127.0.0.1:{fcfg.server.port}"))
    with pytest.raises(grpc.RpcError) as e:
        stub.LogProbs(reference_pb2.LogProbsRequest(items=[
            reference_pb2.LogProbsItem(prompt_token_ids=p, response_token_ids=r)]))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert needle in e.value.details()


def test_metrics_count_requests_by_status(services):
    rcfg, _, _, _, _ = services
    stub = reward_pb2_grpc.RewardServiceStub(grpc.insecure_channel(f"127.0.0.1:{rcfg.server.port}"))
    before = metric_value(scrape(rcfg.server.metrics_port), "rlhf_reward_requests_total",
                          {"method": "Score", "code": "INVALID_ARGUMENT"}) or 0
    with pytest.raises(grpc.RpcError):
        stub.Score(reward_pb2.ScoreRequest())
    text = scrape(rcfg.server.metrics_port)
    assert metric_value(text, "rlhf_reward_requests_total", {"method": "Score", "code": "INVALID_ARGUMENT"}) \
        == before + 1
    assert metric_value(text, "rlhf_reward_request_seconds_count", {"method": "Score"}) >= 1


def _perturbed_copy(src, dst, seed: int):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.save_pretrained(dst)
    AutoTokenizer.from_pretrained(src).save_pretrained(dst)
    return model.eval()


def _ref_logprobs(stub, p, r):
    resp = stub.LogProbs(reference_pb2.LogProbsRequest(items=[
        reference_pb2.LogProbsItem(prompt_token_ids=p, response_token_ids=r)]))
    return resp.reference_version, list(resp.results[0].logprobs)


def _hf_logprobs(model, p, r):
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([p + r])).logits[0], -1)
    return [logp[len(p) - 1 + i, t].item() for i, t in enumerate(r)]


def test_reference_refresh_by_event_then_by_rpc(services, tmp_path):
    import time

    from rlhf.events.v1 import events_pb2
    from rlhf_common.topics import Topics
    from rlhf_common.weights import digest

    _, fcfg, policy, _, bus = services
    stub = reference_pb2_grpc.ReferenceServiceStub(grpc.insecure_channel(f"127.0.0.1:{fcfg.server.port}"))
    p, r = [5, 17, 33], [40, 41, 42]

    m3 = _perturbed_copy(policy, tmp_path / "v3", seed=3)
    prod = Producer(bus, "test")
    # an update for the policy does not move the reference (refresh_every is 0)...
    prod.send(Topics(bus.topic_prefix).weights, "policy", events_pb2.WeightUpdate(
        model_name="policy", version=2, uri=str(tmp_path / "v3"), sha256=digest(tmp_path / "v3")))
    # ...an explicit reference event does
    prod.send(Topics(bus.topic_prefix).weights, "reference", events_pb2.WeightUpdate(
        model_name="reference", version=3, uri=str(tmp_path / "v3"), sha256=digest(tmp_path / "v3")))
    prod.close()
    deadline = time.monotonic() + 30
    while stub.GetVersion(reference_pb2.GetVersionRequest()).version != 3 and time.monotonic() < deadline:
        time.sleep(0.2)
    version, got = _ref_logprobs(stub, p, r)
    assert version == 3
    assert max(abs(a - b) for a, b in zip(got, _hf_logprobs(m3, p, r))) < 1e-5

    m5 = _perturbed_copy(policy, tmp_path / "v5", seed=5)
    with pytest.raises(grpc.RpcError) as e:
        stub.Refresh(reference_pb2.RefreshRequest(uri=str(tmp_path / "v5"), version=2))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "version=2" in e.value.details()
    with pytest.raises(grpc.RpcError) as e:
        stub.Refresh(reference_pb2.RefreshRequest(uri=str(tmp_path / "nowhere"), version=9))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "nowhere" in e.value.details()
    with pytest.raises(grpc.RpcError) as e:
        stub.Refresh(reference_pb2.RefreshRequest(uri=str(tmp_path / "v5"), version=5, sha256="0" * 64))
    assert e.value.code() == grpc.StatusCode.DATA_LOSS
    out = stub.Refresh(reference_pb2.RefreshRequest(uri=str(tmp_path / "v5"), version=5))
    assert out.version == 5
    version, got = _ref_logprobs(stub, p, r)
    assert version == 5
    assert max(abs(a - b) for a, b in zip(got, _hf_logprobs(m5, p, r))) < 1e-5
    text = scrape(fcfg.server.metrics_port)
    assert metric_value(text, "rlhf_reference_refreshes_total", {"trigger": "event", "outcome": "applied"}) == 1
    assert metric_value(text, "rlhf_reference_refreshes_total", {"trigger": "rpc", "outcome": "applied"}) == 1
    assert metric_value(text, "rlhf_reference_version") == 5
