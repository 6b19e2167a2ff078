"""Combining per-task losses into the training loss.

A balancer is an ``nn.Module`` (some hold learnable weights, trained with the dense parameters):
``forward(losses: (T,)) -> scalar``; ``weights()`` reports the current effective task weights (T,).

Two class attributes tell the trainer whether a balancer needs more than ``loss.backward()``:

- ``gradient_surgery`` (PCGrad): the shared tower gradients are replaced by ``surgery(...)``;
- ``gradient_norm_balancing`` (GradNorm): ``gradnorm_loss(...)`` is added to the loss and
  ``renormalize()`` is called after each optimizer step.

The exact training-step recipes are in the docstrings of ``PCGrad`` and ``GradNorm``. Both use
``task_gradients`` to get each task's gradient wrt some tower parameters. Parameters outside that
set (embedding tables, whose optimizer is fused into backward; task-specific layers) always get
the gradient of the plain ``forward`` loss.

Every balancer starts from the fixed task weights λ_t (``weight`` of each task, or ``model.alpha``
for two tasks): a task with λ_t = 0 (e.g. ESMM's CVR) is left out of the loss by all of them.
"""

from __future__ import annotations

import torch
from torch import nn

from towerrec.models.config import ModelConfig, TaskConfig


def fixed_task_weights(tasks: list[TaskConfig], cfg: ModelConfig) -> torch.Tensor:
    """λ (T,): ``[alpha, 1 - alpha]`` when ``model.alpha`` is set (2 tasks), else each task's ``weight``."""
    if cfg.alpha is not None:
        if len(tasks) != 2:
            raise ValueError(f"model.alpha: needs exactly 2 tasks, the config has {len(tasks)}")
        return torch.tensor([cfg.alpha, 1.0 - cfg.alpha], dtype=torch.float32)
    return torch.tensor([task.weight for task in tasks], dtype=torch.float32)


def task_gradients(losses: torch.Tensor, params: list[torch.Tensor]) -> list[list[torch.Tensor]]:
    """For each task t, the gradients of ``losses[t]`` wrt ``params`` (zeros where it does not reach).

    Keeps the graph (``retain_graph=True``) for the backward of the total loss that follows; no
    second-order graph is built. ``losses`` (T,) → T lists of tensors shaped like ``params``.
    """
    return [
        list(torch.autograd.grad(loss, params, retain_graph=True, materialize_grads=True))
        for loss in losses.unbind()
    ]


def gradient_norms(per_task_grads: list[list[torch.Tensor]]) -> torch.Tensor:
    """L2 norm of each task's gradients, all parameters together. T lists → (T,)."""
    return torch.stack([torch.cat([g.reshape(-1) for g in grads]).norm() for grads in per_task_grads])


class FixedWeights(nn.Module):
    """loss = Σ_t w_t · L_t, with w from each task's ``weight`` or, for two tasks, ``model.alpha``:
    loss = alpha · L_0 + (1 - alpha) · L_1 (the original design)."""

    gradient_surgery = False
    gradient_norm_balancing = False

    def __init__(self, tasks: list[TaskConfig], cfg: ModelConfig):
        super().__init__()
        self.register_buffer("_weights", fixed_task_weights(tasks, cfg), persistent=False)

    def forward(self, losses: torch.Tensor) -> torch.Tensor:
        return (self._weights * losses).sum()

    def weights(self) -> torch.Tensor:
        return self._weights


class UncertaintyWeights(nn.Module):
    """Homoscedastic uncertainty weighting (Kendall, Gal & Cipolla, CVPR 2018).

    One learnable s_t = log σ_t² per task, initialised to 0 (all multipliers start at 1 or 0.5):

        regression (value outputs):         0.5 · exp(-s_t) · L_t + 0.5 · s_t
        classification (binary tasks):            exp(-s_t) · L_t + 0.5 · s_t
        loss = Σ_t λ_t · (that term)              (λ_t: fixed weight; 0 leaves a task out)

    Why this form: a Gaussian likelihood with variance σ² gives -log p = ‖y - f‖² / (2σ²) + log σ,
    i.e. 0.5 · e^{-s} · L + 0.5 · s with L the squared error (Huber is treated alike); for a
    classifier whose logits are scaled by 1/σ² the paper's approximation gives L / σ² + log σ, i.e.
    e^{-s} · L + 0.5 · s. Learning s = log σ² rather than σ keeps the parameter unconstrained and
    the loss free of division by zero. At the optimum e^{s_t} = L_t (regression) or 2 · L_t
    (classification): a noisier task (larger irreducible loss) gets a smaller multiplier.

    ``weights()`` returns the multipliers of L_t: λ_t · 0.5 · e^{-s_t} or λ_t · e^{-s_t}.
    Trainer: s lives in this module; it is optimised with the dense optimizer, best without weight
    decay (decay pulls every s_t to 0, i.e. towards equal weights).
    """

    gradient_surgery = False
    gradient_norm_balancing = False

    def __init__(self, tasks: list[TaskConfig], cfg: ModelConfig):
        super().__init__()
        self.log_variances = nn.Parameter(torch.zeros(len(tasks)))
        scales = [0.5 if task.type == "regression" else 1.0 for task in tasks]
        self.register_buffer("_scales", torch.tensor(scales), persistent=False)
        self.register_buffer("_fixed", fixed_task_weights(tasks, cfg), persistent=False)

    def forward(self, losses: torch.Tensor) -> torch.Tensor:
        terms = self._scales * torch.exp(-self.log_variances) * losses + 0.5 * self.log_variances
        return (self._fixed * terms).sum()

    def weights(self) -> torch.Tensor:
        return (self._fixed * self._scales * torch.exp(-self.log_variances)).detach()


