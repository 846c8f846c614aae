"""The feedback join on real SQLite files: labels, waiting, duplicates, expiry, offsets, restarts, crashes."""

from __future__ import annotations

import hashlib
import os
import random
import sqlite3
import subprocess
import sys
import textwrap
from collections import Counter, defaultdict

import pytest

from rlhf.events.v1 import events_pb2
from rlhf_feedback.join import KINDS, Incoming, Join

T0 = 1_700_000_000.0
WAIT_S = 60.0
RETENTION_S = 3600.0
FINAL = ("joined", "duplicate", "conflict", "invalid", "orphan", "expired")


class Clock:
    def __init__(self, t: float = T0):
        self.t = t

    def __call__(self) -> float:
        return self.t


class Feed:
    """Wraps records as they would come off the two topics, with increasing offsets."""

    def __init__(self):
        self.next: dict[tuple[str, int], int] = defaultdict(int)

    def __call__(self, *records, partition: int = 0) -> list[Incoming]:
        items = []
        for r in records:
            kind = "generation" if isinstance(r, events_pb2.Generation) else "feedback"
            items.append(Incoming(kind, partition, self.next[(kind, partition)], r))
            self.next[(kind, partition)] += 1
        return items


def gen(gid: str, prompt: str = "Say hi.", version: int = 7) -> events_pb2.Generation:
    return events_pb2.Generation(generation_id=gid, request_id=f"req-{gid}", prompt=prompt,
                                 response=f"answer {gid}", policy_version=version, prompt_token_ids=[1, 2],
                                 response_token_ids=[3], finish_reason="stop", created_unix_ms=5)


def fb(fid: str, gid: str, body: str | None = None, **signal) -> events_pb2.Feedback:
    if not signal:
        signal = {"thumb": events_pb2.THUMB_UP}
    return events_pb2.Feedback(feedback_id=fid, generation_id=gid, body_sha256=body or f"body-{fid}",
                               user_id="u1", comment="nice", created_unix_ms=9, **signal)


def pairwise(fid: str, gid: str, other: str, body: str | None = None) -> events_pb2.Feedback:
    return fb(fid, gid, body, pairwise=events_pb2.Pairwise(other_generation_id=other, choice=events_pb2.CHOICE_B))


def lbl(fid: str) -> str:
    return "lbl-" + hashlib.sha256(fid.encode()).hexdigest()[:32]


def resp(gid: str, version: int = 7) -> events_pb2.LabelResponse:
    return events_pb2.LabelResponse(generation_id=gid, text=f"answer {gid}", policy_version=version)


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def open_join(tmp_path, clock):
    opened = []

    def make(wait_s=WAIT_S, retention_s=RETENTION_S, max_generations=100):
        j = Join(tmp_path / "join.db", wait_s, retention_s, max_generations, now=clock)
        opened.append(j)
        return j

    yield make
    for j in opened:
        j.close()


def _snapshot(j: Join):
    return j.offsets(), j.stats(), [x.SerializeToString() for x in j.outbox()], j.waiting()


def _tally(stats: dict, kind: str) -> int:
    return sum(stats.get((kind, o), 0) for o in FINAL) + stats[(kind, "waiting")]


