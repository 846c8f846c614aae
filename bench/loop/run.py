"""The whole RL loop against TRL's GRPOTrainer, side by side on this machine.

Both sides get the same policy model, the same reward model (scored by the same code: the
reward service's `RewardModel`), the same prompts and the same settings (group size 4, 2
prompts per step, 32 new tokens, lr 1e-5, beta 0.05, full weights, one epoch), each for the
same wall-clock time, one after the other:

- this project: the broker and the policy (vLLM), reward, reference and trainer services of
  the local stack, with their default settings;
- TRL: `GRPOTrainer` in one process (transformers generation), torch on every core.

Measured: optimisation steps per second, generated and trained tokens per second, reward
against wall-clock time (PNG), and this project's time per step by phase (from the
services' own metrics).

    .venv/bin/python bench/loop/run.py --model smollm2 --minutes 12     # the headline
    .venv/bin/python bench/loop/run.py --model tiny --minutes 1         # a smoke run

Needs the `bench` extra (trl) and, for SmolLM2, `make .venv/.smollm2`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from rlhf_devstack.host import cpu_name
from rlhf_devstack.models import EVERYDAY_PROMPTS as PROMPTS, as_chat

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent


SETTINGS = {"group_size": 4, "prompts_per_step": 2, "max_new_tokens": 32, "lr": 1e-5, "beta": 0.05,
            "temperature": 1.0, "epochs": 1}


def chat_prompts(tokenizer) -> list[str]:
    return as_chat(tokenizer, PROMPTS)


def models(kind: str) -> tuple[Path, Path]:
    """(policy folder, reward folder): SmolLM2-135M-Instruct or the tiny test model, and a
    reward model of the policy's shape and tokenizer with seeded random weights."""
    from rlhf_devstack.models import export_smollm2, make_tiny_llama, make_tiny_reward_model

    cache = ROOT / ".cache"
    policy = (export_smollm2(cache / "smollm2-135m-instruct") if kind == "smollm2"
              else make_tiny_llama(cache / "bench-loop" / "tiny-policy"))
    reward = make_tiny_reward_model(cache / "bench-loop" / f"{kind}-reward", policy)
    return policy, reward


# -- TRL ----------------------------------------------------------------------------------------
def run_trl(policy: Path, reward: Path, seconds: float, threads: int, out: Path) -> None:
    """One TRL GRPOTrainer run for `seconds` of training (model loading excluded)."""
    import torch

    torch.set_num_threads(threads)
    from datasets import Dataset
    from transformers import AutoTokenizer, TrainerCallback
    from transformers.trainer_callback import PrinterCallback
    from trl import GRPOConfig, GRPOTrainer

    from rlhf_reward.core import RewardModel, ScoreItem

    tok = AutoTokenizer.from_pretrained(policy)
    scorer = RewardModel(reward, max_length=512)

    def reward_fn(prompts, completions, **_):
        return [r.score for r in scorer.score([ScoreItem(p, c) for p, c in zip(prompts, completions)])]

    s = SETTINGS
    prompts = chat_prompts(tok)
    data = Dataset.from_dict({"prompt": prompts * 200})
    rows: list[dict] = []

    class Clock(TrainerCallback):
        t0 = None

        def on_train_begin(self, args, state, control, **kw):
            Clock.t0 = time.monotonic()

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "reward" in logs:
                rows.append({"t": time.monotonic() - Clock.t0, "step": state.global_step,
                             "reward": logs["reward"], "kl": logs.get("kl"),
                             "length": logs.get("completions/mean_length")})
            if time.monotonic() - Clock.t0 >= seconds:
                control.should_training_stop = True

    with tempfile.TemporaryDirectory() as tmp:
        cfg = GRPOConfig(
            output_dir=tmp, per_device_train_batch_size=s["group_size"] * s["prompts_per_step"],
            num_generations=s["group_size"], max_completion_length=s["max_new_tokens"], learning_rate=s["lr"],
            lr_scheduler_type="constant", beta=s["beta"], num_iterations=s["epochs"], gradient_accumulation_steps=1,
            temperature=s["temperature"], use_cpu=True, logging_steps=1, max_steps=100_000, report_to=[],
            save_strategy="no", seed=0, disable_tqdm=True, dataloader_num_workers=0,
        )
        trainer = GRPOTrainer(model=str(policy), reward_funcs=reward_fn, args=cfg, train_dataset=data,
                              processing_class=tok, callbacks=[Clock()])
        trainer.remove_callback(PrinterCallback)  # a dict printed per step; the rows are kept instead
        trainer.train()
    out.write_text(json.dumps({"rows": rows, "threads": threads}))


