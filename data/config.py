"""Typed configuration of the data: where the Parquet data set lives, its feature schema, batching.

Every field is documented; `towerrec.trainer.config.load_config` builds these from YAML and rejects unknown
keys and wrong types with the dotted key in the message (for example ``data.batch_size``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from towerrec.data.checks import in_unit_interval, positive

MISSING_ID = -(2**63)
"""The raw id a missing value of an ``id_mapping: dynamic`` feature is read (and prepared) as:
int64's smallest value. It never gets a row: it is looked up as row 0, like an unseen id."""


@dataclass
class DynamicIdsConfig:
    """``data.sparse[i].dynamic``: the id map of an ``id_mapping: dynamic`` feature's table.

    Raw int64 ids reach the model as they are and get rows of the table as they arrive in training
    (collision-free until the table is full), evicted by ``policy`` when it is; row 0 is every id
    without a row (never seen in training, evicted, or missing). Every rank holds the same map
    (``towerrec.models.dynamic_ids``); it is part of every checkpoint and of the serving export.
    Features sharing a ``table`` share its map and must give the same settings.
    """

    capacity: int
    """Ids that can hold a row at once; the table gets ``capacity + 1`` rows (row 0: unknown). One
    training step's global batch must not bring more distinct ids of the table than this."""
    policy: Literal["lru", "lfu", "ttl"] = "lru"
    """Which ids lose their row when the table is full and new ids arrive: ``lru`` the least
    recently seen, ``lfu`` the least often seen since they got their row, ``ttl`` only ids unseen
    for more than ``ttl_steps`` training steps (new ids beyond that go to row 0, counted as
    overflow). An id seen in the current step is never evicted; ties go to the lowest row. A
    ``ttl`` id that comes back after expiring keeps its row, re-initialised."""
    ttl_steps: int | None = None
    """``policy: ttl``: training steps an id keeps its row without being seen (required there,
    not allowed otherwise)."""
    evict_chunk: int | None = None
    """Rows evicted at once when the free rows run out (``null``: ``capacity // 64``, at least 1):
    the O(capacity) victim search then runs every few steps instead of every step; 1 is the exact
    policy. Evicted rows wait in a pool and are reused lowest first."""
    delta_capacity: int | None = None
    """Size of the small sorted index new ids enter before it is merged into the main one
    (``null``: ``max(1024, capacity // 32)``): a larger one merges (O(capacity)) less often."""

    def check(self) -> None:
        positive("capacity", self.capacity)
        if self.capacity >= 2**31 - 2:
            raise ValueError(f"capacity: must be < 2**31 - 2 (rows are int32), got {self.capacity}")
        positive("ttl_steps", self.ttl_steps)
        positive("evict_chunk", self.evict_chunk)
        positive("delta_capacity", self.delta_capacity)
        if self.policy == "ttl" and self.ttl_steps is None:
            raise ValueError("ttl_steps: required by policy: ttl")
        if self.policy != "ttl" and self.ttl_steps is not None:
            raise ValueError(f"ttl_steps: only for policy: ttl (the policy is {self.policy})")


