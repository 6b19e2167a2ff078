"""Typed configuration of the tasks and the multi-task model."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from towerrec.data.checks import in_unit_interval, positive


@dataclass
class TaskConfig:
    """One prediction task with its own head, label and loss."""

    name: str
    """Task name (used in metric names, e.g. ``val/rating/rmse``)."""
    type: Literal["regression", "binary"] = "binary"
    """``regression`` (predicts a value) or ``binary`` (predicts a probability from a logit)."""
    label: str = ""
    """Parquet column holding the label (float). Defaults to the task name."""
    weight: float = 1.0
    """Fixed loss weight (``fixed`` balancing). ``model.alpha`` overrides it for two tasks."""
    loss: Literal["mse", "huber", "bce"] | None = None
    """``mse`` or ``huber`` for regression, ``bce`` for binary (default: mse / bce)."""
    mask: str | None = None
    """Optional column: the task's loss and metrics only count rows where it is non-zero
    (e.g. CVR is defined on clicked rows only)."""
    min_value: float | None = None
    """Regression: lower bound of the label (also bounds the prediction when ``max_value`` is set)."""
    max_value: float | None = None
    """Regression: upper bound of the label; with ``min_value`` the head outputs
    ``min + (max - min) * sigmoid(x)``."""

    @property
    def label_column(self) -> str:
        return self.label or self.name

    @property
    def loss_name(self) -> str:
        return self.loss or ("mse" if self.type == "regression" else "bce")

    def check(self) -> None:
        allowed = ("mse", "huber") if self.type == "regression" else ("bce",)
        if self.loss_name not in allowed:
            raise ValueError(
                f"loss: {self.loss_name!r} is not one of {', '.join(allowed)} (type {self.type})"
            )
        positive("weight", self.weight, allow_zero=True)
        if self.min_value is not None and self.max_value is not None and self.min_value >= self.max_value:
            raise ValueError(f"max_value: must exceed min_value ({self.min_value})")


@dataclass
class SequenceConfig:
    """How each behaviour sequence (``data.sparse`` features with ``sequence: true``) becomes one
    interest vector beside the pooled features (see ``towerrec.models.sequence``)."""

    encoder: Literal["din", "transformer", "mean"] = "din"
    """``din``: target attention of the candidate over the history (DIN); ``transformer``: a causal
    encoder over the history and the candidate (its output at the candidate; in a retrieval user
    tower, over the history alone: its output at the newest event); ``mean``: the mean of the
    history's embeddings (a bag: order is not seen)."""
    attention: Literal["softmax", "pointwise"] = "softmax"
    """Transformer: ``softmax`` multi-head attention (SASRec) or ``pointwise`` SiLU attention with a
    gate (HSTU)."""
    num_layers: int = 2
    """Transformer: layers."""
    num_heads: int = 2
    """Transformer: attention heads (they divide the sequence tables' embedding_dim)."""
    ffn_dim: int = 64
    """Transformer (softmax): hidden width of each layer's feed-forward block."""
    din_dims: list[int] = field(default_factory=lambda: [64, 32])
    """DIN: widths of the attention-score MLP."""
    dropout: float = 0.0
    """Dropout in the encoder."""

    def check(self) -> None:
        for name in ("num_layers", "num_heads", "ffn_dim"):
            positive(name, getattr(self, name))
        for dim in self.din_dims:
            positive("din_dims", dim)
        if not self.din_dims:
            raise ValueError("din_dims: at least one layer")
        in_unit_interval("dropout", self.dropout)


