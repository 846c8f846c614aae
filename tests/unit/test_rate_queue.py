"""The rating queue (pairing, hidden and randomised sides, repeats and self-agreement), the AI
labeller's bookkeeping, and AI labels' weight in reward learning."""

from __future__ import annotations

import random

import pytest

from rlhf.events.v1 import events_pb2
from rlhf_feedback.judge import AiLabeller, judge_prompt, parse_choice
from rlhf_feedback.pairs import RatingQueue
from rlhf_reward_learner.examples import ExampleBook, held_out


def gen(gid: str, prompt: str, version: int = 1, response: str | None = None) -> events_pb2.Generation:
    return events_pb2.Generation(generation_id=gid, request_id="r-" + gid, prompt=prompt,
                                 response=response or f"answer {gid}", policy_version=version)


@pytest.mark.parametrize("mode,want", [("samples", {("g1", "g2"), ("g3", "g4")}),  # same version
                                       ("versions", {("g2", "g3"), ("g1", "g4")}),  # v2 against v1
                                       ("both", {("g1", "g2"), ("g3", "g4")})])
def test_pairs_by_mode(tmp_path, mode, want):
    q = RatingQueue(tmp_path / "q.sqlite", mode=mode, seed=0)
    q.observe([gen("g1", "P", 1), gen("g2", "P", 1), gen("g3", "P", 2), gen("g4", "P", 2), gen("x", "other", 1)])
    assert {(p.gen_a, p.gen_b) for p in q.open_pairs(10)} == want


def test_sides_are_randomised_and_the_item_keeps_the_truth(tmp_path):
    q = RatingQueue(tmp_path / "q.sqlite", mode="samples", repeat_share=0.0, seed=1)
    q.observe([g for i in range(40) for g in (gen(f"a{i}", f"P{i}"), gen(f"b{i}", f"P{i}"))])
    lefts = []
    for _ in range(40):
        a = q.next_for("r1")
        item = q.feedback_for(a.ticket, "r1", "b", "why", "s1")
        # the item names the generations in the order shown; the page saw only the texts
        assert (f"answer {item.generation_id}", f"answer {item.other_generation_id}") == (a.answer_a, a.answer_b)
        assert (item.choice, item.comment, item.user_id, item.kind) == ("b", "why", "r1", "pairwise")
        q.record(a.ticket, "b")
        lefts.append(item.generation_id[0])
    assert q.next_for("r1") is None  # every pair rated once
    assert 10 <= lefts.count("a") <= 30  # sides drawn at random, not always the older answer on the left
    with pytest.raises(Exception, match="not issued to this rater"):
        q.feedback_for(a.ticket, "someone-else", "a", "", "")


def test_priority_orders_the_queue(tmp_path):
    q = RatingQueue(tmp_path / "q.sqlite", mode="samples", repeat_share=0.0, seed=0)
    q.observe([g for i in range(3) for g in (gen(f"a{i}", f"P{i}"), gen(f"b{i}", f"P{i}"))])
    pri = {p.pair_id: float(i == 1) for i, p in enumerate(q.open_pairs(10))}  # the second pair first
    q.set_priorities(pri)
    a = q.next_for("r")
    assert a.prompt == "P1"


def test_repeats_measure_self_agreement(tmp_path):
    q = RatingQueue(tmp_path / "q.sqlite", mode="samples", repeat_share=0.5, seed=3)
    q.observe([g for i in range(30) for g in (gen(f"a{i}", f"P{i}"), gen(f"b{i}", f"P{i}"))])
    truth = {}  # the consistent rater always prefers the 'a' answer; the other always picks the left side
    sent = {"steady": 0, "left": 0}
    for _ in range(60):
        for rater in ("steady", "left"):
            a = q.next_for(rater)
            if a is None:
                continue
            choice = ("a" if a.answer_a.startswith("answer a") else "b") if rater == "steady" else "a"
            item = q.feedback_for(a.ticket, rater, choice, "", "")
            sent[rater] += item is not None  # a repeat is not sent again
            q.record(a.ticket, choice)
            truth.setdefault(rater, 0)
    stats = {s.rater: s for s in q.rater_stats()}
    assert stats["steady"].repeats >= 3 and stats["left"].repeats >= 3
    assert stats["steady"].self_agreement == 1.0
    assert stats["left"].self_agreement < 1.0  # sides are redrawn, so position-only choices disagree
    assert sent["steady"] == stats["steady"].ratings and sent["left"] == stats["left"].ratings


