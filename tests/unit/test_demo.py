"""The demo's data and evaluation arithmetic: held-out prompts never reach training data, the
reward model's starting pairs prefer the better-rated answer, and the gains and the gap are
measured against the SFT answers in their standard deviations."""

from __future__ import annotations

import math
import statistics

import pytest

from rlhf_devstack.demo import DemoSettings, Scored, chitchat_prompts, eval_record, first_answer, rm_rows, sft_rows
from rlhf_jobs.preference_data import chitchat_conversations


def render(text: str) -> str:
    return f"<user>{text}</user>"


def test_first_answer_skips_greetings_and_speaker_names():
    transcript = "A: Hello!\nB: hey how are you\nA: I think a flying car would make commuting fun again\nB: yes"
    assert first_answer(transcript) == "I think a flying car would make commuting fun again"
    assert first_answer("A: hi\nB: hello") is None
    assert first_answer("A: " + "word " * 200, max_chars=50) == ("word " * 200).strip()[:50]


def test_held_out_prompts_reach_no_training_data():
    s = DemoSettings(sft_demos=10_000, rm_pairs=10_000)
    prompts = chitchat_prompts(s)
    assert len(prompts.held_out) == s.eval_prompts and not set(prompts.held_out) & set(prompts.train)
    held = {render(p) for p in prompts.held_out}
    sft, pairs = sft_rows(s, prompts, render), rm_rows(s, render)
    assert sft and pairs
    assert not {r["prompt"] for r in sft} & held and not {r["prompt"] for r in pairs} & held
    assert {r["prompt"] for r in pairs} <= {render(p) for p in prompts.train}
    # Another seed holds out other prompts.
    assert set(chitchat_prompts(DemoSettings(seed=1)).held_out) != set(prompts.held_out)


def test_reward_model_pairs_prefer_the_better_rated_answer():
    s = DemoSettings(rm_pairs=120)
    rating = {}
    for c in chitchat_conversations():
        rating.setdefault((render(c.prompt), c.text[:600]), []).append(c.rating)
    pairs = rm_rows(s, render)
    assert len(pairs) == 120
    for r in pairs:
        assert r["gap"] >= 3
        assert max(rating[(r["prompt"], r["chosen"])]) >= min(rating[(r["prompt"], r["rejected"])]) + 3


def _scored(prompt: str, gold: float, proxy: float, kl: float = 0.1, tokens: int = 10) -> Scored:
    return Scored(prompt, "answer", tokens, gold, proxy, kl, policy_version=3)


def test_gains_and_gap_are_in_sft_standard_deviations():
    before = [_scored("p", g, q) for g, q in [(0.0, 1.0), (1.0, 3.0), (2.0, 5.0)]]
    now = [_scored("p", g, q, kl=0.2, tokens=12) for g, q in [(1.0, 5.0), (2.0, 7.0), (3.0, 9.0)]]
    before_proxy_now = [1.0, 3.0, 5.0]
    rec = eval_record(now, before, before_proxy_now, reward_version=2, t=12.0, label="during")
    gold_sd, proxy_sd = statistics.pstdev([0.0, 1.0, 2.0]), statistics.pstdev(before_proxy_now)
    assert rec["gold_gain_sd"] == pytest.approx(1.0 / gold_sd)
    assert rec["proxy_gain_sd"] == pytest.approx(4.0 / proxy_sd)
    assert rec["gap_sd"] == pytest.approx(4.0 / proxy_sd - 1.0 / gold_sd)
    assert (rec["kl_nats"], rec["length_tokens"], rec["answers"]) == (pytest.approx(0.2), 12, 3)
    assert (rec["policy_version"], rec["reward_version"], rec["label"]) == (3, 2, "during")
    # The SFT policy measured against itself gains nothing.
    base = eval_record(before, before, [x.proxy for x in before], 0, 0.0, "before")
    assert base["gold_gain_sd"] == 0 and base["proxy_gain_sd"] == 0 and base["gap_sd"] == 0
    # One answer has no spread: the gains are unknown (NaN), not infinite.
    one = eval_record(now[:1], before[:1], [1.0], 0, 1.0, "during")
    assert math.isnan(one["gold_gain_sd"]) and math.isnan(one["gap_sd"])
