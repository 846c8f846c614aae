"""Offline training from files: SFT on demonstrations, DPO/IPO on preference pairs.

    python -m rlhf_jobs.offline sft --model DIR --data demos.jsonl --out DIR
    python -m rlhf_jobs.offline dpo --model DIR --data pairs.jsonl --out DIR [--beta 0.1]

Data is JSONL: {"prompt", "response"} for sft, {"prompt", "chosen", "rejected"} for dpo/ipo.
The output is an HF model folder (loadable by every service) plus `train_metrics.json`.
The reference for DPO/IPO is the starting model, frozen.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from rlhf_common.jsonl import DataError, read_jsonl
from rlhf_common.text import pad_id

FIELDS = {"sft": ("prompt", "response"), "dpo": ("prompt", "chosen", "rejected"), "ipo": ("prompt", "chosen", "rejected")}


@dataclass
class Encoded:
    prompts: list[list[int]]
    a: list[list[int]]  # responses (sft) or chosen
    b: list[list[int]]  # rejected (empty for sft)


def encode(tokenizer, rows: list[dict], mode: str, max_length: int) -> Encoded:
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []

    def resp(text: str) -> list[int]:
        return (tokenizer(text, add_special_tokens=False).input_ids + eos)[:max_length]

    prompts = [tokenizer(r["prompt"]).input_ids[-max_length:] or eos for r in rows]
    if mode == "sft":
        return Encoded(prompts, [resp(r["response"]) for r in rows], [])
    return Encoded(prompts, [resp(r["chosen"]) for r in rows], [resp(r["rejected"]) for r in rows])


def main(argv: list[str] | None = None) -> None:
    from tqdm import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rlhf_common.algos.logprobs import response_logprobs

    from .learners import PreferenceBatch, PreferenceLearner, SFTLearner

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("mode", choices=sorted(FIELDS))
    ap.add_argument("--model", required=True, help="Starting HF model folder")
    ap.add_argument("--data", required=True, type=Path, help="JSONL training data")
    ap.add_argument("--out", required=True, type=Path, help="Output model folder")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-5)
    ap.add_argument("--beta", type=float, default=0.1, help="DPO/IPO beta")
    ap.add_argument("--max-length", type=int, default=256, help="Token limit per prompt and per response")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    for name in ("epochs", "batch_size", "max_length"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')}={getattr(args, name)}: must be >= 1")
    if args.lr <= 0 or args.beta <= 0:
        ap.error(f"--lr={args.lr} and --beta={args.beta} must be > 0")
    try:
        rows = read_jsonl(args.data, FIELDS[args.mode])
    except (DataError, OSError) as e:
        sys.exit(f"error: {e}")

    torch.manual_seed(args.seed)
    tok = AutoTokenizer.from_pretrained(args.model)
    pad = pad_id(tok)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    model.train()
    data = encode(tok, rows, args.mode, args.max_length)
    n = len(data.prompts)
    if args.mode == "sft":
        learner = SFTLearner(model, args.lr, pad)
    else:
        learner = PreferenceLearner(model, args.lr, pad, beta=args.beta, kind=args.mode)
        ref = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
        with torch.no_grad():
            ref_a = [sum(x) for x in response_logprobs(ref, data.prompts, data.a, pad)]
            ref_b = [sum(x) for x in response_logprobs(ref, data.prompts, data.b, pad)]
        del ref
    rng = random.Random(args.seed)
    history = []
    bar = tqdm(total=args.epochs * ((n + args.batch_size - 1) // args.batch_size), desc=args.mode, unit="batch")
    for epoch in range(args.epochs):
        order = list(range(n))
        rng.shuffle(order)
        for s in range(0, n, args.batch_size):
            idx = order[s:s + args.batch_size]
            if args.mode == "sft":
                out = {"loss": learner.step([data.prompts[i] for i in idx], [data.a[i] for i in idx])}
            else:
                out = learner.step(PreferenceBatch([data.prompts[i] for i in idx], [data.a[i] for i in idx],
                                                   [data.b[i] for i in idx], [ref_a[i] for i in idx],
                                                   [ref_b[i] for i in idx]))
            history.append({"epoch": epoch, **out})
            bar.set_postfix({k: f"{v:.4f}" for k, v in out.items()})
            bar.update(1)
    bar.close()
    args.out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(args.out, safe_serialization=True)
    tok.save_pretrained(args.out)
    metrics = {"mode": args.mode, "rows": n, "epochs": args.epochs, "batches": len(history),
               "first_loss": history[0]["loss"], "last_loss": history[-1]["loss"], "history": history}
    (args.out / "train_metrics.json").write_text(json.dumps(metrics, indent=2))
    print(f"{args.mode}: {n} rows, loss {metrics['first_loss']:.4f} -> {metrics['last_loss']:.4f}; "
          f"model in {args.out}")


if __name__ == "__main__":
    main()
