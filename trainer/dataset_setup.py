"""The data set a run uses: built by ``towerrec prepare`` (``prepare_command``) or on first use from
``data.prepare`` (declare once: the columns to read come from ``data.sparse``, ``data.dense`` and
``tasks``), never used when it was made from another recipe, and checked against the config
before any process group starts."""

from __future__ import annotations

import time
from pathlib import Path

from towerrec.data.cleaning import BucketSpec, DenseSpec, TableSchema
from towerrec.data.dataset import METADATA_FILE, DatasetMeta, is_complete
from towerrec.data.negatives import RATED
from towerrec.trainer.config import Config, evaluation_group_column
from towerrec.trainer.distributed.environment import launcher_rank
from towerrec.trainer.errors import ConfigError


def input_schema(cfg: Config) -> TableSchema:
    """The input columns of a generic (``csv``/``parquet``) preparation and what each is: every
    sparse feature's column (ids, a bag, or a number to bucketise), every dense column with its
    transforms, every task's label (range and 0/1 from the task) and mask, and the extra columns of
    ``data.prepare.columns``."""
    prepare = cfg.data.prepare
    kinds: dict[str, str] = {}
    buckets, delimiters, specs, fills = {}, {}, {}, {}
    histories = prepare.histories if prepare is not None else []
    built = {name for history in histories for name in history.outputs()}  # made at preparation
    sampled = prepare is not None and prepare.negatives_per_positive > 0
    if sampled:
        built.add(RATED)
        _check_masks_for_negatives(cfg)
    for feature in cfg.data.sparse:
        if feature.source_column in built:
            continue
        if feature.buckets is not None:
            edges = feature.buckets if isinstance(feature.buckets, list) else None
            count = feature.buckets if isinstance(feature.buckets, int) else None
            buckets[feature.source_column] = BucketSpec(feature.input_column, edges, count)
            continue
        kinds[feature.source_column] = "multi_hot" if feature.multi_hot else "sparse"
        if feature.delimiter:
            delimiters[feature.source_column] = feature.delimiter
    for feature in cfg.data.dense:
        kinds[feature.source_column] = "dense"
        specs[feature.source_column] = DenseSpec(
            log1p="log1p" in feature.transform,
            clip=tuple(feature.clip) if feature.clip else None,
            clip_quantile=feature.clip_quantile,
            standardize="standardize" in feature.transform,
        )
        if feature.fill_nan is not None:
            fills[feature.source_column] = float(feature.fill_nan)
    ranges, binary = {}, []
    for task in cfg.tasks:
        if task.label_column in built:
            continue
        kinds[task.label_column] = "label"
        if task.type == "binary":
            binary.append(task.label_column)
            ranges[task.label_column] = (0.0, 1.0)
        else:
            ranges[task.label_column] = (
                -float("inf") if task.min_value is None else task.min_value,
                float("inf") if task.max_value is None else task.max_value,
            )
        if task.mask and task.mask not in built:
            kinds.setdefault(task.mask, "label")
            ranges.setdefault(task.mask, (-float("inf"), float("inf")))
    if cfg.data.sample_weight_column:
        kinds.setdefault(cfg.data.sample_weight_column, "label")
    if prepare is not None:
        for name, kind in prepare.columns.items():
            kinds[name] = kind
    for history in histories:
        for source in history.side.values():
            kinds.setdefault(source, "sparse")
        if history.where:
            kinds.setdefault(history.where, "label")
            ranges.setdefault(history.where, (-float("inf"), float("inf")))
    if prepare is not None and prepare.interaction_column:
        kinds.setdefault(prepare.interaction_column, "label")
        ranges.setdefault(prepare.interaction_column, (-float("inf"), float("inf")))
    item_side: list[str] = []
    if sampled:  # what a sampled item brings with it
        for feature in cfg.data.sparse:
            if feature.side == "item" and feature.source_column not in built:
                item_side.append(
                    feature.input_column if feature.buckets is not None else feature.source_column
                )
        item_side += [feature.source_column for feature in cfg.data.dense if feature.side == "item"]
    dynamic = [f for f in cfg.data.sparse if f.id_mapping == "dynamic"]
    by_column = {f.source_column: f for f in cfg.data.sparse}
    for history in histories:
        for output, source in [(history.name, history.column), *history.side.items()]:
            made, read = by_column.get(output), by_column.get(source)
            if made is not None and (made.id_mapping == "dynamic") != (
                read is not None and read.id_mapping == "dynamic"
            ):
                raise ConfigError(
                    f"data.sparse: {made.name!r} lists the ids of column {source!r} (data.prepare.histories): give both "
                    "the same id_mapping (a history of dynamic ids holds raw ids)"
                )
    return TableSchema(
        kinds,
        dynamic_ids=tuple(dict.fromkeys(f.source_column for f in dynamic if f.source_column in kinds)),
        label_ranges=ranges,
        binary_labels=tuple(binary),
        user_column=prepare.user_column if prepare else None,
        time_column=prepare.time_column if prepare else None,
        dense_specs=specs,
        dense_fill=fills,
        buckets=buckets,
        delimiters=delimiters,
        split_column=prepare.split_column if prepare else None,
        item_side=tuple(dict.fromkeys(item_side)),
    )


