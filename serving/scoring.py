"""Scoring users × candidate items in blocks and keeping a running top-K per user.

How the scores are computed (U users, C candidates, T tasks, D_f embedding width of feature f)::

    user-side features ──embedding_bag once per user──▶ (U, D_f)
    item-side features ──embedding_bag once per item block──▶ (C_block, D_f)
    context features: id 0 (out of vocabulary), dense 0 ──▶ one vector shared by every pair
    for each block of users × items: expand to pairs ─▶ interaction ─▶ tower ─▶ heads ─▶ (U_b, C_b, T)
    ranking score per pair (``recommend.score``/``task_weights``) ─▶ merged into a running top-K per user

Embedding lookups happen once per entity, never per pair; candidates stream in blocks of
``recommend.item_block_size``, so memory is bounded by the block and the (U, K) lists, not by U × C.
"""

from __future__ import annotations

import datetime
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from towerrec.data.jagged import Jagged
from towerrec.models.heads import predictions
from towerrec.models.multitask import MultiTaskModel, sequence_inputs
from towerrec.models.sequence import pad_left
from towerrec.models.tables import TableLookup
from towerrec.serving.catalogue import Catalogue, Entities, excluded_pairs, item_counts
from towerrec.trainer.config import Config
from towerrec.trainer.errors import RecommendError


def _pool(lookup: TableLookup, name: str, jagged: Jagged) -> torch.Tensor:
    """(E, D): feature ``name`` of each row of ``jagged``, pooled (``TableLookup.pooled``)."""
    return lookup.pooled(name, torch.from_numpy(jagged.values), torch.from_numpy(jagged.lengths()))


