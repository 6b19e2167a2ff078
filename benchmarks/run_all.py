"""All benchmarks in one command; writes benchmarks/results/RESULTS.md (+ PNG plots).

    python -m benchmarks.run_all            # full run (~40 min on 2 cores)
    python -m benchmarks.run_all --quick    # smoke-sized run (~5 min)
    make bench ARGS=--quick

Sections: 1. speed and quality vs torch-rechub and DeepCTR-Torch (installed into their own
virtualenvs under benchmarks/.peers/ on first use), step breakdown and machine ceilings;
2. Lightning overhead vs a bare TorchRec loop; 3. scale sweep on synthetic data (batch size,
table size, 1 vs 2 processes, a table set over one rank's memory budget); 4. data reader.
Every measurement runs in a fresh child process, systems alternate within each repetition, and
tables show the median of the repetitions. Absolute figures depend on what else the machine runs:
compare within a run (ratios), not across runs.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import (
    NUM_THREADS,
    PEERS_DIR,
    ROOT,
    export_arrays,
    machine_info,
    prepare_ml100k,
    run_json,
)

RESULTS = Path(__file__).resolve().parent / "results"
PEERS = {
    "torch-rechub": ("rechub", "torch-rechub==0.9.0", "rechub_driver.py"),
    "DeepCTR-Torch": ("deepctr", "deepctr-torch==0.3.0 requests", "deepctr_driver.py"),
}
# Multiply-adds of every Linear for the benchmark task (input 6 x 16 = 96), x2 for FLOPs, x3 for fwd+bwd.
DENSE_FLOPS_PER_SAMPLE = {
    "mmoe": 3 * 2 * (4 * 96 * 64 + 2 * 96 * 4 + 2 * (64 * 32 + 32)),
    "shared_bottom": 3 * 2 * (96 * 128 + 128 * 64 + 2 * (64 * 32 + 32)),
}
TOWER_NAMES = {"mmoe": "MMoE", "shared_bottom": "Shared-Bottom"}


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", flush=True)


def load_average() -> str:
    try:
        return " / ".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        return "?"


# ------------------------------------------------------------------------------------------ peers
def install_peer(name: str) -> str | None:
    """Creates benchmarks/.peers/<venv> with torch==2.13.0 and the peer; returns an error or None."""
    venv, packages, _ = PEERS[name]
    path = PEERS_DIR / venv
    stamp = path / ".installed"
    if stamp.exists():
        return None
    log(f"installing {name} into {path} (first use)")
    try:
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(path)], check=True, capture_output=True)
        pip = [str(path / "bin" / "python"), "-m", "pip", "install", "-q"]
        subprocess.run([*pip, "torch==2.13.0"], check=True, capture_output=True, text=True, timeout=1800)
        subprocess.run([*pip, *packages.split()], check=True, capture_output=True, text=True, timeout=1800)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as err:
        detail = getattr(err, "stderr", "") or ""
        return f"pip install failed: {detail.strip().splitlines()[-1] if detail.strip() else err}"
    stamp.write_text("ok\n")
    return None


def run_peer(name: str, npz: Path, tower: str, batch_size: int, epochs: int, threads: int) -> dict:
    venv, _, driver = PEERS[name]
    with tempfile.TemporaryDirectory() as out:
        command = [
            str(PEERS_DIR / venv / "bin" / "python"),
            str(Path(__file__).parent / "peers" / driver),
            str(npz),
            tower,
            str(batch_size),
            str(epochs),
            out,
        ]
        env = {
            "PYTHONPATH": str(Path(__file__).parent / "peers"),
            "OMP_NUM_THREADS": str(threads),
            "BENCH_THREADS": str(threads),
        }
        return run_json(command, timeout=1200, env=env)


# our runs: system name → (trainer.precision, trainer.compile). "towerrec" is the default config
# (precision auto: bf16 from 5e7 dense multiply-adds a step on native-bf16 hardware, which is batch
# 4096 here, fp32 at 256; see trainer.precision); bf16-mixed autocasts the dense part (tables and
# optimizer state stay fp32); compile = torch.compile of the dense part (fused element-wise ops).
OURS = {
    "towerrec": ("auto", False),
    "towerrec fp32": ("32-true", False),
    "towerrec bf16+compile": ("bf16-mixed", True),
}


def ours_command(data: Path, tower: str, batch_size: int, *options: str) -> list[str]:
    """The command line of one ``benchmarks.ours`` child (training, ``--profile`` or ``--prototypes``)."""
    return [
        sys.executable,
        "-m",
        "benchmarks.ours",
        "--data",
        str(data),
        "--tower",
        tower,
        "--batch-size",
        str(batch_size),
        *options,
    ]


def run_ours(
    data: Path,
    tower: str,
    batch_size: int,
    epochs: int,
    threads: int,
    precision: str = "32-true",
    compile_dense: bool = False,
) -> dict:
    command = ours_command(
        data,
        tower,
        batch_size,
        "--epochs",
        str(epochs),
        "--threads",
        str(threads),
        "--precision",
        precision,
        *(["--compile"] if compile_dense else []),
    )
    return run_json(command, timeout=1200, env={"OMP_NUM_THREADS": str(threads)})


def median(runs: list[dict], key: str) -> float:
    values = [r[key] for r in runs if key in r]
    return statistics.median(values) if values else float("nan")


def speed_vs_peers(
    data: Path, npz: Path, plan: list[tuple[str, int, int, int, int]], peer_errors: dict
) -> list[dict]:
    """plan: (tower, batch size, repetitions, threads, epochs). Systems alternate within a repetition."""
    rows = []
    for tower, batch_size, reps, threads, run_epochs in plan:
        runs: dict[str, list[dict]] = {**{o: [] for o in OURS}, **{p: [] for p in PEERS}}
        for rep in range(reps):
            log(f"peers: {tower} batch {batch_size} threads {threads} rep {rep + 1}/{reps}")
            for system, (precision, compile_dense) in OURS.items():
                runs[system].append(
                    run_ours(data, tower, batch_size, run_epochs, threads, precision, compile_dense)
                )
            for peer in PEERS:
                if peer not in peer_errors:
                    runs[peer].append(run_peer(peer, npz, tower, batch_size, run_epochs, threads))
        row = {
            "tower": tower,
            "batch_size": batch_size,
            "reps": reps,
            "threads": threads,
            "epochs": run_epochs,
        }
        for system, system_runs in runs.items():
            errors = [r["error"] for r in system_runs if "error" in r]
            row[system] = {
                "samples_per_s": median(system_runs, "samples_per_s"),
                "all_samples_per_s": [r.get("samples_per_s") for r in system_runs],
                "rmse": median(system_runs, "rmse"),
                "auc": median(system_runs, "auc"),
                "wall_s": median(system_runs, "wall_s"),
                "error": errors[0] if errors else peer_errors.get(system),
            }
        rows.append(row)
    return rows


# ------------------------------------------------------------------------------------------ ceilings
CEILINGS_CODE = r"""
import json, time, torch
out = {}
def gemm_gflops(a, b):
    for _ in range(3): a @ b
    best = 0.0
    for _ in range(3):
        start = time.perf_counter()
        for _ in range(20): a @ b
        best = max(best, 2 * 1024**3 * 20 / (time.perf_counter() - start) / 1e9)
    return best
