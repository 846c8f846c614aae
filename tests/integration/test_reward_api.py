"""The reward service's REST and gRPC APIs, against the real process on loopback ports."""

from __future__ import annotations

import json

import grpc
import httpx
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from rlhf.reward.v1 import reward_pb2, reward_pb2_grpc
from rlhf_reward.config import RewardConfig
from rlhf_devstack.stack import free_port

from tests.helpers import metric_value, scrape
from tests.integration.reward_helpers import start_reward, stop

pytestmark = pytest.mark.integration

KEYS = "test-key-0001,test-key-0002"
MAX_BODY = 4096


def _cfg(reward, **kw) -> RewardConfig:
    return RewardConfig(server={"port": free_port(), "metrics_port": free_port()}, model=str(reward),
                        http_port=free_port(), max_length=24, max_batch_items=8, max_body_bytes=MAX_BODY,
                        max_item_chars=2000, max_request_tokens=120, subscribe_weights=False, **kw)


@pytest.fixture(scope="module")
def open_service(tiny_models, tmp_path_factory):
    cfg = _cfg(tiny_models[1])
    proc = start_reward(cfg, tmp_path_factory.mktemp("logs") / "reward-open.log")
    yield cfg
    assert stop(proc) == 0


@pytest.fixture(scope="module")
def keyed_service(tiny_models, tmp_path_factory):
    cfg = _cfg(tiny_models[1], api_keys=KEYS)
    proc = start_reward(cfg, tmp_path_factory.mktemp("logs") / "reward-keyed.log")
    yield cfg
    assert stop(proc) == 0


def _url(cfg, path):
    return f"http://127.0.0.1:{cfg.http_port}{path}"


def _stub(cfg):
    return reward_pb2_grpc.RewardServiceStub(grpc.insecure_channel(f"127.0.0.1:{cfg.server.port}"))


GOOD = {"items": [{"prompt": "Tell me about the cat.", "response": " The cat sings."}]}


def _chunks(n):
    for _ in range(n):
        yield b" " * 1024


# (name, path, how the body is sent, body, status, words the message must hold)
BAD_REST = [
    ("no items", "/v1/score", "json", {"items": []}, 400, "at least one"),
    ("empty text", "/v1/score", "json", {"items": [{"prompt": " ", "response": ""}]}, 400, "both empty"),
    ("too many items", "/v1/score", "json", {"items": [{"prompt": "p", "response": "r"}] * 9}, 400,
     "9 items exceed the limit of 8"),
    ("body over the limit", "/v1/score", "json",
     {"items": [{"prompt": "p" * (MAX_BODY + 10), "response": "r"}]}, 413, "exceeds the limit of 4096 bytes"),
    ("chunked body over the limit", "/v1/score", "stream", None, 413, "exceeds the limit of 4096 bytes"),
    ("invalid UTF-8 bytes", "/v1/score", "raw", b'{"items": [{"prompt": "\xff\xfe", "response": "r"}]}', 400,
     "not valid UTF-8"),
    ("lone surrogate", "/v1/score", "raw", b'{"items": [{"prompt": "\\ud800", "response": "r"}]}', 400,
     "items[0].prompt: not valid UTF-8"),
    ("wrong type", "/v1/score", "json", {"items": [{"prompt": 17, "response": "r"}]}, 400,
     "items.0.prompt: Input should be a valid string"),
    ("items not a list", "/v1/score", "json", {"items": "p"}, 400, "items: Input should be a valid list"),
    ("missing field", "/v1/score", "json", {"items": [{"prompt": "p"}]}, 400, "items.0.response: Field required"),
    ("unknown field", "/v1/score", "json", {"items": [], "temperature": 1}, 400,
     "temperature: Extra inputs are not permitted"),
    ("not JSON", "/v1/score", "raw", b"{items: nope", 400, "JSON decode error"),
    ("item over the character limit", "/v1/score", "json", {"items": [{"prompt": "p" * 2100, "response": "r"}]},
     400, "2101 characters of prompt and response exceed the limit of 2000"),
    ("request over the token limit", "/v1/score", "json", {"items": [{"prompt": "word " * 40, "response": "r"}] * 8},
     400, "exceed the limit of 120 per request"),
    ("compare missing response", "/v1/compare", "json", {"prompt": "p", "response_a": "a"}, 400,
     "response_b: Field required"),
    ("compare empty text", "/v1/compare", "json", {"prompt": "", "response_a": "", "response_b": "b"}, 400,
     "items[0]: prompt and response are both empty"),
]


