"""Retrieve, then rank: the retrieval model's index fetches ``recommend.num_candidates`` items per
user and a multi-task ranker (``recommend.ranker``: its config, over the same data set) orders
them; the lists are the ranker's top K of the retrieved items.

Only the retrieved (user, item) pairs are scored: U × N forward passes instead of U × catalogue.
"""

from __future__ import annotations

import numpy as np
import torch

from towerrec.data.dataset import DatasetMeta
from towerrec.serving.catalogue import Catalogue, load_catalogue
from towerrec.serving.scoring import ModelScorer, TopK, score_function, top_k_stable
from towerrec.trainer.config import Config, load_config
from towerrec.trainer.errors import RecommendError

PAIRS_PER_STEP = 65536


def load_ranker(cfg: Config) -> tuple[Config, Catalogue, object]:
    """The ranker named by ``recommend.ranker``: its config, catalogue and trained model."""
    from pathlib import Path

    from towerrec.serving.export import load_id_maps, load_unsharded_model

    path = Path(cfg.recommend.ranker)
    if not path.exists():
        raise RecommendError(
            f"recommend.ranker: {path} does not exist (a ranking config over the same data set)"
        )
    ranker = load_config(path)
    if ranker.model.objective != "ranking":
        raise RecommendError(
            f"recommend.ranker: {path} is not a ranking config (model.objective: {ranker.model.objective})"
        )
    meta = DatasetMeta.load(ranker.data.path)
    if Path(ranker.data.path).resolve() != Path(cfg.data.path).resolve():
        ours = DatasetMeta.load(cfg.data.path)
        for side in ("user", "item"):
            column = {"user": ranker.recommend.user_feature, "item": ranker.recommend.item_feature}[side]
            theirs = next(f for f in ranker.data.sparse if f.name == column).source_column
            mine = next(
                f for f in cfg.data.sparse if f.name == getattr(cfg.recommend, f"{side}_feature")
            ).source_column
            a, b = meta.vocabulary(theirs), ours.vocabulary(mine)
            if a is None or b is None or len(a) != len(b) or not (a == b).all():
                raise RecommendError(
                    f"recommend.ranker: {path} reads data set {ranker.data.path}, whose {side} ids are not this "
                    f"data set's ({cfg.data.path}): the ranker must share the retrieval model's id vocabularies"
                )
    model, checkpoint = load_unsharded_model(ranker, None, meta.table_rows(ranker.data.sparse))
    catalogue = load_catalogue(ranker, meta, id_maps=load_id_maps(ranker, checkpoint))
    return ranker, catalogue, model


def rank_candidates(
    cfg: Config, catalogue: Catalogue, user_rows: np.ndarray, fetched: TopK, k: int
) -> tuple[TopK, list[str]]:
    """The ranker's top ``k`` of each user's retrieved items (``fetched.items``: positions into
    ``catalogue.items``, -1 padding). Returns the lists (positions into ``catalogue.items``, the
    ranker's score and per-task predictions) and the ranker's task names."""
    ranker, ranked_catalogue, model = load_ranker(cfg)
    ranked_users = ranked_catalogue.users.positions(catalogue.users.ids[user_rows])
    candidates = fetched.items.numpy()
    valid = candidates >= 0
    ranked_items = np.where(
        valid, ranked_catalogue.items.positions(catalogue.items.ids[np.maximum(candidates, 0)]), -1
    )
    valid &= ranked_items >= 0
    scorer = ModelScorer(
        model,
        ranker,
        ranked_catalogue.users,
        ranked_catalogue.items,
        ranked_users,
        np.arange(len(ranked_catalogue.items.ids)),
    )
    score = score_function(ranker, scorer.task_names)
    num_users, width = candidates.shape
    scores = torch.full((num_users, width), -np.inf)
    preds = torch.full((num_users, width, len(scorer.task_names)), np.nan)
    users_per_step = max(1, PAIRS_PER_STEP // max(width, 1))
    for start in range(0, num_users, users_per_step):
        block = slice(start, min(start + users_per_step, num_users))
        rows, columns = np.nonzero(valid[block])
        if not len(rows):
            continue
        pair_preds = scorer.score_pairs(rows + start, ranked_items[block][rows, columns])
        scores[rows + start, columns] = score(pair_preds).float()
        preds[rows + start, columns] = pair_preds.float()
    top_scores, top = top_k_stable(scores, min(k, width))
    items = torch.from_numpy(candidates).gather(1, top)
    items = torch.where(torch.isinf(top_scores), -1, items)
    return TopK(
        items, top_scores, preds.gather(1, top[:, :, None].expand(-1, -1, preds.shape[2]))
    ), scorer.task_names
