"""Online reward learning: examples from labels, and a round gated on held-out accuracy."""

from __future__ import annotations

import math
import random

import pytest

from rlhf.events.v1 import events_pb2
from rlhf_devstack.models import make_tiny_llama, make_tiny_reward_model
from rlhf_reward_learner.examples import ExampleBook, Pair, Point, held_out
from rlhf_reward_learner.learner import RewardModelState, TrainSettings, accuracy, train_round

GOOD = ["good great happy thanks yes", "nice kind warm bright good", "great friend loves happy song"]
BAD = ["bad sad no cold dark", "sad bad late dark no", "no bad cold sad night"]


def _label(lid: str, prompt: str, responses: list[str], **signal) -> events_pb2.Label:
    x = events_pb2.Label(label_id=lid, prompt=prompt, responses=[
        events_pb2.LabelResponse(generation_id=f"g-{lid}-{i}", text=t, policy_version=1)
        for i, t in enumerate(responses)])
    for k, v in signal.items():
        if isinstance(v, int):
            setattr(x, k, v)
        else:
            getattr(x, k).CopyFrom(v)
    return x


def test_every_kind_of_label_makes_the_right_examples():
    book = ExampleBook(held_out_fraction=1e-9)  # nothing held out
    p = "Tell me something."
    assert book.add(_label("l1", p, ["A", "B"], pairwise=events_pb2.Pairwise(choice=events_pb2.CHOICE_B))) == 1
    assert book.add(_label("l2", p, ["A", "B"], pairwise=events_pb2.Pairwise(choice=events_pb2.CHOICE_TIE))) == 0
    assert book.add(_label("l3", p, ["orig", "edited"], edit=events_pb2.Edit(edited_response="edited"))) == 1
    assert book.add(_label("l3", p, ["orig", "edited"], edit=events_pb2.Edit(edited_response="edited"))) == 0
    assert book.pairs[False] == [Pair(p, "B", "A", "pairwise", ("l1",)), Pair(p, "edited", "orig", "edit", ("l3",))]
    assert book.skipped == {"tie": 1}
    # ratings pair up when far enough apart on their scale
    r = lambda v: events_pb2.Rating(value=v, scale_min=1, scale_max=5)  # noqa: E731
    assert book.add(_label("r1", p, ["ok answer"], rating=r(3))) == 0
    assert book.add(_label("r2", p, ["near answer"], rating=r(3.5))) == 0  # 0.125 of the scale apart
    assert book.add(_label("r3", p, ["best answer"], rating=r(5))) == 2  # beats both by >= 0.25
    assert book.pairs[False][-2:] == [Pair(p, "best answer", "ok answer", "rating", ("r3", "r1")),
                                      Pair(p, "best answer", "near answer", "rating", ("r3", "r2"))]
    # a lone thumb is a pointwise example; an opposite thumb on the same prompt makes a pair
    assert book.add(_label("t1", p, ["liked"], thumb=events_pb2.THUMB_UP)) == 1
    assert book.points[False] == [Point(p, "liked", 1.0, "t1")]
    assert book.add(_label("t2", p, ["disliked"], thumb=events_pb2.THUMB_DOWN)) == 1
    assert book.pairs[False][-1] == Pair(p, "liked", "disliked", "thumb", ("t1", "t2"))
    assert book.points[False] == []  # paired now, so no longer a pointwise example
    assert book.add(_label("t3", "Another prompt.", ["meh"], thumb=events_pb2.THUMB_DOWN)) == 1
    assert book.points[False][-1] == Point("Another prompt.", "meh", 0.0, "t3")


def test_held_out_split_is_by_prompt_and_near_the_fraction():
    prompts = [f"prompt {i}" for i in range(4000)]
    share = sum(held_out(p, 0.2) for p in prompts) / len(prompts)
    assert 0.18 < share < 0.22
    book = ExampleBook(held_out_fraction=0.2)
    for i, p in enumerate(prompts[:200]):
        book.add(_label(f"l{i}", p, ["A", "B"], pairwise=events_pb2.Pairwise(choice=events_pb2.CHOICE_A)))
    train, held = {x.prompt for x in book.pairs[False]}, {x.prompt for x in book.pairs[True]}
    assert train and held and not train & held
    assert all(held_out(p, 0.2) for p in held)


