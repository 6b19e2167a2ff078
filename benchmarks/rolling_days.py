"""Rolling day-by-day evaluation on a drifting log: frozen vocabulary vs hashing vs dynamic ids,
incremental training vs retraining from scratch. Writes benchmarks/results/DYNAMIC_IDS.md.

    python -m benchmarks.rolling_days                       # 8 days of 40,000 rows (~5 min on 2 cores)
    python -m benchmarks.rolling_days --days 4 --rows-per-day 5000 --output /tmp/DYNAMIC_IDS.md
    make bench ARGS="--sections dynamic_ids"

The log (``towerrec.data.samples.drifting_days``) brings new users and items every day and moves
its traffic to the new items. For each id variant the data set is prepared on day 0 and every
later day is appended (``towerrec prepare --append``: nothing is prepared twice), then for each day
d, with ``configs/rolling_days.yaml`` through the functions the ``towerrec`` commands run, in
this process (``prepare``/``append_day``, ``trainer.run.fit``):

- retrain: ``fit`` on days [0, d] from scratch;
- incremental: ``fit`` on day d only, warm-started from day d - 1's incremental run
  (``trainer.warm_start``; day 0 is the retrain run);

and each run is tested on day d + 1 (its rows, none of which it trained on): AUC and GAUC (per-user
AUC weighted by impressions) of the click task, and the seconds of each ``fit`` (building,
training, checkpoint and test).
Variants: ``frozen vocabulary`` (``sparse_mapping: vocab``, fitted on day 0: later ids read as row
0), ``hashing`` (``sparse_mapping: hash`` into ``--hash-buckets`` rows) and ``dynamic ids``
(``id_mapping: dynamic`` for user and item, run when this checkout has it).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIG = "configs/rolling_days.yaml"
RESULTS = ROOT / "benchmarks" / "results" / "DYNAMIC_IDS.md"


def variants(hash_buckets: int, capacity: int) -> dict[str, list[str]]:
    """Id variant → config overrides (user and item are data.sparse 0 and 1)."""
    dynamic = [f"data.sparse.{i}.{key}" for i in (0, 1) for key in ("id_mapping=dynamic",)]
    dynamic += [f"data.sparse.{i}.dynamic={{capacity: {capacity}, policy: lru}}" for i in (0, 1)]
    return {
        "frozen vocabulary": ["data.prepare.sparse_mapping=vocab"],
        "hashing": ["data.prepare.sparse_mapping=hash", f"data.prepare.num_hash_buckets={hash_buckets}"],
        "dynamic ids": ["data.prepare.sparse_mapping=vocab", *dynamic],
    }


def supported(overrides: list[str]) -> str | None:
    """None when this checkout's config accepts ``overrides``, else why not."""
    from towerrec.trainer.config import ConfigError, load_config

    try:
        load_config(ROOT / CONFIG, overrides)
    except (ConfigError, ValueError) as err:
        return str(err).splitlines()[0]
    return None


def fit_run(overrides: list[str]) -> tuple[dict, float]:
    """``towerrec fit`` of the config with ``overrides`` in this process; (metrics.json, seconds)."""
    from towerrec.trainer.config import load_config
    from towerrec.trainer.run import fit

    cfg = load_config(ROOT / CONFIG, overrides)
    started = time.perf_counter()
    if fit(cfg) != 0:
        raise RuntimeError(f"fit {cfg.run_dir} did not finish")
    return json.loads((Path(cfg.run_dir) / "metrics.json").read_text()), time.perf_counter() - started


