"""Faults a training job must survive without losing anything (CPU, gloo)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.conftest import REPO, SMALL_SYNTHETIC, fit_args, run_cli
from towerrec.trainer.distributed import checkpoint as ckpt

pytestmark = pytest.mark.slow


def start_fit(args: list[str], nproc: int = 1) -> subprocess.Popen:
    if nproc > 1:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={nproc}",
            "-m",
            "towerrec.trainer.cli",
            *args,
        ]
    else:
        cmd = [sys.executable, "-m", "towerrec.trainer.cli", *args]
    return subprocess.Popen(
        cmd,
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


def wait_for(predicate, timeout: float = 120, interval: float = 0.05):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(interval)
    raise AssertionError("condition not reached in time")


def test_kill_during_checkpoint_write_keeps_the_previous_checkpoint(synthetic_data, tmp_path):
    run_dir = tmp_path / "run"
    root = run_dir / "checkpoints"
    proc = start_fit(
        fit_args(synthetic_data, run_dir, "--checkpoint.every_n_steps", "1", "--trainer.max_epochs", "3")
    )
    try:
        wait_for(lambda: (root / "latest").exists())
        wait_for(lambda: any(p.name.endswith(".partial") for p in root.iterdir()), interval=0.001)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    latest = ckpt.find_latest(root)
    assert latest is not None and ckpt.find_damage(latest) is None  # every file matches its checksum
    assert (root / (root / "latest").read_text().strip()) == latest
    run_cli(["test", "--config", "configs/default.yaml", "--data.path", str(synthetic_data), *SMALL_SYNTHETIC, "--run_dir", str(tmp_path / "eval"),
             "--checkpoint", str(run_dir), "--trainer.progress_bar", "false"])  # fmt: skip
    resumed = run_cli(
        fit_args(synthetic_data, run_dir, "--checkpoint.every_n_steps", "50", "--trainer.max_epochs", "3")
    )
    assert f"resuming from {latest}" in resumed.stdout
    assert not list(root.glob("*.partial"))


def test_crash_inside_save_leaves_latest_untouched(tmp_path, monkeypatch):
    import torch

    ckpt.save(tmp_path, 1, {"w": torch.ones(3)}, {"global_step": 1}, True, lambda: None, keep_last=3)

    def crash(*args, **kwargs):
        Path(kwargs["checkpoint_id"], "__0_0.distcp").write_bytes(b"half a shard")
        raise OSError("disk full")

    monkeypatch.setattr(ckpt.dcp, "save", crash)
    with pytest.raises(ckpt.CheckpointError, match="disk full"):
        ckpt.save(tmp_path, 2, {"w": torch.zeros(3)}, {"global_step": 2}, True, lambda: None, keep_last=3)
    assert (tmp_path / "latest").read_text().strip() == "step-00000001"
    assert ckpt.find_latest(tmp_path) == tmp_path / "step-00000001"
    loaded = {"w": torch.zeros(3)}
    ckpt.load_tensors(tmp_path / "step-00000001", loaded)
    assert loaded["w"].tolist() == [1, 1, 1]


@pytest.mark.parametrize("signum", [signal.SIGUSR1, signal.SIGTERM])
def test_preemption_signal_saves_and_exits_75_then_resumes_exactly(synthetic_data, tmp_path, signum):
    common = ("--trainer.max_epochs", "2", "--checkpoint.every_n_steps", "25")
    run_cli(fit_args(synthetic_data, tmp_path / "straight", *common))
    run_dir = tmp_path / "preempted"
    proc = start_fit(fit_args(synthetic_data, run_dir, *common))
    wait_for(lambda: (run_dir / "checkpoints" / "latest").exists())
    proc.send_signal(signum)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 75, output[-3000:]
    assert "preempted" in output and "checkpoint saved" in output
    resumed = run_cli(fit_args(synthetic_data, run_dir, *common))
    assert "resuming from" in resumed.stdout
    straight = json.loads((tmp_path / "straight" / "metrics.json").read_text())
    again = json.loads((run_dir / "metrics.json").read_text())
    assert again["metrics"] == straight["metrics"]


def test_preemption_of_one_rank_stops_both_at_the_same_step(synthetic_data, tmp_path):
    run_dir = tmp_path / "two"
    proc = start_fit(
        fit_args(synthetic_data, run_dir, "--trainer.max_epochs", "3", "--checkpoint.every_n_steps", "25"),
        nproc=2,
    )
    wait_for(lambda: (run_dir / "checkpoints" / "latest").exists())
    workers = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
    assert len(workers) == 2
    os.kill(int(workers[1]), signal.SIGUSR1)  # only one rank hears it
    output, _ = proc.communicate(timeout=120)
    assert "preempted (" in output and "checkpoint saved, exiting 75" in output, output[-3000:]
    latest = ckpt.find_latest(run_dir / "checkpoints")
    stopped_at = ckpt.load_state(latest)["global_step"]
    # a few steps more show the resume (the rest of the epochs would prove nothing more)
    resumed = run_cli(fit_args(synthetic_data, run_dir, "--trainer.max_epochs", "3",
                               "--trainer.max_steps", str(stopped_at + 6)), nproc=2)  # fmt: skip
    assert f"resuming from {latest}" in resumed.stdout
    assert json.loads((run_dir / "metrics.json").read_text())["global_step"] == stopped_at + 6


def truncated_copy(source: Path, target: Path, victim: str) -> Path:
    import shutil

    shutil.copytree(source, target)
    path = target / "train" / victim
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 3])
    return target


def test_truncated_shard_is_reported_before_training(synthetic_data, tmp_path):
    data = truncated_copy(synthetic_data, tmp_path / "data", "part-00002.parquet")
    result = run_cli(fit_args(data, tmp_path / "run"), check=False)
    assert result.returncode == 2
    assert "part-00002.parquet" in result.stderr and "error:" in result.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_truncated_shard_met_mid_training_names_the_file_and_keeps_the_checkpoint(synthetic_data, tmp_path):
    data = truncated_copy(synthetic_data, tmp_path / "data", "part-00002.parquet")
    run_dir = tmp_path / "run"
    args = fit_args(data, run_dir, "--data.validate_on_start", "false", "--checkpoint.every_n_steps", "2",
                    "--data.shuffle_window_rows", "2048", "--trainer.max_epochs", "2")  # fmt: skip
    result = run_cli(args, check=False)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "part-00002.parquet: not a readable Parquet file" in result.stderr
    latest = ckpt.find_latest(run_dir / "checkpoints")
    if latest is not None:  # whatever was saved before the bad file was reached is intact
        assert ckpt.find_damage(latest) is None


def bad_label_data(source: Path, target: Path) -> Path:
    import shutil

    shutil.copytree(source, target)
    path = target / "train" / "part-00001.parquet"
    table = pq.read_table(path)
    rating = table.column("rating").to_numpy().copy()
    rating[100] = 7.0
    pq.write_table(
        table.set_column(table.schema.get_field_index("rating"), "rating", pa.array(rating)),
        path,
        row_group_size=2048,
    )
    return target


def test_bad_label_mid_training_errors_or_is_skipped_and_counted(synthetic_data, tmp_path):
    data = bad_label_data(synthetic_data, tmp_path / "data")
    stop = run_cli(fit_args(data, tmp_path / "stop", "--data.validate_on_start", "false"), check=False)
    assert stop.returncode == 2
    assert (
        "part-00001.parquet: row group 0, row 100: label column 'rating' has value 7.0 outside [1.0, 5.0]"
        in stop.stderr
    )
    run_cli(fit_args(data, tmp_path / "skip", "--data.validate_on_start", "false", "--data.bad_rows", "skip",
                     "--trainer.max_epochs", "1"))  # fmt: skip
    assert json.loads((tmp_path / "skip" / "metrics.json").read_text())["skipped_bad_rows"] == 1


def test_non_finite_loss_stops_with_task_and_step_or_skips_up_to_the_limit(synthetic_data, tmp_path):
    # A learning rate of 1e30 blows the dense weights up after one step: every later loss is NaN.
    diverge = ("--trainer.max_epochs", "1", "--trainer.dense_optimizer.lr", "1e30")
    stop = run_cli(fit_args(synthetic_data, tmp_path / "stop", *diverge), check=False)
    assert stop.returncode == 4, stop.stderr[-2000:]
    assert "error: non-finite loss at step 1 (epoch 0, batch 1): rating=nan, ctr=nan" in stop.stderr
    skip = run_cli(
        fit_args(
            synthetic_data,
            tmp_path / "skip",
            *diverge,
            "--trainer.non_finite_loss",
            "skip",
            "--trainer.max_skipped_batches",
            "3",
        ),
        check=False,
    )
    assert skip.returncode == 4
    assert skip.stdout.count("skipping batch: non-finite loss") == 3
    assert "more than trainer.max_skipped_batches=3 skipped" in skip.stderr
    assert ckpt.find_latest(tmp_path / "skip" / "checkpoints") is None  # nothing half-trained was saved


def running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[-1][0] != "Z"
    except FileNotFoundError:
        return False


def test_a_hung_peer_ends_the_job_with_a_timeout_message(synthetic_data, tmp_path):
    args = fit_args(
        synthetic_data, tmp_path / "run", "--trainer.collective_timeout_s", "10", "--trainer.max_epochs", "20"
    )
    proc = start_fit(args, nproc=2)
    try:
        wait_for(lambda: (tmp_path / "run" / "checkpoints" / "latest").exists())
        workers = subprocess.run(
            ["pgrep", "-P", str(proc.pid)], capture_output=True, text=True
        ).stdout.split()
        survivor, hung = (int(w) for w in workers)
        os.kill(hung, signal.SIGSTOP)
        started = time.time()
        wait_for(lambda: not running(survivor), timeout=120)
        assert time.time() - started < 60  # the 10 s timeout, then the diagnosis
        # torchrun would wait out its grace period for the stopped rank before killing it: do it now
        os.kill(hung, signal.SIGKILL)
        output, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert re.search(r"exitcode\s*:\s*4\b", output), output[-3000:]  # torchrun's summary: the survivor's
    assert "trainer.collective_timeout_s=10s" in output and "peer rank is dead or hung" in output


def test_a_killed_peer_ends_the_survivor_with_exit_4_naming_the_dead_rank(synthetic_data, tmp_path):
    """Lightning's own launcher (``--trainer.devices 2``): rank 0 is this process, rank 1 its child."""
    run_dir = tmp_path / "run"
    proc = start_fit(fit_args(synthetic_data, run_dir, "--trainer.devices", "2", "--trainer.max_epochs", "30",
                              "--checkpoint.every_n_steps", "20"))  # fmt: skip
    try:
        wait_for(lambda: (run_dir / "checkpoints" / "latest").exists())
        (child,) = subprocess.run(
            ["pgrep", "-P", str(proc.pid)], capture_output=True, text=True
        ).stdout.split()
        os.kill(int(child), signal.SIGKILL)
        output, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 4, output[-3000:]
    assert f"error: rank 0: rank 1 (pid {child} on " in output and "is gone" in output, output[-3000:]
    assert "resumes from the latest checkpoint when restarted" in output
    assert "Traceback" not in output


