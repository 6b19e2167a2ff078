"""Feature interaction between pooled embeddings and dense features, before the tower.

Input: a list of F pooled embeddings, each (B, D_f), in config order (``data.sparse``), and the dense
features (B, num_dense). Output: (B, out_dim).
"""

from __future__ import annotations

import torch
from torch import nn

from towerrec.models.config import ModelConfig
from towerrec.models.layers import MLP


class ConcatInteraction(nn.Module):
    """No interaction: concatenate every embedding and the dense features."""

    def __init__(self, embedding_dims: list[int], num_dense: int, cfg: ModelConfig):
        super().__init__()
        self.out_dim = sum(embedding_dims) + num_dense

    def forward(self, embeddings: list[torch.Tensor], dense: torch.Tensor) -> torch.Tensor:
        return torch.cat([*embeddings, dense], dim=1)


def common_dim_projections(embedding_dims: list[int]) -> tuple[int, nn.ModuleList]:
    """(D, projections): D = the largest embedding dim; each narrower embedding gets a bias-free
    linear map to D (a learned change of basis), equal-width ones the identity."""
    dim = max(embedding_dims)
    return dim, nn.ModuleList(
        nn.Identity() if width == dim else nn.Linear(width, dim, bias=False) for width in embedding_dims
    )


class DotInteraction(nn.Module):
    """DLRM-style pairwise dot products (Naumov et al., 2019).

    Shapes (D = common dim, N = F + 1 vectors, or F without dense features):

        dense (B, num_dense) ── MLP dense_dims + [D] ──▶ d (B, D)
        embeddings F × (B, D_f) ── to D when D_f != D ──▶ e_1 … e_F (B, D)
        V = stack(d, e_1, …, e_F) (B, N, D);  Z = V Vᵀ (B, N, N)
        output = cat(d, Z[:, i, j] for i < j) (B, D + N(N-1)/2)

    Common dim: when every embedding has the same dim, D is that dim and embeddings are used as
    they are. Otherwise D = the largest embedding dim and each narrower embedding goes through its
    own bias-free linear map to D (a learned change of basis, so dot products compare like with
    like); equal-width embeddings stay untouched. With ``num_dense == 0`` there is no dense vector
    and the output is the dot products only.
    """

    def __init__(self, embedding_dims: list[int], num_dense: int, cfg: ModelConfig):
        super().__init__()
        num_vectors = len(embedding_dims) + (1 if num_dense else 0)
        if not embedding_dims or num_vectors < 2:
            raise ValueError(
                "model.interaction=dot: needs at least two vectors (sparse features, plus one for the dense "
                f"features), got {len(embedding_dims)} sparse and {num_dense} dense features"
            )
        self.dim, self.projections = common_dim_projections(embedding_dims)
        self.dense_mlp = MLP(num_dense, [*cfg.dense_dims, self.dim], cfg.dropout) if num_dense else None
        rows, columns = torch.triu_indices(num_vectors, num_vectors, offset=1)
        self.register_buffer("_rows", rows, persistent=False)
        self.register_buffer("_columns", columns, persistent=False)
        self.out_dim = (self.dim if num_dense else 0) + len(rows)

    def forward(self, embeddings: list[torch.Tensor], dense: torch.Tensor) -> torch.Tensor:
        vectors = [projection(e) for projection, e in zip(self.projections, embeddings)]
        if self.dense_mlp is not None:
            vectors.insert(0, self.dense_mlp(dense))
        stacked = torch.stack(vectors, dim=1)  # (B, N, D)
        dots = torch.bmm(stacked, stacked.transpose(1, 2))[:, self._rows, self._columns]  # (B, N(N-1)/2)
        return torch.cat([vectors[0], dots], dim=1) if self.dense_mlp is not None else dots


