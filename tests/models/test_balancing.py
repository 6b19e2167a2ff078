"""Loss balancing: fixed, uncertainty (Kendall et al.), PCGrad (Yu et al.) and GradNorm (Chen et al.)."""

from __future__ import annotations

import pytest
import torch

from towerrec.models.balancing import (
    BALANCERS,
    FixedWeights,
    GradNorm,
    PCGrad,
    UncertaintyWeights,
    build_balancer,
    gradient_norms,
    task_gradients,
)
from towerrec.models.config import ModelConfig, TaskConfig
from towerrec.models.heads import TaskHeads, task_losses
from towerrec.models.towers import build_tower

TWO_REGRESSIONS = [TaskConfig("clean", type="regression"), TaskConfig("noisy", type="regression")]
SMALL = ModelConfig(bottom_dims=[16, 8], head_dims=[8])


def regression_problem(noise: tuple[float, float], scale: tuple[float, float] = (1.0, 1.0), seed: int = 0):
    """Two regression labels with the same planted signal, each with its own noise and scale."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(512, 6, generator=generator)
    signal = x @ torch.randn(6, generator=generator)
    labels = [s * (signal + n * torch.randn(512, generator=generator)) for n, s in zip(noise, scale)]
    return x, torch.stack(labels, dim=1)


def model_losses(tower, heads, x, labels):
    outputs = heads(tower(x))
    return task_losses(
        outputs, labels, torch.ones_like(labels), torch.ones(len(x)), heads.output_kinds, ["mse", "mse"]
    )


@pytest.mark.parametrize("name", sorted(BALANCERS))
def test_every_balancer_builds_and_reduces_to_a_scalar(name):
    balancer = build_balancer(ModelConfig(loss_balancing=name), TWO_REGRESSIONS)
    losses = torch.tensor([0.5, 2.0])
    assert balancer(losses).shape == ()
    assert balancer.weights().shape == (2,)
    assert balancer.gradient_surgery == (name == "pcgrad")
    assert balancer.gradient_norm_balancing == (name == "gradnorm")


def test_fixed_weights_alpha():
    balancer = FixedWeights(TWO_REGRESSIONS, ModelConfig(alpha=0.25))
    torch.testing.assert_close(balancer(torch.tensor([4.0, 8.0])), torch.tensor(0.25 * 4 + 0.75 * 8))
    with pytest.raises(ValueError, match="model.alpha"):
        FixedWeights([*TWO_REGRESSIONS, TaskConfig("c")], ModelConfig(alpha=0.5))


# --------------------------------------------------------------------------------------- uncertainty


def test_uncertainty_loss_form():
    tasks = [TaskConfig("rating", type="regression"), TaskConfig("click"), TaskConfig("off", weight=0.0)]
    balancer = UncertaintyWeights(tasks, ModelConfig())
    with torch.no_grad():
        balancer.log_variances.copy_(torch.tensor([0.3, -0.2, 1.0]))
    s, losses = balancer.log_variances.detach(), torch.tensor([2.0, 0.7, 5.0])
    expected = 0.5 * torch.exp(-s[0]) * losses[0] + 0.5 * s[0] + torch.exp(-s[1]) * losses[1] + 0.5 * s[1]
    torch.testing.assert_close(balancer(losses), expected)
    torch.testing.assert_close(
        balancer.weights(), torch.stack([0.5 * torch.exp(-s[0]), torch.exp(-s[1]), torch.tensor(0.0)])
    )


def test_uncertainty_down_weights_the_task_with_label_noise():
    torch.manual_seed(0)
    x, labels = regression_problem(noise=(0.05, 1.5))
    tower = build_tower(SMALL, 6, 2)
    heads = TaskHeads(TWO_REGRESSIONS, tower.out_dim)
    balancer = UncertaintyWeights(TWO_REGRESSIONS, SMALL)
    torch.testing.assert_close(balancer.weights(), torch.tensor([0.5, 0.5]))
    optimizer = torch.optim.Adam([*tower.parameters(), *heads.parameters(), *balancer.parameters()], lr=1e-2)
    for _ in range(300):
        optimizer.zero_grad()
        balancer(model_losses(tower, heads, x, labels)).backward()
        optimizer.step()
    clean, noisy = balancer.weights()
    assert noisy < 0.5 < clean
    assert noisy < 0.2 * clean


# -------------------------------------------------------------------------------------------- PCGrad


def test_pcgrad_projects_conflicting_gradients():
    balancer = PCGrad(TWO_REGRESSIONS, ModelConfig())
    # two shared parameters, shapes (2,) and (1,1): g_0 = [1, 0, 0], g_1 = [-1, 1, 0]; g_0 · g_1 = -1 < 0
    g0 = [torch.tensor([1.0, 0.0]), torch.tensor([[0.0]])]
    g1 = [torch.tensor([-1.0, 1.0]), torch.tensor([[0.0]])]
    combined = balancer.surgery([g0, g1])
    assert [c.shape for c in combined] == [(2,), (1, 1)]
    flat = torch.cat([c.reshape(-1) for c in combined])
    # g_0' = g_0 + ½ g_1 = [0.5, 0.5, 0];  g_1' = g_1 + g_0 = [0, 1, 0]
    torch.testing.assert_close(flat, torch.tensor([0.5, 1.5, 0.0]))
    for original in (g0, g1):
        assert flat @ torch.cat([g.reshape(-1) for g in original]) >= 0


def test_pcgrad_sums_non_conflicting_gradients_unchanged():
    balancer = PCGrad(TWO_REGRESSIONS, ModelConfig())
    g0 = [torch.tensor([1.0, 0.0]), torch.tensor([0.5])]
    g1 = [torch.tensor([1.0, 1.0]), torch.tensor([-0.5])]
    combined = balancer.surgery([g0, g1])
    for c, a, b in zip(combined, g0, g1):
        torch.testing.assert_close(c, a + b)


def test_pcgrad_order_is_deterministic_per_seed_and_step():
    torch.manual_seed(0)
    per_task = [[torch.randn(4), torch.randn(3, 2)] for _ in range(4)]
    tasks = [TaskConfig(str(t)) for t in range(4)]
    first, second = PCGrad(tasks, ModelConfig()), PCGrad(tasks, ModelConfig())
    for _ in range(3):
        for a, b in zip(first.surgery(per_task), second.surgery(per_task)):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert int(first.num_surgeries) == 3


def test_pcgrad_trainer_recipe_on_a_real_tower():
    torch.manual_seed(0)
    x, labels = regression_problem(noise=(0.1, 0.1), scale=(1.0, -1.0))  # opposite targets: conflict
    tower = build_tower(SMALL, 6, 2)
    heads = TaskHeads(TWO_REGRESSIONS, tower.out_dim)
    balancer = PCGrad(TWO_REGRESSIONS, SMALL)
    losses = model_losses(tower, heads, x, labels)
    loss = balancer(losses)
    shared = tower.shared_parameters()
    grads = task_gradients(balancer.weights() * losses, shared)
    loss.backward()
    plain_sum = [p.grad.clone() for p in shared]
    for g_sum, g0, g1 in zip(plain_sum, *grads):
        torch.testing.assert_close(g_sum, g0 + g1)
    combined = balancer.surgery(grads)
    for param, grad in zip(shared, combined):
        assert grad.shape == param.shape
        param.grad = grad
    flat = torch.cat([g.reshape(-1) for g in combined])
    for task_grads in grads:
        assert flat @ torch.cat([g.reshape(-1) for g in task_grads]) >= -1e-6


# ------------------------------------------------------------------------------------------ GradNorm


def gradnorm_steps(balancer, losses_of_step, norms_of_step, num_steps: int = 200, lr: float = 0.02):
    optimizer = torch.optim.Adam(balancer.parameters(), lr=lr)
    for step in range(num_steps):
        optimizer.zero_grad()
        balancer.gradnorm_loss(losses_of_step(step), norms_of_step(step)).backward()
        optimizer.step()
        balancer.renormalize()
        weights = balancer.weights()
        assert (weights > 0).all()
        torch.testing.assert_close(weights.sum(), torch.tensor(2.0))


def test_gradnorm_reduces_the_weight_of_the_task_with_too_large_gradients():
    balancer = GradNorm(TWO_REGRESSIONS, ModelConfig(loss_balancing="gradnorm"))
    gradnorm_steps(balancer, lambda step: torch.tensor([1.0, 1.0]), lambda step: torch.tensor([10.0, 1.0]))
    big, small = balancer.weights()
    assert big < 0.5 < small
    # equilibrium: equal weighted gradient norms, w_0 · 10 = w_1 · 1
    torch.testing.assert_close(big * 10, small, rtol=0.1, atol=0.0)


def test_gradnorm_favours_the_task_that_trains_slower():
    balancer = GradNorm(TWO_REGRESSIONS, ModelConfig(loss_balancing="gradnorm"))
    losses = lambda step: torch.tensor([1.0, 1.0]) if step == 0 else torch.tensor([0.1, 0.9])  # noqa: E731
    gradnorm_steps(balancer, losses, lambda step: torch.tensor([1.0, 1.0]))
    fast, slow = balancer.weights()
    assert fast < slow
    torch.testing.assert_close(balancer.initial_losses, torch.tensor([1.0, 1.0]))


def test_gradnorm_trainer_recipe_on_a_real_tower():
    torch.manual_seed(0)
    x, labels = regression_problem(noise=(0.1, 0.1), scale=(10.0, 1.0))  # task 0: 10× larger gradients
    tower = build_tower(SMALL, 6, 2)
    heads = TaskHeads(TWO_REGRESSIONS, tower.out_dim)
    balancer = GradNorm(TWO_REGRESSIONS, ModelConfig(loss_balancing="gradnorm"))
    network = [*tower.parameters(), *heads.parameters()]
    optimizer = torch.optim.Adam([*network, *balancer.parameters()], lr=1e-2)
    for _ in range(60):
        optimizer.zero_grad()
        losses = model_losses(tower, heads, x, labels)
        loss = balancer(losses)
        norms = gradient_norms(task_gradients(losses, tower.last_shared_parameters()))
        (loss + balancer.gradnorm_loss(losses, norms)).backward()
        optimizer.step()
        balancer.renormalize()
    large, small = balancer.weights()
    assert 0 < large < small
    torch.testing.assert_close(balancer.weights().sum(), torch.tensor(2.0))


def test_gradnorm_leaves_zero_weight_tasks_out():
    tasks = [*TWO_REGRESSIONS, TaskConfig("cvr", weight=0.0)]
    balancer = GradNorm(tasks, ModelConfig(loss_balancing="gradnorm"))
    optimizer = torch.optim.SGD(balancer.parameters(), lr=0.1)
    for _ in range(5):
        optimizer.zero_grad()
        balancer.gradnorm_loss(torch.tensor([1.0, 1.0, 1.0]), torch.tensor([3.0, 1.0, 5.0])).backward()
        optimizer.step()
        balancer.renormalize()
    weights = balancer.weights()
    assert weights[2] == 0 and (weights[:2] > 0).all()
    torch.testing.assert_close(weights.sum(), torch.tensor(2.0))
    torch.testing.assert_close(balancer(torch.tensor([1.0, 2.0, 100.0])), weights[0] + 2 * weights[1])
