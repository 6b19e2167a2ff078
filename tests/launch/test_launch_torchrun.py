"""The real trainer in every non-SLURM launch mode (commands as in launch/README.md):

- debug: one plain `towerrec fit` process;
- `launch/torchrun.sh --nproc 2`: one node, two ranks, tables sharded over both;
- two "nodes" on localhost (two torchrun.sh invocations, c10d rendezvous);
- elastic restart: a worker SIGKILLed mid-epoch, torchrun restarts the group, the trainer resumes
  from checkpoints/latest and ends with exactly the metrics of an uninterrupted run.

Plus dry-run checks of the wrapper's command line.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.launch.conftest import (
    REPO,
    TORCHRUN_SH,
    TOWERREC,
    assert_same_metrics,
    fit_args,
    launch_env,
    load_metrics,
    record_two_rank_result,
    tail,
)

# 2 ranks x batch 64 = 126 steps per epoch, 252 in all: long enough (~7 s of training) to kill a
# worker mid-epoch after the first periodic checkpoint (step 50).
TWO_RANK_ARGS = ("--data.batch_size", "64", "--checkpoint.every_n_steps", "50")
TOTAL_STEPS = 252
ID_TABLES = ("t_user_id", "t_item_id")


def _run(cmd: list[str], timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(
        cmd,
        cwd=REPO,
        env=launch_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=timeout,
    )


def _popen(cmd: list[str]) -> subprocess.Popen:
    # own session: the whole tree (agent + workers) can be killed if the test fails
    return subprocess.Popen(
        cmd,
        cwd=REPO,
        env=launch_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def _kill_tree(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()


def _table_ranks(run_dir: Path) -> dict[str, set[int]]:
    import json

    plan = json.loads((run_dir / "plan.json").read_text())
    return {t["table"]: set(t["ranks"]) for t in plan["tables"]}


def _assert_id_tables_sharded_over_two_ranks(run_dir: Path) -> None:
    ranks = _table_ranks(run_dir)
    user, item = (ranks[t] for t in ID_TABLES)
    assert user | item == {0, 1}, ranks
    assert user != item, f"both id tables on ranks {user}: {ranks}"


def _assert_beats_baseline(result: dict) -> None:
    test, base = result["metrics"]["test"], result["baseline"]["test"]
    assert test["rating"]["rmse"] < base["rating"]["rmse"], (test, base)
    assert test["ctr"]["auc"] > 0.5 and base["ctr"]["auc"] == pytest.approx(0.5)
    assert test["ctr"]["logloss"] < base["ctr"]["logloss"], (test, base)


# ----------------------------------------------------------------------------- wrapper logic
def test_dry_run_defaults():
    r = _run([str(TORCHRUN_SH), "--dry-run", "--", "fit", "--config", "c.yaml"], timeout=30)
    assert r.returncode == 0, r.stdout
    cmd = r.stdout.split()
    assert cmd[0] == "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1"  # restarts need a fresh store (see torchrun.sh)
    assert cmd[2:4] == ["-m", "torch.distributed.run"]
    assert "--standalone" in cmd
    assert cmd[-5:] == ["-m", "towerrec.trainer.cli", "fit", "--config", "c.yaml"]
    if shutil.which("nvidia-smi") is None:
        assert "--nproc-per-node=1" in cmd  # CPU default: one process


def test_dry_run_multinode():
    r = _run(
        [
            str(TORCHRUN_SH), "--dry-run", "--nproc", "4", "--nnodes", "2", "--node-rank", "1",
            "--endpoint", "10.0.0.1:29400", "--rdzv-id", "job7", "--max-restarts", "3",
            "fit", "--config", "c.yaml",
        ],
        timeout=30,
    )  # fmt: skip
    assert r.returncode == 0, r.stdout
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
    assert cmd[-5:] == ["-m", "towerrec.trainer.cli", "fit", "--config", "c.yaml"]
    bad = _run([str(TORCHRUN_SH), "--nnodes", "2", "--", "fit"], timeout=30)
    assert bad.returncode == 2 and "--endpoint" in bad.stdout


# ----------------------------------------------------------------------------- real trainer
def test_debug_single_process(launch_dataset: Path, tmp_path: Path):
    run_dir = tmp_path / "run"
    r = _run([str(TOWERREC), *fit_args(launch_dataset, run_dir)], timeout=120)
    assert r.returncode == 0, tail(r.stdout)
    result = load_metrics(run_dir)
    _assert_beats_baseline(result)
    assert (run_dir / "checkpoints" / "latest").exists()
    assert all(ranks == {0} for ranks in _table_ranks(run_dir).values())


@pytest.fixture(scope="module")
def two_rank_run(launch_dataset: Path, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """One node, 2 processes, uninterrupted: also the reference of the elastic-restart test."""
    run_dir = tmp_path_factory.mktemp("torchrun-2") / "run"
    r = _run(
        [str(TORCHRUN_SH), "--nproc", "2", "--", *fit_args(launch_dataset, run_dir, *TWO_RANK_ARGS)],
        timeout=120,
    )
    return run_dir, r


@pytest.mark.slow
def test_torchrun_one_node_two_processes(two_rank_run):
    run_dir, r = two_rank_run
    assert r.returncode == 0, tail(r.stdout)
    result = load_metrics(run_dir)
    assert result["global_step"] == TOTAL_STEPS
    _assert_beats_baseline(result)
    _assert_id_tables_sharded_over_two_ranks(run_dir)
    record_two_rank_result("torchrun --nproc 2", result)


@pytest.mark.slow
def test_torchrun_two_nodes_on_localhost(launch_dataset: Path, tmp_path: Path, free_port: int):
    run_dir = tmp_path / "run"
    # both "nodes" share this host's cores: one thread each instead of all cores each
    args = fit_args(launch_dataset, run_dir, "--trainer.num_threads", "1")
    common = [
        "--nnodes",
        "2",
        "--endpoint",
        f"127.0.0.1:{free_port}",
        "--rdzv-id",
        f"t{free_port}",
        "--nproc",
        "1",
    ]
    procs = [_popen([str(TORCHRUN_SH), *common, "--node-rank", str(node), "--", *args]) for node in (0, 1)]
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=90)[0])
    finally:
        for p in procs:
            _kill_tree(p)
    assert [p.returncode for p in procs] == [0, 0], "\n--- node 1:\n".join(tail(o) for o in outs)
    # one worker per node, each with its own global rank
    ranks = sorted(set(re.findall(r"GLOBAL_RANK: (\d+)", o)) for o in outs)
    assert ranks == [{"0"}, {"1"}], ranks
    _assert_id_tables_sharded_over_two_ranks(run_dir)
    _assert_beats_baseline(load_metrics(run_dir))
    # metrics.json is written by global rank 0 only: exactly one node reports the results
    assert sum("[towerrec] results in" in o for o in outs) == 1


def _workers(agent: subprocess.Popen) -> dict[int, int]:
    """Global rank -> pid of the agent's worker processes (torchrun.sh execs torchrun)."""
    found = {}
    children = subprocess.run(["pgrep", "-P", str(agent.pid)], capture_output=True, text=True).stdout.split()
    for pid in map(int, children):
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        for item in env:
            if item.startswith(b"RANK="):
                found[int(item[5:])] = pid
    return found


