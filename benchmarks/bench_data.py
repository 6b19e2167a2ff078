"""Data-path benchmark: reader throughput against plain pyarrow, and peak memory vs data size.

    python -m benchmarks.bench_data                                   # 1M vs 20M rows (minutes)
    python -m benchmarks.bench_data --rows-small 200000 --rows-large 2000000
    python -m benchmarks.bench_data --parts-only                     # 3. alone, on 1M rows

1. Throughput: rows/s from the Parquet shards to ready ``Batch`` objects (``towerrec.data.reader.BatchStream``,
   one process, batch 4096, shuffled) against ``pyarrow.parquet.read_table`` of the same columns
   of the same files, in the same run (best of 3 each). Target: ratio >= 0.5.
2. Memory: peak RSS of a fresh process streaming one epoch of the small and of the large
   synthetic data set. Streaming is bounded, so the peak should not grow with the data: target
   growth < 10%. Linux keeps ``ru_maxrss`` across fork+exec (a child starts with its parent's
   peak), so the data sets are generated in subprocesses too (this parent imports torch only after
   them), and the child also reports ``VmHWM`` (``/proc/self/status``): the peak of its own
   address space, used for the growth figure where available.
3. Where the reader's time goes: one inline epoch of the small data set, part by part
   (``reader_parts``), and the bound that puts on the ratio of 1.
"""

from __future__ import annotations

import argparse
import itertools
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BATCH_SIZE = 4096


def synthetic_spec(meta):
    """The ReadSpec of every synthetic feature and label (imports torch: call in children)."""
    from towerrec.data.config import DenseFeature, SparseFeature
    from towerrec.data.reader import LabelSpec, ReadSpec
    from towerrec.data.synthetic import SYNTHETIC_COLUMN_SIZES

    sparse = [SparseFeature(n) for n in ("user_id", "item_id", *SYNTHETIC_COLUMN_SIZES)]
    sparse.append(SparseFeature("genres", multi_hot=True))
    labels = (
        LabelSpec("rating", min_value=1, max_value=5),
        LabelSpec("click", binary=True),
        LabelSpec("conversion", binary=True),
    )
    return ReadSpec(
        sparse=tuple(sparse),
        dense=(DenseFeature("price"), DenseFeature("user_activity")),
        labels=labels,
        num_embeddings={f.name: meta.vocab_size(f.source_column) for f in sparse},
    )


def stream_epoch(meta, spec) -> int:
    from towerrec.data.reader import BatchStream

    rows = 0
    for batch in BatchStream(meta, "train", spec, batch_size=BATCH_SIZE, shuffle=True):
        rows += int(batch.weights.sum())
    return rows


def throughput(meta) -> dict[str, float]:
    import pyarrow.parquet as pq

    spec = synthetic_spec(meta)
    files = sorted({rg.file for rg in meta.row_groups("train")})
    arrow_s = reader_s = float("inf")
    for _ in range(3):  # best of 3, alternating, so neither side pays the cold start
        start = time.perf_counter()
        rows_arrow = sum(pq.read_table(f, columns=spec.columns()).num_rows for f in files)
        arrow_s = min(arrow_s, time.perf_counter() - start)
        start = time.perf_counter()
        rows_reader = stream_epoch(meta, spec)
        reader_s = min(reader_s, time.perf_counter() - start)
    assert rows_arrow == rows_reader == meta.num_rows("train")
    return {
        "rows": rows_reader,
        "arrow_rows_per_s": rows_arrow / arrow_s,
        "reader_rows_per_s": rows_reader / reader_s,
    }


def reader_parts(meta) -> dict[str, float]:
    """Seconds of one inline (single-thread) epoch of the reader, part by part, on the windows the
    reader reads: Parquet read of the window's row groups, decode and validation, the shuffle
    gather, and cutting the shuffled window into Batches (KeyedJaggedTensor included); plus
    ``pyarrow`` reading the same row groups one at a time without threads."""
    import numpy as np
    import pyarrow.parquet as pq

    from towerrec.data.reader import BatchStream
    from towerrec.data.rows import decode_rows

    spec = synthetic_spec(meta)
    stream = BatchStream(meta, "train", spec, batch_size=BATCH_SIZE, background_decode=False)
    order = stream._epoch_order(0)
    ends = list(itertools.accumulate(rg.num_rows for rg in order))
    parts = dict.fromkeys(("read", "decode", "shuffle", "batches"), 0.0)
    for start in range(0, stream.num_rows, stream.window_rows):
        end = min(start + stream.window_rows, stream.num_rows)
        clock = time.perf_counter()
        table, locator = stream._read_rows(order, ends, start, end)
        parts["read"] += time.perf_counter() - clock
        clock = time.perf_counter()
        window, _ = decode_rows(table, spec, locator, first_row_id=start)
        parts["decode"] += time.perf_counter() - clock
        clock = time.perf_counter()
        window = window.take(np.random.default_rng([0, 0, 0, start]).permutation(window.num_rows))
        parts["shuffle"] += time.perf_counter() - clock
        clock = time.perf_counter()
        for begin in range(0, window.num_rows, BATCH_SIZE):
            window.to_batch(begin, min(begin + BATCH_SIZE, window.num_rows))
        parts["batches"] += time.perf_counter() - clock
    clock = time.perf_counter()
    files: dict = {}
    for rg in meta.row_groups("train"):
        files.setdefault(rg.file, pq.ParquetFile(rg.file)).read_row_group(
            rg.index, columns=spec.columns(), use_threads=False
        )
    parts["pyarrow_one_thread"] = time.perf_counter() - clock
    parts["rows"] = stream.num_rows
    return parts


