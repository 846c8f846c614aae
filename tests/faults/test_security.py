"""Security: keys on every keyed entry point (REST and gRPC), compared in constant time; gRPC
over TLS; no key or payload in the logs at INFO; images that run as a non-root user."""

from __future__ import annotations

import datetime
import hmac
import ipaddress
import os
import subprocess
import sys
import time
from pathlib import Path

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from rlhf.feedback.v1 import feedback_pb2, feedback_pb2_grpc
from rlhf.reward.v1 import reward_pb2, reward_pb2_grpc
from rlhf_common import auth
from rlhf_devstack.stack import free_port
from rlhf_feedback.config import FeedbackConfig
from rlhf_reward.config import RewardConfig

from tests.faults.conftest import Row
from tests.helpers import start_service

pytestmark = [pytest.mark.faults]

KEY = "sec-key-7f3a9c21"
MARKER = "payload-marker-5be1d0"


def _cert(tmp: Path) -> tuple[Path, Path]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                        x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    c, k = tmp / "tls.crt", tmp / "tls.key"
    c.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    k.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption()))
    return c, k


@pytest.fixture(scope="module")
def keyed(stack, tmp_path_factory):
    """A reward service with keys and gRPC over TLS, and a feedback service with keys."""
    tmp = tmp_path_factory.mktemp("security")
    crt, key = _cert(tmp)
    reward = RewardConfig(model=str(stack.spec.reward_model), api_keys=KEY, http_port=free_port(),
                          subscribe_weights=False,
                          server={"port": free_port(), "metrics_port": free_port(), "tls_cert_file": str(crt),
                                  "tls_key_file": str(key)})
    feedback = FeedbackConfig(api_keys=KEY, http_port=free_port(), state_dir=str(tmp / "feedback"),
                              server={"port": free_port(), "metrics_port": free_port()})
    env = {**os.environ, **reward.to_env(), **stack.bus.to_env(), "PYTHONUNBUFFERED": "1"}
    log = tmp / "reward.log"
    proc = subprocess.Popen([sys.executable, "-m", "rlhf_reward"], env=env, stdout=open(log, "wb"),
                            stderr=subprocess.STDOUT)
    creds = grpc.ssl_channel_credentials(root_certificates=crt.read_bytes())
    deadline = time.monotonic() + 120
    while True:
        try:
            with grpc.secure_channel(f"127.0.0.1:{reward.server.port}", creds) as ch:
                if health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=2).status == 1:
                    break
        except grpc.RpcError:
            pass
        assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-2000:]
        time.sleep(0.5)
    fb_proc = start_service("rlhf_feedback", feedback, tmp / "feedback.log", stack.bus)
    yield reward, feedback, creds, tmp
    for p in (proc, fb_proc):
        p.terminate()
        p.wait(30)


def _openapi_routes(port: int) -> list[tuple[str, str]]:
    spec = httpx.get(f"http://127.0.0.1:{port}/openapi.json").json()
    return [(m.upper(), path) for path, ops in spec["paths"].items() for m in ops if path.startswith("/v1/")]


def test_every_keyed_entry_point_needs_the_key(keyed, reliability):
    reward, feedback, creds, _ = keyed
    refused = tried = 0
    for cfg in (reward, feedback):
        for method, path in _openapi_routes(cfg.http_port):
            url = f"http://127.0.0.1:{cfg.http_port}{path.replace('{', '').replace('}', '')}"
            for headers in ({}, {"authorization": "Bearer wrong-key-000"}, {"authorization": KEY}):
                r = httpx.request(method, url, headers=headers, json={"items": []})
                tried += 1
                refused += r.status_code == 401
                assert r.status_code == 401, (method, path, headers, r.status_code)
    secure = grpc.secure_channel(f"127.0.0.1:{reward.server.port}", creds)
    plain = grpc.insecure_channel(f"127.0.0.1:{feedback.server.port}")
    calls = [lambda md: reward_pb2_grpc.RewardServiceStub(secure).Score(
                 reward_pb2.ScoreRequest(items=[reward_pb2.ScoreItem(prompt="a", response=MARKER)]), metadata=md,
                 timeout=30),
             lambda md: reward_pb2_grpc.RewardServiceStub(secure).GetModelInfo(reward_pb2.GetModelInfoRequest(),
                                                                                metadata=md, timeout=30),
             lambda md: feedback_pb2_grpc.FeedbackServiceStub(plain).GetStats(feedback_pb2.GetStatsRequest(),
                                                                               metadata=md, timeout=30)]
    for call in calls:
        for md in ((), (("authorization", "Bearer wrong-key-000"),)):
            tried += 1
            with pytest.raises(grpc.RpcError) as e:
                call(md)
            assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
            refused += 1
        call((("authorization", f"Bearer {KEY}"),))
    # With the key, REST works (the payload marker is sent, for the log check below).
    r = httpx.post(f"http://127.0.0.1:{reward.http_port}/v1/score", headers={"authorization": f"Bearer {KEY}"},
                   json={"items": [{"prompt": MARKER, "response": MARKER}]})
    assert r.status_code == 200
    reliability(Row("requests without a valid key, REST and gRPC, reward and feedback", tried, 0, 0, 0, 0, refused,
                    note="every one refused: 401 over REST, UNAUTHENTICATED over gRPC"))


def test_grpc_tls_refuses_plaintext(keyed):
    reward, _, creds, _ = keyed
    with grpc.insecure_channel(f"127.0.0.1:{reward.server.port}") as ch:
        with pytest.raises(grpc.RpcError) as e:
            health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE


def test_keys_compared_against_every_key_in_constant_time(monkeypatch):
    calls = []
    real = hmac.compare_digest

    def spy(a, b):
        calls.append((len(a), len(b)))
        return real(a, b)

    monkeypatch.setattr(auth.hmac, "compare_digest", spy)
    keys = auth.ApiKeys(["first-key-001", "second-key-2", "a-much-longer-third-key-0003"])
    keys.check("Bearer first-key-001")  # matches the first: the others are still compared
    with pytest.raises(auth.Unauthenticated):
        keys.check("Bearer x")
    assert len(calls) == 6 and {n for pair in calls for n in pair} == {32}  # equal lengths: digests


def test_no_key_or_payload_in_the_logs(keyed, stack):
    _, _, _, tmp = keyed
    logs = [tmp / "reward.log", tmp / "feedback.log", *Path(stack.spec.run_dir).glob("*.log")]
    for path in logs:
        text = path.read_text(errors="replace")
        assert KEY not in text, path
        assert MARKER not in text, path


def test_images_run_as_a_non_root_user():
    dockerfile = (Path(__file__).parents[2] / "deploy/k8s/Dockerfile").read_text()
    users = [line.split()[1] for line in dockerfile.splitlines() if line.startswith("USER ")]
    assert users and users[-1] not in ("0", "root"), users
