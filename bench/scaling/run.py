"""How the loop's step time grows with the batch size and the answer length.

The local stack (policy on vLLM, reward, reference, trainer) of the loop benchmark, started
once per setting, with everything else as there (SmolLM2-135M-Instruct, a reward model of
its shape with seeded random weights, group size 4, lr 1e-5, beta 0.05, one epoch):

- batch size: 1, 2 and 4 prompts per step (4, 8 and 16 answers) at 32 new tokens;
- answer length: 16, 32 and 64 new tokens at most, at 2 prompts per step.

Each setting runs for a warm-up step and then `--minutes`; reported per step in the steady
state: wall-clock seconds, the trainer's phases (wait, scoring, training, sync, kafka,
checkpoint), and the tokens generated and trained.

    .venv/bin/python bench/scaling/run.py                          # SmolLM2, 2 minutes a setting
    .venv/bin/python bench/scaling/run.py --model tiny --minutes 0.3 --batches 1,2 --lengths 16
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
PHASES = ("wait", "scoring", "training", "sync", "kafka", "checkpoint")


def _loop_bench():
    spec = importlib.util.spec_from_file_location("bench_loop_run", ROOT / "bench" / "loop" / "run.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def measure(loop, policy: Path, reward: Path, model: str, prompts_per_step: int, max_new_tokens: int,
            minutes: float) -> dict:
    run_dir = ROOT / ".run" / f"bench-scaling-{prompts_per_step}x{max_new_tokens}"
    shutil.rmtree(run_dir, ignore_errors=True)
    raw = loop.run_ours(policy, reward, minutes * 60, run_dir, "bfloat16" if model == "smollm2" else "float32",
                        settings={"prompts_per_step": prompts_per_step, "max_new_tokens": max_new_tokens},
                        warmup_steps=1)
    rows = raw["rows"]
    steps = len(rows)
    if steps < 2:
        raise SystemExit(f"{prompts_per_step} prompts x {max_new_tokens} tokens: only {steps} steps in "
                         f"{minutes:g} minutes; give it more --minutes")
    seconds = minutes * 60
    n = max(1, raw["steady_steps"])
    return {
        "prompts_per_step": prompts_per_step, "answers_per_step": prompts_per_step * loop.SETTINGS["group_size"],
        "max_new_tokens": max_new_tokens, "steps": steps, "seconds": seconds,
        # steady state: between the first and the last step seen inside the window
        "s_per_step": (rows[-1]["t"] - rows[0]["t"]) / (steps - 1),
        "answer_tokens_mean": loop._mean([r["length"] for r in rows]),
        "generated_tokens_per_s": raw["generated_tokens"] / seconds,
        "trained_tokens_per_step": raw["trained_tokens"] / steps,
        # by phase: from the first step seen to the last (the services' own metrics)
        "phase_s_per_step": {p: raw["phases_s"].get(p, 0.0) / n for p in PHASES},
        "scorer_call_s_per_step": {k: v / n for k, v in raw["scorer_call_s"].items()},
        "grpc_transport_s_per_step": {k: v / n for k, v in raw["grpc_transport_s"].items()},
        "policy_rollout_s_per_step": {k: v / n for k, v in raw["policy_rollout_s"].items()},
    }


def plot(points: list[dict], base_batch: int, base_length: int, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    axes_def = [("answers per step", [p for p in points if p["max_new_tokens"] == base_length], "answers_per_step"),
                ("answer length (tokens generated, mean)",
                 [p for p in points if p["prompts_per_step"] == base_batch], "answer_tokens_mean")]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    colours = dict(zip(PHASES, ("#bbbbbb", "#4c72b0", "#dd8452", "#55a868", "#8172b2", "#c44e52")))
    for ax, (xlabel, pts, key) in zip(axes, axes_def):
        pts = sorted(pts, key=lambda p: p[key])
        if not pts:
            ax.set_visible(False)
            continue
        labels = [f"{p[key]:.0f}" for p in pts]
        bottom = [0.0] * len(pts)
        for ph in PHASES:
            vals = [p["phase_s_per_step"][ph] for p in pts]
            ax.bar(labels, vals, bottom=bottom, color=colours[ph], label=ph)
            bottom = [b + v for b, v in zip(bottom, vals)]
        ax.plot(labels, [p["s_per_step"] for p in pts], "k.-", label="wall-clock s/step")
        ax.plot(labels, [p["policy_rollout_s_per_step"]["generate"] for p in pts], "x--", color="#937860",
                label="policy generating (beside the trainer)")
        ax.set_ylim(0, 1.12 * max(max(bottom), max(p["s_per_step"] for p in pts)))
        ax.set_xlabel(xlabel)
        ax.set_ylabel("seconds per step")
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(fontsize=7, loc="upper left", framealpha=0.9)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=("smollm2", "tiny"), default="smollm2")
    ap.add_argument("--minutes", type=float, default=2.0, help="Steady-state time of each setting")
    ap.add_argument("--batches", default="1,2,4", help="Prompts per step to try (group size 4 each)")
    ap.add_argument("--lengths", default="16,32,64", help="Max new tokens to try")
    ap.add_argument("--base-batch", type=int, default=2, help="Prompts per step while the length varies")
    ap.add_argument("--base-length", type=int, default=32, help="Max new tokens while the batch varies")
    ap.add_argument("--out", type=Path, default=None, help="Results JSON (default bench/scaling/results-<model>.json)")
    ap.add_argument("--replot", action="store_true", help="Only draw the plot again from --out")
    args = ap.parse_args(argv)
    if args.replot:
        out = args.out or HERE / f"results-{args.model}.json"
        plot(json.loads(out.read_text())["points"], args.base_batch, args.base_length, out.with_suffix(".png"),
             f"{args.model}: step time by phase against batch size and answer length")
        return
    batches = [int(x) for x in args.batches.split(",") if x]
    lengths = [int(x) for x in args.lengths.split(",") if x]
    settings = [(b, args.base_length) for b in batches]
    settings += [(args.base_batch, n) for n in lengths if (args.base_batch, n) not in settings]
    loop = _loop_bench()
    policy, reward = loop.models(args.model)
    out = args.out or HERE / f"results-{args.model}.json"
    res = {"machine": loop.machine(),
           "date": time.strftime("%Y-%m-%d"), "versions": loop.versions(), "model": args.model,
           "settings": {**loop.SETTINGS, "varied": ["prompts_per_step", "max_new_tokens"]},
           "minutes_per_setting": args.minutes, "points": []}
    for i, (b, n) in enumerate(settings, 1):
        t = time.monotonic()
        print(f"[{i}/{len(settings)}] {b} prompts x {n} tokens, {args.minutes:g} minutes...", flush=True)
        p = measure(loop, policy, reward, args.model, b, n, args.minutes)
        res["points"].append(p)
        print(f"[{i}/{len(settings)}] {p['s_per_step']:.2f} s/step, {p['answer_tokens_mean']:.1f} tokens/answer "
              f"({time.monotonic() - t:.0f}s)", flush=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2))
    png = out.with_suffix(".png")
    plot(res["points"], args.base_batch, args.base_length, png,
         f"{args.model}: step time by phase against batch size and answer length")
    print(f"results: {out}\nplot: {png}")


if __name__ == "__main__":
    main()
