"""``trainer.warm_start``: a new run starts from every tensor of a finished run's checkpoint (tables,
dense weights, optimizer state) on the next days, never writes the source run, and refuses (exit 2,
naming what differs) a source with other features, tasks or table shapes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.conftest import run_cli
from tests.trainer import rank_jobs
from towerrec.data.prepare import append_day, prepare
from towerrec.data.samples import drifting_days, write_days
from towerrec.trainer.config import ConfigError, load_config
from towerrec.trainer.dataset_setup import input_schema
from towerrec.trainer.warm_start import check_compatible, checkpoint_shapes, source_checkpoint

pytestmark = pytest.mark.slow

CONFIG = "configs/rolling_days.yaml"


@pytest.fixture(scope="module")
def two_days(tmp_path_factory) -> Path:
    """The drifting log's days 0 and 1 as one data set (day 1 appended)."""
    root = tmp_path_factory.mktemp("days")
    write_days(drifting_days(num_days=2, rows_per_day=3000, seed=4), root / "log")
    cfg = load_config(CONFIG, recipe(root))
    prepare(cfg.data.prepare, cfg.data.path, input_schema(cfg))
    append_day(cfg.data.prepare, cfg.data.path, str(root / "log" / "day-01.parquet"), input_schema(cfg))
    return root


def recipe(root: Path) -> list[str]:
    return [f"data.path={root / 'data'}", f"data.prepare.source={root / 'log' / 'day-00.parquet'}",
            "data.prepare.row_group_size=512", "data.batch_size=256"]  # fmt: skip


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def assert_same_tree(actual, expected, where: str = "") -> None:
    if isinstance(expected, dict):
        assert actual.keys() == expected.keys(), where
        for key in expected:
            assert_same_tree(actual[key], expected[key], f"{where}/{key}")
    elif isinstance(expected, list):
        assert len(actual) == len(expected), where
        for (offsets_a, a), (offsets_b, b) in zip(actual, expected):
            assert offsets_a == offsets_b, where
            np.testing.assert_array_equal(a, b, err_msg=where)
    else:
        np.testing.assert_array_equal(actual, expected, err_msg=where)


def test_warm_start_loads_every_tensor_of_the_source_and_writes_only_its_own_run(
    rank_pools, two_days, tmp_path
):
    source = tmp_path / "day0"
    (first,) = rank_pools(1).run(
        rank_jobs.fit_capturing_state,
        [*recipe(two_days), f"run_dir={source}", "data.train_days=[0,0]"],
        config=CONFIG,
    )
    before = snapshot(source)
    (warm,) = rank_pools(1).run(
        rank_jobs.fit_capturing_state,
        [*recipe(two_days), f"run_dir={tmp_path / 'day1'}", "data.train_days=[1,1]", f"trainer.warm_start={source}",
         "trainer.max_steps=3"],
        config=CONFIG,
    )  # fmt: skip
    # tables, dense weights and both optimizers' state: what the source ended with
    assert set(warm["start"]) == {"model", "embedding_optimizer", "dense_optimizer_0"}
    assert_same_tree(warm["start"], first["end"])
    assert warm["global_step"] == 3  # a new run: its own step count
    assert snapshot(source) == before, "the source run was written"
    fresh = rank_pools(1).run(
        rank_jobs.fit_capturing_state,
        [*recipe(two_days), f"run_dir={tmp_path / 'fresh'}", "data.train_days=[1,1]", "trainer.max_steps=1"],
        config=CONFIG,
    )[0]
    with pytest.raises(AssertionError):  # (the comparison can fail: a fresh start differs)
        assert_same_tree(fresh["start"]["model"], first["end"]["model"])


