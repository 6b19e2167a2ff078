"""The one way to build the model: embedding table configs from the sparse features, then the
``MultiTaskModel`` (training builds it on ``meta`` for the sharder; serving, planning and export
build it with real tables on CPU, or on ``meta`` to plan).

    model = build_model(sparse=cfg.data.sparse, num_dense=len(cfg.data.dense), tasks=cfg.tasks,
                        model=cfg.model, table_rows=rows, embedding_device="cpu")
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch
from torchrec.modules.embedding_configs import (
    BaseEmbeddingConfig,
    DataType,
    EmbeddingBagConfig,
    EmbeddingConfig,
    PoolingType,
)

from towerrec.data.config import DenseFeature, SparseFeature
from towerrec.models.config import ModelConfig, TaskConfig
from towerrec.models.multitask import MultiTaskModel, SequenceFeature
from towerrec.models.retrieval import NEGATIVES_SUFFIX, TwoTowerModel

DATA_TYPES = {"fp32": DataType.FP32, "fp16": DataType.FP16, "int8": DataType.INT8}


def embedding_tables(
    sparse: Sequence[SparseFeature], table_rows: dict[str, int], precision: str = "fp32"
) -> list[BaseEmbeddingConfig]:
    """One TorchRec table per ``table`` name, with the features it serves; features sharing a
    table get its largest row count (``table_rows``: rows per feature). Tables of sequence features
    are unpooled (``EmbeddingConfig``, for the ``EmbeddingCollection``); the others sum-pool
    (``EmbeddingBagConfig``): a ``pooling: mean`` feature is divided by its bag size in the model
    (``MultiTaskModel.mean_pooled``), so every pooled table of a rank runs in one fbgemm kernel
    (TorchRec groups tables by pooling: a mean table would add a lookup and its backward per step)."""
    grouped: dict[str, list[SparseFeature]] = {}
    for feature in sparse:
        grouped.setdefault(feature.table_name, []).append(feature)
    tables: list[BaseEmbeddingConfig] = []
    for name, features in grouped.items():
        common = dict(
            name=name,
            embedding_dim=features[0].embedding_dim,
            num_embeddings=max(table_rows[f.name] for f in features),
            feature_names=[f.name for f in features],
            data_type=DATA_TYPES[precision],
        )
        if any(f.sequence for f in features):
            tables.append(EmbeddingConfig(**common))
        else:
            tables.append(EmbeddingBagConfig(**common, pooling=PoolingType.SUM))
    return tables


def build_model(
    *,
    sparse: Sequence[SparseFeature],
    num_dense: int,
    tasks: list[TaskConfig],
    model: ModelConfig,
    table_rows: dict[str, int],
    precision: str = "fp32",
    embedding_device: torch.device | str = "meta",
    model_class: type[MultiTaskModel] = MultiTaskModel,
    tower=None,
) -> MultiTaskModel:
    """The multi-task model over ``sparse`` (config order) and ``num_dense`` dense features;
    ``tower(input_dim, num_tasks)``: your own tower module (see ``MultiTaskModel``)."""
    return model_class(
        tables=embedding_tables(sparse, table_rows, precision),
        feature_names=[f.name for f in sparse if not f.align_with],
        input_names=[f.name for f in sparse],
        mean_pooled=[f.name for f in sparse if f.multi_hot and f.pooling == "mean" and not f.sequence],
        sequences={
            f.name: SequenceFeature(
                f.candidate, f.max_length, [g.name for g in sparse if g.align_with == f.name]
            )
            for f in sparse
            if f.sequence and not f.align_with
        },
        num_dense=num_dense,
        tasks=tasks,
        cfg=model,
        embedding_device=embedding_device,
        tower=tower,
    )


def retrieval_features(
    sparse: Sequence[SparseFeature], item_feature: str, num_sampled: int
) -> list[SparseFeature]:
    """The features a two-tower model's tables serve: ``sparse`` and, with sampled negatives, the
    batch feature that carries them on the item's table (``towerrec.models.retrieval.NEGATIVES_SUFFIX``)."""
    if not num_sampled:
        return list(sparse)
    item = next(f for f in sparse if f.name == item_feature)
    return [
        *sparse,
        dataclasses.replace(item, name=item.name + NEGATIVES_SUFFIX, table=item.table_name, side=None),
    ]


def build_retrieval_model(
    *,
    sparse: Sequence[SparseFeature],
    dense: Sequence[DenseFeature],
    model: ModelConfig,
    item_feature: str,
    table_rows: dict[str, int],
    precision: str = "fp32",
    embedding_device: torch.device | str = "meta",
    model_class: type[TwoTowerModel] = TwoTowerModel,
) -> TwoTowerModel:
    """The two-tower model over ``sparse`` and ``dense`` (config order): the user tower reads every
    ``side: user`` feature (its histories encoded), the item tower ``item_feature`` and every
    ``side: item`` one. ``table_rows``: rows per feature of ``sparse``."""
    num_sampled = model.retrieval.num_sampled_negatives
    features = retrieval_features(sparse, item_feature, num_sampled)
    rows = {**table_rows, **{f.name: table_rows[item_feature] for f in features if f.name not in table_rows}}
    user = [f.name for f in sparse if f.side == "user" and not f.align_with]
    item = [item_feature] + [
        f.name for f in sparse if f.side == "item" and f.name != item_feature and not f.sequence
    ]
    return model_class(
        tables=embedding_tables(features, rows, precision),
        user_features=user,
        item_features=item,
        user_dense=[i for i, f in enumerate(dense) if f.side == "user"],
        item_dense=[i for i, f in enumerate(dense) if f.side == "item"],
        histories={
            f.name: SequenceFeature(
                f.candidate or item_feature, f.max_length, [g.name for g in sparse if g.align_with == f.name]
            )
            for f in sparse
            if f.sequence and not f.align_with and f.side == "user"
        },
        item_feature=item_feature,
        cfg=model,
        num_sampled=num_sampled,
        embedding_device=embedding_device,
        input_names=[f.name for f in sparse],
        mean_pooled=[f.name for f in sparse if f.multi_hot and f.pooling == "mean" and not f.sequence],
    )