@dataclass
class SparseFeature:
    """One sparse (categorical id) feature, looked up in a TorchRec embedding table.

    A single-valued feature has one id per row (``int64`` column); a multi-hot feature has a
    variable-length list of ids per row (``list<int64>`` column), pooled by ``pooling``.
    """

    name: str
    """Feature key in the KeyedJaggedTensor and in the model."""
    column: str | None = None
    """Parquet column holding the ids (default: ``name``)."""
    num_embeddings: int | None = None
    """Rows of the embedding table. ``null`` takes the vocabulary size from the data set's metadata."""
    embedding_dim: int = 16
    """Width of the embedding vectors."""
    pooling: Literal["sum", "mean"] = "sum"
    """How a multi-hot bag is reduced: ``sum`` or ``mean``."""
    multi_hot: bool = False
    """True for ``list<int64>`` columns (variable number of ids per row)."""
    table: str | None = None
    """Embedding table name; features naming the same table share it (default: ``t_<name>``)."""
    id_mapping: Literal["vocab", "hash", "dynamic"] = "vocab"
    """``vocab``: ids were mapped to ``[0, num_embeddings)`` at preparation (0 = out-of-vocabulary);
    ids outside that range at read time go to row 0. ``hash``: raw non-negative ids are hashed into
    ``num_embeddings`` rows. ``dynamic``: raw int64 ids (any value; text ids are hashed to int64 at
    preparation, their originals kept for output) are stored as they are and mapped to rows during
    training by an id map with eviction (``dynamic``): a new id gets its own row in the step it
    first appears; ids without a row (never trained on, evicted, missing) use row 0."""
    dynamic: DynamicIdsConfig | None = None
    """The id map of an ``id_mapping: dynamic`` feature (required there): capacity and eviction."""
    side: Literal["user", "item"] | None = None
    """``user`` or ``item`` when the feature describes the user or the item of a row (used to build
    candidate rows for recommendation and cold start); ``null`` for context features."""
    buckets: list[float] | int | None = None
    """Bucketise a numeric ``column`` into this feature's ids at preparation (``csv``/``parquet``):
    a list of ascending edges, or a number of quantile buckets fitted on the training rows. Id 0 =
    missing value; ids 1..n+1 = the intervals between the n edges. The data set stores the ids
    under the feature's ``name``; the edges go to ``metadata.json`` (and to the serving artifact)."""
    delimiter: str | None = None
    """``csv``: separator of a multi-hot string column (``Action|Comedy``; default
    ``data.prepare.list_delimiter``)."""
    train_drop_prob: float = 0.0
    """Multi-hot, mean-pooled only: in training, each id of a bag is left out with this probability
    (drawn from seed, epoch, rank and window, so a resumed run sees the same bags); evaluation and
    prediction read bags whole. A regulariser for history and neighbourhood bags (GC-MC's node
    dropout): training rows also see the thinner histories that users with fewer ratings have."""

    sequence: bool = False
    """An ordered list of ids per row, oldest first (a behaviour history: ``list<int64>``, implies
    ``multi_hot``), looked up unpooled (TorchRec ``EmbeddingCollection``) and encoded by
    ``model.sequence``. Every feature on a sequence's table is looked up the same way; all such
    tables share one ``embedding_dim``."""
    max_length: int = 50
    """Sequence: most recent ids kept per row (older ones are dropped when read)."""
    candidate: str | None = None
    """Sequence: the single-valued feature the history is read against (DIN's query, the
    transformer's last token), e.g. ``item_id``; share its table for one id space."""
    align_with: str | None = None
    """Sequence: a side list aligned position by position with that sequence (its rating levels,
    categories, ages); its embeddings are added to the sequence's. Lengths must match row by row."""

    def __post_init__(self) -> None:
        if self.sequence:
            self.multi_hot = True  # a list column, read like a bag

    @property
    def source_column(self) -> str:
        """The data set column holding the ids (a bucketised feature stores them under its name)."""
        return self.name if self.buckets is not None else (self.column or self.name)

    @property
    def input_column(self) -> str:
        """The column of the input file the feature comes from (``towerrec prepare``)."""
        return self.column or self.name

    @property
    def table_name(self) -> str:
        return self.table or f"t_{self.name}"

    @property
    def dynamic_rows(self) -> int | None:
        """Rows of an ``id_mapping: dynamic`` table (capacity + row 0), else None."""
        return None if self.dynamic is None else self.dynamic.capacity + 1

    def check(self) -> None:
        positive("embedding_dim", self.embedding_dim)
        positive("num_embeddings", self.num_embeddings)
        in_unit_interval("train_drop_prob", self.train_drop_prob)
        if self.train_drop_prob and not (self.multi_hot and self.pooling == "mean"):
            raise ValueError(
                "train_drop_prob: only for multi_hot features with pooling: mean (a sum over a "
                "thinned bag would be smaller in training than in evaluation)"
            )
        positive("max_length", self.max_length)
        if not self.sequence and (self.candidate or self.align_with):
            raise ValueError("candidate / align_with: only for sequence features (sequence: true)")
        if self.sequence and self.train_drop_prob:
            raise ValueError("train_drop_prob: not for sequence features")
        if self.sequence and self.buckets is not None:
            raise ValueError("buckets: a sequence holds a list of ids per row")
        if self.sequence and not self.align_with and not self.candidate:
            raise ValueError("candidate: a sequence needs the feature it is read against (e.g. item_id)")
        if self.id_mapping == "hash" and self.num_embeddings is None:
            raise ValueError("num_embeddings: required with id_mapping: hash")
        if (self.id_mapping == "dynamic") != (self.dynamic is not None):
            raise ValueError(
                "dynamic: required by id_mapping: dynamic (e.g. dynamic: {capacity: 100000}), and only there"
            )
        if self.dynamic is not None:
            if self.num_embeddings is not None:
                raise ValueError(
                    "num_embeddings: an id_mapping: dynamic table has dynamic.capacity + 1 rows; leave it unset"
                )
            if self.buckets is not None:
                raise ValueError(
                    "buckets: a bucketised feature's ids are its buckets (not id_mapping: dynamic)"
                )
        if isinstance(self.buckets, list):
            if any(b >= a for a, b in zip(self.buckets[1:], self.buckets)):
                raise ValueError(f"buckets: edges must be strictly ascending, got {self.buckets}")
            if self.multi_hot:
                raise ValueError("buckets: a bucketised feature holds one id per row (multi_hot: false)")
        elif isinstance(self.buckets, int):
            if self.buckets < 2:
                raise ValueError(f"buckets: at least 2 quantile buckets, got {self.buckets}")