def test_warm_start_refuses_other_features_tasks_shapes_and_its_own_folder(rank_pools, two_days, tmp_path):
    source = tmp_path / "day0"
    rank_pools(1).run(
        rank_jobs.fit, [*recipe(two_days), f"run_dir={source}", "trainer.max_steps=2"], config=CONFIG
    )
    base = [*recipe(two_days), f"run_dir={tmp_path / 'next'}", f"trainer.warm_start={source}"]
    cfg = load_config(CONFIG, base)
    path = source_checkpoint(cfg)
    shapes = checkpoint_shapes(path)
    assert shapes["embeddings.embedding_bags.t_item.weight"][1] == 16
    check_compatible(cfg, path, shapes)  # the same model: nothing to refuse

    other = load_config(CONFIG, [*base, "data.sparse.2.embedding_dim=4"])
    with pytest.raises(ConfigError, match=r"data\.sparse differ: category: \('category', 't_category', 8"):
        check_compatible(other, path, shapes)
    other = load_config(CONFIG, [*base, "tasks=[{name: click, type: binary, label: click}]"])
    with pytest.raises(ConfigError, match=r"tasks differ: ctr there, click here"):
        check_compatible(other, path, shapes)
    grown = dict(shapes, **{"embeddings.embedding_bags.t_item.weight": (5000, 16)})
    with pytest.raises(
        ConfigError, match=r"t_item\.weight is .* there, 5000 x 16 here: a warm start never grows"
    ):
        check_compatible(cfg, path, grown)
    with pytest.raises(ConfigError, match=r"this run's own folder"):
        source_checkpoint(
            load_config(CONFIG, [*recipe(two_days), f"run_dir={source}", f"trainer.warm_start={source}"])
        )

    # through the command: exit 2 before training, the source untouched
    before = snapshot(source)
    args = ["fit", "--config", CONFIG, *(f"--{o.replace('=', ' ', 1)}" for o in base)]
    result = run_cli([*" ".join(args).split(), "--data.prepare.sparse_mapping", "hash"], check=False)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "data.prepare" in result.stderr  # another recipe: the data set is refused first
    result = run_cli([*" ".join(args).split(), "--data.sparse.0.embedding_dim", "8"], check=False)
    assert (
        result.returncode == 2
        and "trainer.warm_start:" in result.stderr
        and "data.sparse differ" in result.stderr
    )
    assert snapshot(source) == before and not (tmp_path / "next" / "checkpoints").exists()


def test_tables_from_another_models_run_start_the_named_tables_and_nothing_else(
    rank_pools, two_days, tmp_path
):
    """Two runs, two models, one table shared: the second model (another tower) starts t_item from
    the first run's end and every other tensor from its own initialisation."""
    from towerrec.trainer.warm_start import shared_tables

    source = tmp_path / "first"
    (first,) = rank_pools(1).run(
        rank_jobs.fit_capturing_state,
        [*recipe(two_days), f"run_dir={source}", "trainer.max_steps=4"],
        config=CONFIG,
    )

    def second(run: str, *extra: str) -> list[str]:
        return [
            *recipe(two_days),
            f"run_dir={tmp_path / run}",
            "model.tower=mmoe",
            "trainer.max_steps=2",
            *extra,
        ]

    (plain,) = rank_pools(1).run(rank_jobs.fit_capturing_state, second("second"), config=CONFIG)
    (shared,) = rank_pools(1).run(
        rank_jobs.fit_capturing_state,
        second("third", f"trainer.tables_from={source}", "trainer.tables_from_names=[t_item]"),
        config=CONFIG,
    )
    start, ended = shared["start"]["model"], first["end"]["model"]
    item = [key for key in start if key.endswith(".t_item.weight")]
    assert item, sorted(start)
    for key in start:
        assert_same_tree(start[key], ended[key] if key in item else plain["start"]["model"][key], key)
    cfg = load_config(
        CONFIG, second("x", f"trainer.tables_from={source}", "trainer.tables_from_names=[nope]")
    )
    with pytest.raises(ConfigError, match="trainer.tables_from_names: 'nope' is not a table of this model"):
        shared_tables(cfg, {"embeddings.embedding_bags.t_item.weight": (1, 1)})
