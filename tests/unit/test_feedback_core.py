"""The feedback gateway's rules, without a transport: validation, records and the store."""

from __future__ import annotations

import pytest

from rlhf.events.v1 import events_pb2
from rlhf_common.config import ConfigError
from rlhf_common.errors import InvalidInput
from rlhf_feedback.config import FeedbackConfig
from rlhf_feedback.core import AcceptedStore, FeedbackItem, to_record, validate
from rlhf_feedback.prompts import load_filter, production_prompt, sampled


def _item(**kw) -> FeedbackItem:
    return FeedbackItem(**{"feedback_id": "f1", "generation_id": "g1", "thumb": "up", **kw})


@pytest.mark.parametrize("item,needle", [
    (_item(feedback_id=""), "items[0].feedback_id=''"),
    (_item(feedback_id="x" * 129), "must be 1-128 printable characters"),
    (_item(generation_id="a\nb"), "items[0].generation_id="),
    (_item(thumb=None), "(given: none)"),
    (_item(rating=(3.0, 1.0, 5.0)), "(given: thumb, rating)"),
    (_item(thumb="meh"), "items[0].thumb='meh'"),
    (_item(thumb=None, rating=(float("nan"), 1.0, 5.0)), "must be finite"),
    (_item(thumb=None, rating=(1.0, 5.0, 5.0)), "scale_min=5: must be below scale_max=5"),
    (_item(thumb=None, rating=(0.0, 1.0, 5.0)), "value=0: must be within the scale [1, 5]"),
    (_item(thumb=None, other_generation_id="g2", choice=None), "pairwise.choice=None"),
    (_item(thumb=None, other_generation_id="", choice="a"), "pairwise.other_generation_id=''"),
    (_item(thumb=None, edited_response=""), "edit.edited_response: must be 1-100 characters (got 0)"),
    (_item(thumb=None, edited_response="x" * 101), "(got 101)"),
    (_item(comment="c" * 101), "items[0].comment: at most 100 characters"),
    (_item(user_id="u" * 257), "items[0].user_id: at most 256"),
])
def test_bad_items_name_the_field(item, needle):
    with pytest.raises(InvalidInput) as e:
        validate([item], max_items=8, max_text_chars=100)
    assert needle in str(e.value)


def test_batch_limits():
    with pytest.raises(InvalidInput, match="at least one"):
        validate([], 8, 100)
    with pytest.raises(InvalidInput, match="9 items exceed the limit of 8"):
        validate([_item(feedback_id=f"f{i}") for i in range(9)], 8, 100)
    validate([_item(feedback_id=f"f{i}") for i in range(8)], 8, 100)


def test_records_carry_the_signal_and_a_body_hash_that_tells_bodies_apart():
    items = [_item(), _item(thumb=None, rating=(4.0, 1.0, 5.0)),
             _item(thumb=None, other_generation_id="g2", choice="tie"), _item(thumb=None, edited_response="fixed")]
    recs = [to_record(i, 1234) for i in items]
    assert [r.WhichOneof("signal") for r in recs] == ["thumb", "rating", "pairwise", "edit"]
    assert recs[0].thumb == events_pb2.THUMB_UP and recs[2].pairwise.choice == events_pb2.CHOICE_TIE
    assert (recs[1].rating.value, recs[1].rating.scale_max) == (4.0, 5.0) and recs[3].edit.edited_response == "fixed"
    assert len({r.body_sha256 for r in recs}) == 4
    assert _item().body_sha256() == _item().body_sha256() != _item(comment="!").body_sha256()
    assert all(r.created_unix_ms == 1234 and r.source == events_pb2.LABEL_SOURCE_HUMAN for r in recs)


def test_store_remembers_ids_and_counts_across_reopen(tmp_path):
    s = AcceptedStore(tmp_path / "a.sqlite")
    s.record([("f1", "h1", "thumb"), ("f2", "h2", "edit")], {("thumb", "accepted"): 1, ("edit", "accepted"): 1})
    s.record([("f1", "other", "thumb")], {("thumb", "duplicate"): 1})  # an id is never rebound
    s.close()
    s = AcceptedStore(tmp_path / "a.sqlite")
    assert s.lookup(["f1", "f2", "f3"]) == {"f1": "h1", "f2": "h2"}
    assert s.counts() == {("thumb", "accepted"): 1, ("edit", "accepted"): 1, ("thumb", "duplicate"): 1}
    assert len(s.lookup([f"x{i}" for i in range(1200)] + ["f2"])) == 1  # more ids than one query takes


def test_config_checks_partitions_and_windows():
    with pytest.raises(ConfigError, match="RLHF_FEEDBACK_JOIN_PARTITIONS='0,x'"):
        FeedbackConfig(state_dir="/s", join_partitions="0,x")
    with pytest.raises(ConfigError, match="RLHF_FEEDBACK_RETENTION_S=10: must be >= RLHF_FEEDBACK_WAIT_S=60"):
        FeedbackConfig(state_dir="/s", wait_s=60, retention_s=10)
    assert FeedbackConfig(state_dir="/s", join_partitions="2, 0").partition_list == [0, 2]


def test_prompt_sampling_is_per_request_deterministic_and_near_the_rate():
    ids = [f"req-{i}" for i in range(20_000)]
    share = sum(sampled(i, 0.25) for i in ids) / len(ids)
    assert 0.24 < share < 0.26
    assert [sampled(i, 0.25) for i in ids[:50]] == [sampled(i, 0.25) for i in ids[:50]]
    assert not any(sampled(i, 0.0) for i in ids[:100]) and all(sampled(i, 1.0) for i in ids[:100])


def test_production_prompts_pass_the_filter_and_limits():
    g = events_pb2.Generation(generation_id="g1", request_id="r1", prompt="How do I boil an egg?")
    p, outcome = production_prompt(g, 1.0, None, 100, 5)
    assert outcome == "sampled" and p.text == g.prompt and p.source == "production" and p.created_unix_ms == 5
    assert production_prompt(events_pb2.Generation(generation_id="g2", request_id="r1", prompt=g.prompt), 1.0, None,
                             100, 5)[0].prompt_id == p.prompt_id  # one prompt per request
    assert production_prompt(g, 1.0, lambda text: "egg" not in text, 100, 5) == (None, "filtered")
    assert production_prompt(g, 1.0, None, 10, 5) == (None, "filtered")
    assert load_filter("tests.integration.prompt_filters:no_passwords")("my PASSWORD") is False
    with pytest.raises(ValueError, match="has no function 'nope'"):
        load_filter("tests.integration.prompt_filters:nope")
    with pytest.raises(ConfigError, match="RLHF_FEEDBACK_PROMPT_FILTER='no_colon': cannot be loaded"):
        FeedbackConfig(state_dir="/s", prompt_filter="no_colon")
