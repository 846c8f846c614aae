"""60 s of concurrent clients on the reward API (REST and gRPC), on policy streams and on the
feedback API, all at once: errors, p50/p99 latency, and each service's memory before and
after, so that a leak would show."""

from __future__ import annotations

import threading
import time
import uuid

import grpc
import httpx
import pytest

from rlhf.policy.v1 import policy_pb2, policy_pb2_grpc
from rlhf.reward.v1 import reward_pb2, reward_pb2_grpc
from rlhf_devstack.models import tiny_prompts

from tests.faults.conftest import Row

pytestmark = [pytest.mark.faults, pytest.mark.slow]

SECONDS = 60.0
PROMPTS = tiny_prompts(32, seed=99)


def _rss_mb(pid: int) -> float:
    """Resident memory of a process and its children (vLLM runs its engine in a child)."""
    total = 0
    pids = [pid]
    try:
        for line in open(f"/proc/{pid}/task/{pid}/children").read().split():
            pids.append(int(line))
    except OSError:
        pass
    for p in pids:
        try:
            for line in open(f"/proc/{p}/status"):
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total / 1024


class Client(threading.Thread):
    def __init__(self, name: str, call, until: float):
        super().__init__(name=name, daemon=True)
        self.call, self.until = call, until
        self.latencies: list[float] = []
        self.errors: list[str] = []

    def run(self):
        i = 0
        while time.monotonic() < self.until:
            t0 = time.perf_counter()
            try:
                self.call(i)
                self.latencies.append(time.perf_counter() - t0)
            except Exception as e:  # counted, never fatal
                self.errors.append(f"{type(e).__name__}: {str(e)[:120]}")
            i += 1


def _p(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")


def test_sixty_seconds_of_concurrent_clients(stack, reliability):
    services = ("reward", "policy", "feedback")
    before = {s: _rss_mb(stack.procs[s].pid) for s in services}
    reward_url = f"http://127.0.0.1:{stack.configs['reward'].http_port}/v1/score"
    feedback_url = f"http://127.0.0.1:{stack.configs['feedback'].http_port}/v1/feedback"
    reward = reward_pb2_grpc.RewardServiceStub(grpc.insecure_channel(stack.addrs["reward"]))
    policy = policy_pb2_grpc.PolicyServiceStub(grpc.insecure_channel(stack.addrs["policy"]))
    http = httpx.Client(timeout=30)
    answers: list[str] = []

    def reward_rest(i):
        r = http.post(reward_url, json={"items": [{"prompt": PROMPTS[i % 32], "response": PROMPTS[(i + 1) % 32]}] * 4})
        r.raise_for_status()

    def reward_grpc(i):
        reward.Score(reward_pb2.ScoreRequest(items=[reward_pb2.ScoreItem(prompt=PROMPTS[i % 32], response="ok")] * 4),
                     timeout=30)

    def policy_stream(i):
        chunks = list(policy.GenerateStream(policy_pb2.GenerateRequest(
            prompt=PROMPTS[i % 32], sampling=policy_pb2.SamplingParams(temperature=1.0, max_tokens=8)), timeout=60))
        gid = next((c.generation_id for c in chunks if c.generation_id), "")
        if gid:
            answers.append(gid)

    def feedback(i):
        if not answers:
            time.sleep(0.05)
            return
        r = http.post(feedback_url, json={"items": [{"feedback_id": f"load-{uuid.uuid4().hex}",
                                                     "generation_id": answers[i % len(answers)], "thumb": "up"}]})
        r.raise_for_status()

    until = time.monotonic() + SECONDS
    clients = ([Client("reward-rest", reward_rest, until) for _ in range(3)]
               + [Client("reward-grpc", reward_grpc, until) for _ in range(3)]
               + [Client("policy-stream", policy_stream, until) for _ in range(4)]
               + [Client("feedback", feedback, until) for _ in range(2)])
    for c in clients:
        c.start()
    for c in clients:
        c.join(SECONDS + 120)
    http.close()
    after = {s: _rss_mb(stack.procs[s].pid) for s in services}
    kinds = {}
    for c in clients:
        k = kinds.setdefault(c.name, {"lat": [], "errors": []})
        k["lat"] += c.latencies
        k["errors"] += c.errors
    n = sum(len(k["lat"]) + len(k["errors"]) for k in kinds.values())
    errors = sum(len(k["errors"]) for k in kinds.values())
    summary = "; ".join(f"{name}: {len(k['lat'])} ok, {len(k['errors'])} errors, p50 {_p(k['lat'], .5) * 1000:.0f} ms, "
                        f"p99 {_p(k['lat'], .99) * 1000:.0f} ms" for name, k in kinds.items())
    memory = ", ".join(f"{s} {before[s]:.0f}→{after[s]:.0f} MB" for s in services)
    reliability(Row(f"load: {len(clients)} concurrent clients for {SECONDS:.0f} s (reward REST and gRPC, policy "
                    "streams, feedback)", n, n - errors, 0, 0, 0, errors, note=f"{summary}; memory {memory}"))
    print(summary, memory)
    assert errors == 0, {name: k["errors"][:3] for name, k in kinds.items() if k["errors"]}
    assert all(len(k["lat"]) >= 10 for k in kinds.values()), {name: len(k["lat"]) for name, k in kinds.items()}
    for s in services:  # a leak of a request's worth per request would show far above this
        assert after[s] - before[s] < 300, (s, before[s], after[s])
