"""Sequence models: quality on MovieLens 100K u1 and training cost against history length.

    python -m benchmarks.sequence --cost                    # samples/s and peak RSS, L = 16, 64, 256 (~10 min)
    python -m benchmarks.sequence --quality --seeds 0 1 2   # ML-100K u1: graph vs DIN vs transformers (~1 h)
    python -m benchmarks.sequence --cost --lengths 16 64 --steps 60

Cost: one click log (``towerrec.data.samples.session_clicks``, 300 steps per user) prepared once with
histories of up to 256 events; every variant trains ``--steps`` steps of ``configs/sessions_sequence.yaml``
at batch 256 in a fresh process (its peak RSS is its own), the same run, one after the other:
a bag of the history (mean-pooled, the same table) and each sequence encoder at each length L (the
feature's ``max_length``: the reader keeps the last L). Samples/s are the steady training loop
(step start to step start after the first epoch's warm-up steps), so data, forward, backward and
optimizers count. Quality: ``towerrec fit`` of each config on u1 for each seed; test rating RMSE
and like AUC, mean ± sample standard deviation. Results: ``benchmarks/results/SEQUENCE.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.common import machine_info
from benchmarks.scale import peak_rss_mib

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "runs" / "bench" / "sequence"
RESULTS = ROOT / "benchmarks" / "results" / "SEQUENCE.md"
SESSIONS = "configs/sessions_sequence.yaml"
ENCODERS = {
    "DIN": ["model.sequence.encoder=din"],
    "transformer (softmax, 2 layers)": ["model.sequence.encoder=transformer", "model.sequence.num_layers=2"],
    "HSTU-style (pointwise, 2 layers)": [
        "model.sequence.encoder=transformer", "model.sequence.attention=pointwise", "model.sequence.num_layers=2",
    ],
}  # fmt: skip
QUALITY = {
    "graph (today's best, bags only)": ("configs/movielens100k_graph.yaml", []),
    "graph + history, DIN": ("configs/movielens100k_sequence.yaml", []),
    "graph + history, transformer": ("configs/movielens100k_sequence.yaml", ["--model.sequence.encoder", "transformer"]),
    "graph + history, HSTU-style": (
        "configs/movielens100k_sequence.yaml",
        ["--model.sequence.encoder", "transformer", "--model.sequence.attention", "pointwise"],
    ),
}  # fmt: skip


def sparse_features(length: int, bag: bool) -> str:
    """``data.sparse`` of the sessions config with histories of ``length``: as a sequence (with
    ages) or as a mean-pooled bag on the same table."""
    history = (
        "{name: hist_items, side: user, embedding_dim: 16, multi_hot: true, pooling: mean, table: t_item}"
        if bag
        else f"{{name: hist_items, side: user, embedding_dim: 16, sequence: true, table: t_item, candidate: item,"
        f" max_length: {length}}}, {{name: hist_age, side: user, embedding_dim: 16, sequence: true,"
        f" align_with: hist_items, max_length: {length}}}"
    )
    return (
        "[{name: user, side: user, embedding_dim: 16}, {name: item, side: item, embedding_dim: 16, table: t_item}, "
        + history
        + "]"
    )


def measure(overrides: list[str], steps: int) -> dict:
    """One variant in this process: steady training samples/s and peak RSS."""
    from benchmarks.common import steady_samples_per_s
    from benchmarks.ours import step_timer
    from towerrec.trainer.build import build
    from towerrec.trainer.config import load_config
    from towerrec.trainer.run import finish

    cfg = load_config(SESSIONS, [*overrides, f"trainer.max_steps={steps}", "trainer.progress_bar=off",
                                 "checkpoint.every_n_steps=0", "checkpoint.resume=never",
                                 "data.val_split=null", "data.test_split=null"])  # fmt: skip
    timer = step_timer()
    trainer, module, datamodule, checkpointing = build(cfg, extra_callbacks=[timer])
    trainer.callbacks.remove(checkpointing)
    trainer.fit(module, datamodule=datamodule)
    finish()
    starts = [s for epoch in timer.starts for s in epoch]
    rows = [r for epoch in timer.rows for r in epoch]
    warm = 10
    return {
        "samples_per_s": steady_samples_per_s([starts[warm:]], [rows[warm:]], skip_epochs=0),
        "peak_rss_mib": peak_rss_mib(),  # VmHWM: ru_maxrss would carry the parent's peak across exec
        "steps": len(starts),
    }


def prepare_once(overrides: list[str]) -> None:
    from towerrec.data.dataset import is_complete
    from towerrec.data.prepare import prepare
    from towerrec.trainer.config import load_config
    from towerrec.trainer.dataset_setup import input_schema

    cfg = load_config(SESSIONS, overrides)
    if not is_complete(cfg.data.path):
        prepare(cfg.data.prepare, cfg.data.path, input_schema(cfg))


def cost(args) -> str:
    from towerrec.data.samples import session_clicks, write_csv

    BENCH.mkdir(parents=True, exist_ok=True)
    source = BENCH / "sessions-300.csv"
    if not source.exists():
        write_csv(session_clicks(num_users=400, steps=300, num_items=2000, seed=0), source)
    results = []
    for length in args.lengths:
        common = [
            f"data.prepare.source={source}", f"data.path={BENCH / f'data-sessions-L{length}'}",
            f"run_dir={BENCH / 'cost-run'}", "trainer.max_epochs=50", f"trainer.num_threads={args.threads}",
            "data.prepare.histories=[{name: hist_items, column: item, where: click, age: hist_age, events: all,"
            f" max_length: {length}}}]",
        ]  # fmt: skip
        prepare_once([*common, f"data.sparse={sparse_features(length, bag=False)}"])  # not in a variant's RSS
        variants = [("bag of the history (mean)", [f"data.sparse={sparse_features(length, bag=True)}"])]
        variants += [
            (name, [*settings, f"data.sparse={sparse_features(length, bag=False)}"])
            for name, settings in ENCODERS.items()
        ]
        for name, overrides in variants:
            command = [sys.executable, "-m", "benchmarks.sequence", "--measure", json.dumps([*common, *overrides]),
                       "--steps", str(args.steps), "--threads", str(args.threads)]  # fmt: skip
            out = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=3600)
            line = [text for text in out.stdout.splitlines() if text.startswith("{")]
            if out.returncode != 0 or not line:
                raise SystemExit(f"{name} L={length} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
            result = json.loads(line[-1])
            results.append((name, length, result))
            print(f"{name:<36} L={length:<4} {result['samples_per_s']:>10,.0f} samples/s  "
                  f"peak RSS {result['peak_rss_mib']:,.0f} MiB", flush=True)  # fmt: skip
    bags = {length: r["samples_per_s"] for name, length, r in results if "bag" in name}
    lines = [
        "| model | history length L | samples/s | vs bag at L | peak RSS (MiB) |",
        "|---|---|---|---|---|",
    ]
    for name, length, r in results:
        lines.append(
            f"| {name} | {length} | {r['samples_per_s']:,.0f} | {r['samples_per_s'] / bags[length]:.2f}x | {r['peak_rss_mib']:,.0f} |"
        )
    return "\n".join(lines)


def quality(args) -> str:
    runs = BENCH / "quality"
    found: dict[str, list[tuple[float, float]]] = {}
    for name, (config, extra) in QUALITY.items():
        for seed in args.seeds:
            slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
            run_dir = runs / f"{slug}-seed{seed}"
            metrics = run_dir / "metrics.json"
            if not metrics.exists():
                command = [sys.executable, "-m", "towerrec.trainer.cli", "fit", "--config", config, "--seed", str(seed),
                           "--run_dir", str(run_dir), "--trainer.progress_bar", "false", *extra]  # fmt: skip
                started = time.perf_counter()
                subprocess.run(command, cwd=ROOT, check=True, capture_output=True, text=True)
                print(f"{name} seed {seed}: {time.perf_counter() - started:.0f} s", flush=True)
            test = json.loads(metrics.read_text())["metrics"]["test"]
            found.setdefault(name, []).append((test["rating"]["rmse"], test["click"]["auc"]))
    lines = ["| config | rating RMSE | like AUC |", "|---|---|---|"]
    for name, values in found.items():
        rmse, auc = zip(*values)
        spread = lambda v: statistics.stdev(v) if len(v) > 1 else 0.0  # noqa: E731
        lines.append(
            f"| {name} | {statistics.mean(rmse):.4f} ± {spread(rmse):.4f} | {statistics.mean(auc):.4f} ± {spread(auc):.4f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cost", action="store_true")
    parser.add_argument("--quality", action="store_true")
    parser.add_argument("--lengths", type=int, nargs="+", default=[16, 64, 256])
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--measure", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.measure:
        print(json.dumps(measure(json.loads(args.measure), args.steps)))
        return 0
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    info = machine_info()
    header = (
        f"commit {commit.stdout.strip()} · {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} · "
        f"{info['cpus']} CPUs ({info['cpu_model']}) · load average at start {os.getloadavg()[0]:.1f}"
    )
    store = BENCH / "sections.json"  # each part keeps the other's last figures
    sections = json.loads(store.read_text()) if store.exists() else {}
    if args.quality:
        sections["quality"] = (
            f"## MovieLens 100K u1: quality, seeds {' '.join(map(str, args.seeds))}\n\n"
            f"`python -m benchmarks.sequence --quality` · {header}\n\n{quality(args)}\n"
        )
    if args.cost:
        sections["cost"] = (
            f"## Training cost against history length\n\n`python -m benchmarks.sequence --cost --steps "
            f"{args.steps}` · {header}\n\n{cost(args)}\n"
        )
    BENCH.mkdir(parents=True, exist_ok=True)
    store.write_text(json.dumps(sections))
    parts = ("quality", "next_item", "cost")  # next_item: written by hand from `recommend --evaluate`
    text = "# Sequence models\n\n" + "\n".join(sections[k] for k in parts if k in sections)
    RESULTS.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
