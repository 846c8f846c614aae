"""`make demo`: align a real model through the real services, with simulated users, and report.

    python -m rlhf_devstack.demo                       # SmolLM2-135M-Instruct, 20 minutes
    python -m rlhf_devstack.demo --minutes 40 --model path/to/hf-folder
    python -m rlhf_devstack.demo --tiny                # the tiny models, about 4 minutes (CI)

Stages, each with a progress bar:
0. The gold judge: the simulated users' hidden taste (`simusers.py`), trained once and cached.
1. SFT: the model is fine-tuned on the best-rated human answers of chitchat-dataset.
2. Reward model: MiniLM learns from a small set of human preference pairs (400 pairs of
   rated conversations, 85 of them held out). This is the system's own reward model, the proxy.
3. Online: every service runs (the policy on vLLM, reward, reference, trainer, feedback,
   reward learner), with Prometheus scraping them. Simulated users ask the policy and rate
   its answers through the feedback API. The reward learner keeps training the proxy on
   their labels. The trainer takes GRPO steps on rollouts scored by the proxy (KL to the
   SFT reference), and DPO steps on the users' pairwise choices. Every trainer step prints a
   line. At fixed intervals the served policy is evaluated on held-out prompts: gold reward
   (the truth), proxy reward, their gap, KL and answer length.

At the end, `<run>/report.md` shows plots over time, the win rate against the SFT policy
judged by the gold judge, and answers before and after. Trained models are cached in
`.cache/demo/`, so a second run goes straight to the online stage.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import math
import os
import random
import re
import shutil
import statistics
import threading
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import grpc

from rlhf.feedback.v1 import feedback_pb2, feedback_pb2_grpc
from rlhf.policy.v1 import policy_pb2, policy_pb2_grpc
from rlhf.reference.v1 import reference_pb2, reference_pb2_grpc
from rlhf.reward.v1 import reward_pb2, reward_pb2_grpc
from rlhf.trainer.v1 import trainer_pb2, trainer_pb2_grpc

from .host import cpu_name
from .simusers import generate_request
from .stack import Stack, StackSpec, free_port, seed_prompts

CACHE = Path(".cache/demo")


@dataclass
class DemoSettings:
    """Everything a run depends on (written to the report)."""

    model: str = "smollm2"  # "smollm2", "tiny", or an HF model folder
    minutes: float = 20.0  # the whole run, stages included
    seed: int = 0
    eval_prompts: int = 10  # chitchat prompts held out: never asked by users, never trained on
    eval_samples: int = 4  # answers per held-out prompt in each evaluation (8 before and after)
    eval_every_s: float = 90.0
    group_size: int = 4
    groups_per_step: int = 2
    max_tokens: int = 48
    lr: float = 2e-5
    kl_beta: float = 0.05
    lora_rank: int = 0
    label_step_every: int = 4  # one DPO step on users' pairs after every N GRPO steps
    users: int = 2
    think_s: float = 4.0  # each user's mean pause between interactions
    feedback_share: float = 0.8
    feedback_mix: dict = field(default_factory=lambda: {"thumbs": 0.4, "rating": 0.3, "pairwise": 0.3})
    reward_round_labels: int = 48  # the reward learner trains a round per this many new labels
    reward_lr: float = 2e-4  # the reward learner's learning rate (its service default)
    sft_demos: int = 400
    sft_lr: float = 1e-5
    rm_pairs: int = 400
    gold_conversations: int = 0  # 0 = all of chitchat-dataset
    reserve_s: float = 120.0  # kept at the end for the final evaluation and the report

    @classmethod
    def tiny(cls, **kw) -> "DemoSettings":
        """The tiny models at the smallest sizes that still exercise every stage (CI). The tiny
        policy writes made-up words, so the users' labels carry little signal, and a gate over
        8-20 held-out pairs refuses or passes a real round by chance. The reward learner's
        learning rate is therefore so small that a candidate ranks the held-out pairs as the
        live model does: the smoke run checks the path a version takes (round, gate, publish,
        hot swap), and the SmolLM2 run is where the reward model learns."""
        base = dict(model="tiny", minutes=4.0, eval_prompts=4, eval_samples=2, eval_every_s=25.0, max_tokens=12,
                    lr=1e-4, label_step_every=2, users=2, think_s=0.5, reward_round_labels=16, reward_lr=1e-7,
                    sft_demos=48, sft_lr=1e-4, rm_pairs=48, gold_conversations=300, reserve_s=45.0)
        return cls(**{**base, **kw})


# ---------------------------------------------------------------- prompts and data


@dataclass(frozen=True)
class Prompts:
    train: list[str]  # asked by the simulated users and sent as rollouts
    held_out: list[str]  # evaluation only


def chitchat_prompts(s: DemoSettings) -> Prompts:
    from rlhf_jobs.preference_data import chitchat_conversations

    prompts = sorted({c.prompt for c in chitchat_conversations()})
    random.Random(s.seed).shuffle(prompts)
    return Prompts(train=sorted(prompts[s.eval_prompts:]), held_out=sorted(prompts[:s.eval_prompts]))


def first_answer(transcript: str, min_words: int = 6, max_chars: int = 400) -> str | None:
    """The first utterance of a chitchat transcript ("A: ...\\nB: ...") that says something."""
    for line in transcript.splitlines():
        text = re.sub(r"^[AB]: ", "", line).strip()
        if len(text.split()) >= min_words:
            return text[:max_chars]
    return None


def sft_rows(s: DemoSettings, prompts: Prompts, render) -> list[dict]:
    """Demonstrations: the first real utterance of the best-rated conversations on the users'
    prompts (rated 8 or more of 10)."""
    from rlhf_jobs.preference_data import chitchat_conversations

    train = set(prompts.train)
    rows = []
    for c in chitchat_conversations():
        if c.prompt in train and c.rating >= 8 and (text := first_answer(c.text)):
            rows.append({"prompt": render(c.prompt), "response": text})
    random.Random(s.seed).shuffle(rows)
    return rows[:s.sft_demos]


def rm_rows(s: DemoSettings, render) -> list[dict]:
    """The reward model's small starting set: pairs of conversations on the same users' prompt
    whose ratings differ by at least 3, the better rated one chosen (transcripts cut to 600
    characters; the model reads 128 tokens)."""
    from rlhf_jobs.preference_data import chitchat_conversations

    train = set(chitchat_prompts(s).train)
    by_prompt: dict[str, list[tuple[float, str]]] = {}
    for c in chitchat_conversations():
        if c.prompt in train:
            by_prompt.setdefault(c.prompt, []).append((c.rating, c.text[:600]))
    rng = random.Random(s.seed + 1)
    per_prompt = max(1, math.ceil(s.rm_pairs / max(1, len(by_prompt))))
    rows = []
    for p in sorted(by_prompt):
        xs = by_prompt[p]
        cand = [(a, b) for i, a in enumerate(xs) for b in xs[i + 1:] if abs(a[0] - b[0]) >= 3 and a[1] != b[1]]
        for a, b in rng.sample(cand, min(per_prompt, len(cand))):
            hi, lo = (a, b) if a[0] > b[0] else (b, a)
            rows.append({"prompt": render(p), "chosen": hi[1], "rejected": lo[1], "gap": hi[0] - lo[0]})
    rng.shuffle(rows)
    return rows[:s.rm_pairs]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def cache_key(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:12]


def build_once(out: Path, rows: list[dict], metrics: str, build) -> dict:
    """The metrics of the model folder `out`; built first, from `rows` written as JSONL, by
    build(data, folder) into a temporary folder that is renamed when done (so an interrupted
    build is never taken for a cached one)."""
    if not (out / metrics).exists():
        data = write_jsonl(out.with_name(out.name + ".jsonl"), rows)
        tmp = out.with_name(out.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        build(data, tmp)
        tmp.rename(out)
    return json.loads((out / metrics).read_text())


# ---------------------------------------------------------------- stages 0-2


def say(msg: str) -> None:
    print(msg, flush=True)


def stage_gold(s: DemoSettings):
    from .simusers import GoldSettings, load_or_train

    settings = GoldSettings(conversations=s.gold_conversations, seed=s.seed)
    folder = CACHE / ("gold" if not s.gold_conversations else f"gold-{s.gold_conversations}-{s.seed}")
    return load_or_train(folder, settings)


def base_model(s: DemoSettings) -> Path:
    from .models import export_smollm2, make_tiny_llama

    if s.model == "smollm2":
        return export_smollm2(Path(".cache") / "smollm2-135m-instruct")
    if s.model == "tiny":
        return make_tiny_llama(CACHE / "tiny-base")
    path = Path(s.model)
    if not (path / "config.json").exists():
        raise SystemExit(f"--model {s.model}: not 'smollm2', 'tiny' or an HF model folder (no config.json there)")
    return path


def tiny_demos(s: DemoSettings, prompts: Prompts) -> list[dict]:
    """For the tiny model (a made-up vocabulary): sentences of its training corpus as answers."""
    from .models import synthetic_corpus

    corpus = synthetic_corpus(s.sft_demos, seed=s.seed + 5)
    return [{"prompt": prompts.train[i % len(prompts.train)], "response": corpus[i]} for i in range(s.sft_demos)]


def stage_sft(s: DemoSettings, base: Path, prompts: Prompts, render) -> tuple[Path, dict]:
    from rlhf_jobs import offline

    rows = tiny_demos(s, prompts) if s.model == "tiny" else sft_rows(s, prompts, render)
    out = CACHE / f"sft-{cache_key(str(base.resolve()), rows, s.sft_lr, s.seed)}"
    m = build_once(out, rows, "train_metrics.json", lambda data, tmp: offline.main(
        ["sft", "--model", str(base), "--data", str(data), "--out", str(tmp), "--lr", str(s.sft_lr),
         "--batch-size", "8", "--max-length", "128", "--seed", str(s.seed)]))
    return out, {"rows": m["rows"], "first_loss": round(m["first_loss"], 4), "last_loss": round(m["last_loss"], 4)}


def stage_reward_model(s: DemoSettings, render) -> tuple[Path, dict]:
    from rlhf_jobs.reward_model import TrainArgs, train

    rows = rm_rows(s, render)
    out = CACHE / f"rm-{cache_key(rows, s.seed)}"
    m = build_once(out, rows, "metrics.json", lambda data, tmp: train(TrainArgs(
        data=str(data), backbone="minilm", out=str(tmp), metrics_json=str(tmp / "metrics.json"), epochs=1,
        max_length=128, seed=s.seed)))
    return out, {"pairs": m["train"]["pairs"], "held_out_pairs": m["held_out"]["pairs"],
                 "held_out_accuracy": round(m["held_out"]["pairwise_accuracy"], 4)}


# ---------------------------------------------------------------- evaluation through the services


@dataclass
class Scored:
    prompt: str  # as the user wrote it (the gold judge's input)
    text: str
    tokens: int
    gold: float
    proxy: float
    kl: float  # mean per-token log pi - log pi_ref on the sampled tokens (nats)
    policy_version: int


class Services:
    """gRPC stubs of the running stack, and the calls the driver makes."""

    def __init__(self, st: Stack, render):
        ch = {n: grpc.insecure_channel(a) for n, a in st.addrs.items()}
        self.policy = policy_pb2_grpc.PolicyServiceStub(ch["policy"])
        self.reward = reward_pb2_grpc.RewardServiceStub(ch["reward"])
        self.reference = reference_pb2_grpc.ReferenceServiceStub(ch["reference"])
        self.trainer = trainer_pb2_grpc.TrainerServiceStub(ch["trainer"])
        self.feedback = feedback_pb2_grpc.FeedbackServiceStub(ch["feedback"])
        self.render = render
        self.chat = render("x") != "x"

    def reward_version(self) -> int:
        return max(0, self.reward.GetModelInfo(reward_pb2.GetModelInfoRequest(), timeout=30).version_number)

    def proxy(self, pairs: list[tuple[str, str]]) -> list[float]:
        items = [reward_pb2.ScoreItem(prompt=self.render(p), response=t) for p, t in pairs]
        return [r.score for r in self.reward.Score(reward_pb2.ScoreRequest(items=items), timeout=120).results]

    def feedback_counts(self) -> tuple[dict[str, int], int]:
        """Accepted feedback items by kind, and labels made by the join."""
        r = self.feedback.GetStats(feedback_pb2.GetStatsRequest(), timeout=30)
        kinds = {"thumb": "thumbs", "rating": "rating", "pairwise": "pairwise", "edit": "edit"}
        accepted = {kinds.get(c.kind, c.kind): int(c.count) for c in r.counts if c.outcome == "accepted"}
        joined = sum(int(c.count) for c in r.counts if c.outcome == "joined")
        return accepted, joined

    def sample(self, t: float, interactions: int) -> dict:
        """A `sample` timeline record: the versions in service and the feedback so far."""
        accepted, joined = self.feedback_counts()
        return {"kind": "sample", "t": t,
                "policy_version": self.policy.GetVersion(policy_pb2.GetVersionRequest(), timeout=30).version,
                "trainer_version": self.trainer.Status(trainer_pb2.StatusRequest(), timeout=30).version,
                "reward_version": self.reward_version(), "feedback": accepted, "labels": joined,
                "interactions": interactions}

    def evaluate(self, prompts: list[str], samples: int, max_tokens: int, judge, seed: int) -> list[Scored]:
        """`samples` answers (temperature 1) per prompt from the served policy, each scored by the
        gold judge, the proxy, and its KL to the reference."""
        got = []
        for i, p in enumerate(prompts):
            req = generate_request(p, samples, max_tokens, 1.0, seed + i, self.chat, logprobs=True)
            r = self.policy.Generate(req, timeout=300)
            got.extend((p, r, c) for c in r.completions)
        items = [reference_pb2.LogProbsItem(prompt_token_ids=r.prompt_token_ids, response_token_ids=c.token_ids)
                 for _, r, c in got]
        ref = self.reference.LogProbs(reference_pb2.LogProbsRequest(items=items), timeout=300).results
        golds = judge.score([(p, c.text) for p, _, c in got])
        proxies = self.proxy([(p, c.text) for p, _, c in got])
        out = []
        for (p, r, c), g, q, rl in zip(got, golds, proxies, ref):
            diffs = [a - b for a, b in zip(c.logprobs, rl.logprobs)]
            kl = statistics.fmean(diffs) if diffs else float("nan")
            out.append(Scored(p, c.text, len(c.token_ids), g, q, kl, r.policy_version))
        return out


def _mean(xs) -> float:
    xs = [x for x in xs if x == x]
    return statistics.fmean(xs) if xs else float("nan")


def _sd(xs) -> float:
    xs = [x for x in xs if x == x]
    return statistics.pstdev(xs) if len(xs) > 1 else float("nan")


def eval_record(now: list[Scored], before: list[Scored], before_proxy_now: list[float], reward_version: int,
                t: float, label: str) -> dict:
    """An `eval` timeline record; gains are over the SFT answers in their standard deviations,
    the proxy's under the reward-model version in service now (the SFT answers re-scored)."""
    from .simusers import mean_interval

    by_prompt: dict[str, list[float]] = {}
    for x in now:
        by_prompt.setdefault(x.prompt, []).append(x.gold)
    m, lo, hi = mean_interval([statistics.fmean(v) for v in by_prompt.values()])
    gold_before = [x.gold for x in before]
    gold_gain = (m - _mean(gold_before)) / (_sd(gold_before) or float("nan"))
    proxy_gain = (_mean(x.proxy for x in now) - _mean(before_proxy_now)) / (_sd(before_proxy_now) or float("nan"))
    return {"kind": "eval", "t": round(t, 2), "label": label, "policy_version": max(x.policy_version for x in now),
            "reward_version": reward_version, "gold_mean": m, "gold_low": lo, "gold_high": hi,
            "proxy_mean": _mean(x.proxy for x in now), "gold_gain_sd": gold_gain, "proxy_gain_sd": proxy_gain,
            "gap_sd": proxy_gain - gold_gain, "kl_nats": _mean(x.kl for x in now),
            "length_tokens": _mean(x.tokens for x in now), "answers": len(now)}