def run_variant(
    name: str,
    overrides: list[str],
    log: Path,
    work: Path,
    days: int,
    epochs: int,
    threads: int,
    warm_up: bool,
):
    """Prepares day 0 and appends every later day, then the retrain and incremental runs of each
    day (the product's own functions: ``towerrec prepare [--append]`` and ``towerrec fit``)."""
    from towerrec.data.prepare import append_day, prepare
    from towerrec.trainer.config import load_config
    from towerrec.trainer.dataset_setup import input_schema

    common = [f"data.path={work / 'data'}", f"data.prepare.source={log / 'day-00.parquet'}",
              f"trainer.max_epochs={epochs}", f"trainer.num_threads={threads}", *overrides]  # fmt: skip
    cfg = load_config(ROOT / CONFIG, common)
    out = {"prepare_s": [], "append_s": [], "retrain": [], "incremental": []}
    started = time.perf_counter()
    prepare(cfg.data.prepare, cfg.data.path, input_schema(cfg))
    out["prepare_s"].append(time.perf_counter() - started)
    for day in range(1, days):
        started = time.perf_counter()
        meta = append_day(
            cfg.data.prepare, cfg.data.path, str(log / f"day-{day:02d}.parquet"), input_schema(cfg)
        )
        out["append_s"].append(time.perf_counter() - started)
    out["outside_vocabulary"] = [d.get("report", {}).get("ids_outside_vocabulary", {}) for d in meta.days]
    if warm_up:  # the process's first fit pays one-time start-up costs: not a day's cost
        fit_run([*common, "data.train_days=[0,0]", "data.test_days=[1,1]", f"run_dir={work / 'warm-up'}"])
    for day in range(days - 1):
        test = [f"data.test_days=[{day + 1},{day + 1}]"]
        retrain = work / f"retrain-{day}"
        metrics, wall = fit_run([*common, *test, f"data.train_days=[0,{day}]", f"run_dir={retrain}"])
        out["retrain"].append(summary(metrics, wall))
        print(f"[rolling] {name}: retrain day {day}: {out['retrain'][-1]}", flush=True)
        if day == 0:  # incremental training starts from the same first day
            out["incremental"].append(out["retrain"][-1])
            shutil.copytree(retrain, work / "incremental-0")
            continue
        warm = f"trainer.warm_start={work / f'incremental-{day - 1}'}"
        run_dir = f"run_dir={work / f'incremental-{day}'}"
        metrics, wall = fit_run([*common, *test, f"data.train_days=[{day},{day}]", warm, run_dir])
        out["incremental"].append(summary(metrics, wall))
        print(f"[rolling] {name}: incremental day {day}: {out['incremental'][-1]}", flush=True)
    return out


def summary(metrics: dict, wall: float) -> dict:
    ctr = metrics["metrics"]["test"]["ctr"]
    found = {}

    def evictions(tree, key=""):  # counters the dynamic-id map reports (any key naming evictions)
        if isinstance(tree, dict):
            for k, v in tree.items():
                evictions(v, f"{key}.{k}" if key else k)
        elif "evict" in key and isinstance(tree, (int, float)):
            found[key] = tree

    evictions({k: v for k, v in metrics.items() if k != "metrics"})
    return {"auc": ctr["auc"], "gauc": ctr["gauc"], "gauc_users": ctr["gauc_users"],
            "train_s": metrics["train_seconds"], "wall_s": wall, "steps": metrics["global_step"],
            "evictions": found}  # fmt: skip


def new_ids(log: Path, days: int) -> list[dict[str, float]]:
    """Per day: the share of its rows whose user / item never appeared on an earlier day (no
    training can know them) and whose user / item is not in day 0's ids (a frozen vocabulary's row 0)."""
    import numpy as np
    import pyarrow.parquet as pq

    seen = {"user": set(), "item": set()}
    first = {}
    shares = []
    for day in range(days):
        table = pq.read_table(log / f"day-{day:02d}.parquet", columns=["user", "item"])
        row = {}
        for column in ("user", "item"):
            ids = table.column(column).to_numpy()
            if day == 0:
                first[column] = set(np.unique(ids).tolist())
            row[f"{column}_never_seen"] = float(np.mean([i not in seen[column] for i in ids])) if day else 1.0
            row[f"{column}_not_day0"] = float(np.mean([i not in first[column] for i in ids]))
            seen[column].update(np.unique(ids).tolist())
        shares.append(row)
    return shares


