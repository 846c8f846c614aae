"""The join: production feedback tied to the exact answers it judges, made into labels.

Feedback (topic rlhf.feedback) names the generation it judges (topic rlhf.generations); the
two topics are read independently, so either may come first. Generations are kept for a
while; feedback whose generations are not stored yet waits, and joins when they arrive.

Everything lives in one SQLite file per replica, and each `process()` call applies its whole
batch, the outbox of labels it made and the next offsets to read in a single transaction.
After a crash the caller seeks to `offsets()` and re-reads exactly what was not applied, so
every record takes effect once; labels are staged in the outbox and handed out until the
caller confirms them with `mark_sent`, so none is lost between the commit and Kafka. A label
sent twice (a crash after producing it, before `mark_sent`) carries the same label_id, which
is derived from the feedback id, so consumers recognise the repeat.

Each feedback record handed in ends in exactly one outcome: "joined", "duplicate", a dead
letter ("conflict", "invalid", "orphan", "expired"), or it is still waiting.

Every table is bounded: generations by `retention_s` and `max_generations`, tombstones of
evicted generations by `10 * max_generations` rows, waiting feedback by `wait_s`, the dedup
record of feedback ids by `retention_s + wait_s` (a repeat arriving later than that is treated
as new feedback), and the outbox by `mark_sent`. The bounds on time and count are applied by
`expire()`, which the caller runs regularly.
"""

from __future__ import annotations

import sqlite3
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from rlhf.events.v1 import events_pb2
from rlhf_common.trace import label_id

KINDS = ("thumb", "rating", "pairwise", "edit")
# How many evicted generation ids are remembered, per allowed stored generation.
TOMBSTONES_PER_GENERATION = 10

_SCHEMA = """
BEGIN;
CREATE TABLE IF NOT EXISTS offsets (
    kind TEXT NOT NULL, partition INTEGER NOT NULL, next_offset INTEGER NOT NULL,
    PRIMARY KEY (kind, partition));
CREATE TABLE IF NOT EXISTS generations (
    generation_id TEXT PRIMARY KEY, request_id TEXT NOT NULL, prompt TEXT NOT NULL,
    response TEXT NOT NULL, policy_version INTEGER NOT NULL, created_unix_ms INTEGER NOT NULL,
    stored_at REAL NOT NULL);
CREATE INDEX IF NOT EXISTS generations_stored_at ON generations (stored_at);
CREATE TABLE IF NOT EXISTS tombstones (seq INTEGER PRIMARY KEY, generation_id TEXT NOT NULL UNIQUE);
CREATE TABLE IF NOT EXISTS seen (
    feedback_id TEXT PRIMARY KEY, body_sha256 TEXT NOT NULL, seen_at REAL NOT NULL);
CREATE INDEX IF NOT EXISTS seen_seen_at ON seen (seen_at);
CREATE TABLE IF NOT EXISTS pending (
    feedback_id TEXT PRIMARY KEY, kind TEXT NOT NULL, generation_id TEXT NOT NULL,
    other_generation_id TEXT, arrived_at REAL NOT NULL, record BLOB NOT NULL);
CREATE INDEX IF NOT EXISTS pending_generation ON pending (generation_id);
CREATE INDEX IF NOT EXISTS pending_other_generation ON pending (other_generation_id);
CREATE INDEX IF NOT EXISTS pending_arrived_at ON pending (arrived_at);
CREATE TABLE IF NOT EXISTS outbox (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, label_id TEXT NOT NULL UNIQUE, record BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS totals (
    kind TEXT NOT NULL, outcome TEXT NOT NULL, n INTEGER NOT NULL, PRIMARY KEY (kind, outcome));
CREATE TABLE IF NOT EXISTS source_totals (source TEXT PRIMARY KEY, n INTEGER NOT NULL);
COMMIT;
"""


