"""Consolidated export: a (possibly sharded) DCP checkpoint → one unsharded model and a serving artifact.

    towerrec export --config configs/movielens100k.yaml --output runs/ml100k-u1/export
    towerrec export --config configs/default.yaml --checkpoint runs/default/checkpoints/step-00000400 --output out/

The checkpoint's ``model`` entry holds ``DistributedModelParallel.state_dict()``, whose keys equal
those of the plain ``MultiTaskModel`` (DMP strips its wrapper prefixes), so DCP loads it — in one
process, without a process group, resharding whatever N ranks wrote — straight into a model built
with ``embedding_device="cpu"``. The output folder holds::

    model.pt       the unsharded state dict (tensors only: ``torch.load(path, weights_only=True)``)
    serving.pt2    ``torch.export`` program: plain tensors in, predictions (B, T) out (see ``ServingModel``)
    serving.json   its inputs (feature order, dtypes, id ranges, dense order) and outputs (tasks, kinds)
    id_maps.pt     with ``id_mapping: dynamic`` features: each table's id map as trained, sorted raw ids
                   and their rows (the program holds the same and looks raw ids up itself)

Serving needs nothing but torch::

    program = torch.export.load("serving.pt2").module()
    predictions = program(dense, [values_f for f in features], [lengths_f for f in features])
"""

from __future__ import annotations

import argparse
import json
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from towerrec.data.config import MISSING_ID
from towerrec.data.dataset import DatasetMeta, is_complete, table_rows
from towerrec.data.vocab import original_ids
from towerrec.models.builder import build_model, build_retrieval_model
from towerrec.models.dynamic_ids import DynamicIds
from towerrec.models.heads import predictions
from towerrec.models.multitask import MultiTaskModel, dense_outputs, sequence_inputs
from towerrec.models.retrieval import TwoTowerModel
from towerrec.models.tables import TableLookup
from towerrec.trainer.config import Config
from towerrec.trainer.distributed import checkpoint as ckpt
from towerrec.trainer.errors import OutputExists

MODEL_FILE = "model.pt"
SERVING_FILE = "serving.pt2"
SERVING_SPEC_FILE = "serving.json"
CLIENT_FILE = "client.py"
USER_TOWER_FILE = "user_tower.pt2"
ITEM_VECTORS_FILE = "item_vectors.pt"
ITEM_IDS_FILE = "item_ids.json"
ID_MAPS_FILE = "id_maps.pt"
VOCABULARY_FOLDER = "vocabularies"
PREDICTION_KINDS = {"logit": "probability", "probability": "probability", "value": "value"}


# ------------------------------------------------------------------------------------------ loading
def dataset_meta_if_present(path: str) -> DatasetMeta | None:
    """The data set's metadata when ``path`` holds a complete data set (vocabulary sizes)."""
    return DatasetMeta.load(path) if is_complete(path) else None


def build_unsharded_model(cfg: Config, num_embeddings: dict[str, int]) -> MultiTaskModel | TwoTowerModel:
    """The plain model with real tables on CPU (what DMP wraps during training): the multi-task
    model, or the two towers of a retrieval config."""
    if cfg.model.objective == "retrieval":
        return build_retrieval_model(
            sparse=cfg.data.sparse,
            dense=cfg.data.dense,
            model=cfg.model,
            item_feature=cfg.recommend.item_feature,
            table_rows=num_embeddings,
            precision=cfg.sharding.embedding_precision,
            embedding_device="cpu",
        )
    return build_model(
        sparse=cfg.data.sparse,
        num_dense=len(cfg.data.dense),
        tasks=cfg.tasks,
        model=cfg.model,
        table_rows=num_embeddings,
        precision=cfg.sharding.embedding_precision,
        embedding_device="cpu",
    )