@dataclass
class RetrievalConfig:
    """Two-tower retrieval (``model.objective: retrieval``): a user tower (every ``side: user``
    feature, its histories through ``model.sequence``) and an item tower (``recommend.item_feature``
    and every ``side: item`` feature) map to L2-normalised vectors of width ``dim``; training is a
    sampled softmax of each row's item against the items of the whole global batch (gathered across
    ranks) and optional uniformly sampled items (see ``towerrec.models.retrieval``)."""

    dim: int = 64
    """Width of the user and item vectors (the index's dimension)."""
    user_dims: list[int] = field(default_factory=lambda: [128])
    """Hidden widths of the user tower's MLP before its ``dim``-wide output layer."""
    item_dims: list[int] = field(default_factory=list)
    """Hidden widths of the item tower's MLP before its ``dim``-wide output layer (empty: linear)."""
    temperature: float = 0.05
    """Softmax temperature: scores are cosine similarities divided by it."""
    in_batch_negatives: bool = True
    """Score each row's item against the other rows' items of the global batch (all ranks)."""
    num_sampled_negatives: int = 0
    """Extra negatives per rank and step, drawn uniformly from the item table (rows 1..N-1) and
    shared by every row of the global batch. They carry no item-side features: the item tower must
    read the item id alone."""
    logq_correction: bool = True
    """Subtract from each candidate's logit the log of its expected count in the candidate set
    (in-batch items: batch size × training frequency; sampled items: count × 1/N): the sampled softmax
    then estimates the full softmax instead of favouring rare items (Yi et al., 2019)."""
    remove_accidental_hits: bool = True
    """A candidate with the row's own item id (a popular item elsewhere in the batch) is not a negative."""
    history_encoder: Literal["transformer", "mean"] | None = None
    """The user tower's history encoder when it differs from ``model.sequence.encoder`` (e.g. a
    ranker's DIN beside the towers in one run); null: ``model.sequence.encoder``."""
    all_positions: bool = False
    """Train the history encoder on every position at once (SASRec, HSTU): the output at each event
    predicts the next event, and the newest one the row's item, against the same candidates. Needs a
    ``transformer`` encoder and an item tower that reads the item id alone."""

    def check(self) -> None:
        positive("dim", self.dim)
        for width in (*self.user_dims, *self.item_dims):
            positive("user_dims / item_dims", width)
        positive("temperature", self.temperature)
        positive("num_sampled_negatives", self.num_sampled_negatives, allow_zero=True)
        if not self.in_batch_negatives and self.num_sampled_negatives == 0:
            raise ValueError("num_sampled_negatives: 0 with in_batch_negatives false leaves no negatives")


