"""Callbacks: step/epoch checkpoints, preemption (save and stop), throughput in the progress bar."""

from __future__ import annotations

import time
from pathlib import Path

import lightning as L
import torch

from towerrec.data.rows import OutOfRangeIds
from towerrec.trainer.distributed import checkpoint as ckpt
from towerrec.trainer.errors import ReplicasDiverged


def save_step_checkpoint(trainer: L.Trainer, root: Path) -> None:
    trainer.save_checkpoint(root / f"step-{trainer.global_step:08d}", weights_only=False)


class StepCheckpoint(L.Callback):
    """Saves after the step of: every ``every_n_steps``-th step, the last batch of each epoch, the
    step that reaches ``max_steps``, and a preemption request (then stops the run).

    Saving at a batch end (never at ``on_train_epoch_end``) keeps Lightning's loop state and the
    reader position consistent: a resumed run continues at exactly the next batch.
    """

    def __init__(self, root: Path, every_n_steps: int):
        self.root = root
        self.every_n_steps = every_n_steps
        self.preempted = False
        self._last_saved_step = -1

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        stream = trainer.datamodule.train_stream
        due = (
            pl_module.preempt_now
            or (self.every_n_steps and trainer.global_step % self.every_n_steps == 0)
            or batch.position + 1 == len(stream)
            or trainer.global_step == trainer.max_steps
        )
        if due and trainer.global_step != self._last_saved_step:
            save_step_checkpoint(trainer, self.root)
            self._last_saved_step = trainer.global_step
        if pl_module.preempt_now:
            trainer.should_stop = True
            self.preempted = True


class BestEpoch(L.Callback):
    """With early stopping: records in ``<checkpoints>/best.json`` the epoch-end checkpoint whose
    validation gave the lowest ``monitor`` (every rank decides alike: metrics are global), so that
    fit tests those weights and evaluation commands load them. A resumed run continues the record."""

    def __init__(self, root: Path, monitor: str):
        self.root, self.monitor = root, monitor
        self.best: dict | None = None

    def on_fit_start(self, trainer, pl_module) -> None:
        self.best = ckpt.read_best(self.root)

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking or trainer.state.fn != "fit":
            return
        value = trainer.callback_metrics.get(self.monitor)
        path = ckpt.checkpoint_dir(self.root, trainer.global_step)
        if value is None or not ckpt.is_complete(path):  # e.g. a mid-epoch validation: no checkpoint
            return
        value = float(value)
        if self.best is None or value < self.best["value"]:
            self.best = {"step": trainer.global_step, "epoch": trainer.current_epoch, "metric": self.monitor,
                         "value": value, "val": pl_module.last_metrics.get("val")}  # fmt: skip
            if trainer.is_global_zero:
                ckpt.write_best(self.root, self.best)


class ReplicaCheck(L.Callback):
    """``trainer.check_replicas_every_n_steps``: after every N-th step, every rank compares the
    checksums of its dense parameters with rank 0's (``TorchRecStrategy.dense_digests``); all ranks
    raise ``ReplicasDiverged`` together, naming the first differing parameter."""

    def __init__(self, every_n_steps: int):
        self.every_n_steps = every_n_steps

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.world_size == 1 or trainer.global_step % self.every_n_steps:
            return
        names, digests = trainer.strategy.dense_digests()
        gathered = trainer.strategy.all_gather(digests)  # (W, P, 2)
        differs = (gathered != gathered[0]).any(dim=2)  # (W, P)
        if bool(differs.any()):
            rank, index = (int(i) for i in differs.nonzero()[0])
            raise ReplicasDiverged(
                f"step {trainer.global_step}: the dense replicas differ between ranks: {names[index]} on rank "
                f"{rank} is not rank 0's ({int(differs.any(dim=0).sum())} of {len(names)} parameters differ); "
                "something in the model or the step runs differently per rank "
                "(trainer.check_replicas_every_n_steps)"
            )


class Throughput(L.Callback):
    """Shows training samples/s (all ranks) in the progress bar and logs it."""

    def __init__(self) -> None:
        self._start = None
        self._samples = 0

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._start, self._samples = time.perf_counter(), 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self._start is None:  # a run resumed mid-epoch skips on_train_epoch_start
            self._start, self._samples = time.perf_counter(), 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._samples += batch.batch_size * trainer.world_size
        elapsed = time.perf_counter() - self._start
        if elapsed > 0 and trainer.global_step % trainer.log_every_n_steps == 0:
            pl_module.log(
                "samples_per_s", self._samples / elapsed, prog_bar=True, batch_size=batch.batch_size
            )


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}"


SUMMARY_METRICS = ("auc", "rmse", "logloss", "loss")