@pytest.mark.parametrize("name,path,how,body,status,needle", BAD_REST, ids=[c[0] for c in BAD_REST])
def test_rest_bad_input_gets_a_clear_4xx_and_the_server_keeps_serving(open_service, name, path, how, body,
                                                                        status, needle):
    url = _url(open_service, path)
    headers = {"content-type": "application/json"}
    if how == "json":
        r = httpx.post(url, content=json.dumps(body).encode(), headers=headers)
    elif how == "raw":
        r = httpx.post(url, content=body, headers=headers)
    else:
        r = httpx.post(url, content=_chunks(8), headers=headers)  # no Content-Length: chunked
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["status"] == status and needle in err["message"], err
    ok = httpx.post(_url(open_service, "/v1/score"), json=GOOD)
    assert ok.status_code == 200 and len(ok.json()["results"]) == 1


def _raw_score(cfg, payload: bytes):
    ch = grpc.insecure_channel(f"127.0.0.1:{cfg.server.port}")
    call = ch.unary_unary("/rlhf.reward.v1.RewardService/Score", request_serializer=lambda b: b,
                          response_deserializer=reward_pb2.ScoreResponse.FromString)
    return call(payload)


def _score_request(items):
    return reward_pb2.ScoreRequest(items=[reward_pb2.ScoreItem(prompt=p, response=r) for p, r in items])


# ScoreItem{prompt = b"\xff\xfe"} inside ScoreRequest.items, hand-encoded: bytes protobuf refuses as a string.
_BAD_UTF8 = bytes([0x0A, 0x04, 0x0A, 0x02, 0xFF, 0xFE])
_GOOD_ITEM = reward_pb2.ScoreRequest(items=[reward_pb2.ScoreItem(prompt="a", response="b")]).SerializeToString()
# Field 99 (varint) that ScoreRequest does not define.
_UNKNOWN_FIELD = _GOOD_ITEM + b"\x98\x06\x01"
# items[0].prompt (field 1, a string) sent as a number: protobuf would drop it and score "".
_WRONG_WIRE_TYPE = bytes([0x0A, 0x05, 0x08, 0x05, 0x12, 0x01, 0x62])

BAD_GRPC = [
    ("no items", lambda s, c: s.Score(_score_request([])), "at least one"),
    ("empty text", lambda s, c: s.Score(_score_request([("", "  ")])), "both empty"),
    ("too many items", lambda s, c: s.Score(_score_request([("p", "r")] * 9)), "exceed the limit of 8"),
    ("invalid UTF-8", lambda s, c: _raw_score(c, _BAD_UTF8), "not UTF-8"),
    ("unknown field", lambda s, c: _raw_score(c, _UNKNOWN_FIELD), "unknown field or wrong wire type at #99"),
    ("wrong wire type", lambda s, c: _raw_score(c, _WRONG_WIRE_TYPE), "wrong wire type at items[0].#1"),
    ("item over the character limit", lambda s, c: s.Score(_score_request([("p" * 2500, "r")])),
     "exceed the limit of 2000"),
    ("request over the token limit", lambda s, c: s.Score(_score_request([("word " * 40, "r")] * 8)),
     "exceed the limit of 120 per request"),
    ("compare empty text", lambda s, c: s.Compare(reward_pb2.CompareRequest(prompt="", response_a="",
                                                                            response_b="b")), "both empty"),
]


@pytest.mark.parametrize("name,call,needle", BAD_GRPC, ids=[c[0] for c in BAD_GRPC])
def test_grpc_bad_input_is_invalid_argument_and_the_server_keeps_serving(open_service, name, call, needle):
    stub = _stub(open_service)
    with pytest.raises(grpc.RpcError) as e:
        call(stub, open_service)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert needle in e.value.details()
    assert len(stub.Score(_score_request([("a", "b")])).results) == 1


