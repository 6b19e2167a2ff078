"""Two-tower retrieval: users and items as L2-normalised vectors whose inner product ranks items.

Shapes (B rows, D_f a feature's embedding width, L a history's max_length, d = ``model.retrieval.dim``)::

    user side:  side: user features (B, D_f) ─┐  history (N, D) ─▶ HistoryEncoder ─▶ (B, D)
                side: user dense (B, F_u) ─────┴─ concat ─▶ MLP(user_dims) ─▶ Linear(d) ─▶ normalise ─▶ (B, d)
    item side:  item id (B, D) + side: item features + dense ─▶ MLP(item_dims) ─▶ Linear(d) ─▶ normalise ─▶ (B, d)

Training (``sampled_softmax_sums``): each row's user vector scores its own item against candidates:
the items of the whole global batch (gathered across ranks by the trainer) and, optionally, items
drawn uniformly from the item table; a candidate with the row's item id is never a negative; with
logQ correction every logit loses the log of its item's expected count in the candidate set.
With ``all_positions`` the history encoder is trained at every position at once (SASRec, HSTU):
the state after each event predicts the next one, the newest the row's item.

Tables are the shared front end (``towerrec.models.tables.ShardableTables``): built on ``meta``
for the sharder; the history and the item id share one table (``table: t_item``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torchrec.modules.embedding_configs import BaseEmbeddingConfig
from torchrec.sparse.jagged_tensor import JaggedTensor, KeyedJaggedTensor

from towerrec.models.config import ModelConfig, RetrievalConfig
from towerrec.models.layers import MLP
from towerrec.models.multitask import SequenceFeature, sequence_inputs
from towerrec.models.sequence import HistoryEncoder, pad_left
from towerrec.models.tables import ShardableTables

NEGATIVES_SUFFIX = "__sampled"
"""The batch feature carrying a step's uniformly sampled negative items: ``<item feature>__sampled``,
served by the item's table, one id on each of the first S rows (so pooled and unpooled tables alike
give one row per id)."""


class Tower(nn.Module):
    """concat(inputs) ─▶ MLP(dims) ─▶ Linear(dim) ─▶ L2 normalise. Works on (..., in_dim)."""

    def __init__(self, in_dim: int, dims: list[int], dim: int):
        super().__init__()
        self.mlp = MLP(in_dim, dims)
        self.out = nn.Linear(self.mlp.out_dim, dim)

    def forward(self, inputs: list[torch.Tensor]) -> torch.Tensor:
        return F.normalize(self.out(self.mlp(torch.cat(inputs, dim=-1))), dim=-1)


@dataclass
class TowerOutputs:
    """What one rank's batch gives the loss (local to the rank; the trainer gathers candidates).

    users (Q, d) queries and query_weights (Q,): one per row, or per (row, position) with
    ``all_positions`` (Q = B · L); targets (Q, d) / target_ids (Q,): each query's positive item.
    items (B, d) / item_ids (B,): the rows' items, the in-batch candidates. sampled (S, d) /
    sampled_ids (S,): this rank's uniformly drawn items (None without sampled negatives)."""

    users: torch.Tensor
    query_weights: torch.Tensor
    targets: torch.Tensor
    target_ids: torch.Tensor
    items: torch.Tensor
    item_ids: torch.Tensor
    sampled: torch.Tensor | None = None
    sampled_ids: torch.Tensor | None = None


