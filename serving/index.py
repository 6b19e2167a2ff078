"""The item index of a retrieval model: top-K items by inner product for a batch of user vectors,
each user's excluded items (already seen) never returned.

    index = ItemIndex.build(item_vectors, kind="exact")
    result = index.search(user_vectors, k=100, excluded=codes)   # TopK: positions (U, K), scores (U, K)

``exact``: blocks of users × blocks of items through one matrix product each, a running top-K per
user (``towerrec.serving.scoring.top_k``); memory is bounded by the blocks and the (U, K) lists.
``hnsw`` / ``ivf``: FAISS approximate indexes (inner product), when the ``faiss`` package is
installed; they fetch K plus the user's excluded count (users grouped by that count) and drop the
excluded ones. IVF is the one to try first on large catalogues (fast to build, recall tunable by
``recommend.index_ivf_probe``); HNSW builds slowly at a million items; measure recall against
``exact`` on your own vectors (``python -m benchmarks.retrieval --scale``): it depends on how
clustered they are.

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
        """FAISS search fetching K plus each user's excluded count: users are grouped by that count
        (rounded up to a power of two), so one user with a long history does not slow the others."""
        num_users, num_items = queries.shape[0], self.num_items
        excluded = np.zeros(0, dtype=np.int64) if excluded is None else excluded
        per_user = np.bincount(excluded // max(num_items, 1), minlength=num_users)[:num_users]
        fetch = np.minimum(num_items, k + (1 << np.ceil(np.log2(np.maximum(per_user, 1))).astype(np.int64)))
        items = np.full((num_users, k), -1, dtype=np.int64)
        scores = np.full((num_users, k), -np.inf, dtype=np.float32)
        self._faiss_threads()
        for size in np.unique(fetch):
            users = np.flatnonzero(fetch == size)
            if self.kind == "hnsw":
                self.faiss_index.hnsw.efSearch = max(self.settings.hnsw_ef_search, int(size))
            else:
                self.faiss_index.nprobe = self.settings.ivf_probe
            found_scores, found = self.faiss_index.search(queries[users].numpy(), int(size))
            codes = users[:, None] * num_items + found
            at = np.minimum(np.searchsorted(excluded, codes), max(len(excluded) - 1, 0))
            dropped = (found < 0) | ((excluded[at] == codes) if len(excluded) else False)
            found_scores = np.where(dropped, -np.inf, found_scores)
            order = np.argsort(-found_scores, axis=1, kind="stable")[:, :k]
            top_scores = np.take_along_axis(found_scores, order, axis=1)
            top = np.where(np.isinf(top_scores), -1, np.take_along_axis(found, order, axis=1))
            items[users, : top.shape[1]], scores[users, : top.shape[1]] = top, top_scores
        return TopK(torch.from_numpy(items), torch.from_numpy(scores), torch.from_numpy(scores).unsqueeze(-1))

    @staticmethod
    def _faiss_threads() -> None:
        """FAISS and torch each bring an OpenMP runtime: FAISS gets torch's thread count."""
        import faiss

        faiss.omp_set_num_threads(torch.get_num_threads())


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