@dataclass
class DenseFeature:
    """One dense float feature (a ``float``/``double`` Parquet column)."""

    name: str
    """Feature name."""
    column: str | None = None
    """Parquet column (default: ``name``)."""
    fill_nan: float | None = None
    """Value that replaces a missing (null/NaN/inf) value, at preparation (``csv``/``parquet``,
    before any transform) and at read time; ``null``: at preparation ``data.prepare.missing_dense``
    decides, at read time a NaN/inf is an error naming file and row."""
    side: Literal["user", "item"] | None = None
    """``user``, ``item`` or ``null`` (context), as for sparse features."""
    transform: list[Literal["log1p", "standardize"]] = field(default_factory=list)
    """``csv``/``parquet`` preparation, in this order after ``clip``: ``log1p`` (log(1 + max(x, 0)),
    applied before clipping) and ``standardize`` ((x - mean) / std of the training rows). Stored in
    ``metadata.json``; the serving artifact applies the same steps to raw values."""
    clip: list[float] | None = None
    """``[low, high]``: clip at preparation (after ``log1p``)."""
    clip_quantile: float | None = None
    """Clip at the [1 - q, q] quantiles of the training rows (q in (0.5, 1)), after ``log1p``."""

    @property
    def source_column(self) -> str:
        return self.column or self.name

    def check(self) -> None:
        if self.clip is not None and (len(self.clip) != 2 or self.clip[0] >= self.clip[1]):
            raise ValueError(f"clip: give [low, high] with low < high, got {self.clip}")
        if self.clip_quantile is not None and not 0.5 < self.clip_quantile < 1:
            raise ValueError(f"clip_quantile: must be in (0.5, 1), got {self.clip_quantile}")
        if self.clip is not None and self.clip_quantile is not None:
            raise ValueError("clip_quantile: give clip or clip_quantile, not both")
        if len(set(self.transform)) != len(self.transform):
            raise ValueError(f"transform: each step once, got {self.transform}")


@dataclass
class CsvOptions:
    """How CSV input files are written."""

    header: bool = True
    """The first line names the columns."""
    column_names: list[str] | None = None
    """Column names, for files without a header (or to rename a header's columns)."""
    delimiter: str = ","
    """Field separator (one character; a space after it, as in ``a, b``, is stripped with ``strip``)."""
    null_values: list[str] = field(default_factory=list)
    """Cells that mean "missing" besides an empty cell, e.g. ``["?", "NA"]``. None by default: a
    category called ``NA`` stays a category."""
    strip: bool = True
    """Strip spaces around every cell (``"a, b"`` and ``"a,b"`` read alike)."""

    def check(self) -> None:
        if len(self.delimiter) != 1:
            raise ValueError(f"delimiter: must be one character, got {self.delimiter!r}")
        if not self.header and not self.column_names:
            raise ValueError("column_names: a file without a header needs its column names")


