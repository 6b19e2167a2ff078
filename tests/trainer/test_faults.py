"""Diagnosing a failed collective (``trainer.distributed.faults``) without library noise."""

from __future__ import annotations

import subprocess
import sys
from datetime import timedelta

import torch.distributed as dist

from towerrec.trainer.distributed.faults import diagnose_collective_failure, register_rank

SERVER = """
import sys, time
import torch.distributed as dist
store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
print(store.port, flush=True)
time.sleep(600)
"""


def test_a_dead_store_host_is_named_without_the_store_clients_cpp_stack_dump(capfd):
    """Rank 0 hosted the store and is gone: asking the store would make its C++ client log an
    18-line stack trace before raising; the survivor prints only towerrec's message."""
    server = subprocess.Popen([sys.executable, "-c", SERVER], stdout=subprocess.PIPE, text=True)
    try:
        port = int(server.stdout.readline())
        store = dist.PrefixStore("default_pg", dist.TCPStore("127.0.0.1", port, is_master=False,
                                                             timeout=timedelta(seconds=10)))  # fmt: skip
        register_rank(store, 1)
    finally:
        server.kill()
        server.wait()
    error = RuntimeError(
        "[gloo/transport/tcp/pair.cc:537] Read error [127.0.0.1]:2453: Connection reset by peer"
    )
    lost = diagnose_collective_failure(error, store, rank=1, world_size=2, timeout_s=10)
    assert str(lost).startswith(
        "rank 1: rank 0, which also hosted the rendezvous store, is gone; the job stops"
    )
    captured = capfd.readouterr()
    assert "frame #" not in captured.err + captured.out and "TCPStore" not in captured.err
