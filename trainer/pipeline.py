"""TorchRec's ``TrainPipelineSparseDist`` inside Lightning (``trainer.train_pipeline: sparse_dist``).

On CUDA the pipeline overlaps the next batch's host-to-device copy (from pinned memory,
``_next_batch``) and the embedding input all-to-all with the current batch's forward/backward. It owns the data iterator, so Lightning is
given one *ticket* per batch instead of the batches: every ``training_step`` trains exactly one
batch (the first call fills the pipeline, the last ones drain it), so epochs, validation, the
reader position in checkpoints and exact resume behave as in the plain Lightning step.

Our steps run inside the pipeline's hooks: ``_backward`` agrees with the other ranks on non-finite
losses and preemption, combines the task losses (balancing, PCGrad, GradNorm) and skips backward
for a skipped batch; the optimizer adapter clips the dense gradients and steps.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torchrec.distributed.train_pipeline import TrainPipelineSparseDist

from towerrec.data.batch import Batch
from towerrec.data.reader import BatchStream


@dataclass
class Ticket:
    """What Lightning sees per training step in pipelined mode."""

    position: int
    batch_size: int


class Tickets:
    """One ticket per batch of the stream's current epoch; the real batches go to the pipeline."""

    def __init__(self, stream: BatchStream):
        self.stream = stream
        self.batches: Iterator | None = None

    def __len__(self) -> int:
        return len(self.stream)

    def __iter__(self) -> Iterator[Ticket]:
        self.batches = iter(self.stream)  # fixes epoch and start position (resume)
        start = self.stream.consumed
        return (Ticket(p, self.stream.batch_rows(p)) for p in range(start, len(self.stream)))

    def state_dict(self):
        return self.stream.state_dict()

    def load_state_dict(self, state) -> None:
        self.stream.load_state_dict(state)


class _OptimizerAdapter:
    """What the pipeline calls ``optimizer``: the module's dense step (``MultiTaskModule.dense_step``:
    clipping, Lightning's optimizer wrapper so that ``global_step`` advances, the schedule)."""

    def __init__(self, module):
        self.module = module

    def zero_grad(self) -> None:
        self.module.optimizers().zero_grad()

    def step(self) -> None:
        self.module.dense_step()


class LightningSparseDistPipeline(TrainPipelineSparseDist):
    def __init__(self, module, device: torch.device):
        super().__init__(
            model=module.model, optimizer=_OptimizerAdapter(module), device=device, execute_all_batches=True
        )
        self.module = module

    def _next_batch(self, dataloader_iter: Iterator[Batch]) -> Batch | None:
        """The next batch, pinned when the pipeline copies it to a GPU (the copy then runs on the
        copy stream while the host goes on; from pageable memory the host would wait for it)."""
        batch = super()._next_batch(dataloader_iter)
        return None if batch is None else batch.pinned_for(self._device)

    def _backward(self, loss_sums: torch.Tensor) -> None:
        batch = self.batches[0]
        self.module.current_position = batch.position
        self.module.backward_and_reduce(
            self.module.combined_loss(self.module.step_loss_sums(loss_sums), batch.batch_size)
        )
