"""Tables at this machine's size: 2 ranks whose embedding tables (weights + optimizer state) fill
about half of the memory; training rate, peak RSS per rank, checkpoint save and load against the
disk's own write and read rates (measured in the same run with ``dd``), checkpoint size, and the
checkpoint resharded 2 → 1 on load.

    python -m benchmarks.big_tables                      # ~12 GiB of tables on 2 ranks
    python -m benchmarks.big_tables --gib 1 --steps 20 --output /tmp/big.md   # a quick check

Tables: ``user_id`` and ``item_id`` of the default config with ``--rows`` rows of dim 64 each
(rows from ``--gib``: weights 256 B + row-wise Adagrad state 4 B per row); the planner puts one on
each rank (table-wise). Ids come from the synthetic data set's vocabularies, so training touches a
small part of each table: the rate is that of this model, the memory and I/O that of the tables.
Save: the product's checkpoint (``trainer.save_checkpoint``: DCP, every rank writes its shards,
model + fused optimizer state + dense optimizer). Load: the same checkpoint into the running 2 ranks
(``load_weights``), then into one process (``towerrec.serving.export.load_unsharded_model``: DCP reshards the
two ranks' table shards into one unsharded model; weights only). Results:
``benchmarks/results/BIG_TABLES.md``.

Checksums: the save is timed without and with the checksums of every file (``checksums.json``,
``towerrec.trainer.distributed.checkpoint``), alternately ``--save-repeats`` times each (medians),
and the check a load makes first (the files against their checksums) is timed apart from the load:
on 2 ranks (each reads half the files) and in one process (all of them).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.scale import peak_rss_mib

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "runs" / "bench" / "big-tables"
RESULTS = ROOT / "benchmarks" / "results" / "BIG_TABLES.md"
DIM = 64
BYTES_PER_ROW = DIM * 4 + 4  # fp32 weights + row-wise Adagrad's one float


def overrides(rows: int, steps: int, threads: int) -> list[str]:
    sparse = (
        f"[{{name: user_id, side: user, embedding_dim: {DIM}, num_embeddings: {rows}}},"
        f" {{name: item_id, side: item, embedding_dim: {DIM}, num_embeddings: {rows}}},"
        " {name: gender, side: user, embedding_dim: 4}, {name: age_bucket, side: user, embedding_dim: 4},"
        " {name: region, side: user, embedding_dim: 8}, {name: category, side: item, embedding_dim: 8},"
        " {name: genres, side: item, embedding_dim: 8, multi_hot: true, pooling: mean}]"
    )
    return [
        f"data.path={BENCH / 'data'}", f"run_dir={BENCH / 'run'}", f"data.sparse={sparse}",
        "data.batch_size=4096", "data.val_split=null", "data.test_split=null", "data.validate_on_start=false",
        f"trainer.max_steps={steps}", "trainer.max_epochs=1", "trainer.progress_bar=off",
        f"trainer.num_threads={threads}", "checkpoint.every_n_steps=0", "checkpoint.resume=never",
        "checkpoint.keep_last=1",
    ]  # fmt: skip


def rank_job(args) -> int:
    """Every rank: train, save, load back; prints one JSON line."""
    import torch.distributed as dist

    from benchmarks.loop import rate
    from benchmarks.ours import step_timer
    from towerrec.trainer.build import build
    from towerrec.trainer.config import load_config
    from towerrec.trainer.distributed import checkpoint as ckpt
    from towerrec.trainer.run import finish

    cfg = load_config("configs/default.yaml", overrides(args.rows, args.steps, args.threads))
    timer = step_timer()
    started = time.perf_counter()
    trainer, module, datamodule, checkpointing = build(cfg, extra_callbacks=[timer])
    trainer.callbacks.remove(checkpointing)
    trainer.fit(module, datamodule=datamodule)
    result = {
        "rank": dist.get_rank(),
        "setup_and_fit_s": time.perf_counter() - started,
        "samples_per_s": rate(timer.starts[0], timer.rows[0]) * dist.get_world_size(),
        "peak_rss_after_fit_mib": peak_rss_mib(),
        "plan": trainer.strategy.plan_text,
    }
    target = BENCH / "run" / "checkpoints" / f"step-{trainer.global_step:08d}"
    saves: dict[bool, list[float]] = {False: [], True: []}
    for checksums in [False, True] * args.save_repeats:  # alternately; the last one is kept and loaded
        seconds, synced = timed_save(trainer, target, checksums)
        saves[checksums].append(seconds)
    result["save_s"] = statistics.median(saves[True])
    result["save_and_sync_s"] = synced
    result["save_without_checksums_s"] = statistics.median(saves[False])
    result["saves_s"] = {"without": saves[False], "with": saves[True]}
    result["peak_rss_after_save_mib"] = peak_rss_mib()
    dist.barrier()
    started = time.perf_counter()
    damage = ckpt.check_intact(target, trainer.strategy.process_group)  # each rank half of the files
    dist.barrier()
    result["check_s"] = time.perf_counter() - started
    assert damage is None, damage
    started = time.perf_counter()
    trainer.strategy.load_weights(target)  # the check above is remembered: this is the load alone
    dist.barrier()
    result["load_s"] = time.perf_counter() - started
    result["peak_rss_after_load_mib"] = peak_rss_mib()
    result["checkpoint"] = str(target)
    finish()
    # a file per rank: two ranks printing at once can interleave their lines
    (BENCH / f"rank-{result['rank']}.json").write_text(json.dumps(result))
    return 0


def timed_save(trainer, target: Path, checksums: bool) -> tuple[float, float]:
    """(seconds to save, seconds to save and sync) of the product's checkpoint of ``trainer``,
    with or without the checksums of its files (every rank takes part)."""
    import functools

    import torch.distributed as dist

    from towerrec.trainer.distributed import checkpoint as ckpt

    save = ckpt.save
    ckpt.save = functools.partial(save, checksums=checksums)  # what the strategy calls
    try:
        dist.barrier()
        started = time.perf_counter()
        trainer.save_checkpoint(str(target))
        dist.barrier()
        seconds = time.perf_counter() - started
        os.sync()  # what the page cache still holds reaches the disk
        dist.barrier()
        return seconds, time.perf_counter() - started
    finally:
        ckpt.save = save


def reshard_job(args) -> int:
    """One process, no process group: the 2-rank checkpoint into one unsharded model."""
    from towerrec.serving.export import load_unsharded_model
    from towerrec.trainer.config import load_config
    from towerrec.trainer.distributed import checkpoint as ckpt

    cfg = load_config("configs/default.yaml", overrides(args.rows, args.steps, args.threads))
    started = time.perf_counter()
    damage = ckpt.check_intact(Path(args.checkpoint))  # one process reads every file
    check_s = time.perf_counter() - started
    assert damage is None, damage
    started = time.perf_counter()
    model, path = load_unsharded_model(cfg, args.checkpoint)  # the check is remembered: the load alone
    seconds = time.perf_counter() - started
    rows = model.embeddings.embedding_bags["t_user_id"].weight.shape[0]
    print(json.dumps({"load_s": seconds, "check_s": check_s, "peak_rss_mib": peak_rss_mib(), "rows": rows}),
          flush=True)  # fmt: skip
    return 0


def dd_rate(folder: Path, gib: float) -> dict[str, float]:
    """The disk's sequential write (fdatasync at the end) and read rates, MB/s, with dd."""
    folder.mkdir(parents=True, exist_ok=True)
    file = folder / "dd.bin"
    count = max(1, int(gib * 1024 / 64))
    started = time.perf_counter()
    subprocess.run(["dd", "if=/dev/zero", f"of={file}", "bs=64M", f"count={count}", "conv=fdatasync"],
                   check=True, capture_output=True)  # fmt: skip
    write = count * 64 * 2**20 / (time.perf_counter() - started) / 1e6
    subprocess.run(["sh", "-c", "sync; echo 3 > /proc/sys/vm/drop_caches"], capture_output=True)
    started = time.perf_counter()
    subprocess.run(["dd", f"if={file}", "of=/dev/null", "bs=64M"], check=True, capture_output=True)
    read = count * 64 * 2**20 / (time.perf_counter() - started) / 1e6
    file.unlink()
    return {"write_mb_s": write, "read_mb_s": read}


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--gib", type=float, default=12.0, help="tables' weights + optimizer state, all ranks"
    )
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    parser.add_argument(
        "--save-repeats", type=int, default=2, help="saves timed without and with checksums, each"
    )
    parser.add_argument(
        "--dd-gib", type=float, default=4.0, help="size of the dd file that measures the disk"
    )
    parser.add_argument("--output", type=Path, default=RESULTS, help="where the results go")
    parser.add_argument("--rows", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--job", choices=("rank", "reshard"), help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.job == "rank":
        return rank_job(args)
    if args.job == "reshard":
        return reshard_job(args)

    from benchmarks.common import machine_info
    from towerrec.trainer.config import load_config

    rows = int(args.gib * 2**30 / 2 / BYTES_PER_ROW)
    shutil.rmtree(BENCH / "run", ignore_errors=True)
    for stale in BENCH.glob("rank-*.json"):
        stale.unlink()
    if not (BENCH / "data" / "metadata.json").exists():  # the default synthetic data set
        cfg = load_config("configs/default.yaml", [f"data.path={BENCH / 'data'}"])
        from towerrec.data.prepare import prepare

        prepare(cfg.data.prepare, str(BENCH / "data"))
    disk_before = dd_rate(BENCH / "dd", args.dd_gib)
    common = ["--rows", str(rows), "--steps", str(args.steps), "--threads", str(args.threads),
              "--save-repeats", str(args.save_repeats)]  # fmt: skip
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
              "-m", "benchmarks.big_tables", "--job", "rank", *common]  # fmt: skip
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": str(args.threads)}
    out = subprocess.run(launch, cwd=ROOT, capture_output=True, text=True, env=env, timeout=7200)
    files = [BENCH / f"rank-{rank}.json" for rank in (0, 1)]
    ranks = [json.loads(file.read_text()) for file in files if file.exists()]
    if out.returncode != 0 or len(ranks) != 2:
        raise SystemExit(f"2-rank job failed ({out.returncode}):\n{out.stdout[-4000:]}\n{out.stderr[-4000:]}")
    checkpoint = Path(ranks[0]["checkpoint"])
    size = folder_bytes(checkpoint)
    reshard = subprocess.run(
        [sys.executable, "-m", "benchmarks.big_tables", "--job", "reshard", *common, "--checkpoint", str(checkpoint)],
        cwd=ROOT, capture_output=True, text=True, timeout=7200,
    )  # fmt: skip
    line = [text for text in reshard.stdout.splitlines() if text.startswith("{")]
    one = json.loads(line[-1]) if reshard.returncode == 0 and line else {"error": reshard.stderr[-2000:]}
    disk_after = dd_rate(BENCH / "dd", args.dd_gib)
    write = (disk_before["write_mb_s"] + disk_after["write_mb_s"]) / 2
    read = (disk_before["read_mb_s"] + disk_after["read_mb_s"]) / 2
    save_s = max(r["save_s"] for r in ranks)
    bare_s = max(r["save_without_checksums_s"] for r in ranks)
    synced_s = max(r["save_and_sync_s"] for r in ranks)
    load_s = max(r["load_s"] for r in ranks)
    check_s = max(r["check_s"] for r in ranks)
    tables_gib = 2 * rows * BYTES_PER_ROW / 2**30
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    lines = [
        f"# Tables at half this machine's memory: {tables_gib:.1f} GiB on 2 ranks",
        "",
        f"`python -m benchmarks.big_tables --gib {args.gib} --steps {args.steps}` · commit {commit.stdout.strip()} · "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} · {machine_info()['cpus']} CPUs ({machine_info()['cpu_model']}), "
        f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB memory",
        "",
        f"Tables `user_id` and `item_id`: {rows:,} rows × {DIM} each (fp32 weights + row-wise Adagrad state: "
        f"{tables_gib:.1f} GiB in all), one per rank (plan below); batch 4096 per rank, {args.steps} steps, "
        f"{args.threads} torch thread(s) per rank.",
        "",
        "| measure | rank 0 | rank 1 |",
        "|---|---|---|",
        f"| setup (plan, materialise, init) + fit, s | {ranks[0]['setup_and_fit_s']:.1f} | {ranks[1]['setup_and_fit_s']:.1f} |",
        f"| training samples/s (both ranks) | {ranks[0]['samples_per_s']:,.0f} | |",
        f"| peak RSS after fit, MiB | {ranks[0]['peak_rss_after_fit_mib']:,.0f} | {ranks[1]['peak_rss_after_fit_mib']:,.0f} |",
        f"| peak RSS after save, MiB | {ranks[0]['peak_rss_after_save_mib']:,.0f} | {ranks[1]['peak_rss_after_save_mib']:,.0f} |",
        f"| peak RSS after load, MiB | {ranks[0]['peak_rss_after_load_mib']:,.0f} | {ranks[1]['peak_rss_after_load_mib']:,.0f} |",
        "",
        "| checkpoint | value |",
        "|---|---|",
        f"| size on disk | {size / 2**30:.2f} GiB |",
        f"| disk write rate (dd, {args.dd_gib:g} GiB, fdatasync; before/after) | {disk_before['write_mb_s']:,.0f} / {disk_after['write_mb_s']:,.0f} MB/s |",
        f"| disk read rate (dd, {args.dd_gib:g} GiB; before/after) | {disk_before['read_mb_s']:,.0f} / {disk_after['read_mb_s']:,.0f} MB/s |",
        f"| save without checksums, 2 ranks (slowest rank, median of {args.save_repeats}) | {bare_s:.1f} s = {size / bare_s / 1e6:,.0f} MB/s = {size / bare_s / 1e6 / write:.2f} of dd write |",
        f"| save with checksums (the product's; median of {args.save_repeats}, alternated with the above) | {save_s:.1f} s = {size / save_s / 1e6:,.0f} MB/s = {size / save_s / 1e6 / write:.2f} of dd write; checksums {save_s - bare_s:+.1f} s ({(save_s - bare_s) / bare_s:+.0%}) |",
        f"| each save, s (without / with) | {' '.join(f'{x:.1f}' for x in ranks[0]['saves_s']['without'])} / {' '.join(f'{x:.1f}' for x in ranks[0]['saves_s']['with'])} (rank 0) |",
        f"| save + sync (on disk; the last save) | {synced_s:.1f} s = {size / synced_s / 1e6:,.0f} MB/s = {size / synced_s / 1e6 / write:.2f} of dd write |",
        f"| check of the files against their checksums before a load, 2 ranks (each half the files) | {check_s:.1f} s |",
        f"| load 2 → 2 ranks, model weights (slowest rank; after the check) | {load_s:.1f} s |",
    ]
    if "error" in one:
        lines.append(f"| load 2 → 1 process (reshard) | failed: {one['error'][-300:]} |")
    else:
        model_bytes = 2 * rows * DIM * 4
        lines.append(f"| check before a load, 1 process (every file) | {one['check_s']:.1f} s |")
        lines.append(
            f"| load 2 → 1 process (reshard, model weights {model_bytes / 2**30:.1f} GiB; after the check) | {one['load_s']:.1f} s = "
            f"{model_bytes / one['load_s'] / 1e6:,.0f} MB/s = {model_bytes / one['load_s'] / 1e6 / read:.2f} of dd read; "
            f"peak RSS {one['peak_rss_mib']:,.0f} MiB |"
        )
    lines += ["", "Plan:", "", "```", ranks[0]["plan"], "```", ""]
    text = "\n".join(lines)
    print(text)
    args.output.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
