"""Sequence encoders: a behaviour history (jagged, oldest first) and a candidate → one interest vector.

Shapes (B rows, L = the feature's ``max_length``, D = the sequence tables' embedding dim)::

    history values (N, D), lengths (B,) ── pad_left ──▶ (B, L, D), valid (B, L)   newest at L - 1
    + aligned side lists' embeddings (same lengths) + a learned embedding of each position
    target attention (DIN):  candidate (B, D) scores each position ─▶ masked softmax ─▶ Σ ─▶ (B, D)
    transformer:             [history; candidate] (B, L + 1, D) ─▶ causal layers ─▶ token L ─▶ (B, D)

Left padding puts the newest event next to the candidate whatever the row's length, so a position
embedding means "k events ago". Attention runs on the padded tensors in batched matmuls; padding
is masked (a padded query attends only to itself, so no row of the softmax is empty), and a row
with no history reads a zero interest vector (DIN) or its candidate token alone (transformer).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from towerrec.models.config import SequenceConfig
from towerrec.models.layers import MLP


def pad_left(
    values: torch.Tensor, lengths: torch.Tensor, max_length: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Jagged rows (values (N, D), lengths (B,)) → (B, L, D) with each row's values at the end, and
    the (B, L) mask of real positions. Rows longer than L keep their last L values. Vectorized:
    one scatter of all values, no per-row Python."""
    num_rows, dim = lengths.numel(), values.shape[-1]
    lengths = lengths.to(torch.int64)
    ends = torch.cumsum(lengths, 0)
    row = torch.repeat_interleave(
        torch.arange(num_rows, device=values.device), lengths, output_size=values.shape[0]
    )
    from_end = ends[row] - 1 - torch.arange(values.shape[0], device=values.device)  # 0 = newest
    slot = torch.where(
        from_end < max_length, row * max_length + (max_length - 1 - from_end), num_rows * max_length
    )
    padded = values.new_zeros(num_rows * max_length + 1, dim).index_put((slot,), values)
    positions = torch.arange(max_length, device=values.device)
    valid = positions.unsqueeze(0) >= (max_length - lengths.clamp(max=max_length)).unsqueeze(1)
    return padded[:-1].view(num_rows, max_length, dim), valid


class TargetAttention(nn.Module):
    """DIN (Zhou et al., 2018): an MLP of [h, c, h - c, h * c] scores each history position h
    against the candidate c; the interest is the softmax-weighted sum of the history.

    The MLP's first layer is applied in parts, which is the same function of [h, c, h - c, h * c]:
    W [h; c; h - c; h * c] = (W_h + W_d) h + (W_c - W_d) c + W_p (h * c), so the candidate's share
    is computed once per row instead of once per position, and the (B, L, 4D) concatenation is
    never built."""

    def __init__(self, dim: int, cfg: SequenceConfig):
        super().__init__()
        width = cfg.din_dims[0]
        self.history_part = nn.Linear(dim, width)
        self.candidate_part = nn.Linear(dim, width, bias=False)
        self.product_part = nn.Linear(dim, width, bias=False)
        hidden = MLP(width, cfg.din_dims[1:], dropout=cfg.dropout)
        self.score = nn.Sequential(nn.ReLU(), *([nn.Dropout(cfg.dropout)] if cfg.dropout else []), hidden,
                                   nn.Linear(hidden.out_dim, 1))  # fmt: skip

    def forward(self, history: torch.Tensor, valid: torch.Tensor, candidate: torch.Tensor) -> torch.Tensor:
        first = (
            self.history_part(history)
            + self.candidate_part(candidate).unsqueeze(1)
            + self.product_part(history * candidate.unsqueeze(1))
        )
        scores = self.score(first).squeeze(-1).masked_fill(~valid, float("-inf"))
        any_valid = valid.any(dim=1, keepdim=True)
        weights = torch.softmax(torch.where(any_valid, scores, torch.zeros_like(scores)), dim=1)
        weights = weights * valid * any_valid
        return (weights.unsqueeze(-1).to(history.dtype) * history).sum(1)  # no bmm: CPU bmm loops over rows


