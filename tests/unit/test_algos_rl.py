"""PPO/GAE, RLOO, DPO/IPO, SFT and KL controllers against values computed by hand."""

from __future__ import annotations

import math

import pytest
import torch

from rlhf_common.algos.dpo import preference_loss, sequence_logprob
from rlhf_common.algos.kl import AdaptiveKLController, FixedKLController
from rlhf_common.algos.ppo import (entropy, gae, kl_shaped_rewards, policy_loss, truncated_is_weights,
                                   value_loss, whiten)
from rlhf_common.algos.rloo import rloo_advantages
from rlhf_common.algos.sft import sft_loss


def test_gae_monte_carlo_limit():
    # gamma = lambda = 1: advantages are return - value
    adv, ret = gae(torch.tensor([[0.0, 0.0, 1.0]]), torch.tensor([[0.5, 0.5, 0.5]]), torch.ones(1, 3), 1.0, 1.0)
    assert adv[0].tolist() == pytest.approx([0.5, 0.5, 0.5])
    assert ret[0].tolist() == pytest.approx([1.0, 1.0, 1.0])


def test_gae_by_hand_with_discount_and_mask():
    rewards = torch.tensor([[0.0, 0.0, 1.0], [0.0, 2.0, 0.0]])
    values = torch.tensor([[0.5, 0.5, 0.5], [1.0, 1.0, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    adv, ret = gae(rewards, values, mask, gamma=0.9, lam=0.5)
    # row 0: A2 = 0.5; A1 = -0.05 + 0.45*0.5 = 0.175; A0 = -0.05 + 0.45*0.175 = 0.02875
    assert adv[0].tolist() == pytest.approx([0.02875, 0.175, 0.5])
    # row 1: the padded value 9 must not leak: A1 = 2 - 1 = 1; A0 = (0.9 - 1) + 0.45 * 1 = 0.35
    assert adv[1].tolist() == pytest.approx([0.35, 1.0, 0.0])
    assert ret[1].tolist() == pytest.approx([1.35, 2.0, 0.0])


def test_kl_shaped_rewards_put_score_on_last_token():
    r = kl_shaped_rewards(torch.tensor([1.0]), torch.tensor([[0.1, 0.2, 0.3]]), torch.tensor([[1.0, 1.0, 0.0]]), 0.5)
    assert r[0].tolist() == pytest.approx([-0.05, 0.9, 0.0])


def test_policy_loss_clips_and_weights():
    logp = torch.tensor([[0.0, 0.0]])
    old = torch.tensor([[-1.0, 0.0]])  # ratios e and 1
    adv = torch.tensor([[1.0, -2.0]])
    out = policy_loss(logp, old, adv, torch.ones(1, 2), clip_eps=0.2)
    # token 0: -min(e*1, 1.2*1) = -1.2; token 1: -min(-2, -2) = 2
    assert out.loss.item() == pytest.approx((-1.2 + 2.0) / 2)
    assert out.clip_fraction.item() == 0.5
    assert out.approx_kl.item() == pytest.approx(0.25)
    w = torch.tensor([[0.5, 1.0]])
    assert policy_loss(logp, old, adv, torch.ones(1, 2), 0.2, is_weights=w).loss.item() == pytest.approx(
        (-0.6 + 2.0) / 2)


def test_value_loss_takes_the_pessimistic_clip():
    v = value_loss(torch.tensor([[1.0]]), torch.tensor([[0.5]]), torch.tensor([[2.0]]), torch.ones(1, 1), 0.2)
    assert v.item() == pytest.approx(0.5 * 1.69)


def test_entropy_of_uniform_is_log_v():
    assert entropy(torch.zeros(2, 3, 4), torch.ones(2, 3)).item() == pytest.approx(math.log(4))


def test_whiten_zero_mean_unit_variance_on_mask():
    x = torch.tensor([[1.0, 2.0, 3.0, 100.0]])
    m = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    w = whiten(x, m)
    assert w[0, :3].mean().item() == pytest.approx(0.0, abs=1e-6)
    assert (w[0, :3] ** 2).mean().item() == pytest.approx(1.0, rel=1e-5)
    assert w[0, 3].item() == 0.0


def test_truncated_is_weights():
    w = truncated_is_weights(torch.tensor([0.0, -1.0]), torch.tensor([-1.0, 0.0]), cap=2.0)
    assert w.tolist() == pytest.approx([2.0, math.exp(-1)])


def test_rloo_leave_one_out_by_hand():
    adv = rloo_advantages(torch.tensor([1.0, 2.0, 6.0, 5.0]), ["g", "g", "g", "solo"])
    assert adv.tolist() == pytest.approx([-3.0, -1.5, 4.5, 0.0])


def test_dpo_and_ipo_by_hand():
    args = (torch.tensor([-1.0]), torch.tensor([-2.0]), torch.tensor([-1.5]), torch.tensor([-1.5]))
    dpo = preference_loss(*args, beta=0.1, kind="dpo")  # h = 1
    assert dpo.loss.item() == pytest.approx(math.log(1 + math.exp(-0.1)))
    assert dpo.chosen_reward.item() == pytest.approx(0.05)
    assert dpo.rejected_reward.item() == pytest.approx(-0.05)
    assert dpo.accuracy.item() == 1.0
    assert preference_loss(*args, beta=0.1, kind="ipo").loss.item() == pytest.approx(16.0)
    with pytest.raises(ValueError, match="beta=0"):
        preference_loss(*args, beta=0)


def test_dpo_gradient_raises_chosen_and_lowers_rejected():
    c = torch.tensor([-1.0], requires_grad=True)
    r = torch.tensor([-1.0], requires_grad=True)
    preference_loss(c, r, torch.tensor([-1.0]), torch.tensor([-1.0]), beta=0.5).loss.backward()
    assert c.grad.item() < 0 < r.grad.item()  # descent raises chosen, lowers rejected


def test_sequence_logprob_and_sft_loss():
    lp = torch.tensor([[-1.0, -2.0, -5.0]])
    m = torch.tensor([[1.0, 1.0, 0.0]])
    assert sequence_logprob(lp, m).item() == -3.0
    assert sft_loss(lp, m).item() == pytest.approx(1.5)


def test_kl_controllers():
    fixed = FixedKLController(0.1)
    assert fixed.update(100.0, 1) == 0.1
    ctl = AdaptiveKLController(0.1, target=1.0, horizon=10)
    assert ctl.update(2.0, 1) == pytest.approx(0.102)  # error clipped to +0.2
    assert ctl.update(0.5, 1) == pytest.approx(0.102 * 0.98)  # -0.5 clipped to -0.2
    restored = AdaptiveKLController(1.0, target=5.0)
    restored.load_state_dict(ctl.state_dict())
    assert restored.state_dict() == ctl.state_dict()
