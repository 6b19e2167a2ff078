"""Metrics against scikit-learn's reference implementations."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sklearn.metrics import log_loss, mean_absolute_error, mean_squared_error, roc_auc_score

from towerrec.trainer.metrics import auc, binary_metrics, regression_metrics, task_metrics


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


def test_binary_and_regression_metrics_match_sklearn():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 1000).astype(float)
    probs = np.clip(0.3 * labels + 0.5 * rng.random(1000), 0.01, 0.99)
    metrics = binary_metrics(torch.tensor(probs), torch.tensor(labels), torch.ones(1000))
    assert metrics["logloss"] == pytest.approx(log_loss(labels, probs), rel=1e-9)
    base = labels.mean()
    assert metrics["ne"] == pytest.approx(
        log_loss(labels, probs) / log_loss(labels, np.full(1000, base)), rel=1e-9
    )
    assert metrics["calibration"] == pytest.approx(probs.mean() / base, rel=1e-9)
    target = rng.normal(3, 1, 1000)
    pred = target + rng.normal(0, 0.5, 1000)
    reg = regression_metrics(torch.tensor(pred), torch.tensor(target), torch.ones(1000))
    assert reg["rmse"] == pytest.approx(math.sqrt(mean_squared_error(target, pred)), rel=1e-9)
    assert reg["mae"] == pytest.approx(mean_absolute_error(target, pred), rel=1e-9)


def test_task_metrics_ignore_masked_and_padding_rows():
    preds = torch.tensor([[3.0, 0.9], [4.0, 0.2], [100.0, 0.5]])
    labels = torch.tensor([[3.0, 1.0], [5.0, 0.0], [1.0, 1.0]])
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0], [0.0, 0.0]])
    weights = torch.tensor([1.0, 1.0, 0.0])
    out = task_metrics(preds, labels, mask, weights, ["rating", "ctr"], ["regression", "binary"])
    assert out["rating"]["rmse"] == pytest.approx(math.sqrt(0.5)) and out["rating"]["count"] == 2
    assert out["ctr"]["count"] == 1 and math.isnan(out["ctr"]["auc"])
