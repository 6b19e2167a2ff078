"""A fit killed at any point and resumed ends with the files an uninterrupted fit writes:
``metrics.json`` (validation and test metrics, the tested checkpoint), ``logs/metrics.csv`` and
``checkpoints/best.json``, with and without early stopping.

The runs are in process (``towerrec.trainer.run.fit`` on the 3,000-row ``tiny_data``). A kill is a
copy of the run folder taken at the chosen point (what SIGKILL leaves on disk: no handler runs, no
buffer is flushed), then an abort; the copy replaces the folder before the next ``fit``. One run
is killed at every kind of point in turn, each resume going on from what the previous kill left.
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import lightning as L
import pytest

from tests.conftest import TINY_SYNTHETIC
from tests.trainer.in_process import isolated
from towerrec.trainer import callbacks, run
from towerrec.trainer.config import load_config

pytestmark = pytest.mark.slow

# 2,397 training rows in batches of 128: 19 steps an epoch; a checkpoint every 5 steps and at each
# epoch's end (19, 38, 57); one validation batch.
COMMON = ["data.batch_size=128", "trainer.log_every_n_steps=3", "checkpoint.every_n_steps=5",
          "trainer.progress_bar=off"]  # fmt: skip
KILLS = [
    ("mid-epoch, between checkpoints", "batch_end", 7),
    ("right after a step checkpoint", "saved", 15),
    ("right after an epoch-end checkpoint", "saved", 19),
    ("during validation", "validation", 1),
    ("right after the best epoch's checkpoint", "saved", 38),
    ("during test", "test", 1),
]


class Killed(BaseException):
    """Not an ``Exception``: nothing in the product may catch it."""


class KillAt(L.Callback):
    """Kills the run (see the module docstring) at the ``at``-th validation or test batch, at the
    end of training step ``at``, or right after the checkpoint of step ``at`` is written."""

    def __init__(self, run_dir: Path, point: str, at: int):
        self.run_dir, self.point, self.at = run_dir, point, at
        self.snapshot = run_dir.with_name(run_dir.name + ".at-kill")
        self.seen = 0

    def kill(self) -> None:
        shutil.copytree(self.run_dir, self.snapshot)
        raise Killed(f"{self.point} {self.at}")

    def on_train_batch_end(self, trainer, *args) -> None:
        if self.point == "batch_end" and trainer.global_step == self.at:
            self.kill()

    def on_validation_batch_end(self, trainer, *args) -> None:
        self.seen += self.point == "validation"
        if self.point == "validation" and self.seen == self.at:
            self.kill()

    def on_test_batch_end(self, trainer, *args) -> None:
        self.seen += self.point == "test"
        if self.point == "test" and self.seen == self.at:
            self.kill()


def fit(run_dir: Path, overrides: list[str], monkeypatch, kill: KillAt | None = None) -> None:
    cfg = load_config("configs/default.yaml", [*overrides, f"run_dir={run_dir}"])
    build, save = run.build, callbacks.save_step_checkpoint

    def build_with_kill(*args, **kwargs):
        built = build(*args, **kwargs)
        built[0].callbacks.append(kill)  # after every other callback
        return built

    def save_then_maybe_kill(trainer, root):
        save(trainer, root)
        if kill.point == "saved" and trainer.global_step == kill.at:
            kill.kill()

    with monkeypatch.context() as patch, isolated():
        if kill is not None:
            patch.setattr(run, "build", build_with_kill)
            patch.setattr(callbacks, "save_step_checkpoint", save_then_maybe_kill)
        try:
            assert run.fit(cfg) == 0
            assert kill is None, f"the run ended before it was killed at {kill.point} {kill.at}"
        except Killed:
            shutil.rmtree(run_dir)
            kill.snapshot.rename(run_dir)


def record(run_dir: Path) -> dict:
    """What a user reads of a finished run; the time it took left out."""
    metrics = json.loads((run_dir / "metrics.json").read_text())
    del metrics["train_seconds"]
    with open(run_dir / "logs" / "metrics.csv", newline="") as file:
        rows = [{k: v for k, v in row.items() if k != "samples_per_s"} for row in csv.DictReader(file)]
    best = run_dir / "checkpoints" / "best.json"
    return {
        "metrics.json": metrics,
        "metrics.csv": rows,
        "best.json": best.read_text() if best.exists() else None,
    }


@pytest.mark.parametrize(
    "early_stopping",
    [
        [],
        # val/loss rises after epoch 1: training stops after epoch 2 and tests epoch 1's checkpoint
        ["trainer.early_stopping_patience=1", "trainer.max_epochs=4"],
    ],
    ids=["last-epoch", "early-stopping"],
)
def test_a_run_killed_at_every_kind_of_point_ends_as_an_uninterrupted_one(
    tiny_data, tmp_path, monkeypatch, early_stopping
):
    overrides = [f"data.path={tiny_data}", *TINY_SYNTHETIC, *COMMON, "trainer.max_epochs=3", *early_stopping]
    fit(tmp_path / "straight", overrides, monkeypatch)
    expected = record(tmp_path / "straight")
    if early_stopping:
        assert expected["metrics.json"]["tested_checkpoint"]["step"] == 38
        assert expected["metrics.json"]["global_step"] == 57
    assert expected["metrics.json"]["metrics"]["val"]

    run_dir = tmp_path / "interrupted"
    for _, point, at in KILLS:
        fit(run_dir, overrides, monkeypatch, KillAt(run_dir, point, at))
    fit(run_dir, overrides, monkeypatch)
    assert record(run_dir) == expected