class PCGrad(FixedWeights):
    """Projecting conflicting gradients (Yu et al., NeurIPS 2020) on the tower's shared parameters.

    ``forward`` is the fixed weighted sum Σ_t λ_t L_t (that is what every non-shared parameter,
    embeddings included, is trained with). ``surgery`` combines the per-task gradients of the
    shared parameters: for each task i, in a random order of the other tasks j, if g_i' · g_j < 0
    then g_i' ← g_i' - (g_i' · g_j / ‖g_j‖²) g_j (g_j the original gradient, dot products over all
    shared parameters flattened together); the result is Σ_i g_i'. Non-conflicting gradients are
    summed unchanged. The order comes from a ``torch.Generator`` seeded with ``model.pcgrad_seed``
    and the call count (a buffer, so a resumed run draws the same orders).

    Trainer, per step (manual optimisation)::

        losses = model.losses(outputs, labels, label_mask, weights)            # (T,)
        loss = balancer(losses)
        shared = model.tower.shared_parameters()
        grads = task_gradients(balancer.weights() * losses, shared)           # before backward
        loss.backward()              # all grads (embeddings: fused update inside backward)
        # data parallel: all-reduce (average) every tensor of `grads` over ranks first: exact
        # PCGrad on the global batch (averaging `combined` instead is cheaper: PCGrad per rank).
        # Either way every rank must end with the same grads; models/ has no collectives.
        combined = balancer.surgery(grads)
        for param, grad in zip(shared, combined):
            param.grad = grad                                                  # replaces the sum
        optimizer.step()

    With Lightning's automatic optimisation: compute ``grads`` in ``training_step`` (before
    returning ``loss``) and do the surgery and the ``param.grad`` replacement in
    ``on_after_backward`` (after backward and the trainer's averaging of the dense gradients over
    ranks, before the optimizer step). ``torch.autograd.grad`` does not accumulate into ``.grad``,
    so it does not trigger the fused embedding update.
    """

    gradient_surgery = True

    def __init__(self, tasks: list[TaskConfig], cfg: ModelConfig):
        super().__init__(tasks, cfg)
        self.seed = cfg.pcgrad_seed
        self.register_buffer("num_surgeries", torch.zeros((), dtype=torch.int64))

    def surgery(self, per_task_grads: list[list[torch.Tensor]]) -> list[torch.Tensor]:
        """T lists (one per task) of P gradients (same parameter order) → P combined gradients."""
        if len({len(grads) for grads in per_task_grads}) != 1:
            raise ValueError("PCGrad.surgery: every task needs one gradient per shared parameter")
        like = per_task_grads[0]
        flat = torch.stack(
            [torch.cat([g.reshape(-1).float() for g in grads]) for grads in per_task_grads]
        )  # (T, N)
        squared_norms = (flat * flat).sum(dim=1).clamp_min(1e-20)  # (T,)
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + int(self.num_surgeries))
        self.num_surgeries += 1
        projected = flat.clone()
        num_tasks = len(per_task_grads)
        for i in range(num_tasks):
            for j in torch.randperm(num_tasks, generator=generator).tolist():
                if j != i:
                    conflict = (projected[i] @ flat[j]).clamp(max=0.0)  # < 0 only when they conflict
                    projected[i] = projected[i] - conflict / squared_norms[j] * flat[j]
        combined = projected.sum(dim=0)
        sizes = [g.numel() for g in like]
        return [part.view_as(g).to(g.dtype) for part, g in zip(combined.split(sizes), like)]


