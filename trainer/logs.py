"""What a run prints: one copy of each line, library noise filtered, ranks named, and progress as
plain lines when the output is a file (SLURM, ``> log``, CI) instead of progress-bar redraws.

``configure_logging`` runs once per process before any command: a single handler on the root
logger (Lightning's own handler removed; fbgemm's import-time ``logging.info`` had given the root a
second one), warnings that repeat on every command and rank and that a user cannot act on
silenced, and ``[rank N]`` in front of log lines from ranks other than 0 when there are several.
"""

from __future__ import annotations

import errno
import logging
import os
import sys
import threading
import warnings

# Messages from the libraries that say nothing about the user's run (each appears on every rank).
QUIET_WARNINGS = (
    r".*sync_dist=True.*",  # Lightning: epoch-level metrics are reduced by our own metrics code
    r".*The `srun` command is available.*",
    r".*isinstance\(treespec, LeafSpec\).*",
    r".*Please use DTensor instead and we are deprecating ShardedTensor.*",  # torchrec.optim.keyed
    r".*is smaller than the logging interval.*",  # Lightning: short epochs; LineProgress prints per epoch
    r".*does not have many workers which may be a bottleneck.*",  # the reader has its own threads
    r".*TypedStorage is deprecated.*",
    r".*torch.distributed.nn.functional.all_gather is deprecated.*",  # inside Lightning's strategy.all_gather
)
QUIET_LOGGERS = {
    "torch.fx._symbolic_trace": logging.ERROR,  # is_fx_tracing note, from TorchRec's own modules
    "torchrec.distributed.planner": logging.ERROR,  # towerrec prints the plan itself
    "torchrec.distributed.utils": logging.ERROR,
    "lightning.pytorch.utilities.rank_zero": logging.INFO,
}
LIGHTNING_LOGGERS = (
    "lightning",
    "lightning.pytorch",
    "lightning.fabric",
    "lightning_fabric",
    "pytorch_lightning",
)
LIGHTNING_TIPS = ("💡 Tip:",)
# Lightning names the checkpoint path it was given; towerrec says which checkpoint it loads (after
# checking it, and a resumed fit may fall back to an older intact one).
LIGHTNING_RESTORE_NOTES = (
    "Restoring states from the checkpoint path at",
    "Restored all states from the checkpoint at",
)


def process_rank() -> tuple[int, int]:
    """(rank, world size) from the launcher's environment (before any process group exists)."""
    for rank_key, size_key in (("RANK", "WORLD_SIZE"), ("SLURM_PROCID", "SLURM_NTASKS")):
        if rank_key in os.environ:
            return int(os.environ[rank_key]), int(os.environ.get(size_key, "1"))
    return 0, 1


class _RankFormatter(logging.Formatter):
    def __init__(self, prefix: str):
        super().__init__("%(message)s")
        self.prefix = prefix

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        if record.levelno >= logging.WARNING and not text.startswith(("warning", "error")):
            text = f"{record.levelname.lower()}: {text}"
        return f"{self.prefix}{text}" if self.prefix else text


class _DropTips(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.getMessage()).startswith(LIGHTNING_TIPS + LIGHTNING_RESTORE_NOTES)


def configure_logging(rank: int | None = None, world_size: int | None = None) -> None:
    """One handler on the root logger (stderr), library noise filtered (see module docstring)."""
    if rank is None or world_size is None:
        rank, world_size = process_rank()
    prefix = f"[rank {rank}] " if world_size > 1 and rank != 0 else ""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_RankFormatter(prefix))
    handler.addFilter(_DropTips())
    root = logging.getLogger()
    for existing in list(root.handlers):
        root.removeHandler(existing)
    root.addHandler(handler)
    root.setLevel(logging.WARNING)
    for name in LIGHTNING_LOGGERS:
        logger = logging.getLogger(name)
        for existing in list(logger.handlers):
            logger.removeHandler(existing)
        logger.propagate = True
        logger.setLevel(logging.INFO)
    for name, level in QUIET_LOGGERS.items():
        logging.getLogger(name).setLevel(level)
    for pattern in QUIET_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)
    warnings.showwarning = _show_warning(prefix)
    threading.excepthook = _quiet_full_disk


def _quiet_full_disk(args) -> None:
    """A library's writer thread that meets a full disk (TensorBoard's) dies without a traceback:
    the main thread meets the same error at its next write and the command reports it in a line."""
    if isinstance(args.exc_value, OSError) and args.exc_value.errno in (errno.ENOSPC, errno.EDQUOT):
        return
    threading.__excepthook__(args)


def _show_warning(prefix: str):
    def show(message, category, filename, lineno, file=None, line=None) -> None:
        stream = file or sys.stderr
        stream.write(
            f"{prefix}warning: {message} ({category.__name__}, {os.path.basename(filename)}:{lineno})\n"
        )

    return show


def progress_style(progress_bar: bool | str) -> str:
    """``trainer.progress_bar`` → ``bar``, ``lines`` or ``off`` (``auto``: a bar only on a terminal)."""
    if progress_bar == "auto":
        return "bar" if sys.stdout.isatty() else "lines"
    if progress_bar == "off":
        return "off"
    return "bar" if progress_bar else "lines"
