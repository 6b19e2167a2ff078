"""The multi-task recommender: TorchRec embedding tables → interaction → tower → task heads.

    sparse: KeyedJaggedTensor (keys = feature names, stride B)
        └─ EmbeddingBagCollection ─▶ pooled (B, D_f) per feature, selected BY NAME in config order
    dense: (B, num_dense) ───────────┐
    interaction([pooled...], dense) ─▶ (B, I) ─▶ tower ─▶ T × (B, H) ─▶ heads ─▶ outputs (B, T)

The embedding collection is built on ``meta`` by default: the trainer's sharder decides where each
table lives and materialises it. Features are always selected by name because a sharded
collection returns them in plan order (a plan change would otherwise silently permute inputs).
"""

from __future__ import annotations

import torch
from torch import nn
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from models.balancing import build_balancer
from models.config import ModelConfig, TaskConfig
from models.heads import TaskHeads, task_loss_sums, task_losses
from models.interaction import build_interaction
from models.layers import l2_penalty_gradient
from models.towers import build_tower


class MultiTaskModel(nn.Module):
    """Args:
    tables: embedding tables (TorchRec configs); each lists the features it serves.
    feature_names: sparse features in the order the interaction sees them.
    num_dense: number of dense input features.
    tasks: the tasks, in output column order.
    cfg: dense architecture.
    embedding_device: where the tables are created (``meta`` when a sharder will place them).
    """

    def __init__(
        self,
        tables: list[EmbeddingBagConfig],
        feature_names: list[str],
        num_dense: int,
        tasks: list[TaskConfig],
        cfg: ModelConfig,
        embedding_device: torch.device | str = "meta",
    ):
        super().__init__()
        self.feature_names = list(feature_names)
        self.task_names = [task.name for task in tasks]
        self.loss_names = [task.loss_name for task in tasks]
        dim_of_feature = {name: table.embedding_dim for table in tables for name in table.feature_names}
        self.embeddings = EmbeddingBagCollection(tables=tables, device=torch.device(embedding_device))
        self.interaction = build_interaction(
            cfg, [dim_of_feature[name] for name in self.feature_names], num_dense
        )
        self.tower = build_tower(cfg, self.interaction.out_dim, len(tasks), task_names=self.task_names)
        self.heads = TaskHeads(tasks, self.tower.out_dim, self.tower.probability_products)
        self.output_kinds = self.heads.output_kinds
        self.balancer = build_balancer(cfg, tasks)
        self.embedding_l2 = cfg.embedding_l2

    def forward(self, sparse: KeyedJaggedTensor, dense: torch.Tensor) -> torch.Tensor:
        """Returns (B, T) outputs; their meaning per task is ``self.output_kinds`` (see models.heads)."""
        pooled = self.embeddings(sparse).to_dict()
        features = [pooled[name] for name in self.feature_names]
        if self.training and self.embedding_l2 > 0:
            features = [l2_penalty_gradient(e, self.embedding_l2) for e in features]
        return self.dense_forward(features, dense)

    def dense_forward(self, pooled: list[torch.Tensor], dense: torch.Tensor) -> torch.Tensor:
        """Interaction → tower → heads: (B, T) outputs from the pooled embeddings (config order)
        and the dense features. One function, so ``compile_dense`` fuses across module borders."""
        return self.heads(self.tower(self.interaction(pooled, dense)))

    def compile_dense(self) -> None:
        """Compiles ``dense_forward`` with ``torch.compile`` (inductor): element-wise ops (ReLU,
        gate softmax and mixing, bounds) fuse into a few kernels around the matmuls. The parameters
        and the state dict are unchanged; the embedding lookups stay eager (fbgemm kernels)."""
        self.dense_forward = torch.compile(self.dense_forward)

    def losses(self, outputs, labels, label_mask, weights) -> torch.Tensor:
        """Per-task mean losses (T,)."""
        return task_losses(outputs, labels, label_mask, weights, self.output_kinds, self.loss_names)

    def loss_sums(self, outputs, labels, label_mask, weights) -> torch.Tensor:
        """Per-task weighted loss sums and weight sums (2, T) (see ``models.heads.task_loss_sums``)."""
        return task_loss_sums(outputs, labels, label_mask, weights, self.output_kinds, self.loss_names)