def _check_masks_for_negatives(cfg: Config) -> None:
    """Sampled negatives have no value in any label but ``rated``: every other task needs ``mask: rated``."""
    for i, task in enumerate(cfg.tasks):
        if task.label_column != RATED and task.mask != RATED:
            raise ConfigError(
                f"tasks[{i}].mask: the rows data.prepare.negatives_per_positive samples have no {task.label_column!r}; "
                f"set mask: {RATED} on task {task.name!r} (its loss and metrics then count the real rows only)"
            )


def _prepare(cfg: Config, path: Path) -> DatasetMeta:
    """Prepares the data set; a binary label with one value stops naming its task."""
    from towerrec.data.convert import ConstantLabel
    from towerrec.data.prepare import prepare

    try:
        return prepare(cfg.data.prepare, str(path), input_schema(cfg))
    except ConstantLabel as err:
        task = next(t.name for t in cfg.tasks if t.label_column == err.column)
        raise ConstantLabel(err.where, err.column, err.value, task) from None


def _build(cfg: Config, path: Path) -> None:
    print(f"[towerrec] preparing data set {path} ({cfg.data.prepare.format})", flush=True)
    meta = _prepare(cfg, path)
    report_lines(meta)


def report_lines(meta: DatasetMeta) -> None:
    """Prints what the preparation did to the rows (every rule that changed one, with counts)."""
    from towerrec.data.cleaning import describe_report

    rows = {split: meta.num_rows(split) for split in meta.splits}
    print(f"[towerrec] data set {meta.root}: rows per split {rows}", flush=True)
    for line in describe_report(meta.report):
        print(f"[towerrec]   {line}", flush=True)
    held_out = meta.report.get("leave_last_out")
    if held_out:
        print(
            f"[towerrec]   leave_last_out: {held_out['users_held_out']:,} users give their last events to val/test; "
            f"{held_out['users_train_only']:,} with fewer than {held_out['min_events_per_user']} events keep them all "
            "in train (data.prepare.min_events_per_user)",
            flush=True,
        )
    if meta.report.get("negatives_per_positive"):
        print(
            f"[towerrec]   {meta.report['negatives_per_positive']} sampled negatives per row: items the user never "
            "interacted with, label 'rated' = 0 (data.prepare.negatives_per_positive)",
            flush=True,
        )


def ensure_dataset(cfg: Config) -> DatasetMeta:
    """Loads the data set, building it first (on global rank 0) when ``data.prepare`` says how. A
    complete data set made from another recipe stops the command (``data.rebuild: true`` builds it
    again, beside the old one, and renames it into place).

    The other ranks of a multi-process command never open a data set that rank 0 is about to
    replace: they wait until the folder holds the data set of this config (its recipe's
    fingerprint in ``metadata.json``, written last), printing how long they have waited, for at
    most ``data.prepare_timeout_s``."""
    path = Path(cfg.data.path)
    prepare = cfg.data.prepare
    if prepare is None:
        return DatasetMeta.load(path)
    from towerrec.data.prepare import fingerprint, prepared_with

    recipe = prepared_with(prepare, input_schema(cfg))
    wanted = fingerprint(recipe)
    if launcher_rank() != 0:
        return _wait_for_dataset(cfg, path, recipe, wanted)
    if is_complete(path):
        meta = DatasetMeta.load(path)
        if meta.fingerprint == wanted:
            return meta
        if not cfg.data.rebuild:
            raise ConfigError(_difference(meta, recipe, path))
        print(f"[towerrec] {path} was prepared differently: rebuilding it (data.rebuild)", flush=True)
    _build(cfg, path)  # written beside the folder, then renamed into place (DatasetWriter.commit)
    return DatasetMeta.load(path)


PREPARE_PROGRESS_EVERY_S = 60.0


