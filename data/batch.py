"""The training batch: sparse ids as a TorchRec KeyedJaggedTensor plus dense features and labels.

Shapes (B = rows in the batch, F = dense features, T = tasks)::

    sparse      KeyedJaggedTensor, keys = sparse feature names, stride B
    dense       (B, F) float32
    labels      (B, T) float32
    label_mask  (B, T) float32   1 where the task's label counts (0: padding row, masked task, bad row)
    weights     (B,)   float32   per-row sample weight (0 for padding rows)
    row_id      (B,)   int64     position of the row in the epoch's row sequence (its position in the split
                                 when the stream is not shuffled, as in evaluation); -1 for padding rows
    sequences   KeyedJaggedTensor or None: the ids of features on sequence tables (looked up unpooled:
                behaviour histories, oldest first, and the single-valued ids sharing their tables)
    group       (B,) int64 or None: the user of each row, as stored (evaluation batches; GAUC groups by it)
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor
from torchrec.streamable import Pipelineable


@dataclass
class Batch(Pipelineable):
    sparse: KeyedJaggedTensor
    dense: torch.Tensor
    labels: torch.Tensor
    label_mask: torch.Tensor
    weights: torch.Tensor
    row_id: torch.Tensor
    sequences: KeyedJaggedTensor | None = None
    position: int = -1
    """Index of this batch within its epoch on this rank (the reader position after it is consumed
    is ``position + 1``)."""
    group: torch.Tensor | None = None
    """(B,) int64: each row's user as stored (``ReadSpec.group_column``), for GAUC; None in training."""

    @property
    def batch_size(self) -> int:
        return self.dense.shape[0]

    def to(self, device: torch.device, non_blocking: bool = False) -> Batch:
        return Batch(
            sparse=self.sparse.to(device=device, non_blocking=non_blocking),
            dense=self.dense.to(device=device, non_blocking=non_blocking),
            labels=self.labels.to(device=device, non_blocking=non_blocking),
            label_mask=self.label_mask.to(device=device, non_blocking=non_blocking),
            weights=self.weights.to(device=device, non_blocking=non_blocking),
            row_id=self.row_id.to(device=device, non_blocking=non_blocking),
            sequences=None
            if self.sequences is None
            else self.sequences.to(device=device, non_blocking=non_blocking),
            position=self.position,
            group=self.group,
        )

    def record_stream(self, stream: torch.Stream) -> None:
        self.sparse.record_stream(stream)
        if self.sequences is not None:
            self.sequences.record_stream(stream)
        for tensor in (self.dense, self.labels, self.label_mask, self.weights, self.row_id):
            tensor.record_stream(stream)

    def pinned_for(self, device: torch.device) -> Batch:
        """This batch in page-locked host memory when it is about to be copied to a CUDA device
        (a ``non_blocking`` copy from pageable memory blocks the host until it is done: no overlap),
        else itself (a CPU run copies nothing)."""
        return self.pin_memory() if device.type == "cuda" else self

    def pin_memory(self) -> Batch:
        return Batch(
            sparse=self.sparse.pin_memory(),
            dense=self.dense.pin_memory(),
            labels=self.labels.pin_memory(),
            label_mask=self.label_mask.pin_memory(),
            weights=self.weights.pin_memory(),
            row_id=self.row_id.pin_memory(),
            sequences=None if self.sequences is None else self.sequences.pin_memory(),
            position=self.position,
            group=self.group,
        )

    def with_sampled_ids(self, name: str, ids: torch.Tensor, unpooled: bool) -> Batch:
        """This batch with feature ``name`` added: one id of ``ids`` (S,) on each of the first S
        rows, none on the others (S <= B), in ``sequences`` when ``unpooled`` (a sequence table's
        feature) else in ``sparse``. Retrieval's uniformly sampled negative items travel so: through
        the same sharded lookup as the batch's own ids."""
        lengths = torch.zeros(self.batch_size, dtype=torch.int32)
        lengths[: len(ids)] = 1
        target = self.sequences if unpooled else self.sparse
        extended = KeyedJaggedTensor(
            keys=[*target.keys(), name],
            values=torch.cat([target.values(), ids.to(target.values().dtype)]),
            lengths=torch.cat([target.lengths(), lengths.to(target.lengths().dtype)]),
            stride=self.batch_size,
        )
        if unpooled:
            return dataclasses.replace(self, sequences=extended)
        return dataclasses.replace(self, sparse=extended)