# ---------------------------------------------------------------- stage 3: online


class Timeline:
    """Appends records to <run>/timeline.jsonl as they happen (t: seconds since the online start)."""

    def __init__(self, path: Path):
        self.path = path
        path.write_text("")
        self.t0 = time.monotonic()
        self.records: list[dict] = []
        self._lock = threading.Lock()

    def t(self) -> float:
        return time.monotonic() - self.t0

    def add(self, rec: dict) -> dict:
        rec = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in rec.items()}
        with self._lock:
            self.records.append(rec)
            with self.path.open("a") as f:
                f.write(json.dumps(rec) + "\n")
        return rec


def step_line(s, served: int) -> str:
    kind = "DPO " if s.kind == "labels" else "GRPO"
    return (f"{s.step:>5} {kind} {s.version:>7} {served:>6} {s.reward_mean:>8.3f} {s.kl:>8.4f} {s.entropy:>7.3f} "
            f"{s.response_length_mean:>5.1f} {s.step_seconds:>6.2f}")


STEP_HEADER = f"{'step':>5} {'kind'} {'version':>7} {'served':>6} {'reward':>8} {'KL':>8} {'entropy':>7} {'len':>5} " \
              f"{'step s':>6}"


def stack_spec(s: DemoSettings, run_dir: Path, sft: Path, rm: Path) -> StackSpec:
    groups_ahead = 2 * s.groups_per_step * 2  # two steps of rollouts ready (bench/scaling)
    return StackSpec(
        run_dir=run_dir, policy_model=sft, reward_model=rm, rollout_n=s.group_size, max_tokens=s.max_tokens,
        groups_per_step=s.groups_per_step, max_groups_ahead=groups_ahead, trainer_lr=s.lr, kl_beta=s.kl_beta,
        lora_rank=s.lora_rank, supervise=True,
        service_env={
            "trainer": {"RLHF_TRAINER_LEARN_FROM": "both", "RLHF_TRAINER_LABEL_STEP_EVERY": str(s.label_step_every),
                        "RLHF_TRAINER_PREFERENCE_BATCH": "8", "RLHF_TRAINER_CHECKPOINT_EVERY": "100",
                        # A full SmolLM2 version is 540 MB in float32, a training state three times that.
                        "RLHF_TRAINER_KEEP_VERSIONS": "3", "RLHF_TRAINER_KEEP_CHECKPOINTS": "1",
                        "RLHF_TRAINER_SEED": str(s.seed)},
            "reward_learner": {"RLHF_REWARD_LEARNER_TRAIN_EVERY_LABELS": str(s.reward_round_labels),
                               "RLHF_REWARD_LEARNER_KEEP_VERSIONS": "3",
                               "RLHF_REWARD_LEARNER_TRAIN_EVERY_S": "60", "RLHF_REWARD_LEARNER_MIN_HELDOUT_PAIRS": "8",
                               "RLHF_REWARD_LEARNER_MAX_LENGTH": "128", "RLHF_REWARD_LEARNER_LR": str(s.reward_lr)},
        })