def test_ai_labeller_labels_unrated_pairs_and_audits_rated_ones(tmp_path):
    q = RatingQueue(tmp_path / "q.sqlite", mode="samples", repeat_share=0.0, seed=0)
    long = "a much longer and more careful answer"
    q.observe([g for i in range(4) for g in (gen(f"a{i}", f"P{i}"), gen(f"b{i}", f"P{i}", response=f"{long} {i}"))])
    # a human rates two pairs first: one prefers the long answer, one the short one
    for want_long in (True, False):
        a = q.next_for("h")
        pick = "a" if (long in a.answer_a) == want_long else "b"
        q.feedback_for(a.ticket, "h", pick, "", "")
        q.record(a.ticket, pick)
    submitted = []

    def longer(text: str) -> str:  # a judge rule: the longer answer wins (read from the judge prompt)
        a = text.split("Answer A:\n")[1].split("\n\nAnswer B:")[0]
        b = text.split("Answer B:\n")[1].split("\n\nThe better")[0]
        return "a" if len(a) > len(b) else "b"

    lab = AiLabeller(q, longer, submitted.extend, None, every_s=1, batch=10, max_chars=500, seed=0)
    assert lab.run_once() == 4
    assert lab.run_once() == 0  # each pair is judged once
    # only the unrated pairs are sent, flagged as AI, with the long answer preferred
    assert len(submitted) == 2 and all(it.source == "ai" and it.kind == "pairwise" for it in submitted)
    for it in submitted:
        winner = it.generation_id if it.choice == "a" else it.other_generation_id
        assert winner.startswith("b")
    ai = q.ai_stats()
    assert (ai.judged, ai.sent, ai.compared, ai.agreement) == (4, 2, 2, 0.5)


def test_judge_prompt_and_parsing():
    text = judge_prompt("Q" * 50, "x" * 50, "y", max_chars=10)
    assert "Q" * 10 + "\n" in text and "Q" * 11 not in text and text.rstrip().endswith("is:")
    assert [parse_choice(t) for t in (" A", "B.", "tie", "Answer B is better", "I think answer a", "neither")] == \
        ["a", "b", "tie", "b", "a", None]


def _label(lid: str, prompt: str, source: int) -> events_pb2.Label:
    lab = events_pb2.Label(label_id=lid, prompt=prompt, source=source,
                           responses=[events_pb2.LabelResponse(text="good"), events_pb2.LabelResponse(text="bad")])
    lab.pairwise.choice = events_pb2.CHOICE_A
    return lab


def test_ai_labels_train_with_their_weight_and_stay_out_of_the_gate():
    rng = random.Random(0)
    prompts = [f"prompt {rng.random()}" for _ in range(200)]
    book = ExampleBook(held_out_fraction=0.3, ai_weight=0.25)
    for i, p in enumerate(prompts):
        book.add(_label(f"ai{i}", p, events_pb2.LABEL_SOURCE_AI))
        book.add(_label(f"h{i}", p, events_pb2.LABEL_SOURCE_HUMAN))
    n_held = sum(held_out(p, 0.3) for p in prompts)
    assert 0 < n_held < 200
    assert len(book.pairs[True]) == n_held and all(x.weight == 1.0 for x in book.pairs[True])  # humans only
    train = book.pairs[False]
    assert sorted({x.weight for x in train}) == [0.25, 1.0] and len(train) == 2 * (200 - n_held)
    off = ExampleBook(held_out_fraction=0.3, ai_weight=0.0)
    assert off.add(_label("ai", prompts[0], events_pb2.LABEL_SOURCE_AI)) == 0
