"""The multi-task recommender: TorchRec embedding tables → interaction → tower → task heads.

    sparse: KeyedJaggedTensor (keys = feature names, stride B)
        └─ EmbeddingBagCollection ─▶ pooled (B, D_f) per feature, selected BY NAME in config order
    sequences: KeyedJaggedTensor (histories + the single ids sharing their tables), or None
        └─ EmbeddingCollection ─▶ unpooled (N, D) per feature ─▶ SequenceEncoder(history, candidate)
           ─▶ one interest vector (B, D) per sequence, in the sequence's slot of the feature order
    dense: (B, num_dense) ───────────┐
    interaction([pooled...], dense) ─▶ (B, I) ─▶ tower ─▶ T × (B, H) ─▶ heads ─▶ outputs (B, T)

The embedding collection is built on ``meta`` by default: the trainer's sharder decides where each
table lives and materialises it. Features are always selected by name because a sharded
collection returns them in plan order (a plan change would otherwise silently permute inputs).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn
from torchrec.modules.embedding_configs import BaseEmbeddingConfig
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from towerrec.models.balancing import build_balancer
from towerrec.models.config import ModelConfig, TaskConfig
from towerrec.models.heads import TaskHeads, task_loss_sums, task_losses
from towerrec.models.interaction import build_interaction
from towerrec.models.layers import l2_penalty_gradient
from towerrec.models.sequence import SequenceEncoder
from towerrec.models.tables import ShardableTables
from towerrec.models.towers import build_tower


@dataclass(frozen=True)
class SequenceFeature:
    """A behaviour sequence the model encodes: its candidate feature, length cap and side lists."""

    candidate: str
    max_length: int
    side: list[str] = field(default_factory=list)


class MultiTaskModel(ShardableTables):
    """Args:
    tables: embedding tables (TorchRec configs); each lists the features it serves. Pooled tables
        (``EmbeddingBagConfig``) go to an EmbeddingBagCollection, unpooled ones (``EmbeddingConfig``:
        sequence tables) to an EmbeddingCollection.
    feature_names: features in the order the interaction sees them (a sequence's slot holds its
        interest vector; aligned side lists have no slot).
    num_dense: number of dense input features.
    tasks: the tasks, in output column order.
    cfg: dense architecture.
    embedding_device: where the tables are created (``meta`` when a sharder will place them).
    sequences: the sequence features to encode (name → candidate, max length, side lists).
    input_names: every feature the tables serve, in the order serving takes them (config order).
    mean_pooled: multi-hot features pooled by their mean: the tables sum (see
        ``towerrec.models.builder.embedding_tables``) and ``mean_of_bags`` divides by the bag sizes.
    tower: your own tower instead of ``model.tower``'s: ``tower(input_dim, num_tasks)`` returns a
        module with the interface ``towerrec.models.towers`` documents (``forward(x) -> T × (B, H)``,
        ``out_dim``, ``probability_products``, ``shared_parameters()``, ``last_shared_parameters()``).
    """

    def __init__(
        self,
        tables: list[BaseEmbeddingConfig],
        feature_names: list[str],
        num_dense: int,
        tasks: list[TaskConfig],
        cfg: ModelConfig,
        embedding_device: torch.device | str = "meta",
        sequences: dict[str, SequenceFeature] | None = None,
        input_names: list[str] | None = None,
        mean_pooled: list[str] | None = None,
        tower: Callable[[int, int], nn.Module] | None = None,
    ):
        super().__init__()
        self.feature_names = list(feature_names)
        self.input_names = list(input_names or [name for table in tables for name in table.feature_names])
        self.sequences = dict(sequences or {})
        self.mean_pooled = list(mean_pooled or [])
        self.task_names = [task.name for task in tasks]
        self.loss_names = [task.loss_name for task in tasks]
        sequence_lists = [name for seq, f in self.sequences.items() for name in (seq, *f.side)]
        self.init_tables(tables, sequence_lists, self.mean_pooled, embedding_device)
        self.sequence_encoders = nn.ModuleDict()
        dim_of_feature = self.dim_of_feature
        for name, feature in self.sequences.items():
            self.sequence_encoders[name] = SequenceEncoder(
                dim_of_feature[name], feature.max_length, cfg.sequence
            )
        self.pooled_names = [name for name in self.feature_names if name not in self.sequences]
        self.interaction = build_interaction(
            cfg, [dim_of_feature[name] for name in self.feature_names], num_dense
        )
        self.tower = (
            tower(self.interaction.out_dim, len(tasks))
            if tower is not None
            else build_tower(cfg, self.interaction.out_dim, len(tasks), task_names=self.task_names)
        )
        self.heads = TaskHeads(tasks, self.tower.out_dim, self.tower.probability_products)
        self.output_kinds = self.heads.output_kinds
        self.balancer = build_balancer(cfg, tasks)
        self.embedding_l2 = cfg.embedding_l2

    def forward(
        self, sparse: KeyedJaggedTensor, dense: torch.Tensor, sequences: KeyedJaggedTensor | None = None
    ) -> torch.Tensor:
        """Returns (B, T) outputs; their meaning per task is ``self.output_kinds`` (see models.heads)."""
        features, histories = self.embed(sparse, sequences)
        features = [features[name] for name in self.pooled_names]
        if self.training and self.embedding_l2 > 0:
            features = [l2_penalty_gradient(e, self.embedding_l2) for e in features]
        return self.dense_forward(features, dense, sequence_inputs(self.sequences, histories))

    def dense_forward(
        self, pooled: list[torch.Tensor], dense: torch.Tensor, sequences: list | tuple = ()
    ) -> torch.Tensor:
        """Sequence encoders → interaction → tower → heads: (B, T) outputs from the pooled
        embeddings (``pooled_names`` order), the dense features and each sequence's (values,
        lengths). One function, so ``compile_dense`` fuses across module borders."""
        return dense_outputs(self, pooled, dense, sequences)

    def compile_dense(self) -> None:
        """Compiles ``dense_forward`` with ``torch.compile`` (inductor): element-wise ops (ReLU,
        gate softmax and mixing, bounds) fuse into a few kernels around the matmuls. The parameters
        and the state dict are unchanged; the embedding lookups stay eager (fbgemm kernels)."""
        self.dense_forward = torch.compile(self.dense_forward)

    def losses(self, outputs, labels, label_mask, weights) -> torch.Tensor:
        """Per-task mean losses (T,)."""
        return task_losses(outputs, labels, label_mask, weights, self.output_kinds, self.loss_names)

    def loss_sums(self, outputs, labels, label_mask, weights) -> torch.Tensor:
        """Per-task weighted loss sums and weight sums (2, T) (see ``towerrec.models.heads.task_loss_sums``)."""
        return task_loss_sums(outputs, labels, label_mask, weights, self.output_kinds, self.loss_names)


def dense_outputs(
    model, pooled: list[torch.Tensor], dense: torch.Tensor, sequences: list | tuple
) -> torch.Tensor:
    """The dense part of ``model`` (a MultiTaskModel, or the serving module holding the same
    submodules): each sequence's interest vector against its candidate, then interaction → tower
    → heads. The one implementation, for training, evaluation and the exported program."""
    by_name = dict(zip(model.pooled_names, pooled))
    for (name, feature), (values, lengths) in zip(model.sequences.items(), sequences):
        by_name[name] = model.sequence_encoders[name](values, lengths, by_name[feature.candidate])
    features = [by_name[name] for name in model.feature_names]
    return model.heads(model.tower(model.interaction(features, dense)))


def sequence_inputs(sequences: dict[str, SequenceFeature], histories: dict[str, tuple]) -> list:
    """(values (N, D), lengths (B,)) of each sequence, its side lists' embeddings added position
    by position (``histories``: feature → its unpooled embeddings and lengths)."""
    inputs = []
    for name, feature in sequences.items():
        values, lengths = histories[name]
        for side in feature.side:
            values = values + histories[side][0]
        inputs.append((values, lengths))
    return inputs
