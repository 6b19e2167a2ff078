"""launch/slurm: one-node SLURM cluster, towerrec.sbatch, preemption -> checkpoint -> requeue.

The trainer CLI is replaced by small stand-in scripts (TOWERREC_CMD) so that only the launch
machinery is under test.
"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
CLUSTER_SH = REPO / "launch" / "slurm" / "cluster.sh"
SBATCH_SCRIPT = REPO / "launch" / "slurm" / "towerrec.sbatch"

pytestmark = pytest.mark.slurm

ALL_REDUCE = r"""
import json, os, sys
import torch, torch.distributed as dist
out = sys.argv[1]
dist.init_process_group("gloo", init_method="env://", timeout=__import__("datetime").timedelta(seconds=30))
rank, world = dist.get_rank(), dist.get_world_size()
t = torch.tensor([float(rank + 1)])
dist.all_reduce(t)
keys = ["RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "NODE_RANK", "MASTER_ADDR",
        "MASTER_PORT", "TOWERREC_RESTART_COUNT", "SLURM_PROCID"]
with open(os.path.join(out, f"result.{rank}.json"), "w") as f:
    json.dump({"rank": rank, "world": world, "sum": t.item(),
               "env": {k: os.environ.get(k) for k in keys}}, f)
dist.destroy_process_group()
"""

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


def _submit(cluster, tmp_path: Path, cmd: str, *sbatch_args: str) -> str:
    env = cluster.env(
        TOWERREC_CMD=cmd,
        TOWERREC_MASTER_ADDR="127.0.0.1",  # loopback only
        GLOO_SOCKET_IFNAME="lo",
    )
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


def test_sbatch_two_tasks_all_reduce(slurm_cluster, tmp_path: Path):
    script = _write(tmp_path / "all_reduce.py", ALL_REDUCE)
    cmd = f"{shlex.quote(sys.executable)} {shlex.quote(str(script))} {shlex.quote(str(tmp_path))}"
    job = _submit(slurm_cluster, tmp_path, cmd, "-n", "2")
    try:
        info = slurm_cluster.wait_job(job, timeout=60)
    finally:
        slurm_cluster.cancel(job)
    log = _log(tmp_path, job)
    assert info["JobState"] == "COMPLETED", log
    assert info["ExitCode"] == "0:0", log
    results = [json.loads((tmp_path / f"result.{r}.json").read_text()) for r in range(2)]
    ports = set()
    for r, res in enumerate(results):
        assert res["rank"] == r and res["world"] == 2
        assert res["sum"] == 3.0  # 1 + 2
        env = res["env"]
        assert env["RANK"] == env["SLURM_PROCID"] == str(r)
        assert env["LOCAL_RANK"] == str(r) and env["NODE_RANK"] == "0"
        assert env["WORLD_SIZE"] == "2" and env["LOCAL_WORLD_SIZE"] == "2"
        assert env["MASTER_ADDR"] == "127.0.0.1"
        assert env["TOWERREC_RESTART_COUNT"] == "0"
        ports.add(env["MASTER_PORT"])
    assert ports == {str(20000 + (int(job) * 16) % 40000)}


@pytest.mark.parametrize("signal_name", ["USR1", "TERM"])
def test_preemption_checkpoint_requeue_resume(slurm_cluster, tmp_path: Path, signal_name: str):
    script = _write(tmp_path / "preemptible.py", PREEMPTIBLE)
    cmd = f"{shlex.quote(sys.executable)} {shlex.quote(str(script))} {shlex.quote(str(tmp_path))}"
    job = _submit(slurm_cluster, tmp_path, cmd, "-n", "2")
    try:
        assert _wait_files([tmp_path / "started.0", tmp_path / "started.1"], 30), _log(tmp_path, job)
        # what `#SBATCH --signal=B:USR1@120` does before the time limit / a preemption does
        slurm_cluster.run("scancel", "--batch", f"--signal={signal_name}", job)
        info = slurm_cluster.wait_job(job, timeout=60)
    finally:
        slurm_cluster.cancel(job)
    log = _log(tmp_path, job)
    assert info["JobState"] == "COMPLETED", log
    assert info["Restarts"] == "1", log
    assert f"srun exited with code 75 (after SIG{signal_name})" in log
    assert "requeueing job" in log
    for r in range(2):
        res = json.loads((tmp_path / f"resumed.{r}.json").read_text())
        assert res["restart"] == 1
        assert res["state"] == {"step": 42, "signal": f"SIG{signal_name}"}
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