@pytest.mark.parametrize("kind", KINDS)
def test_each_kind_joins_into_the_exact_label(open_join, clock, kind):
    j, feed = open_join(), Feed()
    signal = {"thumb": {"thumb": events_pb2.THUMB_DOWN},
              "rating": {"rating": events_pb2.Rating(value=4, scale_min=1, scale_max=5)},
              "pairwise": {"pairwise": events_pb2.Pairwise(other_generation_id="g2", choice=events_pb2.CHOICE_TIE)},
              "edit": {"edit": events_pb2.Edit(edited_response="a better answer")}}[kind]
    item = fb("f1", "g1", **signal)
    item.source = events_pb2.LABEL_SOURCE_AI if kind == "rating" else events_pb2.LABEL_SOURCE_UNSPECIFIED
    j.process(feed(gen("g1", version=3), gen("g2", version=4)))
    clock.t = T0 + 1.5
    batch = j.process(feed(item))

    expected = events_pb2.Label(
        label_id=lbl("f1"), prompt="Say hi.", responses=[resp("g1", 3)],
        source=events_pb2.LABEL_SOURCE_AI if kind == "rating" else events_pb2.LABEL_SOURCE_HUMAN,
        feedback_ids=["f1"], created_unix_ms=int((T0 + 1.5) * 1000), **signal)
    if kind == "pairwise":
        expected.responses.append(resp("g2", 4))
    if kind == "edit":
        expected.responses.add(generation_id="", text="a better answer", policy_version=-1)
    assert batch.labels == [expected]
    assert batch.labels[0].WhichOneof("signal") == kind
    assert batch.labels[0].label_id == "lbl-" + hashlib.sha256(b"f1").hexdigest()[:32]
    assert batch.dead == [] and dict(batch.counts) == {(kind, "joined"): 1}
    assert j.outbox() == [expected]
    assert j.stats()[(kind, "joined")] == 1 and j.waiting() == 0


def test_feedback_before_its_generation_waits_then_joins(open_join, clock):
    j, feed = open_join(), Feed()
    b1 = j.process(feed(fb("f1", "g1"), pairwise("f2", "g2", "g3")))
    assert b1.labels == [] and b1.dead == []
    assert dict(b1.counts) == {("thumb", "waiting"): 1, ("pairwise", "waiting"): 1}
    assert j.waiting() == 2 and j.outbox() == []
    assert j.stats()[("thumb", "waiting")] == 1 and j.stats()[("pairwise", "waiting")] == 1

    clock.t = T0 + 10
    b2 = j.process(feed(gen("g1"), gen("g2")))
    assert [x.label_id for x in b2.labels] == [lbl("f1")]
    assert b2.labels[0].created_unix_ms == int((T0 + 10) * 1000)
    assert dict(b2.counts) == {("thumb", "joined"): 1}
    assert j.waiting() == 1  # the pairwise item still needs g3

    b3 = j.process(feed(gen("g3")))
    assert [list(x.responses) for x in b3.labels] == [[resp("g2"), resp("g3")]]
    stats = j.stats()
    assert j.waiting() == 0 and stats[("pairwise", "waiting")] == 0 and stats[("thumb", "waiting")] == 0
    assert stats[("thumb", "joined")] == 1 and stats[("pairwise", "joined")] == 1
    assert [x.label_id for x in j.outbox()] == [lbl("f1"), lbl("f2")]


def test_waiting_and_joining_in_the_same_batch(open_join):
    j, feed = open_join(), Feed()
    batch = j.process(feed(fb("f1", "g1"), gen("g1")))
    assert [x.label_id for x in batch.labels] == [lbl("f1")]
    assert dict(batch.counts) == {("thumb", "waiting"): 1, ("thumb", "joined"): 1}
    assert j.waiting() == 0 and j.stats()[("thumb", "joined")] == 1


def test_duplicate_with_the_same_body_is_ignored_and_another_body_is_a_conflict(open_join):
    j, feed = open_join(), Feed()
    j.process(feed(gen("g1"), fb("joined", "g1"), fb("waits", "g-later"), pairwise("bad", "g1", "g1")))
    before = _snapshot(j)[1:]

    again = j.process(feed(fb("joined", "g1"), fb("waits", "g-later"), pairwise("bad", "g1", "g1")))
    assert again.labels == [] and again.dead == []
    assert dict(again.counts) == {("thumb", "duplicate"): 2, ("pairwise", "duplicate"): 1}
    assert j.waiting() == 1 and [x.label_id for x in j.outbox()] == [lbl("joined")]

    clash = j.process(feed(fb("joined", "g1", body="other"), fb("waits", "g-later", body="other")))
    assert [(f.feedback_id, outcome) for f, outcome, _ in clash.dead] == [("joined", "conflict"), ("waits", "conflict")]
    assert all(f.feedback_id in reason for f, _, reason in clash.dead)
    assert clash.labels == [] and dict(clash.counts) == {("thumb", "conflict"): 2}
    stats = j.stats()
    assert stats[("thumb", "duplicate")] == 2 and stats[("pairwise", "duplicate")] == 1
    assert stats[("thumb", "conflict")] == 2 and stats[("thumb", "joined")] == 1
    assert j.waiting() == 1 and before[1] == [x.SerializeToString() for x in j.outbox()]


