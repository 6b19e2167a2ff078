"""Per-task output units and losses.

Each task's head maps its tower output (B, H) to one number per row. What that number means is the
task's *output kind*:

- ``logit``: binary task, probability = sigmoid(output), loss BCE-with-logits;
- ``value``: regression, the prediction itself (bounded to [min, max] through a sigmoid when both
  bounds are configured), loss MSE or Huber;
- ``probability``: already a probability (ESMM's CTCVR = pCTR × pCVR), loss BCE.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from towerrec.models.config import TaskConfig


def output_kind(task: TaskConfig) -> str:
    """The kind of a task's own unit: ``value`` for regression, ``logit`` for binary."""
    return "value" if task.type == "regression" else "logit"


class TaskHeads(nn.Module):
    """One linear unit per task. T × (B, H) → (B, T) outputs (see module docstring for their kinds).

    Args:
        tasks: the tasks, in output column order.
        in_dim: width H of each task representation.
        probability_products: ``{t: (a, b)}``: task t has no unit of its own; its output is
            sigmoid(logit_a) × sigmoid(logit_b), of kind ``probability`` (ESMM's CTCVR = pCTR × pCVR,
            from the tower's ``probability_products``). Tasks t, a and b must be binary.

    ``output_kinds`` lists each task's output kind.
    """

    def __init__(
        self,
        tasks: list[TaskConfig],
        in_dim: int,
        probability_products: dict[int, tuple[int, int]] | None = None,
    ):
        super().__init__()
        self.probability_products = dict(probability_products or {})
        for t, (a, b) in self.probability_products.items():
            names = [tasks[u].name for u in (t, a, b)]
            if any(tasks[u].type != "binary" for u in (t, a, b)):
                raise ValueError(
                    f"tasks {names}: a probability product (ESMM) needs binary tasks (type: binary)"
                )
            if a in self.probability_products or b in self.probability_products:
                raise ValueError(f"tasks {names}: the factors of a probability product need their own logit")
        self.output_kinds = [
            "probability" if t in self.probability_products else output_kind(task)
            for t, task in enumerate(tasks)
        ]
        self.unit_tasks = [t for t in range(len(tasks)) if t not in self.probability_products]
        self.units = nn.ModuleList(nn.Linear(in_dim, 1) for _ in self.unit_tasks)
        bounds = []
        for task in tasks:
            bounded = task.type == "regression" and task.min_value is not None and task.max_value is not None
            bounds.append((task.min_value, task.max_value - task.min_value) if bounded else (0.0, 0.0))
        self.register_buffer("_low", torch.tensor([b[0] for b in bounds]), persistent=False)
        self.register_buffer("_span", torch.tensor([b[1] for b in bounds]), persistent=False)

    def forward(
        self, task_inputs: list[torch.Tensor] | list[tuple[torch.Tensor, torch.Tensor]]
    ) -> torch.Tensor:
        """``task_inputs``: T × (B, H), or T × ((B, H_deep), (B, H_wide)) pairs standing for their
        concatenation (``WideAndDeep``), applied part by part so that nothing is copied."""
        columns = {t: _apply(unit, task_inputs[t]) for t, unit in zip(self.unit_tasks, self.units)}  # (B, 1)
        for t, (a, b) in self.probability_products.items():
            columns[t] = torch.sigmoid(columns[a]) * torch.sigmoid(columns[b])
        raw = torch.cat([columns[t] for t in range(len(columns))], dim=1)
        bounded = self._low + self._span * torch.sigmoid(raw)
        return torch.where(self._span > 0, bounded, raw)


def _apply(unit: nn.Linear, task_input) -> torch.Tensor:
    if isinstance(task_input, torch.Tensor):
        return unit(task_input)
    deep, wide = task_input
    split = deep.shape[1]
    return F.linear(deep, unit.weight[:, :split], unit.bias) + F.linear(wide, unit.weight[:, split:])


def predictions(outputs: torch.Tensor, kinds: list[str]) -> torch.Tensor:
    """(B, T) outputs → (B, T) predictions: probabilities for binary tasks, values for regression."""
    columns = [
        torch.sigmoid(outputs[:, t]) if kind == "logit" else outputs[:, t] for t, kind in enumerate(kinds)
    ]
    return torch.stack(columns, dim=1)


def task_loss_sums(
    outputs: torch.Tensor,
    labels: torch.Tensor,
    label_mask: torch.Tensor,
    weights: torch.Tensor,
    kinds: list[str],
    loss_names: list[str],
) -> torch.Tensor:
    """Each task's weighted loss sum and weight sum over the rows where its label counts: (2, T).

    Row 0 is Σ_b w_bt · ℓ_bt and row 1 is Σ_b w_bt, with w_bt = label_mask[b, t] · weights[b]. The mean
    loss is their ratio; keeping the two apart lets data-parallel training divide by the weight sum
    of the *global* batch (see ``towerrec.trainer.module``). outputs, labels, label_mask: (B, T); weights: (B,).
    """
    sums, totals = [], []
    for t, (kind, name) in enumerate(zip(kinds, loss_names)):
        out, target = outputs[:, t], labels[:, t]
        if kind == "logit":
            elementwise = F.binary_cross_entropy_with_logits(out, target, reduction="none")
        elif kind == "probability":
            elementwise = F.binary_cross_entropy(out.clamp(1e-7, 1 - 1e-7), target, reduction="none")
        elif name == "huber":
            elementwise = F.huber_loss(out, target, reduction="none")
        else:
            elementwise = (out - target) ** 2
        row_weight = label_mask[:, t] * weights
        sums.append((elementwise * row_weight).sum())
        totals.append(row_weight.sum())
    return torch.stack([torch.stack(sums), torch.stack(totals).to(sums[0].dtype)])


def task_losses(
    outputs: torch.Tensor,
    labels: torch.Tensor,
    label_mask: torch.Tensor,
    weights: torch.Tensor,
    kinds: list[str],
    loss_names: list[str],
) -> torch.Tensor:
    """Weighted mean loss of each task over the rows where its label counts. Returns (T,).

    outputs, labels, label_mask: (B, T); weights: (B,). A task with no counted row in the batch gets 0.
    """
    sums, totals = task_loss_sums(outputs, labels, label_mask, weights, kinds, loss_names)
    return sums / totals.clamp_min(1e-12)
