"""The trainer's steps on feedback pairs: which labels make pairs, where to resume, and a
registered preference loss moving the policy toward the chosen answers."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from rlhf.events.v1 import events_pb2
from rlhf_common.algos.logprobs import response_logprobs
from rlhf_common.bus import Received
from rlhf_devstack.models import make_tiny_llama
from rlhf_trainer.labels import PairBuffer, pair_texts
from rlhf_trainer.learner import LearnerConfig, PolicyLearner, PreferenceBatch


def _label(lid, responses, **signal):
    x = events_pb2.Label(label_id=lid, prompt="Tell me about the cat.",
                         responses=[events_pb2.LabelResponse(text=t) for t in responses])
    for k, v in signal.items():
        if isinstance(v, int):
            setattr(x, k, v)
        else:
            getattr(x, k).CopyFrom(v)
    return x


def test_only_choices_and_edits_make_pairs():
    pw = lambda c: events_pb2.Pairwise(choice=c)  # noqa: E731
    assert pair_texts(_label("a", ["x", "y"], pairwise=pw(events_pb2.CHOICE_A))) == ("x", "y")
    assert pair_texts(_label("b", ["x", "y"], pairwise=pw(events_pb2.CHOICE_B))) == ("y", "x")
    assert pair_texts(_label("t", ["x", "y"], pairwise=pw(events_pb2.CHOICE_TIE))) is None
    assert pair_texts(_label("e", ["orig", "fixed"], edit=events_pb2.Edit(edited_response="fixed"))) == ("fixed", "orig")
    assert pair_texts(_label("u", ["x"], thumb=events_pb2.THUMB_UP)) is None


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = make_tiny_llama(tmp_path_factory.mktemp("m") / "policy")
    return path, AutoTokenizer.from_pretrained(path)


def test_resume_offsets_never_skip_a_waiting_pair(tiny):
    _, tok = tiny
    buf = PairBuffer(tok, max_tokens=16)
    rec = lambda off, label: Received(label, "rlhf.labels", 0, off, "k")  # noqa: E731
    assert not buf.add(rec(0, _label("u", ["x"], thumb=events_pb2.THUMB_UP)))
    assert buf.safe_offsets() == {0: 1}
    assert buf.add(rec(1, _label("a", ["cat runs", "dog"], pairwise=events_pb2.Pairwise(choice=events_pb2.CHOICE_A))))
    assert buf.add(rec(2, _label("b", ["one", "two"], pairwise=events_pb2.Pairwise(choice=events_pb2.CHOICE_B))))
    assert buf.safe_offsets() == {0: 1}  # the pair at offset 1 waits
    first = buf.take(1)[0]
    assert first.label_id == "a" and first.chosen[-1] == tok.eos_token_id and buf.safe_offsets() == {0: 2}
    assert first.prompt == tok("Tell me about the cat.").input_ids
    buf.take(1)
    assert buf.safe_offsets() == {0: 3}


@pytest.mark.parametrize("loss", ["dpo", "ipo"])
def test_a_preference_step_moves_the_policy_toward_the_chosen_answers(tiny, loss):
    path, tok = tiny
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    learner = PolicyLearner(model, LearnerConfig(lr=1e-3), pad_id=tok.pad_token_id)
    prompts = [tok(f"Tell me about the {w}.").input_ids for w in ("cat", "dog", "sun", "moon")]
    chosen = [tok("good great happy", add_special_tokens=False).input_ids] * 4
    rejected = [tok("bad sad dark", add_special_tokens=False).input_ids] * 4

    def seq(m, responses):
        with torch.no_grad():
            return [sum(x) for x in response_logprobs(m, prompts, responses, tok.pad_token_id)]

    ref_c, ref_r = seq(model, chosen), seq(model, rejected)  # the starting policy is the reference
    batch = PreferenceBatch(prompts, chosen, rejected, ref_c, ref_r)
    first = learner.preference_step(batch, loss, beta=0.1)
    assert first["accuracy"] <= 0.5  # policy == reference: no implicit preference yet
    margin = sum(a - b - (c - d) for a, b, c, d in zip(seq(model, chosen), seq(model, rejected), ref_c, ref_r)) / 4
    assert margin > 1.0  # log-ratio of chosen over rejected, against the reference, in nats
    assert learner.preference_step(batch, loss, beta=0.1)["accuracy"] == 1.0
    with pytest.raises(KeyError, match="unknown preference loss 'kto'"):
        learner.preference_step(batch, "kto", beta=0.1)