class SoftmaxBlock(nn.Module):
    """Pre-norm transformer layer (SASRec-style): causal multi-head softmax attention + FFN."""

    def __init__(self, dim: int, cfg: SequenceConfig):
        super().__init__()
        self.heads = cfg.num_heads
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.out = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.ffn = nn.Sequential(nn.Linear(dim, cfg.ffn_dim), nn.GELU(), nn.Linear(cfg.ffn_dim, dim))
        self.dropout = cfg.dropout

    def forward(self, x: torch.Tensor, allowed: torch.Tensor, last_only: bool = False) -> torch.Tensor:
        """(B, T, D) → (B, T, D); ``last_only``: only the last token's output (B, 1, D), whose
        query alone is computed (the last layer: nothing reads the other positions)."""
        b, t, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        if last_only:
            x, q, allowed = x[:, -1:], q[:, :, -1:], allowed[:, -1:]
        drop = self.dropout if self.training else 0.0
        attended = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed.unsqueeze(1), dropout_p=drop)
        x = x + self.out(attended.transpose(1, 2).reshape(b, x.shape[1], d))
        return x + F.dropout(self.ffn(self.norm2(x)), drop, self.training)


class PointwiseBlock(nn.Module):
    """HSTU-style layer (Zhai et al., 2024): U, V, Q, K = SiLU(W x); attention weights
    SiLU(q·k / sqrt(d)) / n over the allowed keys (no softmax: intensities, not a distribution);
    output W_o(norm(A V) ⊙ U) added to x."""

    def __init__(self, dim: int, cfg: SequenceConfig):
        super().__init__()
        self.heads = cfg.num_heads
        self.norm_in, self.norm_attended = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.uvqk = nn.Linear(dim, 4 * dim)
        self.out = nn.Linear(dim, dim)
        self.dropout = cfg.dropout

    def forward(self, x: torch.Tensor, allowed: torch.Tensor, last_only: bool = False) -> torch.Tensor:
        """As ``SoftmaxBlock.forward``."""
        b, t, d = x.shape
        u, v, q, k = F.silu(self.uvqk(self.norm_in(x))).split(d, dim=-1)
        if last_only:
            x, u, q, allowed = x[:, -1:], u[:, -1:], q[:, -1:], allowed[:, -1:]
        heads = lambda z: z.view(b, z.shape[1], self.heads, d // self.heads).transpose(1, 2)  # noqa: E731
        scores = F.silu(heads(q) @ heads(k).transpose(-1, -2) / math.sqrt(d // self.heads))
        counts = allowed.sum(-1, keepdim=True).clamp_min(1).unsqueeze(1)
        weights = scores * allowed.unsqueeze(1) / counts
        attended = (weights @ heads(v)).transpose(1, 2).reshape(b, x.shape[1], d)
        gated = self.norm_attended(attended) * u
        return x + F.dropout(self.out(gated), self.dropout, self.training)


class CausalTransformer(nn.Module):
    """The history and the candidate as one causal sequence; the candidate's final state is the
    interest vector."""

    def __init__(self, dim: int, max_length: int, cfg: SequenceConfig):
        super().__init__()
        block = PointwiseBlock if cfg.attention == "pointwise" else SoftmaxBlock
        self.blocks = nn.ModuleList(block(dim, cfg) for _ in range(cfg.num_layers))
        self.input_norm, self.norm = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.candidate_position = nn.Parameter(torch.zeros(dim))
        causal = torch.ones(max_length + 1, max_length + 1, dtype=torch.bool).tril()
        self.register_buffer("causal", causal, persistent=False)

    def forward(self, history: torch.Tensor, valid: torch.Tensor, candidate: torch.Tensor) -> torch.Tensor:
        # embeddings start at TorchRec's ±sqrt(1/rows): normalised, they are not drowned by the layers
        tokens = self.input_norm(
            torch.cat([history, (candidate + self.candidate_position).unsqueeze(1)], dim=1)
        )
        keys = torch.cat([valid, valid.new_ones(valid.shape[0], 1)], dim=1)  # (B, L + 1)
        eye = torch.eye(tokens.shape[1], dtype=torch.bool, device=tokens.device)
        allowed = self.causal & (keys.unsqueeze(1) | eye)  # (B, L + 1, L + 1): earlier real keys, and itself
        for index, layer in enumerate(self.blocks):
            tokens = layer(tokens, allowed, last_only=index == len(self.blocks) - 1)
        return self.norm(tokens[:, -1])


class SequenceEncoder(nn.Module):
    """One history feature (with its aligned side lists) and its candidate → (B, D)."""

    def __init__(self, dim: int, max_length: int, cfg: SequenceConfig):
        super().__init__()
        self.max_length = max_length
        self.position = nn.Parameter(torch.randn(max_length, dim) * 0.02)
        if cfg.encoder == "din":
            self.encoder: nn.Module = TargetAttention(dim, cfg)
        else:
            self.encoder = CausalTransformer(dim, max_length, cfg)

    def forward(self, values: torch.Tensor, lengths: torch.Tensor, candidate: torch.Tensor) -> torch.Tensor:
        """``values`` (N, D): the history's embeddings plus its side lists' (same lengths)."""
        return self.encode_padded(*pad_left(values, lengths, self.max_length), candidate)

    def encode_padded(
        self, history: torch.Tensor, valid: torch.Tensor, candidate: torch.Tensor
    ) -> torch.Tensor:
        """(B, L, D) left-padded history and its (B, L) mask (``pad_left``), (B, D) candidate → (B, D)."""
        history = (history + self.position) * valid.unsqueeze(-1)
        return self.encoder(history.to(candidate.dtype), valid, candidate)


class HistoryEncoder(nn.Module):
    """A history alone (a retrieval user tower reads no candidate) → the user's state.

    ``mean``: the mean of the history's embeddings (B, D) (an empty history gives 0).
    ``transformer``: causal layers (``model.sequence.attention``: SASRec's softmax or HSTU's pointwise)
    over the left-padded history plus a learned embedding of each position; ``states`` returns every
    position's output (B, L, D) — the state after that event, from it and the earlier ones — and the
    (B, L) mask of real positions; ``forward`` the newest position's, the user's state (0 when empty).
    """

    def __init__(self, dim: int, max_length: int, cfg: SequenceConfig):
        super().__init__()
        self.max_length = max_length
        self.mean = cfg.encoder == "mean"
        if not self.mean:
            block = PointwiseBlock if cfg.attention == "pointwise" else SoftmaxBlock
            self.position = nn.Parameter(torch.randn(max_length, dim) * 0.02)
            self.blocks = nn.ModuleList(block(dim, cfg) for _ in range(cfg.num_layers))
            self.input_norm, self.norm = nn.LayerNorm(dim), nn.LayerNorm(dim)
            causal = torch.ones(max_length, max_length, dtype=torch.bool).tril()
            self.register_buffer("causal", causal, persistent=False)

    def states(self, values: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(values (N, D), lengths (B,)) → states (B, L, D), valid (B, L); newest event at L - 1."""
        history, valid = pad_left(values, lengths, self.max_length)
        tokens = self.input_norm((history + self.position) * valid.unsqueeze(-1))
        eye = torch.eye(self.max_length, dtype=torch.bool, device=tokens.device)
        allowed = self.causal & (valid.unsqueeze(1) | eye)  # (B, L, L): earlier real events, and itself
        for layer in self.blocks:
            tokens = layer(tokens, allowed)
        return self.norm(tokens), valid

    def forward(self, values: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        if self.mean:
            history, valid = pad_left(values, lengths, self.max_length)
            count = valid.sum(1, keepdim=True).clamp_min(1).to(history.dtype)
            return history.sum(1) / count
        states, valid = self.states(values, lengths)
        return states[:, -1] * valid[:, -1:].to(states.dtype)