def test_invalid_pairwise_and_malformed_feedback_are_dead_lettered(open_join):
    j, feed = open_join(), Feed()
    batch = j.process(feed(gen("a1", prompt="p1"), gen("a2", prompt="p1"), gen("b1", prompt="p2"),
                           pairwise("self", "a1", "a1"), pairwise("prompts", "a1", "b1"),
                           pairwise("no-other", "a1", ""), pairwise("later", "b1", "a3"),
                           fb("no-gen", ""), events_pb2.Feedback(feedback_id="no-signal", generation_id="a1"),
                           fb("", "a1"), pairwise("fine", "a1", "a2")))
    reasons = {f.feedback_id: (outcome, reason) for f, outcome, reason in batch.dead}
    assert {k: v[0] for k, v in reasons.items()} == {k: "invalid" for k in
                                                      ("self", "prompts", "no-other", "no-gen", "no-signal", "")}
    assert "itself" in reasons["self"][1] and "different prompts" in reasons["prompts"][1]
    assert [x.label_id for x in batch.labels] == [lbl("fine")]
    assert j.waiting() == 1

    # The mismatch is found when the second generation arrives.
    late = j.process(feed(gen("a3", prompt="p1")))
    assert [(f.feedback_id, outcome) for f, outcome, _ in late.dead] == [("later", "invalid")]
    assert "different prompts" in late.dead[0][2] and late.labels == []
    stats = j.stats()
    assert stats[("pairwise", "invalid")] == 4 and stats[("thumb", "invalid")] == 2
    assert stats[("none", "invalid")] == 1 and stats[("pairwise", "joined")] == 1 and j.waiting() == 0


def test_feedback_waiting_too_long_is_an_orphan(open_join, clock):
    j, feed = open_join(), Feed()
    j.process(feed(fb("f1", "g-missing"), pairwise("f2", "g-here", "g-gone")))
    j.process(feed(gen("g-here")))
    clock.t = T0 + WAIT_S - 1
    assert j.expire().dead == [] and j.waiting() == 2

    clock.t = T0 + WAIT_S + 1
    batch = j.expire()
    assert [(f.feedback_id, outcome, reason) for f, outcome, reason in batch.dead] == [
        ("f1", "orphan", "generation g-missing not seen within 60s"),
        ("f2", "orphan", "generation g-gone not seen within 60s")]
    assert dict(batch.counts) == {("thumb", "orphan"): 1, ("pairwise", "orphan"): 1}
    assert j.waiting() == 0 and j.stats()[("thumb", "waiting")] == 0 and j.stats()[("thumb", "orphan")] == 1

    # The generation coming late joins nothing, and the orphan re-sent is a duplicate.
    late = j.process(feed(gen("g-missing"), fb("f1", "g-missing")))
    assert late.labels == [] and dict(late.counts) == {("thumb", "duplicate"): 1}


def test_generations_past_retention_are_evicted_and_late_feedback_expires(open_join, clock):
    j, feed = open_join(), Feed()
    j.process(feed(gen("old"), gen("half")))
    clock.t = T0 + 100
    j.process(feed(gen("new")))
    clock.t = T0 + RETENTION_S - 1
    assert j.expire().dead == []
    clock.t = T0 + RETENTION_S + 1
    assert j.expire().dead == []

    late = j.process(feed(fb("late", "old"), pairwise("late-pair", "new", "half"), fb("ok", "new"),
                          gen("old"), fb("after-resend", "old")))
    assert [(f.feedback_id, outcome) for f, outcome, _ in late.dead] == [
        ("late", "expired"), ("late-pair", "expired"), ("after-resend", "expired")]
    assert "generation old is past the retention window" in late.dead[0][2]
    assert [x.label_id for x in late.labels] == [lbl("ok")]
    stats = j.stats()
    assert stats[("thumb", "expired")] == 2 and stats[("pairwise", "expired")] == 1 and j.waiting() == 0