@dataclass
class HistoryConfig:
    """One behaviour sequence built at preparation (``data.prepare.histories``): per row, the ids of
    its user's earlier events, with aligned side lists."""

    name: str
    """Output list column of the events' ids (e.g. ``hist_items``)."""
    column: str
    """Id column of the events (e.g. ``item``): a ``data.sparse`` feature's column, whose
    vocabulary maps the history too (give the history feature the same ``table``)."""
    where: str | None = None
    """Column whose non-zero values mark the rows that are events (e.g. ``click``); ``null``: every
    training row is an event."""
    side: dict[str, str] = field(default_factory=dict)
    """Aligned lists: output column → id column of the events (e.g. ``{hist_categories: category}``)."""
    age: str | None = None
    """Output column of each event's age at the row: ``1 + floor(log2(1 + Δt))`` in the time
    column's unit, at most 63."""
    max_length: int | None = None
    """Most recent events kept (default ``data.prepare.history_max_length``)."""
    events: Literal["train", "all"] = "train"
    """Which rows can be events: ``train`` (the training split only: no validation or test label
    ever enters a feature) or ``all`` (every split: what serving knows of the past; use it with a
    ``time`` split, where no training row is later than a test row)."""

    def outputs(self) -> list[str]:
        return [self.name, *self.side, *([self.age] if self.age else [])]

    def check(self) -> None:
        positive("max_length", self.max_length)