PARTS = {
    "read": "Parquet read of the window's row groups",
    "decode": "decode and validation",
    "shuffle": "shuffle gather",
    "batches": "cutting into Batches (KJT)",
}


def print_parts(parts: dict[str, float], arrow_rows_per_s: float) -> None:
    total = sum(parts[key] for key in PARTS)
    rows = parts["rows"]
    print()
    print(f"Where one inline epoch of the reader goes ({rows:,} rows, one thread, best of 3):")
    print()
    print("| part | seconds | share | rows/s |")
    print("|---|---|---|---|")
    for key, name in PARTS.items():
        print(f"| {name} | {parts[key]:.3f} | {parts[key] / total:.0%} | {rows / parts[key]:,.0f} |")
    print(f"| all (the inline reader) | {total:.3f} | 100% | {rows / total:,.0f} |")
    one_thread = parts["pyarrow_one_thread"]
    print(
        f"| pyarrow, the same row groups one at a time, no threads | {one_thread:.3f} | | {rows / one_thread:,.0f} |"
    )
    print()
    print(
        f"Spread perfectly over both cores, this work bounds the reader at {2 * rows / total / arrow_rows_per_s:.2f} "
        "of `read_table`'s rate, which decodes the columns on both cores and does nothing else."
    )


def _vm_hwm_mib() -> float | None:
    status = Path("/proc/self/status")
    if not status.exists():
        return None
    for line in status.read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return None


def child_rss(path: str) -> None:
    """In a fresh process: stream one epoch, print peak memory (MiB) before and after as JSON."""
    from towerrec.data.dataset import DatasetMeta

    meta = DatasetMeta.load(path)
    spec = synthetic_spec(meta)
    before = _vm_hwm_mib()
    rows = stream_epoch(meta, spec)
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(
        json.dumps(
            {"rows": rows, "hwm_before_mib": before, "hwm_mib": _vm_hwm_mib(), "ru_maxrss_mib": maxrss}
        )
    )


def child_prepare(path: str, rows: int) -> None:
    from towerrec.data.config import PrepareConfig
    from towerrec.data.synthetic import prepare_synthetic

    cfg = PrepareConfig(
        num_rows=rows, num_users=max(2000, rows // 100), num_items=max(1000, rows // 200), num_shards=4
    )
    prepare_synthetic(cfg, path)


def _child(*args: str) -> str:
    command = [sys.executable, "-m", "benchmarks.bench_data", *args]
    return subprocess.run(command, capture_output=True, text=True, check=True).stdout


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Data-path benchmark (see the module docstring).")
    parser.add_argument("--rows-small", type=int, default=1_000_000, help="rows of the small data set")
    parser.add_argument("--rows-large", type=int, default=20_000_000, help="rows of the large data set")
    parser.add_argument("--workdir", help="where to write the data sets (default: a temporary folder)")
    parser.add_argument(
        "--parts-only",
        action="store_true",
        help="only the small data set: rate and where the reader's time goes",
    )
    parser.add_argument("--child-rss", help=argparse.SUPPRESS)
    parser.add_argument("--child-prepare", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child_rss:
        child_rss(args.child_rss)
        return 0
    if args.child_prepare:
        child_prepare(args.child_prepare[0], int(args.child_prepare[1]))
        return 0

    from towerrec.data.dataset import DatasetMeta

    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        results = {}
        sizes = (
            (("small", args.rows_small),)
            if args.parts_only
            else (("small", args.rows_small), ("large", args.rows_large))
        )
        for label, rows in sizes:
            start = time.perf_counter()
            _child("--child-prepare", str(Path(tmp) / label), str(rows))
            prepare_s = time.perf_counter() - start
            if not args.parts_only:
                measured = json.loads(_child("--child-rss", str(Path(tmp) / label)).strip().splitlines()[-1])
                results[label] = {"rows": rows, "prepare_s": prepare_s, **measured}
        meta = DatasetMeta.load(Path(tmp) / "small")
        speed = throughput(meta)
        parts = min((reader_parts(meta) for _ in range(3)), key=lambda p: sum(p[k] for k in PARTS))

    ratio = speed["reader_rows_per_s"] / speed["arrow_rows_per_s"]
    print("| measure | value | target |")
    print("|---|---|---|")
    print(
        f"| pyarrow read_table ({speed['rows']:,} train rows) | {speed['arrow_rows_per_s']:,.0f} rows/s | |"
    )
    print(f"| BatchStream, batch {BATCH_SIZE} | {speed['reader_rows_per_s']:,.0f} rows/s | |")
    print(f"| reader / pyarrow | {ratio:.2f} | >= 0.5 {'ok' if ratio >= 0.5 else 'MISSED'} |")
    if results:
        peak = "hwm_mib" if results["small"]["hwm_mib"] is not None else "ru_maxrss_mib"
        growth = results["large"][peak] / results["small"][peak] - 1
        for label in ("small", "large"):
            r = results[label]
            print(
                f"| peak RSS streaming {r['rows']:,} rows (prepare {r['prepare_s']:.0f} s) | {r[peak]:,.0f} MiB "
                f"(before streaming {r['hwm_before_mib'] or 0:,.0f}; ru_maxrss {r['ru_maxrss_mib']:,.0f}) | |"
            )
        print(
            f"| peak RSS growth, large vs small | {growth:+.1%} | < 10% {'ok' if growth < 0.1 else 'MISSED'} |"
        )
    print_parts(parts, speed["arrow_rows_per_s"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