class RetrievalTowers(nn.Module):
    """The user and item towers over looked-up features (no tables of their own: a two-tower model's,
    or a multi-task model's when both train in one run on the same tables).

    Args:
    dims: embedding width of each feature.
    user_features / item_features: the sparse features each tower reads (config order); a user
        history's slot holds its encoding.
    user_dense / item_dense: the dense columns (indices into the batch's dense matrix) of each side.
    histories: the user-side sequences (name → candidate, max length, aligned side lists).
    item_feature: the item id feature (the row's positive item).
    num_sampled: uniformly sampled negatives per rank and step (0: none; see ``NEGATIVES_SUFFIX``).
    cfg: ``model`` (its ``retrieval`` and ``sequence`` sections).
    """

    def __init__(
        self,
        dims: dict[str, int],
        user_features: list[str],
        item_features: list[str],
        user_dense: list[int],
        item_dense: list[int],
        histories: dict[str, SequenceFeature],
        item_feature: str,
        cfg: ModelConfig,
        num_sampled: int = 0,
    ):
        super().__init__()
        retrieval: RetrievalConfig = cfg.retrieval
        self.user_features, self.item_features = list(user_features), list(item_features)
        self.user_dense, self.item_dense = list(user_dense), list(item_dense)
        self.sequences = dict(histories)
        self.item_feature = item_feature
        self.sampled_feature = item_feature + NEGATIVES_SUFFIX if num_sampled else None
        self.num_sampled = num_sampled
        self.all_positions = retrieval.all_positions
        self.temperature = retrieval.temperature
        self.dim = retrieval.dim
        encoder = cfg.sequence
        if retrieval.history_encoder is not None:
            encoder = dataclasses.replace(encoder, encoder=retrieval.history_encoder)
        self.history_encoders = nn.ModuleDict(
            {name: HistoryEncoder(dims[name], f.max_length, encoder) for name, f in self.sequences.items()}
        )
        user_in = sum(dims[name] for name in self.user_features) + len(self.user_dense)
        item_in = sum(dims[name] for name in self.item_features) + len(self.item_dense)
        self.user_tower = Tower(user_in, retrieval.user_dims, retrieval.dim)
        self.item_tower = Tower(item_in, retrieval.item_dims, retrieval.dim)

    def user_vectors(
        self, features: dict[str, torch.Tensor], dense: torch.Tensor, histories: dict[str, tuple]
    ) -> torch.Tensor:
        """(B, d) from looked-up features (``embed`` or ``TableLookup``) and the dense matrix."""
        encoded = dict(features)
        for (name, _), (values, lengths) in zip(
            self.sequences.items(), sequence_inputs(self.sequences, histories)
        ):
            encoded[name] = self.history_encoders[name](values, lengths).to(dense.dtype)
        return self.user_tower([encoded[name] for name in self.user_features] + [dense[:, self.user_dense]])

    def item_vectors(self, features: dict[str, torch.Tensor], dense: torch.Tensor) -> torch.Tensor:
        """(B, d) from looked-up features and the dense matrix."""
        return self.item_tower([features[name] for name in self.item_features] + [dense[:, self.item_dense]])

    def item_vectors_of_ids(self, embeddings: torch.Tensor) -> torch.Tensor:
        """(N, d) from item-id embeddings alone (N, D): sampled and history items, and the index of
        an item tower that reads the id alone."""
        return self.item_tower([embeddings])

    def outputs(
        self,
        features: dict[str, torch.Tensor],
        histories: dict[str, tuple],
        dense: torch.Tensor,
        weights: torch.Tensor,
        jagged: Callable[[str], JaggedTensor],
        pooled: Callable[[str], bool],
    ) -> TowerOutputs:
        """This rank's queries, targets and candidates (see ``TowerOutputs``) from its looked-up
        features; ``jagged(name)`` gives a feature's ids in the batch, ``pooled(name)`` whether its
        table sums bags (then the sampled ids come one per carrying row)."""
        items = self.item_vectors(features, dense)
        item_ids = jagged(self.item_feature).values()
        sampled = sampled_ids = None
        if self.sampled_feature is not None:
            carrier = jagged(self.sampled_feature)
            sampled_ids = carrier.values()
            embedded = features[self.sampled_feature]
            if pooled(self.sampled_feature):  # one bag of one id on each carrying row
                embedded = embedded[carrier.lengths() > 0]
            sampled = self.item_vectors_of_ids(embedded)
        if not self.all_positions:
            users = self.user_vectors(features, dense, histories)
            return TowerOutputs(users, weights, items, item_ids, items, item_ids, sampled, sampled_ids)
        ((name, _),) = self.sequences.items()  # config checks: one history, on the item's table
        values, lengths = sequence_inputs(self.sequences, histories)[0]
        encoder = self.history_encoders[name]
        length = encoder.max_length
        states, valid = encoder.states(values, lengths)  # (B, L, D), (B, L)
        last = torch.zeros_like(valid)
        last[:, -1] = True
        asks = valid | last  # every event, and the newest slot (the row's own item), history or not
        states = states * valid.unsqueeze(-1).to(states.dtype)
        others = [
            features[n].unsqueeze(1).expand(-1, length, -1) if n != name else states.to(dense.dtype)
            for n in self.user_features
        ]
        users = self.user_tower(others + [dense[:, None, self.user_dense].expand(-1, length, -1)])
        # position p's target: the event after it (p + 1), and for the newest slot the row's item
        padded_ids, _ = pad_left(jagged(name).values().unsqueeze(1), lengths, length)
        history_items, _ = pad_left(histories[name][0], lengths, length)  # the raw id embeddings
        targets = torch.cat([self.item_vectors_of_ids(history_items[:, 1:]), items.unsqueeze(1)], dim=1)
        target_ids = torch.cat([padded_ids[:, 1:, 0], item_ids.unsqueeze(1)], dim=1)
        query_weights = weights.unsqueeze(1) * asks.to(weights.dtype)
        width = users.shape[-1]
        return TowerOutputs(
            users.reshape(-1, width),
            query_weights.reshape(-1),
            targets.reshape(-1, width),
            target_ids.reshape(-1),
            items,
            item_ids,
            sampled,
            sampled_ids,
        )


