"""The run configuration: typed dataclasses loaded from YAML with dotted command-line overrides.

Unknown keys, wrong types and impossible values are rejected before any process group starts,
with the dotted key in the message (``trainer.max_epochs: expected int, got 'three'``).

Example::

    cfg = load_config("configs/default.yaml", overrides=["trainer.max_epochs=3", "model.tower=mmoe"])
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from towerrec.data.checks import in_unit_interval, positive
from towerrec.data.config import DataConfig, DenseFeature, PrepareConfig, SparseFeature
from towerrec.models.config import ModelConfig, TaskConfig
from towerrec.trainer.errors import ConfigError
from towerrec.trainer.typed_config import build_dataclass, parse_overrides, read_config_tree, set_dotted

ShardingType = Literal[
    "table_wise", "row_wise", "column_wise", "table_row_wise", "table_column_wise", "data_parallel"
]


@dataclass
class OptimizerConfig:
    """An optimizer with a learning-rate schedule."""

    type: Literal["rowwise_adagrad", "adagrad", "adam", "adamw", "sgd"] = "adam"
    """Embeddings (fused into backward): ``rowwise_adagrad``, ``adagrad``, ``adam`` (CUDA only:
    fbgemm has no CPU Adam kernel), ``sgd``.
    Dense: ``adam``, ``adamw``, ``sgd``, ``adagrad``."""
    lr: float = 0.001
    """Learning rate."""
    weight_decay: float = 0.0
    """L2 weight decay (dense optimizers, and the ``adam`` embedding optimizer; fbgemm's fused
    adagrad/sgd kernels ignore it, so it is an error there)."""
    eps: float = 1e-8
    """Numerical epsilon (adam/adagrad)."""
    momentum: float = 0.0
    """SGD momentum (dense only)."""

    def check(self) -> None:
        positive("lr", self.lr)
        positive("eps", self.eps)
        positive("weight_decay", self.weight_decay, allow_zero=True)
        positive("momentum", self.momentum, allow_zero=True)


@dataclass
class ShardingConfig:
    """How TorchRec's planner places the embedding tables."""

    sharding_types: list[ShardingType] | None = None
    """Sharding types the planner may use for every table (``table_wise``, ``row_wise``,
    ``column_wise``, ``table_row_wise``, ``table_column_wise``, ``data_parallel``). ``null`` = every
    model-parallel type the device supports (on CPU: table_wise, column_wise, table_column_wise);
    ``data_parallel`` only when asked for, since its tables are trained by the dense optimizer."""
    table_constraints: dict[str, list[ShardingType]] = field(default_factory=dict)
    """Per-table sharding types, e.g. ``{t_user_id: [row_wise]}``; overrides ``sharding_types``."""
    compute_kernel: Literal["fused", "fused_uvm_caching", "dense"] | None = None
    """Force one kernel: ``fused``, ``fused_uvm_caching`` (CUDA: tables larger than HBM, rows
    cached in HBM) or ``dense``. Default: ``fused`` on CPU; on CUDA the planner chooses between
    ``fused`` and ``fused_uvm_caching`` (the latter when a table does not fit the HBM budget)."""
    hbm_gb: float | None = None
    """Memory budget per device in GB given to the planner. Default on CUDA: the GPU's total memory
    less 2 GB for the CUDA context and NCCL (the planner keeps a further 15% for activations); on
    CPU: TorchRec's default host budget (128 GB)."""
    ddr_gb: float | None = None
    """Host memory per rank in GB for UVM caching (default: planner's)."""
    cache_load_factor: float = 0.2
    """UVM caching: fraction of each table kept in HBM."""
    embedding_precision: Literal["fp32", "fp16", "int8"] = "fp32"
    """Storage precision of embedding weights: ``fp32``, ``fp16`` (CUDA) or ``int8`` (inference)."""

    def check(self) -> None:
        positive("hbm_gb", self.hbm_gb)
        positive("ddr_gb", self.ddr_gb)
        in_unit_interval("cache_load_factor", self.cache_load_factor, include_one=True)