for threads in (1, 2):
    torch.set_num_threads(threads)
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    out[f"sgemm_gflops_{threads}t"] = gemm_gflops(a, b)
    out[f"bf16_gemm_gflops_{threads}t"] = gemm_gflops(a.bfloat16(), b.bfloat16())
    table = torch.randn(1_000_000, 64)
    index = torch.randint(0, 1_000_000, (1 << 18,))
    table.index_select(0, index)
    best = 0.0
    for _ in range(3):
        start = time.perf_counter()
        for _ in range(5): table.index_select(0, index)
        best = max(best, 5 * index.numel() / (time.perf_counter() - start))
    out[f"gather_rows_per_s_{threads}t"] = best
print(json.dumps(out))
"""


def ceilings() -> dict:
    return run_json([sys.executable, "-c", CEILINGS_CODE], timeout=300)


# ------------------------------------------------------------------------------------------ loop
def lightning_overhead(data: Path, batch_sizes: list[int], epochs: int, steps: int) -> list[dict]:
    """Per batch size, one process alternating Lightning epochs and bare-loop epochs on the same
    batches (``benchmarks.loop --mode interleaved``); judged on the median step times."""
    rows = []
    for batch_size in batch_sizes:
        log(f"loop: batch {batch_size}, {epochs} interleaved epochs of {steps} steps")
        result = run_json(
            [
                sys.executable,
                "-m",
                "benchmarks.loop",
                "--data",
                str(data),
                "--batch-size",
                str(batch_size),
                "--steps",
                str(steps),
                "--mode",
                "interleaved",
                "--epochs",
                str(epochs),
                "--threads",
                "1",
            ],
            timeout=1800,
            env={"OMP_NUM_THREADS": "1"},
        )
        if "error" in result:
            rows.append({"batch_size": batch_size, "method": "interleaved", "error": result["error"]})
            continue
        lightning, bare = result["lightning_step_ms"], result["bare_step_ms"]
        rows.append(
            {
                "batch_size": batch_size,
                "method": "interleaved",
                "lightning_step_ms": lightning,
                "bare_step_ms": bare,
                "overhead": lightning["median"] / bare["median"] - 1,
                "epoch_overheads": [
                    e["bare"]["samples_per_s"] / e["lightning"]["samples_per_s"] - 1
                    for e in result["epochs"][result["warmup_epochs"] :]
                ],
            }
        )
    return rows


# ------------------------------------------------------------------------------------------ scale
def scale_point(
    data: Path,
    processes: int,
    batch_size: int,
    steps: int,
    rows: int | None = None,
    dim: int = 16,
    hbm_gb: float | None = None,
    threads: int | None = None,
) -> dict:
    """One ``benchmarks.scale`` run on ``processes`` ranks (``threads`` torch threads each; default:
    the CPUs shared out); ``ranks`` holds every rank's JSON line."""
    threads = threads or max(1, NUM_THREADS // processes)
    args = ["--data", str(data), "--batch-size", str(batch_size), "--steps", str(steps), "--dim", str(dim)]
    args += ["--threads", str(threads)]
    if rows:
        args += ["--rows", str(rows)]
    if hbm_gb:
        args += ["--hbm-gb", str(hbm_gb)]
    if processes == 1:
        command = [sys.executable, "-m", "benchmarks.scale", *args]
    else:
        command = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            str(processes),
            "--master_port",
            str(29600 + os.getpid() % 1000),
            "-m",
            "benchmarks.scale",
            *args,
        ]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(ROOT), "GLOO_SOCKET_IFNAME": "lo"}
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=900, cwd=ROOT, env=env)
    except subprocess.TimeoutExpired:
        return {"error": "timed out"}
    ranks = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    if not ranks:
        tail = done.stderr.strip().splitlines()[-2:]
        return {"error": f"exit {done.returncode}: {' | '.join(tail)}"}
    ranks.sort(key=lambda r: r["rank"])
    first = ranks[0]
    return {
        "processes": processes,
        "batch_size": batch_size,
        "rows": rows,
        "dim": dim,
        "hbm_gb": hbm_gb,
        "samples_per_s": first.get("samples_per_s"),
        "refused": first.get("refused"),
        "peak_rss_mib": [r["peak_rss_mib"] for r in ranks],
        "plan": first.get("plan"),
        "threads": threads,
        "ranks": ranks,
    }


