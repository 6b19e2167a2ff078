"""Lightning data module over the Parquet data set: one ``BatchStream`` per split for this rank."""

from __future__ import annotations

import os
from typing import Any

import lightning as L
import torch

from towerrec.data.batch import Batch
from towerrec.data.config import DataConfig
from towerrec.data.dataset import DatasetMeta
from towerrec.data.reader import BatchStream, ReadSpec


class ParquetDataModule(L.LightningDataModule):
    """Train/val/test/predict streams for ``trainer.global_rank`` of ``trainer.world_size``.

    Its ``state_dict`` is the training reader's position, saved in every checkpoint, so a resumed
    run sees exactly the batches an uninterrupted one would.
    """

    def __init__(
        self,
        data: DataConfig,
        seed: int,
        meta: DatasetMeta,
        spec: ReadSpec,
        predict_split: str | None = None,
        pipelined: bool = False,
        eval_spec: ReadSpec | None = None,
    ):
        """``eval_spec``: what evaluation streams read (``spec`` plus the rows' users for GAUC)."""
        super().__init__()
        self.pipelined = pipelined
        self.tickets = None
        self.data = data
        self.seed = seed
        self.meta = meta
        self.spec = spec
        self.eval_spec = eval_spec or spec
        self.predict_split = predict_split
        self.train_stream: BatchStream | None = None
        self._pending_state: dict[str, Any] | None = None

    def _stream(self, split: str, train: bool, role: str) -> BatchStream:
        return BatchStream(
            self.meta,
            split,
            self.spec if train else self.eval_spec,
            batch_size=self.data.batch_size if train else self.data.eval_batch_size,
            rank=self.trainer.global_rank,
            world_size=self.trainer.world_size,
            seed=self.seed,
            shuffle=train,
            window_rows=self.data.shuffle_window_rows,
            background_decode=decode_in_background(self.data.background_decode),
            drop_bag_ids=train,
            days=self.data.days(role),
        )

    def train_dataloader(self):
        """The training stream, or with a TorchRec train pipeline (which reads the stream itself)
        one ticket per batch (trainer.pipeline.Tickets)."""
        if self.train_stream is None:
            self.train_stream = self._stream(self.data.train_split, train=True, role="train")
            if self._pending_state is not None:
                self.train_stream.load_state_dict(self._pending_state["train"])
                self.train_stream.skipped_bad_rows = int(self._pending_state.get("skipped_bad_rows", 0))
        # Lightning asks for the loader (and its length) at every epoch start: an epoch finished on
        # another layout (a resume on another world size) is followed by one of a different length
        self.train_stream.advance_if_finished()
        if self.pipelined and self.tickets is None:
            from towerrec.trainer.pipeline import Tickets

            self.tickets = Tickets(self.train_stream)
        return self.tickets if self.pipelined else self.train_stream

    def val_dataloader(self):
        return self._stream(self.data.val_split, train=False, role="val") if self.data.val_split else []

    def test_dataloader(self) -> BatchStream:
        return self._stream(self.data.test_split, train=False, role="test")

    def predict_dataloader(self) -> BatchStream:
        split = self.predict_split or self.data.test_split
        return self._stream(split, train=False, role=split_role(self.data, split))

    def transfer_batch_to_device(self, batch: Any, device: torch.device, dataloader_idx: int) -> Any:
        """A batch's copy to a GPU: from pinned memory and non-blocking (Lightning's own copy is
        blocking for anything but a bare tensor), on the current stream, so the step sees it. A
        batch already on the device is handed over as it is (Lightning's generic copy walks it
        field by field every step)."""
        if isinstance(batch, Batch):
            if batch.dense.device == device:
                return batch
            return batch.pinned_for(device).to(device, non_blocking=device.type == "cuda")
        return super().transfer_batch_to_device(batch, device, dataloader_idx)

    def state_dict(self) -> dict[str, Any]:
        """The training reader's position and the bad rows it skipped so far (``data.bad_rows: skip``)."""
        if self.train_stream is None:
            return {}
        return {
            "train": self.train_stream.state_dict(),
            "skipped_bad_rows": self.train_stream.skipped_bad_rows,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "train" not in state:
            return
        if self.train_stream is not None:
            self.train_stream.load_state_dict(state["train"])
            self.train_stream.skipped_bad_rows = int(state.get("skipped_bad_rows", 0))
        else:
            self._pending_state = state


def split_role(data: DataConfig, split: str) -> str | None:
    """Whose days a split other than the configured three is read with: ``test`` for the test
    split, ``val`` and ``train`` likewise, None (every day) for another split."""
    for role, name in (("test", data.test_split), ("val", data.val_split), ("train", data.train_split)):
        if split == name:
            return role
    return None


def decode_in_background(setting: bool | None) -> bool:
    """``data.background_decode``, with ``None`` resolved: a reader thread only where a CPU is spare."""
    if setting is not None:
        return setting
    processes_on_node = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return torch.get_num_threads() * processes_on_node < len(os.sched_getaffinity(0))
