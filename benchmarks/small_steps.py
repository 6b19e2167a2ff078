"""Where a small training step goes, and why the default precision is what it is.

    python -m benchmarks.small_steps            # writes benchmarks/results/SMALL_STEPS.md (~15 min)

All on the benchmark task (``benchmarks.common``: ML-100K u1, 2 threads), in one process per
table so that the variants compared alternate on the same batches and the same model
(``benchmarks.breakdown.bare_step``: DMP forward, losses, backward with the fused table update,
dense optimizer step; median of 5 alternations):

1. precision by batch size: the bare step in fp32 and under bf16 autocast, both towers, batches
   256-4096, and what ``trainer.precision: auto`` chooses there (``trainer.precision``);
2. the changes to the small step: the dense optimizer's per-tensor loop vs its fused kernel, and
   mean-pooled tables (two fbgemm kernel groups per rank) vs sum tables divided in the model (one);
3. where a batch-256 step goes, part by part (``benchmarks.breakdown.profile``), and the Lightning
   step on the same batches (``benchmarks.loop`` interleaved), against the faster peer's whole step
   measured in the same run;
4. the host time the trainer adds to the bare step (``child_host``), per process CPU time, for this
   checkout and, with ``--compare-with FOLDER``, another one (e.g. the commit before a change)::

    python -m benchmarks.small_steps --host-only --compare-with /tmp/before --reps 3   # ~10 min

On a CPU without native bf16 (no AVX512-BF16/AMX) table 1's bf16 column is not timed.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import ROOT, export_arrays, machine_info, prepare_ml100k, python, run_json

RESULTS = ROOT / "benchmarks" / "results" / "SMALL_STEPS.md"
REPS = 5


def _alternate(variants: dict, batches: list, reps: int = REPS) -> dict[str, float]:
    """Median ms per bare step of each variant (name → (dmp, optimizer, autocast)), alternating."""
    import torch

    from benchmarks.breakdown import bare_step

    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(reps):
        for name, (dmp, optimizer, bf16) in variants.items():
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                for batch in batches[:3]:
                    bare_step(dmp, optimizer, batch)
                started = time.perf_counter()
                for batch in batches[3:]:
                    bare_step(dmp, optimizer, batch)
            times[name].append((time.perf_counter() - started) / (len(batches) - 3) * 1e3)
    return {name: statistics.median(values) for name, values in times.items()}


def _setup(data: str, tower: str, batch_size: int, run_dir: str, pooling: str = "mean"):
    from benchmarks.ours import config_tree, load
    from towerrec.data.dataset import DatasetMeta

    tree = config_tree(data, tower, batch_size, 1, run_dir)
    tree["data"]["sparse"][-1]["pooling"] = pooling
    cfg = load(tree)
    return cfg, DatasetMeta.load(cfg.data.path).table_rows(cfg.data.sparse)


def child_precision(data: str) -> dict:
    """Table 1, in one process: fp32 vs bf16 bare steps per (tower, batch)."""
    import torch

    from benchmarks.breakdown import build_dmp, materialize
    from towerrec.trainer.precision import dense_macs_per_sample, native_bf16, resolve_precision

    torch.set_num_threads(2)
    native = native_bf16("cpu")
    rows = []
    for tower in ("shared_bottom", "mmoe"):
        for batch_size in (256, 512, 1024, 2048, 4096):
            with tempfile.TemporaryDirectory() as run_dir:
                cfg, table_rows = _setup(data, tower, batch_size, run_dir)
                batches = materialize(cfg, table_rows, 3 + max(12, 40_000 // batch_size))
                module, dmp, optimizer = build_dmp(cfg, table_rows)
                variants = {"fp32": (dmp, optimizer, False)}
                if native:  # emulated bf16 is tens of times slower: not timed
                    variants["bf16"] = (dmp, optimizer, True)
                ms = {"bf16": None, **_alternate(variants, batches)}
                macs = dense_macs_per_sample(module.build_model())
                rows.append(
                    {"tower": tower, "batch_size": batch_size, **ms, "macs_per_step": macs * batch_size,
                     "auto": resolve_precision("auto", "cpu", batch_size, macs)[0]}
                )  # fmt: skip
    return {"rows": rows, "native_bf16": native}


def child_changes(data: str) -> dict:
    """Table 2, in one process per comparison: the fused dense optimizer and one kernel group."""
    import torch

    from benchmarks.breakdown import build_dmp, materialize

    torch.set_num_threads(2)
    out = {}
    for tower in ("shared_bottom", "mmoe"):
        with tempfile.TemporaryDirectory() as run_dir:
            cfg, table_rows = _setup(data, tower, 256, run_dir)
            batches = materialize(cfg, table_rows, 123)
            _, dmp, fused = build_dmp(cfg, table_rows)
            params = [p for group in fused.param_groups for p in group["params"]]
            loop = torch.optim.Adam(params, lr=fused.defaults["lr"], foreach=False)
            optimizers = _alternate({"per_tensor": (dmp, loop, False), "fused": (dmp, fused, False)}, batches)
            _, mean_dmp, mean_opt = _mean_table_model(cfg, table_rows)
            groups = _alternate(
                {"two_groups": (mean_dmp, mean_opt, False), "one_group": (dmp, fused, False)}, batches
            )
        out[tower] = {**optimizers, **groups}
    return out


def _mean_table_model(cfg, table_rows):
    """The trainer's DMP, but with the multi-hot feature's table mean-pooled by fbgemm (a second
    kernel group) instead of summed and divided in the model."""
    from torchrec.modules.embedding_configs import PoolingType

    import towerrec.models.builder as builder
    import towerrec.trainer.module as trainer_module
    from benchmarks.breakdown import build_dmp

    original = builder.embedding_tables

    def mean_tables(sparse, rows, precision="fp32"):
        tables = original(sparse, rows, precision)
        for table in tables:
            if any(f.name in table.feature_names and f.multi_hot and f.pooling == "mean" for f in sparse):
                table.pooling = PoolingType.MEAN
        return tables

    builder.embedding_tables = trainer_module.embedding_tables = mean_tables
    try:
        module, dmp, optimizer = build_dmp(cfg, table_rows)
    finally:
        builder.embedding_tables = trainer_module.embedding_tables = original
    dmp.module.mean_pooled = []  # fbgemm divides already
    return module, dmp, optimizer


def child_host(data: str) -> dict:
    """Table 4, in one process: per tower, Lightning epochs of the product's step alternating with
    epochs of the bare step (``benchmarks.breakdown.bare_step``) on the same in-memory batches, one
    thread; each step's wall and CPU time (this process) between consecutive step starts."""
    return {tower: _host_times(data, tower) for tower in ("shared_bottom", "mmoe")}


