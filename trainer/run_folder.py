"""The run folder: what each command writes where, and the guarantee that nothing a user made is
lost or written over by another command.

    <run_dir>/
      .lock                     held by the live ``fit`` (an OS file lock: gone when the process is)
      config.yaml versions.json plan.txt plan.json    the training record (latest fit session;
                                a session with another value keeps the earlier file as
                                ``<name>.before-step-N``)
      logs/metrics.csv          training curves, appended by every fit session (a resumed session
                                first cuts it back to its checkpoint; logs/metrics.finished.json keeps
                                the rows of sessions that finished)
      tensorboard/              the same for TensorBoard
      metrics.json              fit's result (test metrics, baseline, train time summed over sessions)
      checkpoints/              see ``towerrec.trainer.distributed.checkpoint``
      evaluations/<stage>-<checkpoint>[-N]/       ``validate``/``test``: metrics.json + config + plan
      predictions/<split>-<checkpoint>[-N]/       ``predict`` (default output)
      recommendations/, rankings/, export/...     the serving commands' default outputs

Every default output gets a new name (``-2``, ``-3``, ... when taken); an output path given on the
command line must not exist yet (a folder may exist empty). ``OutputExists`` otherwise (exit 2).
"""

from __future__ import annotations

import csv
import fcntl
import inspect
import json
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter

from towerrec.trainer.errors import ConfigError, OutputExists, RunFolderBusy, naming

LOCK_FILE = ".lock"
SEAL_FILE = "metrics.finished.json"  # beside metrics.csv: how many of its rows finished sessions wrote


@contextmanager
def training_lock(run_dir: str | os.PathLike, is_rank_zero: bool) -> Iterator[None]:
    """Holds the run folder for one ``fit`` (global rank 0 takes the lock for the whole job); a
    second process is refused with ``RunFolderBusy`` while the first lives. The lock is the
    operating system's (``flock``): a killed process releases it, so a stale one never blocks."""
    if not is_rank_zero:
        yield
        return
    path = Path(run_dir)
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd = os.open(path / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as err:
        raise ConfigError(f"run_dir: cannot create or write {path} ({err.strerror or err})") from err
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 512, 0).decode(errors="replace").strip() or "another process"
            raise RunFolderBusy(
                f"run_dir {path}: another towerrec fit is using it ({holder}); wait for it to finish or "
                "choose another --run_dir"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(
            fd,
            f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode(),
            0,
        )
        yield
    finally:
        os.close(fd)


def check_writable(folder: Path) -> None:
    """Fails now, with the folder named, if checkpoints could not be written there later."""
    probe = folder / f".write-probe-{os.getpid()}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise ConfigError(
            f"run_dir: checkpoints cannot be written to {folder} ({err.strerror or err}); make it writable "
            "or choose another --run_dir"
        ) from err


def write_record(path: Path, text: str, step: int) -> None:
    """Writes a training-record file; an earlier, different version is kept beside it as
    ``<name>.before-step-<step>`` (a resumed session with another config or plan)."""
    if path.exists():
        old = path.read_bytes()
        if old == text.encode():
            return
        path.rename(path.with_name(f"{path.name}.before-step-{step}"))
    write_whole(path, text)


def write_whole(path: Path, text: str) -> None:
    """Writes ``path`` whole or not at all: beside it, then renamed over it (a full disk or a crash
    leaves the previous version, or nothing, never half a file)."""
    partial = path.with_name(f"{path.name}.partial-{os.getpid()}")
    try:
        with open(partial, "w") as file:
            file.write(text)
            file.flush()
            os.fsync(file.fileno())
        os.replace(partial, path)
    except OSError as err:
        partial.unlink(missing_ok=True)
        raise naming(err, path) from err


