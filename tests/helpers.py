"""Helpers shared by the integration and e2e tests."""

from __future__ import annotations

import time
import urllib.request
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
