"""launch/torchrun.sh: single node (standalone) and two "nodes" on localhost (c10d rendezvous)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
TORCHRUN_SH = REPO / "launch" / "torchrun.sh"

ALL_REDUCE = r"""
import datetime, json, os, sys
import torch, torch.distributed as dist
out = sys.argv[1]
dist.init_process_group("gloo", init_method="env://", timeout=datetime.timedelta(seconds=30))
rank, world = dist.get_rank(), dist.get_world_size()
t = torch.tensor([float(rank + 1)])
dist.all_reduce(t)
keys = ["RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR", "MASTER_PORT"]
with open(os.path.join(out, f"result.{rank}.json"), "w") as f:
    json.dump({"rank": rank, "world": world, "sum": t.item(), "argv": sys.argv[2:],
               "env": {k: os.environ.get(k) for k in keys}}, f)
dist.destroy_process_group()
"""


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["GLOO_SOCKET_IFNAME"] = "lo"  # loopback only
    env["TOWERREC_PYTHON"] = sys.executable
    return env


def _results(out: Path, world: int) -> list[dict]:
    return [json.loads((out / f"result.{r}.json").read_text()) for r in range(world)]


def test_dry_run_defaults():
    r = subprocess.run(
        [str(TORCHRUN_SH), "--dry-run", "--", "fit", "--config", "c.yaml"],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert r.returncode == 0, r.stderr
    cmd = r.stdout.split()
    assert cmd[1:3] == ["-m", "torch.distributed.run"]
    assert "--standalone" in cmd
    assert cmd[-5:] == ["-m", "trainer.cli", "fit", "--config", "c.yaml"]
    if shutil.which("nvidia-smi") is None:
        assert "--nproc-per-node=1" in cmd  # CPU default: one process


def test_dry_run_multinode():
    r = subprocess.run(
        [
            str(TORCHRUN_SH),
            "--dry-run",
            "--nproc",
            "4",
            "--nnodes",
            "2",
            "--node-rank",
            "1",
            "--endpoint",
            "10.0.0.1:29400",
            "--rdzv-id",
            "job7",
            "--max-restarts",
            "3",
            "fit",
            "--config",
            "c.yaml",
        ],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert r.returncode == 0, r.stderr
    cmd = r.stdout.split()
    for a in [
        "--nproc-per-node=4",
        "--nnodes=2",
        "--node-rank=1",
        "--rdzv-backend=c10d",
        "--rdzv-endpoint=10.0.0.1:29400",
        "--rdzv-id=job7",
        "--max-restarts=3",
        "--rdzv-conf=is_host=0",
    ]:
        assert a in cmd
    assert "--standalone" not in cmd
    assert cmd[-5:] == ["-m", "trainer.cli", "fit", "--config", "c.yaml"]
    bad = subprocess.run(
        [str(TORCHRUN_SH), "--nnodes", "2", "--", "fit"],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert bad.returncode == 2 and "--endpoint" in bad.stderr


def test_single_node_two_processes(tmp_path: Path):
    script = tmp_path / "all_reduce.py"
    script.write_text(ALL_REDUCE)
    r = subprocess.run(
        [str(TORCHRUN_SH), "--nproc", "2", "--script", str(script), "--", str(tmp_path), "--flag"],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    for rank, res in enumerate(_results(tmp_path, 2)):
        assert res["world"] == 2 and res["sum"] == 3.0
        assert res["argv"] == ["--flag"]
        assert res["env"]["LOCAL_RANK"] == str(rank) and res["env"]["LOCAL_WORLD_SIZE"] == "2"


def test_two_nodes_on_localhost(tmp_path: Path, free_port: int):
    script = tmp_path / "all_reduce.py"
    script.write_text(ALL_REDUCE)
    common = [
        "--nnodes",
        "2",
        "--nproc",
        "1",
        "--endpoint",
        f"127.0.0.1:{free_port}",
        "--rdzv-id",
        f"test-{free_port}",
        "--script",
        str(script),
        "--",
        str(tmp_path),
    ]
    procs = [
        subprocess.Popen(
            [str(TORCHRUN_SH), "--node-rank", str(node), *common],
            env=_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for node in (0, 1)
    ]
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=60)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert [p.returncode for p in procs] == [0, 0], "\n---\n".join(outs)
    results = _results(tmp_path, 2)
    assert all(r["world"] == 2 and r["sum"] == 3.0 for r in results)
    # one process per "node": both have LOCAL_RANK 0, different group ranks
    assert {r["env"]["LOCAL_RANK"] for r in results} == {"0"}
    assert {r["env"]["GROUP_RANK"] for r in results} == {"0", "1"}