class ConcatDotInteraction(nn.Module):
    """The plain concatenation plus the pairwise dot products of the embeddings.

    Shapes (D = common dim as in ``dot``, F embeddings):

        embeddings F × (B, D_f) ── to D when D_f != D ──▶ e_1 … e_F (B, D)
        Z = E Eᵀ (B, F, F), E = stack(e_1 … e_F)
        output = cat(embeddings as they are, dense, Z[:, i, j] for i < j) (B, Σ D_f + num_dense + F(F-1)/2)

    Unlike ``dot``, the tower keeps the raw embeddings and dense features, and the dense features
    take part in no product. The dot product of the user and item id embeddings is the
    matrix-factorisation term; with ``model.wide: true`` it also reaches the heads linearly
    (a field-weighted factorisation machine beside the deep tower, as in DeepFM).
    """

    def __init__(self, embedding_dims: list[int], num_dense: int, cfg: ModelConfig):
        super().__init__()
        if len(embedding_dims) < 2:
            raise ValueError(
                f"model.interaction=concat_dot: needs at least two sparse features, got {len(embedding_dims)}"
            )
        self.dim, self.projections = common_dim_projections(embedding_dims)
        rows, columns = torch.triu_indices(len(embedding_dims), len(embedding_dims), offset=1)
        self.register_buffer("_rows", rows, persistent=False)
        self.register_buffer("_columns", columns, persistent=False)
        self.out_dim = sum(embedding_dims) + num_dense + len(rows)

    def forward(self, embeddings: list[torch.Tensor], dense: torch.Tensor) -> torch.Tensor:
        stacked = torch.stack([p(e) for p, e in zip(self.projections, embeddings)], dim=1)  # (B, F, D)
        dots = torch.bmm(stacked, stacked.transpose(1, 2))[:, self._rows, self._columns]  # (B, F(F-1)/2)
        return torch.cat([*embeddings, dense, dots], dim=1)


class CrossLayer(nn.Module):
    """One DCNv2 cross layer: x_{l+1} = x0 ⊙ (W x_l + b) + x_l, W full (dim × dim) or U Vᵀ of rank r."""

    def __init__(self, dim: int, low_rank: int | None):
        super().__init__()
        if low_rank is None:
            self.linear: nn.Module = nn.Linear(dim, dim)
        else:  # W = U Vᵀ: V is (dim × r), U is (dim × r)
            self.linear = nn.Sequential(nn.Linear(dim, low_rank, bias=False), nn.Linear(low_rank, dim))

    def forward(self, x0: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return x0 * self.linear(x) + x


class CrossInteraction(nn.Module):
    """DCNv2 cross network (Wang et al., WWW 2021) on x0 = cat(embeddings, dense) (B, d).

    ``dcn_num_layers`` cross layers (full rank, or rank ``dcn_low_rank``) → (B, d): out_dim = d.
    The deep part of DCNv2 is the tower that follows (a "stacked" DCNv2).
    """

    def __init__(self, embedding_dims: list[int], num_dense: int, cfg: ModelConfig):
        super().__init__()
        if cfg.dcn_num_layers < 1:
            raise ValueError(f"model.dcn_num_layers: must be >= 1, got {cfg.dcn_num_layers}")
        if cfg.dcn_low_rank is not None and cfg.dcn_low_rank < 1:
            raise ValueError(f"model.dcn_low_rank: must be >= 1 or null (full rank), got {cfg.dcn_low_rank}")
        self.out_dim = sum(embedding_dims) + num_dense
        self.layers = nn.ModuleList(
            CrossLayer(self.out_dim, cfg.dcn_low_rank) for _ in range(cfg.dcn_num_layers)
        )

    def forward(self, embeddings: list[torch.Tensor], dense: torch.Tensor) -> torch.Tensor:
        x0 = torch.cat([*embeddings, dense], dim=1)
        x = x0
        for layer in self.layers:
            x = layer(x0, x)
        return x


INTERACTIONS: dict[str, type[nn.Module]] = {
    "none": ConcatInteraction,
    "dot": DotInteraction,
    "concat_dot": ConcatDotInteraction,
    "dcn": CrossInteraction,
}


def build_interaction(cfg: ModelConfig, embedding_dims: list[int], num_dense: int) -> nn.Module:
    if cfg.interaction not in INTERACTIONS:
        raise ValueError(
            f"model.interaction: unknown interaction {cfg.interaction!r}; choose one of {sorted(INTERACTIONS)}"
        )
    return INTERACTIONS[cfg.interaction](embedding_dims, num_dense, cfg)
