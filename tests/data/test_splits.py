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


def fitted_codes(splitter, part: SplitKeys, chunk: int) -> np.ndarray:
    """Fits and assigns ``part`` in chunks of ``chunk`` rows (as the converter streams it)."""
    pieces = [
        SplitKeys(
            part.row_index[s : s + chunk],
            part.user[s : s + chunk],
            None if part.time is None else part.time[s : s + chunk],
            interaction=None if part.interaction is None else part.interaction[s : s + chunk],
        )
        for s in range(0, len(part.row_index), chunk)
    ]
    for piece in pieces:
        splitter.fit(piece)
    return np.concatenate([splitter.assign(piece) for piece in pieces])


# users 1, 2, 3, 5 with 1, 2, 3, 5 events; user 5's last two events share a time (row order decides)
# and its first events come in a later row than a later time (time decides, not the row)
LOG_USERS = np.array([5, 3, 2, 5, 1, 3, 5, 2, 3, 5, 5])
LOG_TIMES = np.array([4.0, 1.0, 1.0, 9.0, 1.0, 2.0, 1.5, 2.0, 3.0, 9.0, 0.5])
EXPECTED = {  # row → split
    0: TRAIN, 1: TRAIN, 2: TRAIN, 3: VAL, 4: TRAIN, 5: VAL, 6: TRAIN, 7: TRAIN, 8: TEST, 9: TEST, 10: TRAIN,
}  # fmt: skip


@pytest.mark.parametrize("chunk", [1, 4, 11])
def test_leave_last_out_holds_out_only_users_with_the_minimum_and_breaks_ties_by_row(chunk):
    part = SplitKeys(np.arange(len(LOG_USERS)), user=LOG_USERS, time=LOG_TIMES)
    codes = fitted_codes(make_splitter("leave_last_out", 0, 0.1, 0.1), part, chunk)
    assert codes.tolist() == [EXPECTED[row] for row in range(len(LOG_USERS))]
    # users with 1 and 2 events keep everything in train; 3 = the published minimum
    assert (codes[np.isin(LOG_USERS, [1, 2])] == TRAIN).all()
    two = make_splitter("leave_last_out", 0, 0.1, 0.1, min_events_per_user=6)
    assert (fitted_codes(two, part, chunk) == TRAIN).all() and two.num_held_out_users == 0


def test_leave_last_out_minimum_is_explicit_without_validation_and_row_order_without_time():
    part = SplitKeys(np.arange(len(LOG_USERS)), user=LOG_USERS, time=None)
    splitter = make_splitter("leave_last_out", 0, 0.0, 0.1, min_events_per_user=2)
    codes = fitted_codes(splitter, part, 3)
    # no time: the last row of each user with >= 2 rows is test, nothing is val
    assert np.flatnonzero(codes == TEST).tolist() == [7, 8, 10] and not (codes == VAL).any()
    assert splitter.num_held_out_users == 3


def test_leave_last_out_with_an_interaction_flag_holds_out_the_rows_at_the_last_interactions():
    # user 7: interactions at t=1, 2, 3 with sampled rows at the same times; a later non-interaction at t=4
    users = np.array([7, 7, 7, 7, 7, 7, 7, 7])
    times = np.array([1.0, 1.0, 2.0, 2.0, 3.0, 3.0, 3.0, 4.0])
    flags = np.array([1, 0, 0, 1, 1, 0, 0, 0], dtype=bool)  # the interaction is not always the first row
    part = SplitKeys(np.arange(8), user=users, time=times, interaction=flags)
    codes = fitted_codes(make_splitter("leave_last_out", 0, 0.1, 0.1), part, 3)
    assert codes.tolist() == [TRAIN, TRAIN, VAL, VAL, TEST, TEST, TEST, TRAIN]


def test_min_events_per_user_below_the_held_out_events_is_refused_naming_the_key():
    from towerrec.data.config import PrepareConfig

    PrepareConfig(split="leave_last_out", val_fraction=0.0, min_events_per_user=2).check()
    with pytest.raises(ValueError, match="min_events_per_user: must be at least 3"):
        PrepareConfig(split="leave_last_out", min_events_per_user=2).check()


def test_bad_options_name_the_key():
    with pytest.raises(ValueError, match="data.prepare.split: 'weekly'"):
        make_splitter("weekly", 0, 0.1, 0.1)
    with pytest.raises(ValueError, match="val_fraction \\+ test_fraction"):
        make_splitter("random", 0, 0.5, 0.5)
    with pytest.raises(ValueError, match="user_column"):
        make_splitter("user", 0, 0.1, 0.1, has_user=False)
