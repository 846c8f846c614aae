"""Learning tests: each algorithm must raise a known reward on the tiny model, on CPU.

Reward = share of a target token in the response (target: the 3rd most frequent token in
the untrained policy's samples, about 5% of tokens). Stated margin: after STEPS updates the
mean reward of fresh samples must exceed the untrained policy's by MARGIN (absolute).
"""

from __future__ import annotations

import collections

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from rlhf_common.algos.logprobs import response_logprobs
from rlhf_devstack.models import make_tiny_llama, tiny_prompts
from rlhf_common.sampling import sample
from rlhf_jobs.learners import PreferenceBatch, PreferenceLearner
from rlhf_trainer.learner import LearnerConfig, PolicyLearner, RolloutBatch

STEPS = 15
MARGIN = 0.2
N, MAX_NEW = 4, 12


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    torch.set_num_threads(1)
    path = make_tiny_llama(tmp_path_factory.mktemp("learn") / "policy")
    tok = AutoTokenizer.from_pretrained(path)
    ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    prompts = [tok(p).input_ids for p in tiny_prompts(8, seed=3)]
    s = sample(ref, prompts, N, MAX_NEW, tok.eos_token_id, tok.pad_token_id, seed=0)
    target = collections.Counter(t for r in s.responses for t in r).most_common(3)[2][0]
    return path, tok, ref, prompts, target


def _reward(resp: list[int], target: int) -> float:
    return sum(t == target for t in resp) / len(resp)


def _mean_reward(model, setup_, seed: int) -> float:
    _, tok, _, prompts, target = setup_
    model.eval()
    s = sample(model, prompts, N, MAX_NEW, tok.eos_token_id, tok.pad_token_id, seed=seed)
    model.train()
    return sum(_reward(r, target) for r in s.responses) / len(s.responses)


@pytest.mark.slow
@pytest.mark.parametrize("algorithm,kl_in", [("grpo", "loss"), ("rloo", "reward"), ("ppo", "reward")])
def test_policy_gradient_algorithms_raise_the_reward(setup, algorithm, kl_in):
    path, tok, ref, prompts, target = setup
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    before = _mean_reward(model, setup, seed=1000)
    learner = PolicyLearner(model, LearnerConfig(algorithm=algorithm, lr=2e-4, kl_beta=0.01, kl_in=kl_in,
                                                 epochs=2 if algorithm == "ppo" else 1, vf_coef=0.5),
                            tok.pad_token_id)
    kls = []
    for step in range(STEPS):
        model.eval()
        s = sample(model, prompts, N, MAX_NEW, tok.eos_token_id, tok.pad_token_id, seed=step)
        model.train()
        with torch.no_grad():
            ref_lps = response_logprobs(ref, s.prompts, s.responses, tok.pad_token_id)
        res = learner.step(RolloutBatch(s.prompts, s.responses, s.logprobs, ref_lps,
                                        [_reward(r, target) for r in s.responses], s.group_ids))
        kls.append(res.kl)
    after = _mean_reward(model, setup, seed=1000)
    print(f"{algorithm}: reward {before:.3f} -> {after:.3f} in {STEPS} steps, final KL {kls[-1]:.3f}")
    assert after >= before + MARGIN, f"{algorithm}: reward {before:.3f} -> {after:.3f}"
    assert kls[0] == pytest.approx(0.0, abs=1e-4) and kls[-1] > 0  # moved away from the reference


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["dpo", "ipo"])
def test_preference_optimisation_raises_the_reward(setup, kind):
    path, tok, ref, prompts, target = setup
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    before = _mean_reward(model, setup, seed=1000)
    learner = PreferenceLearner(model, lr=2e-4, pad_id=tok.pad_token_id, beta=0.1, kind=kind)
    for step in range(STEPS):
        model.eval()
        s = sample(model, prompts, N, MAX_NEW, tok.eos_token_id, tok.pad_token_id, seed=step)
        model.train()
        groups: dict[str, list[int]] = collections.defaultdict(list)
        for i, g in enumerate(s.group_ids):
            groups[g].append(i)
        p, c, r = [], [], []
        for idx in groups.values():
            ranked = sorted(idx, key=lambda i: _reward(s.responses[i], target))
            lo, hi = ranked[0], ranked[-1]
            if _reward(s.responses[hi], target) > _reward(s.responses[lo], target):
                p.append(s.prompts[hi]), c.append(s.responses[hi]), r.append(s.responses[lo])
        if not p:
            continue
        with torch.no_grad():
            ref_c = [sum(x) for x in response_logprobs(ref, p, c, tok.pad_token_id)]
            ref_r = [sum(x) for x in response_logprobs(ref, p, r, tok.pad_token_id)]
        learner.step(PreferenceBatch(p, c, r, ref_c, ref_r))
    after = _mean_reward(model, setup, seed=1000)
    print(f"{kind}: reward {before:.3f} -> {after:.3f} in {STEPS} steps")
    assert after >= before + MARGIN, f"{kind}: reward {before:.3f} -> {after:.3f}"


@pytest.mark.slow
def test_sft_fits_the_demonstrations(setup):
    from rlhf_jobs.learners import SFTLearner

    path, tok, _, prompts, target = setup
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    demos = [[target] * 6 + [tok.eos_token_id] for _ in prompts]
    learner = SFTLearner(model, lr=1e-3, pad_id=tok.pad_token_id)
    losses = [learner.step(prompts, demos) for _ in range(STEPS)]
    assert losses[-1] < 0.25 * losses[0]
    assert _mean_reward(model, setup, seed=1000) > 0.8