def write_report(
    results: dict, shares: list[dict], args, skipped: dict[str, str], elapsed: float, path: Path
):
    def mean(values):
        return sum(values) / len(values) if values else float("nan")

    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
    ).stdout.strip()
    lines = [
        "# Day-by-day training on a drifting log: frozen vocabulary, hashing, dynamic ids",
        "",
        f"`python -m benchmarks.rolling_days --days {args.days} --rows-per-day {args.rows_per_day} --epochs {args.epochs}"
        f"{f' --capacity {args.capacity}' if args.capacity != 8_000 else ''}"
        f"{f' --variants {args.variants!r}' if args.variants != 'frozen vocabulary,hashing,dynamic ids' else ''}` · "
        f"commit {commit} · {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC · {os.cpu_count()} CPUs, "
        f"{args.threads} torch threads per run · load average {os.getloadavg()[0]:.1f} at the end · {elapsed / 60:.1f} min",
        "",
        "The log (`towerrec.data.samples.drifting_days`, seed 0) brings new users and items every day and moves its "
        "traffic to the new items; clicks follow hidden user and item factors, the item's own quality (learnable "
        "from its id only) and the user's taste for the item's category. Each variant prepares day 0 and appends "
        "the later days (`towerrec prepare --append`); each run is the fit of `configs/rolling_days.yaml` "
        "tested on the next day's rows (AUC and GAUC of the click task; GAUC groups by the raw user id). "
        "*retrain*: days [0, d] from scratch; *incremental*: day d only, warm-started from day d - 1 "
        f"(`trainer.warm_start`), one epoch each. Hash buckets: {args.hash_buckets:,}; dynamic-id capacity: "
        f"{args.capacity:,} per table.",
        "",
        "How new each test day is (share of its rows):",
        "",
        "| day | user never seen before | item never seen before | user not in day 0's vocabulary | item not in day 0's vocabulary |",
        "|---|---|---|---|---|",
    ]
    for day, share in enumerate(shares[1:], start=1):
        lines.append(f"| {day} | {share['user_never_seen']:.0%} | {share['item_never_seen']:.0%} | "
                     f"{share['user_not_day0']:.0%} | {share['item_not_day0']:.0%} |")  # fmt: skip
    lines += ["", "## Quality per test day", ""]
    header = "| test day |" + "".join(
        f" {name}: {mode} AUC / GAUC |" for name in results for mode in ("retrain", "incremental")
    )
    lines += [header, "|---|" + "---|" * (2 * len(results))]
    for day in range(1, args.days):
        cells = []
        for result in results.values():
            for mode in ("retrain", "incremental"):
                run = result[mode][day - 1]
                cells.append(f" {run['auc']:.4f} / {run['gauc']:.4f} |")
        lines.append(f"| {day} |" + "".join(cells))
    lines += [
        "",
        "## Cost per day: seconds of each fit (build, train, checkpoint, test; its steps in brackets)",
        "",
    ]
    lines += ["| trained day |" + "".join(f" {name}: {mode} |" for name in results for mode in ("retrain", "incremental")),
              "|---|" + "---|" * (2 * len(results))]  # fmt: skip
    for day in range(args.days - 1):
        cells = [f" {r[mode][day]['wall_s']:.1f} ({r[mode][day]['steps']}) |" for r in results.values()
                 for mode in ("retrain", "incremental")]  # fmt: skip
        lines.append(f"| {day} |" + "".join(cells))
    lines += ["", "## Summary over test days 2 and later", "",
              "| variant | mode | mean AUC | mean GAUC | fit seconds, all days | appending a day, s |",
              "|---|---|---|---|---|---|"]  # fmt: skip
    for name, result in results.items():
        for mode in ("retrain", "incremental"):
            runs = result[mode][1:]
            lines.append(
                f"| {name} | {mode} | {mean([r['auc'] for r in runs]):.4f} | {mean([r['gauc'] for r in runs]):.4f} | "
                f"{sum(r['wall_s'] for r in result[mode]):.1f} | {mean(result['append_s']):.2f} |"
            )
    later = {(name, mode): mean([r["auc"] for r in result[mode][1:]]) for name, result in results.items()
             for mode in ("retrain", "incremental")}  # fmt: skip
    cost = {name: sum(r["wall_s"] for r in result["incremental"]) / sum(r["wall_s"] for r in result["retrain"])
            for name, result in results.items()}  # fmt: skip
    if ("frozen vocabulary", "incremental") in later and ("hashing", "incremental") in later:
        lines += ["", f"In short: on test days 2-{args.days - 1} the frozen vocabulary's AUC is "
                  f"{later[('hashing', 'incremental')] - later[('frozen vocabulary', 'incremental')]:.3f} below hashing's "
                  f"(incremental; day 1, where both know the same ids, is even); incremental training matches "
                  f"retraining on every day so far (AUC within {max(abs(later[(n, 'incremental')] - later[(n, 'retrain')]) for n in results):.3f}) "
                  f"at {', '.join(f'{c:.0%}' for c in cost.values())} of its fit seconds ({', '.join(cost)})."]  # fmt: skip
    frozen = results.get("frozen vocabulary")
    if frozen:
        lines += ["", "Ids outside the frozen (day 0) vocabulary per appended day, as `towerrec prepare --append` "
                  "counts them (they read as row 0): " + "; ".join(
                      f"day {d}: " + ", ".join(f"{c} {n:,}" for c, n in counts.items())
                      for d, counts in enumerate(frozen["outside_vocabulary"]) if d)]  # fmt: skip
    for name, result in results.items():
        per_day = [
            {key.split(".")[2]: int(value) for key, value in r["evictions"].items() if ".last_epoch." in key}
            for r in result["incremental"]
        ]
        if any(per_day):
            lines += ["", f"Rows evicted per trained day ({name}, incremental; capacity {args.capacity:,} per table): "
                      + "; ".join(f"day {d}: " + ", ".join(f"{t} {n:,}" for t, n in counts.items())
                                  for d, counts in enumerate(per_day))]  # fmt: skip
    for name, why in skipped.items():
        lines += ["", f"**{name}: not run.** This checkout's config does not accept it ({why}); the variant is "
                  "wired in `benchmarks/rolling_days.py`."]  # fmt: skip
    lines += [
        "",
        "```json",
        json.dumps({"results": results, "new_ids": shares}, indent=None)[:20000],
        "```",
        "",
    ]
    path.write_text("\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--days", type=int, default=8)
    parser.add_argument("--rows-per-day", type=int, default=40_000)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--hash-buckets", type=int, default=20_000)
    parser.add_argument("--capacity", type=int, default=8_000, help="dynamic-id rows per table")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads per run (2 on a shared 2-core machine stall)"
    )
    parser.add_argument("--variants", default="frozen vocabulary,hashing,dynamic ids")
    parser.add_argument("--workdir", help="where to write the log, data sets and runs (default: temporary)")
    parser.add_argument("--output", default=str(RESULTS))
    args = parser.parse_args(argv)
    from towerrec.data.samples import drifting_days, write_days

    started = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        work = Path(tmp)
        write_days(drifting_days(args.days, args.rows_per_day, seed=0), work / "log")
        shares = new_ids(work / "log", args.days)
        results, skipped = {}, {}
        for name, overrides in variants(args.hash_buckets, args.capacity).items():
            if name not in args.variants.split(","):
                continue
            why = supported(overrides)
            if why is not None:
                skipped[name] = why
                print(f"[rolling] {name}: not run ({why})", flush=True)
                continue
            folder = work / name.replace(" ", "-")
            folder.mkdir()
            results[name] = run_variant(
                name,
                overrides,
                work / "log",
                folder,
                args.days,
                args.epochs,
                args.threads,
                warm_up=not results,
            )
    write_report(results, shares, args, skipped, time.perf_counter() - started, Path(args.output))
    print(f"[rolling] wrote {args.output}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