def new_output(root: Path, name: str, suffix: str = "") -> Path:
    """A path under ``root`` that nothing holds yet: ``name``, else ``name-2``, ``name-3``, ...
    Folders (``suffix`` empty) are created; files are reserved by creating them empty."""
    root.mkdir(parents=True, exist_ok=True)
    for attempt in range(1, 10_000):
        candidate = root / (f"{name}{suffix}" if attempt == 1 else f"{name}-{attempt}{suffix}")
        try:
            if suffix:
                os.close(os.open(candidate, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
            else:
                candidate.mkdir()
            return candidate
        except FileExistsError:
            continue
    raise OutputExists(f"{root}: no free name for {name}{suffix}")


def user_output(path: str | os.PathLike, flag: str, folder: bool) -> Path:
    """An output path given on the command line: it must not exist yet (a folder may be empty)."""
    out = Path(path)
    if out.exists() and (not folder or not out.is_dir() or any(out.iterdir())):
        raise OutputExists(
            f"{flag}: {out} already exists{' and is not empty' if folder and out.is_dir() else ''}; towerrec "
            "never writes over earlier results: choose another path or remove it"
        )
    if folder:
        out.mkdir(parents=True, exist_ok=True)
    else:
        out.parent.mkdir(parents=True, exist_ok=True)
    return out


class _AppendingWriter(ExperimentWriter):
    """Lightning's CSV writer, except that an existing ``metrics.csv`` (an earlier fit session of
    this run) is continued, not deleted; it counts the rows on disk (a checkpoint records how many)
    and never leaves a half-rewritten file (a new column rewrites it beside, then renames)."""

    def __init__(self, log_dir: str) -> None:
        super().__init__(log_dir)
        self.rows_on_disk = 0
        if os.path.isfile(self.metrics_file_path):
            with open(self.metrics_file_path, newline="") as file:
                reader = csv.reader(file)
                self.metrics_keys = list(next(reader, []))
                self.rows_on_disk = sum(1 for _ in reader)

    def _check_log_dir_exists(self) -> None:
        """Lightning deletes the earlier metrics here; the run's record must survive a resume."""

    def save(self) -> None:
        flushed = len(self.metrics)
        try:
            super().save()
        except OSError as err:
            raise naming(err, self.metrics_file_path) from err
        self.rows_on_disk += flushed

    def _rewrite_with_new_header(self, fieldnames: list[str]) -> None:
        with open(self.metrics_file_path, newline="") as file:
            rows = list(csv.DictReader(file))
        self._replace(fieldnames, rows)

    def keep_rows(self, count: int) -> None:
        """Cuts the file back to its header and first ``count`` rows (the rest: logged by an
        interrupted session after its last checkpoint; the resumed run logs them again)."""
        if not os.path.isfile(self.metrics_file_path):
            return
        with open(self.metrics_file_path, newline="") as file:
            reader = csv.reader(file)
            header = next(reader, [])
            rows = list(reader)
        if len(rows) > count:
            self._replace(header, rows[:count], plain=True)
        self.rows_on_disk = min(count, len(rows))

    def _replace(self, header: list[str], rows: list, plain: bool = False) -> None:
        partial = f"{self.metrics_file_path}.partial"
        with open(partial, "w", newline="") as file:
            if plain:
                writer = csv.writer(file)
                writer.writerow(header)
            else:
                writer = csv.DictWriter(file, fieldnames=header)
                writer.writeheader()
            writer.writerows(rows)
        os.replace(partial, self.metrics_file_path)


class AppendingCSVLogger(CSVLogger):
    """``CSVLogger`` writing ``<root>/<name>/metrics.csv``, appending across fit sessions; a
    checkpoint records ``rows_on_disk()`` and a resumed run ``restore``s the log to it."""

    @property
    @rank_zero_experiment
    def experiment(self) -> _AppendingWriter:
        if self._experiment is None:
            os.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _AppendingWriter(log_dir=self.log_dir)
        return self._experiment

    def rows_on_disk(self) -> int:
        """Writes what is buffered; the number of rows the file holds (global rank 0)."""
        self.save()
        return self.experiment.rows_on_disk

    def restore(self, rows: int, then: list[dict]) -> None:
        """The log as a checkpoint saw it: its first ``rows`` rows, then the rows ``then``
        (``{"step", "metrics"}``) that were still to be logged for the checkpoint's step. Rows of
        a fit session that finished (``seal``: its test, after its last checkpoint) are kept."""
        sealed = self._sealed_rows()
        if sealed > rows:
            self.experiment.keep_rows(sealed)
        else:
            self.experiment.keep_rows(rows)
            for row in then:
                self.experiment.log_metrics(row["metrics"], row["step"])
        self.save()

    def seal(self) -> None:
        """A fit session finished (``metrics.json`` written): every row it logged stays, whatever a
        later session resumes from (global rank 0)."""
        rows = self.rows_on_disk()
        write_whole(self._seal_path(), json.dumps({"rows_of_finished_sessions": rows}) + "\n")

    def _seal_path(self) -> Path:
        return Path(self.experiment.log_dir) / SEAL_FILE

    def _sealed_rows(self) -> int:
        try:
            return int(json.loads(self._seal_path().read_text())["rows_of_finished_sessions"])
        except (OSError, ValueError, KeyError, TypeError):
            return 0


def make_loggers(loggers, log_dir: Path) -> list:
    """The ``trainer.loggers`` of a run writing into ``log_dir``: ``csv`` and ``tensorboard`` in the
    run folder, any other Lightning logger class by name with its options (a file-based one's
    ``save_dir`` defaults to the run folder). A missing package or an unknown name is a
    ConfigError naming the entry (before anything starts)."""
    import lightning.pytorch.loggers as lightning_loggers
    from lightning.pytorch.loggers import TensorBoardLogger

    made = []
    for i, entry in enumerate(loggers):
        key = f"trainer.loggers[{i}]"
        if entry.type == "csv":
            made.append(AppendingCSVLogger(log_dir, name="logs", version="", **entry.options))
            continue
        if entry.type == "tensorboard":
            made.append(TensorBoardLogger(log_dir, name="tensorboard", version="", **entry.options))
            continue
        cls = getattr(lightning_loggers, entry.type, None)
        if not (isinstance(cls, type) and issubclass(cls, lightning_loggers.Logger)):
            shipped = sorted(n for n in dir(lightning_loggers) if n.endswith("Logger") and n != "Logger")
            raise ConfigError(
                f"{key}.type: {entry.type!r} is not csv, tensorboard or one of Lightning's {shipped}"
            )
        options = dict(entry.options)
        if "save_dir" in inspect.signature(cls).parameters:  # file-based loggers write into the run folder
            options.setdefault("save_dir", str(log_dir))
        try:
            made.append(cls(**options))
        except (ModuleNotFoundError, ImportError) as err:
            raise ConfigError(
                f"{key}.type: {entry.type} needs a package that is not installed ({err})"
            ) from err
        except TypeError as err:
            raise ConfigError(f"{key}.options: {entry.type} does not take them ({err})") from err
    return made
