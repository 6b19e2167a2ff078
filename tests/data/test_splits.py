"""Split rules: deterministic by seed, every row in exactly one split, rule-specific guarantees."""

from __future__ import annotations

import numpy as np
import pytest

from towerrec.data.splits import TEST, TRAIN, VAL, SplitKeys, make_splitter

NUM = 20_000


def keys(seed: int = 0) -> SplitKeys:
    rng = np.random.default_rng(seed)
    return SplitKeys(
        row_index=np.arange(NUM),
        user=rng.integers(0, 500, NUM),
        time=rng.integers(0, 10**6, NUM).astype(float),
    )


def run(rule: str, seed: int = 0, chunk: int = 3001, **kwargs) -> np.ndarray:
    data = keys()
    splitter = make_splitter(
        rule, seed, kwargs.get("val", 0.1), kwargs.get("test", 0.2), kwargs.get("cut_time")
    )
    chunks = [
        SplitKeys(data.row_index[s : s + chunk], data.user[s : s + chunk], data.time[s : s + chunk])
        for s in range(0, NUM, chunk)
    ]
    if splitter.needs_fit:
        for part in chunks:
            splitter.fit(part)
        splitter.finish_fit()
    return np.concatenate([splitter.assign(part) for part in chunks])


@pytest.mark.parametrize("rule", ["random", "user", "time", "leave_last_out"])
def test_deterministic_chunking_independent_and_complete(rule):
    codes = run(rule)
    assert len(codes) == NUM and set(np.unique(codes)) <= {TRAIN, VAL, TEST}  # every row exactly once
    assert np.array_equal(codes, run(rule))
    assert np.array_equal(codes, run(rule, chunk=NUM))  # independent of chunking
    if rule in ("random", "user"):
        assert not np.array_equal(codes, run(rule, seed=1))


def test_random_fractions():
    codes = run("random")
    assert np.mean(codes == TEST) == pytest.approx(0.2, abs=0.01)
    assert np.mean(codes == VAL) == pytest.approx(0.1, abs=0.01)


def test_user_split_keeps_users_together():
    codes, user = run("user"), keys().user
    for code in (TRAIN, VAL, TEST):
        others = set(user[codes != code])
        assert not set(user[codes == code]) & others


def test_time_split_cuts_globally():
    codes, time = run("time"), keys().time
    assert time[codes == TRAIN].max() < time[codes == VAL].min()
    assert time[codes == VAL].max() < time[codes == TEST].min()
    assert np.mean(codes == TEST) == pytest.approx(0.2, abs=0.01)
    fixed = run("time", cut_time=900_000.0)
    assert np.array_equal(fixed == TEST, time >= 900_000)


def test_leave_last_out_per_user():
    codes, data = run("leave_last_out"), keys()
    for u in range(0, 500, 37):
        rows = np.flatnonzero(data.user == u)
        order = rows[np.lexsort((rows, data.time[rows]))]
        assert codes[order[-1]] == TEST and codes[order[-2]] == VAL
        assert (codes[order[:-2]] == TRAIN).all()


def test_leave_last_out_needs_enough_rows():
    splitter = make_splitter("leave_last_out", 0, 0.1, 0.1)
    part = SplitKeys(np.arange(4), user=np.array([1, 2, 2, 3]), time=np.array([5.0, 1.0, 2.0, 0.0]))
    splitter.fit(part)
    assert splitter.assign(part).tolist() == [TRAIN, TRAIN, TEST, TRAIN]


def test_bad_options_name_the_key():
    with pytest.raises(ValueError, match="data.prepare.split: 'weekly'"):
        make_splitter("weekly", 0, 0.1, 0.1)
    with pytest.raises(ValueError, match="val_fraction \\+ test_fraction"):
        make_splitter("random", 0, 0.5, 0.5)
    with pytest.raises(ValueError, match="user_column"):
        make_splitter("user", 0, 0.1, 0.1, has_user=False)
