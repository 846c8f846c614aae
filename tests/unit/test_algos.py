"""Losses, advantages and KL estimators against values computed by hand."""

from __future__ import annotations

import math

import pytest
import torch

from rlhf_common.algos.grpo import group_advantages, masked_mean
from rlhf_common.algos.kl import kl_per_token
from rlhf_common.algos.logprobs import pack_sequences, token_logprobs


def test_kl_estimators_by_hand():
    logp = torch.tensor([-1.0, -2.0])
    ref = torch.tensor([-1.5, -1.0])
    # log_ratio = [0.5, -1.0]
    assert kl_per_token(logp, ref, "k1").tolist() == pytest.approx([0.5, -1.0])
    assert kl_per_token(logp, ref, "k2").tolist() == pytest.approx([0.125, 0.5])
    assert kl_per_token(logp, ref, "k3").tolist() == pytest.approx(
        [math.exp(-0.5) - 1 + 0.5, math.exp(1.0) - 1 - 1.0])


def test_kl_unknown_estimator_names_it():
    with pytest.raises(ValueError, match="k9"):
        kl_per_token(torch.zeros(1), torch.zeros(1), "k9")  # type: ignore[arg-type]


def test_k3_is_zero_iff_equal_and_never_negative():
    x = torch.arange(-30, 31, dtype=torch.float64) / 10
    k3 = kl_per_token(x, torch.zeros_like(x), "k3")
    assert (k3 >= 0).all()
    assert k3[30].item() == 0.0 and (k3[:30] > 0).all() and (k3[31:] > 0).all()


def test_group_advantages_by_hand():
    r = torch.tensor([1.0, 3.0, 10.0, 10.0, 5.0])
    adv = group_advantages(r, ["a", "a", "b", "b", "c"])
    # group a: mean 2, std (unbiased) sqrt(2) -> [-1/sqrt2, 1/sqrt2]
    s = 1 / math.sqrt(2)
    assert adv.tolist() == pytest.approx([-s, s, 0.0, 0.0, 0.0], abs=1e-5)


def test_group_advantages_without_std_scaling():
    adv = group_advantages(torch.tensor([1.0, 2.0, 6.0]), ["g", "g", "g"], scale_by_std=False)
    assert adv.tolist() == pytest.approx([-2.0, -1.0, 3.0])


def test_masked_mean_ignores_masked_and_handles_empty():
    assert masked_mean(torch.tensor([1.0, 100.0]), torch.tensor([1.0, 0.0])).item() == 1.0
    assert masked_mean(torch.tensor([5.0]), torch.tensor([0.0])).item() == 0.0


def test_pack_sequences_masks_response_targets():
    ids, attn, mask = pack_sequences([[5, 6], [7]], [[8, 9, 10], [11]], pad_id=0)
    assert ids.tolist() == [[5, 6, 8, 9, 10], [7, 11, 0, 0, 0]]
    assert attn.tolist() == [[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]]
    # targets are ids[:, 1:]; response targets of row 0 are positions 1..3 (8, 9, 10)
    assert mask.tolist() == [[0, 1, 1, 1], [1, 0, 0, 0]]


def test_token_logprobs_gathers_next_tokens():
    logits = torch.log(torch.tensor([[[0.1, 0.9], [0.7, 0.3], [0.5, 0.5]]]))
    lp = token_logprobs(logits, torch.tensor([[0, 1, 0]]))
    assert lp.exp()[0].tolist() == pytest.approx([0.9, 0.7])