@dataclass
class CheckpointConfig:
    """Sharded checkpoints (torch.distributed.checkpoint) under ``<run_dir>/checkpoints``."""

    every_n_steps: int = 0
    """Save every N optimizer steps (0: only at the end of each epoch)."""
    keep_last: int = 3
    """Checkpoints kept (older ones are deleted after a newer one is complete)."""
    resume: str = "auto"
    """``auto``: resume from ``checkpoints/latest`` when it exists; ``never``; or a checkpoint path."""

    def check(self) -> None:
        positive("every_n_steps", self.every_n_steps, allow_zero=True)
        positive("keep_last", self.keep_last)


@dataclass
class LoggerConfig:
    """One experiment logger of a ``fit`` run (``trainer.loggers``)."""

    type: str
    """``csv`` (the run folder's ``logs/metrics.csv``, appended across resumes), ``tensorboard``
    (``<run_dir>/tensorboard``), or the class name of any logger Lightning ships
    (``MLFlowLogger``, ``WandbLogger``, ``CometLogger``, ``NeptuneLogger``, ...; its package must be
    installed)."""
    options: dict[str, Any] = field(default_factory=dict)
    """Keyword arguments of that logger's constructor (e.g. ``{experiment_name: recs, tracking_uri:
    file:./mlruns}`` for MLFlowLogger, ``{project: recs, offline: true}`` for WandbLogger)."""

    def check(self) -> None:
        if not self.type:
            raise ValueError("type: empty; give csv, tensorboard or a Lightning logger class name")