def scale_sweep(synthetic: Path, quick: bool) -> dict:
    steps = 12 if quick else 25
    out: dict = {"batch": [], "tables": [], "processes": [], "budget": []}
    for batch_size in [1024, 4096] if quick else [256, 1024, 4096, 16384]:
        log(f"scale: batch {batch_size}")
        out["batch"].append(scale_point(synthetic, 1, batch_size, steps))
    for rows, dim in [(100_000, 64)] if quick else [(100_000, 16), (1_000_000, 64), (4_000_000, 64)]:
        log(f"scale: tables {rows} x {dim}")
        out["tables"].append(scale_point(synthetic, 1, 4096, steps, rows=rows, dim=dim))
    for processes in (1, 2):
        log(f"scale: {processes} processes")
        out["processes"].append(scale_point(synthetic, processes, 4096, steps))
    for processes in (1, 2):  # 2 tables of 2M x 64 fp32 (~0.5 GB each) against a 0.8 GB budget per rank
        log(f"scale: memory budget, {processes} processes")
        out["budget"].append(scale_point(synthetic, processes, 1024, 8, rows=2_000_000, dim=64, hbm_gb=0.8))
    return out


# ------------------------------------------------------------------------------------------ data
def data_reader(quick: bool, workdir: Path) -> str:
    small, large = ("100000", "300000") if quick else ("300000", "1000000")
    command = [
        sys.executable,
        "-m",
        "benchmarks.bench_data",
        "--rows-small",
        small,
        "--rows-large",
        large,
        "--workdir",
        str(workdir),
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(NUM_THREADS)}
    done = subprocess.run(command, capture_output=True, text=True, timeout=1800, cwd=ROOT, env=env)
    if done.returncode != 0:
        return f"bench_data failed: {done.stderr.strip().splitlines()[-1:]}"
    return "\n".join(line for line in done.stdout.splitlines() if line.startswith("|"))


# ------------------------------------------------------------------------------------------ report
def fmt(value, digits: int = 0) -> str:
    if value is None or (isinstance(value, float) and value != value):
        return "n/a"
    return f"{value:,.{digits}f}"


