"""Shared fixtures: small data sets built once per session, and a way to run the CLI for real."""

from __future__ import annotations

import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ML100K = REPO.parent / "shared" / "data" / "ml-100k"

# A small synthetic data set keeps integration tests fast on 2 cores. Commands pointed at
# ``synthetic_data`` repeat this recipe (``fit_args`` does), since a data set prepared from another
# recipe is refused.
SMALL_SYNTHETIC = [
    "--data.prepare.num_rows", "30000",
    "--data.prepare.num_users", "600",
    "--data.prepare.num_items", "400",
    "--data.prepare.row_group_size", "2048",
]  # fmt: skip


# The 3,000-row recipe of ``tiny_data`` (dotted overrides): configs that use it must repeat it, since a
# data set prepared from another recipe is refused.
TINY_SYNTHETIC = [
    "data.prepare.num_rows=3000", "data.prepare.num_users=300", "data.prepare.num_items=150",
    "data.prepare.row_group_size=256", "data.prepare.num_shards=2",
]  # fmt: skip


def run_cli(args: list[str], nproc: int = 1, timeout: int = 300, env: dict | None = None, check: bool = True):
    """Runs ``towerrec ARGS`` (through torchrun when nproc > 1); returns the CompletedProcess.

    A single process is forked from ``tests.cli_server`` (the stack imported once, a fresh process
    per command) unless TOWERREC_TEST_FORK=0; torchrun starts its processes as a user's would."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
        cmd += ["-m", "towerrec.trainer.cli", *args]
        result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout, env=full_env)
    elif os.environ.get("TOWERREC_TEST_FORK", "1") == "0":
        cmd = [sys.executable, "-m", "towerrec.trainer.cli", *args]
        result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout, env=full_env)
    else:
        cmd = ["towerrec", *args]
        result = _fork_server().run(args, full_env, timeout)
    if check and result.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} exited {result.returncode}\n{result.stdout[-4000:]}\n{result.stderr[-6000:]}"
        )
    return result


class CliForkServer:
    """The client of ``tests/cli_server.py`` (started on first use, restarted if it died)."""

    def __init__(self) -> None:
        self.folder = Path(tempfile.mkdtemp(prefix="towerrec-cli-"))
        self.log = open(self.folder / "server.log", "w")  # noqa: SIM115 - open as long as the server
        self.process = subprocess.Popen(
            [sys.executable, str(REPO / "tests" / "cli_server.py")],
            cwd=REPO,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.log,
            text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        self.count = 0
        self.answers: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.process.stdout:
            self.answers.put(json.loads(line))
        self.answers.put(None)

    def _answer(self, timeout: float | None) -> dict:
        try:
            answer = self.answers.get(timeout=timeout)
        except queue.Empty:
            return {}
        if answer is None:
            log = (self.folder / "server.log").read_text()[-4000:]
            raise RuntimeError(f"tests/cli_server.py ended (exit {self.process.wait()}):\n{log}")
        return answer

    def run(self, args: list[str], env: dict, timeout: float) -> subprocess.CompletedProcess:
        self.count += 1
        out, err = self.folder / f"{self.count}.out", self.folder / f"{self.count}.err"
        request = {"args": args, "env": env, "cwd": str(REPO), "stdout": str(out), "stderr": str(err)}
        self.process.stdin.write(json.dumps(request) + "\n")
        self.process.stdin.flush()
        pid = self._answer(None)["pid"]
        answer = self._answer(timeout)
        timed_out = not answer
        if timed_out:
            try:
                os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            answer = self._answer(None)
        result = subprocess.CompletedProcess(
            ["towerrec", *args],
            answer["returncode"],
            out.read_text(errors="replace"),
            err.read_text(errors="replace"),
        )
        out.unlink()
        err.unlink()
        if timed_out:
            raise subprocess.TimeoutExpired(result.args, timeout, result.stdout, result.stderr)
        return result

    def alive(self) -> bool:
        return self.process.poll() is None

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait(timeout=60)
        self.log.close()
        shutil.rmtree(self.folder, ignore_errors=True)


_FORK_SERVER: list[CliForkServer] = []


def _fork_server() -> CliForkServer:
    if not _FORK_SERVER or not _FORK_SERVER[0].alive():
        _FORK_SERVER[:] = [CliForkServer()]
    return _FORK_SERVER[0]


def pytest_sessionfinish(session, exitstatus) -> None:
    for server in _FORK_SERVER:
        server.close()


@pytest.fixture(scope="session")
def synthetic_data(tmp_path_factory) -> Path:
    """A 30k-row synthetic data set (24k train / 3k val / 3k test) prepared once."""
    path = tmp_path_factory.mktemp("data") / "synthetic"
    run_cli(["prepare", "--config", "configs/default.yaml", "--out", str(path), *SMALL_SYNTHETIC])
    return path


@pytest.fixture(scope="session")
def ml100k_dir() -> Path:
    if not (ML100K / "u.data").exists():
        pytest.skip(f"MovieLens 100K not found at {ML100K} (licensed data, not in the repo)")
    return ML100K


def fit_args(data: Path, run_dir: Path, *extra: str) -> list[str]:
    """`towerrec fit` on the small synthetic data set."""
    return [
        "fit", "--config", "configs/default.yaml",
        "--data.path", str(data), *SMALL_SYNTHETIC,
        "--run_dir", str(run_dir),
        "--trainer.progress_bar", "false",
        *extra,
    ]  # fmt: skip


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """A 3,000-row synthetic data set with small row groups (many per rank), prepared in process."""
    from towerrec.data.prepare import prepare
    from towerrec.trainer.config import load_config

    path = tmp_path_factory.mktemp("tiny") / "synthetic"
    cfg = load_config("configs/default.yaml", TINY_SYNTHETIC)
    prepare(cfg.data.prepare, str(path))
    return path


@pytest.fixture(scope="session")
def tiny_sessions(tmp_path_factory) -> Path:
    """A 6,000-row click log with behaviour histories (``configs/sessions_sequence.yaml`` on
    ``towerrec.data.samples.session_clicks``), small row groups, prepared in process; its recipe is
    ``tiny_sessions_overrides``."""
    from towerrec.data.prepare import prepare
    from towerrec.data.samples import session_clicks, write_csv
    from towerrec.trainer.config import load_config
    from towerrec.trainer.dataset_setup import input_schema

    root = tmp_path_factory.mktemp("sessions")
    write_csv(session_clicks(num_users=300, steps=10, num_items=120, seed=1), root / "sessions.csv")
    cfg = load_config(SESSIONS_CONFIG, tiny_sessions_overrides(root / "data"))
    prepare(cfg.data.prepare, str(root / "data"), input_schema(cfg))
    return root / "data"


SESSIONS_CONFIG = "configs/sessions_sequence.yaml"
IMPLICIT_CONFIG = "configs/sessions_retrieval.yaml"


@pytest.fixture(scope="session")
def tiny_implicit(tmp_path_factory) -> Path:
    """A 3,000-event implicit log (the clicks of ``session_clicks``: user, item, ts; no label) split
    leave-last-out with histories (``configs/sessions_retrieval.yaml``), small row groups, prepared in
    process; its recipe is ``tiny_implicit_overrides``."""
    import pyarrow.compute as pc

    from towerrec.data.prepare import prepare
    from towerrec.data.samples import session_clicks, write_csv
    from towerrec.trainer.config import load_config
    from towerrec.trainer.dataset_setup import input_schema

    root = tmp_path_factory.mktemp("implicit")
    clicks = session_clicks(num_users=300, steps=10, num_items=120, seed=1)
    write_csv(clicks.filter(pc.equal(clicks["click"], 1)).drop_columns(["click"]), root / "log.csv")
    cfg = load_config(IMPLICIT_CONFIG, tiny_implicit_overrides(root / "data"))
    prepare(cfg.data.prepare, str(root / "data"), input_schema(cfg))
    return root / "data"


def tiny_implicit_overrides(data: Path) -> list[str]:
    """The recipe of ``tiny_implicit`` (dotted overrides of ``IMPLICIT_CONFIG``)."""
    return [
        f"data.path={data}", f"data.prepare.source={data.parent / 'log.csv'}",
        "data.prepare.row_group_size=256", "data.prepare.num_shards=2",
    ]  # fmt: skip


def tiny_sessions_overrides(data: Path) -> list[str]:
    """The recipe of ``tiny_sessions`` (dotted overrides of ``SESSIONS_CONFIG``)."""
    return [
        f"data.path={data}", f"data.prepare.source={data.parent / 'sessions.csv'}",
        "data.prepare.row_group_size=256", "data.prepare.num_shards=2",
    ]  # fmt: skip


@pytest.fixture(scope="session")
def rank_pools():
    """``rank_pools(W)``: a persistent pool of W in-process gloo ranks (tests.multirank), started on
    first use and restarted when a failure closed it."""
    from tests.multirank import RankPool

    pools: dict[int, RankPool] = {}

    def get(world_size: int) -> RankPool:
        pool = pools.get(world_size)
        if pool is None or not pool.alive():
            pools[world_size] = pool = RankPool(world_size)
        return pool

    yield get
    for pool in pools.values():
        pool.close()
