"""Learning from simulated users: they prefer answers with more of one word (the rule). Their
A/B choices become labels as the join makes them; the reward model learns the rule from
them (held-out accuracy above chance by a stated margin), and DPO steps on the same labels
make the policy follow the rule more often.

Everything runs in-process on the tiny models with the services' own code: the label
records, the reward learner's examples and gated round, the trainer's preference step.
"""

from __future__ import annotations

import collections

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from rlhf.events.v1 import events_pb2
from rlhf_common.algos.logprobs import response_logprobs
from rlhf_common.sampling import sample
from rlhf_devstack.models import make_tiny_llama, make_tiny_reward_model, tiny_prompts
from rlhf_reward_learner.examples import ExampleBook
from rlhf_reward_learner.learner import RewardModelState, TrainSettings, train_round
from rlhf_trainer.labels import LabelPair, PairBuffer
from rlhf_trainer.learner import LearnerConfig, PolicyLearner, PreferenceBatch

ROUNDS, N_PROMPTS, MAX_NEW = 8, 64, 12
RM_MARGIN = 0.2  # held-out accuracy of the learned reward model on the rule, above chance (0.5)
POLICY_MARGIN = 0.15  # rise in the share of answers that contain the users' word


@pytest.mark.slow
def test_users_rule_is_learned_by_the_reward_model_and_followed_by_the_policy(tmp_path):
    torch.manual_seed(0)
    path = make_tiny_llama(tmp_path / "policy")
    tok = AutoTokenizer.from_pretrained(path)
    policy = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    texts = tiny_prompts(N_PROMPTS, seed=11)
    prompts = [tok(p).input_ids for p in texts]
    first = sample(ref, prompts, 2, MAX_NEW, tok.eos_token_id, tok.pad_token_id, seed=0)
    # The users' word: a token the untrained policy writes now and then (the 3rd most common).
    word = collections.Counter(t for r in first.responses for t in r).most_common(3)[2][0]

    def follows(resp: list[int]) -> int:
        return sum(t == word for t in resp)

    def share(model, seed: int) -> float:
        model.eval()
        s = sample(model, prompts, 4, MAX_NEW, tok.eos_token_id, tok.pad_token_id, seed=seed)
        model.train()
        return sum(follows(r) > 0 for r in s.responses) / len(s.responses)

    before = share(policy, seed=100)
    book = ExampleBook(held_out_fraction=0.25, max_examples=10_000)
    learner = PolicyLearner(policy, LearnerConfig(lr=1e-3), tok.pad_token_id)
    pairs = PairBuffer(tok, max_tokens=64)
    n_labels = 0
    for rnd in range(ROUNDS):
        policy.eval()
        s = sample(policy, prompts, 2, MAX_NEW, tok.eos_token_id, tok.pad_token_id, seed=rnd + 1)
        policy.train()
        labels = []
        for i, text in enumerate(texts):
            a, b = s.responses[2 * i], s.responses[2 * i + 1]
            if follows(a) == follows(b):
                continue  # the users see no difference: a tie, which teaches nothing
            labels.append(events_pb2.Label(
                label_id=f"r{rnd}-p{i}", prompt=text,
                responses=[events_pb2.LabelResponse(text=tok.decode(a, skip_special_tokens=True)),
                           events_pb2.LabelResponse(text=tok.decode(b, skip_special_tokens=True))],
                pairwise=events_pb2.Pairwise(choice=events_pb2.CHOICE_A if follows(a) > follows(b)
                                             else events_pb2.CHOICE_B)))
            # The trainer learns on the policy's own token ids for these answers.
            hi, lo = (a, b) if follows(a) > follows(b) else (b, a)
            pairs.pending.append(LabelPair(f"r{rnd}-p{i}", prompts[i], hi, lo, partition=0, offset=0))
        for x in labels:
            book.add(x)
        n_labels += len(labels)
        while len(pairs.pending) >= 8:
            batch = pairs.take(8)
            with torch.no_grad():
                ref_c = [sum(x) for x in response_logprobs(ref, [p.prompt for p in batch], [p.chosen for p in batch],
                                                           tok.pad_token_id)]
                ref_r = [sum(x) for x in response_logprobs(ref, [p.prompt for p in batch],
                                                           [p.rejected for p in batch], tok.pad_token_id)]
            learner.preference_step(PreferenceBatch([p.prompt for p in batch], [p.chosen for p in batch],
                                                    [p.rejected for p in batch], ref_c, ref_r), "dpo", beta=0.1)
    after = share(policy, seed=100)

    rm_dir = make_tiny_reward_model(tmp_path / "reward", path)
    result, cand = train_round(RewardModelState.from_folder(rm_dir), book,
                               TrainSettings(lr=3e-3, epochs=6, batch_pairs=16, max_length=48, min_heldout_pairs=8),
                               round_no=1)
    print(f"\nusers' labels {n_labels}; reward model held-out accuracy {result.live_accuracy:.3f} -> "
          f"{result.candidate_accuracy:.3f} on {result.heldout_pairs} pairs; policy share following the rule "
          f"{before:.3f} -> {after:.3f}")
    assert n_labels >= 40 and result.heldout_pairs >= 10
    assert result.published and result.candidate_accuracy >= 0.5 + RM_MARGIN, result
    assert after >= before + POLICY_MARGIN, (before, after)

