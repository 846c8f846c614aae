"""Helpers shared by the integration and e2e tests."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Callable, TypeVar

from google.protobuf.message import Message

from rlhf_common.bus import Consumer
from rlhf_common.config import BusConfig

M = TypeVar("M", bound=Message)


def read_topic(bus: BusConfig, topic: str, record_type: type[M], until: Callable[[list[M]], bool],
               timeout_s: float = 60.0) -> list[M]:
    """Read a topic from the beginning until `until(records)` holds or the time runs out."""
    c = Consumer(bus, topic, record_type, group_id=None, client_id=f"test-reader-{topic}")
    out: list[M] = []
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline and not until(out):
            out.extend(r.record for r in c.poll(timeout_ms=200, max_records=500))
    finally:
        c.close()
    return out


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        return r.read().decode()


def metric_value(text: str, name: str, labels: dict[str, str] | None = None) -> float | None:
    """Value of one sample in Prometheus text format."""
    from prometheus_client.parser import text_string_to_metric_families

    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in (labels or {}).items()):
                return s.value
    return None


def run_until_steps(st, steps: int, timeout_s: float = 300.0):
    """Wait until the stack's trainer has made `steps` steps and the policy serves the
    version it published. Returns (trainer status, trainer stub, policy stub)."""
    import grpc

    from rlhf.policy.v1 import policy_pb2, policy_pb2_grpc
    from rlhf.trainer.v1 import trainer_pb2, trainer_pb2_grpc

    trainer = trainer_pb2_grpc.TrainerServiceStub(grpc.insecure_channel(st.addrs["trainer"]))
    policy = policy_pb2_grpc.PolicyServiceStub(grpc.insecure_channel(st.addrs["policy"]))
    deadline = time.monotonic() + timeout_s
    status = trainer.Status(trainer_pb2.StatusRequest())
    while status.step < steps and time.monotonic() < deadline:
        time.sleep(0.5)
        status = trainer.Status(trainer_pb2.StatusRequest())
    # the policy applies the last update shortly after the trainer publishes it
    while (policy.GetVersion(policy_pb2.GetVersionRequest()).version < status.version
           and time.monotonic() < deadline):
        time.sleep(0.2)
    return status, trainer, policy


def start_service(module: str, cfg, log_path: Path, bus: BusConfig | None = None) -> subprocess.Popen:
    """Start `python -m <module>` with the config's env vars; return once gRPC health says
    SERVING and, for a service with a REST port, /healthz answers."""
    import httpx

    from rlhf_devstack.stack import wait_healthy

    env = {**os.environ, **cfg.to_env(), "PYTHONUNBUFFERED": "1"}
    if bus is not None:
        env.update(bus.to_env())
    log = open(log_path, "wb")
    proc = subprocess.Popen([sys.executable, "-m", module], env=env, stdout=log, stderr=subprocess.STDOUT)
    wait_healthy(f"127.0.0.1:{cfg.server.port}", 120, proc, log_path)
    deadline = time.monotonic() + 30
    while getattr(cfg, "http_port", 0):  # REST starts before gRPC, so this is normally immediate
        try:
            if httpx.get(f"http://127.0.0.1:{cfg.http_port}/healthz", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            proc.terminate()
            raise TimeoutError(f"REST on {cfg.http_port} not healthy:\n{log_path.read_text()[-3000:]}")
        time.sleep(0.2)
    return proc
