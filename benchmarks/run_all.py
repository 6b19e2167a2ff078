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
from benchmarks.report import OURS, PEERS, RESULTS, plots, write_report
from towerrec.trainer.precision import native_bf16

NOT_NATIVE_BF16 = (
    "not run: this CPU has no native bf16 (AVX512-BF16 or AMX); emulated bf16 is far slower than fp32"
)


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
                if precision == "bf16-mixed" and not native_bf16("cpu"):
                    runs[system].append({"error": NOT_NATIVE_BF16})
                    continue
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
from towerrec.trainer.precision import native_bf16
out = {"bf16_native": native_bf16("cpu")}  # emulated bf16 GEMMs run ~70x slower: not timed
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
    if out["bf16_native"]:
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


# ------------------------------------------------------------------------------------------ main
STANDALONE = {  # --sections names that run a benchmark writing its own file in benchmarks/results/
    "sequence": ["-m", "benchmarks.sequence", "--cost", "--quality"],  # SEQUENCE.md
    "big_tables": ["-m", "benchmarks.big_tables"],  # BIG_TABLES.md
    "scaling": ["-m", "benchmarks.scaling"],  # SCALING.md
    "small_steps": ["-m", "benchmarks.small_steps"],  # SMALL_STEPS.md
    "retrieval": ["-m", "benchmarks.retrieval"],  # RETRIEVAL.md
    "dynamic_ids": ["-m", "benchmarks.rolling_days"],  # DYNAMIC_IDS.md
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
        "sequence, big_tables, scaling, small_steps, dynamic_ids: their own results files, not in the default set)",
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
                    if precision == "bf16-mixed" and not native_bf16("cpu"):
                        sections["breakdown"].append(
                            {"tower": tower, "threads": threads, "precision": precision,
                             "result": {"error": NOT_NATIVE_BF16}}
                        )  # fmt: skip
                        continue
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