def test_rest_and_grpc_give_identical_scores(open_service, tiny_models):
    items = [("Tell me about the cat.", " The cat sings."), ("Hi", ""), ("Explain why " * 20, "because"),
             ("Write a short poem about the sun.", " Sun, warm and bright, the day is long.")]
    rest = httpx.post(_url(open_service, "/v1/score"),
                      json={"items": [{"prompt": p, "response": r} for p, r in items]}).json()
    grpc_resp = _stub(open_service).Score(_score_request(items))
    assert rest["model_version"] == grpc_resp.model_version == tiny_models[1].name
    # gRPC carries float32; REST the same float32 value as a JSON number.
    assert [np.float32(x["score"]) for x in rest["results"]] == [np.float32(x.score) for x in grpc_resp.results]
    assert [x["truncated"] for x in rest["results"]] == [x.truncated for x in grpc_resp.results] \
        == [False, False, True, False]
    rc = httpx.post(_url(open_service, "/v1/compare"),
                    json={"prompt": items[0][0], "response_a": items[0][1], "response_b": items[3][1]}).json()
    gc = _stub(open_service).Compare(reward_pb2.CompareRequest(prompt=items[0][0], response_a=items[0][1],
                                                              response_b=items[3][1]))
    assert (np.float32(rc["score_a"]), np.float32(rc["score_b"])) == (gc.score_a, gc.score_b)
    assert rc["prob_a_preferred"] == gc.prob_a_preferred
    assert 0 < gc.prob_a_preferred < 1


def test_model_info_exposes_running_reward_stats(open_service):
    stub = _stub(open_service)
    before = stub.GetModelInfo(reward_pb2.GetModelInfoRequest())
    scores = [r.score for r in stub.Score(_score_request([("a", "b"), ("c", "d"), ("e", "f")])).results]
    info = stub.GetModelInfo(reward_pb2.GetModelInfoRequest())
    assert info.reward_count == before.reward_count + 3
    assert info.max_length == 24 and info.max_batch_items == 8 and info.version_number == -1
    rest = httpx.get(_url(open_service, "/v1/model")).json()
    assert rest["reward"]["count"] == info.reward_count
    assert rest["reward"]["mean"] == pytest.approx(info.reward_mean)
    assert np.isfinite(info.reward_std) and info.reward_std >= 0
    text = scrape(open_service.server.metrics_port)
    assert metric_value(text, "rlhf_reward_score_samples") == info.reward_count
    assert len(scores) == 3


def test_docs_health_and_metrics_pages(open_service):
    assert httpx.get(_url(open_service, "/docs")).status_code == 200
    spec = httpx.get(_url(open_service, "/openapi.json")).json()
    assert {"/v1/score", "/v1/compare", "/v1/model", "/healthz", "/metrics"} <= set(spec["paths"])
    assert httpx.get(_url(open_service, "/healthz")).json()["status"] == "serving"
    httpx.post(_url(open_service, "/v1/score"), json={"items": []})
    text = httpx.get(_url(open_service, "/metrics")).text
    assert metric_value(text, "rlhf_reward_http_requests_total", {"route": "/v1/score", "status": "400"}) >= 1
    assert metric_value(text, "rlhf_reward_http_request_seconds_count", {"route": "/v1/score"}) >= 1
    assert metric_value(text, "rlhf_reward_batch_items_count") >= 1


@pytest.mark.parametrize("headers,status", [
    ({}, 401),
    ({"authorization": "Bearer wrong-key-0000"}, 401),
    ({"authorization": "Basic test-key-0001"}, 401),
    ({"authorization": "Bearer test-key-0001"}, 200),
    ({"authorization": "bearer test-key-0002"}, 200),
])
def test_rest_auth(keyed_service, headers, status):
    for path, body in (("/v1/score", GOOD),
                       ("/v1/compare", {"prompt": "p", "response_a": "a", "response_b": "b"})):
        r = httpx.post(_url(keyed_service, path), json=body, headers=headers)
        assert r.status_code == status, r.text
        if status == 401:
            assert r.headers["www-authenticate"] == "Bearer"
            assert r.json()["error"]["status"] == 401
    assert httpx.get(_url(keyed_service, "/v1/model"), headers=headers).status_code == status


