"""The collectives evaluation metrics use (``towerrec.trainer.metrics.Collectives``) over a
process group: sums and maxima of fixed-size tensors, and routing rows to the rank that owns them
(one all-to-all per tensor: each row crosses the network once)."""

from __future__ import annotations

import torch
import torch.distributed as dist


class ProcessGroupCollectives:
    """``Collectives`` of ``world_size`` ranks in ``process_group``; tensors travel on ``device``
    (NCCL needs CUDA tensors; gloo takes CPU ones) and come back on the CPU."""

    def __init__(self, world_size: int, process_group, device: torch.device):
        self.world_size = world_size
        self.process_group = process_group
        self.device = device

    def _all_reduce(self, tensor: torch.Tensor, op) -> torch.Tensor:
        if self.world_size == 1:
            return tensor
        total = tensor.to(self.device, copy=True)
        dist.all_reduce(total, op=op, group=self.process_group)
        return total.cpu()

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        return self._all_reduce(tensor, dist.ReduceOp.SUM)

    def all_reduce_max(self, tensor: torch.Tensor) -> torch.Tensor:
        return self._all_reduce(tensor, dist.ReduceOp.MAX)

    def route(self, destination: torch.Tensor, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        """Row i of each tensor (same number of rows) goes to rank ``destination[i]``; returns the
        rows this rank receives, rank 0's first."""
        if self.world_size == 1:
            return list(tensors)
        order = torch.argsort(destination, stable=True)
        send = torch.bincount(destination, minlength=self.world_size)
        receive_on_device = torch.empty_like(send, device=self.device)
        dist.all_to_all_single(receive_on_device, send.to(self.device), group=self.process_group)
        receive = receive_on_device.cpu()
        out = []
        for tensor in tensors:
            gathered = torch.empty(
                (int(receive.sum()), *tensor.shape[1:]), dtype=tensor.dtype, device=self.device
            )
            dist.all_to_all_single(
                gathered,
                tensor[order].contiguous().to(self.device),
                output_split_sizes=receive.tolist(),
                input_split_sizes=send.tolist(),
                group=self.process_group,
            )
            out.append(gathered.cpu())
        return out