def _wait_for_dataset(cfg: Config, path: Path, recipe: dict, wanted: str) -> DatasetMeta:
    """A rank other than 0: the data set at ``path`` once its fingerprint is ``wanted``. A data set
    prepared from another recipe that rank 0 will not replace (no ``data.rebuild``) stops at once;
    rank 1 prints a line at the start and every minute while it waits."""
    rank, timeout = launcher_rank(), cfg.data.prepare_timeout_s
    started = time.monotonic()
    next_line = started
    while True:
        found = _stored_fingerprint(path)
        if found == wanted:
            return DatasetMeta.load(path)
        if found is not None and not cfg.data.rebuild:
            raise ConfigError(_difference(DatasetMeta.load(path), recipe, path))
        waited = time.monotonic() - started
        if waited > timeout:
            raise ConfigError(
                f"data.prepare_timeout_s: rank {rank} waited {_minutes(waited)} for rank 0 to prepare {path} "
                f"and gave up ({'a data set of another recipe is still there' if found else 'none is there yet'}); "
                "did rank 0 fail? Run `towerrec prepare` with this config before the job, or raise the timeout"
            )
        if rank == 1 and time.monotonic() >= next_line:
            print(
                f"[towerrec] ranks 1+ waiting for rank 0 to prepare {path}: {_minutes(waited)} so far"
                f"{_written_so_far(path)}, giving up after {_minutes(timeout)} (data.prepare_timeout_s)",
                flush=True,
            )
            next_line += PREPARE_PROGRESS_EVERY_S
        time.sleep(min(1.0, max(0.05, timeout / 10)))


def _stored_fingerprint(path: Path) -> str | None:
    """The recipe fingerprint in ``path``'s ``metadata.json``; None while there is none (no data
    set, one being renamed into place, or one whose fingerprint is not written yet)."""
    import json

    try:
        return json.loads((path / METADATA_FILE).read_text()).get("fingerprint")
    except (OSError, ValueError):
        return None


def _written_so_far(path: Path) -> str:
    """How much rank 0's preparation folder (``<path>.partial-<pid>``, the newest) holds."""
    partial = [p for p in path.parent.glob(f"{path.name}.partial-*") if p.is_dir()]
    if not partial:
        return ""
    newest = max(partial, key=lambda p: p.stat().st_mtime)
    size = sum(f.stat().st_size for f in newest.rglob("*") if f.is_file())
    return f", {size / 2**20:,.1f} MiB written"


def _minutes(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.0f} min"


def _changed_keys(meta: DatasetMeta, recipe: dict) -> str:
    """The keys whose value differs between the data set's recipe and the config's."""
    before = meta.prepared_with or {}
    changed = []

    def walk(a, b, key):
        if isinstance(a, dict) and isinstance(b, dict):
            for k in sorted(set(a) | set(b)):
                walk(a.get(k), b.get(k), f"{key}.{k}" if key else k)
        elif a != b:
            changed.append(f"{key}: {a!r} there, {b!r} in the config")

    walk(before, recipe, "")
    return "; ".join(changed[:5]) or "it was made by an older towerrec"


def _difference(meta: DatasetMeta, recipe: dict, path: Path) -> str:
    return (
        f"data.path: {path} was prepared differently from data.prepare ({_changed_keys(meta, recipe)}); point "
        "data.path elsewhere, delete the folder, or set data.rebuild: true to build it again"
    )


def check_data_against_config(cfg: Config, meta: DatasetMeta) -> None:
    """Schema and metadata must agree before any process group starts."""
    known = meta.columns
    where = meta.root / "metadata.json"
    for i, feature in enumerate(cfg.data.sparse):
        column = known.get(feature.source_column)
        if column is None:
            raise ConfigError(f"data.sparse[{i}].column: {where} has no column {feature.source_column!r}")
        expected = "multi_hot" if feature.multi_hot else "sparse"
        if column.get("kind") in ("sparse", "multi_hot") and column["kind"] != expected:
            raise ConfigError(
                f"data.sparse[{i}].multi_hot: column {feature.source_column!r} is {column['kind']} in {where}"
            )
    for i, feature in enumerate(cfg.data.dense):
        if feature.source_column not in known:
            raise ConfigError(f"data.dense[{i}].column: {where} has no column {feature.source_column!r}")
    for i, task in enumerate(cfg.tasks):
        if task.label_column not in known:
            raise ConfigError(f"tasks[{i}].label: {where} has no column {task.label_column!r}")
        if task.mask and task.mask not in known:
            raise ConfigError(f"tasks[{i}].mask: {where} has no column {task.mask!r}")
    for split in (cfg.data.train_split, cfg.data.val_split, cfg.data.test_split):
        if split is not None and split not in meta.splits:
            raise ConfigError(
                f"data: split {split!r} is not in {where} (have: {', '.join(sorted(meta.splits))})"
            )
    for role in ("train", "val", "test"):
        days = cfg.data.days(role)
        if days is not None and days[1] >= meta.num_days:
            raise ConfigError(
                f"data.{role}_days: {list(days)}, but {where} has days 0..{meta.num_days - 1} "
                "(towerrec prepare --append adds one)"
            )
    group = evaluation_group_column(cfg)
    if group is not None and group not in known:
        raise ConfigError(f"data.group_column: {where} has no column {group!r}")
    _check_binary_labels(cfg, meta)


