"""Training examples for the reward model, made from joined feedback labels (rlhf.labels).

- A pairwise choice is a pair: the preferred answer over the other (a tie makes none).
- An edit is a pair: the user's edited text over the original answer.
- Ratings and thumbs are relative judgements only between answers to the same prompt: two
  rated answers whose ratings (on a 0-1 scale) differ by at least `min_rating_gap` make a
  pair, and so do an answer with a thumb up and one with a thumb down.
- A thumb with no opposite thumb on its prompt is a pointwise example (up: score high,
  down: score low), weighted less than pairs by the trainer.

Examples are split by prompt (a hash of the prompt text): a held-out prompt's examples never
train, so held-out accuracy measures the model on prompts it has not seen.

Labels from the AI labeller (source "ai") train with their own weight (`ai_weight`; 0 leaves
them out) and never enter the held-out slice: the gate judges a model by humans only.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass, field

from rlhf.events.v1 import events_pb2


@dataclass(frozen=True)
class Pair:
    prompt: str
    chosen: str
    rejected: str
    source: str  # pairwise, edit, rating, thumb
    label_ids: tuple[str, ...]
    weight: float = 1.0  # in the loss: 1 for human labels, the configured AI weight for AI labels


@dataclass(frozen=True)
class Point:
    prompt: str
    response: str
    target: float  # 1.0 thumb up, 0.0 thumb down
    label_id: str


def held_out(prompt: str, fraction: float) -> bool:
    """Whether a prompt belongs to the held-out slice (deterministic in its text)."""
    return int(hashlib.sha256(prompt.encode()).hexdigest()[:8], 16) < fraction * 0x1_0000_0000


@dataclass
class _Rated:
    label_id: str
    response: str
    value: float  # thumbs: 1 up, 0 down; ratings: position on the scale, 0..1


@dataclass
class _PromptJudgements:
    rated: list[_Rated] = field(default_factory=list)
    thumbs: list[_Rated] = field(default_factory=list)
    paired_thumbs: set[str] = field(default_factory=set)


class ExampleBook:
    """Examples made so far, bounded: at most `max_prompts` prompts keep their ratings and
    thumbs for pairing (the least recently judged are forgotten first), and at most
    `max_examples` pairs and points are kept per split (the oldest go first)."""

    def __init__(self, held_out_fraction: float, min_rating_gap: float = 0.25, max_prompts: int = 10_000,
                 max_examples: int = 50_000, ai_weight: float = 1.0):
        self.held_out_fraction = held_out_fraction
        self.ai_weight = ai_weight
        self.min_rating_gap = min_rating_gap
        self.max_prompts, self.max_examples = max_prompts, max_examples
        self.seen: OrderedDict[str, None] = OrderedDict()
        self.prompts: OrderedDict[str, _PromptJudgements] = OrderedDict()
        self.pairs: dict[bool, list[Pair]] = {False: [], True: []}  # keyed by held-out
        self.points: dict[bool, list[Point]] = {False: [], True: []}
        self.skipped: dict[str, int] = {}

    def add(self, label: events_pb2.Label) -> int:
        """Take one label; returns how many examples it made (0 for a repeat or a tie)."""
        if label.label_id in self.seen:
            return 0
        self.seen[label.label_id] = None
        while len(self.seen) > 4 * self.max_examples:
            self.seen.popitem(last=False)
        kind = label.WhichOneof("signal")
        if not label.responses or kind is None:
            return self._skip("malformed")
        made = {"pairwise": self._pairwise, "edit": self._edit, "rating": self._rated,
                "thumb": self._rated}[kind](label)
        return made

    def _skip(self, why: str) -> int:
        self.skipped[why] = self.skipped.get(why, 0) + 1
        return 0

    def _store(self, held: bool, item) -> None:
        bucket = (self.pairs if isinstance(item, Pair) else self.points)[held]
        bucket.append(item)
        if len(bucket) > self.max_examples:
            del bucket[: len(bucket) - self.max_examples]

    def _pairwise(self, label: events_pb2.Label) -> int:
        if len(label.responses) < 2:
            return self._skip("malformed")
        a, b = label.responses[0].text, label.responses[1].text
        choice = label.pairwise.choice
        if choice not in (events_pb2.CHOICE_A, events_pb2.CHOICE_B):
            return self._skip("tie")
        chosen, rejected = (a, b) if choice == events_pb2.CHOICE_A else (b, a)
        if chosen == rejected:
            return self._skip("same text")
        held = held_out(label.prompt, self.held_out_fraction)
        weight = 1.0
        if label.source == events_pb2.LABEL_SOURCE_AI:
            if held:
                return self._skip("ai label on a held-out prompt")
            if self.ai_weight <= 0:
                return self._skip("ai label (weight 0)")
            weight = self.ai_weight
        self._store(held, Pair(label.prompt, chosen, rejected, "pairwise", (label.label_id,), weight))
        return 1

    def _edit(self, label: events_pb2.Label) -> int:
        if len(label.responses) < 2:
            return self._skip("malformed")
        original, edited = label.responses[0].text, label.responses[1].text
        if original == edited:
            return self._skip("same text")
        self._store(held_out(label.prompt, self.held_out_fraction),
                    Pair(label.prompt, edited, original, "edit", (label.label_id,)))
        return 1

    def _rated(self, label: events_pb2.Label) -> int:
        held = held_out(label.prompt, self.held_out_fraction)
        book = self.prompts.pop(label.prompt, None) or _PromptJudgements()
        self.prompts[label.prompt] = book  # most recently judged last
        while len(self.prompts) > self.max_prompts:
            self.prompts.popitem(last=False)
        response = label.responses[0].text
        made = 0
        if label.WhichOneof("signal") == "rating":
            r = label.rating
            new = _Rated(label.label_id, response, (r.value - r.scale_min) / (r.scale_max - r.scale_min))
            for old in book.rated:
                if abs(old.value - new.value) >= self.min_rating_gap and old.response != new.response:
                    hi, lo = (new, old) if new.value > old.value else (old, new)
                    self._store(held, Pair(label.prompt, hi.response, lo.response, "rating",
                                           (hi.label_id, lo.label_id)))
                    made += 1
            book.rated.append(new)
            return made
        new = _Rated(label.label_id, response, 1.0 if label.thumb == events_pb2.THUMB_UP else 0.0)
        for old in book.thumbs:
            if old.value != new.value and old.response != new.response:
                up, down = (new, old) if new.value > old.value else (old, new)
                self._store(held, Pair(label.prompt, up.response, down.response, "thumb",
                                       (up.label_id, down.label_id)))
                if old.label_id not in book.paired_thumbs:  # no longer unpaired: its point goes
                    self.points[held] = [x for x in self.points[held] if x.label_id != old.label_id]
                book.paired_thumbs |= {old.label_id, new.label_id}
                made += 1
        book.thumbs.append(new)
        if new.label_id not in book.paired_thumbs:
            # Unpaired so far: a pointwise example (a later opposite thumb also pairs it).
            self._store(held, Point(label.prompt, response, new.value, label.label_id))
            made += 1
        return made
