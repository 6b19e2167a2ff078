"""Callbacks: step/epoch checkpoints, preemption (save and stop), throughput in the progress bar."""

from __future__ import annotations

import time
from pathlib import Path

import lightning as L
import torch
from lightning.fabric.utilities.apply_func import convert_tensors_to_scalars
from lightning.pytorch.callbacks import Checkpoint, EarlyStopping

from towerrec.data.rows import OutOfRangeIds
from towerrec.trainer.distributed import checkpoint as ckpt
from towerrec.trainer.errors import ReplicasDiverged
from towerrec.trainer.run_folder import AppendingCSVLogger


def save_step_checkpoint(trainer: L.Trainer, root: Path) -> None:
    trainer.save_checkpoint(root / f"step-{trainer.global_step:08d}", weights_only=False)


def _validates_after_this_step(trainer: L.Trainer) -> bool:
    """Whether Lightning validates once the step now ending is done (its own decision, asked of
    the loop: the epoch's last batch, ``val_check_interval``, a stop request)."""
    loop = trainer.fit_loop
    return bool(trainer.enable_validation and loop.epoch_loop._should_check_val_fx(loop._data_fetcher))


def _rows_still_to_log(trainer: L.Trainer, epoch_end: bool) -> list[dict]:
    """The row(s) Lightning writes to the loggers after this point of the current step: the step's
    training row (``log_every_n_steps``) after ``on_train_batch_end``, or the epoch's row
    (epoch-level values) after ``on_train_epoch_end``. A resumed run never logs them again, so a
    checkpoint carries them. What the loggers would receive, computed as Lightning computes it."""
    connector = trainer._logger_connector
    stepped = trainer.fit_loop.epoch_loop._batches_that_stepped
    if epoch_end:
        step = stepped - 1  # Lightning logs epoch-end values at the epoch's last step
    else:
        step = stepped
        # Lightning also logs when should_stop is set (a preemption): the uninterrupted run would not
        if (step + 1) % trainer.log_every_n_steps:
            return []
    metrics = convert_tensors_to_scalars(connector.metrics["log"])
    if not metrics:
        return []
    metrics.setdefault("epoch", trainer.current_epoch)
    return [{"step": step, "metrics": metrics}]


class StepCheckpoint(Checkpoint):
    """Saves a checkpoint after: every ``every_n_steps``-th step, the last batch of each epoch, the
    step that reaches ``max_steps``, and a preemption request (then stops the run).

    A checkpoint is written once everything its step leads to is done, because a resumed run
    continues after it: after the validation that follows the step (the epoch's last step, or
    ``trainer.val_check_interval``: in ``on_validation_end``, so its metrics, early stopping and the
    best epoch are in it), after the epoch's end (its last step: ``on_train_epoch_end``), else at
    the batch end. Lightning resumes from each of these points as it would have continued, and the
    reader position is the next batch's.

    Each checkpoint also carries what the run's record needs to continue exactly: how many rows
    ``logs/metrics.csv`` held and the rows Lightning logs for this step after the save, the last
    validation metrics, the count of skipped batches. A resumed run cuts the CSV back to those rows
    (dropping what an interrupted session logged after the checkpoint, which it logs again) and
    restores the rest, so that interrupted-and-resumed writes the files an uninterrupted run writes.
    A run that early stopping had stopped stays stopped.
    """

    def __init__(self, root: Path, every_n_steps: int):
        self.root = root
        self.every_n_steps = every_n_steps
        self.preempted = False
        self._last_saved_step = -1
        self._deferred: str | None = None  # "validation" or "epoch_end": the save waits for it
        self._record: dict = {}
        self._restored: dict | None = None

    # ------------------------------------------------------------------------------ when to save
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._deferred = None
        stream = trainer.datamodule.train_stream
        last_of_epoch = batch.position + 1 == len(stream)
        due = (
            pl_module.preempt_now
            or (self.every_n_steps and trainer.global_step % self.every_n_steps == 0)
            or last_of_epoch
            or trainer.global_step == trainer.max_steps
        )
        if pl_module.preempt_now:
            trainer.should_stop = True
            self.preempted = True
            if not last_of_epoch:  # stop now: no validation of a part of an epoch
                trainer.limit_val_batches = 0
        if not due or trainer.global_step == self._last_saved_step:
            return
        if last_of_epoch:
            self._deferred = "epoch_end"
        elif _validates_after_this_step(trainer):
            self._deferred = "validation"
        else:
            self._save(trainer, pl_module, _rows_still_to_log(trainer, epoch_end=False))

    def on_validation_end(self, trainer, pl_module) -> None:
        if self._deferred == "validation" and not trainer.sanity_checking:
            self._save(trainer, pl_module, [])  # the validation's row is logged already

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if self._deferred == "epoch_end":  # runs after early stopping and the module's epoch end
            self._save(trainer, pl_module, _rows_still_to_log(trainer, epoch_end=True))

    def saves_after_validation(self, trainer) -> bool:
        """Whether the validation now ending will be in a checkpoint of its step."""
        return self._deferred is not None and trainer.global_step != self._last_saved_step

    # ------------------------------------------------------------------------------ saving
    def _save(self, trainer, pl_module, rows_still_to_log: list[dict]) -> None:
        self._deferred = None
        best = _best_epoch(trainer)
        if best is not None:
            best.checkpoint_saving(trainer.global_step)
        csv_rows = None
        if trainer.is_global_zero:
            csv_log = _csv_log(trainer)
            csv_rows = csv_log.rows_on_disk() if csv_log is not None else None
        self._record = {
            "stopped": any(isinstance(c, EarlyStopping) and c.stopped_epoch > 0 for c in trainer.callbacks),
            "csv_rows": csv_rows,
            "rows_still_to_log": rows_still_to_log,
            "val": pl_module.last_metrics.get("val"),
            "skipped_batches": pl_module.skipped_batches,
        }
        save_step_checkpoint(trainer, self.root)
        self._last_saved_step = trainer.global_step
        if best is not None:
            best.checkpoint_saved(trainer)

    def state_dict(self) -> dict:
        return {**self._record, "step": self._last_saved_step}

    def load_state_dict(self, state: dict) -> None:
        self._restored = state
        self._last_saved_step = int(state.get("step", -1))

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        state = checkpoint.get("callbacks", {}).get(self.state_key, {})
        if state.get("stopped"):
            # Early stopping ended training in this epoch-end checkpoint: the epoch counts as
            # completed, as it did once the interrupted run went on (the test logs that epoch).
            progress = checkpoint["loops"]["fit_loop"]["epoch_progress"]
            for counts in (progress["total"], progress["current"]):
                counts["completed"] = counts["processed"]

    # ------------------------------------------------------------------------------ resuming
    def on_fit_start(self, trainer, pl_module) -> None:
        """After a checkpoint's state is restored, before training: the run's record as it was."""
        restored, self._restored = self._restored, None
        if restored is None:
            return
        if restored.get("stopped"):
            trainer.should_stop = True  # early stopping had ended training: test, train no further
        if restored.get("val") is not None:
            pl_module.last_metrics["val"] = restored["val"]
        pl_module.skipped_batches = int(restored.get("skipped_batches", 0))
        csv_log = _csv_log(trainer)
        if trainer.is_global_zero and csv_log is not None and restored.get("csv_rows") is not None:
            csv_log.restore(int(restored["csv_rows"]), restored.get("rows_still_to_log", []))