def online(s: DemoSettings, run_dir: Path, judge, sft: Path, rm: Path, prompts: Prompts, render,
           deadline: float, summary: dict) -> None:
    from .prometheus import LocalPrometheus
    from .simusers import SimulatedUsers, calibrate, win_rate

    import torch

    torch.set_num_threads(1)  # the judge, in this process: the cores belong to the services now
    say(f"starting Kafka, the six services and Prometheus (logs in {run_dir}/*.log; vLLM takes a minute or two "
        f"on CPU)...")
    t_up = time.monotonic()
    st = Stack(stack_spec(s, run_dir, sft, rm)).start(verbose=True)
    prom = None
    try:
        try:
            prom = LocalPrometheus(st.metrics_ports, run_dir / "prometheus", port=free_port(), interval="5s").start()
            summary["prometheus"] = prom.url
            say(f"Prometheus scrapes every service: open {prom.url} (Graph; try "
                f"rate(rlhf_policy_generated_tokens_total[1m]) or rlhf_trainer_reward_mean)")
        except (FileNotFoundError, RuntimeError, TimeoutError, ImportError) as e:
            summary["notes"].append(f"Prometheus did not start: {e}")
            say(f"Prometheus did not start ({e}); the run goes on without it")
        summary["stages"]["stack"] = {"seconds": round(time.monotonic() - t_up, 1)}
        svc = Services(st, render)

        # The SFT policy before any online step: the users' calibration and the baseline.
        t_cal = time.monotonic()
        calibration = calibrate(svc.policy, prompts.train[:12], judge, samples=2, max_tokens=s.max_tokens,
                                seed=10_000, chat=svc.chat)
        before = svc.evaluate(prompts.held_out, 2 * s.eval_samples, s.max_tokens, judge, seed=20_000)
        summary["stages"]["baseline"] = {"seconds": round(time.monotonic() - t_cal, 1), "answers": len(before)}

        timeline = Timeline(run_dir / "timeline.jsonl")
        first = eval_record(before, before, [x.proxy for x in before], svc.reward_version(), 0.0, "before")
        timeline.add(first)
        say(f"SFT policy on {len(prompts.held_out)} held-out prompts: gold {first['gold_mean']:+.3f} "
            f"[{first['gold_low']:+.3f}, {first['gold_high']:+.3f}], KL {first['kl_nats']:.4f}, "
            f"{first['length_tokens']:.0f} tokens")

        rendered = [render(p) for p in prompts.train]
        rng = random.Random(s.seed)
        seeded = len(seed_prompts(st.bus, [rng.choice(rendered) for _ in range(32)], source="demo"))
        users = SimulatedUsers(st.addrs["policy"], f"http://127.0.0.1:{st.configs['feedback'].http_port}", None,
                               prompts.train, judge, calibration, mix=s.feedback_mix, feedback_share=s.feedback_share,
                               seed=s.seed, max_tokens=s.max_tokens, chat=svc.chat)
        stop = threading.Event()
        users_thread = threading.Thread(target=users.run, daemon=True,
                                        kwargs={"users": s.users, "stop": stop, "think_s": s.think_s})
        users_thread.start()

        end = deadline - s.reserve_s
        say(f"online RLHF for {(end - time.monotonic()) / 60:.1f} minutes; {s.users} simulated users; "
            f"held-out evaluation every {s.eval_every_s:.0f}s")
        say(STEP_HEADER)
        shown, next_eval, next_sample, served = 0, time.monotonic() + s.eval_every_s, 0.0, 0
        while time.monotonic() < end:
            status = svc.trainer.Status(trainer_pb2.StatusRequest(), timeout=30)
            served = svc.policy.GetVersion(policy_pb2.GetVersionRequest(), timeout=30).version
            for x in status.recent:
                if x.step > shown:
                    timeline.add({"kind": "step", "t": timeline.t(), "step": x.step, "version": x.version,
                                  "step_kind": x.kind or "rollouts", "reward_mean": x.reward_mean,
                                  "reward_std": x.reward_std, "kl": x.kl, "entropy": x.entropy,
                                  "response_length_mean": x.response_length_mean, "step_seconds": x.step_seconds,
                                  "loss": x.loss})
                    say(step_line(x, served))
                    shown = x.step
            if seeded - status.groups_consumed < 16:  # keep the prompt stream ahead of the trainer
                seeded += len(seed_prompts(st.bus, [rng.choice(rendered) for _ in range(32)], source="demo"))
            if time.monotonic() >= next_sample:
                timeline.add(svc.sample(timeline.t(), users.report.interactions))
                next_sample = time.monotonic() + 5
            if time.monotonic() >= next_eval:
                rv = svc.reward_version()
                now = svc.evaluate(prompts.held_out, s.eval_samples, s.max_tokens, judge, seed=30_000)
                rec = timeline.add(eval_record(now, before, svc.proxy([(x.prompt, x.text) for x in before]), rv,
                                               timeline.t(), "during"))
                say(f"  eval v{rec['policy_version']} (reward model v{rv}): gold {rec['gold_mean']:+.3f}, "
                    f"proxy gain {rec['proxy_gain_sd']:+.2f} sd, gold gain {rec['gold_gain_sd']:+.2f} sd, "
                    f"KL {rec['kl_nats']:.4f}, {rec['length_tokens']:.0f} tokens; "
                    f"{users.report.interactions} user interactions")
                next_eval = time.monotonic() + s.eval_every_s
            time.sleep(1.0)
        stop.set()
        svc.trainer.Pause(trainer_pb2.PauseRequest(), timeout=60)
        users_thread.join(120)
        t_online = timeline.t()

        # The final policy against the SFT policy, on the same prompts and seeds.
        say("final evaluation on the held-out prompts...")
        after = svc.evaluate(prompts.held_out, 2 * s.eval_samples, s.max_tokens, judge, seed=20_000)
        last = timeline.add(eval_record(after, before, svc.proxy([(x.prompt, x.text) for x in before]),
                                        svc.reward_version(), timeline.t(), "after"))
        final = timeline.add(svc.sample(timeline.t(), users.report.interactions))
        wr = win_rate([(x.prompt, x.text) for x in after], [(x.prompt, x.text) for x in before], judge)
        steps = [r for r in timeline.records if r["kind"] == "step"]
        if prom is not None:
            add_throughput(prom, timeline)
        summary.update({
            "gold_before": {"mean": first["gold_mean"], "low": first["gold_low"], "high": first["gold_high"]},
            "gold_after": {"mean": last["gold_mean"], "low": last["gold_low"], "high": last["gold_high"]},
            "proxy_gain_sd": last["proxy_gain_sd"], "gold_gain_sd": last["gold_gain_sd"], "gap_sd": last["gap_sd"],
            "kl_final": last["kl_nats"], "win_rate": asdict(wr),
            "versions": {"policy": last["policy_version"], "reward": last["reward_version"]},
            "feedback": final["feedback"], "labels": final["labels"],
            "steps": {"rollouts": sum(r["step_kind"] == "rollouts" for r in steps),
                      "labels": sum(r["step_kind"] == "labels" for r in steps)},
            "examples": examples(before, after),
            "users": users.report.summary(),
        })
        summary["minutes"] = round(t_online / 60, 2)
        summary["stages"]["online"] = {"seconds": round(t_online, 1), "steps": len(steps),
                                       "interactions": users.report.interactions}
        if users.report.failures:
            summary["notes"].append(f"{len(users.report.failures)} user interactions failed; the first: "
                                    f"{users.report.failures[0].error[:300]}")
    finally:
        if prom is not None:
            prom.stop()
        st.stop()


