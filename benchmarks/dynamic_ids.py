"""What dynamic ids cost: training samples/s and peak memory against the static-vocabulary path at
the same batch, and the id mapping's share of the training step.

    python -m benchmarks.dynamic_ids                        # ~5 min on 2 cores
    python -m benchmarks.dynamic_ids --users 2000000 --items 500000 --rows 4000000 --steps 200 --rounds 3 \\
        --output benchmarks/results/DYNAMIC_IDS_COST.md

One synthetic data set (``data.prepare.format: synthetic``, Zipf popularity; its user and item ids
are integers, which dynamic features read raw) is prepared once. Each variant trains ``--steps``
steps of ``configs/default.yaml`` at ``--batch-size`` in a fresh process (its peak RSS is its own),
the variants interleaved round by round (``--rounds``; medians reported, the load average beside):

- static vocabulary: user and item ids are vocabulary rows (tables of the vocabulary's size);
- dynamic, capacity = vocabulary: the same table sizes, ids mapped in the step (LRU), no eviction
  once every id has a row;
- dynamic, capacity = vocabulary / 4: LRU eviction in chunks (``dynamic.evict_chunk`` default), the
  rows given to new ids re-initialised every step.

Samples/s are the steady loop after ``--warmup`` steps (all rows over all the time from step start
to step start: data, the id mapping, forward, backward, optimizers); the median step is less
sensitive to a shared machine's other load. The mapping's share is the time spent mapping a batch
(``towerrec.trainer.dynamic_ids.DynamicIdMapping.on_train_batch_start``: counting the batch's ids,
the all-gather, the map update, row resets and the remap) over the step time, both medians.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.common import machine_info
from benchmarks.scale import peak_rss_mib

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "runs" / "bench" / "dynamic_ids"


def variants(users: int, items: int) -> dict[str, list[str]]:
    def dynamic(user_capacity: int, item_capacity: int) -> list[str]:
        return [
            "data.sparse.0.id_mapping=dynamic", f"data.sparse.0.dynamic={{capacity: {user_capacity}}}",
            "data.sparse.1.id_mapping=dynamic", f"data.sparse.1.dynamic={{capacity: {item_capacity}}}",
        ]  # fmt: skip

    return {
        "static vocabulary": [],
        "dynamic, capacity = vocabulary": dynamic(users, items),
        "dynamic, capacity = vocabulary / 4 (evicting)": dynamic(users // 4, items // 4),
    }


def measure(overrides: list[str], steps: int, warmup: int) -> dict:
    """One variant in this process: steady samples/s, peak RSS, median step and mapping times."""
    from benchmarks.common import steady_samples_per_s
    from benchmarks.ours import step_timer
    from towerrec.trainer.build import build
    from towerrec.trainer.config import load_config
    from towerrec.trainer.dynamic_ids import DynamicIdMapping
    from towerrec.trainer.run import finish

    mapping_seconds: list[float] = []
    original = DynamicIdMapping.on_train_batch_start

    def timed(self, trainer, pl_module, batch, batch_idx) -> None:
        start = time.perf_counter()
        original(self, trainer, pl_module, batch, batch_idx)
        mapping_seconds.append(time.perf_counter() - start)

    DynamicIdMapping.on_train_batch_start = timed
    cfg = load_config("configs/default.yaml", [*overrides, f"trainer.max_steps={steps}", "trainer.progress_bar=off",
                                               "checkpoint.every_n_steps=0", "checkpoint.resume=never",
                                               "data.val_split=null", "data.test_split=null"])  # fmt: skip
    timer = step_timer()
    trainer, module, datamodule, checkpointing = build(cfg, extra_callbacks=[timer])
    trainer.callbacks.remove(checkpointing)
    trainer.fit(module, datamodule=datamodule)
    finish()
    starts = [s for epoch in timer.starts for s in epoch]
    rows = [r for epoch in timer.rows for r in epoch]
    step_seconds = [b - a for a, b in zip(starts[warmup:], starts[warmup + 1 :])]
    result = {
        "samples_per_s": steady_samples_per_s([starts[warmup:]], [rows[warmup:]], skip_epochs=0),
        "peak_rss_mib": peak_rss_mib(),  # VmHWM: ru_maxrss would carry the parent's peak across exec
        "step_ms": 1e3 * statistics.median(step_seconds),
        "steps": len(starts),
    }
    if mapping_seconds:
        result["mapping_ms"] = 1e3 * statistics.median(mapping_seconds[warmup:])
        result["ids"] = module.dynamic_ids.totals()
    return result


def prepare_once(overrides: list[str]) -> None:
    from towerrec.data.dataset import is_complete
    from towerrec.data.prepare import prepare
    from towerrec.trainer.config import load_config

    cfg = load_config("configs/default.yaml", overrides)
    if not is_complete(cfg.data.path):
        prepare(cfg.data.prepare, cfg.data.path)


def run(args) -> str:
    common = [
        f"data.path={BENCH / f'synthetic-{args.rows}-{args.users}-{args.items}'}",
        f"data.prepare.num_rows={args.rows}", f"data.prepare.num_users={args.users}",
        f"data.prepare.num_items={args.items}", "data.prepare.row_group_size=65536",
        f"run_dir={BENCH / 'run'}", f"data.batch_size={args.batch_size}", "trainer.max_epochs=100",
        f"trainer.num_threads={args.threads}", "data.validate_on_start=false",
    ]  # fmt: skip
    prepare_once(common)  # not in a variant's RSS
    results: dict[str, list[dict]] = {}
    loads = []
    for round_index in range(args.rounds):
        loads.append(os.getloadavg()[0])
        for name, overrides in variants(args.users, args.items).items():
            command = [sys.executable, "-m", "benchmarks.dynamic_ids", "--measure", json.dumps([*common, *overrides]),
                       "--steps", str(args.steps), "--warmup", str(args.warmup)]  # fmt: skip
            env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
            out = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=3600, env=env)
            line = [text for text in out.stdout.splitlines() if text.startswith("{")]
            if out.returncode != 0 or not line:
                raise SystemExit(f"{name} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
            result = json.loads(line[-1])
            results.setdefault(name, []).append(result)
            mapping = f", mapping {result['mapping_ms']:.2f} ms" if "mapping_ms" in result else ""
            print(f"round {round_index + 1} {name:<46} {result['samples_per_s']:>10,.0f} samples/s  "
                  f"step {result['step_ms']:.1f} ms{mapping}  peak RSS {result['peak_rss_mib']:,.0f} MiB",
                  flush=True)  # fmt: skip
    static = statistics.median(r["samples_per_s"] for r in results["static vocabulary"])
    info = machine_info()
    lines = [
        f"{info['date']}, commit {info['git_commit']}, {info['cpus']} cpus ({info['cpu_model']}), "
        f"{args.threads} threads; load average at each round's start: {', '.join(f'{v:.1f}' for v in loads)}.",
        f"Synthetic data: {args.rows:,} rows, {args.users:,} users, {args.items:,} items; batch {args.batch_size}, "
        f"{args.steps} steps ({args.warmup} warm-up), medians of {args.rounds} interleaved rounds.",
        "",
        "| variant | samples/s | vs static | median step (ms) | id mapping (ms) | mapping share | peak RSS (MiB) | evicted (user, item) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, runs in results.items():
        rate = statistics.median(r["samples_per_s"] for r in runs)
        step = statistics.median(r["step_ms"] for r in runs)
        rss = statistics.median(r["peak_rss_mib"] for r in runs)
        if "mapping_ms" in runs[0]:
            mapping = statistics.median(r["mapping_ms"] for r in runs)
            ids = runs[-1]["ids"]
            shown = f"{mapping:.2f} | {mapping / step:.1%} | {rss:,.0f} | {ids['t_user_id']['evicted']:,}, {ids['t_item_id']['evicted']:,}"
        else:
            shown = f"- | - | {rss:,.0f} | -"
        lines.append(f"| {name} | {rate:,.0f} | {rate / static:.2f}x | {step:.1f} | {shown} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=400_000)
    parser.add_argument("--users", type=int, default=200_000)
    parser.add_argument("--items", type=int, default=50_000)
    parser.add_argument("--batch-size", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--output", help="also write the table to this Markdown file")
    parser.add_argument("--measure", help=argparse.SUPPRESS)  # one variant (JSON overrides), in this process
    args = parser.parse_args(argv)
    if args.measure:
        print(json.dumps(measure(json.loads(args.measure), args.steps, args.warmup)), flush=True)
        return 0
    table = run(args)
    print(table, flush=True)
    if args.output:
        Path(args.output).write_text(
            "# Dynamic ids: cost against the static vocabulary\n\n"
            "`python -m benchmarks.dynamic_ids` (see its docstring for what is measured).\n\n" + table + "\n"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
