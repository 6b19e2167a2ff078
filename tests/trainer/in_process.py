"""Running a command's job in the test process (``towerrec.trainer.run.fit``, ``cli.main``) and
leaving the process as it was: Lightning sets MASTER_ADDR/MASTER_PORT and friends in the
environment and opens a process group (whose store holds that port while it lives: a run aborted
mid-way never closes it), and the job takes over SIGTERM/SIGUSR1. CLI runs started later by the
same test session inherit the environment, and would find the port taken."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def isolated() -> Iterator[None]:
    environment = dict(os.environ)
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGUSR1)}
    try:
        yield
    finally:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
        os.environ.clear()
        os.environ.update(environment)
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
