"""Metrics against scikit-learn's reference implementations, and the sharded computations against
plain single-process ones on the same predictions."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sklearn.metrics import log_loss, mean_absolute_error, mean_squared_error, roc_auc_score

from towerrec.trainer.metrics import (
    HISTOGRAM_BINS,
    auc,
    bin_shift,
    group_aucs,
    grouped_auc,
    histogram_auc,
    score_keys,
    task_metrics,
)


@pytest.mark.parametrize("seed", range(3))
def test_auc_matches_sklearn_with_ties_and_weights(seed):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, 5000)
    scores = np.round(labels * 0.3 + rng.random(5000), 2)  # rounding creates many ties
    weights = rng.random(5000)
    got = auc(torch.tensor(scores), torch.tensor(labels), torch.tensor(weights))
    assert got == pytest.approx(roc_auc_score(labels, scores, sample_weight=weights), abs=1e-10)
    assert auc(torch.tensor(scores), torch.tensor(labels)) == pytest.approx(
        roc_auc_score(labels, scores), abs=1e-10
    )


def test_auc_of_one_class_is_nan():
    assert math.isnan(auc(torch.rand(10), torch.ones(10)))


def test_score_keys_are_monotone_and_bins_fit_the_range():
    scores = torch.sort(torch.rand(100_000)).values
    scores = torch.cat([torch.tensor([0.0, 1e-12, 2.0**-32]), scores, torch.tensor([1.0])])
    keys = score_keys(scores)
    assert (keys[1:] >= keys[:-1]).all() and (keys[1:] > keys[:-1]).sum() > 0.9 * len(keys)
    for low, high in ((0.3, 0.7), (1e-4, 1.0), (0.0, 1.0), (0.5, 0.5)):
        lo, hi = (int(k) for k in score_keys(torch.tensor([low, high])))
        shift = bin_shift(lo, hi)
        assert (hi >> shift) - (lo >> shift) < HISTOGRAM_BINS
        assert shift == 0 or (hi >> (shift - 1)) - (lo >> (shift - 1)) >= HISTOGRAM_BINS


@pytest.mark.parametrize("seed", range(4))
def test_histogram_auc_is_within_its_stated_bound_of_the_exact_auc(seed):
    rng = np.random.default_rng(seed)
    n = 20_000
    labels = rng.integers(0, 2, n)
    # calibrated-looking probabilities, some rounded (exact ties), some nearly equal (same bin)
    scores = 1 / (1 + np.exp(-(labels * 0.8 + rng.normal(0, 1.5, n) - 2)))
    scores[: n // 4] = np.round(scores[: n // 4], 3)
    scores[n // 4 : n // 2] = 0.25 + rng.random(n // 4) * 1e-6
    scores = scores.astype(np.float32)
    weights = rng.random(n)
    exact = roc_auc_score(labels, scores, sample_weight=weights)
    value, bound = histogram_auc(torch.tensor(scores), torch.tensor(labels), torch.tensor(weights))
    assert abs(value - exact) <= bound + 1e-12
    # the planted block (a quarter of the rows in one bin) holds 1/16 of the pairs: half of that may be off
    assert 0.025 < bound < 0.035
    # without the planted block the bound is small
    plain = 1 / (1 + np.exp(-(labels * 0.8 + rng.normal(0, 1.5, n) - 2))).astype(np.float32)
    value, bound = histogram_auc(torch.tensor(plain), torch.tensor(labels), torch.tensor(weights))
    assert abs(value - roc_auc_score(labels, plain, sample_weight=weights)) <= bound + 1e-12
    assert bound < 1e-4


def test_equal_scores_are_exact_ties_with_no_error_bound():
    labels = torch.tensor([0, 1, 0, 1, 1])
    value, bound = histogram_auc(torch.full((5,), 0.37), labels, torch.ones(5))
    assert value == 0.5 and bound == 0.0


def reference_gauc(groups, scores, labels, weights) -> tuple[float, int]:
    """GAUC the plain way: a loop over users, sklearn's AUC of each (impression-weighted mean over
    users whose rows hold both classes)."""
    total = weighted = 0.0
    users = 0
    for user in np.unique(groups):
        rows = groups == user
        if len(np.unique(labels[rows])) < 2:
            continue
        w = weights[rows].sum()
        weighted += w * roc_auc_score(labels[rows], scores[rows], sample_weight=weights[rows])
        total += w
        users += 1
    return weighted / total, users


@pytest.mark.parametrize("seed", range(3))
def test_group_aucs_equal_a_per_user_loop(seed):
    rng = np.random.default_rng(seed)
    n = 3000
    groups = rng.integers(0, 200, n).astype(np.int64) * 7919 - 10**12  # any int64 ids
    labels = rng.integers(0, 2, n)
    scores = np.round(rng.random(n) + 0.2 * labels, 2)  # ties within users
    weights = rng.random(n) + 0.1
    expected, users = reference_gauc(groups, scores, labels, weights)
    aucs, user_weights, ids = group_aucs(
        torch.tensor(groups), torch.tensor(scores), torch.tensor(labels), torch.tensor(weights)
    )
    assert len(ids) == users
    assert float((aucs * user_weights).sum() / user_weights.sum()) == pytest.approx(expected, abs=1e-12)
    sums = grouped_auc(
        torch.tensor(groups),
        torch.tensor(scores)[:, None],
        torch.tensor(labels)[:, None],
        torch.tensor(weights)[:, None],
    )
    assert float(sums[0, 0] / sums[0, 1]) == pytest.approx(expected, abs=1e-12) and int(sums[0, 2]) == users


def test_task_metrics_match_sklearn_and_report_gauc():
    rng = np.random.default_rng(0)
    n = 4000
    labels = rng.integers(0, 2, n).astype(float)
    probs = np.clip(0.3 * labels + 0.5 * rng.random(n), 0.01, 0.99)
    target = rng.normal(3, 1, n)
    pred = target + rng.normal(0, 0.5, n)
    groups = rng.integers(0, 100, n)
    out = task_metrics(
        torch.tensor(np.stack([pred, probs], 1)), torch.tensor(np.stack([target, labels], 1)),
        torch.ones(n, 2), torch.ones(n), ["rating", "ctr"], ["regression", "binary"], torch.tensor(groups),
    )  # fmt: skip
    ctr = out["ctr"]
    assert abs(ctr["auc"] - roc_auc_score(labels, probs)) <= ctr["auc_error_bound"] + 1e-12
    assert ctr["logloss"] == pytest.approx(log_loss(labels, probs), rel=1e-9)
    assert ctr["ne"] == pytest.approx(
        log_loss(labels, probs) / log_loss(labels, np.full(n, labels.mean())), rel=1e-9
    )
    assert ctr["calibration"] == pytest.approx(probs.mean() / labels.mean(), rel=1e-9)
    expected, users = reference_gauc(groups, probs, labels, np.ones(n))
    assert ctr["gauc"] == pytest.approx(expected, abs=1e-12) and ctr["gauc_users"] == users
    assert out["rating"]["rmse"] == pytest.approx(math.sqrt(mean_squared_error(target, pred)), rel=1e-9)
    assert out["rating"]["mae"] == pytest.approx(mean_absolute_error(target, pred), rel=1e-9)
    assert "gauc" not in out["rating"]


def test_task_metrics_ignore_masked_and_padding_rows():
    preds = torch.tensor([[3.0, 0.9], [4.0, 0.2], [100.0, 0.5]])
    labels = torch.tensor([[3.0, 1.0], [5.0, 0.0], [1.0, 1.0]])
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0], [0.0, 0.0]])
    weights = torch.tensor([1.0, 1.0, 0.0])
    out = task_metrics(preds, labels, mask, weights, ["rating", "ctr"], ["regression", "binary"])
    assert out["rating"]["rmse"] == pytest.approx(math.sqrt(0.5)) and out["rating"]["count"] == 2
    assert out["ctr"]["count"] == 1 and math.isnan(out["ctr"]["auc"])
