"""``fit`` with dynamic ids, as a user runs it: counters per epoch in the log lines, the logs and
``metrics.json``; a table too small for a step's ids, and a resume with another capacity, stop
with exit 2 naming the key; a finished run's maps load into grown tables with every id's row."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.conftest import TINY_SYNTHETIC, run_cli
from towerrec.trainer.distributed import checkpoint as ckpt

pytestmark = pytest.mark.slow

DYNAMIC = [
    "data.sparse.0.id_mapping=dynamic", "data.sparse.0.dynamic={capacity: 150, evict_chunk: 8}",
    "data.sparse.1.id_mapping=dynamic", "data.sparse.1.dynamic={capacity: 100, policy: lfu}",
]  # fmt: skip


def overrides(data: Path, run_dir: Path, *extra: str) -> list[str]:
    return [
        f"data.path={data}", *TINY_SYNTHETIC, f"run_dir={run_dir}", "data.batch_size=64",
        "trainer.max_epochs=2", "trainer.progress_bar=false", "trainer.num_threads=1", *DYNAMIC, *extra,
    ]  # fmt: skip


def fit_args(data: Path, run_dir: Path, *extra: str) -> list[str]:
    return ["fit", "--config", "configs/default.yaml", *overrides(data, run_dir, *extra)]


@pytest.fixture(scope="module")
def finished(tiny_data, tmp_path_factory) -> tuple[Path, str]:
    run_dir = tmp_path_factory.mktemp("dynamic") / "run"
    result = run_cli(fit_args(tiny_data, run_dir), env={"OMP_NUM_THREADS": "1"})
    return run_dir, result.stdout


def test_fit_reports_each_tables_ids_per_epoch(finished):
    run_dir, stdout = finished
    lines = [line for line in stdout.splitlines() if "dynamic ids:" in line]
    assert [line.split(" dynamic ids")[0] for line in lines] == ["[towerrec] epoch 1", "[towerrec] epoch 2"]
    assert "t_user_id: " in lines[0] and "t_item_id: " in lines[0] and "evicted" in lines[0]
    result = json.loads((run_dir / "metrics.json").read_text())["dynamic_ids"]
    totals, last = result["totals"], result["last_epoch"]
    assert totals["t_user_id"]["evicted"] > 0 and totals["t_item_id"]["live"] == 100
    assert 0 < last["t_user_id"]["inserted"] < totals["t_user_id"]["inserted"]
    header = (run_dir / "logs" / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"ids/t_user_id/evicted", "ids/t_user_id/fill", "ids/t_item_id/inserted"} <= set(header)


def test_a_table_too_small_for_one_steps_ids_stops_with_exit_2_naming_the_key(tiny_data, tmp_path):
    result = run_cli(
        fit_args(tiny_data, tmp_path / "run", "data.sparse.0.dynamic={capacity: 20}"),
        check=False,
        env={"OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert (
        "error: data.sparse[0].dynamic.capacity: table 't_user_id' (features 'user_id') holds 20 ids"
        in result.stderr
    )
    assert str(tiny_data) in result.stderr


def test_a_resume_with_another_capacity_is_refused_naming_the_key(finished, tiny_data, tmp_path):
    run_dir, _ = finished
    copy = tmp_path / "copy"
    import shutil

    shutil.copytree(run_dir, copy)
    result = run_cli(
        fit_args(
            tiny_data, copy, "trainer.max_epochs=3", "data.sparse.1.dynamic={capacity: 120, policy: lfu}"
        ),
        check=False,
        env={"OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert (
        "error: data.sparse[1].dynamic.capacity: the checkpoint's id map of table 't_item_id' has capacity 100, "
        "the config 120" in result.stderr
    )


def test_a_finished_runs_maps_load_into_grown_tables_keeping_every_ids_row(finished):
    from towerrec.data.config import DynamicIdsConfig, SparseFeature
    from towerrec.models.dynamic_ids import DynamicIds
    from towerrec.trainer.dynamic_ids import load_grown, saved_maps
    from towerrec.trainer.errors import CheckpointError

    run_dir, _ = finished
    path = ckpt.resolve(run_dir)
    old = DynamicIds.of(
        [
            SparseFeature("user_id", id_mapping="dynamic", dynamic=DynamicIdsConfig(150, evict_chunk=8)),
            SparseFeature("item_id", id_mapping="dynamic", dynamic=DynamicIdsConfig(100, policy="lfu")),
        ]
    )
    old.load_state_dict(saved_maps(path))
    grown_features = [
        SparseFeature("user_id", id_mapping="dynamic", dynamic=DynamicIdsConfig(400, evict_chunk=8)),
        SparseFeature("item_id", id_mapping="dynamic", dynamic=DynamicIdsConfig(100, policy="lfu")),
    ]
    grown = DynamicIds.of(grown_features)
    load_grown(grown, path, grown_features)
    for table in ("t_user_id", "t_item_id"):
        ids, rows = old.maps[table].sorted_snapshot()
        assert ids.numel() > 0 and torch.equal(grown.maps[table].lookup(ids), rows)
    shrunk_features = [
        grown_features[0],
        SparseFeature("item_id", id_mapping="dynamic", dynamic=DynamicIdsConfig(50)),
    ]
    with pytest.raises(
        CheckpointError, match=r"data.sparse\[1\].dynamic.capacity: table 't_item_id': the saved map"
    ):
        load_grown(DynamicIds.of(shrunk_features), path, shrunk_features)


def test_a_warm_start_loads_the_finished_runs_id_maps(finished, tiny_data, tmp_path, rank_pools):
    from tests.trainer import rank_jobs
    from towerrec.trainer.dynamic_ids import saved_maps

    run_dir, _ = finished
    (warm,) = rank_pools(1).run(
        rank_jobs.fit_capturing_state,
        overrides(tiny_data, tmp_path / "warm", f"trainer.warm_start={run_dir}", "trainer.max_epochs=1"),
    )
    saved = saved_maps(ckpt.resolve_model(run_dir))
    assert warm["start"]["dynamic_ids"].keys() == saved.keys()
    for key, value in saved.items():  # (fit_capturing_state gives every tensor as float32)
        if key == "epoch":  # this run's epochs count their own ids: its epoch 0 is not the source's
            assert warm["start"]["dynamic_ids"][key].tolist() == [-1.0]
            continue
        assert (warm["start"]["dynamic_ids"][key] == value.float().numpy()).all(), key
    assert (
        warm["end"]["dynamic_ids"]["maps.t_user_id.meta"] != saved["maps.t_user_id.meta"].float().numpy()
    ).any()


@pytest.mark.parametrize(
    "extra,message",
    [
        (["data.sparse.1.dynamic={capacity: 120, policy: lfu}"],
         "data.sparse[1].dynamic.capacity: the checkpoint's id map of table 't_item_id' has capacity 100"),
        (["data.sparse.1.id_mapping=vocab", "data.sparse.1.dynamic=null"],
         "the checkpoint has dynamic id maps for tables ['t_item_id', 't_user_id'], the config for ['t_user_id']"),
    ],
)  # fmt: skip
def test_a_warm_start_onto_other_id_maps_is_refused_naming_what_differs(
    finished, tiny_data, tmp_path, extra, message
):
    run_dir, _ = finished
    result = run_cli(
        fit_args(tiny_data, tmp_path / "warm", f"trainer.warm_start={run_dir}", *extra),
        check=False,
        env={"OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert f"error: trainer.warm_start: {ckpt.resolve_model(run_dir)}: " in result.stderr
    assert message in result.stderr, result.stderr[-2000:]
