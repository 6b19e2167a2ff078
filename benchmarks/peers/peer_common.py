"""Helpers shared by the peer drivers. Runs inside a peer's own virtualenv: numpy and torch only."""

from __future__ import annotations

import json
import time

import numpy as np
import torch

SPARSE = ("user_id", "item_id", "gender", "age_bucket", "occupation")
MULTI_HOT = "genres"


def load(path: str) -> tuple[dict, dict]:
    """(arrays, vocabulary sizes) written by ``benchmarks.common.export_arrays``."""
    arrays = dict(np.load(path))
    vocab = json.loads(open(path.removesuffix(".npz") + ".json").read())
    return arrays, vocab


class StepTimer:
    """Forward pre-hook on the model: the start time of every training-mode forward, per epoch."""

    def __init__(self, model: torch.nn.Module):
        self.starts: list[list[float]] = []
        self.rows: list[list[int]] = []
        model.register_forward_pre_hook(self._hook)
        self._model = model

    def new_epoch(self) -> None:
        self.starts.append([])
        self.rows.append([])

    def _hook(self, module, args) -> None:
        if not self._model.training:
            return
        first = args[0]
        rows = len(next(iter(first.values()))) if isinstance(first, dict) else len(first)
        self.starts[-1].append(time.perf_counter())
        self.rows[-1].append(rows)

    def samples_per_s(self, skip_epochs: int = 1) -> float:
        rows = seconds = 0.0
        for starts, sizes in list(zip(self.starts, self.rows))[skip_epochs:]:
            for k in range(len(starts) - 1):
                seconds += starts[k + 1] - starts[k]
                rows += sizes[k]
        return rows / seconds if seconds else float("nan")


def rmse(pred: np.ndarray, label: np.ndarray) -> float:
    return float(np.sqrt(np.mean((pred.astype(np.float64) - label) ** 2)))


def auc(score: np.ndarray, label: np.ndarray) -> float:
    """ROC AUC (Mann-Whitney; ties are negligible for continuous scores)."""
    order = np.argsort(score, kind="stable")
    ranks = np.empty(len(score))
    ranks[order] = np.arange(1, len(score) + 1)
    positives = label > 0.5
    num_pos, num_neg = positives.sum(), (~positives).sum()
    return float((ranks[positives].sum() - num_pos * (num_pos + 1) / 2) / (num_pos * num_neg))
