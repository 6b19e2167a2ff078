"""Small building blocks shared by the towers and interactions."""

from __future__ import annotations

import torch
from torch import nn


class MLP(nn.Sequential):
    """Linear → ReLU (→ Dropout) for each width in ``dims``. Input (B, in_dim) → output (B, dims[-1]).

    With ``dims == []`` it is the identity and ``out_dim == in_dim``.
    """

    def __init__(self, in_dim: int, dims: list[int], dropout: float = 0.0):
        layers: list[nn.Module] = []
        for dim in dims:
            layers += [nn.Linear(in_dim, dim), nn.ReLU()]
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            in_dim = dim
        super().__init__(*layers)
        self.out_dim = in_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) if len(self) else x

    def last_linear(self) -> nn.Linear | None:
        """The last ``nn.Linear`` (``None`` for an identity MLP)."""
        linears = [module for module in self if isinstance(module, nn.Linear)]
        return linears[-1] if linears else None


class Experts(nn.Module):
    """``num_experts`` independent MLPs on the same input. (B, in_dim) → (B, E, out_dim)."""

    def __init__(self, in_dim: int, num_experts: int, dims: list[int], dropout: float = 0.0):
        super().__init__()
        self.experts = nn.ModuleList(MLP(in_dim, dims, dropout) for _ in range(num_experts))
        self.out_dim = dims[-1] if dims else in_dim

    def __len__(self) -> int:
        return len(self.experts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not len(self.experts):  # e.g. PLE with num_task_experts=0
            return x.new_zeros(x.shape[0], 0, self.out_dim)
        return torch.stack([expert(x) for expert in self.experts], dim=1)

    def last_weights(self) -> list[nn.Parameter]:
        """The weight of each expert's last linear layer (the experts' output layer)."""
        return [expert.last_linear().weight for expert in self.experts]


class Gate(nn.Module):
    """Softmax gate: mixes E expert outputs (B, E, D) with weights computed from x (B, in_dim) → (B, D)."""

    def __init__(self, in_dim: int, num_experts: int):
        super().__init__()
        self.logits = nn.Linear(in_dim, num_experts)

    def forward(self, x: torch.Tensor, expert_outputs: torch.Tensor) -> torch.Tensor:
        probabilities = torch.softmax(self.logits(x), dim=-1)  # (B, E)
        return torch.einsum("be,bed->bd", probabilities, expert_outputs)
