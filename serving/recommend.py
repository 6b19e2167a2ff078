"""Top-K recommendation lists: every (user, candidate item) pair scored by the unsharded model.

    towerrec recommend --config configs/movielens100k.yaml --k 10 --output runs/ml100k-u1/recs.parquet
    towerrec recommend --config configs/movielens100k.yaml --users users.txt --candidates items.parquet
    towerrec recommend --config configs/movielens100k.yaml --evaluate      # + ranking metrics on the test split

How pairs are scored and lists kept: ``towerrec.serving.scoring`` (per-entity lookups, candidate blocks,
a running top-K per user); the rows and entities: ``towerrec.serving.catalogue``. This module writes the
lists (data set ids and, with saved vocabularies, the original ids) and runs the command.
Items a user interacted with in ``recommend.seen_splits`` are excluded when ``recommend.exclude_seen``.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from towerrec.data.cleaning import string_ids
from towerrec.data.dataset import DatasetMeta
from towerrec.data.vocab import original_ids, rows_of_originals
from towerrec.serving.catalogue import id_feature, load_catalogue
from towerrec.serving.scoring import TopK, recommend
from towerrec.trainer.config import Config
from towerrec.trainer.errors import RecommendError


def to_table(
    user_ids: np.ndarray,
    candidate_ids: np.ndarray,
    result: TopK,
    task_names: list[str],
    vocabularies: dict[str, np.ndarray | None] | None = None,
) -> pa.Table:
    """Long format: one row per (user, rank) with ``user, rank, item, score`` and one column per task.

    ``user``/``item`` are data set ids (what the training data and ``--users``/``--candidates`` hold).
    With ``vocabularies["user"]``/``["item"]`` (the data set's saved vocabularies) the table also
    has ``original_user``/``original_item``: the ids of the source data (e.g. MovieLens ids)."""
    num_users, k = result.items.shape
    items = result.items.numpy()
    keep = (items >= 0).ravel()
    columns = {
        "user": np.repeat(user_ids, k)[keep],
        "rank": np.tile(np.arange(1, k + 1), num_users)[keep],
        "item": candidate_ids[np.maximum(items, 0)].ravel()[keep],
        "score": result.scores.numpy().ravel()[keep],
    }
    for side, vocabulary in (vocabularies or {}).items():
        if callable(vocabulary):  # stored ids → originals (dynamic text ids: ``dynamic_request``)
            columns[f"original_{side}"] = vocabulary(columns[side])
        elif vocabulary is not None:
            columns[f"original_{side}"] = original_ids(columns[side], vocabulary)
    for t, name in enumerate(task_names):
        columns[name] = result.predictions[:, :, t].numpy().ravel()[keep]
    return pa.table(columns)


def check_output(path: str | Path) -> Path:
    """``--output``: a new .parquet or .csv file."""
    from towerrec.trainer.run_folder import user_output

    path = Path(path)
    if path.suffix not in (".parquet", ".csv"):
        raise RecommendError(f"--output: {path} must end in .parquet or .csv")
    return user_output(path, "--output", folder=False)


def write_table(table: pa.Table, path: str | Path) -> Path:
    path = Path(path)
    if path.suffix not in (".parquet", ".csv"):
        raise RecommendError(f"--output: {path} must end in .parquet or .csv")
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".parquet":
        pq.write_table(table, path)
    else:
        pacsv.write_csv(table, path)
    return path


def read_ids(path: str | Path, column: str, flag: str) -> pa.Array:
    """Ids as the user wrote them (any type), from a ``.parquet`` file (column ``column``, or its
    only column), a ``.csv`` file (a header line naming the columns; ``column`` or the only one) or
    any other file as text: one id per line, no header. Empty lines and nulls are skipped."""
    path = Path(path)
    if not path.exists():
        raise RecommendError(f"{flag}: {path} does not exist")
    if path.suffix in (".parquet", ".csv"):
        try:
            table = (
                pq.read_table(path)
                if path.suffix == ".parquet"
                else pacsv.read_csv(path, convert_options=pacsv.ConvertOptions(strings_can_be_null=True))
            )
        except (pa.ArrowInvalid, OSError) as err:
            raise RecommendError(f"{flag}: {path} cannot be read ({err})") from err
        if column in table.column_names:
            name = column
        elif table.num_columns == 1:
            name = table.column_names[0]
        else:
            raise RecommendError(
                f"{flag}: {path} has no column {column!r} (columns: {', '.join(table.column_names)})"
            )
        return table.column(name).combine_chunks().drop_null()
    return pa.array([line.strip() for line in path.read_text().splitlines() if line.strip()], pa.string())


def dataset_ids(
    raw: pa.Array, vocabulary: np.ndarray | None, flag: str
) -> tuple[np.ndarray, np.ndarray | None]:
    """Raw ids → data set ids: through the saved vocabulary when the data set has one (unknown
    originals get placeholder ids, scored as out-of-vocabulary), else the ids themselves (integers).
    Returns the ids and the originals to print them with."""
    if vocabulary is not None:
        return rows_of_originals(raw, vocabulary)
    try:
        return np.asarray(raw.cast(pa.int64()).to_numpy(), dtype=np.int64), None
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as err:
        raise RecommendError(
            f"{flag}: the data set stores these ids as integers and keeps no vocabulary, so ids must be integers ({err})"
        ) from err


def dynamic_request(
    meta: DatasetMeta, column: str, raw: pa.Array | None, flag: str
) -> tuple[np.ndarray | None, Callable[[np.ndarray], pa.Array] | None]:
    """For an ``id_mapping: dynamic`` column: raw ids as given (``raw``, None: none given) → the
    data set's ids (a text id → its 64-bit hash, as preparation stored it; an integer as it is),
    and how to name stored ids in the output (text ids: the data set's saved texts and those
    given; None when the stored ids are the originals)."""
    text = meta.columns.get(column, {}).get("id_type") == "text"
    ids = given = None
    if raw is not None:
        if text:
            given = pc.utf8_trim_whitespace(raw.cast(pa.string()))
            ids = np.asarray(string_ids(given).to_numpy(zero_copy_only=False), dtype=np.int64)
        else:
            try:
                ids = np.asarray(raw.cast(pa.int64()).to_numpy(), dtype=np.int64)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as err:
                raise RecommendError(
                    f"{flag}: the data set stores {column!r} as integer ids ({err})"
                ) from err
    if not text:
        return ids, None

    def names(stored: np.ndarray) -> pa.Array:
        known = meta.original_ids(column, stored)
        if given is None or not len(ids):
            return known
        order = np.argsort(ids, kind="stable")
        position = np.minimum(np.searchsorted(ids[order], stored), len(ids) - 1)
        asked = ids[order][position] == stored  # ids given on the command line name themselves
        texts = np.asarray(given.to_pylist(), dtype=object)[order][position]
        return pa.array(np.where(asked, texts, np.asarray(known.to_pylist(), dtype=object)), pa.string())

    return ids, names


# ------------------------------------------------------------------------------------------ command


def run_recommend(cfg: Config, args: argparse.Namespace) -> int:
    from towerrec.serving.export import load_id_maps, load_unsharded_model
    from towerrec.trainer.run_folder import new_output

    output = check_output(args.output) if args.output else None
    meta = DatasetMeta.load(cfg.data.path)
    rec = cfg.recommend
    requested, vocabularies = {}, {}
    for side, name, flag, given in (
        ("user", rec.user_feature, "--users", None if args.users == "all" else args.users),
        ("item", rec.item_feature, "--candidates", args.candidates or None),
    ):
        feature = id_feature(cfg, name, f"recommend.{side}_feature")
        column = feature.source_column
        raw = read_ids(given, column, flag) if given is not None else None
        if feature.id_mapping == "dynamic":
            requested[side], vocabularies[side] = dynamic_request(meta, column, raw, flag)
            continue
        vocabularies[side] = meta.vocabulary(column)
        requested[side] = None
        if raw is not None:
            requested[side], vocabularies[side] = dataset_ids(raw, vocabularies[side], flag)
    user_ids, candidate_ids = requested["user"], requested["item"]
    started = time.perf_counter()
    model, path = load_unsharded_model(cfg, args.checkpoint, meta.table_rows(cfg.data.sparse))
    catalogue = load_catalogue(
        cfg, meta, extra_users=user_ids, extra_items=candidate_ids, id_maps=load_id_maps(cfg, path)
    )
    loaded = time.perf_counter()
    if cfg.model.objective == "retrieval":
        users, candidates, result, task_names, retriever = _retrieve(
            cfg, model, catalogue, user_ids, candidate_ids
        )
    else:
        users, candidates, result = recommend(cfg, model, catalogue, user_ids, candidate_ids)
        task_names, retriever = model.task_names, None
    scored = time.perf_counter()
    out = write_table(
        to_table(users, candidates, result, task_names, vocabularies),
        output or new_output(Path(cfg.run_dir) / "recommendations", f"top{rec.k}-{path.name}", ".parquet"),
    )
    unknown_users = int((~catalogue.users.known[catalogue.users.positions(users)]).sum())
    print(
        f"[towerrec] top-{rec.k} of {len(candidates):,} candidates for {len(users):,} users "
        f"({unknown_users} without history) from {path}: scored in {scored - loaded:.2f} s "
        f"(data + model {loaded - started:.2f} s) → {out}",
        flush=True,
    )
    if args.evaluate:
        evaluated_users = None if user_ids is None else users
        if retriever is not None:
            from towerrec.serving.retrieval import evaluate_retrieval, format_retrieval

            result = evaluate_retrieval(cfg, retriever, evaluated_users)
            text = format_retrieval(result)
        else:
            from towerrec.serving.ranking import evaluate_ranking, format_ranking

            result = evaluate_ranking(cfg, model, catalogue, meta, users=evaluated_users)
            text = format_ranking(result)
        result["checkpoint"] = str(path)
        metrics = out.with_name(out.name + ".metrics.json")
        metrics.write_text(json.dumps(result, indent=1))
        print(text + f"\n[towerrec] metrics written to {metrics}", flush=True)
    return 0


def _retrieve(cfg: Config, model, catalogue, user_ids, candidate_ids):
    """Lists of a retrieval model (its index, seen items excluded), re-ranked by ``recommend.ranker``
    when one is named: (user ids, candidate ids, TopK, score names, the retriever)."""
    from towerrec.serving.retrieval import Retriever

    if candidate_ids is not None:
        raise RecommendError("--candidates: a retrieval model searches its whole item index; leave it out")
    retriever = Retriever(cfg, model, catalogue)
    users = catalogue.users
    user_rows = np.arange(len(users.ids)) if user_ids is None else users.positions(np.asarray(user_ids))
    k = cfg.recommend.k
    if k > retriever.index.num_items:
        raise RecommendError(
            f"recommend.k / --k: {k} is more than the {retriever.index.num_items:,} items of the catalogue"
        )
    if cfg.recommend.ranker is None:
        result = retriever.top_k(user_rows, k, progress=True)
        return users.ids[user_rows], catalogue.items.ids, result, ["score"], retriever
    from towerrec.serving.cascade import rank_candidates

    fetched = retriever.top_k(user_rows, max(cfg.recommend.num_candidates, k), progress=True)
    result, names = rank_candidates(cfg, catalogue, user_rows, fetched, k)
    return users.ids[user_rows], catalogue.items.ids, result, names, retriever
