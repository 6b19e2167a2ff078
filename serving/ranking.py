"""Ranking evaluation of top-K lists: Precision, Recall, NDCG, MAP, hit rate @K and catalogue coverage.

    towerrec rank-eval --config configs/movielens100k.yaml --k 10
    towerrec recommend --config configs/movielens100k.yaml --evaluate

Relevant items of a user = its test-split rows positive for ``recommend.relevance_task`` (default:
the first binary task). Candidates = every item of the data set minus the user's items in
``recommend.seen_splits``. Users without a relevant test item are not evaluated. The trained model
and a popularity baseline (items ranked by training-split interactions) go through the same top-K
code, and the binary task also gets precision/recall/F1 at threshold 0.5 on the test rows.

Metrics are means over users of per-user values, computed on (U, K) hit matrices. For users spread
over ranks each rank builds a ``RankingSums`` (sums of per-user values, user count, recommended-item
counts); ``combine`` adds them up and ``finalize`` divides, which equals evaluating all users at once.
Per user u with hits h_1..h_K (1 if the item at rank i is relevant) and R_u relevant items::

    P@K = Σ h_i / K            R@K = Σ h_i / R_u           hit = [Σ h_i > 0]
    NDCG@K = Σ h_i / log2(i + 1)  /  Σ_{i ≤ min(R_u, K)} 1 / log2(i + 1)
    AP@K = Σ_i h_i · P@i / min(R_u, K)       (MAP@K is its mean over users)
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from towerrec.data.dataset import DatasetMeta
from towerrec.models.heads import predictions
from towerrec.models.multitask import MultiTaskModel
from towerrec.serving.catalogue import Catalogue, Rows, excluded_pairs, item_counts
from towerrec.serving.protocols import (
    diversity,
    interaction_codes,
    rank_metrics,
    sampled_candidates,
    sampled_ranks,
)
from towerrec.serving.scoring import ModelScorer, PopularityScorer, recommend, score_function, top_k
from towerrec.trainer.config import Config
from towerrec.trainer.errors import RecommendError

PER_USER = ("precision", "recall", "ndcg", "map", "hit_rate")


# ------------------------------------------------------------------------------------------ metrics
@dataclass
class RankingSums:
    """Additive ranking statistics of a set of users (one rank's share, or all of them).

    ``sums[name]``: Σ over users of the per-user metric; ``num_users``: users evaluated;
    ``item_counts``: (C,) how often each candidate was recommended (for catalogue coverage).
    """

    sums: dict[str, float]
    num_users: int
    item_counts: torch.Tensor


def ranking_sums(
    hits: torch.Tensor, num_relevant: torch.Tensor, items: torch.Tensor, num_candidates: int
) -> RankingSums:
    """Per-user metrics of K-long lists, summed over users.

    Args:
        hits: (U, K) bool, True where the item at that rank is relevant (False for padding).
        num_relevant: (U,) relevant items per user; users with 0 are left out.
        items: (U, K) recommended candidate positions, -1 for padding (coverage only).
        num_candidates: C, the catalogue size.
    """
    keep = num_relevant > 0
    hits, num_relevant, items = hits[keep].double(), num_relevant[keep].double(), items[keep]
    k = hits.shape[1]
    discounts = 1.0 / torch.log2(torch.arange(2, k + 2, dtype=torch.float64))  # (K,)
    ideal = torch.cumsum(discounts, 0)[(num_relevant.clamp(max=k) - 1).long()]  # (U,)
    found = hits.sum(1)
    precision_at = torch.cumsum(hits, 1) / torch.arange(1, k + 1, dtype=torch.float64)
    per_user = {
        "precision": found / k,
        "recall": found / num_relevant,
        "ndcg": (hits * discounts).sum(1) / ideal,
        "map": (precision_at * hits).sum(1) / num_relevant.clamp(max=k),
        "hit_rate": (found > 0).double(),
    }
    recommended = items[items >= 0]
    return RankingSums(
        sums={name: float(values.sum()) for name, values in per_user.items()},
        num_users=int(keep.sum()),
        item_counts=torch.bincount(recommended, minlength=num_candidates),
    )


def combine(parts: Sequence[RankingSums]) -> RankingSums:
    """Adds per-rank statistics (what an all-reduce with SUM over ranks computes)."""
    return RankingSums(
        sums={name: sum(p.sums[name] for p in parts) for name in PER_USER},
        num_users=sum(p.num_users for p in parts),
        item_counts=torch.stack([p.item_counts for p in parts]).sum(0),
    )


def finalize(total: RankingSums) -> dict[str, float]:
    """Means over users plus ``coverage`` (fraction of candidates recommended to anyone)."""
    users = max(total.num_users, 1)
    metrics = {name: total.sums[name] / users for name in PER_USER}
    metrics["coverage"] = float((total.item_counts > 0).double().mean()) if len(total.item_counts) else 0.0
    metrics["num_users"] = total.num_users
    return metrics


def hit_matrix(items: torch.Tensor, relevant_codes: np.ndarray, num_candidates: int) -> torch.Tensor:
    """(U, K) bool: is ``items[u, i]`` in the sorted ``user * num_candidates + item`` codes."""
    users = torch.arange(items.shape[0])[:, None].expand_as(items)
    codes = (users * num_candidates + items).numpy()
    return torch.from_numpy(np.isin(codes, relevant_codes) & (items.numpy() >= 0))


def threshold_metrics(
    probabilities: torch.Tensor, labels: torch.Tensor, threshold: float = 0.5
) -> dict[str, float]:
    """Precision, recall and F1 of ``probability >= threshold`` against 0/1 labels (1-D tensors)."""
    predicted, actual = probabilities >= threshold, labels > 0.5
    true_positive = float((predicted & actual).sum())
    precision = true_positive / max(float(predicted.sum()), 1.0)
    recall = true_positive / max(float(actual.sum()), 1.0)
    f1 = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
    return {
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "threshold": threshold,
        "count": int(labels.numel()),
    }


# ------------------------------------------------------------------------------------------ evaluation
def relevance_task(cfg: Config) -> int:
    """Index of ``recommend.relevance_task`` (default: the first binary task)."""
    name = cfg.recommend.relevance_task
    if name is None:
        binary = [t for t, task in enumerate(cfg.tasks) if task.type == "binary"]
        if not binary:
            raise RecommendError("recommend.relevance_task: no binary task to define relevance; name one")
        return binary[0]
    names = [task.name for task in cfg.tasks]
    if name not in names or cfg.tasks[names.index(name)].type != "binary":
        binary = [task.name for task in cfg.tasks if task.type == "binary"]
        raise RecommendError(
            f"recommend.relevance_task: {name!r} is not a binary task (binary tasks: {binary})"
        )
    return names.index(name)


def predict_rows(model: MultiTaskModel, rows: Rows, batch_size: int = 8192) -> torch.Tensor:
    """(N, T) predictions of the data set rows ``rows`` (their own feature values), batched."""
    outputs = []
    with torch.inference_mode():
        for start in range(0, rows.num_rows, batch_size):
            batch = rows.decoded.to_batch(start, min(start + batch_size, rows.num_rows))
            outputs.append(predictions(model(batch.sparse, batch.dense, batch.sequences), model.output_kinds))
    return torch.cat(outputs) if outputs else torch.zeros(0, len(model.output_kinds))


def evaluate_ranking(
    cfg: Config,
    model: MultiTaskModel,
    catalogue: Catalogue,
    meta: DatasetMeta,
    k: int | None = None,
    users: np.ndarray | None = None,
) -> dict:
    """Model and popularity ranking metrics @K on the test split (of ``users``' rows when given: raw
    user ids), plus the binary task at 0.5."""
    k = k or cfg.recommend.k
    split = cfg.data.test_split
    if split is None or split not in catalogue.splits:
        raise RecommendError(
            f"data.test_split: {split!r} is not a split of {meta.root}; ranking evaluation needs one"
        )
    task = relevance_task(cfg)
    test = catalogue.splits[split]
    if users is not None:
        test = test.take(np.flatnonzero(np.isin(test.users, users)))
    positive = (test.labels[:, task] == 1) & (test.label_mask[:, task] > 0)
    users = catalogue.users.positions(test.users[positive])
    items = catalogue.items.positions(test.items[positive])
    eval_rows = np.unique(users)
    user_index = np.full(len(catalogue.users.ids), -1, dtype=np.int64)
    user_index[eval_rows] = np.arange(len(eval_rows))
    num_candidates = len(catalogue.items.ids)
    relevant = np.unique(user_index[users] * num_candidates + items)
    # An item the user already saw cannot be recommended, so it does not count as relevant either.
    excluded = excluded_pairs(cfg, catalogue, eval_rows, np.arange(num_candidates))
    if excluded is not None:
        relevant = np.setdiff1d(relevant, excluded, assume_unique=True)
    num_relevant = torch.from_numpy(np.bincount(relevant // num_candidates, minlength=len(eval_rows)))

    _, _, model_top = recommend(cfg, model, catalogue, catalogue.users.ids[eval_rows], k=k)
    popularity = PopularityScorer(item_counts(cfg, catalogue), np.arange(num_candidates))
    popular_top = top_k(
        popularity,
        lambda p: p[..., 0],
        len(eval_rows),
        num_candidates,
        k,
        excluded,
        cfg.recommend.item_block_size,
    )
    result = {
        "k": k,
        "relevance_task": cfg.tasks[task].name,
        "split": split,
        "num_candidates": num_candidates,
    }
    for name, top in (("model", model_top), ("popularity", popular_top)):
        hits = hit_matrix(top.items, relevant, num_candidates)
        result[name] = finalize(ranking_sums(hits, num_relevant, top.items, num_candidates))
    result["full"] = {
        name: {
            f"hit_rate@{k}": result[name]["hit_rate"],
            f"ndcg@{k}": result[name]["ndcg"],
            **diversity(top, num_candidates),
        }
        for name, top in (("model", model_top), ("popularity", popular_top))
    }
    result.update(sampled_protocol(cfg, model, catalogue, test, positive, eval_rows, k))
    probabilities = predict_rows(model, test)[:, task]
    counted = torch.from_numpy(test.label_mask[:, task] > 0)
    result["classification"] = {
        cfg.tasks[task].name: threshold_metrics(
            probabilities[counted], torch.from_numpy(test.labels[:, task])[counted]
        )
    }
    result["score"] = {
        "score": cfg.recommend.score,
        "task_weights": cfg.recommend.task_weights or {cfg.tasks[0].name: 1.0},
        "popularity_exponent": cfg.recommend.popularity_exponent,
    }
    return result


def sampled_protocol(
    cfg: Config,
    model: MultiTaskModel,
    catalogue: Catalogue,
    test: Rows,
    positive: np.ndarray,
    eval_rows: np.ndarray,
    k: int,
) -> dict:
    """The sampled protocol (``towerrec.serving.protocols``) for the ranker and popularity: each
    evaluated user's latest relevant test item against ``recommend.sampled_negatives`` items the
    user never interacted with, scored by the ranking score (``recommend.score``)."""
    num_items = len(catalogue.items.ids)
    user_of_row = catalogue.users.positions(test.users)
    latest = np.full(len(catalogue.users.ids), -1, dtype=np.int64)
    rows = np.flatnonzero(positive)
    latest[user_of_row[rows]] = catalogue.items.positions(test.items[rows])  # later rows overwrite
    targets = latest[eval_rows]
    count = cfg.recommend.sampled_negatives
    negatives = sampled_candidates(
        interaction_codes(catalogue, eval_rows), len(eval_rows), num_items, count, cfg.seed
    )
    candidates = np.concatenate([targets[:, None], negatives], axis=1)  # (U, 1 + n), target first
    valid = torch.from_numpy(negatives >= 0)
    scorer = ModelScorer(model, cfg, catalogue.users, catalogue.items, eval_rows, np.arange(num_items))
    score = score_function(cfg, scorer.task_names)
    users = np.repeat(np.arange(len(eval_rows)), candidates.shape[1])
    scores = (
        torch.cat(
            [
                score(
                    scorer.score_pairs(
                        users[start : start + 65536], np.maximum(candidates.ravel(), 0)[start : start + 65536]
                    )
                )
                for start in range(0, len(users), 65536)
            ]
        )
        .reshape(candidates.shape)
        .float()
    )
    counts = torch.from_numpy(item_counts(cfg, catalogue).astype(np.float32))
    popular = counts[torch.from_numpy(np.maximum(candidates, 0))]
    return {
        f"sampled_{count}": {
            "model": rank_metrics(sampled_ranks(scores[:, 0], scores[:, 1:], valid), k),
            "popularity": rank_metrics(sampled_ranks(popular[:, 0], popular[:, 1:], valid), k),
        }
    }


def format_ranking(result: dict) -> str:
    k = result["k"]
    names = ("precision", "recall", "ndcg", "map", "hit_rate", "coverage")
    lines = [
        f"[towerrec] ranking @{k} on split {result['split']!r} (relevant: {result['relevance_task']} = 1; "
        f"{result['model']['num_users']} users, {result['num_candidates']} candidates; score {result['score']})",
        f"{'':<11}" + "".join(f"{n + '@' + str(k) if n != 'coverage' else n:>13}" for n in names),
    ]
    for who in ("model", "popularity"):
        lines.append(f"{who:<11}" + "".join(f"{result[who][n]:>13.4f}" for n in names))
    for protocol in [p for p in result if p.startswith("sampled_")]:
        for who, values in result[protocol].items():
            lines.append(
                f"{protocol:<11}"
                + "  ".join(f"{name}={value:.4f}" for name, value in values.items())
                + f"  ({who})"
            )
    for task, values in result["classification"].items():
        lines.append(
            f"{task} @ {values['threshold']}: precision={values['precision']:.4f} recall={values['recall']:.4f} "
            f"f1={values['f1']:.4f} ({values['count']} test rows)"
        )
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ command


def run_rank_eval(cfg: Config, args: argparse.Namespace) -> int:
    from towerrec.serving.catalogue import load_catalogue
    from towerrec.serving.export import load_id_maps, load_unsharded_model
    from towerrec.trainer.run_folder import new_output, user_output

    out = user_output(args.output, "--output", folder=False) if args.output else None
    meta = DatasetMeta.load(cfg.data.path)
    model, path = load_unsharded_model(cfg, args.checkpoint, meta.table_rows(cfg.data.sparse))
    catalogue = load_catalogue(cfg, meta, id_maps=load_id_maps(cfg, path))
    result = evaluate_ranking(cfg, model, catalogue, meta)
    result["checkpoint"] = str(path)
    out = out or new_output(Path(cfg.run_dir) / "rankings", f"ranking-{path.name}", ".json")
    out.write_text(json.dumps(result, indent=1))
    print(format_ranking(result) + f"\n[towerrec] written to {out}", flush=True)
    return 0
