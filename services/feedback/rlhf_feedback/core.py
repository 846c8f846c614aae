"""The feedback gateway, independent of gRPC and HTTP.

`FeedbackCore.submit` checks a batch of items, tells new ones from repeats by their client
`feedback_id`, writes the new ones to rlhf.feedback and waits for the broker's
acknowledgement, then remembers their ids in `AcceptedStore` (SQLite). Order of effects:
checks -> broker -> store. A broker failure answers UNAVAILABLE and remembers nothing, so
the client's retry with the same ids is accepted; records that did reach the broker before
the failure are recognised downstream by their feedback id (the join counts them as
duplicates, no label is made twice).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import sqlite3
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Literal

from rlhf.events.v1 import events_pb2
from rlhf_common.errors import AlreadyExists, InvalidInput

from .metrics import FeedbackMetrics

Kind = Literal["thumb", "rating", "pairwise", "edit"]
KINDS: tuple[Kind, ...] = ("thumb", "rating", "pairwise", "edit")
MAX_ID_CHARS = 128
MAX_USER_CHARS = 256


@dataclass(frozen=True)
class FeedbackItem:
    """One feedback item as a client sent it; exactly one signal is set."""

    feedback_id: str
    generation_id: str
    thumb: Literal["up", "down"] | None = None
    rating: tuple[float, float, float] | None = None  # (value, scale_min, scale_max)
    other_generation_id: str | None = None  # pairwise: the other answer (B) ...
    choice: Literal["a", "b", "tie"] | None = None  # ... and which one the user preferred
    edited_response: str | None = None
    comment: str = ""
    user_id: str = ""
    session_id: str = ""
    # "ai" only for the service's own AI labeller; the public APIs always submit "human".
    source: Literal["human", "ai"] = "human"

    @property
    def kinds(self) -> list[Kind]:
        given = {"thumb": self.thumb is not None, "rating": self.rating is not None,
                 "pairwise": self.other_generation_id is not None or self.choice is not None,
                 "edit": self.edited_response is not None}
        return [k for k in KINDS if given[k]]

    @property
    def kind(self) -> Kind:
        return self.kinds[0]

    def body_sha256(self) -> str:
        """The item's canonical body: the same feedback_id with another body is a conflict."""
        body = asdict(self)
        if body["source"] == "human":  # the hash of a human item is the same as before sources existed
            del body["source"]
        return hashlib.sha256(json.dumps(body, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


@dataclass(frozen=True)
class ItemResult:
    feedback_id: str
    duplicate: bool


def _printable_id(value: str, max_chars: int) -> bool:
    return 0 < len(value) <= max_chars and value.isprintable() and not any(c.isspace() for c in value)


def validate(items: list[FeedbackItem], max_items: int, max_text_chars: int) -> None:
    """Raise InvalidInput naming the first bad field; the same rules for gRPC and REST."""
    if not items:
        raise InvalidInput("items: at least one feedback item is required")
    if len(items) > max_items:
        raise InvalidInput(f"items: {len(items)} items exceed the limit of {max_items}")
    for i, it in enumerate(items):
        at = f"items[{i}]"
        if not _printable_id(it.feedback_id, MAX_ID_CHARS):
            raise InvalidInput(f"{at}.feedback_id={it.feedback_id[:MAX_ID_CHARS + 1]!r}: must be 1-{MAX_ID_CHARS} "
                               "printable characters without spaces")
        if not _printable_id(it.generation_id, MAX_ID_CHARS):
            raise InvalidInput(f"{at}.generation_id={it.generation_id[:MAX_ID_CHARS + 1]!r}: must be the "
                               "generation_id the policy returned with the answer")
        if len(it.kinds) != 1:
            given = ", ".join(it.kinds) or "none"
            raise InvalidInput(f"{at}: exactly one of thumb, rating, pairwise, edit is required (given: {given})")
        if it.thumb is not None and it.thumb not in ("up", "down"):
            raise InvalidInput(f"{at}.thumb={it.thumb!r}: must be 'up' or 'down'")
        if it.rating is not None:
            value, lo, hi = it.rating
            if not all(math.isfinite(x) for x in it.rating):
                raise InvalidInput(f"{at}.rating: value and scale must be finite numbers")
            if not lo < hi:
                raise InvalidInput(f"{at}.rating.scale_min={lo:g}: must be below scale_max={hi:g}")
            if not lo <= value <= hi:
                raise InvalidInput(f"{at}.rating.value={value:g}: must be within the scale [{lo:g}, {hi:g}]")
        if it.kind == "pairwise":
            other = it.other_generation_id or ""
            if not _printable_id(other, MAX_ID_CHARS):
                raise InvalidInput(f"{at}.pairwise.other_generation_id={other[:MAX_ID_CHARS + 1]!r}: must be the "
                                   "generation_id of another answer to the same prompt")
            if other == it.generation_id:
                raise InvalidInput(f"{at}.pairwise.other_generation_id: must differ from generation_id")
            if it.choice not in ("a", "b", "tie"):
                raise InvalidInput(f"{at}.pairwise.choice={it.choice!r}: must be 'a' (this answer), 'b' (the other) "
                                   "or 'tie'")
        if it.edited_response is not None and not 0 < len(it.edited_response) <= max_text_chars:
            raise InvalidInput(f"{at}.edit.edited_response: must be 1-{max_text_chars} characters "
                               f"(got {len(it.edited_response)})")
        if len(it.comment) > max_text_chars:
            raise InvalidInput(f"{at}.comment: at most {max_text_chars} characters (got {len(it.comment)})")
        for name in ("user_id", "session_id"):
            if len(getattr(it, name)) > MAX_USER_CHARS:
                raise InvalidInput(f"{at}.{name}: at most {MAX_USER_CHARS} characters")


_THUMBS = {"up": events_pb2.THUMB_UP, "down": events_pb2.THUMB_DOWN}
_SOURCES = {"human": events_pb2.LABEL_SOURCE_HUMAN, "ai": events_pb2.LABEL_SOURCE_AI}
_CHOICES = {"a": events_pb2.CHOICE_A, "b": events_pb2.CHOICE_B, "tie": events_pb2.CHOICE_TIE}


def to_record(it: FeedbackItem, now_ms: int) -> events_pb2.Feedback:
    r = events_pb2.Feedback(feedback_id=it.feedback_id, generation_id=it.generation_id, comment=it.comment,
                            user_id=it.user_id, session_id=it.session_id, source=_SOURCES[it.source],
                            body_sha256=it.body_sha256(), created_unix_ms=now_ms)
    if it.kind == "thumb":
        r.thumb = _THUMBS[it.thumb]
    elif it.kind == "rating":
        value, lo, hi = it.rating
        r.rating.CopyFrom(events_pb2.Rating(value=value, scale_min=lo, scale_max=hi))
    elif it.kind == "pairwise":
        r.pairwise.CopyFrom(events_pb2.Pairwise(other_generation_id=it.other_generation_id,
                                                choice=_CHOICES[it.choice]))
    else:
        r.edit.CopyFrom(events_pb2.Edit(edited_response=it.edited_response))
    return r


class AcceptedStore:
    """The ids of accepted feedback with their body hashes, and the gateway's counts, in
    SQLite. Blocking: use it from one worker thread."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        # FULL: an id is remembered only once it is on disk, so a crash cannot forget an
        # acceptance that a client already saw.
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.execute("CREATE TABLE IF NOT EXISTS accepted (feedback_id TEXT PRIMARY KEY, body_sha256 TEXT NOT NULL,"
                        " kind TEXT NOT NULL, accepted_unix_ms INTEGER NOT NULL)")
        self.db.execute("CREATE TABLE IF NOT EXISTS counts (kind TEXT NOT NULL, outcome TEXT NOT NULL,"
                        " n INTEGER NOT NULL, PRIMARY KEY (kind, outcome))")

    def lookup(self, ids: list[str]) -> dict[str, str]:
        """feedback_id -> body hash, for the ids accepted before."""
        out: dict[str, str] = {}
        for start in range(0, len(ids), 500):
            part = ids[start:start + 500]
            rows = self.db.execute(f"SELECT feedback_id, body_sha256 FROM accepted WHERE feedback_id IN "
                                   f"({','.join('?' * len(part))})", part)
            out.update(rows.fetchall())
        return out

    def record(self, accepted: list[tuple[str, str, str]], counts: dict[tuple[str, str], int]) -> None:
        """Remember (feedback_id, body hash, kind) rows and add to the counts, in one transaction."""
        now = int(time.time() * 1000)
        with self.db:
            self.db.execute("BEGIN IMMEDIATE")
            self.db.executemany("INSERT OR IGNORE INTO accepted VALUES (?, ?, ?, ?)",
                                [(i, h, k, now) for i, h, k in accepted])
            self.db.executemany("INSERT INTO counts VALUES (?, ?, ?) ON CONFLICT(kind, outcome) DO UPDATE SET "
                                "n = n + excluded.n", [(k, o, n) for (k, o), n in counts.items() if n])

    def counts(self) -> dict[tuple[str, str], int]:
        return {(k, o): n for k, o, n in self.db.execute("SELECT kind, outcome, n FROM counts")}

    def close(self) -> None:
        self.db.close()


class FeedbackCore:
    """What the gRPC servicer and the REST app talk to.

    `send` writes records to rlhf.feedback and returns once the broker has acknowledged all of
    them, or raises NotReady (blocking; run here in a worker thread). Concurrent submissions
    of the same feedback_id are serialised in this process, so one of them is the original
    and the others are duplicates or conflicts.
    """

    def __init__(self, store: AcceptedStore, send: Callable[[list[events_pb2.Feedback]], None],
                 metrics: FeedbackMetrics | None, max_items: int, max_text_chars: int,
                 join_stats: Callable[[], dict[tuple[str, str], int]] | None = None,
                 join_sources: Callable[[], dict[str, int]] | None = None):
        self.store, self.send, self.metrics = store, send, metrics
        self.max_items, self.max_text_chars = max_items, max_text_chars
        self.join_stats = join_stats  # non-blocking: a snapshot the join keeps
        self.join_sources = join_sources  # the same, labels by source
        self._db = ThreadPoolExecutor(max_workers=1, thread_name_prefix="feedback-store")
        self._reserved: set[str] = set()
        self._cond = asyncio.Condition()

    async def _blocking(self, fn, *args, pool=None):
        return await asyncio.get_running_loop().run_in_executor(pool, fn, *args)

    def _count(self, counts: dict[tuple[str, str], int]) -> None:
        if self.metrics is not None:
            for (kind, outcome), n in counts.items():
                if n:
                    self.metrics.items.labels(kind, outcome).inc(n)

    async def submit(self, items: list[FeedbackItem]) -> list[ItemResult]:
        try:
            validate(items, self.max_items, self.max_text_chars)
        except InvalidInput:
            await self._blocking(self.store.record, [], {("any", "invalid"): 1}, pool=self._db)
            self._count({("any", "invalid"): 1})
            raise
        ids = {it.feedback_id for it in items}
        async with self._cond:
            await self._cond.wait_for(lambda: not ids & self._reserved)
            self._reserved |= ids
        try:
            return await self._submit(items)
        finally:
            async with self._cond:
                self._reserved -= ids
                self._cond.notify_all()

    async def _submit(self, items: list[FeedbackItem]) -> list[ItemResult]:
        known = await self._blocking(self.store.lookup, sorted({it.feedback_id for it in items}), pool=self._db)
        hashes = [it.body_sha256() for it in items]
        new: dict[str, tuple[FeedbackItem, str]] = {}
        results, counts = [], {}
        for it, h in zip(items, hashes):
            before = known.get(it.feedback_id) or (new[it.feedback_id][1] if it.feedback_id in new else None)
            if before is not None and before != h:
                await self._blocking(self.store.record, [], {(it.kind, "conflict"): 1}, pool=self._db)
                self._count({(it.kind, "conflict"): 1})
                raise AlreadyExists(f"feedback_id {it.feedback_id!r} was already used for a different item; "
                                    "use a new id for new feedback")
            duplicate = before is not None
            if not duplicate:
                new[it.feedback_id] = (it, h)
            results.append(ItemResult(it.feedback_id, duplicate))
            key = (it.kind, "duplicate" if duplicate else "accepted")
            counts[key] = counts.get(key, 0) + 1
        if new:
            now = int(time.time() * 1000)
            try:
                await self._blocking(self.send, [to_record(it, now) for it, _ in new.values()])
            except Exception:
                self._count({(it.kind, "unavailable"): 1 for it, _ in new.values()})
                raise
        await self._blocking(self.store.record, [(i, h, it.kind) for i, (it, h) in new.items()], counts,
                             pool=self._db)
        self._count(counts)
        return results

    async def stats(self) -> dict[tuple[str, str], int]:
        """The gateway's counts (accepted, duplicate, conflict...) and, where this process runs
        the join, the join's (joined, waiting, orphan, expired...)."""
        out = dict(await self._blocking(self.store.counts, pool=self._db))
        if self.join_stats is not None:
            for key, n in self.join_stats().items():
                out[key] = out.get(key, 0) + n
        return out

    def source_stats(self) -> dict[str, int]:
        """Labels made by this process's join, by source (human, ai); empty without a join."""
        return dict(self.join_sources()) if self.join_sources is not None else {}

    def close(self) -> None:
        self._db.shutdown(wait=True)
        self.store.close()
