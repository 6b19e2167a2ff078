"""Ids at or above a configured ``num_embeddings`` (read as row 0): counted per feature, summed
over ranks (the same whatever the world size), printed and recorded in ``metrics.json``
(``out_of_range_ids``), and refused above ``data.max_out_of_range_fraction`` (exit 2, naming the
feature and the count) before training, or at the end of an epoch when nothing validated first."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from tests.conftest import TINY_SYNTHETIC, run_cli
from tests.trainer import rank_jobs
from towerrec.data.errors import DataError

# tiny_data's user ids are 1..300 and genre ids 0..17 (metadata.json: 301 and 19 rows): smaller tables
SMALL_TABLES = ["data.sparse.0.num_embeddings=250", "data.sparse.6.num_embeddings=15"]


def overrides(data, run_dir, *extra: str) -> list[str]:
    return [
        f"data.path={data}", *TINY_SYNTHETIC, *SMALL_TABLES, f"run_dir={run_dir}", "data.val_split=null",
        "data.test_split=null", "data.batch_size=128", "trainer.max_epochs=1", "checkpoint.every_n_steps=0",
        *extra,
    ]  # fmt: skip


def out_of_range_in_train(data) -> dict[str, tuple[int, int]]:
    """(ids at or above the small tables' sizes, ids) per feature, counted on the stored training split."""
    table = pq.read_table(data / "train", columns=["user_id", "genres"])
    users = table.column("user_id").to_numpy()
    genres = table.column("genres").combine_chunks().flatten().to_numpy()
    return {
        "genres": (int((genres >= 15).sum()), len(genres)),
        "user_id": (int((users >= 250).sum()), len(users)),
    }


def fit_reporting_out_of_range(overrides: list[str]) -> dict:
    """A rank of a ``RankPool``: one training epoch; the epoch's out-of-range ids (``OutOfRangeReport``)
    and what this rank printed."""
    import contextlib
    import io

    from towerrec.trainer.build import build
    from towerrec.trainer.callbacks import OutOfRangeReport

    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        trainer, module, datamodule, _ = build(rank_jobs.load(overrides))
        trainer.fit(module, datamodule=datamodule)
    report = next(c for c in trainer.callbacks if isinstance(c, OutOfRangeReport))
    return {"last_epoch": report.last_epoch, "printed": printed.getvalue()}


@pytest.mark.slow
def test_an_epochs_out_of_range_ids_are_summed_over_ranks(rank_pools, tiny_data, tmp_path):
    expected = out_of_range_in_train(tiny_data)
    assert all(0 < found < total for found, total in expected.values())
    run = overrides(
        tiny_data, tmp_path / "two", "data.validate_on_start=false", "data.max_out_of_range_fraction=0.5"
    )
    rank_0, rank_1 = rank_pools(2).run(fit_reporting_out_of_range, run)
    counts = {name: found for name, (found, _) in expected.items()}
    assert rank_0["last_epoch"] == rank_1["last_epoch"] == counts  # each rank read half: summed
    found, total = expected["user_id"]
    line = "epoch 1: ids read as row 0 (at or above num_embeddings): genres: "
    assert line in rank_0["printed"] and f"user_id: {found:,} of {total:,} ids" in rank_0["printed"]
    assert line not in rank_1["printed"]  # rank 0 prints it once


@pytest.mark.slow
def test_fit_reports_out_of_range_ids_in_the_log_and_metrics_json(tiny_data, tmp_path):
    run_dir = tmp_path / "one"
    args = [f"--{o}" for o in overrides(tiny_data, run_dir, "data.max_out_of_range_fraction=0.5")]
    result = run_cli(["fit", "--config", "configs/default.yaml", *args, "--trainer.progress_bar", "false"])
    expected = out_of_range_in_train(tiny_data)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["out_of_range_ids"] == {name: found for name, (found, _) in expected.items()}
    found, total = expected["genres"]
    # counted before training (validate_on_start) and by the epoch: the same numbers
    assert (
        f"split 'train': ids read as row 0 (at or above num_embeddings): genres: {found:,} of {total:,}"
        in result.stdout
    )
    assert (
        f"epoch 1: ids read as row 0 (at or above num_embeddings): genres: {found:,} of {total:,}"
        in result.stdout
    )


def test_too_many_out_of_range_ids_stop_before_training_naming_feature_and_count(tiny_data, tmp_path):
    from towerrec.trainer.build import prepared_data

    found, total = out_of_range_in_train(tiny_data)["genres"]
    message = rf"split 'train': {found:,} of the {total:,} ids of feature 'genres' .* data.max_out_of_range_fraction \(0.01\)"
    with pytest.raises(DataError, match=message):
        prepared_data(rank_jobs.load(overrides(tiny_data, tmp_path / "run")))
    # allowed: the same data set and tables go through
    datamodule, table_rows = prepared_data(
        rank_jobs.load(overrides(tiny_data, tmp_path / "run", "data.max_out_of_range_fraction=1.0"))
    )
    assert table_rows["user_id"] == 250 and table_rows["genres"] == 15


@pytest.mark.slow
def test_too_many_out_of_range_ids_exit_2_from_the_command_line(tiny_data, tmp_path):
    args = [f"--{o}" for o in overrides(tiny_data, tmp_path / "run")]
    refused = run_cli(["fit", "--config", "configs/default.yaml", *args], check=False)
    found, total = out_of_range_in_train(tiny_data)["genres"]
    assert refused.returncode == 2, refused.stderr
    assert f"{found:,} of the {total:,} ids of feature 'genres'" in refused.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.slow
def test_without_validation_the_first_epoch_stops_on_every_rank(rank_pools, tiny_data, tmp_path):
    from tests.multirank import RankFailure

    run = overrides(
        tiny_data, tmp_path / "two", "data.validate_on_start=false", "data.max_out_of_range_fraction=0.1"
    )
    with pytest.raises(RankFailure) as failure:
        rank_pools(2).run(fit_reporting_out_of_range, run)
    found, total = out_of_range_in_train(tiny_data)["genres"]
    text = str(failure.value)
    message = f"split 'train', epoch 1: {found:,} of the {total:,} ids of feature 'genres'"
    assert text.count(message) == 2, text  # both ranks, alike
    assert np.isclose(found / total, 0.197, atol=0.02)  # above 0.1 (user_id's 8% is not)
