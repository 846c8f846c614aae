"""Reward-model training end to end on a trivially separable JSONL, with a tiny model."""

from __future__ import annotations

import json
import random

import pytest

from rlhf_devstack.models import make_tiny_llama, make_tiny_reward_model
from rlhf_jobs.preference_data import jsonl_pairs, jsonl_split, pairs_from_ratings, RatedConversation, split_by_prompt
from rlhf_jobs.reward_model import main

GOOD = ["good great happy thanks yes", "nice kind warm bright good", "great friend loves happy song"]
BAD = ["bad sad no cold dark", "sad bad late dark no", "no bad cold sad night"]


def _write_jsonl(path, n_prompts=10, per_prompt=8, seed=0):
    rng = random.Random(seed)
    with open(path, "w") as f:
        for i in range(n_prompts):
            for _ in range(per_prompt):
                f.write(json.dumps({"prompt": f"Tell me about the {['cat', 'dog', 'bird'][i % 3]} {i}.",
                                    "chosen": rng.choice(GOOD), "rejected": rng.choice(BAD)}) + "\n")


@pytest.mark.parametrize("lora", [False, True])
def test_training_learns_a_separable_preference(tmp_path, lora):
    policy = make_tiny_llama(tmp_path / "policy")
    backbone = make_tiny_reward_model(tmp_path / "backbone", policy)
    data = tmp_path / "pairs.jsonl"
    _write_jsonl(data)
    out, metrics = tmp_path / "rm", tmp_path / "metrics.json"
    argv = ["--data", str(data), "--backbone", str(backbone), "--out", str(out), "--metrics-json", str(metrics),
            "--max-length", "32", "--batch-size", "8", "--epochs", "4", "--lr", "3e-3", "--head-lr", "1e-2",
            "--threads", "1", "--no-progress", "--seed", "0"]
    main(argv + (["--lora", "--lora-r", "4"] if lora else []))
    m = json.loads(metrics.read_text())
    assert m["data"]["split"] == "by prompt" and m["data"]["prompts_held_out"] == 2
    assert m["data"]["held_out_pairs_used"] == 16 and m["data"]["train_pairs_used"] == 64
    assert m["train"]["loss_last_steps"] < m["train"]["loss_first_steps"]
    assert m["held_out"]["pairwise_accuracy"] >= 0.9
    lo, hi = m["held_out"]["accuracy_ci95"]
    assert lo <= m["held_out"]["pairwise_accuracy"] <= hi
    assert 0 <= m["held_out"]["ece"] <= 1 and 0 <= m["held_out"]["brier"] <= 1
    # The output is a plain HF folder the reward service loads, and it ranks as trained.
    from rlhf_reward.core import RewardModel, ScoreItem

    rm = RewardModel(out, max_length=32)
    good, bad = rm.score([ScoreItem("Tell me about the cat 3.", GOOD[0]), ScoreItem("Tell me about the cat 3.", BAD[0])])
    assert good.score > bad.score


def test_jsonl_errors_name_the_line(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": "a", "chosen": 1, "rejected": "c"}\n')
    with pytest.raises(ValueError, match="bad.jsonl:2: field 'chosen' must be a string, got int"):
        jsonl_pairs(p)
    p.write_text('{"prompt": "a"}\n')
    with pytest.raises(ValueError, match="bad.jsonl:1: missing field 'chosen'"):
        jsonl_pairs(p)


def test_rating_pairs_and_prompt_split_never_share_a_prompt():
    convs = [RatedConversation(f"c{p}{i}", f"prompt {p}", f"text {p} {i}", float(i)) for p in range(5)
             for i in range(1, 10)]
    pairs = pairs_from_ratings(convs, min_gap=3.0, max_per_prompt=100, rng=random.Random(0))
    assert pairs and all(pr.gap >= 3.0 for pr in pairs)
    # chosen is the better-rated conversation: "text p i" with the larger i
    assert all(int(pr.chosen.split()[-1]) - int(pr.rejected.split()[-1]) == pr.gap for pr in pairs)
    split = split_by_prompt(pairs, 0.2, random.Random(0))
    assert {p.prompt for p in split.train}.isdisjoint({p.prompt for p in split.held_out})
    assert len(split.train) + len(split.held_out) == len(pairs)


def test_single_prompt_jsonl_is_split_by_pair(tmp_path):
    p = tmp_path / "one.jsonl"
    p.write_text("".join(json.dumps({"prompt": "same", "chosen": f"good {i}", "rejected": f"bad {i}"}) + "\n"
                         for i in range(10)))
    s = jsonl_split(p, 0.2)
    assert s.description["split"].startswith("by pair") and len(s.held_out) == 2 and len(s.train) == 8