class LineProgress(L.Callback):
    """Rank 0 prints a line every ``every_n_steps`` training steps (epoch, step, loss, samples/s
    over all ranks, ETA of the epoch) and one at the end of each epoch and evaluation, for output
    that goes to a file."""

    def __init__(self, every_n_steps: int):
        self.every_n_steps = every_n_steps
        self._epoch_start: float | None = None  # set at the epoch's first batch (also a resumed one)
        self._samples = 0
        self._steps = 0

    def _print(self, trainer: L.Trainer, text: str) -> None:
        if trainer.is_global_zero:
            print(f"[towerrec] {text}", flush=True)

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._epoch_start, self._samples, self._steps = time.perf_counter(), 0, 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self._epoch_start is None:  # a resumed epoch: Lightning does not call on_train_epoch_start
            self._epoch_start, self._samples, self._steps = time.perf_counter(), 0, 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._samples += batch.batch_size * trainer.world_size
        self._steps += 1
        if (trainer.global_step - 1) % self.every_n_steps:  # the steps whose loss the module logged
            return
        elapsed = time.perf_counter() - self._epoch_start
        total = trainer.num_training_batches
        rate = self._samples / elapsed if elapsed > 0 else float("nan")
        remaining = (
            f" · ETA {_duration(elapsed / self._steps * (total - batch_idx - 1))}"
            if isinstance(total, int) and self._steps
            else ""
        )
        loss = trainer.callback_metrics.get("train/loss")
        shown = f" · loss {float(loss):.4f}" if loss is not None else ""
        self._print(
            trainer,
            f"epoch {trainer.current_epoch + 1}/{trainer.max_epochs} step {batch_idx + 1}/{total}"
            f"{shown} · {rate:,.0f} samples/s{remaining}",
        )

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if self._epoch_start is None:
            return
        elapsed = time.perf_counter() - self._epoch_start
        self._epoch_start = None
        loss = trainer.callback_metrics.get("train/loss")
        shown = f", last loss {float(loss):.4f}" if loss is not None else ""
        rate = self._samples / elapsed if elapsed > 0 else float("nan")
        self._print(
            trainer,
            f"epoch {trainer.current_epoch + 1}/{trainer.max_epochs} done: {self._steps} steps in "
            f"{_duration(elapsed)} ({rate:,.0f} samples/s){shown}; global step {trainer.global_step}",
        )

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking or trainer.state.fn != "fit":
            return
        shown = [
            f"{name}={float(value):.4f}"
            for name, value in sorted(trainer.callback_metrics.items())
            if name.startswith("val/") and name.rsplit("/", 1)[-1] in SUMMARY_METRICS and value.numel() == 1
        ]
        if shown:
            self._print(trainer, "validation: " + "  ".join(shown))


class OutOfRangeReport(L.Callback):
    """After each training epoch: the ids of each ``vocab`` feature in ``features`` that the epoch
    read at or above its table size (``num_embeddings``; read as row 0), summed over ranks, so the
    same whatever the world size. Rank 0 prints them, ``last_epoch`` keeps them for ``metrics.json``
    and every rank stops alike (``DataError``) when a feature's share is above ``max_fraction``
    (``data.max_out_of_range_fraction``)."""

    def __init__(self, features: list[str], num_embeddings: dict[str, int], max_fraction: float, where: str):
        self.features, self.num_embeddings, self.max_fraction, self.where = (
            features, num_embeddings, max_fraction, where
        )  # fmt: skip
        self.last_epoch: dict[str, int] | None = None
        """Per feature with any: the ids out of range of the last epoch this process trained (a whole
        epoch reads the training split once; one stopped early counts the windows read so far)."""
        self._counted_before = OutOfRangeIds()

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        counted = getattr(trainer.datamodule.train_stream, "out_of_range_ids", None)
        if counted is None or not self.features:  # stand-in streams (tests, benchmarks) count nothing
            return
        before = self._counted_before
        local = [counted.found.get(n, 0) - before.found.get(n, 0) for n in self.features]
        local += [counted.read.get(n, 0) - before.read.get(n, 0) for n in self.features]
        self._counted_before = OutOfRangeIds(dict(counted.found), dict(counted.read))
        totals = trainer.strategy.all_reduce_sum(
            torch.tensor(local, dtype=torch.int64, device=pl_module.device)
        )
        totals = totals.tolist()
        count = len(self.features)
        epoch = OutOfRangeIds(
            dict(zip(self.features, totals[:count])), dict(zip(self.features, totals[count:]))
        )
        self.last_epoch = {name: found for name, found in epoch.found.items() if found}
        lines = epoch.describe(self.num_embeddings)
        if lines and trainer.is_global_zero:
            print(
                f"[towerrec] epoch {trainer.current_epoch + 1}: ids read as row 0 (at or above num_embeddings): "
                + "; ".join(lines),
                flush=True,
            )
        epoch.check(
            self.max_fraction, self.num_embeddings, f"{self.where}, epoch {trainer.current_epoch + 1}"
        )