# -- the physical limit ------------------------------------------------------------------------
def run_limit(policy: Path, reward: Path, threads: int, out: Path, rounds: int = 5) -> None:
    """Each compute phase of one step alone, on every core, median of `rounds`: vLLM
    generating the step's samples, the reward and reference forward passes, the training
    step, and writing the published weights. Their sum is the fastest a step can be on this
    machine when nothing overlaps and nothing else runs."""
    import os
    import random
    import statistics

    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from vllm import LLM, SamplingParams

    from rlhf_common.algos.logprobs import response_logprobs
    from rlhf_common.weights import WeightStore
    from rlhf_reward.core import RewardModel, ScoreItem
    from rlhf_trainer.learner import LearnerConfig, PolicyLearner, RolloutBatch

    s = SETTINGS
    tok = AutoTokenizer.from_pretrained(policy)
    texts = chat_prompts(tok)
    rng = random.Random(0)
    times: dict[str, list[float]] = {k: [] for k in ("generate", "reward", "reference", "train", "publish")}
    dtype = json.loads((policy / "config.json").read_text()).get("dtype") or "float32"
    llm = LLM(model=str(policy), dtype=dtype, max_model_len=512, enforce_eager=True, seed=0)
    params = SamplingParams(n=s["group_size"], temperature=s["temperature"], max_tokens=s["max_new_tokens"],
                            logprobs=0)
    batches = []
    llm.generate(texts[:2], params, use_tqdm=False)  # warm-up
    for _ in range(rounds):
        chosen = rng.sample(texts, s["prompts_per_step"])
        t = time.perf_counter()
        outs = llm.generate(chosen, params, use_tqdm=False)
        times["generate"].append(time.perf_counter() - t)
        batches.append([(o.prompt, list(o.prompt_token_ids), c.text, list(c.token_ids),
                         [next(iter(lp.values())).logprob for lp in c.logprobs]) for o in outs for c in o.outputs])
    del llm
    torch.set_num_threads(threads)
    scorer = RewardModel(reward, max_length=512)
    ref = AutoModelForCausalLM.from_pretrained(policy, dtype=torch.float32).eval()
    model = AutoModelForCausalLM.from_pretrained(policy, dtype=torch.float32)
    learner = PolicyLearner(model, LearnerConfig(lr=s["lr"], kl_beta=s["beta"]), tok.pad_token_id or 0)
    store = WeightStore(Path(tempfile.mkdtemp(prefix="limit-")))
    for i, b in enumerate(batches):
        t = time.perf_counter()
        scores = [r.score for r in scorer.score([ScoreItem(p, r) for p, _, r, _, _ in b])]
        times["reward"].append(time.perf_counter() - t)
        t = time.perf_counter()
        with torch.inference_mode():
            ref_lp = response_logprobs(ref, [x[1] for x in b], [x[3] for x in b], tok.pad_token_id or 0)
        times["reference"].append(time.perf_counter() - t)
        t = time.perf_counter()
        learner.step(RolloutBatch([x[1] for x in b], [x[3] for x in b], [x[4] for x in b], ref_lp, scores,
                                  [x[0] for x in b]))
        times["train"].append(time.perf_counter() - t)
        t = time.perf_counter()
        store.save(model, tok, "policy", i + 1, i + 1, dtype=getattr(torch, dtype))
        times["publish"].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    out.write_text(json.dumps({"phases_s": med, "rounds": times, "threads": threads,
                               "limit_s_per_step": sum(med.values())}))


# -- this project -----------------------------------------------------------------------------
def _metrics(port: int) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            try:
                out[name] = float(value)
            except ValueError:
                pass
    return out


def _sum(m: dict[str, float], pattern: str) -> float:
    rx = re.compile(pattern)
    return sum(v for k, v in m.items() if rx.fullmatch(k))


