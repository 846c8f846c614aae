"""Traffic and accounting shared by the fault tests: prompts seeded into the loop, answers
served through the policy API and rated through the feedback API (each retried the way a
client would, with the same idempotency key), and what came out the other end."""

from __future__ import annotations

import collections
import contextlib
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import httpx

from rlhf.events.v1 import events_pb2
from rlhf.policy.v1 import policy_pb2, policy_pb2_grpc
from rlhf_common.bus import Producer
from rlhf_common.topics import Topics
from rlhf_devstack.models import tiny_prompts
from rlhf_feedback.join import label_id
from rlhf_trainer.checkpoint import CheckpointStore

from tests.helpers import read_topic


@dataclass
class Traffic:
    """What was sent, and how many errors the senders saw before a send went through."""

    st: object
    prompts: list[str] = field(default_factory=list)
    feedback: list[str] = field(default_factory=list)
    errors: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)
    _n: int = 0

    def seed(self, n: int = 1, deadline_s: float = 120.0) -> None:
        """Put n prompts on rlhf.prompts (retrying while the broker is away)."""
        for _ in range(n):
            with self.lock:
                self._n += 1
                text = tiny_prompts(1, seed=10_000 + self._n)[0]
            pid = f"fault-{uuid.uuid4().hex}"
            rec = events_pb2.Prompt(prompt_id=pid, text=text, source="faults")
            self._retry(lambda: self._send_prompt(pid, rec), deadline_s)
            with self.lock:
                self.prompts.append(pid)

    def _send_prompt(self, pid: str, rec) -> None:
        p = Producer(self.st.bus, client_id="fault-seeder", timeout_s=5)
        try:
            p.send(Topics(self.st.bus.topic_prefix).prompts, pid, rec)
        finally:
            p.close()

    def serve_and_rate(self, deadline_s: float = 180.0) -> None:
        """One answer through the policy API, then a thumb on it through the feedback API."""
        stub = policy_pb2_grpc.PolicyServiceStub(grpc.insecure_channel(self.st.addrs["policy"]))
        req = policy_pb2.GenerateRequest(prompt=tiny_prompts(1, seed=20_000 + len(self.feedback))[0],
                                         sampling=policy_pb2.SamplingParams(temperature=1.0, max_tokens=8))
        answer = self._retry(lambda: stub.Generate(req, timeout=30), deadline_s)
        fid = f"fault-{uuid.uuid4().hex}"
        item = {"feedback_id": fid, "generation_id": answer.completions[0].generation_id, "thumb": "up"}
        port = self.st.configs["feedback"].http_port

        def post():
            r = httpx.post(f"http://127.0.0.1:{port}/v1/feedback", json={"items": [item]}, timeout=30)
            if r.status_code != 200:
                raise RuntimeError(f"{r.status_code}: {r.text[:200]}")

        self._retry(post, deadline_s)
        with self.lock:
            self.feedback.append(fid)

    def _retry(self, fn, deadline_s: float):
        deadline = time.monotonic() + deadline_s
        while True:
            try:
                return fn()
            except Exception:
                with self.lock:
                    self.errors += 1
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)


@contextlib.contextmanager
def running(traffic: Traffic, clients: int = 1):
    """Clients that each send a prompt and rate a served answer every half second until the
    block ends; a client that gave up (its retries ran out) fails the block."""
    stop = threading.Event()
    failures: list[BaseException] = []

    def client():
        try:
            while not stop.is_set():
                traffic.seed(1)
                traffic.serve_and_rate()
                time.sleep(0.5)
        except BaseException as e:
            failures.append(e)

    threads = [threading.Thread(target=client, daemon=True) for _ in range(clients)]
    for th in threads:
        th.start()
    try:
        yield
    finally:
        stop.set()
        for th in threads:
            th.join(600)
    assert not failures, failures


def trained(st) -> tuple[list[str], list[str]]:
    """From the trainer's latest training state: the prompts whose groups it took, and the
    rollouts it trained on (in order, repeats kept)."""
    state = CheckpointStore(Path(st.spec.run_dir) / "weights" / "policy-trainer-state").latest()
    if state is None:
        return [], []
    return list(state.extra.get("done_prompts", [])), list(state.trained_ids)


def wait_trained(st, prompts: list[str], timeout_s: float = 300.0) -> tuple[list[str], list[str]]:
    deadline = time.monotonic() + timeout_s
    while True:
        done, ids = trained(st)
        if set(prompts) <= set(done) or time.monotonic() > deadline:
            return done, ids
        time.sleep(1.0)


def labels_of(st, feedback: list[str], timeout_s: float = 180.0) -> list[events_pb2.Label]:
    want = {label_id(f) for f in feedback}
    return read_topic(st.bus, Topics(st.bus.topic_prefix).labels, events_pb2.Label,
                      until=lambda ls: want <= {x.label_id for x in ls}, timeout_s=timeout_s)


def dead_letters(st, timeout_s: float = 5.0) -> list[events_pb2.DeadLetter]:
    return read_topic(st.bus, Topics(st.bus.topic_prefix).dlq, events_pb2.DeadLetter, until=lambda ds: False,
                      timeout_s=timeout_s)


def account(st, traffic: Traffic, fault: str, reliability, note: str = "") -> None:
    """Once the stack is healthy again: every prompt sent was trained exactly once, every
    feedback item sent became exactly one label; records the row and asserts it."""
    from tests.faults.conftest import Row

    prompts, feedback = traffic.prompts, traffic.feedback
    for name in st.spec.services:
        st.wait_healthy(name, 300)
    Traffic(st).seed(1)  # a partner for a last odd group (steps take groups two at a time)
    done, ids = wait_trained(st, prompts)
    taken = collections.Counter(done)
    lost_prompts = [p for p in prompts if taken[p] == 0]
    twice = [p for p in prompts if taken[p] > 1]
    dup_rollouts = len(ids) - len(set(ids))
    labels = labels_of(st, feedback) if feedback else []
    per_label: dict[str, set[bytes]] = collections.defaultdict(set)
    sends = collections.Counter(x.label_id for x in labels)
    for x in labels:
        per_label[x.label_id].add(x.SerializeToString(deterministic=True))
    lost_fb = [f for f in feedback if not per_label[label_id(f)]]
    # Two different labels for one feedback item would be a duplicate. The same label sent
    # again (a kill between the broker's acknowledgement and the join's commit: labels are
    # sent at least once) is one label: every consumer of rlhf.labels drops repeats by id.
    dup_fb = sum(len(per_label[label_id(f)]) - 1 for f in feedback if len(per_label[label_id(f)]) > 1)
    resent = sum(sends[label_id(f)] - 1 for f in feedback if sends[label_id(f)] > 1)
    if resent:
        note = f"{note}; " if note else ""
        note += f"{resent} label record(s) sent again after a kill, byte for byte (dropped by id downstream)"
    reliability(Row(fault, len(prompts) + len(feedback), len(prompts) - len(lost_prompts) + len(feedback)
                    - len(lost_fb), 0, len(lost_prompts) + len(lost_fb), len(twice) + dup_rollouts + dup_fb,
                    traffic.errors, note))
    assert not lost_prompts and not twice and dup_rollouts == 0, (lost_prompts, twice, dup_rollouts)
    assert not lost_fb and dup_fb == 0, (lost_fb, dup_fb)
