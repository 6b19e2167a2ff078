"""Which parts of a model are embedding tables, and plain-torch lookups of them outside training.

A model's tables are whatever TorchRec collections it holds (``EmbeddingBagCollection`` for pooled
features, ``EmbeddingCollection`` for unpooled ones), under any attribute name: the sharder, the
fused optimizer, table initialisation and checkpoints find them by type here, never by a model's
attribute names. Once sharded, a table is recognised by TorchRec's own naming of a collection's
tables in state-dict keys (``...embedding_bags.<table>.weight``, ``...embeddings.<table>.weight``).

Training looks tables up through the (sharded) collections themselves. Everything else (the
serving program, ``recommend``'s scoring, the item index of a retrieval model) uses one
``TableLookup`` over the unsharded model's weights::

    lookup = TableLookup.of(model)
    bags = lookup.pooled("genres", values, lengths)      # (B, D): sum, or mean for pooling: mean
    history = lookup.unpooled("hist_items", values)      # (N, D): one row per id
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn
from torchrec.modules.embedding_configs import BaseEmbeddingConfig, EmbeddingBagConfig
from torchrec.modules.embedding_modules import EmbeddingBagCollection, EmbeddingCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

COLLECTIONS = (EmbeddingBagCollection, EmbeddingCollection)
TABLE_CONTAINERS = ("embedding_bags", "embeddings")
"""How TorchRec's collections (sharded or not) name the module holding their tables."""


def table_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Every embedding table parameter of an unsharded model, wherever its collections sit."""
    return [p for module in model.modules() if isinstance(module, COLLECTIONS) for p in module.parameters()]


def dense_named_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """(name, parameter) of everything but the tables of an unsharded model."""
    tables = {id(p) for p in table_parameters(model)}
    return [(name, p) for name, p in model.named_parameters() if id(p) not in tables]


def table_of_key(key: str, table_names: Iterable[str]) -> str | None:
    """The table whose weight a (possibly wrapped or sharded) state-dict key is, else None."""
    parts = key.split(".")
    if len(parts) >= 3 and parts[-1] == "weight" and parts[-3] in TABLE_CONTAINERS:
        return parts[-2] if parts[-2] in set(table_names) else None
    return None


def mean_of_bags(sums: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Sum-pooled bags (B, D) → their means (an empty bag stays 0, as fbgemm's mean pooling)."""
    return sums / lengths.clamp_min(1).unsqueeze(1).to(sums.dtype)


