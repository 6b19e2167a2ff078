"""A full disk, in the run folder or in its checkpoints: the command ends with one line saying no
space is left and naming the path (exit 2), leaves nothing half-written, and once space is freed a
rerun completes the run exactly as an uninterrupted one.

The end-to-end cases fill a small tmpfs (they need the right to mount one: root in a container that
allows it; skipped elsewhere); the others raise ENOSPC where a write would meet it."""

from __future__ import annotations

import csv
import errno
import json
import os
import subprocess
from pathlib import Path

import pytest

from tests.conftest import TINY_SYNTHETIC
from tests.trainer.in_process import isolated
from towerrec.trainer import cli, run
from towerrec.trainer.errors import exit_code
from towerrec.trainer.run_folder import write_whole


@pytest.fixture
def small_disk():
    """``small_disk(path, kib)``: a tmpfs of that size mounted at ``path`` for the test."""
    mounted: list[Path] = []

    def mount(path: Path, kib: int) -> Path:
        path.mkdir(parents=True, exist_ok=True)
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={kib}k", "tmpfs", str(path)],
                              capture_output=True, text=True)  # fmt: skip
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip() or done.returncode})")
        mounted.append(path)
        return path

    yield mount
    for path in reversed(mounted):
        subprocess.run(["umount", "-l", str(path)], check=False)


def fit(run_dir: Path, data: Path) -> int:
    overrides = [f"data.path={data}", *TINY_SYNTHETIC, f"run_dir={run_dir}", "trainer.progress_bar=off",
                 "data.batch_size=128", "trainer.log_every_n_steps=1", "checkpoint.every_n_steps=10"]  # fmt: skip
    with isolated():
        return cli.main(["fit", "--config", "configs/default.yaml", *overrides])


def record(run_dir: Path) -> dict:
    metrics = json.loads((run_dir / "metrics.json").read_text())
    del metrics["train_seconds"]
    with open(run_dir / "logs" / "metrics.csv", newline="") as file:
        rows = [{k: v for k, v in row.items() if k != "samples_per_s"} for row in csv.DictReader(file)]
    return {"metrics.json": metrics, "metrics.csv": rows}


def fill(folder: Path, leave_kib: int) -> Path:
    free = os.statvfs(folder).f_bavail * os.statvfs(folder).f_frsize
    filler = folder / "filler"
    filler.write_bytes(b"\0" * max(free - leave_kib * 1024, 0))
    return filler


@pytest.mark.slow
@pytest.mark.parametrize("where", ["run folder", "checkpoints", "data set"])
def test_a_full_disk_is_one_line_naming_the_path_and_a_rerun_completes_the_run(
    tiny_data, tmp_path, capsys, small_disk, where
):
    run_dir, data = tmp_path / "run", tiny_data
    if where == "data set":  # prepared on first use, on a disk too small for it
        data = small_disk(tmp_path / "small", 64) / "data"
    elif where == "run folder":  # the logs, TensorBoard, records, metrics.json; checkpoints elsewhere
        small_disk(run_dir, 256)
        (tmp_path / "elsewhere").mkdir()
        (run_dir / "checkpoints").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
        filler = fill(run_dir, leave_kib=48)
    else:  # room for the first checkpoint (step 10, ~0.4 MB), not for the second (19, the epoch's end)
        small_disk(tmp_path / "small", 600)
        run_dir.mkdir()
        (run_dir / "checkpoints").symlink_to(tmp_path / "small", target_is_directory=True)
    assert fit(tmp_path / "straight", tiny_data) == 0
    capsys.readouterr()

    assert fit(run_dir, data) == 2
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    (line,) = [line for line in err.splitlines() if line.startswith("error")]
    assert err.endswith(line + "\n")
    if where == "run folder":
        assert line.startswith(f"error: no space left on the device writing {run_dir}/"), line
    elif where == "data set":  # pyarrow's write names no file
        assert line.startswith(f"error: no space left on the device holding {data} ("), line
        assert list((tmp_path / "small").iterdir()) == []  # the partial data set is removed
    else:
        partial = run_dir / "checkpoints" / "step-00000019.partial"
        assert line == f"error: {partial}: saving failed (rank 0: no space left on the device)"
        assert not partial.exists()  # what the failed save wrote is freed
        assert (run_dir / "checkpoints" / "latest").read_text() == "step-00000010\n"

    if where == "run folder":
        filler.unlink()
    else:
        subprocess.run(["mount", "-o", "remount,size=8m", str(tmp_path / "small")], check=True)
    assert fit(run_dir, data) == 0
    assert record(run_dir) == record(tmp_path / "straight")


def test_a_whole_file_write_that_meets_a_full_disk_leaves_the_previous_version(tmp_path, monkeypatch):
    path = tmp_path / "metrics.json"
    path.write_text("before")

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OSError) as err:
        write_whole(path, "after")
    assert err.value.errno == errno.ENOSPC and err.value.filename == str(path)
    assert path.read_text() == "before" and sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"]


def test_a_full_disk_under_the_error_it_led_to_is_what_the_command_reports(tmp_path, monkeypatch, capsys):
    """Met inside a library (a write that fails on close names no file), then another error raised
    while handling it: the command names the fullest folder of the run, in one line, exit 2."""

    def fails(cfg, args):
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError:
            raise ValueError("you tried to log something while the trainer was stopping") from None

    monkeypatch.setattr(run, "fit_command", fails)
    assert exit_code(ValueError("unrelated")) is None
    folders = {"run_dir": tmp_path / "run", "data.path": tmp_path / "data"}
    assert (
        cli.main(["fit", "--config", "configs/default.yaml", *(f"{k}={v}" for k, v in folders.items())]) == 2
    )
    (line,) = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error")]
    assert any(line.startswith(f"error: no space left on the device holding {f} (") for f in folders.values())
    assert line.endswith(" bytes free there)")