def plots(peers: list[dict], scale: dict) -> list[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    made = []
    rows = [r for r in peers if r["threads"] == NUM_THREADS]
    if rows:
        fig, ax = plt.subplots(figsize=(7, 3.5))
        systems = [*(o for o in OURS if o in rows[0]), *PEERS]
        width = 0.8 / len(systems)
        for i, system in enumerate(systems):
            ax.bar(
                [k + i * width for k in range(len(rows))],
                [r[system]["samples_per_s"] or 0 for r in rows],
                width,
                label=system,
            )
        ax.set_xticks([k + width for k in range(len(rows))])
        ax.set_xticklabels([f"{TOWER_NAMES[r['tower']]}\nbatch {r['batch_size']}" for r in rows], fontsize=8)
        ax.set_ylabel("training samples/s")
        ax.legend(fontsize=8)
        ax.set_title(f"ML-100K u1, {NUM_THREADS} threads, same machine, same run")
        fig.tight_layout()
        fig.savefig(RESULTS / "speed_vs_peers.png", dpi=80)
        made.append("speed_vs_peers.png")
    points = [p for p in scale["batch"] if p.get("samples_per_s")]
    if points:
        fig, ax = plt.subplots(figsize=(5, 3.2))
        ax.plot([p["batch_size"] for p in points], [p["samples_per_s"] for p in points], marker="o")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("batch size")
        ax.set_ylabel("samples/s (1 process)")
        ax.set_title("synthetic data, shared-bottom")
        fig.tight_layout()
        fig.savefig(RESULTS / "scale_batch.png", dpi=80)
        made.append("scale_batch.png")
    return made


def loop_lines(rows: list[dict]) -> list[str]:
    """Section 2: one process per batch size, Lightning and bare epochs alternating."""
    lines: list[str] = []
    if rows:
        lines += [
            "One process alternates a Lightning epoch and a bare-loop epoch over the same batches (the",
            "bare loop runs its own DMP, built the same way, from a callback after each Lightning epoch);",
            "the first pair is warm-up. Separate processes differ by +-15% on this machine even when",
            "it is idle (memory placement), which would hide a 5% difference. Other work on the machine",
            "only ever slows steps down, so the target is judged on the median step time of each loop.",
            "",
            "| batch | timed steps (each) | bare TorchRec loop: median step (p25-p75) | towerrec (Lightning): median "
            "step (p25-p75) | overhead (median steps) | per epoch pair: median (min to max) | target |",
            "|---|---|---|---|---|---|---|",
        ]
        for row in rows:
            if "error" in row:
                lines.append(f"| {row['batch_size']} | {row['error']} ||||||")
                continue
            bare, ours, pairs = row["bare_step_ms"], row["lightning_step_ms"], row["epoch_overheads"]
            lines.append(
                f"| {row['batch_size']} | {min(bare['steps'], ours['steps'])} | {bare['median']:.2f} ms "
                f"({bare['p25']:.2f}-{bare['p75']:.2f}) | {ours['median']:.2f} ms ({ours['p25']:.2f}-{ours['p75']:.2f}) | "
                f"{row['overhead']:+.1%} | {statistics.median(pairs):+.1%} ({min(pairs):+.1%} to {max(pairs):+.1%}) | "
                f"<= 5% {'met' if row['overhead'] <= 0.05 else 'MISSED'} |"
            )
    return lines


def write_report(info: dict, args, sections: dict, elapsed: float) -> Path:
    lines = [
        "# towerrec benchmarks",
        "",
        f"Command: `python -m benchmarks.run_all{' --quick' if sections.get('quick', args.quick) else ''}` — {elapsed / 60:.1f} min.",
        "",
        "| machine | value |",
        "|---|---|",
    ]
    for key in (
        "date",
        "cpus",
        "cpu_model",
        "git_commit",
        "python",
        "torch",
        "torchrec",
        "fbgemm_gpu",
        "lightning",
        "pyarrow",
    ):
        lines.append(f"| {key} | {info.get(key, '?')} |")
    lines.append(
        f"| load average at start / end (1, 5, 15 min) | {sections['load_start']} ; "
        f"{sections.get('load_end', '?')} |"
    )
    if sections.get("section_runs"):
        lines += [
            "",
            "Sections re-run on their own (`--sections`) keep the others' figures from earlier runs:",
            "",
            "| section | run at | git commit | load average at its start |",
            "|---|---|---|---|",
        ]
        for name, stamp in sections["section_runs"].items():
            lines.append(f"| {name} | {stamp['date']} | {stamp['git_commit']} | {stamp.get('load', '?')} |")
    lines += [
        "",
        "Every figure comes from a fresh child process; systems alternate within each repetition and the",
        "tables give medians. The machine is shared: the load average above shows how busy it was. With",
        "more runnable threads than cores, OpenMP regions with 2 threads stall whenever one thread is",
        "descheduled, so absolute samples/s swing by 10x between runs; compare within a table (ratios).",
        "",
        "## 1. Speed vs peers (same model, same data, same machine, same threads)",
        "",
        "Task: ML-100K u1 (71,994 train rows, 20,000 test rows); features user id, item id, gender, age,",
        "occupation (16-dim tables) and genres multi-hot (mean pooled); tasks rating (MSE) and like =",
        "rating >= 4 (BCE), weights 1:1, no dropout. MMoE: 4 experts [64], linear softmax gates, heads [32].",
        "Shared-Bottom: bottom [128, 64], heads [32]. Samples/s = training-step intervals (data + forward +",
        f"backward + optimizers + loop) in epochs 2..{sections['epochs']} (epoch 1 is warm-up; epoch ends,",
        "i.e. validation and checkpoints, are excluded for everyone). Quality: test RMSE (rating) and AUC",
        f"(like) after {sections['epochs']} epochs. towerrec: product trainer (Lightning + DMP, fused row-wise",
        "Adagrad on the tables, Adam dense, rating head bounded to [1, 5]). Peers: their own models and",
        "training loops (Adam on everything, dense embedding gradients).",
        "",
        "towerrec runs three ways: the default (`trainer.precision: auto`, which autocasts the dense part",
        "to bf16 from 5e7 dense multiply-adds a step on hardware with native bf16 matmuls: bf16 at batch",
        "4096 here, fp32 at 256), fp32 (`32-true`) and bf16 + compile (`bf16-mixed` with `trainer.compile:",
        "true`: torch.compile of the dense part, compiled in epoch 1, which the rate excludes for everyone;",
        "the wall column includes it). Tables and optimizer state stay fp32. Peers run fp32: neither offers",
        "mixed precision or compilation. The targets are judged on the default: >= 5x the faster peer at",
        "batch 4096, >= 2x at 256.",
        "",
        "| tower | batch | threads | reps | epochs | towerrec default samples/s | fp32 | bf16+compile | torch-rechub | DeepCTR-Torch | / faster peer: default, fp32, bf16+compile | target (default: >= 5x at 4096, >= 2x at 256) | wall s (all epochs): default / fp32 / bf16+compile / rechub / deepctr | RMSE default / fp32 / bf16+compile / rechub / deepctr | AUC (same order) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    missing = {"samples_per_s": float("nan"), "rmse": float("nan"), "auc": float("nan")}
    for row in sections["peers"]:
        ours_all = [row.get(name, missing) for name in OURS]
        peer_rates = [
            row[p]["samples_per_s"] for p in PEERS if row[p]["samples_per_s"] == row[p]["samples_per_s"]
        ]
        ratios = [
            system["samples_per_s"] / max(peer_rates) if peer_rates else float("nan") for system in ours_all
        ]
        goal = {4096: 5, 256: 2}.get(row["batch_size"])
        target = ""
        if goal and ratios[0] == ratios[0]:
            target = f"{goal}x {'met' if ratios[0] >= goal else 'MISSED'}"
        systems = (*ours_all, row["torch-rechub"], row["DeepCTR-Torch"])
        lines.append(
            f"| {TOWER_NAMES[row['tower']]} | {row['batch_size']} | {row['threads']} | {row['reps']} | {row.get('epochs', sections['epochs'])} | "
            f"{' | '.join(fmt(system['samples_per_s']) for system in systems)} | "
            f"{', '.join(fmt(ratio, 2) + 'x' if ratio == ratio else 'n/a' for ratio in ratios)} | {target} | "
            f"{' / '.join(fmt(system.get('wall_s'), 1) for system in systems)} | "
            f"{' / '.join(fmt(system['rmse'], 3) for system in systems)} | "
            f"{' / '.join(fmt(system['auc'], 3) for system in systems)} |"
        )
    errors = {
        (s, r["tower"], r["batch_size"]): r[s]["error"]
        for r in sections["peers"]
        for s in (*OURS, *PEERS)
        if s in r and r[s].get("error")
    }
    for (system, tower, batch), error in errors.items():
        lines.append(f"\n- {system} {tower} batch {batch}: **{error}**")
    lines += [
        "",
        "Where the default misses: at batch 256 the step is per-operation overhead (Lightning's loop,",
        "TorchRec's input/output distribution, eager dispatch of the small dense ops); SMALL_STEPS.md",
        "times it part by part against the peers' whole step. MMoE at 4096 reaches 5x only compiled",
        "(bf16+compile), whose compile time the default does not spend: about 4 s of compiling against",
        "4-8 ms saved a step pays back after roughly 500-1,000 steps, ten or more times this run's 54",
        "(the wall column includes it).",
    ]
    lines += ["", "Individual repetitions (samples/s):", ""]
    for row in sections["peers"]:
        shown = "; ".join(
            f"{s}: {', '.join(fmt(v) for v in row[s]['all_samples_per_s'])}"
            for s in (*OURS, *PEERS)
            if s in row
        )
        lines.append(
            f"- {TOWER_NAMES[row['tower']]} batch {row['batch_size']} threads {row['threads']}: {shown}"
        )
    if sections.get("plots"):
        lines += ["", *[f"![{p}]({p})" for p in sections["plots"] if p.startswith("speed")]]
    lines += [
        "",
        "### Where our step goes (batch 4096, pre-materialised batches, ms per step)",
        "",
        "| tower | threads | precision | data (reader → Batch) | embedding fwd | embedding fwd+bwd+fused update | dense fwd+bwd | dense Adam | bare step | Lightning step (from section 2 rate) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for entry in sections["breakdown"]:
        b = entry["result"]
        if "error" in b:
            lines.append(
                f"| {entry['tower']} | {entry['threads']} | {entry.get('precision', '')} | {b['error']} |||||||"
            )
            continue
        lightning_ms = entry.get("lightning_ms")
        lines.append(
            f"| {TOWER_NAMES[entry['tower']]} | {entry['threads']} | {entry.get('precision', '32-true')} | {fmt(b['data_ms'], 1)} | {fmt(b['embedding_fwd_ms'], 1)} | "
            f"{fmt(b['embedding_fwd_bwd_ms'], 1)} | {fmt(b['dense_fwd_bwd_ms'], 1)} | {fmt(b['dense_opt_ms'], 1)} | "
            f"{fmt(b['bare_step_ms'], 1)} | {fmt(lightning_ms, 1)} |"
        )
    c = sections["ceilings"]
    lines += [
        "",
        "Machine ceilings (same run): "
        f"fp32 sgemm 1024x1024: {fmt(c.get('sgemm_gflops_1t'), 1)} GFLOP/s (1 thread), "
        f"{fmt(c.get('sgemm_gflops_2t'), 1)} GFLOP/s (2 threads); bf16 GEMM 1024x1024: "
        f"{fmt(c.get('bf16_gemm_gflops_1t'), 1)} GFLOP/s (1 thread), {fmt(c.get('bf16_gemm_gflops_2t'), 1)} GFLOP/s (2 threads); random 64-float row gathers from a 1M x 64 table: "
        f"{fmt(c.get('gather_rows_per_s_1t') and c['gather_rows_per_s_1t'] / 1e6, 2)} M rows/s (1 thread), "
        f"{fmt(c.get('gather_rows_per_s_2t') and c['gather_rows_per_s_2t'] / 1e6, 2)} M rows/s (2 threads).",
        "",
        sections.get("ceiling_note", ""),
    ]
    lines += ["", "### Compute bound of the dense tower (why 5x the peers is or is not reachable here)", ""]
    lines += [
        "Dense FLOPs per sample (forward = 2 x multiply-adds of every Linear; forward + backward ~ 3x forward),",
        "and the samples/s that the measured 1024x1024 sgemm rate would allow if every GEMM of the step ran",
        "at that rate (the real GEMMs are (4096 x 96) @ (96 x 64): smaller, so slower). Everyone runs this math.",
        "",
        "| tower | MFLOP per 4096-batch step | bound at 1-thread sgemm | bound at 2-thread sgemm | bound at 2-thread bf16 GEMM | 5x faster peer (this run) | 5x faster peer (reference figures) |",
        "|---|---|---|---|---|---|---|",
    ]
    reference = {"mmoe": 73_000, "shared_bottom": 98_000}
    for tower, flops in DENSE_FLOPS_PER_SAMPLE.items():
        peer_rows = [
            r
            for r in sections["peers"]
            if r["tower"] == tower and r["batch_size"] == 4096 and r["threads"] == NUM_THREADS
        ]
        fastest = max(
            (
                r[p]["samples_per_s"]
                for r in peer_rows
                for p in PEERS
                if r[p]["samples_per_s"] == r[p]["samples_per_s"]
            ),
            default=float("nan"),
        )
        bounds = [
            c.get(key, float("nan")) * 1e9 / flops
            for key in ("sgemm_gflops_1t", "sgemm_gflops_2t", "bf16_gemm_gflops_2t")
        ]
        lines.append(
            f"| {TOWER_NAMES[tower]} | {flops * 4096 / 1e6:,.0f} | {fmt(bounds[0])} | {fmt(bounds[1])} | {fmt(bounds[2])} | "
            f"{fmt(5 * fastest)} | {fmt(5 * reference[tower])} |"
        )
    proto = sections.get("prototypes")
    if proto:
        lines += [
            "",
            "### Prototypes (monkeypatched in the benchmark process only; bare loop, MMoE, batch 4096, median of 3)",
            "",
        ]
        if "error" in proto:
            lines.append(f"error: {proto['error']}")
        else:
            lines += ["| variant | samples/s | vs as-is |", "|---|---|---|"]
            for name, value in proto.items():
                lines.append(f"| {name} | {fmt(value)} | {value / proto['as_is']:.2f}x |")
    lines += [
        "",
        "## 2. Lightning overhead (same DMP, same batches in memory, same optimizers; 1 thread, MMoE, fp32)",
        "",
    ]
    lines += loop_lines(sections["loop"])
    scale = sections["scale"]
    lines += [
        "",
        "## 3. Scale sweep (synthetic data, default.yaml model: shared-bottom, 7 tables, 2 dense)",
        "",
        f"Threads: {NUM_THREADS} per process with 1 process, 1 per process with 2 (torchrun, gloo).",
        "",
        "| sweep | processes | batch/rank | user/item table rows x dim | samples/s (all ranks) | peak RSS per rank (MiB) |",
        "|---|---|---|---|---|---|",
    ]
    for sweep in ("batch", "tables", "processes"):
        for p in scale[sweep]:
            if "error" in p:
                lines.append(f"| {sweep} | | | | {p['error']} | |")
                continue
            tables = f"{p['rows']:,} x {p['dim']}" if p["rows"] else f"vocabulary x {p['dim']}"
            lines.append(
                f"| {sweep} | {p['processes']} | {p['batch_size']} | {tables} | {fmt(p['samples_per_s'])} | "
                f"{', '.join(fmt(m) for m in p['peak_rss_mib'])} |"
            )
    lines += [
        "",
        "Tables larger than one rank's budget: user_id and item_id tables 2,000,000 x 64 fp32 (~0.5 GB",
        "each, ~1.0 GB in all) with `sharding.hbm_gb: 0.8` (the per-rank budget given to the planner on CPU):",
        "",
    ]
    for p in scale["budget"]:
        if "error" in p:
            lines.append(f"- {p.get('processes', '?')} process(es): error {p['error']}")
        elif p.get("refused"):
            lines.append(f"- {p['processes']} rank: **refused** — `{p['refused'].strip()}`")
        else:
            lines.append(
                f"- {p['processes']} ranks: **trained**, {fmt(p['samples_per_s'])} samples/s, peak RSS per rank "
                f"{', '.join(fmt(m) for m in p['peak_rss_mib'])} MiB. Plan:"
            )
            lines += ["", "```", p["plan"] or "", "```"]
    if sections.get("plots") and "scale_batch.png" in sections["plots"]:
        lines += ["", "![scale_batch.png](scale_batch.png)"]
    lines += ["", "## 4. Data reader (`benchmarks/bench_data.py`)", "", sections["data"], ""]
    if (RESULTS / "QUALITY_ML100K.md").exists():
        lines += [
            "## 5. Quality on MovieLens 100K",
            "",
            "See [QUALITY_ML100K.md](QUALITY_ML100K.md) (`python -m benchmarks.quality_ml100k`, or the",
            "`quality` section of this command; finished runs are reused).",
            "",
        ]
    if sections.get("notes"):
        lines += ["## Notes", "", *sections["notes"], ""]
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / "RESULTS.md"
    path.write_text("\n".join(lines) + "\n")
    return path


# ------------------------------------------------------------------------------------------ main
STANDALONE = {  # --sections names that run a benchmark writing its own file in benchmarks/results/
    "sequence": ["-m", "benchmarks.sequence", "--cost", "--quality"],  # SEQUENCE.md
    "big_tables": ["-m", "benchmarks.big_tables"],  # BIG_TABLES.md
    "scaling": ["-m", "benchmarks.scaling"],  # SCALING.md
    "small_steps": ["-m", "benchmarks.small_steps"],  # SMALL_STEPS.md
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Runs every benchmark and writes benchmarks/results/RESULTS.md."
    )
    parser.add_argument("--quick", action="store_true", help="smoke-sized run (~5 min)")
    parser.add_argument("--render", action="store_true", help="only rewrite RESULTS.md from results/raw.json")
    parser.add_argument(
        "--sections",
        default="peers,breakdown,loop,scale,data,quality",
        help="comma-separated subset to run (quality: MovieLens 100K, benchmarks/quality_ml100k.py; "
        "sequence, big_tables, scaling: their own results files, not in the default set)",
    )
    args = parser.parse_args(argv)
    started = time.perf_counter()
    if args.render:
        raw = json.loads((RESULTS / "raw.json").read_text())
        info = raw.pop("machine")
        raw["plots"] = plots(raw["peers"], raw["scale"])
        write_report(info, args, raw, raw.get("elapsed_s", 0.0))
        return 0
    wanted = set(args.sections.split(","))
    for name in sorted(wanted & STANDALONE.keys()):  # sections with their own results file
        log(f"{name}: python {' '.join(STANDALONE[name])}")
        subprocess.run([sys.executable, *STANDALONE[name]], cwd=ROOT, check=True)
    wanted -= STANDALONE.keys()
    if not wanted:
        return 0
    sections: dict = {
        "load_start": load_average(),
        "quick": args.quick,
        "peers": [],
        "breakdown": [],
        "loop": [],
        "ceilings": {},
        "scale": {"batch": [], "tables": [], "processes": [], "budget": []},
        "data": "(not run)",
    }
    info = machine_info()
    if (
        wanted != {"peers", "breakdown", "loop", "scale", "data", "quality"}
        and (RESULTS / "raw.json").exists()
    ):
        previous = json.loads((RESULTS / "raw.json").read_text())  # re-running some sections: keep the others
        previous.pop("machine", None)
        sections = {**previous, **{k: v for k, v in sections.items() if k in ("load_start", "quick")}}
        for name in wanted:
            sections[name] = {"scale": {"batch": [], "tables": [], "processes": [], "budget": []}}.get(
                name, []
            )
        sections["data"] = sections["data"] or "(not run)"
    RESULTS.mkdir(parents=True, exist_ok=True)

    def checkpoint_report() -> None:  # after every section, so an interrupted run still leaves a record
        sections["plots"] = plots(sections["peers"], sections["scale"])
        sections["elapsed_s"] = time.perf_counter() - started
        sections["load_end"] = load_average()
        (RESULTS / "raw.json").write_text(json.dumps({"machine": info, **sections}, indent=1, default=str))
        write_report(info, args, sections, time.perf_counter() - started)

    runs = sections.setdefault("section_runs", {})
    for name in ("peers", "breakdown", "loop", "scale", "data", "quality"):
        if name in wanted:
            runs[name] = {
                "date": info["date"],
                "git_commit": info["git_commit"],
                "load": sections["load_start"],
            }
    sections["section_runs"] = {name: runs[name] for name in sorted(runs)}
    with tempfile.TemporaryDirectory(prefix="towerrec-bench-") as tmp:
        work = Path(tmp)
        data = prepare_ml100k(work / "ml100k-u1")
        npz = export_arrays(data, work / "ml100k-u1.npz")
        sections["epochs"] = epochs = 2 if args.quick else 3
        log(f"ceilings (load {load_average()})")
        sections["ceilings"] = ceilings()
        if "peers" in wanted:
            peer_errors = {name: err for name in PEERS if (err := install_peer(name))}
            if args.quick:
                plan = [(t, 4096, 1, NUM_THREADS, epochs) for t in ("mmoe", "shared_bottom")]
            else:
                plan = [(t, 4096, 3, NUM_THREADS, epochs) for t in ("mmoe", "shared_bottom")]
                # batch 256 is ~16x more steps: 2 epochs (1 warm-up + 1 measured); 3 repetitions, as one
                # run swings by 1.5x on this shared machine
                plan += [(t, 256, 3, NUM_THREADS, 2) for t in ("mmoe", "shared_bottom")]
                plan += [(t, 4096, 1, 1, epochs) for t in ("mmoe", "shared_bottom")]
            sections["peers"] = speed_vs_peers(data, npz, plan, peer_errors)
            checkpoint_report()
        if "breakdown" in wanted:
            for tower in ("mmoe",) if args.quick else ("mmoe", "shared_bottom"):
                for threads, precision in [
                    (t, p) for t in (NUM_THREADS, 1) for p in ("32-true", "bf16-mixed")
                ]:
                    log(f"breakdown: {tower} threads {threads} {precision}")
                    result = run_json(
                        ours_command(
                            data,
                            tower,
                            4096,
                            "--threads",
                            str(threads),
                            "--precision",
                            precision,
                            "--profile",
                        ),
                        timeout=900,
                        env={"OMP_NUM_THREADS": str(threads)},
                    )
                    sections["breakdown"].append(
                        {"tower": tower, "threads": threads, "precision": precision, "result": result}
                    )
            if not args.quick:
                log("prototypes: mmoe 4096")
                sections["prototypes"] = run_json(
                    ours_command(data, "mmoe", 4096, "--prototypes"), timeout=900
                )
            checkpoint_report()
        if "loop" in wanted:
            sections["loop"] = lightning_overhead(
                data, [4096], 4 if args.quick else 21, 20 if args.quick else 40
            )
            for entry in sections["breakdown"]:
                if (
                    entry["tower"] == "mmoe"
                    and entry["threads"] == 1
                    and entry.get("precision", "32-true") == "32-true"
                    and "lightning_step_ms" in sections["loop"][0]
                ):
                    entry["lightning_ms"] = sections["loop"][0]["lightning_step_ms"]["median"]
            checkpoint_report()
        if "scale" in wanted:
            from towerrec.data.config import PrepareConfig
            from towerrec.data.synthetic import prepare_synthetic

            synthetic = work / "synthetic"
            prepare_synthetic(
                PrepareConfig(num_rows=200_000 if args.quick else 600_000, num_shards=4), str(synthetic)
            )
            sections["scale"] = scale_sweep(synthetic, args.quick)
            checkpoint_report()
        if "data" in wanted:
            log("data reader")
            sections["data"] = data_reader(args.quick, work)
            checkpoint_report()
        if "quality" in wanted:
            from benchmarks import quality_ml100k

            log("quality on MovieLens 100K (u1 and 5-fold, 3 seeds; quick: u1, 1 seed)")
            (RESULTS / "QUALITY_ML100K.md").write_text(quality_ml100k.run(args.quick))
    checkpoint_report()
    log(f"wrote {RESULTS / 'RESULTS.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
