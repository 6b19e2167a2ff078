"""Id vocabularies: raw ids → dense rows ``1..V-1``, with row 0 for out-of-vocabulary ids."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

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


def original_ids(ids: np.ndarray, originals: np.ndarray) -> pa.Array:
    """Data set ids (vocabulary rows) → the original ids they stand for (``originals[r - 1]`` for
    row r); null for row 0 (out of vocabulary) and for ids past the end."""
    ids = np.asarray(ids)
    known = (ids >= 1) & (ids <= len(originals))
    return pa.array(np.asarray(originals)[np.where(known, ids - 1, 0)], mask=~known)


def rows_of_originals(raw: pa.Array, originals: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Original ids as a user writes them (text or numbers) → data set ids, compared as text
    (``"7"`` finds the integer id 7). An original not in the vocabulary gets a placeholder id past
    its end (an out-of-vocabulary row for the model), one per distinct original.

    Returns ``(ids, extended originals)``: the second lists the vocabulary then the placeholders'
    originals, so ``original_ids(ids, extended)`` gives back every input."""
    texts = pc.utf8_trim_whitespace(raw.cast(pa.string()))
    known_texts = pa.array(np.asarray(originals).astype(str))
    position = pc.fill_null(pc.index_in(texts, value_set=known_texts), -1).to_numpy().astype(np.int64)
    ids = position + 1
    missing = position < 0
    extended = np.asarray(originals)
    if missing.any():
        unknown, inverse = np.unique(
            np.asarray(texts.to_pylist(), dtype=object)[missing], return_inverse=True
        )
        ids[missing] = len(originals) + 1 + inverse
        try:  # integer vocabularies stay integer when the unknown ids are numbers too
            unknown = unknown.astype(extended.dtype) if extended.dtype.kind in "iu" else unknown
        except ValueError:
            extended = extended.astype(str)
        extended = np.concatenate([extended.astype(object), unknown.astype(object)])
        if np.asarray(originals).dtype.kind in "iu" and all(
            isinstance(v, (int, np.integer)) for v in extended
        ):
            extended = extended.astype(np.int64)
    return ids, extended
