"""Runs every benchmark at a tiny size and checks what each wrote, so that none of them rots.

    .venv/bin/python bench/smoke.py [--out .run/bench-smoke] [--only loop,reward]

The numbers of a smoke run mean nothing (seconds of work on tiny models); what is checked is
that each benchmark runs end to end on the real components and writes finite, positive
results and non-empty plots. `make bench-smoke` runs it (CI does, after `make test`).
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]


def _finite_positive(value, what: str) -> None:
    if not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise AssertionError(f"{what} = {value!r}, expected a finite positive number")


def _png(path: Path) -> None:
    if not path.is_file() or path.stat().st_size < 1000 or path.read_bytes()[:8] != b"\x89PNG\r\n\x1a\n":
        raise AssertionError(f"{path}: missing or not a PNG image with content")


def _json(path: Path) -> dict:
    if not path.is_file():
        raise AssertionError(f"{path} was not written")
    return json.loads(path.read_text())


def check_loop(out: Path) -> None:
    r = _json(out / "loop.json")
    for side in ("ours", "trl"):
        _finite_positive(r["sides"][side]["steps"], f"loop: {side} steps")
        _finite_positive(r["sides"][side]["generated_tokens_per_s"], f"loop: {side} generated tokens/s")
    _finite_positive(r["sides"]["limit"]["limit_s_per_step"], "loop: the machine's limit, s/step")
    for k, v in r["ratios"].items():
        _finite_positive(v, f"loop: ratio {k}")
    _finite_positive(r["sides"]["ours"]["phase_s_per_step"]["training"], "loop: training s/step")
    _finite_positive(r["sides"]["ours"]["policy_rollout_s_per_step"]["generate"], "loop: generate s/step")
    _png(out / "loop.png")


def check_scaling(out: Path) -> None:
    r = _json(out / "scaling.json")
    if not r["points"]:
        raise AssertionError("scaling: no point measured")
    for p in r["points"]:
        _finite_positive(p["s_per_step"], "scaling: s/step")
        _finite_positive(p["phase_s_per_step"]["training"], "scaling: training s/step")
    _png(out / "scaling.png")


def check_policy(out: Path) -> None:
    r = _json(out / "policy.json")
    for k, v in r["throughput_ratio_service_over_raw"].items():
        _finite_positive(v, f"policy: throughput ratio {k}")
    _finite_positive(min(r["weight_sync_full_s"]), "policy: full weight sync seconds")
    _finite_positive(min(r["weight_sync_lora_s"]), "policy: LoRA weight sync seconds")


def check_active(out: Path) -> None:
    r = _json(out / "active" / "results.json")
    acc = r["full_pool_accuracy"]
    if not 0 < acc <= 1:
        raise AssertionError(f"active: full-pool accuracy {acc!r} outside (0, 1]")
    _png(out / "active" / "curve.png")


def check_feedback(out: Path) -> None:
    r = _json(out / "feedback" / "results.json")
    if not r["phases"]:
        raise AssertionError("feedback: no phase measured")
    for p in r["phases"]:
        if p["failed"] or p["missing_labels"]:
            raise AssertionError(f"feedback: {p['phase']}: {p['failed']} failed, {p['missing_labels']} labels missing")
        _finite_positive(p["labels_per_s"], f"feedback: {p['phase']} labels/s")
    _png(out / "feedback" / "results.png")


def check_sync(out: Path) -> None:
    r = _json(out / "sync.json")
    for size, x in r["sizes"].items():
        for fmt in ("full", "lora"):
            for key in ("save_s", "event_to_first_response_s", "step_s", "weight_bytes"):
                _finite_positive(x[fmt][key], f"sync: {size} {fmt} {key}")
    _png(out / "sync.png")


def check_reward(out: Path) -> None:
    r = _json(out / "reward" / "results.json")
    _finite_positive(r["summary"]["limit_items_per_s"], "reward: offline limit items/s")
    _finite_positive(r["summary"]["limit_padded_items_per_s"], "reward: padded forward pass's limit items/s")
    for side in ("grpc", "rest", "core", "core_padded"):
        _finite_positive(r["summary"][side]["items_per_s"], f"reward: {side} items/s")
        _finite_positive(r["summary"][side]["p99_ms"], f"reward: {side} p99 ms")
    for side in ("grpc", "rest"):  # the service reports where its CPU went
        _finite_positive(r["summary"][side]["model_cores"], f"reward: {side} model-thread cores")
        _finite_positive(r["summary"][side]["tokenizer_cores"], f"reward: {side} tokenizer cores")
    _png(out / "reward" / "results.png")


# name -> (command after the interpreter, check)
BENCHMARKS: dict[str, tuple[Callable[[Path], list[str]], Callable[[Path], None]]] = {
    "loop": (lambda o: ["bench/loop/run.py", "--model", "tiny", "--minutes", "0.3", "--out", str(o / "loop.json")],
             check_loop),
    "scaling": (lambda o: ["bench/scaling/run.py", "--model", "tiny", "--minutes", "0.3", "--batches", "2",
                           "--lengths", "32", "--out", str(o / "scaling.json")], check_scaling),
    "policy": (lambda o: ["bench/policy/run.py", "--max-tokens", "8", "--repeat-prompts", "1", "--sync-rounds", "1",
                          "--rounds", "1", "--out", str(o / "policy.json")], check_policy),
    "active": (lambda o: ["bench/active/run.py", "--seeds", "1", "--budget", "60", "--initial", "20", "--batch", "20",
                          "--heads", "2", "--candidates", "200", "--max-conversations", "600",
                          "--out", str(o / "active"), "--cache", str(o / "active-cache")], check_active),
    "reward": (lambda o: ["bench/reward/run.py", "--smoke", "--out", str(o / "reward")], check_reward),
    "sync": (lambda o: ["bench/sync/run.py", "--sizes", "tiny", "--rounds", "1", "--out", str(o / "sync.json")],
             check_sync),
    "feedback": (lambda o: ["bench/feedback/run.py", "--smoke", "--out", str(o / "feedback")], check_feedback),
}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=ROOT / ".run" / "bench-smoke")
    ap.add_argument("--only", default="", help="comma-separated names: " + ", ".join(BENCHMARKS))
    args = ap.parse_args(argv)
    names = [n for n in args.only.split(",") if n] or list(BENCHMARKS)
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        sys.exit(f"unknown benchmark(s) {unknown}; known: {', '.join(BENCHMARKS)}")
    shutil.rmtree(args.out, ignore_errors=True)
    args.out.mkdir(parents=True)
    failed = []
    for i, name in enumerate(names, 1):
        command, check = BENCHMARKS[name]
        t = time.monotonic()
        print(f"[{i}/{len(names)}] {name}...", flush=True)
        log = args.out / f"{name}.log"
        with log.open("w") as f:
            rc = subprocess.run([sys.executable, *command(args.out)], cwd=ROOT, stdout=f,
                                stderr=subprocess.STDOUT).returncode
        try:
            if rc != 0:
                tail = "\n".join(log.read_text().splitlines()[-15:])
                raise AssertionError(f"exited {rc}; last lines of {log}:\n{tail}")
            check(args.out)
            print(f"[{i}/{len(names)}] {name}: ok ({time.monotonic() - t:.0f}s)", flush=True)
        except (AssertionError, KeyError, ValueError) as e:
            failed.append(name)
            print(f"[{i}/{len(names)}] {name}: FAILED ({time.monotonic() - t:.0f}s): {type(e).__name__}: {e}",
                  flush=True)
    if failed:
        sys.exit(f"benchmark smoke run failed: {', '.join(failed)}")
    print(f"every benchmark ran; outputs in {args.out}")


if __name__ == "__main__":
    main()