def run_ours(policy: Path, reward: Path, seconds: float, run_dir: Path, policy_dtype: str,
             settings: dict | None = None, warmup_steps: int = 0) -> dict:
    """The local stack for `seconds`; with `warmup_steps`, the clock starts after that many
    steps (the steady state alone) instead of at the first generation."""
    import grpc
    from transformers import AutoTokenizer

    from rlhf.trainer.v1 import trainer_pb2, trainer_pb2_grpc
    from rlhf_devstack.stack import Stack, StackSpec, seed_prompts

    s = {**SETTINGS, **(settings or {})}
    prompts = chat_prompts(AutoTokenizer.from_pretrained(policy))
    spec = StackSpec(run_dir=run_dir, policy_model=policy, reward_model=reward, rollout_n=s["group_size"],
                     max_tokens=s["max_new_tokens"], groups_per_step=s["prompts_per_step"], trainer_lr=s["lr"],
                     kl_beta=s["beta"], policy_dtype=policy_dtype,
                     services=("policy", "reward", "reference", "trainer"))
    rows = []
    with Stack(spec) as st:
        trainer = trainer_pb2_grpc.TrainerServiceStub(grpc.insecure_channel(st.addrs["trainer"]))
        seeded = len(seed_prompts(st.bus, prompts * 2, source="bench"))
        shown = 0
        while shown < warmup_steps:
            shown = trainer.Status(trainer_pb2.StatusRequest()).step
            time.sleep(0.1)
        # The clock starts when the first rollouts are being generated, as TRL's starts at its
        # first generation: model loading and vLLM start-up are excluded on both sides.
        t0 = time.monotonic()
        names = ("policy", "trainer", "reward", "reference")
        before = {n: _metrics(st.metrics_ports[n]) for n in names}
        # Time per step by phase is taken from the first step seen on: the wait before it holds
        # the trainer's idle time since its start, which is no part of a step.
        first, first_step = None, shown
        while time.monotonic() - t0 < seconds:
            status = trainer.Status(trainer_pb2.StatusRequest())
            for r in status.recent:
                if r.step > shown:
                    rows.append({"t": time.monotonic() - t0, "step": r.step, "reward": r.reward_mean, "kl": r.kl,
                                 "length": r.response_length_mean, "step_seconds": r.step_seconds})
                    shown = r.step
            if first is None and shown > first_step:
                first, first_step = {n: _metrics(st.metrics_ports[n]) for n in names}, shown
            if seeded - status.groups_consumed < 2 * len(prompts):
                seeded += len(seed_prompts(st.bus, prompts, source="bench"))
            time.sleep(0.2)
        after = {n: _metrics(st.metrics_ports[n]) for n in names}
    delta = {n: {k: after[n].get(k, 0.0) - before[n].get(k, 0.0) for k in after[n]} for n in after}
    first = first or after
    steady = {n: {k: after[n].get(k, 0.0) - first[n].get(k, 0.0) for k in after[n]} for n in after}
    t = steady["trainer"]
    phases = {p: _sum(t, rf'rlhf_trainer_phase_seconds_sum\{{phase="{p}"\}}')
              for p in ("wait", "scoring", "training", "sync", "checkpoint", "kafka")}
    grpc_s = {n: _sum(steady[n], rf"rlhf_{n}_request_seconds_sum\{{.*\}}") for n in ("reward", "reference")}
    calls_s = {n: _sum(t, rf'rlhf_trainer_scorer_call_seconds_sum\{{scorer="{n}"\}}') for n in ("reward", "reference")}
    rollout_s = {p: _sum(steady["policy"], rf'rlhf_policy_rollout_seconds_sum\{{phase="{p}"\}}')
                 for p in ("generate", "kafka")}
    return {
        "rows": rows, "steady_steps": shown - first_step, "phases_s": phases, "grpc_handling_s": grpc_s,
        "scorer_call_s": calls_s,
        "grpc_transport_s": {n: calls_s[n] - grpc_s[n] for n in calls_s}, "policy_rollout_s": rollout_s,
        "generated_tokens": _sum(delta["policy"], r"rlhf_policy_generated_tokens_total(\{.*\})?"),
        "trained_tokens": _sum(delta["trainer"], r"rlhf_trainer_trained_tokens_total"),
        "reward_batch_s": _sum(steady["reward"], r"rlhf_reward_batch_seconds_sum"),
    }