@dataclass(frozen=True)
class Incoming:
    """One decoded record and where it was read."""
    kind: Literal["generation", "feedback"]
    partition: int
    offset: int
    record: events_pb2.Generation | events_pb2.Feedback


@dataclass
class Batch:
    """What one `process()` or `expire()` call decided; the caller produces the labels and the
    dead letters. `counts` holds (signal kind, outcome) for this call; "waiting" there counts
    feedback that started to wait in this call (it may also have joined later in the same call)."""
    labels: list[events_pb2.Label] = field(default_factory=list)
    dead: list[tuple[events_pb2.Feedback, str, str]] = field(default_factory=list)
    counts: dict[tuple[str, str], int] = field(default_factory=Counter)
    # Labels made in this call by source of the feedback ("human", "ai").
    sources: dict[str, int] = field(default_factory=Counter)


@dataclass(frozen=True)
class _Answer:
    generation_id: str
    prompt: str
    response: str
    policy_version: int


def signal_kind(fb: events_pb2.Feedback) -> str:
    """The signal's name: one of KINDS, or "none" for feedback without a signal (which is invalid)."""
    return fb.WhichOneof("signal") or "none"


def source_name(source: int) -> str:
    """"ai" for the AI labeller's feedback, "human" otherwise (unset counts as human)."""
    return "ai" if source == events_pb2.LABEL_SOURCE_AI else "human"


def _needed(fb: events_pb2.Feedback) -> list[str]:
    """The generations the feedback judges: its own, and for a pairwise choice the other one."""
    if fb.WhichOneof("signal") == "pairwise":
        return [fb.generation_id, fb.pairwise.other_generation_id]
    return [fb.generation_id]


def _invalid(fb: events_pb2.Feedback) -> str | None:
    """Why the feedback can never join, judged from the record alone; None if it may."""
    if not fb.generation_id:
        return f"feedback {fb.feedback_id} names no generation"
    if fb.WhichOneof("signal") is None:
        return f"feedback {fb.feedback_id} carries no signal"
    if fb.WhichOneof("signal") == "pairwise":
        other = fb.pairwise.other_generation_id
        if not other:
            return f"pairwise feedback {fb.feedback_id} names no other generation"
        if other == fb.generation_id:
            return f"pairwise feedback {fb.feedback_id} compares generation {other} with itself"
    return None


def _label(fb: events_pb2.Feedback, answers: list[_Answer], created_unix_ms: int) -> events_pb2.Label:
    """The label for feedback whose answers (judged one first) are all known."""
    kind = fb.WhichOneof("signal")
    label = events_pb2.Label(
        label_id=label_id(fb.feedback_id), prompt=answers[0].prompt,
        responses=[events_pb2.LabelResponse(generation_id=a.generation_id, text=a.response,
                                            policy_version=a.policy_version) for a in answers],
        source=fb.source or events_pb2.LABEL_SOURCE_HUMAN, feedback_ids=[fb.feedback_id],
        created_unix_ms=created_unix_ms)
    if kind == "thumb":
        label.thumb = fb.thumb
    else:
        getattr(label, kind).CopyFrom(getattr(fb, kind))
    if kind == "edit":
        label.responses.add(generation_id="", text=fb.edit.edited_response, policy_version=-1)
    return label