def _csv_log(trainer: L.Trainer) -> AppendingCSVLogger | None:
    return next((log for log in trainer.loggers if isinstance(log, AppendingCSVLogger)), None)


def _best_epoch(trainer: L.Trainer) -> BestEpoch | None:
    return next((c for c in trainer.callbacks if isinstance(c, BestEpoch)), None)


class BestEpoch(L.Callback):
    """With early stopping: records in ``<checkpoints>/best.json`` the checkpoint whose validation
    gave the lowest ``monitor`` (every rank decides alike: metrics are global), so that fit tests
    those weights and evaluation commands load them. Each validation that ``StepCheckpoint`` saves a
    checkpoint after is a candidate; the record is part of every checkpoint, so a resumed run
    continues it as the checkpoint left it (``best.json`` is rewritten from it)."""

    def __init__(self, root: Path, monitor: str):
        self.root, self.monitor = root, monitor
        self.best: dict | None = None
        self._candidate: dict | None = None
        self._restored = False

    def state_dict(self) -> dict:
        return {"best": self.best}

    def load_state_dict(self, state: dict) -> None:
        self.best, self._restored = state.get("best"), True

    def on_fit_start(self, trainer, pl_module) -> None:
        if not self._restored:  # a fresh run, or a checkpoint written before best epochs were in it
            self.best = ckpt.read_best(self.root)
        elif trainer.is_global_zero:  # best.json as the checkpoint knew it
            if self.best is not None:
                ckpt.write_best(self.root, self.best)
            else:
                (self.root / ckpt.BEST_FILE).unlink(missing_ok=True)
        self._restored = False

    def on_validation_end(self, trainer, pl_module) -> None:
        self._candidate = None
        if trainer.sanity_checking or trainer.state.fn != "fit":
            return
        value = trainer.callback_metrics.get(self.monitor)
        checkpointing = next((c for c in trainer.callbacks if isinstance(c, StepCheckpoint)), None)
        if value is None or checkpointing is None or not checkpointing.saves_after_validation(trainer):
            return  # e.g. a mid-epoch validation at a step without a checkpoint
        self._candidate = {"step": trainer.global_step, "epoch": trainer.current_epoch, "metric": self.monitor,
                           "value": float(value), "val": pl_module.last_metrics.get("val")}  # fmt: skip

    def checkpoint_saving(self, step: int) -> None:
        """The checkpoint of ``step`` is being saved: its validation becomes the best if it is."""
        candidate, self._candidate = self._candidate, None
        if candidate is not None and candidate["step"] == step:
            if self.best is None or candidate["value"] < self.best["value"]:
                self.best = candidate

    def checkpoint_saved(self, trainer) -> None:
        if trainer.is_global_zero and self.best is not None and self.best["step"] == trainer.global_step:
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
        if trainer.global_step % self.every_n_steps:  # the steps whose loss the module logged
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

    def state_dict(self) -> dict:
        # a run resumed after its last epoch reports that epoch's ids as the uninterrupted run did
        # (an epoch resumed part-way counts the windows read after the checkpoint)
        return {"last_epoch": self.last_epoch}

    def load_state_dict(self, state: dict) -> None:
        self.last_epoch = state.get("last_epoch")

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