def _padded_histories(
    model: MultiTaskModel, lookup: TableLookup, users: Entities
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Each sequence of each user, its side lists added, left-padded: (U, L, D) and (U, L) masks."""
    histories = {
        name: (
            lookup.unpooled(name, torch.from_numpy(users.sparse[name].values)),
            torch.from_numpy(users.sparse[name].lengths()),
        )
        for name in model.sequence_lists
    }
    return {
        name: pad_left(values, lengths, model.sequences[name].max_length)
        for name, (values, lengths) in zip(model.sequences, sequence_inputs(model.sequences, histories))
    }


class ModelScorer:
    """Predictions (U_b, C_b, T) for blocks of users × candidate items, with per-entity lookups.

    Args:
        model: the unsharded model (``towerrec.serving.export.load_unsharded_model``), in eval mode.
        cfg: the run configuration (feature sides, dense order).
        users, items: the entities; ``user_rows``/``item_rows`` select and order those scored.
    """

    def __init__(
        self,
        model: MultiTaskModel,
        cfg: Config,
        users: Entities,
        items: Entities,
        user_rows,
        item_rows,
        item_prior: np.ndarray | None = None,
    ):
        self.model = model
        self.lookup = TableLookup.of(model)
        self.item_prior = (
            None if item_prior is None else torch.from_numpy(np.asarray(item_prior, dtype=np.float32))
        )
        self.task_names = list(model.task_names)
        self.items, self.item_rows = items, np.asarray(item_rows)
        self.sides = {f.name: f.side for f in cfg.data.sparse}
        self.dense_sides = [f.side for f in cfg.data.dense]
        users = _subset(users, np.asarray(user_rows))
        with torch.inference_mode():
            self.user_pooled = {
                name: _pool(self.lookup, name, jagged)
                for name, jagged in users.sparse.items()
                if name not in model.sequence_lists
            }
            self.user_histories = _padded_histories(model, self.lookup, users) if model.sequences else {}
            context = [
                f.name for f in cfg.data.sparse if f.name not in users.sparse and f.name not in items.sparse
            ]
            zero_id = Jagged.single(np.zeros(1, dtype=np.int64))
            self.context_pooled = {name: _pool(self.lookup, name, zero_id) for name in context}
        self.user_dense = torch.from_numpy(users.dense)

    def item_block(self, start: int, end: int) -> dict:
        block = _subset(self.items, self.item_rows[start:end])
        pooled = {
            name: _pool(self.lookup, name, jagged)
            for name, jagged in block.sparse.items()
            if name not in self.model.sequence_lists
        }
        prior = None if self.item_prior is None else self.item_prior[self.item_rows[start:end]]
        return {"pooled": pooled, "dense": torch.from_numpy(block.dense), "size": end - start, "prior": prior}

    def __call__(self, user_start: int, user_end: int, block: dict) -> torch.Tensor:
        num_users, num_items = user_end - user_start, block["size"]
        pairs = num_users * num_items
        by_name = {}
        for name in self.model.pooled_names:
            if name in self.user_pooled:
                e = self.user_pooled[name][user_start:user_end, None, :].expand(num_users, num_items, -1)
            elif name in block["pooled"]:
                e = block["pooled"][name][None, :, :].expand(num_users, num_items, -1)
            else:
                e = self.context_pooled[name].expand(pairs, -1)
            by_name[name] = e.reshape(pairs, -1)
        for name, feature in self.model.sequences.items():  # against each candidate: once per pair
            history, valid = self.user_histories[name]
            history = history[user_start:user_end, None].expand(-1, num_items, -1, -1).flatten(0, 1)
            valid = valid[user_start:user_end, None].expand(-1, num_items, -1).flatten(0, 1)
            encoder = self.model.sequence_encoders[name]
            by_name[name] = encoder.encode_padded(history, valid, by_name[feature.candidate])
        embeddings = [by_name[name] for name in self.model.feature_names]
        dense = torch.zeros(num_users, num_items, len(self.dense_sides))
        user_cols = [j for j, side in enumerate(self.dense_sides) if side == "user"]
        item_cols = [j for j, side in enumerate(self.dense_sides) if side == "item"]
        if user_cols:
            dense[:, :, user_cols] = self.user_dense[user_start:user_end, None, :]
        if item_cols:
            dense[:, :, item_cols] = block["dense"][None, :, :]
        model = self.model
        outputs = model.heads(model.tower(model.interaction(embeddings, dense.reshape(pairs, -1))))
        return predictions(outputs, model.output_kinds).reshape(num_users, num_items, -1)

    def score_pairs(self, user_index: np.ndarray, item_positions: np.ndarray) -> torch.Tensor:
        """(P, T) predictions of P given pairs: ``user_index`` into the scored users (``user_rows``
        order), ``item_positions`` into the item entities (a cascade's per-user candidates)."""
        num_pairs = len(user_index)
        users = torch.from_numpy(np.asarray(user_index, dtype=np.int64))
        items = _subset(self.items, np.asarray(item_positions, dtype=np.int64))
        with torch.inference_mode():
            item_pooled = {
                name: _pool(self.lookup, name, jagged)
                for name, jagged in items.sparse.items()
                if name not in self.model.sequence_lists
            }
            by_name = {}
            for name in self.model.pooled_names:
                if name in self.user_pooled:
                    by_name[name] = self.user_pooled[name][users]
                elif name in item_pooled:
                    by_name[name] = item_pooled[name]
                else:
                    by_name[name] = self.context_pooled[name].expand(num_pairs, -1)
            for name, feature in self.model.sequences.items():
                history, valid = self.user_histories[name]
                encoder = self.model.sequence_encoders[name]
                by_name[name] = encoder.encode_padded(
                    history[users], valid[users], by_name[feature.candidate]
                )
            dense = torch.zeros(num_pairs, len(self.dense_sides))
            user_cols = [j for j, side in enumerate(self.dense_sides) if side == "user"]
            item_cols = [j for j, side in enumerate(self.dense_sides) if side == "item"]
            if user_cols:
                dense[:, user_cols] = self.user_dense[users]
            if item_cols:
                dense[:, item_cols] = torch.from_numpy(items.dense)
            model = self.model
            embeddings = [by_name[name] for name in model.feature_names]
            return predictions(
                model.heads(model.tower(model.interaction(embeddings, dense))), model.output_kinds
            )


class PopularityScorer:
    """The popularity baseline in the same interface: every user gets each item's training count."""

    task_names = ["popularity"]

    def __init__(self, counts: np.ndarray, item_rows):
        self.counts = torch.from_numpy(np.asarray(counts, dtype=np.float32)[np.asarray(item_rows)])

    def item_block(self, start: int, end: int) -> dict:
        return {"counts": self.counts[start:end]}

    def __call__(self, user_start: int, user_end: int, block: dict) -> torch.Tensor:
        return block["counts"][None, :, None].expand(user_end - user_start, -1, 1)


def _subset(entities: Entities, rows: np.ndarray) -> Entities:
    return Entities(
        entities.ids[rows],
        {name: jagged.take(rows) for name, jagged in entities.sparse.items()},
        entities.dense[rows],
        entities.known[rows],
    )


def score_function(cfg: Config, task_names: list[str]) -> Callable[[torch.Tensor], torch.Tensor]:
    """(…, T) predictions → (…) ranking score per ``recommend.score`` and ``recommend.task_weights``.

    ``weighted_sum``: Σ_t w_t · pred_t. ``product``: Π_t pred_t^w_t (= exp Σ_t w_t log pred_t; predictions
    must be positive, e.g. a probability and a rating in [1, 5]). Empty weights: the first task alone.
    """
    given = cfg.recommend.task_weights or {task_names[0]: 1.0}
    weights = torch.tensor([given.get(name, 0.0) for name in task_names])
    if cfg.recommend.score == "product":
        used = weights != 0
        return lambda preds: (preds[..., used].clamp_min(1e-12).log() * weights[used]).sum(-1).exp()
    return lambda preds: preds @ weights


@dataclass
class TopK:
    """Per-user lists, best first: ``items`` (U, K) candidate positions (-1 where the list is shorter
    than K), ``scores`` (U, K) (-inf there) and ``predictions`` (U, K, T)."""

    items: torch.Tensor
    scores: torch.Tensor
    predictions: torch.Tensor


def top_k_stable(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``torch.topk`` along dim 1 with ties broken by position (lower first), deterministically.

    ``torch.topk`` leaves the order of equal scores unspecified, so lists would depend on the
    block layout. Rows where ``topk`` may have chosen among scores equal to its k-th (the (k+1)-th
    equals it) are redone exactly: every score above the k-th value is kept, then as many of the
    ones equal to it as fit, the lowest positions first; NaN scores count as -inf. The k are ordered by score, then
    position (a sort of k entries, not of the whole row). (U, C) → values (U, k), positions (U, k)."""
    if k == 0:
        return scores[:, :0], torch.zeros(scores.shape[0], 0, dtype=torch.int64)
    width = min(k + 1, scores.shape[1])  # one more than k: is the k-th score tied with the next?
    values, positions = torch.topk(scores, width, dim=1, sorted=True)
    if bool(torch.isnan(values).any()):  # NaN sorts first in topk: score it as -inf, keeping ±inf
        scores = torch.nan_to_num(scores, nan=-math.inf, posinf=math.inf, neginf=-math.inf)
        values, positions = torch.topk(scores, width, dim=1, sorted=True)
    chose = values[:, k] == values[:, k - 1] if width > k else torch.zeros(len(values), dtype=torch.bool)
    values, positions = values[:, :k].contiguous(), positions[:, :k].contiguous()
    if bool(chose.any()):  # topk may have picked among scores equal to the k-th: redo those rows
        rows = chose.nonzero()[:, 0]
        part = scores[rows]
        threshold = values[rows, -1:]
        above = part > threshold
        tied = part == threshold
        room = k - above.sum(dim=1, keepdim=True)
        chosen = above | (tied & (tied.cumsum(dim=1) <= room))  # exactly k per row, in position order
        positions[rows] = chosen.nonzero()[:, 1].view(len(rows), k)
        values[rows] = part.gather(1, positions[rows])
    by_position = positions.argsort(dim=1)
    positions, values = positions.gather(1, by_position), values.gather(1, by_position)
    order = torch.sort(values, dim=1, descending=True, stable=True).indices
    return values.gather(1, order), positions.gather(1, order)


def top_k(
    scorer,
    score: Callable[[torch.Tensor], torch.Tensor],
    num_users: int,
    num_candidates: int,
    k: int,
    excluded: np.ndarray | None = None,
    item_block_size: int = 65536,
    max_pairs: int = 262144,
    progress: Callable[[float], None] | None = None,
) -> TopK:
    """Streams candidates in blocks and keeps a running top-K per user (``torch.topk`` merges).

    ``scorer.item_block(start, end)`` prepares candidates [start, end); ``scorer(u0, u1, block)``
    returns (u1 - u0, block size, T) predictions; ``score`` maps them to (u1 - u0, block size).
    A block may carry ``"prior"`` (block size,): a factor multiplying every user's score of those items.
    ``excluded``: sorted ``user * num_candidates + candidate`` codes never recommended (see ``seen_codes``).
    Ties keep the lower candidate position first. ``progress(fraction done)`` is called after
    every step of scoring.
    """
    num_tasks = len(scorer.task_names)
    best_scores = torch.full((num_users, 0), -math.inf)
    best_items = torch.zeros((num_users, 0), dtype=torch.int64)
    best_preds = torch.zeros((num_users, 0, num_tasks))
    excluded = np.zeros(0, dtype=np.int64) if excluded is None else excluded
    with torch.inference_mode():
        for item_start in range(0, num_candidates, item_block_size):
            item_end = min(item_start + item_block_size, num_candidates)
            block = scorer.item_block(item_start, item_end)
            users_per_step = max(1, max_pairs // (item_end - item_start))
            merged_scores, merged_items, merged_preds = [], [], []
            for user_start in range(0, num_users, users_per_step):
                user_end = min(user_start + users_per_step, num_users)
                preds = scorer(user_start, user_end, block).float()  # (Ub, Ib, T)
                scores = score(preds).clone()
                if block.get("prior") is not None:
                    scores *= block["prior"]
                lo, hi = np.searchsorted(excluded, [user_start * num_candidates, user_end * num_candidates])
                codes = excluded[lo:hi]
                user_of, item_of = codes // num_candidates, codes % num_candidates
                inside = (item_of >= item_start) & (item_of < item_end)
                scores[
                    torch.from_numpy(user_of[inside] - user_start),
                    torch.from_numpy(item_of[inside] - item_start),
                ] = -math.inf
                rows = slice(user_start, user_end)
                all_scores = torch.cat([best_scores[rows], scores], dim=1)
                block_items = torch.arange(item_start, item_end).expand(user_end - user_start, -1)
                all_items = torch.cat([best_items[rows], block_items], dim=1)
                top_scores, top = top_k_stable(all_scores, min(k, all_scores.shape[1]))
                merged_scores.append(top_scores)
                merged_items.append(all_items.gather(1, top))
                all_preds = torch.cat([best_preds[rows], preds], dim=1)
                merged_preds.append(all_preds.gather(1, top[:, :, None].expand(-1, -1, num_tasks)))
                if progress is not None:
                    progress(
                        (item_start * num_users + (item_end - item_start) * user_end)
                        / (num_candidates * num_users)
                    )
            best_scores = torch.cat(merged_scores)
            best_items = torch.cat(merged_items)
            best_preds = torch.cat(merged_preds)
    pad = k - best_scores.shape[1]
    if pad > 0:  # fewer candidates than K
        best_scores = F.pad(best_scores, (0, pad), value=-math.inf)
        best_items = F.pad(best_items, (0, pad), value=-1)
        best_preds = F.pad(best_preds, (0, 0, 0, pad), value=math.nan)
    best_items = torch.where(
        torch.isinf(best_scores), -1, best_items
    )  # excluded items are not recommendations
    return TopK(best_items, best_scores, best_preds)


def recommend(
    cfg: Config,
    model: MultiTaskModel,
    catalogue: Catalogue,
    user_ids: np.ndarray | None = None,
    candidate_ids: np.ndarray | None = None,
    k: int | None = None,
) -> tuple[np.ndarray, np.ndarray, TopK]:
    """Top-K lists for ``user_ids`` (default: every user) over ``candidate_ids`` (default: every item).

    Returns ``(user ids (U,), candidate item ids (C,), TopK)``; ``TopK.items`` index the candidates.
    """
    if cfg.recommend.max_pairs_per_step < 1:
        raise RecommendError(
            f"recommend.max_pairs_per_step: must be > 0, got {cfg.recommend.max_pairs_per_step}"
        )
    users, items = catalogue.users, catalogue.items
    user_rows = np.arange(len(users.ids)) if user_ids is None else users.positions(np.asarray(user_ids))
    item_rows = (
        np.arange(len(items.ids))
        if candidate_ids is None
        else np.unique(items.positions(np.asarray(candidate_ids)))
    )
    assert (user_rows >= 0).all() and (item_rows >= 0).all(), (
        "ids missing from the catalogue (pass them as extra ids)"
    )
    prior = None
    if cfg.recommend.popularity_exponent:
        prior = (1.0 + item_counts(cfg, catalogue)) ** cfg.recommend.popularity_exponent
    scorer = ModelScorer(model, cfg, users, items, user_rows, item_rows, prior)
    result = top_k(
        scorer,
        score_function(cfg, scorer.task_names),
        len(user_rows),
        len(item_rows),
        k or cfg.recommend.k,
        excluded_pairs(cfg, catalogue, user_rows, item_rows),
        cfg.recommend.item_block_size,
        # a sequence is encoded once per pair: its L positions count towards the step's memory
        max(1, cfg.recommend.max_pairs_per_step // (1 + sum(f.max_length for f in model.sequences.values()))),
        progress=ProgressLines(f"scored {len(user_rows):,} users x {len(item_rows):,} items"),
    )
    return users.ids[user_rows], items.ids[item_rows], result


class ProgressLines:
    """``[towerrec] <what>: 37% (ETA 0:04:10)`` on stderr every ``every_s`` seconds of a long job."""

    def __init__(self, what: str, every_s: float = 10.0):
        self.what, self.every_s = what, every_s
        self.started = self.printed = time.perf_counter()

    def __call__(self, done: float) -> None:
        now = time.perf_counter()
        if now - self.printed < self.every_s or done <= 0 or done >= 1:
            return
        self.printed = now
        left = (now - self.started) * (1 - done) / done
        print(f"[towerrec] {self.what}: {100 * done:.0f}% (ETA {datetime.timedelta(seconds=round(left))})",
              file=sys.stderr, flush=True)  # fmt: skip
