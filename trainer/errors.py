"""Every error a user can meet, and the exit code the command line returns for it.

    0   done
    2   bad configuration, data, checkpoint or run folder (nothing was trained or lost); no space
        left on a device (what was being written is not left half-written)
    3   the embedding tables do not fit the cluster (``towerrec plan``, or sharding at start)
    4   training failed: a non-finite loss, a lost or hung peer rank, diverged replicas
    75  preempted: a checkpoint was saved; requeue the job (EX_TEMPFAIL)

The CLI maps an exception to its code by type (``exit_code``); anything else is a bug and keeps
its traceback. ``DataError`` lives in ``data`` (which never imports the trainer) and maps to 2, and
so does a full disk (``no_space``) wherever it was met, even under the errors it led to.
"""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

from towerrec.data.errors import DataError

EXIT_BAD_INPUT = 2
EXIT_PLAN_DOES_NOT_FIT = 3
EXIT_TRAINING_FAILED = 4
EXIT_PREEMPTED = 75


class TowerrecError(Exception):
    """Base of the errors below; ``exit_code`` is what the CLI returns."""

    exit_code = 1


class ConfigError(TowerrecError, ValueError):
    """A configuration value or flag is missing, unknown, of the wrong type or impossible; names the key."""

    exit_code = EXIT_BAD_INPUT


class CheckpointError(TowerrecError, ValueError):
    """A checkpoint is missing, incomplete, does not match the model, or cannot be written."""

    exit_code = EXIT_BAD_INPUT


class RunFolderBusy(ConfigError):
    """Another live ``fit`` process holds the run folder."""


class RecommendError(ConfigError):
    """A bad recommendation request (unknown feature, unreadable id file, bad output name); names the flag or key."""


class OutputExists(ConfigError):
    """An output path already holds something: towerrec never writes over earlier results."""


class PlanDoesNotFit(TowerrecError, ValueError):
    """The tables cannot be placed within the given memory budget."""

    exit_code = EXIT_PLAN_DOES_NOT_FIT


class NonFiniteLossError(TowerrecError, RuntimeError):
    """A task's loss became NaN or infinite (policy ``trainer.non_finite_loss: stop``)."""

    exit_code = EXIT_TRAINING_FAILED


class PeerLost(TowerrecError, RuntimeError):
    """A peer rank died or stopped answering collectives; names the rank where it can."""

    exit_code = EXIT_TRAINING_FAILED


class ReplicasDiverged(TowerrecError, RuntimeError):
    """The dense replicas differ between ranks (``trainer.check_replicas_every_n_steps``)."""

    exit_code = EXIT_TRAINING_FAILED


def no_space(err: BaseException) -> OSError | None:
    """The "no space left on device" (or quota) error in ``err``'s chain of causes, if any (the
    first that names its file, else the first): a full disk met inside a library often surfaces as
    another error raised while handling it."""
    found, seen = [], set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
            found.append(err)
        err = err.__cause__ or err.__context__
    return next((e for e in found if e.filename), found[0] if found else None)


def naming(err: OSError, path) -> OSError:
    """``err`` with ``path`` as its file when it has none (a failed write or close names nothing)."""
    if err.filename or err.errno is None:
        return err
    return type(err)(err.errno, err.strerror, str(path))


def no_space_message(err: OSError, folders: list[str]) -> str:
    """One line naming what was written, or else the fullest of ``folders`` (the run and data
    folders: a library's write that failed on close does not say which file it was)."""
    if err.filename:
        return f"no space left on the device writing {err.filename}"
    free = {}
    for folder in folders:
        existing = next((p for p in (folder, *map(str, _parents(folder))) if os.path.exists(p)), None)
        if existing is not None:
            free[folder] = shutil.disk_usage(existing).free
    if not free:
        return "no space left on the device"
    fullest = min(free, key=free.get)
    return f"no space left on the device holding {fullest} ({free[fullest]:,} bytes free there)"


def _parents(folder: str):
    return Path(folder).parents


def exit_code(err: BaseException) -> int | None:
    """The exit code for a user-facing error, None for anything else (a bug: keep the traceback)."""
    if no_space(err) is not None:
        return EXIT_BAD_INPUT
    if isinstance(err, TowerrecError):
        return err.exit_code
    if isinstance(err, DataError):
        return EXIT_BAD_INPUT
    return None