class GradNorm(nn.Module):
    """Gradient normalisation (Chen et al., ICML 2018): learnable task weights w_t.

    loss = Σ_t w_t · L_t with w detached (w is trained only by the GradNorm objective):

        G_t = w_t · ‖∇_W L_t‖        W = ``tower.last_shared_parameters()`` (the last shared layer:
                                      bottom MLP's last weight, MMoE experts' / PLE final shared
                                      experts' last weights, all flattened together)
        r_t = (L_t / L_t(0)) / mean_u (L_u / L_u(0))      L_t(0): first non-zero loss (a buffer)
        gradnorm_loss = Σ_t | G_t - sg[ mean_u(G_u) · r_t^α ] |      α = ``model.gradnorm_alpha``

    After each optimizer step ``renormalize()`` clamps w_t to at least ``min_weight`` and rescales
    so Σ_t w_t = T (the number of tasks with λ_t > 0; tasks with λ_t = 0 keep w_t = 0 and are left
    out of everything). A task whose gradient is too large for its training rate gets G_t above
    target, so its weight goes down.

    Trainer, per step::

        losses = model.losses(outputs, labels, label_mask, weights)            # (T,)
        loss = balancer(losses)
        norms = gradient_norms(task_gradients(losses, model.tower.last_shared_parameters()))
        (loss + balancer.gradnorm_loss(losses, norms)).backward()             # w.grad from 2nd term
        optimizer.step()             # w is a dense parameter of this module (no weight decay)
        balancer.renormalize()

    With Lightning's automatic optimisation: return ``loss + gradnorm_loss`` from
    ``training_step`` and call ``renormalize()`` in ``on_train_batch_end`` (after the step).
    ``norms`` are of the *unweighted* L_t and are detached; only w gets the GradNorm gradient.
    Data parallel: the trainer averages w's gradient over ranks like any dense parameter; for
    identical w on every rank it also averages ``losses`` and ``norms`` before ``gradnorm_loss``.
    """

    gradient_surgery = False
    gradient_norm_balancing = True
    min_weight = 1e-3

    def __init__(self, tasks: list[TaskConfig], cfg: ModelConfig):
        super().__init__()
        active = (fixed_task_weights(tasks, cfg) > 0).float()
        if not active.any():
            raise ValueError("model.loss_balancing=gradnorm: every task has weight 0")
        self.alpha = cfg.gradnorm_alpha
        self.task_weights = nn.Parameter(active.clone())
        self.register_buffer("_active", active, persistent=False)
        self.register_buffer("initial_losses", torch.zeros(len(tasks)))
        self.register_buffer("initial_recorded", torch.zeros(len(tasks), dtype=torch.bool))

    def forward(self, losses: torch.Tensor) -> torch.Tensor:
        return (self.weights() * losses).sum()

    def weights(self) -> torch.Tensor:
        return self.task_weights.detach() * self._active

    def gradnorm_loss(self, losses: torch.Tensor, shared_grad_norms: torch.Tensor) -> torch.Tensor:
        """The L1 GradNorm objective; its gradient reaches ``task_weights`` only. Both inputs (T,)."""
        losses, norms = losses.detach(), shared_grad_norms.detach()
        with torch.no_grad():
            newly = ~self.initial_recorded & (losses > 0)
            self.initial_losses.copy_(torch.where(newly, losses, self.initial_losses))
            self.initial_recorded |= newly
        counted = self._active * self.initial_recorded  # (T,) 0/1
        num_counted = counted.sum().clamp_min(1)
        training_rates = losses / self.initial_losses.clamp_min(1e-12) * counted
        relative_rates = training_rates / (training_rates.sum() / num_counted).clamp_min(1e-12)
        grad_norms = self.task_weights * norms  # G_t = ‖∇_W w_t L_t‖
        target = ((grad_norms * counted).sum() / num_counted * relative_rates**self.alpha).detach()
        return ((grad_norms - target).abs() * counted).sum()

    @torch.no_grad()
    def renormalize(self) -> None:
        """Clamp each active w_t to >= ``min_weight``, then rescale so they sum to the number of active tasks."""
        weights = self.task_weights.clamp_min(self.min_weight) * self._active
        self.task_weights.copy_(weights * (self._active.sum() / weights.sum()))


BALANCERS: dict[str, type[nn.Module]] = {
    "fixed": FixedWeights,
    "uncertainty": UncertaintyWeights,
    "pcgrad": PCGrad,
    "gradnorm": GradNorm,
}


def build_balancer(cfg: ModelConfig, tasks: list[TaskConfig]) -> nn.Module:
    if cfg.loss_balancing not in BALANCERS:
        raise ValueError(
            f"model.loss_balancing: unknown method {cfg.loss_balancing!r}; choose one of {sorted(BALANCERS)}"
        )
    return BALANCERS[cfg.loss_balancing](tasks, cfg)
