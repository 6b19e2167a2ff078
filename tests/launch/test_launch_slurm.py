"""launch/slurm: one-node SLURM cluster, towerrec.sbatch with the real trainer (2 tasks; preemption
-> checkpoint -> requeue -> exact resume), and the batch script's own logic (SIGTERM, the real
time-limit signal, user scancel, missing config) with a small stand-in for the trainer
(TOWERREC_CMD) that honours the same contract.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.launch.conftest import (
    CLUSTER_SH,
    CONFIG,
    REPO,
    assert_same_metrics,
    fit_args,
    load_metrics,
    record_two_rank_result,
    tail,
)

SBATCH_SCRIPT = REPO / "launch" / "slurm" / "towerrec.sbatch"
# as in test_launch_torchrun: 2 tasks x batch 64 = 252 steps, a periodic checkpoint every 50
TWO_RANK_ARGS = ("--data.batch_size", "64", "--checkpoint.every_n_steps", "50")
TOTAL_STEPS = 252

pytestmark = pytest.mark.slurm

# Stand-in for the trainer's preemption contract: on SIGUSR1/SIGTERM write a checkpoint and exit
# 75; when started with a checkpoint present, "resume" (all_reduce to prove the new rendezvous
# works) and finish with 0.
PREEMPTIBLE = r"""
import datetime, json, os, signal, sys, time
out = sys.argv[1]
rank = int(os.environ["RANK"])
ckpt = os.path.join(out, "checkpoints", "latest")
restart = int(os.environ.get("TOWERREC_RESTART_COUNT", "0"))

if os.path.exists(ckpt):
    import torch, torch.distributed as dist
    dist.init_process_group("gloo", init_method="env://", timeout=datetime.timedelta(seconds=30))
    t = torch.tensor([1.0]); dist.all_reduce(t)
    with open(ckpt) as f:
        state = json.load(f)
    with open(os.path.join(out, f"resumed.{rank}.json"), "w") as f:
        json.dump({"restart": restart, "state": state, "sum": t.item()}, f)
    dist.destroy_process_group()
    sys.exit(0)

def on_signal(signum, frame):
    if rank == 0:
        os.makedirs(os.path.dirname(ckpt), exist_ok=True)
        with open(ckpt + ".tmp", "w") as f:
            json.dump({"step": 42, "signal": signal.Signals(signum).name}, f)
        os.replace(ckpt + ".tmp", ckpt)
    print(f"rank {rank}: got {signal.Signals(signum).name}, checkpoint saved, exit 75", flush=True)
    os._exit(75)

signal.signal(signal.SIGUSR1, on_signal)
signal.signal(signal.SIGTERM, on_signal)
open(os.path.join(out, f"started.{rank}"), "w").close()
deadline = time.time() + 120
while time.time() < deadline:
    time.sleep(0.1)
