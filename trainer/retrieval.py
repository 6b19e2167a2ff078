"""Training a two-tower retrieval model (``model.objective: retrieval``) with the multi-task
module's machinery: the same strategy (planner, sharded tables, fused optimizers), checkpoints,
exact resume, skip-on-non-finite and preemption; only the model, its loss and evaluation differ.

A step: every rank embeds its rows (queries: the user vectors; targets: each row's item, or with
``all_positions`` each history event's next item), gathers the items of every rank's rows (with
gradient: a rank's item vectors learn from every rank's queries) and its sampled items, and sums
the sampled-softmax loss of its own queries against all of them. ``combined_loss`` divides by the
global batch's weight and the dense all-reduce averages: the update of W ranks × B rows is that of
one rank × W·B rows (tests/trainer/test_multirank.py).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np
import torch

from towerrec.data.batch import Batch
from towerrec.data.reader import SampledIds
from towerrec.models.balancing import FixedWeights
from towerrec.models.builder import build_retrieval_model, embedding_tables, retrieval_features
from towerrec.models.config import ModelConfig, TaskConfig
from towerrec.models.retrieval import NEGATIVES_SUFFIX, TowerOutputs, TwoTowerModel, sampled_softmax_sums
from towerrec.trainer.config import Config
from towerrec.trainer.module import MultiTaskModule, PipelinedMultiTaskModule

HIT_K = 10
"""The k of the in-batch hit rate reported by evaluation during fit."""


def sampled_ids_spec(cfg: Config, table_rows: dict[str, int]) -> SampledIds | None:
    """What the reader draws for a retrieval config's sampled negatives (None without them)."""
    count = cfg.model.retrieval.num_sampled_negatives
    if cfg.model.objective != "retrieval" or not count:
        return None
    item = next(f for f in cfg.data.sparse if f.name == cfg.recommend.item_feature)
    return SampledIds(
        item.name + NEGATIVES_SUFFIX,
        count,
        table_rows[item.name],
        unpooled=item.table_name in cfg.data.sequence_tables,
    )


