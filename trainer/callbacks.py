"""Callbacks: step/epoch checkpoints, preemption (save and stop), throughput in the progress bar."""

from __future__ import annotations

import time
from pathlib import Path

import lightning as L

from trainer.errors import ReplicasDiverged


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
