"""The join's consumer settings (validated, shown when bad) and the rating queue's pairing
query (index lookups on pairs, not scans; indexes added to existing databases on open)."""

from __future__ import annotations

import sqlite3

import pytest

from rlhf.events.v1 import events_pb2
from rlhf_common.config import ConfigError
from rlhf_feedback.config import FeedbackConfig
from rlhf_feedback.pairs import RatingQueue, partner_query


def test_join_consumer_settings_have_defaults_and_read_the_environment(monkeypatch):
    cfg = FeedbackConfig(state_dir="x")
    assert (cfg.join_fetch_wait_ms, cfg.join_poll_ms, cfg.join_max_records) == (50, 20, 64)
    monkeypatch.setenv("RLHF_FEEDBACK_STATE_DIR", "x")
    monkeypatch.setenv("RLHF_FEEDBACK_JOIN_FETCH_WAIT_MS", "200")
    monkeypatch.setenv("RLHF_FEEDBACK_JOIN_POLL_MS", "7")
    monkeypatch.setenv("RLHF_FEEDBACK_JOIN_MAX_RECORDS", "500")
    cfg = FeedbackConfig.load([])
    assert (cfg.join_fetch_wait_ms, cfg.join_poll_ms, cfg.join_max_records) == (200, 7, 500)


@pytest.mark.parametrize("field,value,shown", [
    ("join_fetch_wait_ms", 0, "RLHF_FEEDBACK_JOIN_FETCH_WAIT_MS=0"),
    ("join_fetch_wait_ms", 70_000, "RLHF_FEEDBACK_JOIN_FETCH_WAIT_MS=70000"),
    ("join_poll_ms", -5, "RLHF_FEEDBACK_JOIN_POLL_MS=-5"),
    ("join_max_records", 0, "RLHF_FEEDBACK_JOIN_MAX_RECORDS=0"),
])
def test_bad_join_consumer_settings_are_refused_with_their_value(field, value, shown):
    with pytest.raises(ConfigError, match=shown):
        FeedbackConfig(state_dir="x", **{field: value}).validate()


def plan(db: sqlite3.Connection, cond: str, args: tuple) -> list[str]:
    return [r[3] for r in db.execute("EXPLAIN QUERY PLAN " + partner_query(cond), ("P", "g", "r", *args))]


@pytest.mark.parametrize("cond,args", [("1", ()), ("policy_version = ?", (1,)), ("policy_version < ?", (2,))])
def test_the_pairing_query_looks_pairs_up_by_index(tmp_path, cond, args):
    q = RatingQueue(tmp_path / "q.sqlite", seed=0)
    q.observe([events_pb2.Generation(generation_id=f"g{i}", prompt=f"P{i // 2}", response=f"answer {i}",
                                     policy_version=1) for i in range(200)])
    q._db.execute("ANALYZE")
    steps = plan(q._db, cond, args)
    assert not [s for s in steps if s.startswith("SCAN pairs")], steps
    assert any("pairs_gen_a" in s for s in steps) and any("pairs_gen_b" in s for s in steps), steps
    assert any(s.startswith("SEARCH answers USING INDEX answers_prompt") for s in steps), steps


def test_a_database_made_without_the_indexes_gets_them_on_open(tmp_path):
    path = tmp_path / "q.sqlite"
    q = RatingQueue(path, seed=0)
    q.observe([events_pb2.Generation(generation_id=g, prompt="P", response=f"answer {g}", policy_version=1)
               for g in ("a", "b")])
    q.close()
    db = sqlite3.connect(path)
    db.execute("DROP INDEX pairs_gen_a")
    db.execute("DROP INDEX pairs_gen_b")
    db.commit()
    assert "SCAN pairs" in plan(db, "1", ())  # the old database: every check scans the pairs
    db.close()
    q = RatingQueue(path, seed=0)
    names = {r[0] for r in q._db.execute("SELECT name FROM sqlite_master WHERE type = 'index'")}
    assert {"pairs_gen_a", "pairs_gen_b"} <= names
    assert not [s for s in plan(q._db, "1", ()) if s.startswith("SCAN pairs")]
    # pairing still works on the reopened database: c pairs with nothing taken, d with c
    assert q.observe([events_pb2.Generation(generation_id=g, prompt="P", response=f"answer {g}", policy_version=1)
                      for g in ("c", "d")]) == 1
    assert {(p.gen_a, p.gen_b) for p in q.open_pairs(10)} == {("a", "b"), ("c", "d")}