def _host_times(data: str, tower: str) -> dict[str, float]:
    import lightning as L
    import torch

    from benchmarks.breakdown import bare_step, build_dmp, materialize
    from benchmarks.loop import fit_on_batches
    from benchmarks.ours import config_tree, load
    from towerrec.data.dataset import DatasetMeta

    def now() -> tuple[float, float]:
        return time.perf_counter(), time.process_time()

    marks: dict[str, list[list[tuple[float, float]]]] = {"lightning": [], "bare": []}
    with tempfile.TemporaryDirectory() as run_dir:
        cfg = load(config_tree(data, tower, HOST_BATCH, HOST_EPOCHS, run_dir, threads=1))
        table_rows = DatasetMeta.load(cfg.data.path).table_rows(cfg.data.sparse)
        batches = materialize(cfg, table_rows, HOST_STEPS)

        class Interleave(L.Callback):
            bare_model = None

            def on_train_epoch_start(self, trainer, pl_module) -> None:
                marks["lightning"].append([])

            def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
                marks["lightning"][-1].append(now())

            def on_train_epoch_end(self, trainer, pl_module) -> None:
                if self.bare_model is None:  # built inside fit, where the process group exists
                    with torch.random.fork_rng():
                        torch.manual_seed(cfg.seed)
                        self.bare_model = build_dmp(cfg, table_rows)[1:]
                epoch = []
                for batch in batches:
                    epoch.append(now())
                    bare_step(*self.bare_model, batch)
                marks["bare"].append(epoch)

        fit_on_batches(cfg, batches, [Interleave()])
    out = {}
    for mode, epochs in marks.items():  # the first epoch of each is warm-up
        steps = [(b[0] - a[0], b[1] - a[1]) for epoch in epochs[1:] for a, b in zip(epoch, epoch[1:])]
        for i, kind in enumerate(("wall", "cpu")):
            values = [step[i] * 1e3 for step in steps]
            out[f"{mode}_{kind}_ms"] = statistics.median(values)
            out[f"{mode}_{kind}_mean_ms"] = statistics.fmean(values)
    return out


