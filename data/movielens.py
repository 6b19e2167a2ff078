"""MovieLens 1M, 10M (``ratings.dat``: ``UserID::MovieID::Rating::Timestamp``, optional
``users.dat``/``movies.dat``) and 20M/25M (``ratings.csv``, optional ``movies.csv``) → the project's
Parquet data set through the generic conversion (``towerrec.data.convert``); an ml-100k folder
(``u.data``) is handed to ``towerrec.data.movielens100k``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from towerrec.data.cleaning import (
    TableSchema,
)
from towerrec.data.config import PrepareConfig
from towerrec.data.convert import convert
from towerrec.data.dataset import DataError, DatasetMeta
from towerrec.data.normalize import normalize_table
from towerrec.data.sources import (
    CSV_BLOCK_BYTES,
    Source,
    read_csv_chunks,
)


def _read_small_csv(path: Path, **options) -> pa.Table:
    """Reads a small side table (users, movies) in one go; parse errors → DataError."""
    try:
        return pacsv.read_csv(path, **options)
    except (pa.ArrowInvalid, pa.ArrowTypeError) as err:
        raise DataError(f"{path}: cannot parse ({str(err).splitlines()[0]})") from err


def _double_colon_options(names: list[str], types: dict) -> tuple:
    """``a::b::c`` read with ``:`` as delimiter: the empty fields in between are skipped."""
    spaced = [part for name in names for part in (name, f"_gap{name}")][:-1]
    return (
        pacsv.ReadOptions(column_names=spaced, encoding="latin-1", block_size=CSV_BLOCK_BYTES),
        pacsv.ParseOptions(delimiter=":", quote_char=False),
        pacsv.ConvertOptions(column_types=types, include_columns=names),
    )


def _genre_lists(movie_ids: pa.Array, genre_strings: pa.Array) -> tuple[np.ndarray, pa.Array, list[str]]:
    """(sorted movie ids, their genre id lists, genre names); ``(no genres listed)`` is no genre."""
    order = np.argsort(np.asarray(movie_ids))
    split = pc.split_pattern(genre_strings.take(pa.array(order)), "|")
    flat = split.flatten()
    names = sorted(set(pc.unique(flat).to_pylist()) - {"(no genres listed)", "", None})
    genre_ids = pc.index_in(flat, value_set=pa.array(names, pa.string()))  # null where not a genre
    keep = np.asarray(genre_ids.is_valid())
    offsets = np.concatenate([[0], np.cumsum(keep)])[np.asarray(split.offsets)]
    values = np.asarray(genre_ids.fill_null(0), dtype=np.int64)[keep] + 1
    lists = pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), pa.array(values))
    return np.asarray(movie_ids)[order], lists, names


def _lookup(keys: np.ndarray, side: pa.Array, wanted: np.ndarray) -> pa.Array:
    """``side[i]`` where ``keys[i] == wanted``; null where the key is unknown (keys sorted)."""
    if len(keys) == 0:
        return pa.nulls(len(wanted), side.type)
    pos = np.minimum(np.searchsorted(keys, wanted), len(keys) - 1)
    found = keys[pos] == wanted
    return side.take(pa.array(pos, mask=~found))


def prepare_movielens(cfg: PrepareConfig, out: str) -> DatasetMeta:
    """MovieLens 1M/10M (``ratings.dat``) or 20M/25M (``ratings.csv``) folder → data set.

    Columns: ``user_id``, ``item_id`` (sparse), ``gender``, ``age_bucket``, ``occupation``,
    ``zip_prefix`` (sparse, with ``users.dat``), ``genres`` (multi-hot, with the movies file),
    ``timestamp`` (other), labels ``rating`` (0.5..5) and ``click`` (= rating >= 4).
    """
    if not cfg.source:
        raise DataError(
            "data.prepare.source: set it to the MovieLens folder (with ratings.dat or ratings.csv)"
        )
    root = Path(cfg.source)
    if root.is_dir() and (root / "u.data").exists():
        from towerrec.data.movielens100k import prepare_movielens100k

        return prepare_movielens100k(cfg, out)
    if root.is_file():
        root = root.parent
    if (root / "ratings.dat").exists():
        ratings_file, movies_file, users_file = root / "ratings.dat", root / "movies.dat", root / "users.dat"
        read = _double_colon_options(
            ["user", "item", "rating", "timestamp"],
            {"user": pa.int64(), "item": pa.int64(), "rating": pa.float64(), "timestamp": pa.int64()},
        )
    elif (root / "ratings.csv").exists():
        ratings_file, movies_file, users_file = root / "ratings.csv", root / "movies.csv", None
        read = (
            pacsv.ReadOptions(
                column_names=["user", "item", "rating", "timestamp"], skip_rows=1, block_size=CSV_BLOCK_BYTES
            ),
            pacsv.ParseOptions(delimiter=","),
            pacsv.ConvertOptions(
                column_types={
                    "user": pa.int64(),
                    "item": pa.int64(),
                    "rating": pa.float64(),
                    "timestamp": pa.int64(),
                }
            ),
        )
    else:
        raise DataError(
            f"{root}: no ratings.dat (MovieLens 1M/10M) or ratings.csv (20M/25M) in data.prepare.source"
        )

    genres = None
    if movies_file.exists():
        if movies_file.suffix == ".dat":  # titles may contain ':', so split whole lines on '::'
            lines = _read_small_csv(
                movies_file,
                read_options=pacsv.ReadOptions(column_names=["line"], encoding="latin-1"),
                parse_options=pacsv.ParseOptions(delimiter="\x1f", quote_char=False),
            ).column("line")
            head = pc.split_pattern(lines, "::", max_splits=1)
            tail = pc.split_pattern(lines, "::", max_splits=1, reverse=True)
            try:
                movie_ids = pc.list_element(head, 0).cast(pa.int64()).combine_chunks()
                genre_strings = pc.list_element(tail, 1).combine_chunks()
            except (pa.ArrowInvalid, IndexError) as err:
                raise DataError(f"{movies_file}: expected MovieID::Title::Genres lines ({err})") from err
        else:
            movies = _read_small_csv(
                movies_file,
                convert_options=pacsv.ConvertOptions(
                    column_types={"movieId": pa.int64(), "genres": pa.string()}
                ),
            )
            if "movieId" not in movies.column_names or "genres" not in movies.column_names:
                raise DataError(
                    f"{movies_file}: expected columns movieId, genres (have: {movies.column_names})"
                )
            movie_ids, genre_strings = (
                movies.column("movieId").combine_chunks(),
                movies.column("genres").combine_chunks(),
            )
        genres = _genre_lists(movie_ids, genre_strings)

    users = None
    if users_file is not None and users_file.exists():
        options = _double_colon_options(
            ["user", "gender", "age", "occupation", "zip"],
            {
                "user": pa.int64(),
                "gender": pa.string(),
                "age": pa.int64(),
                "occupation": pa.int64(),
                "zip": pa.string(),
            },
        )
        table = _read_small_csv(
            users_file, read_options=options[0], parse_options=options[1], convert_options=options[2]
        )
        order = np.argsort(np.asarray(table.column("user")))
        table = table.take(pa.array(order))
        users = {
            "keys": np.asarray(table.column("user")),
            "gender": table.column("gender").combine_chunks(),
            "age_bucket": table.column("age").combine_chunks(),
            "occupation": table.column("occupation").combine_chunks(),
            "zip_prefix": pc.utf8_slice_codeunits(table.column("zip"), 0, 1).combine_chunks(),
        }

    kinds = {"user_id": "sparse", "item_id": "sparse"}
    if users is not None:
        kinds.update(dict.fromkeys(("gender", "age_bucket", "occupation", "zip_prefix"), "sparse"))
    if genres is not None:
        kinds["genres"] = "multi_hot"
    kinds.update({"timestamp": "other", "rating": "label", "click": "label"})
    schema = TableSchema(
        kinds,
        label_ranges={"rating": (0.5, 5.0), "click": (0.0, 1.0)},
        binary_labels=("click",),
        user_column="user_id",
        time_column="timestamp",
    )

    def normalize(raw: pa.Table, where: str, first_row: int) -> pa.Table:
        user = np.asarray(raw.column("user").fill_null(-1), dtype=np.int64)
        item = np.asarray(raw.column("item").fill_null(-1), dtype=np.int64)
        for name, ids in (("user", user), ("item", item)):
            if (ids < 0).any():
                row = int(np.flatnonzero(ids < 0)[0])
                raise DataError(f"{where}: row {first_row + row}, column {name!r}: missing or negative id")
        columns = {"user_id": raw.column("user"), "item_id": raw.column("item")}
        if users is not None:
            for name in ("gender", "age_bucket", "occupation", "zip_prefix"):
                columns[name] = _lookup(users["keys"], users[name], user)
        if genres is not None:
            columns["genres"] = _lookup(genres[0], genres[1], item)
        rating = raw.column("rating")
        columns["timestamp"] = raw.column("timestamp")
        columns["rating"] = rating
        columns["click"] = pc.cast(pc.greater_equal(rating, 4.0), pa.float64())
        return normalize_table(pa.table(columns), schema, where, first_row)

    source = Source([ratings_file], lambda path: read_csv_chunks(path, *read), normalize)
    report = {
        "converter": "movielens",
        "source": str(ratings_file),
        "genres": genres[2] if genres is not None else [],
        "user_features": users is not None,
    }
    return convert(source, schema, cfg, out, report)