def test_rest_health_and_metrics_stay_open(keyed_service):
    assert httpx.get(_url(keyed_service, "/healthz")).status_code == 200
    assert httpx.get(_url(keyed_service, "/metrics")).status_code == 200
    assert metric_value(scrape(keyed_service.server.metrics_port), "rlhf_reward_scored_items_total") is not None


@pytest.mark.parametrize("metadata,ok", [
    (None, False),
    ((("authorization", "Bearer wrong-key-0000"),), False),
    ((("authorization", "test-key-0001"),), False),
    ((("authorization", "Bearer test-key-0002"),), True),
])
def test_grpc_auth(keyed_service, metadata, ok):
    stub = _stub(keyed_service)
    calls = [lambda: stub.Score(_score_request([("a", "b")]), metadata=metadata),
             lambda: stub.GetModelInfo(reward_pb2.GetModelInfoRequest(), metadata=metadata)]
    for call in calls:
        if ok:
            call()
        else:
            with pytest.raises(grpc.RpcError) as e:
                call()
            assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_grpc_health_stays_open_and_rejections_are_counted(keyed_service):
    ch = grpc.insecure_channel(f"127.0.0.1:{keyed_service.server.port}")
    r = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=""))
    assert r.status == health_pb2.HealthCheckResponse.SERVING
    before = metric_value(scrape(keyed_service.server.metrics_port), "rlhf_reward_requests_total",
                          {"method": "Score", "code": "UNAUTHENTICATED"}) or 0
    with pytest.raises(grpc.RpcError):
        _stub(keyed_service).Score(_score_request([("a", "b")]))
    assert metric_value(scrape(keyed_service.server.metrics_port), "rlhf_reward_requests_total",
                        {"method": "Score", "code": "UNAUTHENTICATED"}) == before + 1


def test_grpc_request_over_the_byte_limit_is_refused_unread(open_service):
    stub = _stub(open_service)
    with pytest.raises(grpc.RpcError) as e:
        stub.Score(_score_request([("p" * 1000, "r")] * 5))  # over MAX_BODY bytes
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert len(stub.Score(_score_request([("a", "b")])).results) == 1


def test_two_credentials_are_refused_by_both_transports(keyed_service):
    two = (("authorization", "Bearer test-key-0001"), ("authorization", "Bearer wrong-key-0000"))
    for metadata in (two, tuple(reversed(two))):
        with pytest.raises(grpc.RpcError) as e:
            _stub(keyed_service).Score(_score_request([("a", "b")]), metadata=metadata)
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED and "2 authorization headers" in e.value.details()
        r = httpx.post(_url(keyed_service, "/v1/score"), json=GOOD, headers=httpx.Headers(list(metadata)))
        assert r.status_code == 401 and "2 authorization headers" in r.json()["error"]["message"]


def test_rest_authenticates_before_it_reads_the_body(keyed_service):
    for body in (b"{not json", b'{"items": [], "extra": 1}', b"x" * (MAX_BODY + 1)):
        r = httpx.post(_url(keyed_service, "/v1/score"), content=body, headers={"content-type": "application/json"})
        assert r.status_code == 401, (body[:20], r.text)


def test_trailing_slash_is_not_redirected(open_service):
    r = httpx.post(_url(open_service, "/v1/score/"), json=GOOD, headers={"host": "evil.example"})
    assert r.status_code == 404 and "location" not in r.headers


def test_config_error_is_one_line_naming_the_variable(tiny_models):
    import os
    import subprocess
    import sys

    env = {**os.environ, "RLHF_REWARD_MODEL": str(tiny_models[1]), "RLHF_REWARD_API_KEYS": "short"}
    p = subprocess.run([sys.executable, "-m", "rlhf_reward"], env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in p.stderr, p.stderr
    assert lines[0].startswith("rlhf_reward: configuration error: RLHF_REWARD_API_KEYS='<key #1 of 1>'"), lines