@dataclass
class TrainerConfig:
    """The Lightning trainer and optimisation settings."""

    accelerator: Literal["auto", "cpu", "cuda", "gpu"] = "auto"
    """``cpu``, ``cuda`` or ``auto`` (CUDA when available)."""
    devices: int = 1
    """Processes per node (each drives one GPU on CUDA). With torchrun/SLURM it must match the launcher."""
    num_nodes: int = 1
    """Nodes in the job."""
    max_epochs: int = 1
    """Training epochs."""
    max_steps: int = -1
    """Stop after this many optimizer steps (-1: no limit)."""
    precision: Literal["auto", "32-true", "32", "bf16-mixed", "16-mixed"] = "auto"
    """Dense-part precision: ``32-true``, ``bf16-mixed`` (autocast; CUDA or CPU with bf16), or
    ``auto``: ``bf16-mixed`` where the device has native bf16 matmuls and a step's dense
    multiply-adds (per-rank batch × dense weights) reach 5e7, where it measured faster; else
    ``32-true`` (see ``trainer.precision``). The choice is printed with the sharding plan. Autocast
    covers training steps: evaluation and ``predict`` score in fp32, like the exported model.
    ``16-mixed`` is refused: its loss scale would reach the tables' optimizer inside backward."""
    compile: bool = False
    """``torch.compile`` the dense part (interaction, tower, heads) at the start of training. On CPU
    it fuses the element-wise work around the matmuls (what it gains per model and batch:
    benchmarks/results/RESULTS.md); compiling takes seconds and needs a C++ compiler."""
    gradient_clip_val: float | None = None
    """Clip the dense gradients' norm to this value."""
    embedding_optimizer: OptimizerConfig = field(
        default_factory=lambda: OptimizerConfig(type="rowwise_adagrad", lr=0.05)
    )
    """Optimizer fused into the embedding tables' backward pass."""
    dense_optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    """Optimizer of the dense tower."""
    lr_schedule: Literal["constant", "cosine", "step"] = "constant"
    """Dense learning-rate schedule: ``constant``, ``cosine`` (to 0 over the run) or ``step``."""
    warmup_steps: int = 0
    """Linear warm-up steps of the dense learning rate."""
    val_check_interval: int | None = None
    """Validate every N training steps (``null``: at the end of each epoch)."""
    log_every_n_steps: int = 50
    """How often training losses are logged."""
    early_stopping_patience: int | None = None
    """Stop when ``early_stopping_metric`` has not improved for N validations."""
    early_stopping_metric: str = "val/loss"
    """Metric watched by early stopping (lower is better). ``val/loss`` is Σ_t w_t · (MSE or log
    loss) with the fixed task weights. The model tested at the end: see ``test_best``."""
    test_best: bool = True
    """With early stopping: after fit, test the weights of the epoch with the lowest
    ``early_stopping_metric`` (its epoch-end checkpoint, kept from pruning and named in
    ``checkpoints/best.json``), and let evaluation, prediction and export of the run folder load
    them; ``false``: the last weights."""
    non_finite_loss: Literal["stop", "skip"] = "stop"
    """On a NaN/inf task loss: ``stop`` (raise, naming task and step) or ``skip`` (skip the batch)."""
    max_skipped_batches: int = 10
    """With ``non_finite_loss: skip``: stop after this many skipped batches."""
    collective_timeout_s: int = 600
    """Timeout of process-group collectives: a dead peer ends the job with an error after this."""
    check_replicas_every_n_steps: int = 0
    """Every N steps, compare checksums of every dense parameter across ranks and stop (exit 4)
    naming the first parameter whose replicas differ: a guard against a desync in your own model
    code (e.g. a rank-dependent branch). 0: off. Costs one pass over the dense parameters and one
    small all-gather per check."""
    deterministic: bool = False
    """Use deterministic algorithms (slower)."""
    num_threads: int | None = None
    """torch intra-op threads per process (default: cores / processes on the node)."""
    train_pipeline: Literal["auto", "lightning", "sparse_dist"] = "auto"
    """``lightning`` (Lightning's own step), ``sparse_dist`` (TorchRec's TrainPipelineSparseDist:
    on CUDA it overlaps the next batches' copy and embedding input all-to-all with compute), or
    ``auto`` (sparse_dist on CUDA, lightning on CPU, where there is nothing to overlap)."""
    loggers: list[LoggerConfig] = field(
        default_factory=lambda: [LoggerConfig("csv"), LoggerConfig("tensorboard")]
    )
    """Experiment loggers of ``fit`` (see ``LoggerConfig``); ``[]`` logs nothing but the run folder's
    metrics.json. A logger whose package is missing stops the run before it starts, naming it."""
    warm_start: str | None = None
    """A finished run folder (or one of its checkpoints) that ``fit`` starts from: its best
    checkpoint when early stopping recorded one, else its latest. Every tensor that checkpoint
    holds is loaded (tables, dense weights, any other model state such as id maps, the embedding
    and dense optimizers' state); the step count, schedules, learning rates and reader position
    start afresh, and the run trains on the configured days as a new run in ``run_dir`` (the
    source run is only read). Features, tasks and every tensor's shape must match the source's,
    else ``fit`` stops (exit 2) naming what differs: a table is never grown or shrunk (a table of
    another size trains afresh). A ``run_dir`` that holds its own checkpoint resumes from it
    instead."""
    tables_from: str | None = None
    """Two models, two runs, shared tables: a finished run folder (or checkpoint) of another model
    over the same data set (e.g. a retrieval run for a ranker, or the reverse) whose embedding
    tables start this run's tables of the same name (``tables_from_names``, default every table
    both have). The tables must have the same shape (the same vocabulary and width); they go on
    training here with fresh optimizer state; every other tensor starts as usual. Weights only:
    the source run is read, never written. Ignored when the run resumes from its own checkpoint."""
    tables_from_names: list[str] | None = None
    """The tables ``tables_from`` starts (e.g. ``[t_item]``); null: every table name both models have."""
    progress_bar: bool | Literal["auto", "off"] = "auto"
    """``auto``: a progress bar (with samples/s) when the output is a terminal, else a plain line
    every ``log_every_n_steps`` steps and per epoch (loss, samples/s, ETA); ``true``: always the
    bar; ``false``: always the lines; ``off``: neither (benchmarks)."""

    def check(self) -> None:
        positive("devices", self.devices)
        positive("num_nodes", self.num_nodes)
        positive("max_epochs", self.max_epochs)
        positive("num_threads", self.num_threads)
        positive("warmup_steps", self.warmup_steps, allow_zero=True)
        positive("log_every_n_steps", self.log_every_n_steps)
        positive("max_skipped_batches", self.max_skipped_batches, allow_zero=True)
        positive("collective_timeout_s", self.collective_timeout_s)
        positive("check_replicas_every_n_steps", self.check_replicas_every_n_steps, allow_zero=True)
        positive("gradient_clip_val", self.gradient_clip_val)
        positive("val_check_interval", self.val_check_interval)
        positive("early_stopping_patience", self.early_stopping_patience)
        for name, optimizer, allowed in (
            ("embedding_optimizer", self.embedding_optimizer, EMBEDDING_OPTIMIZERS),
            ("dense_optimizer", self.dense_optimizer, DENSE_OPTIMIZERS),
        ):
            if optimizer.type not in allowed:
                raise ValueError(f"{name}.type: {optimizer.type!r} is not one of {', '.join(allowed)}")
        embedding = self.embedding_optimizer
        if embedding.weight_decay and embedding.type != "adam":
            raise ValueError(
                "embedding_optimizer.weight_decay: only the adam embedding optimizer applies it "
                f"(type {embedding.type!r} would ignore it); set it to 0 or use type adam"
            )
        if self.tables_from is not None and self.warm_start is not None:
            raise ValueError("tables_from: a warm start already starts every table; give one of the two")
        if self.tables_from_names is not None and self.tables_from is None:
            raise ValueError("tables_from_names: needs tables_from (the run to take them from)")
        if self.precision == "16-mixed":
            raise ValueError(
                "precision: 16-mixed is not supported: its loss scale would reach the embedding tables' "
                "optimizer, which runs inside backward before any unscaling (updates scaled by the loss "
                "scale), and the sparse_dist pipeline would unscale the dense gradients twice; use "
                "bf16-mixed (no loss scale; fp16's tensor-core rate on GPUs of compute capability 8.0 or "
                "later) or 32-true"
            )