sys.exit(3)   # never preempted: fail
"""


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def _submit_fit(cluster, out_dir: Path, run_dir: Path, data: Path) -> str:
    """The real trainer, as in launch/README.md: submitted from the repository root."""
    trainer_args = fit_args(data, run_dir, *TWO_RANK_ARGS)
    assert trainer_args[:3] == ["fit", "--config", CONFIG]
    env = cluster.env(
        TOWERREC_CONFIG=CONFIG,
        TOWERREC_ARGS=shlex.join(trainer_args[3:]),
        TOWERREC_MASTER_ADDR="127.0.0.1",  # loopback only
    )
    r = subprocess.run(
        ["sbatch", "--parsable", "-n", "2", "-o", str(out_dir / "slurm-%j.out"), str(SBATCH_SCRIPT)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert r.returncode == 0, r.stderr
    return r.stdout.strip().split(";")[0]


def _submit(cluster, tmp_path: Path, cmd: str, *sbatch_args: str) -> str:
    """A stand-in command (TOWERREC_CMD) instead of the trainer."""
    env = cluster.env(TOWERREC_CMD=cmd, TOWERREC_MASTER_ADDR="127.0.0.1")
    r = subprocess.run(
        [
            "sbatch",
            "--parsable",
            "-D",
            str(tmp_path),
            "-o",
            str(tmp_path / "slurm-%j.out"),
            "--job-name",
            "towerrec-test",
            *sbatch_args,
            str(SBATCH_SCRIPT),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert r.returncode == 0, r.stderr
    return r.stdout.strip().split(";")[0]


def _log(tmp_path: Path, job_id: str) -> str:
    p = tmp_path / f"slurm-{job_id}.out"
    return p.read_text() if p.exists() else "<no output file>"


def _wait_files(paths: list[Path], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all(p.exists() for p in paths):
            return True
        time.sleep(0.2)
    return False


def test_cluster_start_is_idempotent(slurm_cluster):
    env = dict(slurm_cluster.env(), TOWERREC_SLURM_DIR=str(slurm_cluster.state_dir))
    t0 = time.monotonic()
    r = subprocess.run([str(CLUSTER_SH), "start"], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "already running" in r.stderr
    assert r.stdout.strip() == f"export SLURM_CONF={slurm_cluster.conf}"
    assert time.monotonic() - t0 < 10
    st = subprocess.run([str(CLUSTER_SH), "status"], env=env, capture_output=True, text=True, timeout=30)
    assert st.returncode == 0 and "debug*" in st.stdout


@pytest.fixture(scope="module")
def slurm_reference(slurm_cluster, launch_dataset: Path, tmp_path_factory) -> tuple[str, dict, Path, str]:
    """`sbatch -n 2` of the real trainer, uninterrupted: (job id, final job info, run dir, log)."""
    out_dir = tmp_path_factory.mktemp("slurm-2")
    run_dir = out_dir / "run"
    job = _submit_fit(slurm_cluster, out_dir, run_dir, launch_dataset)
    try:
        info = slurm_cluster.wait_job(job, timeout=120)
    finally:
        slurm_cluster.cancel(job)
    return job, info, run_dir, _log(out_dir, job)


@pytest.mark.slow
def test_sbatch_two_tasks_real_trainer(slurm_reference):
    job, info, run_dir, log = slurm_reference
    assert info["JobState"] == "COMPLETED", tail(log)
    assert info["ExitCode"] == "0:0" and info["Restarts"] == "0", tail(log)
    assert f"job {job} restart 0 nodes=" in log and "ntasks=2 master=127.0.0.1:" in log
    result = load_metrics(run_dir)
    assert result["global_step"] == TOTAL_STEPS
    test, base = result["metrics"]["test"], result["baseline"]["test"]
    assert test["rating"]["rmse"] < base["rating"]["rmse"] and test["ctr"]["auc"] > 0.5
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == f"step-{TOTAL_STEPS:08d}"
    plan = json.loads((run_dir / "plan.json").read_text())
    id_ranks = {r for t in plan["tables"] if t["table"] in ("t_user_id", "t_item_id") for r in t["ranks"]}
    assert id_ranks == {0, 1}, plan
    record_two_rank_result("sbatch -n 2", result)


@pytest.mark.slow
def test_preemption_usr1_requeue_resumes_exactly(
    slurm_cluster, slurm_reference, launch_dataset: Path, tmp_path: Path
):
    run_dir = tmp_path / "run"
    latest = run_dir / "checkpoints" / "latest"
    job = _submit_fit(slurm_cluster, tmp_path, run_dir, launch_dataset)
    try:
        assert _wait_files([latest], 60), tail(_log(tmp_path, job))
        saved = int(latest.read_text().strip().removeprefix("step-"))
        # what `#SBATCH --signal=B:USR1@120` does before the time limit (see towerrec.sbatch)
        slurm_cluster.run("scancel", "--batch", "--signal=USR1", job)
        info = slurm_cluster.wait_job(job, timeout=120)
    finally:
        slurm_cluster.cancel(job)
    log = _log(tmp_path, job)
    assert info["JobState"] == "COMPLETED", tail(log)
    assert info["Restarts"] == "1" and info["ExitCode"] == "0:0", tail(log)
    assert "[towerrec] preempted (SIGUSR1): checkpoint saved, exiting 75" in log, tail(log)
    assert "srun exited with code 75 (after SIGUSR1)" in log and "requeueing job" in log, tail(log)
    resumed = re.findall(r"\[towerrec\] resuming from (\S+)", log)
    assert len(resumed) == 1, tail(log)
    step = int(re.search(r"step-(\d+)$", resumed[0]).group(1))
    assert saved <= step < TOTAL_STEPS, (saved, resumed)
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == f"step-{TOTAL_STEPS:08d}"
    _, reference, reference_dir, reference_log = slurm_reference
    assert reference["JobState"] == "COMPLETED", tail(reference_log)
    assert_same_metrics(load_metrics(run_dir), load_metrics(reference_dir))


def test_preemption_term_requeue_stand_in(slurm_cluster, tmp_path: Path):
    """SIGTERM to the batch shell (a preemption / `scancel --signal=TERM`) takes the same path."""
    script = _write(tmp_path / "preemptible.py", PREEMPTIBLE)
    cmd = f"{shlex.quote(sys.executable)} {shlex.quote(str(script))} {shlex.quote(str(tmp_path))}"
    job = _submit(slurm_cluster, tmp_path, cmd, "-n", "2")
    try:
        assert _wait_files([tmp_path / "started.0", tmp_path / "started.1"], 30), _log(tmp_path, job)
        slurm_cluster.run("scancel", "--batch", "--signal=TERM", job)
        info = slurm_cluster.wait_job(job, timeout=60)
    finally:
        slurm_cluster.cancel(job)
    log = _log(tmp_path, job)
    assert info["JobState"] == "COMPLETED", log
    assert info["Restarts"] == "1", log
    assert "srun exited with code 75 (after SIGTERM)" in log
    assert "requeueing job" in log
    for r in range(2):
        res = json.loads((tmp_path / f"resumed.{r}.json").read_text())
        assert res["restart"] == 1
        assert res["state"] == {"step": 42, "signal": "SIGTERM"}
        assert res["sum"] == 2.0


def test_time_limit_signal_requeues(slurm_cluster, tmp_path: Path):
    """The real --signal=B:USR1@<sec> path: SLURM itself signals the batch shell before the limit."""
    script = _write(tmp_path / "preemptible.py", PREEMPTIBLE)
    cmd = f"{shlex.quote(sys.executable)} {shlex.quote(str(script))} {shlex.quote(str(tmp_path))}"
    # 1 minute limit, USR1 when <= 58 s are left: slurmctld checks limits periodically, so the
    # signal comes a few to ~30 s after the start.
    job = _submit(slurm_cluster, tmp_path, cmd, "-n", "2", "--time=1", "--signal=B:USR1@58")
    try:
        info = slurm_cluster.wait_job(job, timeout=90)
    finally:
        slurm_cluster.cancel(job)
    log = _log(tmp_path, job)
    assert info["JobState"] == "COMPLETED", log
    assert info["Restarts"] == "1", log
    assert "received SIGUSR1" in log
    assert json.loads((tmp_path / "resumed.0.json").read_text())["state"]["signal"] == "SIGUSR1"


def test_user_scancel_is_not_requeued(slurm_cluster, tmp_path: Path):
    script = _write(tmp_path / "preemptible.py", PREEMPTIBLE)
    cmd = f"{shlex.quote(sys.executable)} {shlex.quote(str(script))} {shlex.quote(str(tmp_path))}"
    job = _submit(slurm_cluster, tmp_path, cmd, "-n", "2")
    try:
        assert _wait_files([tmp_path / "started.0", tmp_path / "started.1"], 30), _log(tmp_path, job)
        slurm_cluster.run("scancel", job)
        info = slurm_cluster.wait_job(job, timeout=30)
        time.sleep(2)  # a (wrong) requeue would show up as PENDING/RUNNING with Restarts=1
        info = slurm_cluster.job(job)
    finally:
        slurm_cluster.cancel(job)
    assert info["JobState"] == "CANCELLED", _log(tmp_path, job)
    assert info["Restarts"] == "0", _log(tmp_path, job)
    assert not (tmp_path / "resumed.0.json").exists()


def test_sbatch_requires_config_or_cmd(slurm_cluster, tmp_path: Path):
    env = slurm_cluster.env()
    env.pop("TOWERREC_CMD", None)
    env.pop("TOWERREC_CONFIG", None)
    r = subprocess.run(
        [
            "sbatch",
            "--parsable",
            "-D",
            str(tmp_path),
            "-o",
            str(tmp_path / "slurm-%j.out"),
            str(SBATCH_SCRIPT),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert r.returncode == 0, r.stderr
    job = r.stdout.strip().split(";")[0]
    info = slurm_cluster.wait_job(job, timeout=30)
    assert info["JobState"] == "FAILED"
    assert info["ExitCode"] == "2:0"
    assert "set TOWERREC_CONFIG" in _log(tmp_path, job)
