"""Preparing the data set on first use under several ranks: rank 0 prepares (or rebuilds) it,
the other ranks wait for the data set of their config (never opening one about to be replaced),
print how long they have waited, and give up after ``data.prepare_timeout_s``."""

from __future__ import annotations

import contextlib
import io
import time
from pathlib import Path

import pytest

from towerrec.data.dataset import DatasetMeta
from towerrec.trainer.config import load_config
from towerrec.trainer.dataset_setup import ensure_dataset
from towerrec.trainer.errors import ConfigError

RECIPE = ["data.prepare.num_rows=600", "data.prepare.num_users=60", "data.prepare.num_items=40",
          "data.prepare.row_group_size=128", "data.prepare.num_shards=1"]  # fmt: skip
OTHER_RECIPE = [*RECIPE, "data.prepare.num_rows=700"]


def config(path: Path, recipe: list[str], *extra: str):
    return load_config("configs/default.yaml", [f"data.path={path}", *recipe, *extra])


def ensure_dataset_on_each_rank(
    path: str, recipe: list[str], extra: list[str], rank_0_delay_s: float
) -> dict:
    """A rank of a ``RankPool``: ``ensure_dataset`` (rank 0 after ``rank_0_delay_s``, so that rank 1
    is there first), recording the fingerprint of every data set this rank opened and what it printed."""
    import torch.distributed as dist

    opened: list[str | None] = []
    load = DatasetMeta.__dict__["load"]

    def recording_load(cls, where):
        meta = load.__func__(cls, where)
        opened.append(meta.fingerprint)
        return meta

    printed = io.StringIO()
    DatasetMeta.load = classmethod(recording_load)
    try:
        if dist.get_rank() == 0:
            time.sleep(rank_0_delay_s)
        with contextlib.redirect_stdout(printed):
            meta = ensure_dataset(config(Path(path), recipe, *extra))
    finally:
        DatasetMeta.load = load
    return {"fingerprint": meta.fingerprint, "opened": opened, "printed": printed.getvalue()}


@pytest.mark.slow
def test_other_ranks_wait_for_rank_0_to_prepare_the_data_set(rank_pools, tmp_path):
    path = tmp_path / "data"
    rank_0, rank_1 = rank_pools(2).run(ensure_dataset_on_each_rank, str(path), RECIPE, [], 3.0)
    assert "preparing data set" in rank_0["printed"]
    assert rank_1["fingerprint"] == rank_0["fingerprint"] is not None
    assert rank_1["opened"] == [rank_0["fingerprint"]]
    assert "ranks 1+ waiting for rank 0 to prepare" in rank_1["printed"]
    assert "data.prepare_timeout_s" in rank_1["printed"]


@pytest.mark.slow
def test_a_rebuild_is_never_read_half_deleted_or_old_by_another_rank(rank_pools, tmp_path):
    path = tmp_path / "data"
    old = ensure_dataset(config(path, RECIPE)).fingerprint
    rank_0, rank_1 = rank_pools(2).run(
        ensure_dataset_on_each_rank, str(path), OTHER_RECIPE, ["data.rebuild=true"], 3.0
    )
    new = rank_0["fingerprint"]
    assert new not in (old, None)
    # rank 1 arrived while the old data set was complete, and waited for the new one instead of using it
    assert rank_1["fingerprint"] == new and rank_1["opened"] == [new]
    assert "rebuilding it (data.rebuild)" in rank_0["printed"]
    assert "ranks 1+ waiting" in rank_1["printed"]
    meta = DatasetMeta.load(path)
    assert meta.fingerprint == new and sum(meta.num_rows(split) for split in meta.splits) == 700
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]  # the old one renamed aside, then removed


def test_a_rank_waiting_for_rank_0_gives_up_after_the_timeout(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("RANK", "1")
    started = time.monotonic()
    with pytest.raises(
        ConfigError, match=r"data.prepare_timeout_s: rank 1 waited .* for rank 0 to prepare .*data"
    ):
        ensure_dataset(config(tmp_path / "data", RECIPE, "data.prepare_timeout_s=0.5"))
    assert time.monotonic() - started < 30
    assert "ranks 1+ waiting for rank 0" in capsys.readouterr().out


def test_another_ranks_data_set_of_another_recipe_stops_it_at_once_without_rebuild(tmp_path, monkeypatch):
    path = tmp_path / "data"
    ensure_dataset(config(path, RECIPE))
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(ConfigError, match=r"prepared differently .*num_rows.*data.rebuild"):
        ensure_dataset(config(path, OTHER_RECIPE))
    # with data.rebuild rank 0 will replace it: rank 1 waits (here, until its timeout)
    with pytest.raises(ConfigError, match="a data set of another recipe is still there"):
        ensure_dataset(config(path, OTHER_RECIPE, "data.rebuild=true", "data.prepare_timeout_s=0.3"))


def test_prepare_timeout_must_be_positive():
    with pytest.raises(ConfigError, match=r"data.prepare_timeout_s: must be > 0"):
        load_config("configs/default.yaml", ["data.prepare_timeout_s=0"])