def load_unsharded_model(
    cfg: Config, checkpoint: str | Path | None = None, num_embeddings: dict[str, int] | None = None
) -> tuple[MultiTaskModel | TwoTowerModel, Path]:
    """Loads a checkpoint written by any number of ranks into one unsharded model (eval mode).

    Args:
        cfg: the run configuration (architecture, features, tasks).
        checkpoint: a checkpoint folder, or a checkpoints root / run folder (default: the run's latest).
        num_embeddings: table rows per sparse feature (default: config, else the data set's metadata).

    Returns ``(model, resolved checkpoint path)``. Runs in the calling process; needs no process group.
    """
    path = ckpt.resolve_model(checkpoint or Path(cfg.run_dir) / "checkpoints")
    if num_embeddings is None:
        num_embeddings = table_rows(cfg.data.sparse, dataset_meta_if_present(cfg.data.path))
    model = build_unsharded_model(cfg, num_embeddings)
    state = model.state_dict()
    _check_against_checkpoint(path, state)
    tensors = {"model": state}
    with warnings.catch_warnings():  # "no process group: assuming a single process" is the intent here
        warnings.simplefilter("ignore", UserWarning)
        ckpt.load_tensors(path, tensors)
    model.load_state_dict(tensors["model"])
    return model.eval(), path