# -- report -----------------------------------------------------------------------------------
def summarise(rows: list[dict], seconds: float, generated_tokens: float, trained_tokens: float) -> dict:
    steps = rows[-1]["step"] if rows else 0
    last = [r["reward"] for r in rows[-max(1, len(rows) // 4):]]
    return {"steps": steps, "seconds": seconds, "steps_per_s": steps / seconds,
            "s_per_step": seconds / steps if steps else math.inf,
            "generated_tokens_per_s": generated_tokens / seconds, "trained_tokens_per_s": trained_tokens / seconds,
            "reward_first_quarter": _mean([r["reward"] for r in rows[:max(1, len(rows) // 4)]]),
            "reward_last_quarter": _mean(last)}


def _mean(xs) -> float:
    xs = [x for x in xs if x is not None and math.isfinite(x)]
    return sum(xs) / len(xs) if xs else float("nan")


def plot(sides: dict[str, list[dict]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for name, rows in sides.items():
        if not rows:
            continue
        t = [r["t"] / 60 for r in rows]
        w = max(1, len(rows) // 15)
        smooth = [_mean([x["reward"] for x in rows[max(0, i - w):i + 1]]) for i in range(len(rows))]
        axes[0].plot(t, smooth, label=name)
        axes[1].plot(t, [r["step"] for r in rows], label=name)
    axes[0].set_xlabel("minutes")
    axes[0].set_ylabel("mean reward per step (running mean)")
    axes[1].set_xlabel("minutes")
    axes[1].set_ylabel("optimisation steps")
    for a in axes:
        a.legend()
        a.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def machine() -> str:
    """Architecture, cores and CPU model (from /proc/cpuinfo where there is one)."""
    return f"{platform.machine()}, {os.cpu_count()} cores, {cpu_name()}"


def versions() -> dict:
    import importlib.metadata as md

    out = {}
    for pkg in ("torch", "transformers", "trl", "vllm-cpu", "vllm"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=("smollm2", "tiny"), default="smollm2")
    ap.add_argument("--minutes", type=float, default=12.0, help="Training time of each side")
    ap.add_argument("--sides", default="ours,trl,limit",
                    help="Comma-separated: ours, trl, limit (each compute phase alone: the machine's limit)")
    ap.add_argument("--out", type=Path, default=None, help="Results JSON (default bench/loop/results-<model>.json)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="TRL's torch threads")
    ap.add_argument("--trl-child", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--limit-child", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    seconds = args.minutes * 60
    policy, reward = models(args.model)
    if args.trl_child:
        run_trl(policy, reward, seconds, args.threads, args.trl_child)
        return
    if args.limit_child:
        run_limit(policy, reward, args.threads, args.limit_child)
        return
    out = args.out or HERE / f"results-{args.model}.json"
    res = {"machine": machine(),
           "date": time.strftime("%Y-%m-%d"), "versions": versions(), "model": args.model, "settings": SETTINGS,
           "minutes": args.minutes, "sides": {}}
    curves = {}
    for side in args.sides.split(","):
        t = time.monotonic()
        print(f"{side}: {args.minutes:g} minutes of training on {args.model}...", flush=True)
        if side == "trl":
            with tempfile.TemporaryDirectory() as tmp:
                child = Path(tmp) / "trl.json"
                subprocess.run([sys.executable, __file__, "--model", args.model, "--minutes", str(args.minutes),
                                "--threads", str(args.threads), "--trl-child", str(child)], check=True)
                raw = json.loads(child.read_text())
            rows = raw["rows"]
            gen = sum((r["length"] or 0) * SETTINGS["group_size"] * SETTINGS["prompts_per_step"] for r in rows)
            res["sides"]["trl"] = {**summarise(rows, seconds, gen, gen), "threads": raw["threads"]}
            curves["TRL GRPOTrainer"] = rows
        elif side == "ours":
            run_dir = ROOT / ".run" / "bench-loop"  # the services' logs stay here after the run
            shutil.rmtree(run_dir, ignore_errors=True)
            raw = run_ours(policy, reward, seconds, run_dir, "bfloat16" if args.model == "smollm2" else "float32")
            rows = raw.pop("rows")
            summ = summarise(rows, seconds, raw["generated_tokens"], raw["trained_tokens"])
            n = max(1, raw["steady_steps"])  # per step: from the first step seen to the last
            summ["phase_s_per_step"] = {k: v / n for k, v in raw["phases_s"].items()}
            for key in ("grpc_handling_s", "scorer_call_s", "grpc_transport_s", "policy_rollout_s"):
                summ[f"{key}_per_step"] = {k: v / n for k, v in raw[key].items()}
            res["sides"]["ours"] = summ
            curves["this project"] = rows
        elif side == "limit":
            with tempfile.TemporaryDirectory() as tmp:
                child = Path(tmp) / "limit.json"
                subprocess.run([sys.executable, __file__, "--model", args.model, "--threads", str(args.threads),
                                "--limit-child", str(child)], check=True)
                res["sides"]["limit"] = json.loads(child.read_text())
        else:
            sys.exit(f"unknown side {side!r}")
        print(f"{side}: done in {time.monotonic() - t:.0f}s: {json.dumps(res['sides'][side])}", flush=True)
    if "ours" in res["sides"] and "trl" in res["sides"]:
        o, r = res["sides"]["ours"], res["sides"]["trl"]
        res["ratios"] = {k: o[k] / r[k] if r[k] else math.inf
                         for k in ("steps_per_s", "generated_tokens_per_s", "trained_tokens_per_s")}
    if "ours" in res["sides"] and "limit" in res["sides"]:
        res["ours_share_of_limit"] = res["sides"]["limit"]["limit_s_per_step"] / res["sides"]["ours"]["s_per_step"]
    png = out.with_suffix(".png")
    plot(curves, png, f"{args.model}: reward and steps against wall-clock time")
    out.write_text(json.dumps(res, indent=2))
    print(json.dumps({**res.get("ratios", {}), "ours_share_of_limit": res.get("ours_share_of_limit")}, indent=2))
    print(f"results: {out}\nplot: {png}")


if __name__ == "__main__":
    main()
