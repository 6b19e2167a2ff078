"""Export round trip: checkpoints written by 1 and 2 ranks → unsharded model.pt + torch.export
artifact whose predictions equal the trainer's own (``towerrec predict``)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from tests.conftest import run_cli
from towerrec.data.dataset import DatasetMeta
from towerrec.serving.catalogue import read_rows
from towerrec.serving.export import MODEL_FILE, SERVING_SPEC_FILE, export, load_serving, load_unsharded_model
from towerrec.trainer.config import load_config
from towerrec.trainer.distributed import checkpoint as ckpt

REPO = Path(__file__).resolve().parents[2]
TINY = [
    "data.prepare.num_rows=3000",
    "data.prepare.num_users=120",
    "data.prepare.num_items=80",
    "data.prepare.num_shards=2",
    "data.prepare.row_group_size=256",
    "data.batch_size=128",
    "trainer.max_epochs=1",
    "trainer.progress_bar=false",
    "trainer.num_threads=1",
    "checkpoint.every_n_steps=0",
]


def _cli(args: list[str], nproc: int = 1) -> None:
    run_cli(args, nproc=nproc, env={"GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1"})


def tiny_overrides(tmp: Path, run: str) -> list[str]:
    return [f"data.path={tmp / 'data'}", f"run_dir={tmp / run}", *TINY]


@pytest.fixture(scope="module")
def trained_runs(tmp_path_factory) -> dict[int, list[str]]:
    """The same tiny synthetic problem trained with 1 and with 2 ranks (gloo); the 2-rank model is
    Wide & Deep over concat_dot (heads reading (deep, wide) pairs)."""
    tmp = tmp_path_factory.mktemp("export")
    runs = {}
    for nproc in (1, 2):
        overrides = tiny_overrides(tmp, f"run{nproc}")
        if nproc == 2:
            overrides += ["model.wide=true", "model.interaction=concat_dot"]
        _cli(["fit", "--config", "configs/default.yaml", *[f"--{o}" for o in overrides]], nproc)
        runs[nproc] = overrides
    return runs


def _serving_inputs(rows, feature_names: list[str]):
    values = [torch.from_numpy(rows.sparse(name).values) for name in feature_names]
    lengths = [torch.from_numpy(np.diff(rows.sparse(name).offsets)) for name in feature_names]
    return torch.from_numpy(rows.dense), values, lengths


@pytest.mark.slow
@pytest.mark.parametrize("nproc", [1, 2])
def test_export_matches_trainer_predictions(trained_runs, nproc, tmp_path):
    overrides = trained_runs[nproc]
    cfg = load_config("configs/default.yaml", overrides)
    predictions_dir = tmp_path / "predictions"
    _cli(
        [
            "predict",
            "--config",
            "configs/default.yaml",
            "--output",
            str(predictions_dir),
            *[f"--{o}" for o in overrides],
        ]
    )
    table = pq.read_table(predictions_dir / "part-rank00000.parquet")
    order = np.argsort(table.column("row").to_numpy())
    expected = {name: table.column(name).to_numpy()[order] for name in ("rating", "ctr")}
    out = export(cfg, None, tmp_path / "export")

    if nproc == 2:
        assert ckpt.load_state(ckpt.resolve(cfg.run_dir))["world_size"] == 2  # written by two ranks
    # model.pt: tensors only, the unsharded model's keys
    weights = torch.load(out / MODEL_FILE, weights_only=True)
    model, _ = load_unsharded_model(cfg)
    assert set(weights) == set(model.state_dict())
    for key, value in model.state_dict().items():
        torch.testing.assert_close(weights[key], value, rtol=0, atol=0)

    meta = DatasetMeta.load(cfg.data.path)
    rows = read_rows(cfg, meta, cfg.data.test_split, meta.table_rows(cfg.data.sparse))
    spec = json.loads((out / SERVING_SPEC_FILE).read_text())
    feature_names = [f["name"] for f in spec["inputs"]["sparse"]]
    assert feature_names == [f.name for f in cfg.data.sparse]
    assert [c["kind"] for c in spec["outputs"]["columns"]] == ["value", "probability"]
    serving = load_serving(out)
    with torch.inference_mode():
        got = serving(*_serving_inputs(rows, feature_names))
    assert got.shape == (rows.num_rows, 2) and len(order) == rows.num_rows
    want = torch.from_numpy(np.stack([expected["rating"], expected["ctr"]], axis=1))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