def test_oldest_generations_beyond_the_maximum_are_evicted(open_join, clock):
    j, feed = open_join(max_generations=3), Feed()
    for i in range(5):
        clock.t = T0 + i
        j.process(feed(gen(f"g{i}")))
    j.process(feed(pairwise("waiting", "g1", "g-later"), pairwise("waiting-too", "g3", "g-later")))
    evicted = j.expire()
    # g1 is gone, so the pairwise item waiting on it can never join; the other still may.
    assert [(f.feedback_id, outcome) for f, outcome, _ in evicted.dead] == [("waiting", "expired")]
    assert "generation g1 is past the retention window" in evicted.dead[0][2]
    assert dict(evicted.counts) == {("pairwise", "expired"): 1} and j.waiting() == 1
    batch = j.process(feed(fb("f0", "g0"), fb("f1", "g1"), fb("f2", "g2"), fb("f4", "g4")))
    assert [(f.feedback_id, outcome) for f, outcome, _ in batch.dead] == [("f0", "expired"), ("f1", "expired")]
    assert [x.label_id for x in batch.labels] == [lbl("f2"), lbl("f4")]


def test_tombstones_are_bounded(open_join, clock, tmp_path):
    j, feed = open_join(max_generations=2), Feed()
    for i in range(30):
        clock.t = T0 + i
        j.process(feed(gen(f"g{i}")))
        j.expire()
    # 28 evicted, at most 10 x 2 remembered: g0..g7 are forgotten, so feedback on them waits.
    batch = j.process(feed(fb("f7", "g7"), fb("f8", "g8"), fb("f29", "g29")))
    assert [(f.feedback_id, outcome) for f, outcome, _ in batch.dead] == [("f8", "expired")]
    assert dict(batch.counts) == {("thumb", "waiting"): 1, ("thumb", "expired"): 1, ("thumb", "joined"): 1}
    with sqlite3.connect(tmp_path / "join.db") as db:
        assert db.execute("SELECT count(*) FROM tombstones").fetchone()[0] == 20
        assert db.execute("SELECT count(*) FROM generations").fetchone()[0] == 2


def test_feedback_ids_are_forgotten_after_retention_plus_wait(open_join, clock):
    j, feed = open_join(), Feed()
    j.process(feed(gen("g1"), fb("f1", "g1")))
    clock.t = T0 + RETENTION_S + WAIT_S - 1
    j.expire()
    assert dict(j.process(feed(fb("f1", "g1"))).counts) == {("thumb", "duplicate"): 1}
    clock.t = T0 + RETENTION_S + WAIT_S + 1
    j.expire()
    # Treated as new: its generation is evicted by now, so it expires instead of joining twice.
    again = j.process(feed(fb("f1", "g1")))
    assert [(f.feedback_id, outcome) for f, outcome, _ in again.dead] == [("f1", "expired")]


def test_offsets_are_stored_per_topic_and_partition_and_never_go_back(open_join):
    j, feed = open_join(), Feed()
    assert j.offsets() == {}
    j.process(feed(fb("f1", "g1"), fb("f2", "g2"), fb("f3", "g3")) + feed(gen("g9"), partition=1))
    assert j.offsets() == {("feedback", 0): 3, ("generation", 1): 1}
    j.process([Incoming("generation", 1, 40, gen("g40"))])
    assert j.offsets() == {("feedback", 0): 3, ("generation", 1): 41}
    # A re-read of older offsets and an empty batch leave them where they are.
    j.process([Incoming("feedback", 0, 1, fb("f2", "g2")), Incoming("generation", 1, 7, gen("g9"))])
    j.process([])
    assert j.offsets() == {("feedback", 0): 3, ("generation", 1): 41}
    assert j.stats()[("thumb", "duplicate")] == 1


