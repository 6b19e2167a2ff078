"""In-process multi-rank test harness: W gloo ranks on CPU that each call the same function.

In the manner of TorchRec's ``MultiProcessTestBase``: every rank runs a plain, importable function
(SPMD) inside a process group that already exists, and returns picklable results (numpy arrays,
dicts) that the test compares. The ranks are persistent: a ``RankPool`` starts its processes once
(importing torch, TorchRec and Lightning costs seconds per process) and then runs many calls.

    pool = RankPool(world_size=2)
    results = pool.run(train_steps, cfg_tree)      # [rank 0's return value, rank 1's]
    pool.close()

Each rank sees the environment torchrun would give it (RANK, LOCAL_RANK, WORLD_SIZE, ...), so the
product's launcher detection and Lightning's cluster environment behave as under torchrun. An
exception on any rank is re-raised in the caller with every failing rank's traceback.
"""

from __future__ import annotations

import importlib
import multiprocessing as mp
import os
import socket
import traceback
from collections.abc import Callable
from typing import Any


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _resolve(name: str) -> Callable:
    module, _, qualname = name.partition(":")
    target: Any = importlib.import_module(module)
    for part in qualname.split("."):
        target = getattr(target, part)
    return target


def _worker(rank: int, world_size: int, port: int, connection, num_threads: int) -> None:
    os.environ.update(
        {
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "GROUP_RANK": "0",
            "NODE_RANK": "0",
            "WORLD_SIZE": str(world_size),
            "LOCAL_WORLD_SIZE": str(world_size),
            "TORCHELASTIC_RUN_ID": "towerrec-tests",
            "OMP_NUM_THREADS": str(num_threads),
            "PYTHONWARNINGS": "ignore",
        }
    )
    from datetime import timedelta

    import torch
    import torch.distributed as dist

    torch.set_num_threads(num_threads)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world_size,
        timeout=timedelta(seconds=300),
    )
    connection.send(("ready", None))
    while True:
        message = connection.recv()
        if message is None:
            break
        name, args, kwargs = message
        try:
            connection.send(("ok", _resolve(name)(*args, **kwargs)))
        except BaseException:  # noqa: BLE001 - every failure goes back to the test
            connection.send(("error", traceback.format_exc()))
    dist.destroy_process_group()


class RankFailure(AssertionError):
    """A function failed on one or more ranks; the message holds each failing rank's traceback."""


class RankPool:
    """``world_size`` persistent gloo ranks (see module docstring)."""

    def __init__(self, world_size: int, num_threads: int = 1, start_timeout: float = 180):
        self.world_size = world_size
        context = mp.get_context("spawn")
        port = _free_port()
        self._connections, self._processes = [], []
        for rank in range(world_size):
            parent, child = context.Pipe()
            process = context.Process(
                target=_worker, args=(rank, world_size, port, child, num_threads), daemon=True
            )
            process.start()
            self._connections.append(parent)
            self._processes.append(process)
        for rank, connection in enumerate(self._connections):
            if not connection.poll(start_timeout):
                self.close()
                raise RankFailure(f"rank {rank} did not start within {start_timeout} s")
            connection.recv()

    def run(self, fn: Callable, *args: Any, timeout: float = 600, **kwargs: Any) -> list[Any]:
        """Calls ``fn(*args, **kwargs)`` on every rank and returns the results in rank order."""
        name = f"{fn.__module__}:{fn.__qualname__}"
        for connection in self._connections:
            connection.send((name, args, kwargs))
        results, failures = [], []
        for rank, connection in enumerate(self._connections):
            if not connection.poll(timeout):
                self.close()
                raise RankFailure(f"{name}: rank {rank} did not answer within {timeout} s (pool closed)")
            status, value = connection.recv()
            if status == "error":
                failures.append(f"--- rank {rank} ---\n{value}")
            results.append(value)
        if failures:
            raise RankFailure(f"{name} failed:\n" + "\n".join(failures))
        return results

    def alive(self) -> bool:
        return all(process.is_alive() for process in self._processes)

    def close(self) -> None:
        for connection, process in zip(self._connections, self._processes):
            if process.is_alive():
                try:
                    connection.send(None)
                except (BrokenPipeError, OSError):
                    pass
        for process in self._processes:
            process.join(timeout=30)
            if process.is_alive():
                process.kill()