@dataclass
class RecommendConfig:
    """Top-K recommendation lists (``towerrec recommend``) and ranking evaluation."""

    user_feature: str = "user_id"
    """Sparse feature holding the user id."""
    item_feature: str = "item_id"
    """Sparse feature holding the item id."""
    k: int = 10
    """Length of each recommendation list."""
    score: Literal["weighted_sum", "product"] = "weighted_sum"
    """How task predictions combine into the ranking score: ``weighted_sum`` (Σ w_t · pred_t) or
    ``product`` (Π pred_t^w_t, e.g. pCTR × rating)."""
    task_weights: dict[str, float] = field(default_factory=dict)
    """Weight of each task in the score (tasks not listed get 0; empty = 1 for the first task)."""
    exclude_seen: bool = True
    """Leave out items the user interacted with in the training split."""
    item_block_size: int = 65536
    """Candidates scored per block (bounds memory for million-item catalogues)."""
    relevance_task: str | None = None
    """Binary task whose positive test rows count as relevant in ranking evaluation (default: the
    first binary task)."""
    seen_splits: list[str] | None = None
    """Splits whose (user, item) pairs count as already seen by ``exclude_seen`` (default: the
    training and validation splits, the interactions the model could have learnt from)."""
    popularity_exponent: float = 0.0
    """Multiply each item's (positive) ranking score by (1 + its training-split interactions)^exponent.
    A model trained on observed interactions only predicts how a user would rate an item *given*
    an interaction; exponent 1 approximates P(interaction) × P(liked | interaction)."""
    interaction_column: str | None = None
    """Column marking real interactions (non-zero) in a data set that also holds sampled negatives
    (0), e.g. ``rated`` from ``data.prepare.negatives_per_positive``: only real interactions count
    as seen (``exclude_seen``) and in the popularity baseline's counts. Default: every row is one."""
    max_pairs_per_step: int = 262144
    """(user, item) pairs scored per forward pass (bounds activation memory: pairs × interaction width)."""
    index: Literal["exact", "hnsw", "ivf"] = "exact"
    """A retrieval model's item index: ``exact`` (blocked matrix products, a running top-K; no extra
    package) or a FAISS approximate index, ``hnsw`` (graph) or ``ivf`` (inverted lists), for
    catalogues where exact search is too slow (needs ``pip install faiss-cpu``)."""
    index_hnsw_m: int = 32
    """``hnsw``: neighbours per node (memory and recall grow with it)."""
    index_hnsw_ef_search: int = 128
    """``hnsw``: candidates explored per query (at least K plus the user's seen items)."""
    index_ivf_lists: int | None = None
    """``ivf``: inverted lists (default 4·sqrt(items))."""
    index_ivf_probe: int = 32
    """``ivf``: lists searched per query (recall against speed)."""
    ranker: str | None = None
    """Retrieve-then-rank: a ranking config (a file, relative to the working directory) over the
    same data set whose trained model (its run folder's best or latest checkpoint) ranks the
    ``num_candidates`` items the retrieval model fetches per user; null: the lists are the index's."""
    num_candidates: int = 300
    """Items retrieved per user before the ranker orders them (``ranker``)."""
    sampled_negatives: int = 100
    """``--evaluate``'s sampled protocol (SASRec): the held-out item against this many items drawn
    uniformly (seeded by ``seed``) from those the user never interacted with."""

    def check(self) -> None:
        positive("k", self.k)
        positive("index_hnsw_m", self.index_hnsw_m)
        positive("index_hnsw_ef_search", self.index_hnsw_ef_search)
        positive("index_ivf_lists", self.index_ivf_lists)
        positive("index_ivf_probe", self.index_ivf_probe)
        positive("num_candidates", self.num_candidates)
        positive("sampled_negatives", self.sampled_negatives)
        positive("item_block_size", self.item_block_size)
        positive("max_pairs_per_step", self.max_pairs_per_step)


