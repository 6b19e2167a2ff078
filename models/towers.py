"""Multi-task towers: (B, input_dim) features → one (B, out_dim) representation per task.

Every tower is built as ``Tower(input_dim, num_tasks, cfg)`` (ESMM also needs ``task_names``, see
``build_tower``) and exposes:

- ``out_dim``: width H of each task representation; ``forward(x)`` returns T × (B, H) in task order;
- ``shared_parameters()``: the parameters shared by all tasks (what PCGrad operates on);
- ``last_shared_parameters()``: the weight(s) of the last shared layer (what GradNorm measures);
- ``probability_products``: ``{t: (a, b)}`` when task t's output is P(a) × P(b) (ESMM's CTCVR),
  composed by ``towerrec.models.heads.TaskHeads``; empty for every tower but ESMM.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from towerrec.models.config import ModelConfig
from towerrec.models.layers import MLP, Experts, Gate


def _last_weight(mlp: MLP, config_key: str) -> list[nn.Parameter]:
    linear = mlp.last_linear()
    if linear is None:
        raise ValueError(f"{config_key} is empty: the tower has no shared layer for gradient balancing")
    return [linear.weight]


class SharedBottom(nn.Module):
    """The original design: one shared MLP, then a small MLP per task (Caruana, 1997).

    (B, input_dim) → shared MLP ``bottom_dims`` → per-task MLP ``head_dims`` → T × (B, out_dim)
    """

    def __init__(self, input_dim: int, num_tasks: int, cfg: ModelConfig):
        super().__init__()
        self.bottom = MLP(input_dim, cfg.bottom_dims, cfg.dropout)
        self.task_towers = nn.ModuleList(
            MLP(self.bottom.out_dim, cfg.head_dims, cfg.dropout) for _ in range(num_tasks)
        )
        self.out_dim = self.task_towers[0].out_dim
        self.probability_products: dict[int, tuple[int, int]] = {}

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        shared = self.bottom(x)
        return [tower(shared) for tower in self.task_towers]

    def shared_parameters(self) -> list[nn.Parameter]:
        return list(self.bottom.parameters())

    def last_shared_parameters(self) -> list[nn.Parameter]:
        return _last_weight(self.bottom, "model.bottom_dims")


class MMoE(nn.Module):
    """Multi-gate Mixture-of-Experts (Ma et al., KDD 2018).

    (B, input_dim) → ``num_experts`` expert MLPs ``expert_dims`` → (B, E, D)
    task t: softmax gate_t(x) (B, E) mixes the experts → (B, D) → MLP ``head_dims`` → (B, out_dim)

    The experts are shared by all tasks; each gate and head MLP belongs to one task.
    """

    def __init__(self, input_dim: int, num_tasks: int, cfg: ModelConfig):
        super().__init__()
        if cfg.num_experts < 1:
            raise ValueError(f"model.num_experts: must be >= 1 for mmoe, got {cfg.num_experts}")
        if not cfg.expert_dims:
            raise ValueError("model.expert_dims: mmoe needs at least one expert layer")
        self.experts = Experts(input_dim, cfg.num_experts, cfg.expert_dims, cfg.dropout)
        self.gates = nn.ModuleList(Gate(input_dim, cfg.num_experts) for _ in range(num_tasks))
        self.task_towers = nn.ModuleList(
            MLP(self.experts.out_dim, cfg.head_dims, cfg.dropout) for _ in range(num_tasks)
        )
        self.out_dim = self.task_towers[0].out_dim
        self.probability_products: dict[int, tuple[int, int]] = {}

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        expert_outputs = self.experts(x)  # (B, E, D)
        return [tower(gate(x, expert_outputs)) for gate, tower in zip(self.gates, self.task_towers)]

    def shared_parameters(self) -> list[nn.Parameter]:
        return list(self.experts.parameters())

    def last_shared_parameters(self) -> list[nn.Parameter]:
        return self.experts.last_weights()


class ExtractionLevel(nn.Module):
    """One PLE extraction level (a CGC block, plus a shared gate when it is not the last level).

    task t: gate_t(x_t) mixes [task t's experts(x_t), shared experts(x_s)] → next x_t (B, D)
    shared: gate_s(x_s) mixes [every task's experts, shared experts] → next x_s (B, D)
    """

    def __init__(self, in_dim: int, num_tasks: int, cfg: ModelConfig, final: bool):
        super().__init__()
        self.task_experts = nn.ModuleList(
            Experts(in_dim, cfg.num_task_experts, cfg.expert_dims, cfg.dropout) for _ in range(num_tasks)
        )
        self.shared_experts = Experts(in_dim, cfg.num_shared_experts, cfg.expert_dims, cfg.dropout)
        self.task_gates = nn.ModuleList(
            Gate(in_dim, cfg.num_task_experts + cfg.num_shared_experts) for _ in range(num_tasks)
        )
        num_all_experts = num_tasks * cfg.num_task_experts + cfg.num_shared_experts
        self.shared_gate = None if final else Gate(in_dim, num_all_experts)
        self.out_dim = self.shared_experts.out_dim

    def forward(
        self, task_inputs: list[torch.Tensor], shared_input: torch.Tensor
    ) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        shared_outputs = self.shared_experts(shared_input)  # (B, S, D)
        task_outputs = [experts(x) for experts, x in zip(self.task_experts, task_inputs)]  # T × (B, K, D)
        next_task_inputs = [
            gate(x, torch.cat([own, shared_outputs], dim=1))
            for gate, x, own in zip(self.task_gates, task_inputs, task_outputs)
        ]
        if self.shared_gate is None:
            return next_task_inputs, None
        return next_task_inputs, self.shared_gate(
            shared_input, torch.cat([*task_outputs, shared_outputs], dim=1)
        )

    def shared_parameters(self) -> list[nn.Parameter]:
        gate = [] if self.shared_gate is None else list(self.shared_gate.parameters())
        return list(self.shared_experts.parameters()) + gate


class PLE(nn.Module):
    """Progressive Layered Extraction (Tang et al., RecSys 2020); ``num_levels=1`` is CGC.

    (B, input_dim) → ``num_levels`` extraction levels, each with ``num_shared_experts`` shared
    experts and ``num_task_experts`` experts per task (MLPs ``expert_dims``) → T × (B, D)
    → per-task MLP ``head_dims`` → T × (B, out_dim)

    Shared parameters: the shared experts of every level and the shared gates (non-final levels).
    Task experts of non-final levels also reach the other tasks through the shared gate, but they
    belong to their task and are not counted as shared.
    """

    def __init__(self, input_dim: int, num_tasks: int, cfg: ModelConfig):
        super().__init__()
        if cfg.num_levels < 1:
            raise ValueError(f"model.num_levels: must be >= 1 for ple, got {cfg.num_levels}")
        if (
            cfg.num_shared_experts < 0
            or cfg.num_task_experts < 0
            or cfg.num_shared_experts + cfg.num_task_experts < 1
        ):
            raise ValueError(
                "model.num_shared_experts / model.num_task_experts: must be >= 0 and give each task at least "
                f"one expert, got {cfg.num_shared_experts} / {cfg.num_task_experts}"
            )
        if not cfg.expert_dims:
            raise ValueError("model.expert_dims: ple needs at least one expert layer")
        self.levels = nn.ModuleList()
        in_dim = input_dim
        for level in range(cfg.num_levels):
            self.levels.append(ExtractionLevel(in_dim, num_tasks, cfg, final=level == cfg.num_levels - 1))
            in_dim = self.levels[-1].out_dim
        self.task_towers = nn.ModuleList(MLP(in_dim, cfg.head_dims, cfg.dropout) for _ in range(num_tasks))
        self.out_dim = self.task_towers[0].out_dim
        self.probability_products: dict[int, tuple[int, int]] = {}

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        task_inputs, shared_input = [x] * len(self.task_towers), x
        for level in self.levels:
            task_inputs, shared_input = level(task_inputs, shared_input)
        return [tower(task_input) for tower, task_input in zip(self.task_towers, task_inputs)]

    def shared_parameters(self) -> list[nn.Parameter]:
        return [param for level in self.levels for param in level.shared_parameters()]

    def last_shared_parameters(self) -> list[nn.Parameter]:
        if not len(self.levels[-1].shared_experts):
            raise ValueError("model.num_shared_experts is 0: ple has no shared layer for gradient balancing")
        return self.levels[-1].shared_experts.last_weights()


def esmm_task_indices(cfg: ModelConfig, task_names: Sequence[str] | None) -> tuple[int, int, int]:
    """Positions of the (CTR, CVR, CTCVR) tasks named by ``model.esmm_*_task`` in ``task_names``."""
    if task_names is None:
        raise ValueError(
            "model.tower=esmm: the tower needs the task names (build_tower(..., task_names=...))"
        )
    keys = {
        "model.esmm_ctr_task": cfg.esmm_ctr_task,
        "model.esmm_cvr_task": cfg.esmm_cvr_task,
        "model.esmm_ctcvr_task": cfg.esmm_ctcvr_task,
    }
    for key, name in keys.items():
        if name not in task_names:
            raise ValueError(f"{key}: {name!r} is not one of the tasks {list(task_names)}")
    if len(set(keys.values())) != 3:
        raise ValueError(f"{', '.join(keys)}: must name three different tasks, got {list(keys.values())}")
    ctr, cvr, ctcvr = (list(task_names).index(name) for name in keys.values())
    return ctr, cvr, ctcvr


class ESMM(nn.Module):
    """Entire Space Multi-task Model (Ma et al., SIGIR 2018) for click → conversion.

    (B, input_dim) → shared MLP ``bottom_dims`` ─┬─ CTR MLP ``head_dims`` → (B, out_dim) → head: pCTR logit
                                                 ├─ CVR MLP ``head_dims`` → (B, out_dim) → head: pCVR logit
                                                 └─ (any other task: its own MLP, as in SharedBottom)
    CTCVR output = sigmoid(pCTR logit) × sigmoid(pCVR logit), composed by the heads
    (``probability_products = {ctcvr: (ctr, cvr)}``, output kind ``probability``).

    Config contract: ``model.esmm_ctr_task``, ``model.esmm_cvr_task`` and ``model.esmm_ctcvr_task``
    name three binary tasks. Both CTR and CTCVR are trained over all impressions (CTR label = click,
    CTCVR label = click AND conversion). The CVR task is what ESMM exists to predict; it has no
    direct loss over the entire space: give it ``weight: 0`` (pure ESMM; it still gets val metrics)
    or ``mask: <click column>`` (an extra loss on clicked rows only).

    The CTCVR slot of ``forward``'s output repeats the CTR representation (the heads do not read
    it): the list keeps one entry per task, and the tower has no parameter that only CTCVR uses.
    """

    def __init__(
        self, input_dim: int, num_tasks: int, cfg: ModelConfig, task_names: Sequence[str] | None = None
    ):
        super().__init__()
        ctr, cvr, ctcvr = esmm_task_indices(cfg, task_names)
        self.bottom = MLP(input_dim, cfg.bottom_dims, cfg.dropout)
        self.tower_tasks = [t for t in range(num_tasks) if t != ctcvr]
        self.task_towers = nn.ModuleList(
            MLP(self.bottom.out_dim, cfg.head_dims, cfg.dropout) for _ in self.tower_tasks
        )
        self.out_dim = self.task_towers[0].out_dim
        self.probability_products = {ctcvr: (ctr, cvr)}
        self._ctr, self._ctcvr = ctr, ctcvr

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        shared = self.bottom(x)
        by_task = {t: tower(shared) for t, tower in zip(self.tower_tasks, self.task_towers)}
        by_task[self._ctcvr] = by_task[self._ctr]
        return [by_task[t] for t in range(len(by_task))]

    def shared_parameters(self) -> list[nn.Parameter]:
        return list(self.bottom.parameters())

    def last_shared_parameters(self) -> list[nn.Parameter]:
        return _last_weight(self.bottom, "model.bottom_dims")


class WideAndDeep(nn.Module):
    """Wide & Deep (Cheng et al., 2016) around any tower: each task representation is extended
    with the tower's input, so each task's output unit is linear in the features as well as in
    the deep representation.

    (B, input_dim) → tower → T × (B, H) → T × ((B, H), (B, input_dim)): out_dim = H + input_dim

    Each task representation is the pair (h_t, x), standing for cat(h_t, x) without copying x once
    per task: ``TaskHeads`` applies its units to the two parts (``W [h; x] = W_h h + W_x x``). The
    wide part adds no parameter of its own (the heads' units grow); shared parameters, GradNorm's
    last shared layer and ESMM's probability products are the inner tower's.
    """

    def __init__(self, tower: nn.Module, input_dim: int):
        super().__init__()
        self.deep = tower
        self.out_dim = tower.out_dim + input_dim
        self.probability_products = tower.probability_products

    def forward(self, x: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [(h, x) for h in self.deep(x)]

    def shared_parameters(self) -> list[nn.Parameter]:
        return self.deep.shared_parameters()

    def last_shared_parameters(self) -> list[nn.Parameter]:
        return self.deep.last_shared_parameters()


TOWERS: dict[str, type[nn.Module]] = {"shared_bottom": SharedBottom, "mmoe": MMoE, "ple": PLE, "esmm": ESMM}


def build_tower(
    cfg: ModelConfig, input_dim: int, num_tasks: int, task_names: Sequence[str] | None = None
) -> nn.Module:
    """The tower ``model.tower`` (inside ``WideAndDeep`` with ``model.wide``). ``task_names`` (in task
    order) is needed by ``esmm`` only."""
    if cfg.tower not in TOWERS:
        raise ValueError(f"model.tower: unknown tower {cfg.tower!r}; choose one of {sorted(TOWERS)}")
    if cfg.tower == "esmm":
        tower = ESMM(input_dim, num_tasks, cfg, task_names=task_names)
    else:
        tower = TOWERS[cfg.tower](input_dim, num_tasks, cfg)
    return WideAndDeep(tower, input_dim) if cfg.wide else tower
