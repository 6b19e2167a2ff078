"""Per-task evaluation metrics, computed where the rows are: each rank keeps its own evaluation
rows and only bounded summaries cross ranks (no rank ever holds every prediction).

Per rank (N rows, T tasks): predictions (N, T), labels (N, T), the weight each row counts with
for each task (N, T) = label mask × sample weight (padding rows: 0), and the group (user) of each
row (N,) int64::

    sums (log loss, squared error, label mean, ...)      all-reduce: 6 floats per task
    AUC: weighted score histograms per class              all-reduce: 2 + HISTOGRAM_BINS x 4 per binary task
    GAUC: rows routed to rank mix64(group) % W            all-to-all: every counted row once
          each rank: exact AUC of each of its groups       all-reduce: 3 floats per binary task

**AUC** is read off a histogram of the scores: ``HISTOGRAM_BINS`` bins over the range of the
scores of all ranks, in the order of their float32 bits (``score_keys``), so bins are relatively
finer near 0, where click probabilities crowd (scores in [0.3, 0.7]: bins of ~2^-16 of the score;
in [1e-4, 1]: ~2^-13). Pairs in different bins are ordered exactly; a (positive, negative) pair in
the same bin is counted a half, which is exact when the two scores are equal (a tie, as the exact
AUC counts it) and off by at most 1/2 otherwise. The metrics report the bound this gives,
``auc_error_bound`` = Σ over bins holding more than one distinct score of pos_b · neg_b / 2 / (P · N)
(weighted), so that |AUC - exact AUC| <= ``auc_error_bound`` always (tested against the exact AUC in
``tests/trainer/test_metrics.py``, which also states its size on logistic scores). It depends
on how densely the scores crowd, not on the number of rows.

**GAUC** (grouped AUC; Zhou et al., *Deep Interest Network*) is Σ_u w_u · AUC_u / Σ_u w_u over
the groups (users) whose counted rows hold both classes, w_u the weight of u's counted rows
(impressions), AUC_u the exact weighted AUC of u's rows with ties counted a half. TorchRec's
``metrics/gauc.py`` averages sessions with equal weight and skips sessions whose predictions are
all equal; here a user with equal predictions counts with AUC 0.5 (what the model tells it apart
by: nothing), so a constant predictor gets GAUC 0.5. ``gauc_users`` says how many users counted.

Functions take a ``Collectives``; ``LOCAL`` (one process) makes every function a plain
single-process computation, which is what the multi-rank results must equal.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from towerrec.data.cleaning import mix64

EPS = 1e-7
HISTOGRAM_BINS = 1 << 17
"""Bins of an AUC histogram (4 numbers each: 3 MiB a task crosses the ranks per evaluation)."""
KEY_LIMIT = 1 << 40
"""Larger than any score key."""


class Collectives(Protocol):
    """What the metrics need from the ranks (``towerrec.trainer.distributed.collectives``)."""

    world_size: int

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor: ...

    def all_reduce_max(self, tensor: torch.Tensor) -> torch.Tensor: ...

    def route(self, destination: torch.Tensor, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        """Row i of every tensor goes to rank ``destination[i]``; returns the rows this rank got
        (from rank 0's first, in the order each rank sent them)."""
        ...


class _SingleProcess:
    world_size = 1

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor

    def all_reduce_max(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor

    def route(self, destination: torch.Tensor, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        return list(tensors)


LOCAL: Collectives = _SingleProcess()
"""One process: no communication."""


# --------------------------------------------------------------------------------------- exact AUC
def auc(scores: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor | None = None) -> float:
    """Exact weighted ROC AUC of rows held in one process, ties counted half (the Mann-Whitney
    statistic). NaN if one class is absent."""
    groups = torch.zeros(len(scores), dtype=torch.int64)
    weights = torch.ones_like(scores, dtype=torch.float64) if weights is None else weights
    aucs, _, _ = group_aucs(groups, scores, labels, weights)
    return float(aucs[0]) if len(aucs) else float("nan")


def group_aucs(
    groups: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Exact weighted AUC of each group's rows (ties half), vectorised over all groups at once.

    Args: groups (N,) int64, scores (N,), labels (N,) in {0, 1}, weights (N,) >= 0.
    Returns (auc, weight, group) of the groups holding both classes: (G,) float64, (G,) float64
    (the group's total weight), (G,) int64 (its id).
    """
    scores, labels, weights = scores.double(), labels.double(), weights.double()
    # sort by (group, score): a stable sort by score, then a stable sort by group
    by_score = torch.argsort(scores, stable=True)
    order = by_score[torch.argsort(groups[by_score], stable=True)]
    groups, scores, labels, weights = groups[order], scores[order], labels[order], weights[order]
    pos, neg = weights * labels, weights * (1 - labels)
    # runs of equal (group, score): ties within a group
    new_run = torch.ones(len(groups), dtype=torch.bool)
    new_run[1:] = (groups[1:] != groups[:-1]) | (scores[1:] != scores[:-1])
    run = torch.cumsum(new_run, 0) - 1
    num_runs = int(run[-1]) + 1 if len(run) else 0
    run_pos = torch.zeros(num_runs, dtype=torch.float64).index_add_(0, run, pos)
    run_neg = torch.zeros(num_runs, dtype=torch.float64).index_add_(0, run, neg)
    run_group = torch.zeros(num_runs, dtype=torch.int64).index_copy_(0, run, groups)
    user_ids, run_user = torch.unique_consecutive(run_group, return_inverse=True)
    num_users = len(user_ids)
    # negatives strictly below each run, within its group: the running sum minus the group's start
    before = torch.cumsum(run_neg, 0) - run_neg
    first_run = torch.zeros(num_users, dtype=torch.int64)
    first_run[1:] = torch.nonzero(run_user[1:] != run_user[:-1]).flatten() + 1
    below = before - before[first_run][run_user]
    wins = torch.zeros(num_users, dtype=torch.float64).index_add_(
        0, run_user, run_pos * (below + 0.5 * run_neg)
    )
    total_pos = torch.zeros(num_users, dtype=torch.float64).index_add_(0, run_user, run_pos)
    total_neg = torch.zeros(num_users, dtype=torch.float64).index_add_(0, run_user, run_neg)
    both = (total_pos > 0) & (total_neg > 0)
    aucs = wins[both] / (total_pos[both] * total_neg[both])
    return aucs, (total_pos + total_neg)[both], user_ids[both]


# --------------------------------------------------------------------------------------- histogram AUC
def score_keys(scores: torch.Tensor) -> torch.Tensor:
    """(N,) int64 keys in the order of the scores, clamped to [0, 1]: the bits of the float32 score
    (for non-negative floats, the bit patterns sort as the values do)."""
    return scores.float().clamp(0.0, 1.0).contiguous().view(torch.int32).to(torch.int64)


def bin_shift(low_key: int, high_key: int) -> int:
    """The fewest low bits to drop from the keys so that [low_key, high_key] spans at most
    ``HISTOGRAM_BINS`` bins."""
    shift = 0
    while (high_key >> shift) - (low_key >> shift) >= HISTOGRAM_BINS:
        shift += 1
    return shift


@dataclass
class ScoreHistogram:
    """Weighted positives and negatives per score bin, and each bin's smallest and largest key."""

    positives: torch.Tensor  # (bins,) float64
    negatives: torch.Tensor  # (bins,) float64
    low: torch.Tensor  # (bins,) int64: smallest key in the bin (KEY_LIMIT where empty)
    high: torch.Tensor  # (bins,) int64: largest key in the bin (-1 where empty)

    @classmethod
    def of(cls, keys: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor, first: int, shift: int):
        """The histogram of rows with score ``keys``, bins of ``2^shift`` keys from key ``first``."""
        num_bins = int(HISTOGRAM_BINS)
        bins = ((keys >> shift) - (first >> shift)).clamp(0, num_bins - 1)
        weights, labels = weights.double(), labels.double()
        positives = torch.zeros(num_bins, dtype=torch.float64).index_add_(0, bins, weights * labels)
        negatives = torch.zeros(num_bins, dtype=torch.float64).index_add_(0, bins, weights * (1 - labels))
        low = torch.full((num_bins,), KEY_LIMIT).scatter_reduce_(0, bins, keys, "amin")
        high = torch.full((num_bins,), -1).scatter_reduce_(0, bins, keys, "amax")
        return cls(positives, negatives, low, high)

    def auc(self) -> tuple[float, float]:
        """(AUC, error bound): |AUC - exact AUC| <= bound (module docstring). NaN if a class is absent."""
        total_pos, total_neg = self.positives.sum(), self.negatives.sum()
        if total_pos <= 0 or total_neg <= 0:
            return float("nan"), float("nan")
        below = torch.cumsum(self.negatives, 0) - self.negatives
        pairs = total_pos * total_neg
        wins = (self.positives * (below + 0.5 * self.negatives)).sum()
        mixed = self.high > self.low  # bins holding two distinct scores or more
        bound = 0.5 * (self.positives[mixed] * self.negatives[mixed]).sum()
        return float(wins / pairs), float(bound / pairs)


def histogram_auc(
    scores: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor, collectives: Collectives = LOCAL
) -> tuple[float, float]:
    """(AUC, error bound) of the rows of every rank from a histogram of their scores (module
    docstring): the bins span the scores' range over all ranks (one all-reduce of two numbers),
    then one all-reduce of the histogram."""
    keys = score_keys(scores)
    extremes = torch.tensor(
        [int(keys.max()) if len(keys) else -1, -int(keys.min()) if len(keys) else -KEY_LIMIT]
    )
    extremes = collectives.all_reduce_max(extremes)
    high, low = int(extremes[0]), -int(extremes[1])
    if high < 0:
        return float("nan"), float("nan")
    histogram = ScoreHistogram.of(keys, labels, weights, low, bin_shift(low, high))
    counts = collectives.all_reduce_sum(torch.stack([histogram.positives, histogram.negatives]))
    extremes = collectives.all_reduce_max(torch.stack([-histogram.low, histogram.high]))
    return ScoreHistogram(counts[0], counts[1], -extremes[0], extremes[1]).auc()


# --------------------------------------------------------------------------------------- per task
def _group_rank(groups: torch.Tensor, world_size: int) -> torch.Tensor:
    """The rank that computes a group's AUC: a well-mixed hash of the id, so ranks get even shares."""
    mixed = mix64(groups.numpy().view(np.uint64))
    return torch.from_numpy((mixed % np.uint64(world_size)).astype(np.int64))


def grouped_auc(
    groups: torch.Tensor,
    scores: torch.Tensor,
    labels: torch.Tensor,
    weights: torch.Tensor,
    collectives: Collectives = LOCAL,
) -> torch.Tensor:
    """GAUC sums of every binary task over all ranks: (T, 3) float64 = (Σ_u w_u · AUC_u, Σ_u w_u,
    users counted) per task, each user's rows brought to one rank first.

    Args: groups (N,) int64; scores, labels, weights (N, T) (weight 0: the row does not count for
    that task). Rows that count for no task stay where they are.
    """
    num_tasks = scores.shape[1]
    counted = (weights > 0).any(dim=1)
    groups, scores, labels, weights = groups[counted], scores[counted], labels[counted], weights[counted]
    values = torch.cat([scores.double(), labels.double(), weights.double()], dim=1)
    if collectives.world_size > 1:
        groups, values = collectives.route(_group_rank(groups, collectives.world_size), [groups, values])
    sums = torch.zeros(num_tasks, 3, dtype=torch.float64)
    for t in range(num_tasks):
        task_weights = values[:, 2 * num_tasks + t]
        keep = task_weights > 0
        aucs, user_weights, _ = group_aucs(
            groups[keep], values[keep, t], values[keep, num_tasks + t], task_weights[keep]
        )
        sums[t] = torch.stack(
            [(aucs * user_weights).sum(), user_weights.sum(), torch.tensor(float(len(aucs)))]
        )
    return collectives.all_reduce_sum(sums)


def task_metrics(
    preds: torch.Tensor,
    labels: torch.Tensor,
    label_mask: torch.Tensor,
    weights: torch.Tensor,
    task_names: list[str],
    task_types: list[str],
    groups: torch.Tensor | None = None,
    collectives: Collectives = LOCAL,
) -> dict[str, dict[str, float]]:
    """Metrics of every task over the rows of all ranks → {task: {metric: value}}.

    Args (this rank's rows): preds/labels/label_mask (N, T), weights (N,), groups (N,) int64 or
    None (no GAUC). Every rank must call it, with the same tasks. Binary tasks: AUC (and its
    ``auc_error_bound``), GAUC and ``gauc_users`` (with groups), log loss, normalized entropy (log
    loss / entropy of the base rate), calibration (mean prediction / base rate), base rate;
    regression: RMSE, MAE, label mean. Every task: ``count`` (rows that count).
    """
    counted_weight = (label_mask * weights.unsqueeze(1)).double()
    preds, labels = preds.double(), labels.double()
    binary = [t for t, kind in enumerate(task_types) if kind != "regression"]
    probs = preds.clamp(EPS, 1 - EPS)
    # per task: Σw, Σw·y, Σw·loss, Σw·pred, Σw·|e|, count
    loss = torch.where(
        torch.tensor([kind == "regression" for kind in task_types]),
        (preds - labels) ** 2,
        -(labels * probs.log() + (1 - labels) * (1 - probs).log()),
    )
    sums = torch.stack(
        [
            counted_weight.sum(0),
            (counted_weight * labels).sum(0),
            (counted_weight * loss).sum(0),
            (counted_weight * preds).sum(0),
            (counted_weight * (preds - labels).abs()).sum(0),
            (counted_weight > 0).sum(0).double(),
        ]
    )
    sums = collectives.all_reduce_sum(sums)
    aucs: dict[int, tuple[float, float]] = {}
    for t in binary:
        keep = counted_weight[:, t] > 0
        aucs[t] = histogram_auc(preds[keep, t], labels[keep, t], counted_weight[keep, t], collectives)
    gauc = None
    if groups is not None and binary:
        gauc = grouped_auc(
            groups, preds[:, binary], labels[:, binary], counted_weight[:, binary], collectives
        )
    out: dict[str, dict[str, float]] = {}
    for t, (name, kind) in enumerate(zip(task_names, task_types)):
        total, label_sum, loss_sum, pred_sum, error_sum, count = (float(v) for v in sums[:, t])
        if count == 0:
            out[name] = {}
            continue
        if kind == "regression":
            out[name] = {
                "rmse": math.sqrt(loss_sum / total),
                "mae": error_sum / total,
                "label_mean": label_sum / total,
            }
        else:
            base_rate = label_sum / total
            clipped = min(max(base_rate, EPS), 1 - EPS)
            entropy = -(clipped * math.log(clipped) + (1 - clipped) * math.log(1 - clipped))
            logloss = loss_sum / total
            out[name] = {"auc": aucs[t][0], "auc_error_bound": aucs[t][1]}
            if gauc is not None:
                weighted, user_weight, users = (float(v) for v in gauc[binary.index(t)])
                out[name]["gauc"] = weighted / user_weight if users else float("nan")
                out[name]["gauc_users"] = users
            out[name].update(
                logloss=logloss,
                ne=logloss / entropy,
                calibration=(pred_sum / total) / base_rate if base_rate > 0 else float("nan"),
                base_rate=base_rate,
            )
        out[name]["count"] = int(count)
    return out


def trivial_baseline(metrics: dict[str, dict[str, float]], labels: torch.Tensor) -> torch.Tensor:
    """Predictions of each task's mean label over all ranks (from ``task_metrics``' results) for
    this rank's rows: what a model must beat."""
    means = [values.get("label_mean", values.get("base_rate", 0.0)) for values in metrics.values()]
    return torch.tensor(means, dtype=torch.float64).expand(labels.shape[0], len(means))