@dataclass
class Config:
    """A whole run. See configs/*.yaml for commented examples."""

    seed: int = 0
    """Seeds data order, initialisation and dropout."""
    run_dir: str = "runs/default"
    """Where logs, metrics, plan, resolved config and checkpoints go."""
    data: DataConfig = field(default_factory=DataConfig)
    """The data set and batching."""
    tasks: list[TaskConfig] = field(default_factory=list)
    """The tasks, each with a head, a label and a loss."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """The dense architecture."""
    sharding: ShardingConfig = field(default_factory=ShardingConfig)
    """Embedding table placement."""
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    """Training loop."""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """Checkpointing and resume."""
    recommend: RecommendConfig = field(default_factory=RecommendConfig)
    """Recommendation lists and ranking evaluation."""


def evaluation_group_column(cfg: Config) -> str | None:
    """The column grouping evaluation rows by user for GAUC: ``data.group_column``, else the
    column of the single-valued ``recommend.user_feature``, else None (no GAUC)."""
    if cfg.data.group_column is not None:
        return cfg.data.group_column
    user = next((f for f in cfg.data.sparse if f.name == cfg.recommend.user_feature), None)
    return user.source_column if user is not None and not user.multi_hot else None


# --------------------------------------------------------------------------------------------- loading
def load_config(path: str | Path | None, overrides: list[str] | None = None) -> Config:
    """Reads a YAML file (or the defaults when ``path`` is None), applies overrides, validates."""
    tree: dict = {}
    if path is not None:
        tree = read_config_tree(Path(path))
    for key, value in parse_overrides(overrides or []):
        set_dotted(tree, key, value)
    cfg = build_dataclass(Config, tree, "")
    validate(cfg)
    return cfg


def to_dict(cfg: Any) -> Any:
    return dataclasses.asdict(cfg)


def dump_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


# --------------------------------------------------------------------------------------------- validation
SHARDING_TYPES = (
    "table_wise",
    "row_wise",
    "column_wise",
    "table_row_wise",
    "table_column_wise",
    "data_parallel",
)
CPU_SHARDING_TYPES = ("table_wise", "column_wise", "table_column_wise", "data_parallel")
DEFAULT_CPU_SHARDING_TYPES = ("table_wise", "column_wise", "table_column_wise")
EMBEDDING_OPTIMIZERS = ("rowwise_adagrad", "adagrad", "adam", "sgd")
DENSE_OPTIMIZERS = ("adam", "adamw", "sgd", "adagrad")


def validate(cfg: Config) -> None:
    """The rules that span sections (each section checks its own fields when it is built)."""
    if cfg.model.objective == "retrieval":
        validate_retrieval(cfg)
        return  # the rest are rules of the tasks and of a ranker's scores
    if not cfg.tasks:
        raise ConfigError(
            "tasks: at least one task is needed (or model.objective: retrieval, with tasks: [])"
        )
    task_names = [t.name for t in cfg.tasks]
    if len(set(task_names)) != len(task_names):
        raise ConfigError(f"tasks: duplicate task names in {task_names}")
    if cfg.model.alpha is not None and len(cfg.tasks) != 2:
        raise ConfigError(
            f"model.alpha: needs exactly 2 tasks, the config has {len(cfg.tasks)} (set it to null)"
        )
    if cfg.model.tower == "esmm":
        keys = {"esmm_ctr_task": cfg.model.esmm_ctr_task, "esmm_cvr_task": cfg.model.esmm_cvr_task,
                "esmm_ctcvr_task": cfg.model.esmm_ctcvr_task}  # fmt: skip
        for key, name in keys.items():
            if name not in task_names:
                raise ConfigError(f"model.{key}: {name!r} is not one of the tasks {task_names}")
            if cfg.tasks[task_names.index(name)].type != "binary":
                raise ConfigError(f"model.{key}: task {name!r} must be binary for ESMM")
        if len(set(keys.values())) != 3:
            raise ConfigError(
                f"model.esmm_*_task: must name three different tasks, got {list(keys.values())}"
            )
    if cfg.data.dynamic_tables:
        validate_dynamic_ids(cfg)
    rec = cfg.recommend
    for name in rec.task_weights:
        if name not in task_names:
            raise ConfigError(f"recommend.task_weights: {name!r} is not one of {', '.join(task_names)}")
    if rec.relevance_task is not None and rec.relevance_task not in task_names:
        raise ConfigError(
            f"recommend.relevance_task: {rec.relevance_task!r} is not one of {', '.join(task_names)}"
        )


def validate_dynamic_ids(cfg: Config) -> None:
    """``id_mapping: dynamic`` needs the batches mapped in order inside Lightning's step, and
    tables whose rows the trainer can re-initialise in place (fused kernels, sharded)."""
    tables = cfg.data.dynamic_tables
    if cfg.trainer.train_pipeline == "sparse_dist":
        raise ConfigError(
            "trainer.train_pipeline: sparse_dist prefetches batches ahead of the step, so the id maps of "
            f"id_mapping: dynamic tables ({', '.join(tables)}) would run ahead of training and a mid-epoch "
            "checkpoint would not resume exactly; use lightning (or auto, which picks it with dynamic ids)"
        )
    if cfg.model.objective == "retrieval":
        raise ConfigError(
            "data.sparse: id_mapping: dynamic is not supported with model.objective: retrieval (its sampled "
            "negatives and logQ correction count table rows, not raw ids); use vocab or hash there"
        )
    if cfg.sharding.compute_kernel == "fused_uvm_caching":
        raise ConfigError(
            "sharding.compute_kernel: fused_uvm_caching caches rows in HBM, and the rows a dynamic-id table gives "
            "to new ids are re-initialised in place (the cache would keep the old values); use fused"
        )
    for table in tables:
        allowed = cfg.sharding.table_constraints.get(table, cfg.sharding.sharding_types) or []
        if "data_parallel" in allowed:
            key = (
                f"table_constraints.{table}" if table in cfg.sharding.table_constraints else "sharding_types"
            )
            raise ConfigError(
                f"sharding.{key}: data_parallel would give the id_mapping: dynamic table {table!r} to the dense "
                "optimizer, whose state of a row given to a new id cannot be reset; leave data_parallel out for it"
            )


def validate_retrieval(cfg: Config) -> None:
    """A two-tower config: no tasks, an item id, user-side and item-side features, an encoder that
    needs no candidate, and what sampled negatives and all-positions training need."""
    retrieval, rec = cfg.model.retrieval, cfg.recommend
    if cfg.tasks:
        raise ConfigError(
            "tasks: model.objective: retrieval trains on the rows as positives; give tasks: [] (rows that are "
            "not positives: data.sample_weight_column with 0 on them)"
        )
    by_name = {f.name: f for f in cfg.data.sparse}
    item = by_name.get(rec.item_feature)
    if item is None or item.multi_hot:
        raise ConfigError(
            f"recommend.item_feature: {rec.item_feature!r} must be a single-valued data.sparse feature "
            "(the item a row is about)"
        )
    sides = {f.name: f.side for f in (*cfg.data.sparse, *cfg.data.dense)}
    context = [name for name, side in sides.items() if side is None and name != rec.item_feature]
    if context:
        raise ConfigError(
            f"data.sparse / data.dense: {', '.join(context)} have no side; a retrieval model reads user-side "
            "features in the user tower and item-side ones in the item tower: give each side: user or side: item "
            "(or leave it out)"
        )
    user_side = [name for name, side in sides.items() if side == "user"]
    if not user_side:
        raise ConfigError("data.sparse: no side: user feature, so the user tower has nothing to read")
    encoder = retrieval.history_encoder or cfg.model.sequence.encoder
    histories = [f for f in cfg.data.sparse if f.sequence and not f.align_with and f.side == "user"]
    if histories and encoder == "din":
        raise ConfigError(
            "model.sequence.encoder: din attends from a candidate item; a retrieval user tower has none: "
            "use transformer or mean (or model.retrieval.history_encoder)"
        )
    item_side = [
        f.name for f in (*cfg.data.sparse, *cfg.data.dense) if f.side == "item" and f.name != item.name
    ]
    needs_id_only = [
        key
        for key, on in (
            ("num_sampled_negatives", retrieval.num_sampled_negatives > 0),
            ("all_positions", retrieval.all_positions),
        )
        if on
    ]
    if needs_id_only and item_side:
        raise ConfigError(
            f"model.retrieval.{needs_id_only[0]}: sampled and history items carry only their id, so the item "
            f"tower must read the item id alone; these item-side features would be missing: {', '.join(item_side)}"
        )
    if retrieval.all_positions:
        if len(histories) != 1 or encoder != "transformer":
            raise ConfigError(
                "model.retrieval.all_positions: needs one history (a side: user sequence) and "
                "model.sequence.encoder: transformer"
            )
        if histories[0].table_name != item.table_name:
            raise ConfigError(
                f"model.retrieval.all_positions: the history {histories[0].name!r} must share the item's table "
                f"(table: {item.table_name}) to predict its next item"
            )


def validate_for_device(cfg: Config, device_type: str) -> None:
    """Device-dependent checks (a sharding type the device cannot do), run before process groups start."""
    if device_type == "cpu":
        requested = list(cfg.sharding.sharding_types or [])
        for kinds in cfg.sharding.table_constraints.values():
            requested += kinds
        for kind in requested:
            if kind not in CPU_SHARDING_TYPES:
                raise ConfigError(
                    f"sharding: {kind!r} needs CUDA; on CPU use one of {', '.join(CPU_SHARDING_TYPES)}"
                )
        if cfg.sharding.compute_kernel == "fused_uvm_caching":
            raise ConfigError("sharding.compute_kernel: fused_uvm_caching needs CUDA")
        if cfg.trainer.embedding_optimizer.type == "adam":  # fbgemm's CPU kernels: no Adam
            raise ConfigError(
                "trainer.embedding_optimizer.type: adam needs CUDA; on CPU use rowwise_adagrad, adagrad or sgd"
            )


__all__ = [
    "Config",
    "ConfigError",
    "DataConfig",
    "SparseFeature",
    "DenseFeature",
    "PrepareConfig",
    "load_config",
]
