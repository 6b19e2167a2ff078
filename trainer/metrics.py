"""Per-task evaluation metrics on the full (all-ranks) set of predictions.

The trainer gathers every rank's predictions first, so AUC is the AUC of the union, not a mean
of per-rank AUCs. All functions are vectorized torch and take weights (rows with weight 0 or
mask 0 do not count).
"""

from __future__ import annotations

import math

import torch

EPS = 1e-7


def auc(scores: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor | None = None) -> float:
    """Weighted ROC AUC with ties counted half (the Mann-Whitney statistic). NaN if one class is absent."""
    scores = scores.double()
    labels = labels.double()
    weights = torch.ones_like(scores) if weights is None else weights.double()
    order = torch.argsort(scores)
    scores, labels, weights = scores[order], labels[order], weights[order]
    pos = weights * labels
    neg = weights * (1 - labels)
    total_pos, total_neg = pos.sum(), neg.sum()
    if total_pos <= 0 or total_neg <= 0:
        return float("nan")
    # group equal scores: each positive beats the negatives strictly below it and ties half of its group
    _, group = torch.unique_consecutive(scores, return_inverse=True)
    num_groups = int(group.max()) + 1
    neg_per_group = torch.zeros(num_groups, dtype=torch.float64).index_add_(0, group, neg)
    pos_per_group = torch.zeros(num_groups, dtype=torch.float64).index_add_(0, group, pos)
    neg_below = torch.cumsum(neg_per_group, 0) - neg_per_group
    wins = (pos_per_group * (neg_below + 0.5 * neg_per_group)).sum()
    return float(wins / (total_pos * total_neg))


def binary_metrics(probs: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor) -> dict[str, float]:
    """AUC, log loss, normalized entropy (log loss / entropy of the base rate) and calibration
    (mean prediction / base rate) for one binary task."""
    probs = probs.double().clamp(EPS, 1 - EPS)
    labels, weights = labels.double(), weights.double()
    total = weights.sum()
    logloss = float(-(weights * (labels * probs.log() + (1 - labels) * (1 - probs).log())).sum() / total)
    base_rate = float((weights * labels).sum() / total)
    base_rate_c = min(max(base_rate, EPS), 1 - EPS)
    entropy = -(base_rate_c * math.log(base_rate_c) + (1 - base_rate_c) * math.log(1 - base_rate_c))
    mean_prob = float((weights * probs).sum() / total)
    return {
        "auc": auc(probs, labels, weights),
        "logloss": logloss,
        "ne": logloss / entropy,
        "calibration": mean_prob / base_rate if base_rate > 0 else float("nan"),
        "base_rate": base_rate,
    }


def regression_metrics(preds: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor) -> dict[str, float]:
    preds, labels, weights = preds.double(), labels.double(), weights.double()
    total = weights.sum()
    error = preds - labels
    return {
        "rmse": math.sqrt(float((weights * error**2).sum() / total)),
        "mae": float((weights * error.abs()).sum() / total),
        "label_mean": float((weights * labels).sum() / total),
    }


def task_metrics(
    preds: torch.Tensor,
    labels: torch.Tensor,
    label_mask: torch.Tensor,
    weights: torch.Tensor,
    task_names: list[str],
    task_types: list[str],
) -> dict[str, dict[str, float]]:
    """preds/labels/label_mask: (N, T) over the whole split; weights (N,). → {task: {metric: value}}."""
    out = {}
    for t, (name, kind) in enumerate(zip(task_names, task_types)):
        row_weight = label_mask[:, t] * weights
        keep = row_weight > 0
        if not keep.any():
            out[name] = {}
            continue
        args = (preds[keep, t], labels[keep, t], row_weight[keep])
        out[name] = regression_metrics(*args) if kind == "regression" else binary_metrics(*args)
        out[name]["count"] = int(keep.sum())
    return out


def trivial_baseline(
    labels: torch.Tensor, label_mask: torch.Tensor, weights: torch.Tensor, task_types: list[str]
):
    """Metrics of predicting each task's (weighted) mean label for every row: what a model must beat."""
    means = []
    for t in range(labels.shape[1]):
        w = label_mask[:, t] * weights
        means.append((w * labels[:, t]).sum() / w.sum().clamp_min(EPS))
    preds = torch.stack(means).expand_as(labels)
    return preds