def test_restart_keeps_state_totals_offsets_and_outbox(open_join, clock):
    j, feed = open_join(), Feed()
    j.process(feed(gen("g1"), fb("f1", "g1"), fb("f2", "g1"), fb("w", "g2"), pairwise("bad", "g1", "g1")))
    j.mark_sent([lbl("f1"), "lbl-unknown"])
    before = _snapshot(j)
    j.close()

    k = open_join()
    assert _snapshot(k) == before
    assert [x.label_id for x in k.outbox()] == [lbl("f2")]
    batch = k.process(feed(gen("g2"), fb("f1", "g1")))
    assert [x.label_id for x in batch.labels] == [lbl("w")]
    assert dict(batch.counts) == {("thumb", "joined"): 1, ("thumb", "duplicate"): 1}
    after = _snapshot(k)  # k is never closed, as in a crash after the commit

    m = open_join()
    assert _snapshot(m) == after
    stats = m.stats()
    assert stats[("thumb", "joined")] == 3 and stats[("pairwise", "invalid")] == 1
    m.mark_sent([lbl("f2"), lbl("w")])
    assert m.outbox() == []


def test_an_error_mid_batch_applies_nothing(open_join):
    j, feed = open_join(), Feed()
    j.process(feed(gen("g1"), fb("f1", "g2")))
    before = _snapshot(j)
    good = feed(gen("g2"), fb("f3", "g1"), fb("f4", "g1"))
    bad = Incoming("feedback", 0, 99, gen("not-feedback"))
    with pytest.raises(TypeError, match="offset 99"):
        j.process(good[:2] + [bad] + good[2:])
    assert _snapshot(j) == before

    # Nothing of the failed batch was applied: the same records are new, not duplicates.
    batch = j.process(good)
    assert sorted(x.label_id for x in batch.labels) == sorted([lbl("f1"), lbl("f3"), lbl("f4")])
    assert ("thumb", "duplicate") not in batch.counts


def test_an_error_inside_the_join_rolls_back(open_join, monkeypatch):
    j, feed = open_join(), Feed()
    j.process(feed(fb("f1", "g1")))
    before = _snapshot(j)
    calls = []

    def failing_label(*args):
        calls.append(args)
        raise RuntimeError("disk full")

    monkeypatch.setattr("rlhf_feedback.join._label", failing_label)
    batch = feed(gen("g1"), fb("f2", "g1"))
    with pytest.raises(RuntimeError):
        j.process(batch)
    assert calls and _snapshot(j) == before
    j.close()
    k = open_join()
    assert _snapshot(k) == before
    # The generation was not kept either: stored again now, it wakes the waiting item.
    monkeypatch.undo()
    assert [x.label_id for x in k.process(batch).labels] == [lbl("f1"), lbl("f2")]


_CRASH = """
import os, sys
from pathlib import Path
from rlhf.events.v1 import events_pb2
from rlhf_feedback import join

j = join.Join(Path(sys.argv[1]), 60.0, 3600.0, 100)
gen = events_pb2.Generation(generation_id="g1", prompt="p", response="r", policy_version=1)
j.process([join.Incoming("generation", 0, 0, gen)])
j.process([join.Incoming("feedback", 0, 0, events_pb2.Feedback(feedback_id="f0", generation_id="g9",
                                                                              rating=events_pb2.Rating()))])
settle = join.Join._settle
seen = []

def crash_on_second(self, *args):
    seen.append(1)
    if len(seen) == 2:
        os._exit(3)  # the process dies with the transaction open
    return settle(self, *args)

join.Join._settle = crash_on_second
items = [join.Incoming("feedback", 0, 1 + i, events_pb2.Feedback(feedback_id=f"f{i + 1}", generation_id="g1",
                                                                  thumb=events_pb2.THUMB_UP)) for i in range(4)]
j.process(items)
"""