def load_id_maps(cfg: Config, path: Path) -> DynamicIds | None:
    """The id maps of the config's ``id_mapping: dynamic`` tables as checkpoint ``path`` saved
    them (None without dynamic features). In the calling process; needs no process group."""
    from towerrec.trainer.dynamic_ids import SETTINGS_KEY, check_checkpoint

    ids = DynamicIds.of(cfg.data.sparse)
    if ids is None:
        return None
    check_checkpoint(ckpt.load_state(path), ids, cfg.data.sparse)
    tensors = {"dynamic_ids": ids.state_dict()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        ckpt.load_tensors(path, tensors)
    ids.load_state_dict(tensors[SETTINGS_KEY])
    return ids.eval()


def _check_against_checkpoint(path: Path, state: dict[str, torch.Tensor]) -> None:
    """Names the first tensor whose shape differs (DCP's own message does not say which)."""
    saved = ckpt.SafeFileSystemReader(str(path)).read_metadata().state_dict_metadata
    for key, tensor in state.items():
        entry = saved.get(f"model.{key}")
        if entry is None:
            raise ckpt.CheckpointError(
                f"{path}: has no tensor model.{key} (a different model.* or data.* config?)"
            )
        if tuple(entry.size) != tuple(tensor.shape):
            raise ckpt.CheckpointError(
                f"{path}: model.{key} has shape {tuple(entry.size)} but the config builds {tuple(tensor.shape)} "
                "(check data.sparse num_embeddings/embedding_dim, data.dense and model.* against the run's config.yaml)"
            )


# ------------------------------------------------------------------------------------------ serving
class ServingModel(nn.Module):
    """Plain-torch scorer: the tables' lookups (``towerrec.models.tables.TableLookup``: an
    ``nn.EmbeddingBag`` per pooled table, an ``nn.Embedding`` per sequence table) and the trained
    sequence encoders, interaction, tower and heads (``dense_outputs``).

    Inputs, F sparse features in ``input_names`` order (config order; B rows)::

        dense    (B, num_dense) float32
        values   F × (N_f,) int64   ids of feature f, rows concatenated (row b has lengths[f][b] ids;
                                    a sequence's ids oldest first)
        lengths  F × (B,)   int64   ids per row (1 for single-valued features; 0 = empty bag)

    Output: (B, T) predictions (probabilities for binary tasks, values for regression). Ids must
    already be table rows in ``[0, num_embeddings)`` (row 0 = out of vocabulary), as in training,
    except those of ``id_mapping: dynamic`` features: raw int64 ids, looked up here in the id map
    the training left (``id_maps``: per table, sorted ids and their rows; one ``searchsorted``):
    an id without a row (never trained on, evicted, ``MISSING_ID``) scores with row 0.
    """

    def __init__(self, model: MultiTaskModel, id_maps: DynamicIds | None = None):
        super().__init__()
        self.dynamic_tables: dict[str, str] = {}  # feature → its table's buffers (ids_<t>, rows_<t>)
        if id_maps is not None:
            for index, table in enumerate(id_maps.table_names):
                keys, rows = id_maps.maps[table].sorted_snapshot()
                # MISSING_ID (int64 min) first: never empty, and a missing id finds row 0
                self.register_buffer(f"ids_{index}", torch.cat([torch.tensor([MISSING_ID]), keys]))
                self.register_buffer(f"rows_{index}", torch.cat([torch.zeros(1, dtype=torch.int64), rows]))
                for feature in id_maps.features_of(table):
                    self.dynamic_tables[feature] = str(index)
        self.input_names = list(model.input_names)
        self.feature_names = list(model.feature_names)
        self.pooled_names = list(model.pooled_names)
        self.sequences = dict(model.sequences)
        self.sequence_lists = set(model.sequence_lists)
        self.output_kinds = list(model.output_kinds)
        self.lookup = TableLookup.of(model)
        self.sequence_encoders = model.sequence_encoders
        self.interaction = model.interaction
        self.tower = model.tower
        self.heads = model.heads

    def forward(
        self, dense: torch.Tensor, values: list[torch.Tensor], lengths: list[torch.Tensor]
    ) -> torch.Tensor:
        by_name, histories = {}, {}
        for f, name in enumerate(self.input_names):
            ids = values[f]
            if name in self.dynamic_tables:
                ids = self.rows_of(self.dynamic_tables[name], ids)
            if name in self.sequence_lists:
                histories[name] = (self.lookup.unpooled(name, ids), lengths[f])
            else:
                by_name[name] = self.lookup.pooled(name, ids, lengths[f])
        pooled = [by_name[name] for name in self.pooled_names]
        outputs = dense_outputs(self, pooled, dense, sequence_inputs(self.sequences, histories))
        return predictions(outputs, self.output_kinds)

    def rows_of(self, table: str, ids: torch.Tensor) -> torch.Tensor:
        """Rows of raw ids in a dynamic table's id map (0 where absent)."""
        keys, rows = getattr(self, f"ids_{table}"), getattr(self, f"rows_{table}")
        position = torch.searchsorted(keys, ids).clamp(max=keys.shape[0] - 1)
        return torch.where(keys[position] == ids, rows[position], 0)


def export_serving(
    model: MultiTaskModel, num_dense: int, example_batch_size: int = 4, id_maps: DynamicIds | None = None
) -> torch.export.ExportedProgram:
    """``torch.export`` of ``ServingModel(model, id_maps)`` with a dynamic batch size and dynamic bag sizes."""
    serving = ServingModel(model, id_maps).eval().requires_grad_(False)
    num_features = len(serving.input_names)
    batch = torch.export.Dim("batch", min=1)
    # Example bags of 2 ids per row, so that no size is 0/1 or equal to the batch (no specialisation);
    # a single id per row on a sequence table is looked up unpooled: its ids are the batch.
    one_per_row = [
        not serving.lookup.is_pooled(name) and name not in serving.sequence_lists
        for name in serving.input_names
    ]
    dense = torch.zeros(example_batch_size, num_dense)
    values = [torch.zeros((1 if one else 2) * example_batch_size, dtype=torch.int64) for one in one_per_row]
    lengths = [torch.full((example_batch_size,), 1 if one else 2, dtype=torch.int64) for one in one_per_row]
    ids_dims = {}
    sides = {side for feature in serving.sequences.values() for side in feature.side}
    inputs = sorted(enumerate(zip(serving.input_names, one_per_row)), key=lambda item: item[1][0] in sides)
    for f, (name, one) in inputs:  # sequences before their side lists
        main = next((seq for seq, feature in serving.sequences.items() if name in feature.side), name)
        ids_dims[name] = batch if one else ids_dims.get(main) or torch.export.Dim(f"ids_{f}", min=0)
    dynamic = (
        {0: batch},
        [{0: ids_dims[name]} for name in serving.input_names],  # a side list has its sequence's length
        [{0: batch} for _ in range(num_features)],
    )
    with torch.no_grad():
        return torch.export.export(serving, (dense, values, lengths), dynamic_shapes=dynamic, strict=False)


class UserTowerProgram(nn.Module):
    """A retrieval model's user tower in plain torch: the user-side features (``input_names``
    order, as ``ServingModel`` takes its inputs) → L2-normalised user vectors (B, d)."""

    def __init__(self, model: TwoTowerModel, input_names: list[str]):
        super().__init__()
        self.input_names = list(input_names)
        self.sequence_lists = set(model.sequence_lists)
        self.lookup = TableLookup.of(model)
        self.model = model

    def forward(
        self, dense: torch.Tensor, values: list[torch.Tensor], lengths: list[torch.Tensor]
    ) -> torch.Tensor:
        features, histories = {}, {}
        for f, name in enumerate(self.input_names):
            if name in self.sequence_lists:
                histories[name] = (self.lookup.unpooled(name, values[f]), lengths[f])
            else:
                features[name] = self.lookup.pooled(name, values[f], lengths[f])
        return self.model.user_vectors(features, dense, histories)


def export_user_tower(
    model: TwoTowerModel, input_names: list[str], num_dense: int, example_batch_size: int = 4
):
    """``torch.export`` of ``UserTowerProgram`` with a dynamic batch size and dynamic bag sizes."""
    program = UserTowerProgram(model, input_names).eval().requires_grad_(False)
    batch = torch.export.Dim("batch", min=1)
    one_per_row = [
        not program.lookup.is_pooled(name) and name not in program.sequence_lists for name in input_names
    ]
    ids_dims = {}
    sides = {side for feature in model.sequences.values() for side in feature.side}
    for f, name in sorted(enumerate(input_names), key=lambda item: item[1] in sides):  # sequences first
        main = next((seq for seq, feature in model.sequences.items() if name in feature.side), name)
        ids_dims[name] = (
            batch if one_per_row[f] else ids_dims.get(main) or torch.export.Dim(f"ids_{f}", min=0)
        )
    dense = torch.zeros(example_batch_size, num_dense)
    values = [torch.zeros((1 if one else 2) * example_batch_size, dtype=torch.int64) for one in one_per_row]
    lengths = [torch.full((example_batch_size,), 1 if one else 2, dtype=torch.int64) for one in one_per_row]
    dynamic = (
        {0: batch},
        [{0: ids_dims[name]} for name in input_names],
        [{0: batch} for _ in input_names],
    )
    with torch.no_grad():
        return torch.export.export(program, (dense, values, lengths), dynamic_shapes=dynamic, strict=False)


def _column_info(columns: dict, column: str) -> dict:
    """The metadata of ``column``; a history list maps its ids with its source column's vocabulary."""
    info = columns.get(column, {})
    if "history_of" in info:
        return {**columns.get(info["history_of"], {}), "vocabulary_of": info["history_of"]}
    return info


def _raw_sparse(feature, info: dict, list_delimiter: str) -> dict[str, Any]:
    """How a raw value of ``feature`` becomes its rows (the client replays it)."""
    raw: dict[str, Any] = {"input": feature.input_column, "delimiter": feature.delimiter or list_delimiter}
    if feature.id_mapping == "dynamic":  # the program maps the raw ids itself
        raw.update(mapping="dynamic", text_ids=info.get("id_type") == "text", missing_id=MISSING_ID)
    elif info.get("vocabulary"):
        raw.update(mapping="vocabulary", vocabulary=f"{VOCABULARY_FOLDER}/{feature.name}.json")
        raw["vocabulary_of"] = info.get("vocabulary_of", feature.source_column)
    elif info.get("mapping") == "buckets":
        raw.update(
            mapping="buckets", edges=info.get("edges", []), input=info.get("source", feature.input_column)
        )
    elif info.get("mapping") == "hash":
        raw.update(mapping="hash", hash_buckets=int(info["num_embeddings"]) - 1)
    else:
        raw.update(mapping="ids")  # the data set stores the ids as they came
    return raw


def serving_spec(
    cfg: Config,
    model: MultiTaskModel,
    num_embeddings: dict[str, int],
    checkpoint: Path,
    columns: dict | None = None,
) -> dict[str, Any]:
    """What ``serving.json`` documents: the artifact's inputs and outputs, and for each input how a
    raw value becomes it (``raw``: vocabulary, hash or buckets for ids; transforms and fill for
    numbers), which ``client.py`` replays."""
    columns = columns or {}
    prepare = cfg.data.prepare
    list_delimiter = prepare.list_delimiter if prepare is not None else "|"
    sparse = [
        {
            "name": f.name,
            "column": f.source_column,
            "side": f.side,
            "multi_hot": f.multi_hot,
            "pooling": f.pooling,
            "table": f.table_name,
            "id_mapping": f.id_mapping,
            "values_dtype": "int64",
            "lengths_dtype": "int64",
            "id_range": [0, num_embeddings[f.name] - 1],
            "out_of_vocabulary_id": 0,
            **(
                {
                    "values": "raw int64 ids (text ids: their 64-bit hash, client.string_id), looked up by the "
                    f"program in the id map of table {f.table_name} ({ID_MAPS_FILE}); an id without a row "
                    f"(never trained on, evicted, missing = {MISSING_ID}) scores with row 0",
                }
                if f.id_mapping == "dynamic"
                else {}
            ),
            "raw": _raw_sparse(f, _column_info(columns, f.source_column), list_delimiter),
            **({"sequence": True, "max_length": f.max_length, "order": "oldest first"} if f.sequence else {}),
        }
        for f in cfg.data.sparse
    ]
    dense = [
        {
            "name": f.name,
            "column": f.source_column,
            "side": f.side,
            "dtype": "float32",
            "raw": {
                "input": f.source_column,
                "transforms": columns.get(f.source_column, {}).get("transforms", []),
                "fill": f.fill_nan if f.fill_nan is not None else (prepare.dense_fill if prepare else 0.0),
            },
        }
        for f in cfg.data.dense
    ]
    csv_options = prepare.csv if prepare is not None and prepare.format == "csv" else None
    missing = {
        "tokens": ["", *(csv_options.null_values if csv_options else [])],
        "strip": csv_options.strip if csv_options else True,
    }
    outputs = [
        {"task": task.name, "type": task.type, "kind": PREDICTION_KINDS[kind]}
        for task, kind in zip(cfg.tasks, model.output_kinds if model is not None else [])
    ]
    return {
        "format": "torch.export",
        "file": SERVING_FILE,
        "checkpoint": str(checkpoint),
        "call": "torch.export.load(file).module()(dense, values, lengths) -> predictions (B, T) float32",
        "inputs": {
            "dense": {"shape": ["B", len(dense)], "dtype": "float32", "features": dense},
            "values": "list over sparse features (this order) of int64 (N_f,): ids of all rows concatenated",
            "lengths": "list over sparse features (this order) of int64 (B,): ids per row",
            "sparse": sparse,
            "missing": missing,
        },
        "outputs": {"shape": ["B", len(outputs)], "dtype": "float32", "columns": outputs},
        "id_note": (
            "the program takes embedding rows (raw int64 ids for id_mapping: dynamic features, which it looks "
            "up itself) and prepared dense values; client.py maps raw ids and raw values to them as each "
            "input's 'raw' entry says (vocabularies in vocabularies/)"
        ),
        "client": "from client import Scorer; Scorer(folder).score([{input column: raw value, ...}, ...])",
    }


def export(cfg: Config, checkpoint: str | Path | None, output: str | Path) -> Path:
    """Writes ``model.pt``, ``serving.pt2`` and ``serving.json`` into ``output``; returns the folder."""
    num_embeddings = table_rows(cfg.data.sparse, dataset_meta_if_present(cfg.data.path))
    model, path = load_unsharded_model(cfg, checkpoint, num_embeddings)
    id_maps = load_id_maps(cfg, path)
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    if any(out.iterdir()):
        raise OutputExists(f"--output: {out} is not empty; towerrec never writes over an earlier export")
    torch.save({key: value.detach().clone() for key, value in model.state_dict().items()}, out / MODEL_FILE)
    if id_maps is not None:
        snapshots = {table: id_maps.maps[table].sorted_snapshot() for table in id_maps.table_names}
        torch.save(
            {table: {"ids": ids, "rows": rows} for table, (ids, rows) in snapshots.items()},
            out / ID_MAPS_FILE,
        )
    meta = dataset_meta_if_present(cfg.data.path)
    columns = meta.columns if meta is not None else {}
    if cfg.model.objective == "retrieval":
        spec = _export_retrieval(cfg, model, num_embeddings, path, columns, meta, out)
    else:
        torch.export.save(export_serving(model, len(cfg.data.dense), id_maps=id_maps), out / SERVING_FILE)
        spec = serving_spec(cfg, model, num_embeddings, path, columns)
    for feature in spec["inputs"]["sparse"]:
        if feature["raw"]["mapping"] == "vocabulary":
            originals = meta.vocabulary(feature["raw"]["vocabulary_of"])
            file = out / feature["raw"]["vocabulary"]
            file.parent.mkdir(exist_ok=True)
            file.write_text(json.dumps(np.asarray(originals).tolist()))
    (out / SERVING_SPEC_FILE).write_text(json.dumps(spec, indent=1))
    shutil.copyfile(Path(__file__).parent / "templates" / "client.py", out / CLIENT_FILE)
    return out


def _export_retrieval(cfg, model, num_embeddings, checkpoint, columns, meta, out: Path) -> dict[str, Any]:
    """The user tower program, the catalogue's item vectors and their raw ids, and the spec: the
    user tower's inputs documented as ``serving_spec`` documents a ranker's."""
    from towerrec.serving.catalogue import load_catalogue
    from towerrec.serving.retrieval import item_vectors

    if meta is None:
        raise OutputExists(
            f"data.path: {cfg.data.path} holds no data set: the item index is built from its items"
        )
    user_side = [f for f in cfg.data.sparse if f.side == "user"]
    user_dense = [f for f in cfg.data.dense if f.side == "user"]
    names = [f.name for f in user_side]
    dense_index = [j for j, f in enumerate(cfg.data.dense) if f.side == "user"]
    tower = _DenseColumns(model, dense_index, len(cfg.data.dense))
    torch.export.save(export_user_tower(tower, names, len(dense_index)), out / USER_TOWER_FILE)
    catalogue = load_catalogue(cfg, meta)
    vectors = item_vectors(cfg, model, TableLookup.of(model), catalogue.items)
    torch.save(vectors.contiguous(), out / ITEM_VECTORS_FILE)
    item = next(f for f in cfg.data.sparse if f.name == cfg.recommend.item_feature)
    vocabulary = meta.vocabulary(item.source_column)
    ids = catalogue.items.ids if vocabulary is None else original_ids(catalogue.items.ids, vocabulary)
    (out / ITEM_IDS_FILE).write_text(json.dumps(np.asarray(ids).tolist()))
    full = serving_spec(cfg, None, num_embeddings, checkpoint, columns)
    full["inputs"]["sparse"] = [s for s in full["inputs"]["sparse"] if s["name"] in names]
    full["inputs"]["dense"]["features"] = [
        s for s in full["inputs"]["dense"]["features"] if s["name"] in {f.name for f in user_dense}
    ]
    full["inputs"]["dense"]["shape"] = ["B", len(user_dense)]
    return {
        **full,
        "kind": "retrieval",
        "file": USER_TOWER_FILE,
        "call": "torch.export.load(file).module()(dense, values, lengths) -> user vectors (B, d) float32, L2-normalised",
        "outputs": {"shape": ["B", cfg.model.retrieval.dim], "dtype": "float32"},
        "items": {
            "vectors": ITEM_VECTORS_FILE,
            "ids": ITEM_IDS_FILE,
            "score": "inner product of the user vector and each item vector; the highest first",
            "index": cfg.recommend.index,
        },
        "client": "from client import Retriever; Retriever(folder).top_k({input column: raw value, ...}, k, exclude=[raw item ids])",
    }


class _DenseColumns(nn.Module):
    """A TwoTowerModel whose user tower reads only the user-side dense columns (the program's input)."""

    def __init__(self, model: TwoTowerModel, columns: list[int], width: int):
        super().__init__()
        self.inner = model
        self.columns, self.width = columns, width
        self.sequences, self.sequence_lists = model.sequences, model.sequence_lists
        self.mean_pooled = model.mean_pooled

    def user_vectors(self, features, dense, histories):
        full = dense.new_zeros(dense.shape[0], self.width)
        full[:, self.columns] = dense
        return self.inner.user_vectors(features, full, histories)


def load_serving(folder: str | Path):
    """The exported scorer as a callable module (plain torch; no training code, no process group)."""
    return torch.export.load(Path(folder) / SERVING_FILE).module()


# ------------------------------------------------------------------------------------------ command


def run_export(cfg: Config, args: argparse.Namespace) -> int:
    from towerrec.trainer.run_folder import new_output, user_output

    if args.output:
        out = user_output(args.output, "--output", folder=True)
    else:
        checkpoint = ckpt.resolve_model(args.checkpoint or Path(cfg.run_dir) / "checkpoints")
        out = new_output(Path(cfg.run_dir) / "export", checkpoint.name)
    out = export(cfg, args.checkpoint, out)
    print(f"[towerrec] exported {', '.join(sorted(p.name for p in out.iterdir()))} to {out}", flush=True)
    return 0
