"""Towers: shapes, shared parameters, ESMM outputs, and training on a planted problem."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from towerrec.models.balancing import FixedWeights
from towerrec.models.config import ModelConfig, TaskConfig
from towerrec.models.heads import TaskHeads, predictions, task_losses
from towerrec.models.towers import TOWERS, build_tower

ESMM_TASK_NAMES = ["ctr", "cvr", "ctcvr"]
SMALL = dict(bottom_dims=[32, 16], expert_dims=[16], head_dims=[8], num_experts=3, dense_dims=[8])


def small_config(tower: str, **overrides) -> ModelConfig:
    return ModelConfig(tower=tower, **{**SMALL, **overrides})


def build(tower: str, input_dim: int, tasks: list[TaskConfig], cfg: ModelConfig | None = None):
    """Tower and heads as MultiTaskModel wires them."""
    cfg = cfg or small_config(tower)
    module = build_tower(cfg, input_dim, len(tasks), task_names=[task.name for task in tasks])
    return module, TaskHeads(tasks, module.out_dim, module.probability_products)


def esmm_tasks() -> list[TaskConfig]:
    return [TaskConfig("ctr"), TaskConfig("cvr", weight=0.0), TaskConfig("ctcvr")]


@pytest.mark.parametrize("tower", sorted(TOWERS))
def test_shapes_and_finite_losses(tower):
    tasks = esmm_tasks()
    module, heads = build(tower, 12, tasks)
    x = torch.randn(7, 12)
    representations = module(x)
    assert len(representations) == len(tasks)
    assert all(r.shape == (7, module.out_dim) for r in representations)
    outputs = heads(representations)
    assert outputs.shape == (7, 3)
    labels = torch.randint(0, 2, (7, 3)).float()
    losses = task_losses(outputs, labels, torch.ones(7, 3), torch.ones(7), heads.output_kinds, ["bce"] * 3)
    assert losses.shape == (3,) and torch.isfinite(losses).all()


@pytest.mark.parametrize("tower", sorted(TOWERS))
def test_shared_parameters_are_tower_parameters_and_reach_every_task(tower):
    tasks = esmm_tasks()
    module, heads = build(tower, 12, tasks)
    own = {id(p) for p in module.parameters()}
    shared = module.shared_parameters()
    assert shared and all(id(p) in own for p in shared)
    assert {id(p) for p in module.last_shared_parameters()} <= {id(p) for p in shared}
    outputs = heads(module(torch.randn(5, 12)))
    for t in range(len(tasks)):
        grads = torch.autograd.grad(outputs[:, t].sum(), module.last_shared_parameters(), retain_graph=True)
        assert all(g.abs().sum() > 0 for g in grads), f"task {t} does not reach the last shared layer"


@pytest.mark.parametrize("levels", [1, 3])
def test_ple_levels_and_cgc(levels):
    cfg = small_config("ple", num_levels=levels, num_shared_experts=2, num_task_experts=1)
    module = build_tower(cfg, 10, 2)
    assert len(module.levels) == levels
    assert module.levels[-1].shared_gate is None
    assert all(level.shared_gate is not None for level in module.levels[:-1])
    assert [r.shape for r in module(torch.randn(4, 10))] == [(4, module.out_dim)] * 2


def test_ple_without_task_experts_runs():
    module = build_tower(small_config("ple", num_levels=2, num_task_experts=0), 10, 2)
    assert module(torch.randn(4, 10))[0].shape == (4, module.out_dim)


@pytest.mark.parametrize(
    "tower, overrides, key",
    [
        ("mmoe", {"num_experts": 0}, "model.num_experts"),
        ("mmoe", {"expert_dims": []}, "model.expert_dims"),
        ("ple", {"num_levels": 0}, "model.num_levels"),
        ("ple", {"num_shared_experts": 0, "num_task_experts": 0}, "model.num_shared_experts"),
        ("nope", {}, "model.tower"),
    ],
)
def test_bad_tower_config_names_the_key(tower, overrides, key):
    with pytest.raises(ValueError, match=key):
        build_tower(small_config(tower, **overrides), 10, 2)


def test_gradnorm_layer_needs_a_shared_layer():
    with pytest.raises(ValueError, match="model.bottom_dims"):
        build_tower(small_config("shared_bottom", bottom_dims=[]), 10, 2).last_shared_parameters()


# ---------------------------------------------------------------------------------------------- ESMM


def test_esmm_ctcvr_is_product_of_ctr_and_cvr_probabilities():
    tasks = [TaskConfig("rating", type="regression"), *esmm_tasks()]
    module, heads = build("esmm", 12, tasks)
    assert module.probability_products == {3: (1, 2)}
    assert heads.output_kinds == ["value", "logit", "logit", "probability"]
    outputs = heads(module(torch.randn(64, 12) * 3))
    ctcvr = outputs[:, 3]
    torch.testing.assert_close(ctcvr, torch.sigmoid(outputs[:, 1]) * torch.sigmoid(outputs[:, 2]))
    assert ((ctcvr > 0) & (ctcvr < 1)).all()
    torch.testing.assert_close(predictions(outputs, heads.output_kinds)[:, 3], ctcvr)
    assert len(heads.units) == 3  # CTCVR has no unit of its own


def test_esmm_task_order_comes_from_names():
    tasks = [TaskConfig("buy"), TaskConfig("click"), TaskConfig("buy_given_click")]
    cfg = small_config("esmm", esmm_ctr_task="click", esmm_cvr_task="buy_given_click", esmm_ctcvr_task="buy")
    module, heads = build("esmm", 6, tasks, cfg)
    assert module.probability_products == {0: (1, 2)}
    assert heads.output_kinds == ["probability", "logit", "logit"]


def test_esmm_config_errors_name_the_key():
    with pytest.raises(ValueError, match="model.esmm_cvr_task"):
        build_tower(small_config("esmm", esmm_cvr_task="conversion"), 6, 3, task_names=ESMM_TASK_NAMES)
    with pytest.raises(ValueError, match="task names"):
        build_tower(small_config("esmm"), 6, 3)
    with pytest.raises(ValueError, match="different"):
        build_tower(small_config("esmm", esmm_cvr_task="ctr"), 6, 3, task_names=ESMM_TASK_NAMES)
    regression_ctcvr = [TaskConfig("ctr"), TaskConfig("cvr"), TaskConfig("ctcvr", type="regression")]
    with pytest.raises(ValueError, match="binary"):
        build("esmm", 6, regression_ctcvr)


# ------------------------------------------------------------------------------------------ training


def train(module, heads, balancer, features, labels, label_mask=None, steps=200, lr=1e-2, loss_names=None):
    torch.manual_seed(0)
    optimizer = torch.optim.Adam([*module.parameters(), *heads.parameters(), *balancer.parameters()], lr=lr)
    label_mask = torch.ones_like(labels) if label_mask is None else label_mask
    loss_names = loss_names or ["mse" if kind == "value" else "bce" for kind in heads.output_kinds]
    for _ in range(steps):
        losses = task_losses(
            heads(module(features)),
            labels,
            label_mask,
            torch.ones(len(labels)),
            heads.output_kinds,
            loss_names,
        )
        optimizer.zero_grad()
        balancer(losses).backward()
        optimizer.step()
    return losses


def binary_cross_entropy(probabilities: torch.Tensor, labels: torch.Tensor) -> float:
    return F.binary_cross_entropy(probabilities.clamp(1e-6, 1 - 1e-6), labels).item()


@pytest.mark.parametrize("tower", ["shared_bottom", "mmoe", "ple"])
def test_tower_learns_planted_regression_and_binary_tasks(tower, planted_problem):
    torch.manual_seed(0)
    module, heads = build(tower, planted_problem.features.shape[1], planted_problem.tasks)
    features, labels = planted_problem.split("train")
    train(module, heads, FixedWeights(planted_problem.tasks, ModelConfig()), features, labels)
    test_features, test_labels = planted_problem.split("test")
    with torch.no_grad():
        predicted = predictions(heads(module(test_features)), heads.output_kinds)
    trivial_mse = ((test_labels[:, 0] - labels[:, 0].mean()) ** 2).mean().item()
    mse = ((test_labels[:, 0] - predicted[:, 0]) ** 2).mean().item()
    assert mse < 0.2 * trivial_mse
    trivial_bce = binary_cross_entropy(labels[:, 1].mean().expand(len(test_labels)), test_labels[:, 1])
    assert binary_cross_entropy(predicted[:, 1], test_labels[:, 1]) < 0.8 * trivial_bce


def test_esmm_learns_ctr_ctcvr_and_cvr_over_the_entire_space():
    """Pure ESMM (CVR weight 0): pCVR is learnt only through CTCVR = pCTR × pCVR."""
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(3072, 8, generator=generator)
    a, b = torch.randn(8, generator=generator), torch.randn(8, generator=generator)
    click = (torch.rand(3072, generator=generator) < torch.sigmoid(3.0 * x @ a / a.norm())).float()
    convert = click * (torch.rand(3072, generator=generator) < torch.sigmoid(3.0 * x @ b / b.norm())).float()
    labels = torch.stack([click, convert, convert], dim=1)  # ctr, cvr (on clicks), ctcvr
    label_mask = torch.stack([torch.ones_like(click), click, torch.ones_like(click)], dim=1)
    tasks = esmm_tasks()
    torch.manual_seed(0)
    module, heads = build("esmm", 8, tasks)
    train(
        module,
        heads,
        FixedWeights(tasks, ModelConfig()),
        x[:2048],
        labels[:2048],
        label_mask[:2048],
        steps=150,
    )
    with torch.no_grad():
        predicted = predictions(heads(module(x[2048:])), heads.output_kinds)
    test, train_labels = labels[2048:], labels[:2048]
    for t in (0, 2):  # CTR and CTCVR over all impressions
        trivial = binary_cross_entropy(train_labels[:, t].mean().expand(len(test)), test[:, t])
        assert binary_cross_entropy(predicted[:, t], test[:, t]) < 0.95 * trivial
    clicked = test[:, 0] > 0
    cvr_rate = train_labels[train_labels[:, 0] > 0, 1].mean()
    trivial = binary_cross_entropy(cvr_rate.expand(int(clicked.sum())), test[clicked, 1])
    assert binary_cross_entropy(predicted[clicked, 1], test[clicked, 1]) < 0.95 * trivial


@pytest.mark.parametrize("tower", ["shared_bottom", "mmoe", "ple"])
def test_zero_weight_task_gets_no_gradient(tower, planted_problem):
    module, heads = build(tower, planted_problem.features.shape[1], planted_problem.tasks)
    balancer = FixedWeights(planted_problem.tasks, ModelConfig(alpha=1.0))  # weights (1, 0)
    features, labels = planted_problem.split("train")
    outputs = heads(module(features))
    losses = task_losses(
        outputs, labels, torch.ones_like(labels), torch.ones(len(labels)), heads.output_kinds, ["mse", "bce"]
    )
    balancer(losses).backward()
    second_task = [*heads.units[1].parameters(), *module.task_towers[1].parameters()]
    if tower == "mmoe":
        second_task += module.gates[1].parameters()
    assert all(p.grad is None or not p.grad.any() for p in second_task)
    assert heads.units[0].weight.grad.any()


def test_stacked_experts_equal_independent_expert_mlps():
    from towerrec.models.layers import Experts, Gate

    torch.manual_seed(0)
    experts = Experts(in_dim=6, num_experts=3, dims=[5, 4])
    x = torch.randn(7, 6)
    expected = []
    for e in range(3):  # each expert alone: relu(relu(x W1_e + b1_e) W2_e + b2_e)
        hidden = torch.relu(x @ experts.weights[0][e] + experts.biases[0][e])
        expected.append(torch.relu(hidden @ experts.weights[1][e] + experts.biases[1][e]))
    outputs = experts(x)
    assert outputs.shape == (7, 3, 4)
    torch.testing.assert_close(outputs, torch.stack(expected, dim=1))
    assert experts.last_weights() == [experts.weights[1]]

    gate = Gate(6, 3)
    probabilities = torch.softmax(gate.logits(x), dim=-1)
    mixed = sum(probabilities[:, e : e + 1] * expected[e] for e in range(3))
    torch.testing.assert_close(gate(x, outputs), mixed)


def test_experts_initialise_like_linear_layers():
    from towerrec.models.layers import Experts

    torch.manual_seed(0)
    experts = Experts(in_dim=100, num_experts=4, dims=[64])
    bound = 1.0 / 100**0.5
    assert experts.weights[0].abs().max() <= bound and experts.weights[0].abs().max() > 0.9 * bound
    # independent experts, not copies of one
    assert not torch.equal(experts.weights[0][0], experts.weights[0][1])


@pytest.mark.slow
@pytest.mark.parametrize("tower", ["mmoe", "ple"])
def test_compiled_dense_part_matches_eager(tower):
    """``trainer.compile`` compiles ``MultiTaskModel.dense_forward``: same outputs and gradients."""
    import copy

    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    from towerrec.models.builder import build_model
    from towerrec.trainer.config import load_config

    cfg = load_config("configs/default.yaml", [f"model.tower={tower}", "model.dropout=0.0"])
    names = [f.name for f in cfg.data.sparse]
    torch.manual_seed(0)
    eager = build_model(
        sparse=cfg.data.sparse, num_dense=len(cfg.data.dense), tasks=cfg.tasks, model=cfg.model,
        table_rows={name: 50 for name in names}, embedding_device="cpu",
    )  # fmt: skip
    compiled = copy.deepcopy(eager)
    compiled.compile_dense()
    assert compiled.state_dict().keys() == eager.state_dict().keys()
    batch = 64
    sparse = KeyedJaggedTensor.from_lengths_sync(
        keys=names,
        values=torch.randint(0, 50, (batch * len(names),)),
        lengths=torch.ones(batch * len(names), dtype=torch.int32),
    )
    dense = torch.randn(batch, len(cfg.data.dense))
    outputs = [model(sparse, dense) for model in (eager, compiled)]
    torch.testing.assert_close(outputs[1], outputs[0], rtol=1e-4, atol=1e-5)
    for out in outputs:
        out.square().sum().backward()
    for (name, p_eager), p_compiled in zip(eager.tower.named_parameters(), compiled.tower.parameters()):
        torch.testing.assert_close(p_compiled.grad, p_eager.grad, rtol=1e-4, atol=1e-5, msg=name)