HOST_BATCH, HOST_STEPS, HOST_EPOCHS = 256, 200, 6


def host_overhead(data: Path, compare_with: str | None, reps: int, label: str = "other checkout") -> dict:
    """Table 4: ``child_host`` of this checkout, and with ``compare_with`` (a folder holding another
    checkout as ``towerrec``) of that one too, their processes alternating ``reps`` times."""
    import towerrec

    this = str(Path(towerrec.__file__).resolve().parent.parent)  # where this process found towerrec
    versions = {"this checkout": this, **({label: compare_with} if compare_with else {})}
    runs: dict[str, list[dict]] = {name: [] for name in versions}
    for _ in range(reps):
        for name, folder in versions.items():  # benchmarks/ is this checkout's in both (cwd)
            env = {"PYTHONPATH": f"{folder}{os.pathsep}{ROOT}", "OMP_NUM_THREADS": "1"}
            command = [python(), "-m", "benchmarks.small_steps", "--child", "host", str(data)]
            runs[name].append(run_json(command, timeout=1800, env=env))
    return {"reps": reps, "compare_with": compare_with, "runs": runs}


HOST_MARKERS = ("<!-- host time per step -->", "<!-- /host time per step -->")


def host_report(info: dict, host: dict, loads: tuple[str, str]) -> str:
    """Section 4 of SMALL_STEPS.md, between ``HOST_MARKERS`` (``--host-only`` rewrites just it)."""
    lines = [
        HOST_MARKERS[0],
        "## 4. Host time per step beyond the model's own step (batch 256, 1 thread)",
        "",
        f"`python -m benchmarks.small_steps --host-only"
        f"{' --compare-with ' + host['compare_with'] if host['compare_with'] else ''}"
        f" --reps {host['reps']}` · commit {info['git_commit']} · {info['date']} · {info['cpus']} CPUs "
        f"({info['cpu_model']}, native bf16: {info.get('native_bf16', '?')}) · load average {loads[0]} at start, "
        f"{loads[1]} at end",
        "",
        f"In one process per tower and code version, {HOST_EPOCHS} epochs of {HOST_STEPS} steps of the product's",
        "Lightning step alternate with epochs of the bare step (`benchmarks.breakdown.bare_step`: DMP forward,",
        "losses, backward with the fused table update, dense Adam) on the same in-memory batches; the first",
        "epoch of each is warm-up. CPU time is this process's (one thread: the work the step does, whatever",
        "else the machine runs); wall time also counts what the OS gave others. The difference of the",
        "medians is the host time the trainer adds per step: Lightning's loop, the global loss and its",
        "checks, the dense gradient path. Code versions alternate process by process; each figure is the",
        f"median over the {host['reps']} processes of each version's per-process median.",
        "",
        "| tower | code | Lightning step CPU ms | bare step CPU ms | added by the trainer, CPU ms | Lightning step wall ms | bare step wall ms |",
        "|---|---|---|---|---|---|---|",
    ]
    for tower in ("shared_bottom", "mmoe"):
        for version, runs in host["runs"].items():
            good = [run[tower] for run in runs if tower in run]
            if not good:
                errors = [run.get("error", "?") for run in runs]
                lines.append(f"| {tower} | {version} | {errors[0]} | | | | |")
                continue
            mid = {key: statistics.median(run[key] for run in good) for key in good[0]}
            added = statistics.median(run["lightning_cpu_ms"] - run["bare_cpu_ms"] for run in good)
            lines.append(
                f"| {tower} | {version} | {fmt(mid['lightning_cpu_ms'])} | {fmt(mid['bare_cpu_ms'])} | "
                f"{fmt(added)} | {fmt(mid['lightning_wall_ms'])} | {fmt(mid['bare_wall_ms'])} |"
            )
    lines.append(HOST_MARKERS[1])
    return "\n".join(lines) + "\n"