def test_a_second_sigterm_while_exiting_keeps_exit_75(synthetic_data, tmp_path):
    run_dir = tmp_path / "run"
    proc = start_fit(
        fit_args(synthetic_data, run_dir, "--trainer.max_epochs", "30", "--checkpoint.every_n_steps", "25")
    )
    try:
        wait_for(lambda: (run_dir / "checkpoints" / "latest").exists())
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 75, output[-3000:]
    assert "checkpoint saved, exiting 75" in output


def test_a_checkpoint_folder_that_cannot_be_written_is_reported_before_training(synthetic_data, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "checkpoints").write_text("a file where the checkpoint folder should be")
    result = run_cli(fit_args(synthetic_data, run_dir), check=False)
    assert result.returncode == 2
    assert f"error: run_dir: checkpoints cannot be written to {run_dir / 'checkpoints'}" in result.stderr
    assert "sharding plan" not in result.stdout and "Traceback" not in result.stderr


def test_a_killed_rank_0_that_hosted_the_store_leaves_rank_1_one_clear_message(synthetic_data, tmp_path):
    """Lightning's own launcher: rank 0 is this process and hosts the rendezvous store; it is
    SIGKILLed and rank 1, its child, reports it in one line (no C++ stack dump from the store)."""
    run_dir = tmp_path / "run"
    proc = start_fit(fit_args(synthetic_data, run_dir, "--trainer.devices", "2", "--trainer.max_epochs", "30",
                              "--checkpoint.every_n_steps", "20"))  # fmt: skip
    try:
        wait_for(lambda: (run_dir / "checkpoints" / "latest").exists())
        (child,) = subprocess.run(
            ["pgrep", "-P", str(proc.pid)], capture_output=True, text=True
        ).stdout.split()
        proc.send_signal(signal.SIGKILL)
        output, _ = proc.communicate(timeout=120)  # the pipe closes when rank 1 has exited too
    finally:
        if proc.poll() is None:
            proc.kill()
    wait_for(lambda: not Path(f"/proc/{child}").exists(), timeout=60)
    assert "error: rank 1: rank 0, which also hosted the rendezvous store, is gone" in output, output[-3000:]
    assert "frame #" not in output and "Traceback" not in output, output[-3000:]
