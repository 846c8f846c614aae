"""Bradley-Terry loss and evaluation helpers against hand-computed values; Welford stats."""

from __future__ import annotations

import math
import random
import statistics

import pytest
import torch

from rlhf_common.algos.bradley_terry import (
    bradley_terry_loss,
    brier_score,
    expected_calibration_error,
    pairwise_accuracy,
    preference_probability,
    wilson_interval,
)
from rlhf_common.running_stats import RunningStats


def test_loss_hand_computed():
    # diff 0 -> log 2; diff 1 -> log(1 + e^-1); diff -2 -> log(1 + e^2)
    rc = torch.tensor([0.5, 2.0, -1.0])
    rr = torch.tensor([0.5, 1.0, 1.0])
    want = [math.log(2), math.log(1 + math.exp(-1)), math.log(1 + math.exp(2))]
    got = bradley_terry_loss(rc, rr, reduction="none")
    assert got.tolist() == pytest.approx(want, abs=1e-6)
    assert float(bradley_terry_loss(rc, rr)) == pytest.approx(sum(want) / 3, abs=1e-6)
    assert float(bradley_terry_loss(rc, rr, reduction="sum")) == pytest.approx(sum(want), abs=1e-6)


def test_margin_shifts_the_difference():
    rc, rr = torch.tensor([3.0, 1.0]), torch.tensor([1.0, 0.0])
    # diffs 2 and 1; margins 0.5 and 2 -> log(1 + e^-1.5), log(1 + e^1)
    got = bradley_terry_loss(rc, rr, margin=torch.tensor([0.5, 2.0]), reduction="none")
    assert got.tolist() == pytest.approx([math.log(1 + math.exp(-1.5)), math.log(1 + math.exp(1))], abs=1e-6)
    scalar = bradley_terry_loss(rc, rr, margin=1.0, reduction="none")
    assert scalar.tolist() == pytest.approx([math.log(1 + math.exp(-1)), math.log(2)], abs=1e-6)


def test_loss_is_stable_for_large_gaps_and_has_the_right_gradient():
    rc = torch.tensor([100.0, -100.0], requires_grad=True)
    rr = torch.tensor([0.0, 0.0])
    loss = bradley_terry_loss(rc, rr, reduction="sum")
    assert loss.item() == pytest.approx(100.0, abs=1e-4)  # softplus(100) ~ 100, softplus(-100) ~ 0
    loss.backward()
    # d/dr_c of -log sigmoid(d) = -(1 - sigmoid(d))
    assert rc.grad.tolist() == pytest.approx([0.0, -1.0], abs=1e-6)


def test_bad_reduction_is_refused():
    with pytest.raises(ValueError, match="reduction='max'"):
        bradley_terry_loss(torch.zeros(1), torch.zeros(1), reduction="max")


def test_preference_probability_and_accuracy():
    p = preference_probability(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 0.0]))
    assert p.tolist() == pytest.approx([1 / (1 + math.exp(-1)), 0.5], abs=1e-7)
    # 2 right, 1 wrong, 1 tie (half) -> 2.5 / 4
    assert pairwise_accuracy(torch.tensor([1.0, 2.0, 0.0, 1.0]), torch.tensor([0.0, 1.0, 1.0, 1.0])) == 0.625


def test_wilson_interval_hand_computed():
    # 8 of 10, z = 1.96: centre (0.8 + 0.19208) / 1.38416, half 1.96 * sqrt(0.016 + 0.0009604) / 1.38416
    lo, hi = wilson_interval(8, 10)
    z = 1.959963984540054
    denom = 1 + z * z / 10
    centre = (0.8 + z * z / 20) / denom
    half = z * math.sqrt(0.8 * 0.2 / 10 + z * z / 400) / denom
    assert (lo, hi) == pytest.approx((centre - half, centre + half), abs=1e-12)
    assert (lo, hi) == pytest.approx((0.4902, 0.9433), abs=1e-4)
    assert wilson_interval(0, 5)[0] == 0.0 and wilson_interval(5, 5)[1] == 1.0
    with pytest.raises(ValueError):
        wilson_interval(0, 0)


def test_ece_and_brier_hand_computed():
    probs = torch.tensor([0.05, 0.15, 0.95, 0.85], dtype=torch.float64)
    labels = torch.tensor([0.0, 1.0, 1.0, 1.0])
    # bins: [0,.1): p .05 y 0 -> gap .05; [.1,.2): p .15 y 1 -> .85; [.8,.9): .85 vs 1 -> .15; [.9,1]: .95 -> .05
    assert expected_calibration_error(probs, labels) == pytest.approx((0.05 + 0.85 + 0.15 + 0.05) / 4, abs=1e-9)
    assert brier_score(probs, labels) == pytest.approx((0.05 ** 2 + 0.85 ** 2 + 0.05 ** 2 + 0.15 ** 2) / 4)
    # perfectly calibrated: half of the p=0.5 predictions come true
    assert expected_calibration_error(torch.tensor([0.5, 0.5]), torch.tensor([1.0, 0.0])) == 0.0
    assert expected_calibration_error(torch.tensor([1.0]), torch.tensor([1.0])) == 0.0  # p = 1 in the last bin


def test_running_stats_match_two_pass_statistics():
    rng = random.Random(0)
    xs = [rng.gauss(3.0, 2.0) * 1e3 + 1e6 for _ in range(1000)]  # large offset: naive sums lose precision
    s = RunningStats()
    for i in range(0, len(xs), 37):  # uneven batches exercise the merge
        s.update(xs[i:i + 37])
    snap = s.snapshot()
    assert snap.count == 1000
    assert snap.mean == pytest.approx(statistics.fmean(xs), rel=1e-12)
    assert snap.std == pytest.approx(statistics.stdev(xs), rel=1e-9)
    s.update([float("nan"), float("inf")])  # ignored
    assert s.snapshot().count == 1000
    s.reset()
    assert s.snapshot() == type(snap)(0, 0.0, 0.0)
    s.update([5.0])
    assert s.snapshot() == type(snap)(1, 5.0, 0.0)
