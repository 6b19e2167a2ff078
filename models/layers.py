"""Small building blocks shared by the towers and interactions."""

from __future__ import annotations

import math

import torch
from torch import nn


class _L2PenaltyGradient(torch.autograd.Function):
    """Identity forward; backward adds ``scale * x``: the gradient of ``scale / 2 * ||x||²``."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.save_for_backward(x)
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        (x,) = ctx.saved_tensors
        return grad + ctx.scale * x, None


def l2_penalty_gradient(x: torch.Tensor, strength: float) -> torch.Tensor:
    """``x`` unchanged, but back-propagation also descends ``strength * mean over rows of ||x_row||²``
    (x: (B, D)). No term appears in the loss value, so logged losses stay the tasks' own."""
    return _L2PenaltyGradient.apply(x, 2.0 * strength / max(x.shape[0], 1))


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
    """``num_experts`` independent MLPs (Linear → ReLU (→ Dropout) per width in ``dims``) on the same
    input. (B, in_dim) → (B, E, out_dim).

    The experts' layers are stored stacked, ``weight_i`` (E, d_in, d_out) and ``bias_i`` (E, d_out),
    and computed together: the first layer as one (B, in_dim) @ (in_dim, E·d_out) matmul, later
    layers as one batched matmul over experts. On CPU that is 2-3× faster than E separate
    ``nn.Linear`` stacks (fewer, larger matmuls; no stack copy). Each expert is initialised like
    ``nn.Linear`` (uniform in ±1/sqrt(d_in)).
    """

    def __init__(self, in_dim: int, num_experts: int, dims: list[int], dropout: float = 0.0):
        super().__init__()
        self.num_experts = num_experts
        self.out_dim = dims[-1] if dims else in_dim
        self.weights = nn.ParameterList()
        self.biases = nn.ParameterList()
        for dim in dims:
            bound = 1.0 / math.sqrt(in_dim)
            self.weights.append(nn.Parameter(torch.empty(num_experts, in_dim, dim).uniform_(-bound, bound)))
            self.biases.append(nn.Parameter(torch.empty(num_experts, dim).uniform_(-bound, bound)))
            in_dim = dim
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def __len__(self) -> int:
        return self.num_experts

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, num_experts = x.shape[0], self.num_experts
        if not num_experts:  # e.g. PLE with num_task_experts=0
            return x.new_zeros(batch, 0, self.out_dim)
        if not len(self.weights):
            return x.unsqueeze(1).expand(batch, num_experts, x.shape[1])
        first, bias = self.weights[0], self.biases[0]
        flat_weight = first.permute(1, 0, 2).reshape(first.shape[1], -1)  # (in, E·d)
        hidden = torch.addmm(bias.reshape(-1), x, flat_weight).view(batch, num_experts, -1)
        hidden = self.dropout(torch.relu(hidden))
        for weight, bias in zip(self.weights[1:], self.biases[1:]):  # (E, B, d) @ (E, d, d') per expert
            hidden = torch.baddbmm(bias.unsqueeze(1), hidden.transpose(0, 1), weight).transpose(0, 1)
            hidden = self.dropout(torch.relu(hidden))
        return hidden

    def last_weights(self) -> list[nn.Parameter]:
        """The stacked weight of the experts' last layer (the experts' output layer)."""
        return [self.weights[-1]] if len(self.weights) else []


class Gate(nn.Module):
    """Softmax gate: mixes E expert outputs (B, E, D) with weights computed from x (B, in_dim) → (B, D)."""

    def __init__(self, in_dim: int, num_experts: int):
        super().__init__()
        self.logits = nn.Linear(in_dim, num_experts)

    def forward(self, x: torch.Tensor, expert_outputs: torch.Tensor) -> torch.Tensor:
        probabilities = torch.softmax(self.logits(x), dim=-1)  # (B, E)
        # broadcast multiply + sum, not einsum: einsum lowers to B tiny (1, E) @ (E, D) bmm calls,
        # which took 40% of an MMoE step's dense time on CPU (benchmarks/breakdown.py)
        # (under bf16 autocast the softmax runs in fp32: mix in the experts' dtype, not promoted to fp32)
        return (probabilities.to(expert_outputs.dtype).unsqueeze(-1) * expert_outputs).sum(dim=1)