def test_a_process_killed_mid_batch_leaves_the_last_committed_state(tmp_path, clock):
    path = tmp_path / "join.db"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    run = subprocess.run([sys.executable, "-c", textwrap.dedent(_CRASH), str(path)], env=env,
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 3, run.stderr
    j = Join(path, WAIT_S, RETENTION_S, 100, now=clock)
    try:
        assert j.offsets() == {("generation", 0): 1, ("feedback", 0): 1}
        assert j.outbox() == [] and j.waiting() == 1
        assert {k: v for k, v in j.stats().items() if v} == {("rating", "waiting"): 1}
        batch = j.process([Incoming("feedback", 0, 1, fb("f1", "g1"))])
        assert [x.label_id for x in batch.labels] == [lbl("f1")]
    finally:
        j.close()


def test_every_feedback_record_ends_in_exactly_one_outcome(open_join, clock):
    rng = random.Random(1234)
    j, feed = open_join(wait_s=30, retention_s=120, max_generations=15), Feed()
    prompts = ["p0", "p1", "p2"]
    gids = [f"g{i}" for i in range(40)]
    sent: list[events_pb2.Feedback] = []
    handed: Counter = Counter()
    summed: Counter = Counter()
    labels, dead = [], []
    pending: list[Incoming] = []

    def absorb(batch):
        labels.extend(batch.labels)
        dead.extend(batch.dead)
        summed.update(batch.counts)

    for step in range(200):
        roll = rng.random()
        if roll < 0.3:
            gid = rng.choice(gids)
            pending += feed(gen(gid, prompt=prompts[int(gid[1:]) % 3]), partition=rng.randrange(2))
        else:
            if sent and roll < 0.45:
                record = events_pb2.Feedback()
                record.CopyFrom(rng.choice(sent))
                if rng.random() < 0.3:
                    record.body_sha256 = "changed"
            else:
                gid, other = rng.choice(gids + ["never"]), rng.choice(gids)
                kind = rng.choice(KINDS)
                signal = {"thumb": {"thumb": events_pb2.THUMB_UP},
                          "rating": {"rating": events_pb2.Rating(value=3, scale_min=1, scale_max=5)},
                          "pairwise": {"pairwise": events_pb2.Pairwise(other_generation_id=other,
                                                                       choice=events_pb2.CHOICE_A)},
                          "edit": {"edit": events_pb2.Edit(edited_response="better")}}[kind]
                record = fb(f"f{step}", gid, **signal)
                sent.append(record)
            handed[record.WhichOneof("signal")] += 1
            pending += feed(record, partition=rng.randrange(2))
        if rng.random() < 0.25:
            absorb(j.process(pending))
            pending = []
        if rng.random() < 0.15:
            clock.t += rng.uniform(0, 40)
            absorb(j.expire())
        if step == 100:  # a restart half-way
            absorb(j.process(pending))
            pending = []
            j.close()
            j = open_join(wait_s=30, retention_s=120, max_generations=15)
    absorb(j.process(pending))

    stats = j.stats()
    assert sum(handed.values()) > 100
    for kind in KINDS:
        assert handed[kind] == _tally(stats, kind), kind
    assert {k: v for k, v in stats.items() if k[1] != "waiting" and v} == \
        {k: v for k, v in summed.items() if k[1] != "waiting" and v}
    assert {o for _, o in summed} == set(FINAL) | {"waiting"}  # the mix reaches every outcome
    assert len(labels) == sum(stats.get((k, "joined"), 0) for k in KINDS)
    assert len({x.label_id for x in labels}) == len(labels)
    assert Counter(o for _, o, _ in dead) == Counter({o: sum(stats.get((k, o), 0) for k in KINDS) for o in
                                                      ("conflict", "invalid", "orphan", "expired")})
    assert sum(stats[(k, "waiting")] for k in KINDS) == j.waiting()
    assert [x.label_id for x in j.outbox()] == [x.label_id for x in labels]
    j.mark_sent([x.label_id for x in labels])
    assert j.outbox() == []
