"""Scaling curve on this machine: 1 and 2 ranks at a fixed global batch and at a fixed per-rank
batch, per-rank memory, and a projection to N ranks from the measured per-rank compute and the
all-to-all bytes per step.

    python -m benchmarks.scaling                 # default.yaml model, batch 4096 (~5 min)
    python -m benchmarks.scaling --batch-size 1024 --steps 30

Points (each in fresh processes, one after the other, the same data): 1 rank × B with 2 threads (the
machine), 1 rank × B with 1 thread (what one rank computes on one core: the per-rank compute of
the projection), 2 ranks × B/2 (fixed global batch) and 2 ranks × B (fixed per-rank batch), 1
thread each. Both ranks of a 2-rank run share this machine's 2 cores, so 2 ranks can at best match 1
rank with 2 threads: the gap is communication (gloo over loopback) plus the per-step work every
rank repeats (planning the input distribution, the optimizers, the loop). Bytes per step come from
the plan and the batch: ids to the tables' owners (8 B per id + 4 B per length), pooled embeddings
back and their gradients (4 B per float each way), the dense all-reduce (ring: 2 (N-1)/N × 4 B per
dense parameter). Projection: step(N) = per-rank compute + bytes per rank / link rate (an assumed
100 Gb/s = 12.5 GB/s link, no overlap); samples/s(N) = N × B / step(N).
Results: ``benchmarks/results/SCALING.md``.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.common import machine_info
from benchmarks.run_all import scale_point

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "runs" / "bench" / "scaling"
RESULTS = ROOT / "benchmarks" / "results" / "SCALING.md"
LINK_BYTES_PER_S = 12.5e9


def point(data: Path, processes: int, batch: int, threads: int, steps: int) -> dict:
    result = scale_point(data, processes, batch, steps, threads=threads)
    if "error" in result or len(result["ranks"]) != processes or result.get("refused"):
        raise SystemExit(f"{processes} x {batch} failed: {result.get('error') or result.get('refused')}")
    return {"processes": processes, "batch": batch, "threads": threads, "ranks": result["ranks"]}


def bytes_per_step(cfg, dense_parameters: int, batch_per_rank: int, world_size: int,
                   ids_per_row: dict[str, float]) -> float:  # fmt: skip
    """Bytes one rank sends per step (all-to-alls and the dense all-reduce), for ``world_size`` ranks
    with the tables placed table-wise (a table's rows live on one
    rank; at N ranks a rank's features go to other ranks' tables with probability (N - 1) / N)."""
    remote = (world_size - 1) / world_size
    ids = sum(ids_per_row[f.name] * 8 + 4 for f in cfg.data.sparse)
    pooled = sum(f.embedding_dim * 4 for f in cfg.data.sparse)
    all_to_all = batch_per_rank * remote * (ids + 2 * pooled)  # ids out, embeddings back, gradients out
    all_reduce = 2 * remote * 4 * dense_parameters
    return all_to_all + all_reduce


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=40)
    args = parser.parse_args(argv)
    from towerrec.data.dataset import DatasetMeta
    from towerrec.data.reader import BatchStream, read_spec
    from towerrec.trainer.config import load_config

    data = BENCH / "data"
    cfg = load_config("configs/default.yaml", [f"data.path={data}"])
    if not (data / "metadata.json").exists():
        from towerrec.data.prepare import prepare

        prepare(cfg.data.prepare, str(data))
    meta = DatasetMeta.load(data)
    stream = BatchStream(meta, "train", read_spec(cfg.data, cfg.tasks, meta.table_rows(cfg.data.sparse)),
                         batch_size=args.batch_size, rank=0, world_size=1, seed=0)  # fmt: skip
    batch = next(iter(stream))
    ids_per_row = {k: float(v.lengths().float().mean()) for k, v in batch.sparse.to_dict().items()}
    b = args.batch_size
    points = [
        point(data, 1, b, 2, args.steps),
        point(data, 1, b, 1, args.steps),
        point(data, 2, b // 2, 1, args.steps),
        point(data, 2, b, 1, args.steps),
    ]
    dense = points[0]["ranks"][0]["dense_parameters"]
    per_rank_compute = b / points[1]["ranks"][0]["samples_per_s"]  # seconds per step of one rank, one core
    lines = [
        "# Scaling: 1 and 2 ranks on this machine, and a projection to N ranks",
        "",
        f"`python -m benchmarks.scaling --batch-size {b} --steps {args.steps}` · commit "
        + subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip()
        + f" · {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} · {machine_info()['cpus']} CPUs "
        f"({machine_info()['cpu_model']}) · load average at start {os.getloadavg()[0]:.1f}",
        "",
        "default.yaml model (Shared-Bottom, 7 tables, rating + CTR), synthetic data; samples/s of the steady training loop, all ranks.",
        "",
        "| ranks × batch per rank | threads per rank | global batch | samples/s | vs 1 rank, 2 threads | peak RSS per rank (MiB) | bytes sent per rank per step |",
        "|---|---|---|---|---|---|---|",
    ]
    base = points[0]["ranks"][0]["samples_per_s"]
    for p in points:
        n = p["processes"]
        sent = bytes_per_step(cfg, dense, p["batch"], n, ids_per_row) if n > 1 else 0
        lines.append(
            f"| {n} × {p['batch']} | {p['threads']} | {n * p['batch']} | {p['ranks'][0]['samples_per_s']:,.0f} | "
            f"{p['ranks'][0]['samples_per_s'] / base:.2f} | "
            f"{', '.join(format(r['peak_rss_mib'], ',.0f') for r in p['ranks'])} | {sent / 1e6:.2f} MB |"
        )
    lines += [
        "",
        f"Per-rank compute (1 rank, 1 thread, batch {b}): {per_rank_compute * 1e3:.1f} ms per step. "
        f"Dense parameters: {dense:,}; ids per row: "
        + ", ".join(f"{k} {v:.2f}" for k, v in ids_per_row.items())
        + ".",
        "",
        f"Projection at a fixed per-rank batch of {b} (one core per rank as measured, a 12.5 GB/s link, no "
        "overlap of communication with compute):",
        "",
        "| ranks | bytes sent per rank per step | communication per step | projected samples/s | efficiency |",
        "|---|---|---|---|---|",
    ]
    for n in (2, 8, 16, 64, 256):
        sent = bytes_per_step(cfg, dense, b, n, ids_per_row)
        step = per_rank_compute + sent / LINK_BYTES_PER_S
        lines.append(
            f"| {n} | {sent / 1e6:.2f} MB | {sent / LINK_BYTES_PER_S * 1e3:.2f} ms | {n * b / step:,.0f} | "
            f"{per_rank_compute / step:.2f} |"
        )
    two = points[3]["ranks"][0]["samples_per_s"]
    overhead = 2 * b / two - per_rank_compute  # per step, beyond one core's compute, at 2 ranks here
    lines += [
        "",
        f"Measured here, 2 ranks × {b}: a step takes {2 * b / two * 1e3:.1f} ms against {per_rank_compute * 1e3:.1f} ms of "
        f"one rank's compute, so {overhead * 1e3:.1f} ms go to the collectives (gloo over loopback, both ranks on the "
        f"same 2 cores, {bytes_per_step(cfg, dense, b, 2, ids_per_row) / 1e6:.2f} MB sent per rank) and the "
        "work each rank repeats: far more than the bytes explain at link rate, so the 2-rank gap on this machine is "
        "latency and CPU sharing, not bandwidth. If that overhead stayed constant per step at every N (a "
        f"pessimistic bound: gloo-like collectives, no overlap), efficiency would be "
        f"{per_rank_compute / (per_rank_compute + overhead):.2f} at any N; the bytes per rank grow by at most "
        f"{bytes_per_step(cfg, dense, b, 256, ids_per_row) / bytes_per_step(cfg, dense, b, 2, ids_per_row):.1f}x "
        "from 2 to 256 ranks, so cost grows with the work, not faster.",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    RESULTS.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