def _check_binary_labels(cfg: Config, meta: DatasetMeta) -> None:
    """A binary task whose label has one value on every training row it counts (its mask's) learns
    nothing (loss 0, AUC undefined): stop naming the task, the column and the value. Reads the
    label (and mask) columns of the training split until both values have been seen: usually one
    row group, the whole column only when the label is constant."""
    import numpy as np

    from towerrec.data.cleaning import dense_values
    from towerrec.data.reader import iter_row_groups

    tasks = [(i, task) for i, task in enumerate(cfg.tasks) if task.type == "binary"]
    seen: dict[int, set[float]] = {i: set() for i, _ in tasks}
    columns = list(dict.fromkeys(c for _, task in tasks for c in (task.label_column, task.mask) if c))
    if not tasks:
        return
    for _, table in iter_row_groups(meta.row_groups(cfg.data.train_split, cfg.data.days("train")), columns):
        for i, task in tasks:
            values = dense_values(table.column(task.label_column))
            if task.mask:
                flags = dense_values(table.column(task.mask))
                values = values[np.isfinite(flags) & (flags != 0)]
            seen[i].update(np.unique(values[np.isfinite(values)])[:2].tolist())
        if all(len(values) > 1 for values in seen.values()):
            return
    for i, task in tasks:
        if len(seen[i]) == 1:
            counted = f" it counts (mask: {task.mask})" if task.mask else ""
            raise ConfigError(
                f"tasks[{i}] ({task.name!r}): label column {task.label_column!r} is {next(iter(seen[i])):g} on every "
                f"training row{counted} of {meta.root}: a binary task needs both 0 and 1 to learn anything"
            )


def prepare_command(cfg: Config, args=None) -> int:
    if cfg.data.prepare is None:
        raise ConfigError("data.prepare: not set (give --format and --source, or a config with data.prepare)")
    from towerrec.data.dataset import DatasetMeta, is_complete
    from towerrec.data.prepare import fingerprint, prepared_with

    schema = input_schema(cfg)
    if args is not None and getattr(args, "append", None):
        return append_command(cfg, args.append, schema)
    if is_complete(cfg.data.path):
        existing = DatasetMeta.load(cfg.data.path)
        if existing.fingerprint == fingerprint(prepared_with(cfg.data.prepare, schema)):
            print(
                f"[towerrec] {cfg.data.path} is already prepared from this config; nothing to do", flush=True
            )
            return 0
        if not cfg.data.rebuild:
            raise ConfigError(
                f"--out / data.path: {cfg.data.path} already holds another data set; choose another folder, "
                "delete it, or pass --data.rebuild true to replace it"
            )
    meta = _prepare(cfg, Path(cfg.data.path))
    report_lines(meta)
    print(f"[towerrec] the whole report is in {meta.root / 'metadata.json'}", flush=True)

    return 0


def append_command(cfg: Config, source: str, schema: TableSchema) -> int:
    """``towerrec prepare --append SOURCE``: the next day of the data set at ``data.path``, which
    must have been prepared from this config's ``data.prepare`` (day 0's source stays there)."""
    from towerrec.data.prepare import append_day, fingerprint, prepared_with

    path = Path(cfg.data.path)
    if not is_complete(path):
        raise ConfigError(
            f"data.path: {path} holds no prepared data set to append a day to (run towerrec prepare first)"
        )
    meta = DatasetMeta.load(path)
    recipe = prepared_with(cfg.data.prepare, schema)
    if meta.fingerprint != fingerprint(recipe):
        raise ConfigError(
            f"data.prepare: {path} was prepared from another recipe ({_changed_keys(meta, recipe)}); append a day "
            "with the config it was prepared with (its data.prepare.source stays the first day's)"
        )
    meta = append_day(cfg.data.prepare, str(path), source, schema)
    day = meta.days[-1]
    print(
        f"[towerrec] appended {source} to {path} as day {day['day']}: rows per split {day['rows_per_split']}",
        flush=True,
    )
    for column, count in day["report"].get("ids_outside_vocabulary", {}).items():
        if count:
            print(
                f"[towerrec]   {count:,} ids of column {column!r} are not in the data set's vocabulary: row 0",
                flush=True,
            )
    return 0