def write_host_section(section: str) -> None:
    """Replaces section 4 of SMALL_STEPS.md (or appends it), leaving the other sections as they are."""
    text = RESULTS.read_text() if RESULTS.exists() else ""
    start, end = text.find(HOST_MARKERS[0]), text.find(HOST_MARKERS[1])
    if start >= 0 and end > start:
        text = text[:start] + section + text[end + len(HOST_MARKERS[1]) + 1 :]
    else:
        text = text.rstrip("\n") + "\n\n" + section
    RESULTS.write_text(text)


def run_child(kind: str, data: Path) -> dict:
    return run_json([python(), "-m", "benchmarks.small_steps", "--child", kind, str(data)], timeout=1800)


def peer_step_ms(npz: Path, tower: str) -> dict:
    from benchmarks.run_all import PEERS, install_peer, run_peer

    out = {}
    for name in PEERS:
        error = install_peer(name)
        result = {"error": error} if error else run_peer(name, npz, tower, 256, 2, 2)
        out[name] = 256 / result["samples_per_s"] * 1e3 if "samples_per_s" in result else None
    return out


def step_parts(data: Path, tower: str) -> dict:
    from benchmarks.run_all import ours_command

    parts = run_json(ours_command(data, tower, 256, "--profile"), timeout=900)
    loop = run_json(
        [python(), "-m", "benchmarks.loop", "--data", str(data), "--tower", tower, "--batch-size", "256",
         "--steps", "200", "--mode", "interleaved", "--epochs", "5", "--threads", "2"],
        timeout=900,
    )  # fmt: skip
    return {"parts": parts, "loop": loop}


