"""Fixtures for the launch/ tests: a small synthetic data set for the real trainer, trainer
arguments, metric comparison, and the local SLURM cluster.

``launch_dataset`` (session) builds the data set once with ``towerrec prepare`` so that the ranks of
the multi-process tests never race to prepare it. ``fit_args`` gives the trainer arguments every
test uses (configs/default.yaml made small: 20k rows, 2 epochs).

The ``slurm_cluster`` session fixture installs SLURM (apt, needs root) and starts the one-node
cluster of ``launch/slurm/cluster.sh``; it stops the cluster at the end of the session unless
the cluster was already running before (then it is reused and left alone).

Opt out with ``TOWERREC_SKIP_SLURM=1`` or ``-m "not slurm"``.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
CLUSTER_SH = REPO / "launch" / "slurm" / "cluster.sh"
TORCHRUN_SH = REPO / "launch" / "torchrun.sh"
TOWERREC = Path(sys.executable).with_name("towerrec")  # the venv's console script
CONFIG = "configs/default.yaml"
# The data set of every launch test (configs/default.yaml has 200k rows; 20k train in seconds).
DATA_OVERRIDES = [
    "--data.prepare.num_rows", "20000",
    "--data.prepare.num_users", "500",
    "--data.prepare.num_items", "300",
]  # fmt: skip


def fit_args(data: Path, run_dir: Path, *extra: str) -> list[str]:
    """`fit` arguments (after `towerrec` / `launch/torchrun.sh --`) for the small test config."""
    return [
        "fit", "--config", CONFIG,
        "--data.path", str(data), *DATA_OVERRIDES,
        "--trainer.max_epochs", "2",
        "--trainer.progress_bar", "false",
        "--run_dir", str(run_dir),
        "--checkpoint.every_n_steps", "20",
        *extra,
    ]  # fmt: skip


def launch_env(**extra: str) -> dict[str, str]:
    """Environment for launcher subprocesses: no inherited torchrun/SLURM variables, loopback gloo."""
    drop = ("SLURM_", "TORCHELASTIC_", "TOWERREC_")
    env = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR"):
        env.pop(k, None)
    env.pop("MASTER_PORT", None)
    env["GLOO_SOCKET_IFNAME"] = "lo"  # loopback only
    env["TOWERREC_PYTHON"] = sys.executable
    env.update(extra)
    return env


@pytest.fixture(scope="session")
def launch_dataset(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("launch-data") / "syn"
    r = subprocess.run(
        [str(TOWERREC), "prepare", "--config", CONFIG, "--out", str(out), *DATA_OVERRIDES],
        cwd=REPO,
        env=launch_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    return out


def load_metrics(run_dir: Path) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())


def metric_differences(a: dict, b: dict, tol: float = 1e-6, path: str = "") -> list[str]:
    """Paths where two metric trees differ by more than ``tol`` (or in structure)."""
    if isinstance(a, dict) and isinstance(b, dict):
        if a.keys() != b.keys():
            return [f"{path}: keys {sorted(a)} != {sorted(b)}"]
        return [d for k in a for d in metric_differences(a[k], b[k], tol, f"{path}/{k}")]
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        same = (math.isnan(a) and math.isnan(b)) or math.isclose(a, b, rel_tol=0, abs_tol=tol)
        return [] if same else [f"{path}: {a!r} != {b!r} (diff {a - b:.3g})"]
    return [] if a == b else [f"{path}: {a!r} != {b!r}"]


def assert_same_metrics(resumed: dict, straight: dict) -> None:
    """Final metrics of an interrupted + resumed run equal (to 1e-6) those of an uninterrupted one."""
    assert resumed["global_step"] == straight["global_step"]
    diffs = metric_differences(resumed["metrics"], straight["metrics"])
    assert not diffs, "resumed run differs from the uninterrupted one:\n" + "\n".join(diffs)


# Final metrics of 2-rank runs of the same config, by launcher: torchrun and SLURM must agree.
TWO_RANK_RESULTS: dict[str, dict] = {}


def record_two_rank_result(launcher: str, result: dict) -> None:
    for other, seen in TWO_RANK_RESULTS.items():
        diffs = metric_differences(result["metrics"], seen["metrics"])
        assert not diffs, f"2 ranks under {launcher} != under {other}:\n" + "\n".join(diffs)
    TWO_RANK_RESULTS[launcher] = result


def tail(text: str, n: int = 60) -> str:
    """The end of a log, without the noise of library warnings."""
    noise = re.compile(r"Warning|^\s|^WARNING:(torchrec|root)|^\[rank\d\]:W")
    lines = [line for line in text.strip().splitlines() if not noise.search(line)]
    return "\n".join(lines[-n:])


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "slurm: needs a local SLURM cluster (launch/slurm/cluster.sh; root + apt)"
    )
    config.addinivalue_line("markers", "slow: multi-process or long-running integration tests")


@dataclass
class SlurmCluster:
    conf: Path
    state_dir: Path

    def env(self, **extra: str) -> dict[str, str]:
        env = launch_env(SLURM_CONF=str(self.conf))
        env.update(extra)
        return env

    def run(self, *args: str, check: bool = True, timeout: float = 20) -> subprocess.CompletedProcess:
        return subprocess.run(
            list(args), env=self.env(), capture_output=True, text=True, timeout=timeout, check=check
        )

    def job(self, job_id: str) -> dict[str, str]:
        """`scontrol show job -o` as a dict (works without accounting while MinJobAge lasts)."""
        out = self.run("scontrol", "show", "job", "-o", job_id).stdout
        return dict(re.findall(r"(\w+)=(\S*)", out))

    def wait_job(
        self,
        job_id: str,
        timeout: float = 60,
        states=(
            "COMPLETED",
            "FAILED",
            "CANCELLED",
            "TIMEOUT",
            "NODE_FAIL",
            "OUT_OF_MEMORY",
            "BOOT_FAIL",
            "DEADLINE",
            "PREEMPTED",
        ),
    ) -> dict:
        deadline = time.monotonic() + timeout
        info: dict[str, str] = {}
        while time.monotonic() < deadline:
            info = self.job(job_id)
            if info.get("JobState") in states:
                return info
            time.sleep(0.5)
        raise TimeoutError(f"job {job_id} not in {states} after {timeout}s: {info}")

    def cancel(self, job_id: str) -> None:
        self.run("scancel", job_id, check=False)


def _cluster_running(env: dict[str, str]) -> bool:
    r = subprocess.run([str(CLUSTER_SH), "status"], env=env, capture_output=True, text=True, timeout=30)
    return r.returncode == 0 and re.search(r"\bidle\b|\bmix\b|\balloc\b", r.stdout) is not None


@pytest.fixture(scope="session")
def slurm_cluster() -> SlurmCluster:
    if os.environ.get("TOWERREC_SKIP_SLURM") == "1":
        pytest.skip("TOWERREC_SKIP_SLURM=1")
    if os.geteuid() != 0:
        pytest.skip("SLURM tests need root (apt-get install, slurmd/munged run as root)")
    if shutil.which("apt-get") is None and shutil.which("slurmctld") is None:
        pytest.skip("SLURM not installed and no apt-get to install it")

    env = dict(os.environ)
    state_dir = Path(env.get("TOWERREC_SLURM_DIR", "/tmp/towerrec-slurm"))
    try:
        inst = subprocess.run(
            [str(CLUSTER_SH), "install"], env=env, capture_output=True, text=True, timeout=900
        )
    except subprocess.TimeoutExpired:
        pytest.skip("`launch/slurm/cluster.sh install` timed out (no package registry?)")
    if inst.returncode != 0:
        pytest.skip("cannot install SLURM with apt: " + tail(inst.stdout + inst.stderr, 15))

    already = _cluster_running(env)
    if not already:
        st = subprocess.run([str(CLUSTER_SH), "start"], env=env, capture_output=True, text=True, timeout=120)
        if st.returncode != 0:
            pytest.fail("`launch/slurm/cluster.sh start` failed:\n" + tail(st.stdout + st.stderr, 60))
    cluster = SlurmCluster(conf=state_dir / "slurm.conf", state_dir=state_dir)
    yield cluster
    if not already:
        subprocess.run([str(CLUSTER_SH), "stop"], env=env, capture_output=True, text=True, timeout=120)


@pytest.fixture
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