def add_throughput(prom, timeline: Timeline) -> None:
    """Generated tokens per second by kind (rollouts, served answers), from Prometheus."""
    end = time.time()
    start = end - timeline.t()
    try:
        series = prom.query_range("sum by (kind) (rate(rlhf_policy_generated_tokens_total[1m]))", start, end, 10)
    except (OSError, RuntimeError) as e:
        print(f"Prometheus query failed: {e}", flush=True)
        return
    points: dict[float, dict[str, float]] = {}
    for ser in series:
        for ts, v in ser.points:
            kind = ser.labels.get("kind", "all")
            points.setdefault(ts, {})[{"api": "serve"}.get(kind, kind)] = v  # api: answers to users
    for ts in sorted(points):
        timeline.add({"kind": "throughput", "t": round(ts - start, 1), "tokens_per_s": points[ts]})


def examples(before: list[Scored], after: list[Scored], n: int = 4) -> list[dict]:
    """The first answer to each of the first `n` held-out prompts, before and after."""
    out, seen = [], set()
    for b, a in zip(before, after):
        if b.prompt in seen:
            continue
        seen.add(b.prompt)
        out.append({"prompt": b.prompt, "before": b.text, "after": a.text, "gold_before": b.gold,
                    "gold_after": a.gold})
        if len(out) == n:
            break
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="'smollm2' (default), 'tiny', or an HF model folder")
    ap.add_argument("--minutes", type=float, default=None, help="the whole run, stages included (default 20; "
                                                                 "4 with --tiny)")
    ap.add_argument("--tiny", action="store_true", help="the tiny models at the smallest sizes (CI's demo-smoke)")
    ap.add_argument("--lora-rank", type=int, default=None, help="train a LoRA adapter of this rank (0 = full weights)")
    ap.add_argument("--lr", type=float, default=None, help="the online trainer's learning rate")
    ap.add_argument("--run-dir", type=Path, default=None, help="where logs, timeline and report go "
                                                               "(default runs/demo-<time>)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                    help="any other field of DemoSettings, e.g. --set think_s=8 --set eval_every_s=180")
    args = ap.parse_args(argv)
    s = DemoSettings.tiny() if args.tiny else DemoSettings()
    overrides = {k: v for k, v in {"model": args.model, "minutes": args.minutes, "lora_rank": args.lora_rank,
                                   "lr": args.lr, "seed": args.seed}.items() if v is not None}
    s = replace(s, **overrides)
    for item in args.set:
        name, _, value = item.partition("=")
        default = getattr(s, name, None)
        if name not in DemoSettings.__dataclass_fields__ or isinstance(default, dict) or not value:
            ap.error(f"--set {item}: not NAME=VALUE with NAME one of "
                     f"{', '.join(k for k, v in asdict(s).items() if not isinstance(v, dict))}")
        try:
            s = replace(s, **{name: type(default)(value)})
        except ValueError:
            ap.error(f"--set {item}: {value!r} is not a {type(default).__name__}")
    if s.minutes * 60 < s.reserve_s + 120:
        ap.error(f"--minutes={s.minutes}: too short, the run needs at least {(s.reserve_s + 120) / 60:.1f}")
    if s.lora_rank < 0 or s.lr <= 0:
        ap.error(f"--lora-rank={s.lora_rank} must be >= 0 and --lr={s.lr} > 0")
    for name, ok, rule in [("users", s.users >= 1, ">= 1"), ("think_s", s.think_s >= 0, ">= 0"),
                           ("eval_every_s", s.eval_every_s > 0, "> 0"), ("eval_samples", s.eval_samples >= 1, ">= 1"),
                           ("eval_prompts", 2 <= s.eval_prompts <= 24, "within [2, 24] (of 34 chitchat prompts)"),
                           ("feedback_share", 0 <= s.feedback_share <= 1, "within [0, 1]")]:
        if not ok:
            ap.error(f"{name}={getattr(s, name)}: must be {rule}")
    run_dir = args.run_dir or Path("runs") / f"demo-{dt.datetime.now().strftime('%Y%m%d-%H%M%S')}"
    run_dir.mkdir(parents=True, exist_ok=True)
    for stale in ("weights", "feedback", "prometheus"):  # the broker's topics are new each run
        shutil.rmtree(run_dir / stale, ignore_errors=True)
    t_start = time.monotonic()
    deadline = t_start + s.minutes * 60
    names = {"smollm2": "SmolLM2-135M-Instruct", "tiny": "the tiny test model"}
    summary: dict = {"model": names.get(s.model, s.model), "minutes": s.minutes,
                     "machine": f"{cpu_name()}, {os.cpu_count()} cores",
                     "started": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                     "settings": asdict(s), "stages": {}, "notes": [], "prometheus": ""}

    def stage(title: str):
        say(f"\n== {title} ({(time.monotonic() - t_start) / 60:.1f} min into the run)")
        return time.monotonic()

    t = stage("stage 0: the gold judge (the simulated users' hidden taste)")
    judge = stage_gold(s)
    summary["stages"]["gold judge"] = {"seconds": round(time.monotonic() - t, 1),
                                       "held_out_accuracy": judge.held_out_accuracy}

    base = base_model(s)
    from transformers import AutoTokenizer

    from .models import as_chat, tiny_prompts

    tok = AutoTokenizer.from_pretrained(base)

    def render(text: str) -> str:
        return as_chat(tok, [text])[0]

    if s.model == "tiny":  # its vocabulary is made up: prompts in its words
        texts = tiny_prompts(24 + s.eval_prompts, seed=s.seed + 3)
        prompts = Prompts(train=texts[s.eval_prompts:], held_out=texts[:s.eval_prompts])
    else:
        prompts = chitchat_prompts(s)
    summary["prompts"] = {"train": len(prompts.train), "held_out": len(prompts.held_out)}

    t = stage(f"stage 1: SFT of {base} on demonstrations")
    sft, info = stage_sft(s, base, prompts, render)
    summary["stages"]["SFT"] = {"seconds": round(time.monotonic() - t, 1), **info}
    say(f"SFT model: {sft} (loss {info['first_loss']} -> {info['last_loss']} on {info['rows']} demonstrations)")

    t = stage("stage 2: the system's reward model (MiniLM, Bradley-Terry) on a small label set")
    rm, info = stage_reward_model(s, render)
    summary["stages"]["reward model"] = {"seconds": round(time.monotonic() - t, 1), **info}
    say(f"reward model: {rm} (held-out accuracy {info['held_out_accuracy']} on {info['held_out_pairs']} pairs)")

    t = stage("stage 3: online RLHF with simulated users")
    online(s, run_dir, judge, sft, rm, prompts, render, deadline, summary)
    summary["seconds_total"] = round(time.monotonic() - t_start, 1)
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=1, default=float) + "\n")

    from .demo_report import write_report

    report = write_report(run_dir)
    g0, g1, wr = summary["gold_before"], summary["gold_after"], summary["win_rate"]
    say(f"\ngold reward {g0['mean']:+.3f} -> {g1['mean']:+.3f}; win rate against SFT {wr['rate']:.2f} "
        f"[{wr['low']:.2f}, {wr['high']:.2f}]; KL {summary['kl_final']:.4f}; proxy-gold gap "
        f"{summary['gap_sd']:+.2f} sd; policy v{summary['versions']['policy']}, reward model "
        f"v{summary['versions']['reward']}")
    size = sum(f.stat().st_size for f in run_dir.rglob("*") if f.is_file()) / 1e9
    say(f"report: {report} ({summary['seconds_total'] / 60:.1f} minutes in all; the run folder holds {size:.1f} GB, "
        f"most of it the last weight versions in {run_dir / 'weights'})")


if __name__ == "__main__":
    main()
