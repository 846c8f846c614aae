"""The rating queue: pairs of answers to one prompt, waiting for a rater's A/B choice.

Answers come from rlhf.generations (the join hands every served answer here) and from the
queue's own requests to the policy. Two answers to the same prompt make a pair:

- "samples": two answers of the same policy version (two samples of the current policy);
- "versions": an answer of the newest version against one of an earlier version (a live A/B
  test of versions);
- "both": either.

Each new answer joins at most one pair (with the newest fitting answer), so pairs grow
linearly with answers. Pairs are ordered by a priority that the ranker sets from the
active-sampling strategy (see active.py); raters get the highest-priority pair no human has
rated yet. The sides shown are randomised per ticket and the page sees only texts and a
ticket: which answer (and version) is on which side stays here, and the feedback item names
the generations, so the join and the labels keep the truth.

Rater quality: with probability `repeat_share` a rater gets back a pair they rated before
(sides drawn again); the share of repeats answered the same way is their self-agreement. A
repeat is not sent as feedback again: the first judgement is the label, the repeat measures it.

SQLite in its own file; every method is blocking and thread-safe (one lock).
"""

from __future__ import annotations

import hashlib
import random
import secrets
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from rlhf.events.v1 import events_pb2
from rlhf_common.errors import InvalidInput

from .core import FeedbackItem

PairMode = Literal["samples", "versions", "both"]
Choice = Literal["a", "b", "tie"]
# An issued, unanswered ticket puts its pair behind the others for other raters this long.
HOLD_S = 120.0

_SCHEMA = """
BEGIN;
CREATE TABLE IF NOT EXISTS answers (
    generation_id TEXT PRIMARY KEY, request_id TEXT NOT NULL, prompt TEXT NOT NULL, response TEXT NOT NULL,
    policy_version INTEGER NOT NULL, added_at REAL NOT NULL);
CREATE INDEX IF NOT EXISTS answers_prompt ON answers (prompt, added_at);
CREATE TABLE IF NOT EXISTS pairs (
    pair_id TEXT PRIMARY KEY, gen_a TEXT NOT NULL, gen_b TEXT NOT NULL, mode TEXT NOT NULL,
    created_at REAL NOT NULL, priority REAL, ranked_at REAL, human_n INTEGER NOT NULL DEFAULT 0,
    ai_choice TEXT, ai_sent INTEGER NOT NULL DEFAULT 0);
CREATE INDEX IF NOT EXISTS pairs_open ON pairs (human_n, priority);
CREATE INDEX IF NOT EXISTS pairs_gen_a ON pairs (gen_a);
CREATE INDEX IF NOT EXISTS pairs_gen_b ON pairs (gen_b);
CREATE TABLE IF NOT EXISTS tickets (
    ticket TEXT PRIMARY KEY, pair_id TEXT NOT NULL, rater TEXT NOT NULL, left_gen TEXT NOT NULL,
    right_gen TEXT NOT NULL, repeat INTEGER NOT NULL, issued_at REAL NOT NULL, choice TEXT);
CREATE INDEX IF NOT EXISTS tickets_pair ON tickets (pair_id, issued_at);
CREATE INDEX IF NOT EXISTS tickets_rater ON tickets (rater, choice);
COMMIT;
"""
# An answer not yet in any pair: two index lookups (pairs_gen_a, pairs_gen_b), not a scan of pairs.
_UNPAIRED = ("NOT EXISTS (SELECT 1 FROM pairs WHERE gen_a = answers.generation_id) AND "
             "NOT EXISTS (SELECT 1 FROM pairs WHERE gen_b = answers.generation_id)")


def partner_query(cond: str) -> str:
    """The newest unpaired answer to the same prompt, other than the new one, that meets `cond`."""
    return (f"SELECT generation_id, policy_version FROM answers WHERE prompt = ? AND generation_id != ? AND "
            f"response != ? AND {cond} AND {_UNPAIRED} ORDER BY added_at DESC, rowid DESC LIMIT 1")