@dataclass
class PrepareConfig:
    """How to build the data set on first use when ``data.path`` holds no complete data set."""

    format: Literal["synthetic", "movielens100k", "movielens", "criteo", "csv", "parquet"] = "synthetic"
    """``synthetic`` (generated), ``movielens100k`` (the ml-100k folder), or another format that
    ``towerrec prepare --help`` lists."""
    source: str | None = None
    """Input for converted formats (ignored for ``synthetic``): a file, a folder (its files in name
    order), a glob pattern (``logs/part-*.csv``) or a filesystem URI pyarrow understands
    (``file:///data/x.parquet``, ``s3://bucket/prefix/``)."""
    split_files: dict[str, str] = field(default_factory=dict)
    """``csv``/``parquet``, data that is already split: split name (``train``, ``val``, ``test``) →
    its input (file, folder, glob or URI, as ``source``). Rows stay in their split; ``split`` is not
    used. Without a ``val`` entry, a seeded ``val_fraction`` of the training rows becomes val."""
    split_column: str | None = None
    """``csv``/``parquet``: a column naming each row's split (values in ``split_values``); rows stay
    in their split."""
    split_values: dict[str, str] = field(
        default_factory=lambda: {
            "train": "train",
            "val": "val",
            "valid": "val",
            "validation": "val",
            "test": "test",
        }
    )
    """``split_column`` value → split (``train``, ``val`` or ``test``); other values are an error."""
    csv: CsvOptions = field(default_factory=lambda: CsvOptions())
    """``csv``: how the files are written (header, delimiter, missing-value tokens)."""
    derive: dict[str, str] = field(default_factory=dict)
    """``csv``/``parquet``: new column → expression over input columns, computed per row before
    anything else and usable as a label or feature, e.g. ``{like: "rating >= 4", ctcvr: "click * buy",
    married: "marital_status == 'Never married'"}``. Operators: ``+ - * / ** == != < <= > >= and or
    not``, numbers, quoted strings, ``where(c, a, b)``, ``abs``, ``log1p``, ``is_null``."""
    split: str = "random"
    """Split rule: ``random``, ``time``, ``user``, ``leave_last_out``, or a canonical MovieLens split
    such as ``u1`` (``split_files``/``split_column`` keep a split the data already has)."""
    val_fraction: float = 0.1
    """Fraction of the training rows held out as the validation split (for early stopping/tuning)."""
    test_fraction: float = 0.1
    """Fraction of rows in the test split (for ``random``/``time``/``user`` splits)."""
    num_shards: int = 4
    """Parquet files written per split."""
    row_group_size: int = 16384
    """Rows per Parquet row group (the unit of reading and of rank assignment)."""
    num_rows: int = 200_000
    """Synthetic: number of interactions."""
    num_users: int = 2_000
    """Synthetic: number of users."""
    num_items: int = 1_000
    """Synthetic: number of items."""
    zipf_exponent: float = 1.05
    """Synthetic: power-law exponent of user/item popularity."""
    seed: int = 0
    """Seed of the generator and of the split."""
    columns: dict[str, Literal["sparse", "multi_hot", "dense", "label", "other"]] = field(
        default_factory=dict
    )
    """``csv``/``parquet``: extra input columns to keep (``other``: copied as is, e.g. a timestamp)
    or a kind for a column that no feature or task names. Features and labels need no entry here:
    their columns come from ``data.sparse``, ``data.dense`` and ``tasks``."""
    list_delimiter: str = "|"
    """``csv``: default separator inside a multi-hot string (``Action|Comedy``)."""
    user_column: str | None = None
    """``csv``/``parquet``: column identifying the user (needed by ``user``/``leave_last_out`` splits)."""
    time_column: str | None = None
    """``csv``/``parquet``: column ordering rows in time (``time``/``leave_last_out`` splits and
    ``histories``; a position in each user's sequence works too; default: row order)."""
    item_column: str | None = None
    """``csv``/``parquet``: column identifying the item (needed by ``negatives_per_positive``)."""
    interaction_column: str | None = None
    """``csv``/``parquet``: column whose non-zero rows are the user's interactions, in a log that
    also holds rows that are not (sampled negatives, items shown but not chosen: 0). A
    ``leave_last_out`` split then holds out each user's last interactions, and every other row at
    the time of a held-out interaction goes with it (null: every row is an interaction)."""
    min_events_per_user: int = 3
    """``csv``/``parquet`` ``leave_last_out``: users with fewer interactions keep them all in the
    training split (no validation or test row); the others give their last to test and the one
    before to validation. 3 is the published next-item protocol (SASRec, BERT4Rec, HSTU: every
    evaluated user has at least one training event). At least 3 with validation, 2 without."""
    cut_time: float | None = None
    """``time`` split: rows with time >= this are test (default: the ``1 - test_fraction`` quantile)."""
    min_count: int = 1
    """Ids seen fewer times than this in the training split map to the out-of-vocabulary row 0."""
    sparse_mapping: Literal["vocab", "hash"] = "vocab"
    """``vocab``: ids → rows of a vocabulary fitted on the training split; ``hash``: ids are hashed
    into ``num_hash_buckets`` rows (row 0 is kept for missing ids); no vocabulary pass."""
    num_hash_buckets: int = 1_000_000
    """Rows of every hashed id table (``sparse_mapping: hash``), plus row 0."""
    dedup: bool = False
    """Drop exact duplicate rows (memory: 8 bytes per distinct row; see ``towerrec.data.cleaning``). Off by
    default: repeated rows are often real (the same impression twice, identical survey answers)."""
    missing_sparse: Literal["fill", "drop"] = "fill"
    """Missing sparse/multi-hot id: ``fill`` (out-of-vocabulary row 0 / empty list) or ``drop`` the row."""
    missing_dense: Literal["fill", "drop"] = "fill"
    """Missing/NaN dense value: ``fill`` (with ``dense_fill``) or ``drop`` the row."""
    dense_fill: float = 0.0
    """Value of a missing dense feature with ``missing_dense: fill``."""
    negatives_per_positive: int = 0
    """Add this many sampled negatives per row (``movielens100k``: per rating; ``csv``/``parquet``:
    per row of the input, which needs ``user_column`` and ``item_column``) to every split: items
    drawn uniformly from the catalogue that the user did not interact with (in the training and
    validation splits; for test negatives, in any split). A sampled row copies its row's user,
    time, context and user-side values and takes the sampled item's own item-side values
    (``csv``/``parquet``: the features with ``side: item``, as the item's first training row has
    them; the catalogue is the training split's items). Rows get a ``rated`` label (1 real, 0
    sampled); a sampled row has no value in the other labels, so tasks on them set ``mask: rated``.
    Memory (``csv``/``parquet``): 17 bytes per row while the fitting pass gathers the (user, item)
    pairs, then 8 bytes per distinct pair, twice (with and without the test rows), plus the
    catalogue's item-side values. 0: no negatives and no ``rated`` column."""
    neighbourhood_max_ids: int = 24
    """``movielens100k``: cap of each rating-level neighbourhood bag (``user_items_r*``,
    ``item_users_r*``), most recent first. Larger bags carry more of the rating structure and cost
    more ids per row (10 bags)."""
    history_max_length: int = 50
    """Most recent events kept in each behaviour sequence: the ``movielens100k`` ``hist_*`` lists
    and the default of ``histories[i].max_length``."""
    histories: list[HistoryConfig] = field(default_factory=list)
    """``csv``/``parquet``: behaviour sequences to build from the input rows themselves: for each
    row, its user's training events strictly before the row's time (``user_column``,
    ``time_column``), oldest first, as list columns that ``data.sparse`` features with
    ``sequence: true`` read."""
    log_transform: bool | None = None
    """``criteo``: dense x → log(1 + max(x, 0)) (``null``: true). Other formats: per column,
    ``data.dense[i].transform``."""

    def check(self) -> None:
        positive("num_shards", self.num_shards)
        positive("row_group_size", self.row_group_size)
        in_unit_interval("val_fraction", self.val_fraction)
        in_unit_interval("test_fraction", self.test_fraction)
        positive("neighbourhood_max_ids", self.neighbourhood_max_ids)
        positive("negatives_per_positive", self.negatives_per_positive, allow_zero=True)
        positive("min_count", self.min_count)
        positive("num_hash_buckets", self.num_hash_buckets)
        positive("history_max_length", self.history_max_length)
        if self.split == "leave_last_out" and self.min_events_per_user < (3 if self.val_fraction > 0 else 2):
            raise ValueError(
                f"min_events_per_user: must be at least {3 if self.val_fraction > 0 else 2} (the held-out "
                f"event{'s' if self.val_fraction > 0 else ''} plus one to train on), got {self.min_events_per_user}"
            )
        if self.histories and not self.user_column:
            raise ValueError(
                "histories: need user_column (whose events; time_column orders them, else row order)"
            )
        if self.negatives_per_positive and self.interaction_column:
            raise ValueError(
                "negatives_per_positive: the log already holds rows that are not interactions "
                f"(interaction_column: {self.interaction_column}); sample negatives or keep the log's, not both"
            )
        if self.split_files and self.split_column:
            raise ValueError("split_column: give split_files or split_column, not both")
        for name in self.split_files:
            if name not in ("train", "val", "test"):
                raise ValueError(f"split_files.{name}: not a split (train, val, test)")
        if self.split_files and "train" not in self.split_files:
            raise ValueError("split_files: needs a train entry")
        for value, split in self.split_values.items():
            if split not in ("train", "val", "test"):
                raise ValueError(f"split_values.{value}: {split!r} is not train, val or test")