class Join:
    """The join's state in a SQLite file at `path`; one object per replica, used by one thread
    at a time.

    Feedback waits at most `wait_s` seconds for its generations. Generations are kept for
    `retention_s` seconds from when they were stored here (not from when they were served, so
    a backlog read late still gets its full window), and at most `max_generations` of them.
    `now` gives seconds since the epoch.
    """

    def __init__(self, path: Path, wait_s: float, retention_s: float, max_generations: int,
                 now: Callable[[], float] = time.time):
        if wait_s <= 0 or retention_s <= 0 or max_generations <= 0:
            raise ValueError(f"wait_s ({wait_s}), retention_s ({retention_s}) and max_generations "
                             f"({max_generations}) must be positive")
        self.wait_s = wait_s
        self.retention_s = retention_s
        self.max_generations = max_generations
        self._now = now
        # Transactions are opened and closed explicitly (BEGIN IMMEDIATE ... COMMIT). The object
        # may be built by one thread and then used by a Kafka loop's thread, never by two at once.
        self._db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        # NORMAL: in WAL mode a commit survives a crash of the process; only a power loss or an
        # OS crash may undo the last commits, and then it undoes their offsets with them, so the
        # records are read and applied again: a label sent twice keeps its id, so the repeat is
        # recognised, and a dead letter may be produced twice. FULL would add an fsync per batch
        # and buy nothing the offsets do not already give.
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)

    def offsets(self) -> dict[tuple[str, int], int]:
        """(kind, partition) -> the next offset to read, for every partition read so far."""
        return {(kind, partition): offset for kind, partition, offset
                in self._db.execute("SELECT kind, partition, next_offset FROM offsets")}

    def process(self, items: list[Incoming]) -> Batch:
        """Apply the records in order, with their next offsets, in one transaction.

        A record the caller hands in twice is harmless: generations are keyed by id and a
        feedback id seen before is a duplicate. A record of the wrong type for its topic raises
        TypeError, and then nothing of the batch is applied.
        """
        batch = Batch()
        t = self._now()
        with self._tx():
            for item in items:
                if item.kind == "generation" and isinstance(item.record, events_pb2.Generation):
                    self._generation(item.record, t, batch)
                elif item.kind == "feedback" and isinstance(item.record, events_pb2.Feedback):
                    self._feedback(item.record, t, batch)
                else:
                    raise TypeError(f"{item.kind!r} record at partition {item.partition} offset {item.offset} "
                                    f"is a {type(item.record).__name__}")
                self._db.execute(
                    "INSERT INTO offsets VALUES (?, ?, ?) ON CONFLICT (kind, partition) "
                    "DO UPDATE SET next_offset = max(next_offset, excluded.next_offset)",
                    (item.kind, item.partition, item.offset + 1))
            self._add_totals(batch)
        return batch

    def expire(self) -> Batch:
        """Dead-letter feedback that waited too long ("orphan"), evict old generations, dead-letter
        waiting feedback that needs an evicted one ("expired"), and forget old feedback ids; in one
        transaction."""
        batch = Batch()
        t = self._now()
        with self._tx():
            self._orphans(t, batch)
            self._evict(t)
            for feedback_id, record in self._db.execute(
                    "SELECT feedback_id, record FROM pending WHERE generation_id IN (SELECT generation_id FROM "
                    "tombstones) OR other_generation_id IN (SELECT generation_id FROM tombstones) "
                    "ORDER BY arrived_at, rowid").fetchall():
                if self._settle(events_pb2.Feedback.FromString(record), t, batch):
                    self._db.execute("DELETE FROM pending WHERE feedback_id = ?", (feedback_id,))
            self._db.execute("DELETE FROM seen WHERE seen_at < ?", (t - self.retention_s - self.wait_s,))
            self._add_totals(batch)
        return batch

    def outbox(self) -> list[events_pb2.Label]:
        """Labels made but not yet confirmed sent, oldest first."""
        return [events_pb2.Label.FromString(record)
                for record, in self._db.execute("SELECT record FROM outbox ORDER BY seq")]

    def mark_sent(self, label_ids: list[str]) -> None:
        """Drop labels from the outbox once Kafka has acknowledged them."""
        with self._tx():
            self._db.executemany("DELETE FROM outbox WHERE label_id = ?", [(i,) for i in label_ids])

    def stats(self) -> dict[tuple[str, str], int]:
        """Totals of the final outcomes since the file was made, by (signal kind, outcome), and the
        feedback waiting now as (kind, "waiting"), reported for every kind (0 when none) so that a
        gauge set from it falls back to 0."""
        out = {(kind, outcome): n for kind, outcome, n in self._db.execute("SELECT kind, outcome, n FROM totals")}
        waiting = dict(self._db.execute("SELECT kind, count(*) FROM pending GROUP BY kind").fetchall())
        out.update({(kind, "waiting"): waiting.get(kind, 0) for kind in KINDS})
        return out

    def source_stats(self) -> dict[str, int]:
        """Labels made since the file was made, by source ("human", "ai"; 0 when none)."""
        out = {"human": 0, "ai": 0}
        out.update(dict(self._db.execute("SELECT source, n FROM source_totals").fetchall()))
        return out

    def waiting(self) -> int:
        return self._db.execute("SELECT count(*) FROM pending").fetchone()[0]

    def close(self) -> None:
        self._db.close()

    @contextmanager
    def _tx(self) -> Iterator[None]:
        """One transaction: all of the block's writes are committed, or none is."""
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    def _generation(self, g: events_pb2.Generation, t: float, batch: Batch) -> None:
        """Store a generation (once) and join the feedback that was waiting for it."""
        if self._tombstoned(g.generation_id):
            return  # a repeat of an evicted generation must not bring it back
        stored = self._db.execute(
            "INSERT OR IGNORE INTO generations VALUES (?, ?, ?, ?, ?, ?, ?)",
            (g.generation_id, g.request_id, g.prompt, g.response, g.policy_version, g.created_unix_ms, t)).rowcount
        if not stored:
            return
        for feedback_id, record in self._db.execute(
                "SELECT feedback_id, record FROM pending WHERE generation_id = ?1 OR other_generation_id = ?1 "
                "ORDER BY arrived_at, rowid", (g.generation_id,)).fetchall():
            if self._settle(events_pb2.Feedback.FromString(record), t, batch):
                self._db.execute("DELETE FROM pending WHERE feedback_id = ?", (feedback_id,))

    def _feedback(self, fb: events_pb2.Feedback, t: float, batch: Batch) -> None:
        """Deduplicate a new feedback record, then join it, dead-letter it or let it wait."""
        kind = signal_kind(fb)
        if not fb.feedback_id:
            self._dead(fb, "invalid", "feedback has no feedback_id", batch)
            return
        seen = self._db.execute("SELECT body_sha256 FROM seen WHERE feedback_id = ?", (fb.feedback_id,)).fetchone()
        if seen is not None:
            if seen[0] == fb.body_sha256:
                batch.counts[(kind, "duplicate")] += 1
            else:
                self._dead(fb, "conflict", f"feedback {fb.feedback_id} was seen before with another body "
                                           f"(sha256 {seen[0]!r}, now {fb.body_sha256!r})", batch)
            return
        self._db.execute("INSERT INTO seen VALUES (?, ?, ?)", (fb.feedback_id, fb.body_sha256, t))
        reason = _invalid(fb)
        if reason is not None:
            self._dead(fb, "invalid", reason, batch)
        elif not self._settle(fb, t, batch):
            other = fb.pairwise.other_generation_id if kind == "pairwise" else None
            self._db.execute("INSERT INTO pending VALUES (?, ?, ?, ?, ?, ?)",
                             (fb.feedback_id, kind, fb.generation_id, other, t, fb.SerializeToString()))
            batch.counts[(kind, "waiting")] += 1

    def _settle(self, fb: events_pb2.Feedback, t: float, batch: Batch) -> bool:
        """Join the feedback, or dead-letter it if it never can; False while a generation it
        needs may still come."""
        needed = _needed(fb)
        answers = [self._answer(g) for g in needed]
        missing = [g for g, a in zip(needed, answers) if a is None]
        evicted = [g for g in missing if self._tombstoned(g)]
        if evicted:
            self._dead(fb, "expired", f"generation {evicted[0]} is past the retention window "
                                      f"({self.retention_s:g}s, newest {self.max_generations})", batch)
            return True
        if missing:
            return False
        if len(answers) == 2 and answers[0].prompt != answers[1].prompt:
            self._dead(fb, "invalid", f"pairwise feedback {fb.feedback_id}: generations {needed[0]} and {needed[1]} "
                                      "answer different prompts", batch)
            return True
        label = _label(fb, answers, int(t * 1000))
        self._db.execute("INSERT OR REPLACE INTO outbox (label_id, record) VALUES (?, ?)",
                         (label.label_id, label.SerializeToString()))
        batch.labels.append(label)
        batch.counts[(signal_kind(fb), "joined")] += 1
        batch.sources[source_name(label.source)] += 1
        return True

    def _orphans(self, t: float, batch: Batch) -> None:
        """Dead-letter the feedback that has waited longer than wait_s."""
        deadline = t - self.wait_s
        for record, in self._db.execute("SELECT record FROM pending WHERE arrived_at < ? ORDER BY arrived_at, rowid",
                                        (deadline,)).fetchall():
            fb = events_pb2.Feedback.FromString(record)
            missing = [g for g in _needed(fb) if self._answer(g) is None]
            self._dead(fb, "orphan", f"generation{'s' if len(missing) > 1 else ''} {', '.join(missing)} "
                                     f"not seen within {self.wait_s:g}s", batch)
        self._db.execute("DELETE FROM pending WHERE arrived_at < ?", (deadline,))

    def _evict(self, t: float) -> None:
        """Move generations past the retention window, then the oldest beyond max_generations, to
        the tombstones; keep only the newest tombstones."""
        self._bury([g for g, in self._db.execute(
            "SELECT generation_id FROM generations WHERE stored_at < ? ORDER BY stored_at, rowid",
            (t - self.retention_s,))])
        excess = self._db.execute("SELECT count(*) FROM generations").fetchone()[0] - self.max_generations
        if excess > 0:
            self._bury([g for g, in self._db.execute(
                "SELECT generation_id FROM generations ORDER BY stored_at, rowid LIMIT ?", (excess,))])
        self._db.execute("DELETE FROM tombstones WHERE seq IN (SELECT seq FROM tombstones ORDER BY seq DESC "
                         "LIMIT -1 OFFSET ?)", (TOMBSTONES_PER_GENERATION * self.max_generations,))

    def _bury(self, generation_ids: list[str]) -> None:
        self._db.executemany("DELETE FROM generations WHERE generation_id = ?", [(g,) for g in generation_ids])
        self._db.executemany("INSERT OR REPLACE INTO tombstones (generation_id) VALUES (?)",
                             [(g,) for g in generation_ids])

    def _answer(self, generation_id: str) -> _Answer | None:
        row = self._db.execute("SELECT generation_id, prompt, response, policy_version FROM generations "
                               "WHERE generation_id = ?", (generation_id,)).fetchone()
        return _Answer(*row) if row else None

    def _tombstoned(self, generation_id: str) -> bool:
        row = self._db.execute("SELECT 1 FROM tombstones WHERE generation_id = ?", (generation_id,)).fetchone()
        return row is not None

    def _dead(self, fb: events_pb2.Feedback, outcome: str, reason: str, batch: Batch) -> None:
        batch.dead.append((fb, outcome, reason))
        batch.counts[(signal_kind(fb), outcome)] += 1

    def _add_totals(self, batch: Batch) -> None:
        """Add the call's final outcomes to the persistent totals ("waiting" is not final)."""
        self._db.executemany(
            "INSERT INTO totals VALUES (?, ?, ?) ON CONFLICT (kind, outcome) DO UPDATE SET n = n + excluded.n",
            [(kind, outcome, n) for (kind, outcome), n in batch.counts.items() if outcome != "waiting"])
        self._db.executemany(
            "INSERT INTO source_totals VALUES (?, ?) ON CONFLICT (source) DO UPDATE SET n = n + excluded.n",
            [(src, n) for src, n in batch.sources.items() if n])