@dataclass
class ModelConfig:
    """The dense part of the model; embedding tables come from ``data.sparse``."""

    objective: Literal["ranking", "retrieval"] = "ranking"
    """``ranking``: the multi-task model (``tower``, one head per task) scores (user, item) pairs;
    ``retrieval``: two towers embed users and items for a nearest-neighbour index
    (``model.retrieval``), trained on the rows as positives (``tasks: []``)."""
    retrieval: RetrievalConfig = field(default_factory=lambda: RetrievalConfig())
    """Two-tower retrieval (``objective: retrieval``)."""
    tower: Literal["shared_bottom", "mmoe", "ple", "esmm"] = "shared_bottom"
    """Architecture: ``shared_bottom``, ``mmoe``, ``ple`` or ``esmm``."""
    interaction: Literal["none", "dot", "concat_dot", "dcn"] = "none"
    """Feature interaction before the tower: ``none`` (concatenate), ``dot`` (DLRM pairwise dot
    products), ``concat_dot`` (the concatenation plus the embeddings' pairwise dot products: the
    user·item matrix-factorisation term among them) or ``dcn`` (DCNv2 cross layers)."""
    wide: bool = False
    """Wide & Deep: each task's output unit also reads the interaction output linearly (with
    ``concat_dot``: a weighted factorisation machine beside the tower; with ``none``: learned
    user/item biases and a linear model of the dense features)."""
    bottom_dims: list[int] = field(default_factory=lambda: [128, 64])
    """Shared-bottom MLP widths (shared_bottom, esmm)."""
    num_experts: int = 4
    """MMoE: number of shared experts."""
    expert_dims: list[int] = field(default_factory=lambda: [64])
    """MMoE/PLE: widths of each expert MLP."""
    num_shared_experts: int = 2
    """PLE: shared experts per level."""
    num_task_experts: int = 1
    """PLE: task-specific experts per task and level."""
    num_levels: int = 2
    """PLE: extraction levels (1 = CGC)."""
    head_dims: list[int] = field(default_factory=lambda: [32])
    """Per-task tower MLP widths before the output unit."""
    dcn_num_layers: int = 2
    """DCNv2: number of cross layers."""
    dcn_low_rank: int | None = None
    """DCNv2: rank of the low-rank cross weight (``null`` = full rank)."""
    dropout: float = 0.0
    """Dropout in the dense tower."""
    embedding_l2: float = 0.0
    """L2 penalty on the pooled embeddings, in training: descends ``embedding_l2 · Σ_f ||e_f||²``
    averaged over the batch, so the embedding rows a batch uses shrink in proportion to how often
    they are used (the regularisation of SGD matrix factorisation). fbgemm's rowwise adagrad and
    sgd ignore weight decay; this is the embedding regulariser that works with them. Applied to
    the gradient only: logged losses are the tasks' own."""
    loss_balancing: Literal["fixed", "uncertainty", "gradnorm", "pcgrad"] = "fixed"
    """``fixed`` (task weights / alpha), ``uncertainty`` (Kendall et al.), ``gradnorm`` or ``pcgrad``."""
    alpha: float | None = None
    """Two-task shortcut of the original design: loss = alpha * L_task0 + (1 - alpha) * L_task1."""
    gradnorm_alpha: float = 1.5
    """GradNorm: restoring-force exponent."""
    dense_dims: list[int] = field(default_factory=lambda: [64])
    """``dot`` interaction: hidden widths of the MLP that projects the dense features to the
    embedding dim (DLRM's bottom MLP; a last layer of the embedding dim is added)."""
    esmm_ctr_task: str = "ctr"
    """ESMM: name of the click task (binary, label = click, over all impressions)."""
    esmm_cvr_task: str = "cvr"
    """ESMM: name of the conversion-given-click task (binary). It has no loss over the entire space:
    give it ``weight: 0`` (pure ESMM) or ``mask: <click column>`` (loss on clicked rows only)."""
    esmm_ctcvr_task: str = "ctcvr"
    """ESMM: name of the click-and-convert task (binary, over all impressions); its output is the
    probability pCTR × pCVR."""
    pcgrad_seed: int = 0
    """PCGrad: seed of the generator that draws the task order of each projection step."""
    sequence: SequenceConfig = field(default_factory=lambda: SequenceConfig())
    """Encoder of the behaviour sequences (used when ``data.sparse`` has ``sequence: true`` features)."""

    def check(self) -> None:
        if self.alpha is not None:
            in_unit_interval("alpha", self.alpha, include_one=True)
        for name in ("bottom_dims", "expert_dims", "head_dims", "dense_dims"):
            for dim in getattr(self, name):
                positive(name, dim)
        in_unit_interval("dropout", self.dropout)
        positive("embedding_l2", self.embedding_l2, allow_zero=True)
        positive("dcn_num_layers", self.dcn_num_layers)
        positive("dcn_low_rank", self.dcn_low_rank)
        if self.tower == "mmoe":
            positive("num_experts", self.num_experts)
        if self.tower in ("mmoe", "ple") and not self.expert_dims:
            raise ValueError(f"expert_dims: {self.tower} needs at least one expert layer")
        if self.tower == "ple":
            positive("num_levels", self.num_levels)
            positive("num_shared_experts", self.num_shared_experts, allow_zero=True)
            positive("num_task_experts", self.num_task_experts, allow_zero=True)
            if self.num_shared_experts + self.num_task_experts < 1:
                raise ValueError("num_shared_experts / num_task_experts: give each task at least one expert")
        if self.loss_balancing in ("pcgrad", "gradnorm"):  # they act on the shared layers
            if self.tower in ("shared_bottom", "esmm") and not self.bottom_dims:
                raise ValueError(
                    f"bottom_dims: empty, so {self.loss_balancing} has no shared layer to act on"
                )
            if self.tower == "ple" and self.num_shared_experts == 0:
                raise ValueError(
                    f"num_shared_experts: 0, so {self.loss_balancing} has no shared layer to act on"
                )