def fmt(value, digits: int = 2) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def report(info: dict, precision: dict, changes: dict, steps: dict, load: str) -> str:
    lines = [
        "# Small steps: where a batch-256 step goes, and the default precision",
        "",
        f'`python -m benchmarks.small_steps` (or `make bench ARGS="--sections small_steps"`) · commit '
        f"{info['git_commit']} · {info['date']} · {info['cpus']} CPUs ({info['cpu_model']}), 2 threads · "
        f"load average at start {load}",
        "",
        "Milliseconds per training step without Lightning (`benchmarks.breakdown.bare_step`: DMP forward,",
        "losses, backward with the fused table update, dense optimizer), on the same in-memory batches,",
        f"variants alternating in one process, median of {REPS}. The benchmark task of RESULTS.md.",
        "",
        "## 1. fp32 or bf16 autocast, by batch size",
        "",
        f"This CPU has native bf16 matmuls: {'yes' if precision.get('native_bf16') else 'no'}"
        + (
            "."
            if precision.get("native_bf16")
            else " (no AVX512-BF16 or AMX): bf16 is emulated and not timed."
        )
        + " `trainer.precision: auto` (the default) chooses bf16 from 5e7 dense multiply-adds a step"
        " on native-bf16 hardware only.",
        "",
        "| tower | batch | dense multiply-adds a step | fp32 ms | bf16 ms | bf16 / fp32 | auto chooses |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in precision.get("rows", []):
        lines.append(
            f"| {row['tower']} | {row['batch_size']} | {row['macs_per_step'] / 1e6:.0f}M | {fmt(row['fp32'])} | "
            f"{fmt(row['bf16'])} | {fmt(row['bf16'] and row['bf16'] / row['fp32'])} | {row['auto']} |"
        )
    lines += [
        "",
        "## 2. This release's changes to the small step (batch 256, fp32)",
        "",
        "| tower | dense Adam per-tensor loop | fused kernel | tables: mean-pooled (2 kernel groups) | all summed (1 group) |",
        "|---|---|---|---|---|",
    ]
    for tower, row in changes.items():
        if "error" in row:
            lines.append(f"| {tower} | {row['error']} | | | |")
            continue
        lines.append(
            f"| {tower} | {fmt(row['per_tensor'])} | {fmt(row['fused'])} | {fmt(row['two_groups'])} | {fmt(row['one_group'])} |"
        )
    lines += [
        "",
        "## 3. Where a batch-256 step goes (ms), against the faster peer's whole step",
        "",
        "| tower | data (reader → Batch) | embedding fwd+bwd+update | dense fwd+bwd | dense optimizer | bare step | Lightning step (median) | bare step (median, same run) | DeepCTR-Torch step | torch-rechub step | 2x the faster peer needs |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for tower, row in steps.items():
        parts, loop, peers = row["parts"], row["loop"], row["peers"]
        faster = min((v for v in peers.values() if v), default=None)
        lines.append(
            f"| {tower} | {fmt(parts.get('data_ms'))} | {fmt(parts.get('embedding_fwd_bwd_ms'))} | "
            f"{fmt(parts.get('dense_fwd_bwd_ms'))} | {fmt(parts.get('dense_opt_ms'))} | {fmt(parts.get('bare_step_ms'))} | "
            f"{fmt(loop.get('lightning_step_ms', {}).get('median'))} | {fmt(loop.get('bare_step_ms', {}).get('median'))} | "
            f"{fmt(peers.get('DeepCTR-Torch'))} | {fmt(peers.get('torch-rechub'))} | "
            f"{fmt(faster / 2 if faster else None)} |"
        )
    lines += ["", "## What bounds the batch-256 step", ""]
    for tower, row in steps.items():
        loop, peers = row["loop"], row["peers"]
        faster = min((v for v in peers.values() if v), default=None)
        lightning = loop.get("lightning_step_ms", {}).get("median")
        bare = loop.get("bare_step_ms", {}).get("median")
        if None in (faster, lightning, bare):
            continue
        data = row["parts"].get("data_ms") or 0.0
        lines.append(
            f"- {tower}: our whole step is {lightning + data:.2f} ms (Lightning step + reader), "
            f"{faster / (lightning + data):.2f}x the faster peer's {faster:.2f} ms; 2x needs {faster / 2:.2f} ms. "
            f"Lightning's loop adds {lightning - bare:.2f} ms to the bare step ({bare:.2f} ms), and the bare "
            f"step alone is {bare / (faster / 2):.2f}x the 2x budget."
        )
    lines += [
        "",
        "At batch 256 the step is per-operation overhead, not arithmetic: the dense part of Shared-Bottom",
        "is ~6M multiply-adds a step, well under half a millisecond of matmul forward and backward at",
        "this machine's sgemm rate, yet they take 1.3 ms: eager dispatch and autograd bookkeeping of a few",
        "dozen small operations. The tables' part is TorchRec's input and output distribution and",
        "fbgemm's Python wrapper around one kernel. What would move it: running",
        "the step as one compiled graph (the dense part compiles today, `trainer.compile`, but its compile",
        "time only pays back on long runs, and the fbgemm lookup stays eager), and a loop without",
        "Lightning's per-step hooks. The first two tables are what this release removed from the step:",
        "the per-tensor optimizer loop and the second kernel group.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    parser.add_argument("--host-only", action="store_true", help="run section 4 only and rewrite just it")
    parser.add_argument(
        "--compare-with",
        help="section 4: also time another checkout, found as FOLDER/towerrec, alternating with this one",
    )
    parser.add_argument("--compare-label", default="other checkout", help="section 4: its name in the table")
    parser.add_argument("--reps", type=int, default=3, help="section 4: processes per code version")
    args = parser.parse_args(argv)
    if args.child:
        kind, data = args.child
        children = {"precision": child_precision, "changes": child_changes, "host": child_host}
        print(json.dumps(children[kind](data)))
        return 0
    from benchmarks.run_all import load_average
    from towerrec.trainer.precision import native_bf16

    load = load_average()
    info = {**machine_info(), "native_bf16": "yes" if native_bf16("cpu") else "no"}
    with tempfile.TemporaryDirectory(prefix="towerrec-small-") as tmp:
        data = prepare_ml100k(Path(tmp) / "ml100k-u1")
        if args.host_only:
            host = host_overhead(data, args.compare_with, args.reps, args.compare_label)
            section = host_report(info, host, (load, load_average()))
            write_host_section(section)
            print(section)
            return 0
        npz = export_arrays(data, Path(tmp) / "ml100k-u1.npz")
        precision = run_child("precision", data)
        changes = run_child("changes", data)
        steps = {}
        for tower in ("shared_bottom", "mmoe"):
            steps[tower] = {**step_parts(data, tower), "peers": peer_step_ms(npz, tower)}
        host = host_overhead(data, args.compare_with, args.reps, args.compare_label)
    text = (
        report(info, precision, changes, steps, load) + "\n" + host_report(info, host, (load, load_average()))
    )
    RESULTS.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