class RetrievalTrainingModel(TwoTowerModel):
    """A TwoTowerModel whose forward takes a Batch (the form TorchRec's train pipelines call and
    trace) and returns its local tower outputs; ``loss_sums`` turns them into the loss. ``gather``
    (set by the module once the process group exists) concatenates a tensor over ranks, with
    gradient; ``item_log_frequency`` (N,) is each item's log share of the training rows (logQ)."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.gather = _identity
        self.logq_correction = True
        self.in_batch = True
        self.register_buffer("item_log_frequency", torch.zeros(0), persistent=False)
        self.balancer = FixedWeights([TaskConfig("retrieval")], ModelConfig())

    def forward(self, batch: Batch) -> tuple[tuple, None]:
        """This rank's tower outputs (``TowerOutputs`` as a tuple) and the batch's row weights: the
        part TorchRec's pipeline traces; ``loss_sums`` gathers and scores them."""
        out = self.training_outputs(batch.sparse, batch.dense, batch.sequences, batch.weights)
        return (*(getattr(out, f.name) for f in dataclasses.fields(out)), batch.weights), None

    def loss_sums(self, local: tuple) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss sums (2, 1), sums with hits (3, 1)) of ``forward``'s outputs: each rank's queries
        against the candidates of every rank (``gather``)."""
        *fields, row_weights = local
        out = TowerOutputs(*fields)
        parts, ids, valid = [], [], []
        if self.in_batch:
            parts.append(self.gather(out.items))
            ids.append(self.gather(out.item_ids))
            valid.append(self.gather(row_weights) > 0)
        num_in_batch = valid[0].sum() if valid else 0  # a tensor: no host sync
        num_sampled = 0
        if out.sampled is not None:
            parts.append(self.gather(out.sampled))
            ids.append(self.gather(out.sampled_ids))
            valid.append(torch.ones_like(ids[-1], dtype=torch.bool))
            num_sampled = len(ids[-1])
        candidate_ids = torch.cat(ids)
        sums = sampled_softmax_sums(
            out.users,
            out.query_weights,
            out.targets,
            out.target_ids,
            self.log_expected_counts(out.target_ids, num_in_batch, num_sampled),
            torch.cat(parts),
            candidate_ids,
            self.log_expected_counts(candidate_ids, num_in_batch, num_sampled),
            torch.cat(valid),
            self.temperature,
            k=HIT_K,
        )
        return sums[:2], sums

    def log_expected_counts(self, ids: torch.Tensor, num_in_batch, num_sampled: int) -> torch.Tensor:
        """log E[times item ``ids`` is among the candidates]: ``num_in_batch`` draws from the
        training frequency plus ``num_sampled`` uniform draws over the table (0 without correction)."""
        if not self.logq_correction:
            return torch.zeros(ids.shape, device=ids.device)
        num_items = max(len(self.item_log_frequency) - 1, 1)
        expected = num_in_batch * self.item_log_frequency[ids].exp() + num_sampled / num_items
        return expected.clamp_min(1e-30).log()


def _identity(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


def item_log_frequency(counts: np.ndarray) -> torch.Tensor:
    """(N,) log share of the training rows of each item row; an item never trained on (and row 0)
    counts once, so its log is finite."""
    counts = np.maximum(np.asarray(counts, dtype=np.float64), 1.0)
    return torch.from_numpy(np.log(counts / counts.sum())).float()


class RetrievalModule(MultiTaskModule):
    """Args:
    cfg: the run configuration (``model.objective: retrieval``).
    table_rows: rows of each sparse feature's table.
    item_counts: (N,) training rows per item row (``towerrec.data.reader.count_rows``), for logQ.
    """

    def __init__(self, cfg: Config, table_rows: dict[str, int], item_counts: np.ndarray):
        super().__init__(cfg, table_rows)
        features = retrieval_features(
            cfg.data.sparse, cfg.recommend.item_feature, cfg.model.retrieval.num_sampled_negatives
        )
        item_rows = table_rows[cfg.recommend.item_feature]
        rows = {f.name: table_rows.get(f.name, item_rows) for f in features}
        self.tables = embedding_tables(features, rows, cfg.sharding.embedding_precision)
        self.task_names = ["retrieval"]
        self.task_types = ["retrieval"]
        self.item_counts = item_counts
        self._eval_sums: torch.Tensor | None = None

    def build_model(self) -> RetrievalTrainingModel:
        torch.manual_seed(self.cfg.seed)
        model = build_retrieval_model(
            sparse=self.cfg.data.sparse,
            dense=self.cfg.data.dense,
            model=self.cfg.model,
            item_feature=self.cfg.recommend.item_feature,
            table_rows=self.table_rows,
            precision=self.cfg.sharding.embedding_precision,
            embedding_device="meta",
            model_class=RetrievalTrainingModel,
        )
        model.logq_correction = self.cfg.model.retrieval.logq_correction
        model.in_batch = self.cfg.model.retrieval.in_batch_negatives
        model.item_log_frequency = item_log_frequency(self.item_counts)
        return model

    def configure_model(self) -> None:
        first = self.model is None
        super().configure_model()
        if first:
            self.inner.gather = self.trainer.strategy.all_gather_autograd

    # ------------------------------------------------------------------------------ evaluation
    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        self._accumulate(batch)

    def test_step(self, batch: Batch, batch_idx: int) -> None:
        self._accumulate(batch)

    def step_loss_sums(self, model_output) -> torch.Tensor:
        return self.inner.loss_sums(model_output)[0]

    def _accumulate(self, batch: Batch) -> None:
        with torch.autocast(self.device.type, enabled=False):
            sums = self.inner.loss_sums(self(batch)[0])[1].detach().double().reshape(-1)
        self._eval_sums = sums if self._eval_sums is None else self._eval_sums + sums

    def _finish_eval(self, stage: str) -> None:
        sums = self._eval_sums if self._eval_sums is not None else torch.zeros(3, dtype=torch.float64)
        self._eval_sums = None
        total = self.trainer.strategy.all_reduce_sum(sums.to(self.device)).cpu()
        count = float(total[1])
        loss = float(total[0]) / count if count else math.nan
        hits = float(total[2]) / count if count else math.nan
        self.last_metrics[stage] = {
            "retrieval": {"loss": loss, f"in_batch_hit_rate@{HIT_K}": hits, "count": count}
        }
        logged = {f"{stage}/loss": loss, f"{stage}/retrieval/in_batch_hit_rate@{HIT_K}": hits}
        self.log_dict({k: v for k, v in logged.items() if not math.isnan(v)}, sync_dist=False)

    def predict_step(self, batch: Batch, batch_idx: int) -> dict[str, Any]:
        with torch.autocast(self.device.type, enabled=False):
            inner = self.inner
            users, items = TwoTowerModel.forward(inner, batch.sparse, batch.dense, batch.sequences)
        scores = (users * items).sum(-1, keepdim=True)
        return {"row_id": batch.row_id.cpu(), "predictions": scores.detach().float().cpu()}


class PipelinedRetrievalModule(RetrievalModule, PipelinedMultiTaskModule):
    """``trainer.train_pipeline: sparse_dist`` for a retrieval model."""