def test_examples_are_bounded():
    book = ExampleBook(held_out_fraction=1e-9, max_examples=10, max_prompts=5)
    for i in range(50):
        book.add(_label(f"l{i}", f"p{i}", ["A", "B"], pairwise=events_pb2.Pairwise(choice=events_pb2.CHOICE_A)))
        book.add(_label(f"t{i}", f"q{i}", ["x"], thumb=events_pb2.THUMB_UP))
    assert len(book.pairs[False]) == 10 and book.pairs[False][-1].prompt == "p49"
    assert len(book.points[False]) == 10 and len(book.prompts) == 5


def _book(n_prompts: int, rule_good_wins: bool, seed: int, held_frac: float) -> ExampleBook:
    rng = random.Random(seed)
    book = ExampleBook(held_out_fraction=held_frac)
    for i in range(n_prompts):
        g, b = rng.choice(GOOD), rng.choice(BAD)
        choice = events_pb2.CHOICE_A if rule_good_wins else events_pb2.CHOICE_B
        book.add(_label(f"s{seed}-{i}", f"Tell me about thing {i}.", [g, b],
                        pairwise=events_pb2.Pairwise(choice=choice)))
    return book


@pytest.fixture(scope="module")
def reward_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("rl")
    return make_tiny_reward_model(root / "reward", make_tiny_llama(root / "policy"))


def test_a_round_learns_the_rule_and_passes_the_gate(reward_dir):
    live = RewardModelState.from_folder(reward_dir)
    # the rule users follow is the one the untrained model gets wrong
    probe = _book(40, rule_good_wins=True, seed=5, held_frac=0.999999).pairs[True]
    good_wins = accuracy(live.model, live.tokenizer, probe, 32) < 0.5
    book = _book(120, rule_good_wins=good_wins, seed=0, held_frac=0.25)
    s = TrainSettings(lr=3e-3, epochs=3, batch_pairs=16, min_heldout_pairs=8, max_length=32)
    result, cand = train_round(live, book, s, round_no=1)
    assert result.published and cand is not None, result
    assert result.live_accuracy <= 0.5 and result.candidate_accuracy >= 0.9
    assert result.heldout_pairs == len(book.pairs[True]) >= 8 and result.loss_last < result.loss_first
    assert accuracy(cand, live.tokenizer, book.pairs[True], 32) == result.candidate_accuracy
    # the live model itself was not touched
    assert accuracy(live.model, live.tokenizer, book.pairs[True], 32) == result.live_accuracy


def test_the_gate_refuses_a_model_that_gets_worse_and_waits_for_enough_held_out_pairs(reward_dir):
    live = RewardModelState.from_folder(reward_dir)
    s = TrainSettings(lr=3e-3, epochs=3, batch_pairs=16, min_heldout_pairs=8, max_length=32)
    # held out on the rule the untrained model leans to, trained on the opposite rule: the
    # candidate can only get worse on held-out
    held = _book(40, rule_good_wins=True, seed=2, held_frac=0.999999).pairs[True]
    leans_good = accuracy(live.model, live.tokenizer, held, 32) >= 0.5
    if not leans_good:
        held = _book(40, rule_good_wins=False, seed=2, held_frac=0.999999).pairs[True]
    book = _book(100, rule_good_wins=not leans_good, seed=1, held_frac=1e-9)
    book.pairs[True] = held
    result, cand = train_round(live, book, s, round_no=2)
    assert result.live_accuracy >= 0.5
    assert not result.published and cand is None
    assert result.candidate_accuracy < result.live_accuracy and "would drop" in result.reason
    few = _book(10, rule_good_wins=True, seed=3, held_frac=1e-9)
    result, cand = train_round(live, few, s, round_no=3)
    assert cand is None and "needs at least 8 held-out pairs, has 0" in result.reason
    assert math.isnan(result.live_accuracy)
