"""Id vocabularies: raw ids → dense rows ``1..V-1``, with row 0 for out-of-vocabulary ids."""

from __future__ import annotations

import numpy as np

OOV_ROW = 0


class Vocabulary:
    """A sorted table of known raw ids; ``lookup`` is vectorized (``np.searchsorted``).

    Ids seen fewer than ``min_count`` times in the fitting data, and ids never seen, map to row 0.

    Example::

        vocab = Vocabulary.fit(np.array([7, 7, 3]), min_count=1)   # rows: 3 -> 1, 7 -> 2
        vocab.lookup(np.array([7, 5]))                             # -> [2, 0]
    """

    def __init__(self, keys: np.ndarray, originals: np.ndarray | None = None):
        self.keys = np.asarray(keys)
        assert np.all(self.keys[1:] > self.keys[:-1]), "vocabulary keys must be sorted and unique"
        self.originals = self.keys if originals is None else np.asarray(originals)
        """The id each row stands for as the input wrote it (the text of a string id, whose key
        is its 64-bit hash); row r holds ``originals[r - 1]``."""

    @classmethod
    def fit(cls, values: np.ndarray, min_count: int = 1) -> Vocabulary:
        keys, counts = np.unique(np.asarray(values), return_counts=True)
        return cls(keys[counts >= min_count])

    @property
    def num_embeddings(self) -> int:
        """Table rows needed: every known id plus the out-of-vocabulary row."""
        return len(self.keys) + 1

    def lookup(self, values: np.ndarray) -> np.ndarray:
        values = np.asarray(values)
        if len(self.keys) == 0:
            return np.zeros(values.shape, dtype=np.int64)
        pos = np.searchsorted(self.keys, values)
        pos_clipped = np.minimum(pos, len(self.keys) - 1)
        found = self.keys[pos_clipped] == values
        return np.where(found, pos_clipped + 1, OOV_ROW).astype(np.int64)
