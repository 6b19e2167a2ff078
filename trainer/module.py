"""The LightningModule: builds the model on ``meta``, hands it to the strategy for sharding, and
runs the training/evaluation steps with per-task losses and metrics."""

from __future__ import annotations

import math
import time
from typing import Any

import lightning as L
import torch
from torchrec.optim.optimizers import in_backward_optimizer_filter

from towerrec.data.batch import Batch
from towerrec.models.balancing import fixed_task_weights, task_gradients
from towerrec.models.builder import build_model, embedding_tables
from towerrec.models.dynamic_ids import DynamicIds
from towerrec.models.heads import predictions
from towerrec.models.multitask import MultiTaskModel
from towerrec.trainer.config import Config, evaluation_group_column
from towerrec.trainer.distributed.collectives import ProcessGroupCollectives
from towerrec.trainer.distributed.faults import PreemptionFlag
from towerrec.trainer.distributed.sharding import EmbeddingGradientGate
from towerrec.trainer.dynamic_ids import SETTINGS_KEY, check_checkpoint, settings_of
from towerrec.trainer.errors import NonFiniteLossError
from towerrec.trainer.metrics import task_metrics, trivial_baseline


class TrainingModel(MultiTaskModel):
    """A MultiTaskModel whose forward takes a Batch and also returns the per-task loss sums, the
    form TorchRec's train pipelines call: ``model(batch) -> (loss sums (2, T), outputs (B, T))``
    (row 0: Σ w·ℓ, row 1: Σ w; see ``towerrec.models.heads.task_loss_sums``). Its state dict is the
    MultiTaskModel's, so checkpoints and exports see the same keys."""

    def forward(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        outputs = super().forward(batch.sparse, batch.dense, batch.sequences)
        return self.loss_sums(outputs, batch.labels, batch.label_mask, batch.weights), outputs


def dense_optimizer(params: list[torch.nn.Parameter], opt) -> torch.optim.Optimizer:
    """The dense parameters' optimizer (``trainer.dense_optimizer``), with PyTorch's fused kernel:
    one call updates every parameter (the per-tensor loop costs ~50 us a parameter a step)."""
    common = {"lr": opt.lr, "weight_decay": opt.weight_decay, "fused": True}
    if opt.type == "adam":
        return torch.optim.Adam(params, eps=opt.eps, **common)
    if opt.type == "adamw":
        return torch.optim.AdamW(params, eps=opt.eps, **common)
    if opt.type == "adagrad":
        return torch.optim.Adagrad(params, eps=opt.eps, **common)
    return torch.optim.SGD(params, momentum=opt.momentum, **common)


class _StepOutcome:
    """What the host must learn of a training step, ``flags`` = (the sum of the global task losses,
    finite exactly when all are; preemption requested), computed on the device, and the global
    per-task losses (T,) and batch size for logs. On CUDA the flags are copied to pinned host memory
    without blocking when they are computed; ``read()`` then waits for that copy only (an event),
    not for the work queued after it (the backward)."""

    def __init__(self, flags: torch.Tensor, global_losses: torch.Tensor, batch_size: int):
        self.flags, self.global_losses, self.batch_size = flags, global_losses, batch_size
        if flags.device.type == "cuda":
            self._host = torch.empty(flags.shape, dtype=flags.dtype, pin_memory=True)
            self._host.copy_(flags, non_blocking=True)
            self._copied = torch.cuda.Event()
            self._copied.record()
        else:
            self._host, self._copied = flags, None

    def read(self) -> tuple[bool, bool]:
        """(finite, preempt): the step's one host synchronisation."""
        if self._copied is not None:
            self._copied.synchronize()
        total, preempt = self._host.tolist()
        return math.isfinite(total), preempt > 0


class MultiTaskModule(L.LightningModule):
    """Args:
    cfg: the run configuration (the module is the training recipe: it reads most sections).
    table_rows: rows of each sparse feature's table (config or data set metadata).
    """

    def __init__(self, cfg: Config, table_rows: dict[str, int]):
        super().__init__()
        self.automatic_optimization = False  # see training_step
        self.cfg = cfg
        self.table_rows = table_rows
        self.tables = embedding_tables(cfg.data.sparse, table_rows, cfg.sharding.embedding_precision)
        self.task_names = [t.name for t in cfg.tasks]
        self.task_types = [t.type for t in cfg.tasks]
        self.model: torch.nn.Module | None = None
        # id maps of id_mapping: dynamic tables, replicated (towerrec.trainer.dynamic_ids maps batches)
        self.dynamic_ids = DynamicIds.of(cfg.data.sparse)
        self.preemption = PreemptionFlag()
        self.preempt_now = False
        self.skip_step = False
        self.gradient_gate: EmbeddingGradientGate | None = None
        self._pcgrad = None
        self._step: _StepOutcome | None = None
        self.current_position = -1
        self.skipped_batches = 0
        self._train_seconds_before = 0.0  # earlier fit sessions of this run (from the checkpoint)
        self._session_started: float | None = None
        self.last_metrics: dict[str, dict[str, dict[str, float]]] = {}
        self.last_baseline: dict[str, dict[str, dict[str, float]]] = {}
        self._eval_rows: list[tuple[torch.Tensor, ...]] = []
        self.group_column = evaluation_group_column(cfg)
        """Column of the user of each evaluation row (GAUC), or None."""

    # ------------------------------------------------------------------------------ model
    def build_model(self, **options) -> TrainingModel:
        """The unsharded model: tables on ``meta`` (the sharder materialises them), dense part seeded.
        ``options`` go to ``towerrec.models.builder.build_model`` (e.g. ``tower=`` your own tower):
        override this method in a subclass to change the model."""
        torch.manual_seed(self.cfg.seed)
        return build_model(
            **options,
            sparse=self.cfg.data.sparse,
            num_dense=len(self.cfg.data.dense),
            tasks=self.cfg.tasks,
            model=self.cfg.model,
            table_rows=self.table_rows,
            precision=self.cfg.sharding.embedding_precision,
            embedding_device="meta",
            model_class=TrainingModel,
        )

    defer_step_check_on: tuple[str, ...] = ("cuda",)
    """Device types on which the host reads a step's outcome after backward (see ``combined_loss``)."""

    def configure_model(self) -> None:
        if self.model is None:
            self.model = self.trainer.strategy.shard(self.build_model(), self.tables)
            if self.cfg.trainer.compile:
                self.inner.compile_dense()
            device = self.trainer.strategy.root_device
            if (
                device.type in self.defer_step_check_on
                and self.cfg.trainer.embedding_optimizer.type in EmbeddingGradientGate.GATED_OPTIMIZERS
                and EmbeddingGradientGate.covers(self.model)
            ):
                self.gradient_gate = EmbeddingGradientGate(self.model, device)

    @property
    def inner(self) -> MultiTaskModel:
        """The MultiTaskModel inside DMP (for losses and output kinds)."""
        return self.model.module

    def forward(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """(losses (T,), outputs (B, T)) of a batch."""
        return self.model(batch)

    # ------------------------------------------------------------------------------ training
    def on_train_start(self) -> None:
        self._session_started = time.perf_counter()

    def train_seconds(self) -> float:
        """Training time of this run, summed over its fit sessions."""
        session = time.perf_counter() - self._session_started if self._session_started is not None else 0.0
        return self._train_seconds_before + session

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["train_seconds"] = self.train_seconds()
        if self.dynamic_ids is not None:
            checkpoint[SETTINGS_KEY] = settings_of(self.dynamic_ids)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._train_seconds_before = float(checkpoint.get("train_seconds", 0.0))
        check_checkpoint(checkpoint, self.dynamic_ids, self.cfg.data.sparse)

    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        self.seed_step()
        self.trainer.datamodule.train_stream.mark_consumed(batch.position)
        self.current_position = batch.position

    def seed_step(self) -> None:
        """Dropout randomness is a function of (seed, step, rank): identical after a resume. Seeds only
        the generators this rank draws from (torch.manual_seed visits every backend: ~90 us a step)."""
        seed = (self.cfg.seed * 1_000_003 + self.global_step) * 1009 + self.global_rank
        torch.default_generator.manual_seed(seed)
        if self.device.type == "cuda":
            torch.cuda.manual_seed(seed)

    def training_step(self, batch: Batch, batch_idx: int) -> None:
        """One step, in this order on every rank (Lightning's manual optimisation: its automatic
        one adds a closure, precision wrappers and six callback hooks a step for nothing we use):
        zero the dense gradients, forward, the global loss (``combined_loss``), backward with the
        tables' fused update and the dense all-reduce (``backward``), the dense step (``dense_step``)."""
        self.optimizers().zero_grad()
        loss_sums = self.step_loss_sums(self(batch)[0])
        self.backward_and_reduce(self.combined_loss(loss_sums, batch.batch_size))
        self.dense_step()

    def backward_and_reduce(self, loss: torch.Tensor | None) -> None:
        """Backward (outside autocast, as Lightning's automatic step runs it) and ``after_backward``;
        None (a skipped batch): nothing."""
        self.skip_step = loss is None
        if loss is None:
            return
        with torch.autocast(self.device.type, enabled=False):
            loss.backward()
        self.after_backward()

    def dense_step(self) -> None:
        """Clips and steps the dense optimizer and the learning-rate schedule. A skipped batch left no
        gradient: the step changes nothing but counts (``global_step``, the schedule, ``max_steps``)."""
        optimizer = self.optimizers()
        if self.cfg.trainer.gradient_clip_val:
            self.clip_gradients(optimizer, gradient_clip_val=self.cfg.trainer.gradient_clip_val)
        optimizer.step()
        if self.inner.balancer.gradient_norm_balancing and not self.skip_step:
            self.inner.balancer.renormalize()  # GradNorm: right after the step, before any checkpoint
        scheduler = self.lr_schedulers()
        if scheduler is not None:
            scheduler.step()

    def step_loss_sums(self, model_output) -> torch.Tensor:
        """The per-task loss sums (2, T) of what the model's forward returned first (the multi-task
        model returns them; a retrieval model returns its tower outputs, scored here)."""
        return model_output

    def combined_loss(self, loss_sums: torch.Tensor, batch_size: int) -> torch.Tensor | None:
        """This rank's per-task loss sums (2, T) → the loss it back-propagates, or None to skip the
        batch on every rank.

        One all-reduce gives every rank the global batch's per-task sums and the preemption flag, so
        all ranks skip, stop or go on together. Each task's loss is divided by the weight sum of the
        *global* batch and this rank's share is scaled by the world size: the mean over ranks of the
        gradients (the dense all-reduce, TorchRec's gradient division of embedding gradients) is then
        the gradient a single process computes on the global batch, whatever the masks and sample
        weights put on each rank. Balancers and logs see the global per-task losses.

        The host learns the outcome (losses finite? preemption?) in one read per step
        (``read_step_status``): here, before backward, where reading is free (a CPU) or the
        embedding optimizer needs it (Adam); on CUDA otherwise after backward was launched
        (``after_backward``), the tables' gradients being zeroed on the device when a loss was not
        finite (``EmbeddingGradientGate``), so the host never waits for the device mid-step.
        """
        sums = loss_sums[0]
        world_size = self.trainer.world_size
        preempt = torch.full((1,), float(self.preemption.requested), device=sums.device, dtype=sums.dtype)
        agreed = self.trainer.strategy.all_reduce_sum(torch.cat([loss_sums.detach().reshape(-1), preempt]))
        num_tasks = len(self.task_names)
        denominators = agreed[num_tasks : 2 * num_tasks].clamp_min(1e-12)
        global_losses = agreed[:num_tasks] / denominators
        # (Σ task losses, preemption): the sum is finite exactly when every loss is (or > 3e38)
        self._step = _StepOutcome(torch.stack([global_losses.sum(), agreed[-1]]), global_losses, batch_size)
        if self.gradient_gate is None:
            if not self.read_step_status():
                return None
        else:
            finite = torch.isfinite(self._step.flags[0])
            self.gradient_gate.close_unless(finite)
            global_losses = torch.where(finite, global_losses, torch.zeros_like(global_losses))
        shares = sums * (world_size / denominators)  # mean over ranks = global_losses, with gradients
        balancer = self.inner.balancer
        loss = balancer(shares)
        if balancer.gradient_surgery:  # PCGrad on the shared tower; see after_backward
            shared = list(self.inner.tower.shared_parameters())
            self._pcgrad = (shared, task_gradients(balancer.weights().detach() * shares, shared))
        if balancer.gradient_norm_balancing:  # GradNorm: norms of the global per-task gradients
            last = list(self.inner.tower.last_shared_parameters())
            per_task = task_gradients(shares, last)
            flat = [torch.cat([g.reshape(-1) for g in grads]) for grads in per_task]
            averaged = self.trainer.strategy.mean_over_ranks(flat)
            loss = loss + balancer.gradnorm_loss(global_losses, torch.stack([g.norm() for g in averaged]))
        return loss

    def read_step_status(self) -> bool:
        """The step's one host read (``_StepOutcome``): sets ``preempt_now``; on a non-finite loss
        stops (``trainer.non_finite_loss: stop``) or counts the skipped batch and returns False;
        every ``log_every_n_steps`` steps logs the losses."""
        step = self._step
        finite, self.preempt_now = step.read()
        if not finite:
            self.non_finite_loss(step.global_losses)
            return False
        # the steps whose row Lightning writes (self.log costs ~0.3 ms a call): a row then holds this
        # step's losses, not those of a step logged earlier
        if (self.global_step + 1) % self.cfg.trainer.log_every_n_steps == 0:
            with torch.no_grad():
                total = self.inner.balancer(step.global_losses)
            self.log(
                "train/loss", total, prog_bar=True, batch_size=step.batch_size, on_step=True, on_epoch=False
            )
            for name, value in zip(self.task_names, step.global_losses):
                self.log(
                    f"train/{name}/loss", value, batch_size=step.batch_size, on_step=True, on_epoch=False
                )
        return True

    def non_finite_loss(self, global_losses: torch.Tensor) -> None:
        """Raises ``NonFiniteLossError`` (policy stop, or too many skips) or reports a skipped batch."""
        values = global_losses.tolist()
        bad = [f"{name}={value}" for name, value in zip(self.task_names, values) if not math.isfinite(value)]
        where = f"step {self.global_step} (epoch {self.current_epoch}, batch {self.current_position})"
        message = f"non-finite loss at {where}: {', '.join(bad)}"
        if self.cfg.trainer.non_finite_loss == "stop":
            raise NonFiniteLossError(message + " (trainer.non_finite_loss: stop)")
        self.skipped_batches += 1
        if self.skipped_batches > self.cfg.trainer.max_skipped_batches:
            raise NonFiniteLossError(
                f"{message}: more than trainer.max_skipped_batches={self.cfg.trainer.max_skipped_batches} skipped"
            )
        print(f"[towerrec] skipping batch: {message} ({self.skipped_batches} skipped)", flush=True)

    def after_backward(self) -> None:
        """Averages the dense gradients over ranks (waiting for the all-reduces backward started);
        with PCGrad, averages each task's gradient of the shared tower and replaces the shared
        gradients by the projected sum (the embeddings were already updated by their fused optimizer
        inside backward). With the gradient gate, reads the step's outcome here: a non-finite step
        drops the dense gradients (the tables' were zeroed), so the optimizer step changes nothing."""
        pending, self._pcgrad = self._pcgrad, None
        if self.skip_step:  # decided before backward on every rank: nothing to average
            return
        extra = [g for grads in pending[1] for g in grads] if pending is not None else []
        averaged = self.trainer.strategy.average_dense_gradients(extra)
        if self.gradient_gate is not None and not self.read_step_status():
            self.skip_step = True
            for optimizer in self.trainer.optimizers:
                for group in optimizer.param_groups:
                    for param in group["params"]:
                        param.grad = None
            return
        if pending is None:
            return
        shared, per_task = pending
        tasks, start = [], 0
        for grads in per_task:
            tasks.append(averaged[start : start + len(grads)])
            start += len(grads)
        for param, grad in zip(shared, self.inner.balancer.surgery(tasks)):
            if param.grad is None:
                param.grad = grad.clone()
            else:
                param.grad.copy_(grad)

    def on_train_epoch_end(self) -> None:
        weights = self.inner.balancer.weights().detach()
        for name, value in zip(self.task_names, weights):
            self.log(f"balance/{name}/weight", value)

    def configure_optimizers(self):
        params = [p for _, p in in_backward_optimizer_filter(self.model.named_parameters())]
        opt = self.cfg.trainer.dense_optimizer
        optimizer = dense_optimizer(params, opt)
        schedule = self.cfg.trainer.lr_schedule
        warmup = self.cfg.trainer.warmup_steps
        if schedule == "constant" and warmup == 0:
            return optimizer
        total = max(int(self.trainer.estimated_stepping_batches), 1)

        def factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            progress = min((step - warmup) / max(total - warmup, 1), 1.0)
            if schedule == "cosine":
                return 0.5 * (1 + math.cos(math.pi * progress))
            if schedule == "step":
                return 0.1 ** int(progress * 3)  # x0.1 at one third and two thirds of the run
            return 1.0

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ------------------------------------------------------------------------------ evaluation
    def eval_predictions(self, batch: Batch) -> torch.Tensor:
        """(B, T) predictions of a batch in fp32, whatever ``trainer.precision`` trains in: evaluation,
        ``predict`` and the exported model then score alike (bf16 autocast moves scores by ~1e-3)."""
        with torch.autocast(self.device.type, enabled=False):
            return predictions(self(batch)[1], self.inner.output_kinds)

    def _collect(self, batch: Batch) -> None:
        preds = self.eval_predictions(batch)
        group = batch.group.cpu() if batch.group is not None else None
        self._eval_rows.append(
            (
                preds.detach().float().cpu(),
                batch.labels.cpu(),
                batch.label_mask.cpu(),
                batch.weights.cpu(),
                group,
            )
        )

    def local_eval_rows(
        self,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """This rank's evaluation rows (preds, labels, label mask, weights, groups or None), which
        stay on this rank: the metrics exchange only summaries (``towerrec.trainer.metrics``)."""
        rows, self._eval_rows = self._eval_rows, []
        grouped = self.group_column is not None
        if not rows:
            empty = torch.zeros(0, len(self.task_names))
            return empty, empty, empty, torch.zeros(0), torch.zeros(0, dtype=torch.int64) if grouped else None
        preds, labels, mask, weights, groups = zip(*rows)
        joined = [torch.cat(column) for column in (preds, labels, mask, weights)]
        return (*joined, torch.cat(groups) if grouped else None)

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        self._collect(batch)

    def test_step(self, batch: Batch, batch_idx: int) -> None:
        self._collect(batch)

    def _finish_eval(self, stage: str) -> None:
        preds, labels, mask, weights, groups = self.local_eval_rows()
        strategy = self.trainer.strategy
        collectives = ProcessGroupCollectives(
            strategy.world_size, strategy.process_group, strategy.root_device
        )
        names, types = self.task_names, self.task_types
        metrics = task_metrics(preds, labels, mask, weights, names, types, groups, collectives)
        self.last_metrics[stage] = metrics
        constant = trivial_baseline(metrics, labels)
        self.last_baseline[stage] = task_metrics(
            constant, labels, mask, weights, names, types, None, collectives
        )
        flat = {
            f"{stage}/{task}/{name}": value
            for task, values in metrics.items()
            for name, value in values.items()
        }
        # Fixed task weights (alpha / tasks[i].weight), not a balancer's learned ones: a steady
        # yardstick for early stopping whatever the balancing method.
        balance = fixed_task_weights(self.cfg.tasks, self.cfg.model)
        loss = 0.0
        for i, values in enumerate(metrics.values()):
            if values:
                loss += float(balance[i]) * (values["rmse"] ** 2 if "rmse" in values else values["logloss"])
        flat[f"{stage}/loss"] = loss
        self.log_dict({k: float(v) for k, v in flat.items() if not math.isnan(v)}, sync_dist=False)

    def on_validation_epoch_end(self) -> None:
        self._finish_eval("val")

    def on_test_epoch_end(self) -> None:
        self._finish_eval("test")

    def predict_step(self, batch: Batch, batch_idx: int) -> dict[str, Any]:
        preds = self.eval_predictions(batch)
        return {"row_id": batch.row_id.cpu(), "predictions": preds.detach().float().cpu()}


class PipelinedMultiTaskModule(MultiTaskModule):
    """``trainer.train_pipeline: sparse_dist``: each step runs TorchRec's TrainPipelineSparseDist
    (see trainer.pipeline), which calls the same ``combined_loss``, ``backward_and_reduce`` and
    ``dense_step`` as the plain step above."""

    def __init__(self, cfg: Config, table_rows: dict[str, int]):
        super().__init__(cfg, table_rows)
        self.pipeline = None

    def on_train_epoch_start(self) -> None:
        if self.pipeline is not None:
            self.pipeline.reset()  # a new epoch: the previous one drained the pipeline

    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        self.seed_step()

    def training_step(self, ticket, batch_idx: int) -> None:
        if self.pipeline is None:  # created here: a run resumed mid-epoch skips on_train_epoch_start
            from towerrec.trainer.pipeline import LightningSparseDistPipeline

            self.pipeline = LightningSparseDistPipeline(self, self.device)
        self.skip_step = False
        self.pipeline.progress(self.trainer.datamodule.tickets.batches)
        assert self.current_position == ticket.position, (self.current_position, ticket.position)
        self.trainer.datamodule.train_stream.mark_consumed(ticket.position)

    def _detach_pipeline(self) -> None:
        if self.pipeline is not None:  # evaluation calls the model directly; progress() re-attaches
            self.pipeline.detach()

    def on_validation_start(self) -> None:
        self._detach_pipeline()

    def on_test_start(self) -> None:
        self._detach_pipeline()

    def on_predict_start(self) -> None:
        self._detach_pipeline()
