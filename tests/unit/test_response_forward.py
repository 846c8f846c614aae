"""The trainer's and the reference's forward pass: the output head on response positions
only, each shared prompt computed once. It must be the same function as a plain
right-padded pass over every (prompt, response) row: same log-probs, same hidden states,
same gradients."""

from __future__ import annotations

import random

import pytest
import torch

from rlhf_common.algos.logprobs import (gather_logprobs, pack_responses, pack_sequences, response_forward,
                                        response_logprobs)
from rlhf_devstack.models import make_tiny_llama


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    from transformers import AutoModelForCausalLM

    path = make_tiny_llama(tmp_path_factory.mktemp("fwd") / "policy")
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float64)


def _rows(shared: bool, seed: int = 0):
    rng = random.Random(seed)
    prompts, responses = [], []
    for g in range(3):
        p = [rng.randrange(3, 200) for _ in range(rng.randrange(2, 15))]
        for _ in range(4 if shared else 1):
            prompts.append(p if shared else [rng.randrange(3, 200) for _ in range(rng.randrange(2, 15))])
            responses.append([rng.randrange(3, 200) for _ in range(rng.randrange(0, 9))])
    responses[1] = [7] * 9  # the longest; row 0 may be empty
    return prompts, responses


def _plain(model, prompts, responses):
    """Reference implementation: one right-padded pass, full logits, then the response slice."""
    ids, attn, _ = pack_sequences(prompts, responses, 0)
    out = model(input_ids=ids, attention_mask=attn, output_hidden_states=True)
    lp = torch.log_softmax(out.logits[:, :-1], -1).gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    h = out.hidden_states[-1]
    return ([lp[i, len(p) - 1:len(p) - 1 + len(r)] for i, (p, r) in enumerate(zip(prompts, responses))],
            [h[i, len(p) - 1:len(p) - 1 + len(r)] for i, (p, r) in enumerate(zip(prompts, responses))])


@pytest.mark.parametrize("shared", [False, True], ids=["distinct-prompts", "groups-share-prompts"])
def test_same_logprobs_hidden_states_and_gradients_as_a_plain_pass(model, shared):
    prompts, responses = _rows(shared)
    model.zero_grad()
    want_lp, want_h = _plain(model, prompts, responses)
    weights = [torch.linspace(-1, 1, len(r), dtype=torch.float64) for r in responses]
    sum(((lp * w).sum() + h.sum() * 1e-3) for lp, h, w in zip(want_lp, want_h, weights)).backward()
    want_grads = [p.grad.clone() for p in model.parameters()]

    model.zero_grad()
    batch = pack_responses(prompts, responses, 0)
    logits, hidden = response_forward(model, batch, output_hidden_states=True)
    assert logits.shape[:2] == batch.mask.shape == (len(prompts), 9)
    lp = gather_logprobs(logits, batch.targets)
    for i, r in enumerate(responses):
        torch.testing.assert_close(lp[i, :len(r)], want_lp[i], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(hidden[i, :len(r)], want_h[i], rtol=1e-6, atol=1e-6)
    w = batch.rows([x.tolist() for x in weights]).double()
    ((lp * w * batch.mask).sum() + (hidden * batch.mask.unsqueeze(-1)).sum() * 1e-3).backward()
    for (name, p), g in zip(model.named_parameters(), want_grads):
        # (the model's norms compute in float32 even in a float64 model: float32 noise)
        torch.testing.assert_close(p.grad, g, rtol=1e-4, atol=1e-5 * float(g.abs().max()),
                                   msg=lambda m: f"{name}: {m}")
    assert any(g.abs().sum() > 0 for g in want_grads)


def test_response_logprobs_unpadded_and_minibatch_select(model):
    prompts, responses = _rows(True, seed=1)
    with torch.no_grad():
        got = response_logprobs(model, prompts, responses, 0)
        want, _ = _plain(model, prompts, responses)
    assert [len(x) for x in got] == [len(r) for r in responses]
    for g, w in zip(got, want):
        assert g == pytest.approx(w.tolist(), abs=1e-6)
    batch = pack_responses(prompts, responses, 0)
    sub = batch.select(torch.tensor([5, 0, 11]))
    assert sub.prompts == [prompts[5], prompts[0], prompts[11]] and sub.targets.shape[0] == 3
    assert torch.equal(sub.mask, batch.mask[[5, 0, 11]])


def test_pack_responses_refuses_bad_rows():
    with pytest.raises(ValueError, match="2 prompts for 1 responses"):
        pack_responses([[1], [2]], [[3]], 0)
    with pytest.raises(ValueError, match="at least one token"):
        pack_responses([[]], [[3]], 0)
