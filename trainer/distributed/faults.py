"""Fault tolerance: what a training job does when it is told to stop or a peer rank fails.

- **Preemption** (SIGUSR1/SIGTERM, what SLURM sends before a time limit): the handler only sets a
  flag (``PreemptionFlag``); all ranks agree on it in the step's one all-reduce
  (``MultiTaskModule.combined_loss``), save a step checkpoint at that step's end
  (``callbacks.StepCheckpoint``) and exit ``EXIT_PREEMPTED`` (75). Signals that arrive once the
  checkpoint is saved and the job is exiting are ignored (``ignore_late_signals``): without it a
  second SIGTERM during interpreter shutdown would kill the process with 143 although the
  checkpoint was complete.
- **A lost peer**: each rank registers its host and process id in the process group's store
  (``register_rank``). When a collective fails, ``diagnose_collective_failure`` turns the backend's
  error into ``PeerLost`` naming the rank(s) that are gone (a process on this host that no longer
  runs, or the rank that hosted the store) or that did not answer within
  ``trainer.collective_timeout_s`` (exit 4); the job resumes from the latest checkpoint when restarted.
- **NCCL** (CUDA): by default PyTorch's NCCL watchdog kills the process with SIGABRT when a
  collective times out or a peer fails (``TORCH_NCCL_ASYNC_ERROR_HANDLING=3``): exit 134, no
  diagnosis. ``nccl_error_handling`` sets it to 2 (abort the communicators, keep the process), so
  the failed or next collective raises in Python and the diagnosis above applies: exit 4, naming
  a lost rank that ran on this host (a rank on another host is named as not checked from here).
  This is read from PyTorch 2.11-2.13's source and has not been run on GPUs (README).
"""

from __future__ import annotations

import os
import signal
import socket
from datetime import timedelta

from towerrec.trainer.errors import PeerLost

PREEMPTION_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)
_STORE_PREFIX = "towerrec/rank/"
# Fragments of the errors gloo and NCCL raise when a peer's connection breaks or times out.
_CONNECTION_LOST = ("connection closed by peer", "connection reset by peer", "broken pipe", "remote worker crashing",
                    "connection refused", "ncclremoteerror", "socket closed", "communicator was aborted",
                    "remote process exiting")  # fmt: skip
NCCL_ERROR_HANDLING = ("TORCH_NCCL_ASYNC_ERROR_HANDLING", "NCCL_ASYNC_ERROR_HANDLING")
"""PyTorch's names (current, then deprecated) of NCCL's asynchronous error handling mode."""
_TIMED_OUT = ("timed out", "timeout")


class PreemptionFlag:
    """Set by SIGUSR1/SIGTERM; ``install()`` replaces their handlers (see the module docstring)."""

    def __init__(self) -> None:
        self.requested = False
        self.signal_name: str | None = None

    def install(self) -> None:
        for sig in PREEMPTION_SIGNALS:
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.requested = True
        self.signal_name = signal.Signals(signum).name


def take_over_signals(trainer, flag: PreemptionFlag) -> None:
    """Replaces Lightning's signal handling by ``flag``: Lightning's SIGTERM handler broadcasts
    inside the handler (it can deadlock a rank that is in another collective) and its teardown
    restores the default handlers; ours only sets a flag that all ranks agree on at the next step."""
    trainer._signal_connector.register_signal_handlers = lambda: None
    trainer._signal_connector.teardown = lambda: None
    flag.install()


def ignore_late_signals() -> None:
    """From here on SIGUSR1/SIGTERM are ignored: the job's outcome is decided and saved."""
    for sig in PREEMPTION_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


def nccl_error_handling(backend: str, environ: dict[str, str]) -> str | None:
    """Before the process group starts: with NCCL, sets ``TORCH_NCCL_ASYNC_ERROR_HANDLING=2`` in
    ``environ`` (see the module docstring) unless the user chose a mode under either name. Returns
    the variable and value in force with NCCL (None for another backend)."""
    if backend != "nccl":
        return None
    for name in NCCL_ERROR_HANDLING:
        if name in environ:
            return f"{name}={environ[name]} (set by the user)"
    environ[NCCL_ERROR_HANDLING[0]] = "2"
    return f"{NCCL_ERROR_HANDLING[0]}=2"


def register_rank(store, rank: int) -> None:
    """Records this rank's host and process id in the store (read back by the diagnosis)."""
    store.set(f"{_STORE_PREFIX}{rank}", f"{socket.gethostname()}:{os.getpid()}")


def _process_gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:  # a killed child stays a zombie until reaped
            return stat.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True
    except OSError:
        return False


def _store_listening(store) -> bool:
    """Whether the TCP store's server still accepts connections. Asking a store whose host died
    makes the C++ client log a warning with an 18-line stack trace before it raises: this asks
    the port first (a dead process's port refuses at once)."""
    while hasattr(store, "underlying_store"):  # PrefixStore
        store = store.underlying_store
    host, port = getattr(store, "host", None), getattr(store, "port", None)
    if host is None or port is None:
        return True  # another kind of store: asking it is the only test
    try:
        socket.create_connection((host, port), timeout=5).close()
    except OSError:
        return False
    return True


def _peers(store, rank: int, world_size: int) -> tuple[list[str], list[str], bool]:
    """(ranks that are gone, ranks still running, whether the store answered)."""
    gone, running = [], []
    host = socket.gethostname()
    if not _store_listening(store):
        return [], [], False
    try:
        store.set_timeout(timedelta(seconds=5))
        entries = {q: store.get(f"{_STORE_PREFIX}{q}").decode() for q in range(world_size) if q != rank}
    except Exception:  # noqa: BLE001 - the store died with the rank that hosted it
        return [], [], False
    for q, entry in sorted(entries.items()):
        peer_host, pid = entry.rsplit(":", 1)
        label = f"rank {q} (pid {pid} on {peer_host})"
        if peer_host != host:
            running.append(f"{label}, on another host: not checked from here")
        elif _process_gone(int(pid)):
            gone.append(label)
        else:
            running.append(label)
    return gone, running, True


def diagnose_collective_failure(
    err: BaseException, store, rank: int, world_size: int, timeout_s: int
) -> PeerLost | None:
    """A ``PeerLost`` explaining ``err`` when it is a failed collective, else None (not ours)."""
    text = str(err).lower()
    lost = any(fragment in text for fragment in _CONNECTION_LOST)
    timed_out = any(fragment in text for fragment in _TIMED_OUT)
    if world_size <= 1 or not (lost or timed_out):
        return None
    first_line = str(err).strip().splitlines()[0][:300]
    gone, running, store_ok = _peers(store, rank, world_size)
    if gone:
        who = f"{', '.join(gone)} {'is' if len(gone) == 1 else 'are'} gone"
    elif not store_ok:
        who = "rank 0, which also hosted the rendezvous store, is gone"
    elif timed_out:
        who = (
            f"a peer rank is dead or hung: no answer within trainer.collective_timeout_s={timeout_s}s "
            f"(still running: {', '.join(running) or 'none'})"
        )
    else:
        who = f"a peer rank's connection broke (still running: {', '.join(running) or 'none'})"
    return PeerLost(
        f"rank {rank}: {who}; the job stops here and resumes from the latest checkpoint when "
        f"restarted (the backend said: {first_line})"
    )