@dataclass(frozen=True)
class Assignment:
    """What the page shows: a ticket, the prompt and the two texts (left = A, right = B)."""
    ticket: str
    prompt: str
    answer_a: str
    answer_b: str


@dataclass(frozen=True)
class OpenPair:
    pair_id: str
    prompt: str
    gen_a: str
    gen_b: str
    answer_a: str
    answer_b: str
    human_rated: bool


@dataclass(frozen=True)
class RaterStats:
    rater: str
    ratings: int
    repeats: int
    self_agreement: float | None  # share of repeats answered as the first time; None without repeats


@dataclass(frozen=True)
class AiStats:
    judged: int  # pairs the AI labeller judged
    sent: int  # of which sent as feedback (source "ai"), because no human had rated them
    compared: int  # pairs with both a human's first choice and the AI's
    agreement: float | None


def pair_id(gen_a: str, gen_b: str) -> str:
    return "p-" + hashlib.sha256("\x00".join(sorted((gen_a, gen_b))).encode()).hexdigest()[:24]


def _flip(choice: str) -> str:
    return {"a": "b", "b": "a"}.get(choice, choice)


class RatingQueue:
    def __init__(self, path: Path, mode: PairMode = "both", repeat_share: float = 0.1, max_pairs: int = 10_000,
                 seed: int | None = None, now=time.time):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.mode, self.repeat_share, self.max_pairs = mode, repeat_share, max_pairs
        self._rng = random.Random(seed)
        self._now = now
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)

    # -- answers in ------------------------------------------------------------------------
    def observe(self, gens: list[events_pb2.Generation]) -> int:
        """Store served answers and pair each new one; returns the number of new pairs."""
        made = 0
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                for g in gens:
                    made += self._add(g)
                self._trim()
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return made

    def _add(self, g: events_pb2.Generation) -> int:
        if not g.generation_id or not g.response.strip():
            return 0
        t = self._now()
        if not self._db.execute("INSERT OR IGNORE INTO answers VALUES (?, ?, ?, ?, ?, ?)",
                                (g.generation_id, g.request_id, g.prompt, g.response, g.policy_version,
                                 t)).rowcount:
            return 0
        if self.mode == "samples":
            cond, args = "policy_version = ?", (g.policy_version,)
        elif self.mode == "versions":
            cond, args = "policy_version < ?", (g.policy_version,)
        else:
            cond, args = "1", ()
        row = self._db.execute(partner_query(cond), (g.prompt, g.generation_id, g.response, *args)).fetchone()
        if row is None:
            return 0
        other, version = row
        mode = "samples" if version == g.policy_version else "versions"
        self._db.execute("INSERT OR IGNORE INTO pairs (pair_id, gen_a, gen_b, mode, created_at, priority) "
                         "VALUES (?, ?, ?, ?, ?, NULL)", (pair_id(other, g.generation_id), other, g.generation_id,
                                                          mode, t))
        return 1

    def _trim(self) -> None:
        """Keep at most max_pairs pairs: the oldest ones no human rated go first; answers
        no pair needs go with them."""
        excess = self._db.execute("SELECT count(*) FROM pairs").fetchone()[0] - self.max_pairs
        if excess > 0:
            self._db.execute("DELETE FROM pairs WHERE pair_id IN (SELECT pair_id FROM pairs WHERE human_n = 0 "
                             "ORDER BY created_at, rowid LIMIT ?)", (excess,))
            self._db.execute(f"DELETE FROM answers WHERE added_at < (SELECT min(created_at) FROM pairs) AND "
                             f"{_UNPAIRED}")

    # -- ranking ---------------------------------------------------------------------------
    def open_pairs(self, limit: int, ai_unjudged: bool = False) -> list[OpenPair]:
        """Pairs to rank (no human rating yet, least recently ranked first), or with
        `ai_unjudged`, pairs the AI labeller has not judged (highest priority first)."""
        if ai_unjudged:
            where, order = "p.ai_choice IS NULL", "p.priority IS NULL, p.priority DESC, p.created_at"
        else:
            where, order = "p.human_n = 0", "p.ranked_at IS NOT NULL, p.ranked_at, p.created_at"
        with self._lock:
            rows = self._db.execute(
                f"SELECT p.pair_id, a.prompt, p.gen_a, p.gen_b, a.response, b.response, p.human_n > 0 FROM pairs p "
                f"JOIN answers a ON a.generation_id = p.gen_a JOIN answers b ON b.generation_id = p.gen_b "
                f"WHERE {where} ORDER BY {order} LIMIT ?", (limit,)).fetchall()
        return [OpenPair(r[0], r[1], r[2], r[3], r[4], r[5], bool(r[6])) for r in rows]

    def set_priorities(self, priorities: dict[str, float]) -> None:
        t = self._now()
        with self._lock, self._db:
            self._db.executemany("UPDATE pairs SET priority = ?, ranked_at = ? WHERE pair_id = ?",
                                 [(p, t, i) for i, p in priorities.items()])

    def open_count(self) -> int:
        with self._lock:
            return self._db.execute("SELECT count(*) FROM pairs WHERE human_n = 0").fetchone()[0]

    # -- raters ----------------------------------------------------------------------------
    def next_for(self, rater: str) -> Assignment | None:
        """The next pair for this rater, or None when the queue has none."""
        t = self._now()
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                out = self._next(rater, t)
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return out

    def _next(self, rater: str, t: float) -> Assignment | None:
        repeat = False
        row = None
        if self._rng.random() < self.repeat_share:
            done = self._db.execute(
                "SELECT pair_id FROM tickets WHERE rater = ? AND repeat = 0 AND choice IS NOT NULL AND pair_id NOT IN "
                "(SELECT pair_id FROM tickets WHERE rater = ? AND repeat = 1) ORDER BY issued_at",
                (rater, rater)).fetchall()
            if done:
                row = self._db.execute("SELECT pair_id, gen_a, gen_b FROM pairs WHERE pair_id = ?",
                                       (self._rng.choice(done)[0],)).fetchone()
                repeat = row is not None
        if row is None:
            # Pairs shown to another rater and not answered yet come last (they may be answered
            # any moment); a rater never gets a pair they rated, other than as a repeat.
            row = self._db.execute(
                "SELECT pair_id, gen_a, gen_b FROM pairs WHERE human_n = 0 AND pair_id NOT IN (SELECT pair_id "
                "FROM tickets WHERE rater = ? AND choice IS NOT NULL) ORDER BY pair_id IN (SELECT pair_id FROM "
                "tickets WHERE choice IS NULL AND issued_at > ? AND rater != ?), "
                "priority IS NULL, priority DESC, created_at, rowid LIMIT 1",
                (rater, t - HOLD_S, rater)).fetchone()
        if row is None:
            return None
        pid, gen_a, gen_b = row
        left, right = (gen_a, gen_b) if self._rng.random() < 0.5 else (gen_b, gen_a)
        ticket = secrets.token_hex(12)
        self._db.execute("INSERT INTO tickets VALUES (?, ?, ?, ?, ?, ?, ?, NULL)",
                         (ticket, pid, rater, left, right, int(repeat), t))
        prompt, a_text = self._db.execute("SELECT prompt, response FROM answers WHERE generation_id = ?",
                                          (left,)).fetchone()
        b_text = self._db.execute("SELECT response FROM answers WHERE generation_id = ?", (right,)).fetchone()[0]
        return Assignment(ticket, prompt, a_text, b_text)

    def feedback_for(self, ticket: str, rater: str, choice: Choice, reason: str, session_id: str
                     ) -> FeedbackItem | None:
        """The pairwise feedback item for a ticket's choice (None for a repeat, which is not sent
        again). Raises InvalidInput for an unknown ticket or another rater's."""
        if choice not in ("a", "b", "tie"):
            raise InvalidInput(f"choice={choice!r}: must be 'a', 'b' or 'tie'")
        with self._lock:
            row = self._db.execute("SELECT rater, left_gen, right_gen, repeat FROM tickets WHERE ticket = ?",
                                   (ticket,)).fetchone()
        if row is None or row[0] != rater:
            raise InvalidInput(f"ticket {ticket[:32]!r}: not issued to this rater")
        if row[3]:
            return None
        return FeedbackItem(feedback_id=f"rate-{ticket}", generation_id=row[1], other_generation_id=row[2],
                            choice=choice, comment=reason, user_id=rater, session_id=session_id)

    def record(self, ticket: str, choice: Choice) -> None:
        """Mark a ticket answered (after its feedback is on the broker). Answering twice keeps
        the first answer."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                pid, answered = self._db.execute("SELECT pair_id, choice FROM tickets WHERE ticket = ?",
                                                 (ticket,)).fetchone()
                if answered is None:
                    self._db.execute("UPDATE tickets SET choice = ? WHERE ticket = ?", (choice, ticket))
                    self._db.execute("UPDATE pairs SET human_n = human_n + 1 WHERE pair_id = ?", (pid,))
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    # -- the AI labeller -------------------------------------------------------------------
    def record_ai(self, pid: str, choice: str, sent: bool) -> None:
        """The AI's choice on a pair, oriented as gen_a vs gen_b ('a', 'b', 'tie' or 'none' when
        its answer could not be read)."""
        with self._lock, self._db:
            self._db.execute("UPDATE pairs SET ai_choice = ?, ai_sent = ? WHERE pair_id = ?", (choice, int(sent), pid))

    # -- stats -----------------------------------------------------------------------------
    def _first_choices(self) -> dict[tuple[str, str], str]:
        """(rater, pair) -> the rater's first choice, oriented as gen_a vs gen_b."""
        out: dict[tuple[str, str], str] = {}
        for rater, pid, choice, left, gen_a in self._db.execute(
                "SELECT t.rater, t.pair_id, t.choice, t.left_gen, p.gen_a FROM tickets t JOIN pairs p USING (pair_id) "
                "WHERE t.repeat = 0 AND t.choice IS NOT NULL ORDER BY t.issued_at"):
            out.setdefault((rater, pid), choice if left == gen_a else _flip(choice))
        return out

    def rater_stats(self) -> list[RaterStats]:
        with self._lock:
            first = self._first_choices()
            repeats = self._db.execute(
                "SELECT t.rater, t.pair_id, t.choice, t.left_gen, p.gen_a FROM tickets t JOIN pairs p USING (pair_id) "
                "WHERE t.repeat = 1 AND t.choice IS NOT NULL").fetchall()
        per: dict[str, list[int]] = {}
        for (rater, _), _c in first.items():
            per.setdefault(rater, [0, 0, 0])[0] += 1
        for rater, pid, choice, left, gen_a in repeats:
            again = choice if left == gen_a else _flip(choice)
            row = per.setdefault(rater, [0, 0, 0])
            if (rater, pid) in first:
                row[1] += 1
                row[2] += int(first[(rater, pid)] == again)
        return [RaterStats(r, n, k, (same / k) if k else None) for r, (n, k, same) in sorted(per.items())]

    def ai_stats(self) -> AiStats:
        with self._lock:
            first = self._first_choices()
            judged = self._db.execute("SELECT pair_id, ai_choice, ai_sent FROM pairs WHERE ai_choice IS NOT NULL "
                                      "AND ai_choice != 'none'").fetchall()
        ai = {pid: c for pid, c, _ in judged}
        human = {}
        for (_, pid), c in first.items():
            human.setdefault(pid, c)  # the first rater's choice stands for the pair
        both = [pid for pid in human if pid in ai]
        agree = sum(human[p] == ai[p] for p in both)
        return AiStats(len(judged), sum(s for _, _, s in judged), len(both), (agree / len(both)) if both else None)

    def close(self) -> None:
        with self._lock:
            self._db.close()