class TwoTowerModel(ShardableTables):
    """The tables (``ShardableTables``) and the two towers (``towers``: ``RetrievalTowers``).

    Args:
    tables: embedding tables (TorchRec configs); each lists the features it serves.
    embedding_device: where the tables are created (``meta`` when a sharder will place them).
    input_names: every feature the tables serve, in the order serving takes them (config order).
    mean_pooled: multi-hot features pooled by their mean.
    the others: ``RetrievalTowers``'s.
    """

    def __init__(
        self,
        tables: list[BaseEmbeddingConfig],
        user_features: list[str],
        item_features: list[str],
        user_dense: list[int],
        item_dense: list[int],
        histories: dict[str, SequenceFeature],
        item_feature: str,
        cfg: ModelConfig,
        num_sampled: int = 0,
        embedding_device: torch.device | str = "meta",
        input_names: list[str] | None = None,
        mean_pooled: list[str] | None = None,
    ):
        super().__init__()
        self.input_names = list(input_names or [name for table in tables for name in table.feature_names])
        sequence_lists = [name for seq, f in histories.items() for name in (seq, *f.side)]
        self.init_tables(tables, sequence_lists, list(mean_pooled or []), embedding_device)
        self.towers = RetrievalTowers(
            self.dim_of_feature, user_features, item_features, user_dense, item_dense, histories, item_feature, cfg,
            num_sampled,
        )  # fmt: skip
        self.sequences = self.towers.sequences
        self.user_features, self.item_features = self.towers.user_features, self.towers.item_features
        self.temperature = self.towers.temperature

    def forward(
        self, sparse: KeyedJaggedTensor, dense: torch.Tensor, sequences: KeyedJaggedTensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(user vectors (B, d), item vectors (B, d)) of a batch's rows."""
        features, histories = self.embed(sparse, sequences)
        return self.towers.user_vectors(features, dense, histories), self.towers.item_vectors(features, dense)

    def user_vectors(self, features, dense, histories) -> torch.Tensor:
        return self.towers.user_vectors(features, dense, histories)

    def item_vectors(self, features, dense) -> torch.Tensor:
        return self.towers.item_vectors(features, dense)

    def training_outputs(
        self, sparse: KeyedJaggedTensor, dense: torch.Tensor, sequences: KeyedJaggedTensor | None, weights
    ) -> TowerOutputs:
        """This rank's queries, targets and candidates (see ``TowerOutputs``)."""
        features, histories = self.embed(sparse, sequences)
        return self.towers.outputs(
            features,
            histories,
            dense,
            weights,
            lambda name: self.jagged(sparse, sequences, name),
            self.is_pooled,
        )


def sampled_softmax_sums(
    queries: torch.Tensor,
    query_weights: torch.Tensor,
    targets: torch.Tensor,
    target_ids: torch.Tensor,
    target_log_counts: torch.Tensor,
    candidates: torch.Tensor,
    candidate_ids: torch.Tensor,
    candidate_log_counts: torch.Tensor,
    candidate_valid: torch.Tensor,
    temperature: float,
    k: int = 10,
) -> torch.Tensor:
    """Sampled softmax of each query's target against shared candidates, as sums: (3, 1) =
    [[Σ w·ℓ], [Σ w], [Σ w·hit@k]] where ℓ = logsumexp(target logit, candidate logits) - target logit
    and hit@k says the target outscores all but fewer than k candidates.

    queries (Q, d), query_weights (Q,), targets (Q, d), target_ids (Q,), target_log_counts (Q,);
    candidates (C, d), candidate_ids (C,), candidate_log_counts (C,), candidate_valid (C,) bool.
    A logit is the inner product over ``temperature`` minus the log count (zeros: no correction);
    a candidate with the query's target id, or not valid (a padding row), is no negative."""
    positive = (queries * targets).sum(-1) / temperature - target_log_counts  # (Q,)
    scores = queries @ candidates.T / temperature - candidate_log_counts  # (Q, C)
    excluded = (candidate_ids.unsqueeze(0) == target_ids.unsqueeze(1)) | ~candidate_valid.unsqueeze(0)
    scores = scores.masked_fill(excluded, float("-inf"))
    loss = torch.logsumexp(torch.cat([positive.unsqueeze(1), scores], dim=1), dim=1) - positive
    weights = query_weights.to(loss.dtype)
    hits = ((scores > positive.unsqueeze(1)).sum(1) < k).to(loss.dtype)
    return torch.stack([(loss * weights).sum(), weights.sum(), (hits * weights).sum()]).unsqueeze(1)
