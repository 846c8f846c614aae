"""Algorithms by name: a new one is one registered entry, and the learner runs it."""

from __future__ import annotations

import pytest
import torch

from rlhf_common.algos.registry import ADVANTAGES, ALGORITHMS, Advantages, Algorithm, Estimator, Registry
from rlhf_devstack.models import make_tiny_llama
from rlhf_trainer.learner import LearnerConfig, PolicyLearner, RolloutBatch


def test_unknown_and_duplicate_names_are_errors():
    with pytest.raises(KeyError, match=r"unknown algorithm 'a2c'; known: \['grpo', 'ppo', 'rloo'\]"):
        ALGORITHMS.get("a2c")
    r: Registry[int] = Registry("thing")
    r.register("a", 1)
    with pytest.raises(ValueError, match="thing 'a' is registered already"):
        r.register("a", 2)


def test_builtin_algorithms_compose_estimators_and_losses():
    assert {n: (a.advantage, a.loss) for n, a in ((n, ALGORITHMS.get(n)) for n in ALGORITHMS.names())} == {
        "grpo": ("grpo", "clipped"), "rloo": ("rloo", "clipped"), "ppo": ("gae", "clipped")}
    assert ALGORITHMS.get("ppo").estimator.needs_values and not ALGORITHMS.get("grpo").estimator.needs_values


def test_a_registered_estimator_is_used_by_the_learner(tmp_path, monkeypatch):
    """A batch-mean baseline (REINFORCE) added as one entry: the learner trains with it, and its
    advantages, not GRPO's, drive the step (GRPO's per-group scaling differs from them)."""
    seen = []

    def batch_mean(x):
        adv = (x.scores - x.scores.mean()).unsqueeze(-1) * x.mask
        seen.append(adv.clone())
        return Advantages(adv)

    name = "test_reinforce_batch_mean"
    for reg in (ADVANTAGES, ALGORITHMS):  # the registrations end with the test
        monkeypatch.setattr(reg, "_entries", dict(reg._entries))
    ADVANTAGES.register(name, Estimator(batch_mean))
    ALGORITHMS.register(name, Algorithm(advantage=name, loss="clipped"))
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(make_tiny_llama(tmp_path / "m"), dtype=torch.float32)
    learner = PolicyLearner(model, LearnerConfig(algorithm=name, lr=1e-3), pad_id=0)
    assert learner.value_head is None
    before = [p.detach().clone() for p in model.parameters()]
    res = learner.step(RolloutBatch(
        prompts=[[5, 6], [5, 6], [7, 8], [7, 8]], responses=[[9, 10], [11], [12, 13], [14]],
        behaviour_logprobs=[[-1.0, -1.0], [-1.0], [-1.0, -1.0], [-1.0]], ref_logprobs=[[-1.0, -1.0], [-1.0],
                                                                                         [-1.0, -1.0], [-1.0]],
        scores=[1.0, 0.0, 3.0, 0.0], group_ids=["a", "a", "b", "b"]))
    assert len(seen) == 1 and torch.isfinite(torch.tensor(res.loss))
    per_sample = seen[0].sum(-1) / (seen[0] != 0).sum(-1).clamp(min=1)
    assert per_sample.tolist() == pytest.approx([0.0, -1.0, 2.0, -1.0])
    assert any(not torch.equal(a, p) for a, p in zip(before, model.parameters()))