class TableLookup(nn.Module):
    """Plain-torch lookups of every feature on an unsharded model's tables: ``nn.EmbeddingBag`` (sum)
    per pooled table, ``nn.Embedding`` per unpooled table, sharing the model's weights.

    Args:
        tables: (config, weight) of each table; a config lists the features it serves.
        mean_pooled: multi-hot features pooled by their mean (the tables sum; see
            ``towerrec.models.builder.embedding_tables``).
    """

    def __init__(
        self, tables: list[tuple[BaseEmbeddingConfig, torch.Tensor]], mean_pooled: Iterable[str] = ()
    ):
        super().__init__()
        self.bags = nn.ModuleDict()
        self.lookups = nn.ModuleDict()
        self.table_of: dict[str, str] = {}
        for config, weight in tables:
            pooled = hasattr(config, "pooling")
            holder = self.bags if pooled else self.lookups
            weight = weight.detach()
            holder[config.name] = (
                nn.EmbeddingBag.from_pretrained(weight, freeze=True, mode="sum")
                if pooled
                else nn.Embedding.from_pretrained(weight, freeze=True)
            )
            self.table_of.update(dict.fromkeys(config.feature_names, config.name))
        self.mean_pooled = set(mean_pooled)

    @classmethod
    def of(cls, model: nn.Module) -> TableLookup:
        """The lookups of ``model``'s collections (``model.mean_pooled`` names its mean-pooled bags)."""
        tables = []
        for module in model.modules():
            if isinstance(module, EmbeddingBagCollection):
                configs, holder = module.embedding_bag_configs(), module.embedding_bags
            elif isinstance(module, EmbeddingCollection):
                configs, holder = module.embedding_configs(), module.embeddings
            else:
                continue
            tables += [(config, holder[config.name].weight) for config in configs]
        return cls(tables, getattr(model, "mean_pooled", ()))

    def is_pooled(self, name: str) -> bool:
        return self.table_of[name] in self.bags

    def pooled(self, name: str, values: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """(B, D) for feature ``name``: its bags' sums or means, or a single id's row on an unpooled
        table. ``values`` (N,) int64 ids, rows concatenated; ``lengths`` (B,) ids per row."""
        table = self.table_of[name]
        if table in self.lookups:
            return self.lookups[table](values)
        offsets = torch.cumsum(lengths, 0) - lengths  # (B,) start of each bag
        sums = self.bags[table](values, offsets)
        return mean_of_bags(sums, lengths) if name in self.mean_pooled else sums

    def unpooled(self, name: str, values: torch.Tensor) -> torch.Tensor:
        """(N, D): the row of every id of feature ``name`` (a sequence's, rows concatenated)."""
        return self.lookups[self.table_of[name]](values)


class ShardableTables(nn.Module):
    """The embedding front end every model shares: an ``EmbeddingBagCollection`` (``embeddings``)
    of the pooled tables and, when there are sequence tables, an ``EmbeddingCollection``
    (``sequence_embeddings``); built on ``meta`` by default for the sharder to place.

    ``embed(sparse, sequences)`` looks every feature up by name (a sharded collection returns
    features in plan order): pooled features and single ids on sequence tables → (B, D) each;
    sequence lists (histories and their aligned side lists) → (values (N, D), lengths (B,)).
    """

    def init_tables(
        self,
        tables: list[BaseEmbeddingConfig],
        sequence_lists: list[str],
        mean_pooled: list[str],
        embedding_device: torch.device | str,
    ) -> None:
        device = torch.device(embedding_device)
        bag_tables = [t for t in tables if isinstance(t, EmbeddingBagConfig)]
        unpooled_tables = [t for t in tables if not isinstance(t, EmbeddingBagConfig)]
        self.embeddings = EmbeddingBagCollection(tables=bag_tables, device=device)
        self.sequence_embeddings = (
            EmbeddingCollection(tables=unpooled_tables, device=device) if unpooled_tables else None
        )
        self.mean_pooled = list(mean_pooled)
        self.sequence_lists = list(sequence_lists)
        self.bag_features = [name for table in bag_tables for name in table.feature_names]
        self.unpooled_singles = [
            name for table in unpooled_tables for name in table.feature_names if name not in sequence_lists
        ]
        self.dim_of_feature = {name: table.embedding_dim for table in tables for name in table.feature_names}

    def is_pooled(self, name: str) -> bool:
        """Whether feature ``name``'s table sums bags (else it is looked up unpooled)."""
        return name not in self.unpooled_singles and name not in self.sequence_lists

    def jagged(self, sparse: KeyedJaggedTensor, sequences: KeyedJaggedTensor | None, name: str):
        """Feature ``name``'s ids in the batch (a JaggedTensor): sequence tables' features travel in
        ``sequences``, the others in ``sparse``."""
        return sparse[name] if self.is_pooled(name) else sequences[name]

    def embed(
        self, sparse: KeyedJaggedTensor, sequences: KeyedJaggedTensor | None
    ) -> tuple[dict[str, torch.Tensor], dict[str, tuple[torch.Tensor, torch.Tensor]]]:
        """(features, histories) of a batch; see the class docstring. By name, no item assignment
        into the collections' outputs and no iteration over them: TorchRec's train pipeline traces
        this code."""
        pooled = self.embeddings(sparse).to_dict()
        features = {name: pooled[name] for name in self.bag_features}
        for name in self.mean_pooled:
            features[name] = mean_of_bags(features[name], sparse[name].lengths())
        histories: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        if self.sequence_embeddings is not None:
            unpooled = self.sequence_embeddings(sequences)
            for name in self.sequence_lists:
                histories[name] = (unpooled[name].values(), unpooled[name].lengths())
            for name in self.unpooled_singles:  # a single id per row on a sequence table: (B, D)
                features[name] = unpooled[name].values()
        return features, histories