@pytest.mark.slow
def test_torchrun_elastic_restart_resumes_exactly(launch_dataset: Path, tmp_path: Path, two_rank_run):
    reference_dir, reference = two_rank_run
    assert reference.returncode == 0, tail(reference.stdout)
    run_dir = tmp_path / "run"
    latest = run_dir / "checkpoints" / "latest"
    agent = _popen(
        [str(TORCHRUN_SH), "--nproc", "2", "--max-restarts", "1", "--",
         *fit_args(launch_dataset, run_dir, *TWO_RANK_ARGS)]
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while not latest.exists() and agent.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        if not latest.exists():
            _kill_tree(agent)
            pytest.fail("no checkpoint within 60 s:\n" + tail(agent.communicate()[0]))
        saved = int(latest.read_text().strip().removeprefix("step-"))
        workers = _workers(agent)
        assert set(workers) == {0, 1}, workers
        os.kill(workers[1], signal.SIGKILL)  # rank 1 dies mid-epoch, after a periodic checkpoint
        out = agent.communicate(timeout=90)[0]
    finally:
        _kill_tree(agent)
    assert agent.returncode == 0, tail(out)
    # torchrun names the first failure it sees: rank 1 killed, or rank 0 stopping (exit 4) on its loss
    assert re.search(r"failed \(exitcode: -9\) local_rank: 1", out) or (
        re.search(r"failed \(exitcode: 4\) local_rank: 0", out) and "rank 1 (pid" in out
    ), tail(out)
    resumed = re.findall(r"\[towerrec\] resuming from (\S+)", out)
    assert len(resumed) == 1, tail(out)
    step = int(re.search(r"step-(\d+)$", resumed[0]).group(1))
    # the latest complete checkpoint at the failure: the one seen before the kill (or one that rank 0
    # finished just after it, if rank 1 had already done its part)
    assert saved <= step < TOTAL_STEPS, (resumed, saved)
    assert_same_metrics(load_metrics(run_dir), load_metrics(reference_dir))
