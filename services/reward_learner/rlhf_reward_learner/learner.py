"""One round of online reward learning: fine-tune a copy of the live reward model on the
examples made from labels, compare both on the held-out examples, and keep the copy only if
it is at least as accurate (the gate). Blocking; torch only, no Kafka, no gRPC.
"""

from __future__ import annotations

import copy
import json
import logging
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from rlhf_common.algos.bradley_terry import bradley_terry_loss, pairwise_accuracy
from rlhf_common.text import encode_pairs, ensure_pad_token
from rlhf_common.weights import MANIFEST

from .examples import ExampleBook, Pair, Point

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainSettings:
    lr: float = 2e-4
    epochs: int = 2
    batch_pairs: int = 16
    point_weight: float = 0.25  # weight of the pointwise (unpaired thumb) term
    max_length: int = 256
    min_heldout_pairs: int = 8
    seed: int = 0


@dataclass(frozen=True)
class RoundResult:
    round: int
    published: bool
    reason: str
    live_version: int  # the version served before this round
    live_accuracy: float  # held-out pairwise accuracy of the live model (NaN: not evaluated)
    candidate_accuracy: float  # of the fine-tuned copy (NaN: not trained)
    heldout_pairs: int
    train_pairs: int
    train_points: int
    loss_first: float
    loss_last: float
    seconds: float


class RewardModelState:
    """The live reward model (a sequence-classification model with one logit) and its version."""

    def __init__(self, path: str | Path, version: int):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.path, self.version = str(path), version
        self.tokenizer = ensure_pad_token(AutoTokenizer.from_pretrained(self.path))
        self.model = AutoModelForSequenceClassification.from_pretrained(self.path, dtype=torch.float32).eval()
        if self.model.config.pad_token_id is None:
            self.model.config.pad_token_id = self.tokenizer.pad_token_id

    @classmethod
    def from_folder(cls, path: str | Path) -> "RewardModelState":
        manifest = Path(path) / MANIFEST
        version = json.loads(manifest.read_text())["version"] if manifest.exists() else 0
        return cls(path, version)


def _scores(model, tok, prompts: list[str], responses: list[str], max_length: int) -> torch.Tensor:
    enc, _ = encode_pairs(tok, prompts, responses, max_length, padded=True)
    return model(**enc).logits[:, 0]


def accuracy(model, tok, pairs: list[Pair], max_length: int, batch: int = 32) -> float:
    """Share of pairs where the chosen answer outscores the rejected one."""
    if not pairs:
        return float("nan")
    chosen, rejected = [], []
    with torch.inference_mode():
        for i in range(0, len(pairs), batch):
            part = pairs[i:i + batch]
            s = _scores(model, tok, [p.prompt for p in part] * 2, [p.chosen for p in part] + [p.rejected for p in part],
                        max_length)
            chosen.append(s[:len(part)])
            rejected.append(s[len(part):])
    return pairwise_accuracy(torch.cat(chosen), torch.cat(rejected))


def train_round(live: RewardModelState, book: ExampleBook, s: TrainSettings, round_no: int):
    """Returns (result, candidate model or None). The live model is not changed."""
    t0 = time.perf_counter()
    held, pairs, points = list(book.pairs[True]), list(book.pairs[False]), list(book.points[False])

    def result(published: bool, reason: str, live_acc=float("nan"), cand_acc=float("nan"), losses=()):
        return RoundResult(round_no, published, reason, live.version, live_acc, cand_acc, len(held), len(pairs),
                           len(points), losses[0] if losses else float("nan"), losses[-1] if losses else float("nan"),
                           time.perf_counter() - t0)

    if len(held) < s.min_heldout_pairs:
        return result(False, f"gate needs at least {s.min_heldout_pairs} held-out pairs, has {len(held)}"), None
    if not pairs and not points:
        return result(False, "no training examples"), None
    live_acc = accuracy(live.model, live.tokenizer, held, s.max_length)
    torch.manual_seed(s.seed + round_no)
    rng = random.Random(s.seed + round_no)
    cand = copy.deepcopy(live.model).train()
    opt = torch.optim.Adam([p for p in cand.parameters() if p.requires_grad], lr=s.lr)
    losses = []
    items: list[Pair | Point] = [*pairs, *points]
    for _ in range(s.epochs):
        rng.shuffle(items)
        for i in range(0, len(items), s.batch_pairs):
            part = items[i:i + s.batch_pairs]
            ps = [x for x in part if isinstance(x, Pair)]
            pts = [x for x in part if isinstance(x, Point)]
            loss = torch.zeros(())
            if ps:
                sc = _scores(cand, live.tokenizer, [p.prompt for p in ps] * 2,
                             [p.chosen for p in ps] + [p.rejected for p in ps], s.max_length)
                weight = torch.tensor([p.weight for p in ps])
                loss = loss + (bradley_terry_loss(sc[:len(ps)], sc[len(ps):], reduction="none") * weight).sum()
            if pts:
                sc = _scores(cand, live.tokenizer, [p.prompt for p in pts], [p.response for p in pts], s.max_length)
                target = torch.tensor([p.target for p in pts])
                loss = loss + s.point_weight * torch.nn.functional.binary_cross_entropy_with_logits(
                    sc, target, reduction="sum")
            loss = loss / len(part)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(cand.parameters(), 1.0)
            opt.step()
            losses.append(float(loss.detach()))
    cand.eval()
    cand_acc = accuracy(cand, live.tokenizer, held, s.max_length)
    if cand_acc < live_acc:
        return result(False, f"held-out accuracy would drop: {cand_acc:.4f} < {live_acc:.4f}", live_acc, cand_acc,
                      losses), None
    return result(True, f"held-out accuracy {cand_acc:.4f} >= {live_acc:.4f}", live_acc, cand_acc, losses), cand