@dataclass
class DataConfig:
    """Where the data set is and how batches are built."""

    path: str = "runs/data/synthetic"
    """Data set folder: ``metadata.json`` plus one sub-folder of Parquet shards per split."""
    prepare: PrepareConfig | None = None
    """If set and ``path`` holds no complete data set, build it first (the embedded default does).
    A data set built from another ``prepare`` section (or other feature columns) is not used: the
    command stops, unless ``rebuild``."""
    rebuild: bool = False
    """Rebuild the data set at ``path`` when it was prepared differently from ``data.prepare``. The
    new one is built beside it and renamed into place; no rank reads the old one meanwhile."""
    prepare_timeout_s: float = 86400.0
    """Several processes: how long the other ranks wait for global rank 0 to prepare (or rebuild)
    the data set before they stop with an error (default one day: a cluster job's time limit
    usually ends it first). For a large data set run ``towerrec prepare`` before the job instead."""
    train_split: str = "train"
    """Split used for training."""
    val_split: str | None = "val"
    """Split evaluated during training (``null`` disables validation)."""
    test_split: str | None = "test"
    """Split evaluated by ``towerrec test`` and at the end of ``fit``."""
    batch_size: int = 512
    """Training batch size per rank."""
    eval_batch_size: int = 4096
    """Evaluation batch size per rank."""
    shuffle_window_rows: int = 65536
    """Rows shuffled together (row groups are also visited in a seeded random order each epoch)."""
    background_decode: bool | None = None
    """Read and decode the next shuffle window in a background thread while the current one trains
    (``true``), or in the training thread when it is needed (``false``). ``null``: in the background
    only when a CPU is left over (torch threads × processes on the node < CPUs of this process):
    when torch's threads already use every core, the extra runnable thread stalls its parallel
    regions (benchmarks/results/DATA_SCALE.md). The batches are the same."""
    sparse: list[SparseFeature] = field(default_factory=list)
    """Sparse id features."""
    dense: list[DenseFeature] = field(default_factory=list)
    """Dense float features."""
    sample_weight_column: str | None = None
    """Optional per-row sample weight column (float)."""
    validate_on_start: bool = True
    """Read every split once before training and report all bad files/values up front (the
    reader still checks each batch as it reads; turn off for very large data sets to save a pass)."""
    bad_rows: Literal["error", "skip"] = "error"
    """What to do with a row whose label/feature value is invalid: ``error`` (stop, naming file,
    row group and row) or ``skip`` (drop it, count it and report the count)."""
    max_out_of_range_fraction: float = 0.01
    """Most a ``vocab`` feature's ids may hold ids at or above its configured ``num_embeddings``
    (each read as row 0, the out-of-vocabulary row): a few are the tail of a capped table or ids
    newer than it; more mean the table is too small for the data and the feature partly one row.
    Above it the command stops, naming the feature (checked per split before training with
    ``validate_on_start``, and on each training epoch's ids, summed over ranks). Counts go to the
    log and to ``metrics.json`` (``out_of_range_ids``). ``1.0`` allows any share."""
    train_days: list[int] | None = None
    """Days of a data set grown day by day (``towerrec prepare --append``) whose ``train_split``
    rows train: ``[first, last]``, inclusive (day 0 is the first preparation). ``null``: every day."""
    val_days: list[int] | None = None
    """Days whose ``val_split`` rows are validated (``[first, last]``; ``null``: every day)."""
    test_days: list[int] | None = None
    """Days whose ``test_split`` rows are tested and predicted (``[first, last]``; ``null``: every
    day). A rolling evaluation trains on days ``[0, d]`` and tests on ``[d + 1, d + 1]``; a day's
    ``train_split`` rows may serve as its test rows as long as the run does not train on that day."""
    group_column: str | None = None
    """Column of the user (group) of each row for GAUC, the per-user AUC of binary tasks: integer
    or string ids as the data set stores them. ``null``: the column of ``recommend.user_feature``
    (with a vocabulary, every out-of-vocabulary user is id 0 there and counts as one user: point
    this at a column of raw ids, e.g. ``data.prepare.columns: {user_raw: other}``, to keep them
    apart)."""

    @property
    def sequence_tables(self) -> set[str]:
        """Tables looked up unpooled: those of sequence features."""
        return {f.table_name for f in self.sparse if f.sequence}

    def _check_sequences(self) -> None:
        by_name = {f.name: f for f in self.sparse}
        tables = self.sequence_tables
        dims = {f.embedding_dim for f in self.sparse if f.table_name in tables}
        if len(dims) > 1:
            raise ValueError(
                f"sparse: the tables of sequence features ({', '.join(sorted(tables))}) and the features "
                f"sharing them need one embedding_dim (TorchRec's EmbeddingCollection), got {sorted(dims)}"
            )
        for i, f in enumerate(self.sparse):
            if f.table_name in tables and not f.sequence and f.multi_hot:
                raise ValueError(
                    f"sparse[{i}]: bag {f.name!r} shares the sequence table {f.table_name!r}; a sequence "
                    "table serves sequences and single-valued ids only"
                )
            if not f.sequence:
                continue
            for key, other in (("candidate", f.candidate), ("align_with", f.align_with)):
                if other is not None and other not in by_name:
                    raise ValueError(f"sparse[{i}].{key}: no sparse feature {other!r}")
            if f.candidate and (
                by_name[f.candidate].multi_hot or by_name[f.candidate].embedding_dim != f.embedding_dim
            ):
                raise ValueError(
                    f"sparse[{i}].candidate: {f.candidate!r} must be single-valued with embedding_dim "
                    f"{f.embedding_dim}"
                )
            if f.align_with:
                main = by_name[f.align_with]
                if not main.sequence or main.align_with:
                    raise ValueError(f"sparse[{i}].align_with: {f.align_with!r} is not a main sequence")
                if main.max_length != f.max_length:
                    raise ValueError(
                        f"sparse[{i}].max_length: {f.max_length} differs from {main.name!r}'s {main.max_length}"
                    )

    def days(self, role: str | None) -> tuple[int, int] | None:
        """The day range of the ``train``, ``val`` or ``test`` reading, or None: every day."""
        days = {"train": self.train_days, "val": self.val_days, "test": self.test_days}.get(role)
        return None if days is None else (days[0], days[1])

    def check(self) -> None:
        for key in ("train_days", "val_days", "test_days"):
            days = getattr(self, key)
            if days is not None and (len(days) != 2 or days[0] < 0 or days[0] > days[1]):
                raise ValueError(f"{key}: give [first, last] with 0 <= first <= last, got {days}")
        positive("batch_size", self.batch_size)
        positive("prepare_timeout_s", self.prepare_timeout_s)
        in_unit_interval("max_out_of_range_fraction", self.max_out_of_range_fraction, include_one=True)
        positive("eval_batch_size", self.eval_batch_size)
        positive("shuffle_window_rows", self.shuffle_window_rows)
        if not self.sparse:
            raise ValueError("sparse: at least one sparse feature is needed (the model embeds ids)")
        names = [f.name for f in self.sparse]
        if len(set(names)) != len(names):
            raise ValueError(f"sparse: duplicate feature names in {names}")
        dims_of_table: dict[str, int] = {}
        pooling_of_table: dict[str, tuple[str, str]] = {}
        for i, feature in enumerate(self.sparse):
            previous = dims_of_table.setdefault(feature.table_name, feature.embedding_dim)
            if previous != feature.embedding_dim:
                raise ValueError(
                    f"sparse[{i}].embedding_dim: table {feature.table_name!r} is shared with another feature "
                    f"of dim {previous}"
                )
            if (
                feature.multi_hot and not feature.sequence
            ):  # TorchRec pools per table; one id per row pools the same either way
                owner, pooling = pooling_of_table.setdefault(
                    feature.table_name, (feature.name, feature.pooling)
                )
                if pooling != feature.pooling:
                    raise ValueError(
                        f"sparse[{i}].pooling: table {feature.table_name!r} pools {pooling!r} for multi-hot "
                        f"feature {owner!r}; multi-hot features sharing a table must pool alike (TorchRec "
                        "pools per table)"
                    )
        self._check_sequences()
        self._check_dynamic()

    @property
    def dynamic_tables(self) -> dict[str, DynamicIdsConfig]:
        """Tables whose ids are mapped in training (``id_mapping: dynamic``) → their id map settings."""
        return {f.table_name: f.dynamic for f in self.sparse if f.dynamic is not None}

    def _check_dynamic(self) -> None:
        settings: dict[str, tuple[str, DynamicIdsConfig | None]] = {}
        for i, f in enumerate(self.sparse):
            owner, first = settings.setdefault(f.table_name, (f.name, f.dynamic))
            if first != f.dynamic:
                raise ValueError(
                    f"sparse[{i}].dynamic: table {f.table_name!r} is shared with {owner!r}, whose id_mapping / dynamic "
                    f"settings differ ({first} vs {f.dynamic}); features sharing a table share its id map"
                )
