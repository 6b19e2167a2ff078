"""The item index of a retrieval model: top-K items by inner product for a batch of user vectors,
each user's excluded items (already seen) never returned.

    index = ItemIndex.build(item_vectors, kind="exact")
    result = index.search(user_vectors, k=100, excluded=codes)   # TopK: positions (U, K), scores (U, K)

``exact``: blocks of users × blocks of items through one matrix product each, a running top-K per
user (``towerrec.serving.scoring.top_k``); memory is bounded by the blocks and the (U, K) lists.
``hnsw`` / ``ivf``: FAISS approximate indexes (inner product), when the ``faiss`` package is
installed; they fetch K plus the user's excluded count and drop the excluded ones, so K real
items come back whenever the catalogue has them.

``excluded``: sorted codes ``user * N + item`` (``towerrec.serving.catalogue.seen_codes``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from towerrec.serving.scoring import TopK, top_k
from towerrec.trainer.errors import RecommendError

KINDS = ("exact", "hnsw", "ivf")


class _Dot:
    """``top_k``'s scorer interface over vectors: (users block × items block) inner products."""

    task_names = ["score"]

    def __init__(self, queries: torch.Tensor, items: torch.Tensor):
        self.queries, self.items = queries, items

    def item_block(self, start: int, end: int) -> dict:
        return {"items": self.items[start:end]}

    def __call__(self, user_start: int, user_end: int, block: dict) -> torch.Tensor:
        return (self.queries[user_start:user_end] @ block["items"].T).unsqueeze(-1)


@dataclass
class IndexSettings:
    """Parameters of the approximate indexes (``recommend.index_*``)."""

    hnsw_m: int = 32
    hnsw_ef_construction: int = 200
    hnsw_ef_search: int = 128
    ivf_lists: int | None = None
    ivf_probe: int = 32
    block_rows: int = 65536


class ItemIndex:
    """Item vectors (N, d) float32 and, for ``hnsw``/``ivf``, the FAISS index built over them."""

    def __init__(self, vectors: torch.Tensor, kind: str = "exact", settings: IndexSettings | None = None):
        if kind not in KINDS:
            raise RecommendError(f"recommend.index: {kind!r} is not one of {', '.join(KINDS)}")
        self.vectors = vectors.detach().float().contiguous()
        self.kind = kind
        self.settings = settings or IndexSettings()
        self.faiss_index = (
            None if kind == "exact" else _faiss_index(self.vectors.numpy(), kind, self.settings)
        )

    @property
    def num_items(self) -> int:
        return self.vectors.shape[0]

    def search(self, queries: torch.Tensor, k: int, excluded: np.ndarray | None = None) -> TopK:
        """Top ``k`` items of each query (U, d): positions (U, k) into the vectors (-1 where fewer
        exist), their scores (U, k), best first."""
        queries = queries.detach().float().contiguous()
        if self.faiss_index is None:
            return top_k(
                _Dot(queries, self.vectors),
                lambda p: p[..., 0],
                queries.shape[0],
                self.num_items,
                k,
                excluded,
                self.settings.block_rows,
                max_pairs=1 << 24,
            )
        return self._approximate(queries, k, excluded)

    def _approximate(self, queries: torch.Tensor, k: int, excluded: np.ndarray | None) -> TopK:
        num_items = self.num_items
        excluded = np.zeros(0, dtype=np.int64) if excluded is None else excluded
        per_user = np.bincount(excluded // max(num_items, 1), minlength=queries.shape[0])
        fetch = int(min(num_items, k + (per_user.max() if len(per_user) else 0)))
        if self.kind == "hnsw":
            self.faiss_index.hnsw.efSearch = max(self.settings.hnsw_ef_search, fetch)
        else:
            self.faiss_index.nprobe = self.settings.ivf_probe
        scores, found = self.faiss_index.search(queries.numpy(), fetch)
        codes = np.arange(queries.shape[0], dtype=np.int64)[:, None] * num_items + found
        dropped = (found < 0) | np.isin(codes, excluded)
        scores = np.where(dropped, -np.inf, scores)
        order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        top_scores = np.take_along_axis(scores, order, axis=1)
        top = np.where(np.isinf(top_scores), -1, np.take_along_axis(found, order, axis=1))
        pad = k - top.shape[1]
        if pad > 0:
            top = np.pad(top, ((0, 0), (0, pad)), constant_values=-1)
            top_scores = np.pad(top_scores, ((0, 0), (0, pad)), constant_values=-np.inf)
        return TopK(
            torch.from_numpy(top.astype(np.int64)),
            torch.from_numpy(top_scores.astype(np.float32)),
            torch.from_numpy(top_scores.astype(np.float32)).unsqueeze(-1),
        )


def faiss_available() -> bool:
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


def _faiss_index(vectors: np.ndarray, kind: str, settings: IndexSettings):
    try:
        import faiss
    except ImportError as err:
        raise RecommendError(
            f"recommend.index: {kind} needs the faiss package (pip install faiss-cpu); 'exact' needs nothing"
        ) from err
    num_items, dim = vectors.shape
    if kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, settings.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = settings.hnsw_ef_construction
    else:
        lists = settings.ivf_lists or max(1, min(int(4 * np.sqrt(num_items)), num_items // 39))
        quantizer = faiss.IndexFlatIP(dim)
        index = faiss.IndexIVFFlat(quantizer, dim, lists, faiss.METRIC_INNER_PRODUCT)
        sample = vectors[np.random.default_rng(0).permutation(num_items)[: max(lists * 39, 10_000)]]
        index.train(np.ascontiguousarray(sample))
    index.add(np.ascontiguousarray(vectors))
    return index
