"""Fixtures for the launch/ tooling tests.

The ``slurm_cluster`` session fixture installs SLURM (apt, needs root) and starts the one-node
cluster of ``launch/slurm/cluster.sh``; it stops the cluster at the end of the session unless
the cluster was already running before (then it is reused and left alone).

Opt out with ``TOWERREC_SKIP_SLURM=1`` or ``-m "not slurm"``.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
CLUSTER_SH = REPO / "launch" / "slurm" / "cluster.sh"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "slurm: needs a local SLURM cluster (launch/slurm/cluster.sh; root + apt)"
    )


def _tail(text: str, n: int = 30) -> str:
    return "\n".join(text.strip().splitlines()[-n:])


@dataclass
class SlurmCluster:
    conf: Path
    state_dir: Path

    def env(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
        env["SLURM_CONF"] = str(self.conf)
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
        pytest.skip("cannot install SLURM with apt: " + _tail(inst.stdout + inst.stderr, 15))

    already = _cluster_running(env)
    if not already:
        st = subprocess.run([str(CLUSTER_SH), "start"], env=env, capture_output=True, text=True, timeout=120)
        if st.returncode != 0:
            pytest.fail("`launch/slurm/cluster.sh start` failed:\n" + _tail(st.stdout + st.stderr, 60))
    cluster = SlurmCluster(conf=state_dir / "slurm.conf", state_dir=state_dir)
    yield cluster
    if not already:
        subprocess.run([str(CLUSTER_SH), "stop"], env=env, capture_output=True, text=True, timeout=120)


@pytest.fixture
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
