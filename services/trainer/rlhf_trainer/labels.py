"""Preference pairs for the trainer's steps on feedback labels (rlhf.labels).

A pairwise choice (not a tie) prefers one answer over the other; an edit prefers the user's
text over the policy's answer. Other labels (thumbs, ratings) teach the policy through the
reward model instead, and are passed over here. Pairs are tokenized the way the policy
tokenizes prompts, so the trainer learns on the token ids the policy would produce.
"""

from __future__ import annotations

from dataclasses import dataclass

from rlhf.events.v1 import events_pb2
from rlhf_common.bus import Received


@dataclass(frozen=True)
class LabelPair:
    label_id: str
    prompt: list[int]
    chosen: list[int]
    rejected: list[int]
    partition: int
    offset: int


def pair_texts(label: events_pb2.Label) -> tuple[str, str] | None:
    """(chosen, rejected) text of a label that prefers one text over another, else None."""
    kind = label.WhichOneof("signal")
    if len(label.responses) < 2 or kind not in ("pairwise", "edit"):
        return None
    a, b = label.responses[0].text, label.responses[1].text
    if kind == "edit":
        return (b, a) if a != b else None
    if label.pairwise.choice == events_pb2.CHOICE_A:
        return a, b
    if label.pairwise.choice == events_pb2.CHOICE_B:
        return b, a
    return None  # a tie prefers neither


class PairBuffer:
    """Pairs waiting for a step, in arrival order, and the offsets that are safe to resume from."""

    def __init__(self, tokenizer, max_tokens: int):
        self.tokenizer, self.max_tokens = tokenizer, max_tokens
        eos = tokenizer.eos_token_id
        self.eos = [eos] if eos is not None else []
        self.pending: list[LabelPair] = []
        self.read_upto: dict[int, int] = {}  # partition -> offset after the last label read
        self.passed = 0  # labels that make no pair

    def add(self, rec: Received[events_pb2.Label]) -> bool:
        self.read_upto[rec.partition] = max(self.read_upto.get(rec.partition, 0), rec.offset + 1)
        texts = pair_texts(rec.record)
        if texts is None:
            self.passed += 1
            return False
        tok, n = self.tokenizer, self.max_tokens
        prompt = tok(rec.record.prompt).input_ids[-n:] or self.eos
        chosen, rejected = ((tok(t, add_special_tokens=False).input_ids + self.eos)[:n] for t in texts)
        self.pending.append(LabelPair(rec.record.label_id, prompt, chosen, rejected, rec.partition, rec.offset))
        return True

    def take(self, k: int) -> list[LabelPair]:
        out, self.pending = self.pending[:k], self.pending[k:]
        return out

    def safe_offsets(self) -> dict[int, int]:
        """Per partition, where to resume so that no pair still waiting is skipped."""
        out = dict(self.read_upto)
        for p in self.pending:
            out[p.partition] = min(out.get(p.partition, p.offset), p.offset)
        return out
