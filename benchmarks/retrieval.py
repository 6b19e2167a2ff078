"""Retrieval: quality by both next-item protocols, and the index, cascade and training at scale.

    python -m benchmarks.retrieval                       # both sections (quality: 3 seeds)
    python -m benchmarks.retrieval --quality --seeds 0   # one seed
    python -m benchmarks.retrieval --scale --items 1000000 --users 100000
    make bench ARGS="--sections retrieval"

Quality (``towerrec fit`` then ``towerrec recommend --evaluate`` per seed, leave-last-out): on
MovieLens 100K (read from ../shared/data; skipped when absent) the two-tower model with each
history encoder (SASRec-style softmax, HSTU-style pointwise, a mean bag), the multi-task ranker as
a retriever (``configs/movielens100k_next_item.yaml``: it scores every item) and the cascade (the
SASRec-style retrieval fetches ``recommend.num_candidates`` items, the ranker orders them); on the
planted click log (``towerrec.data.samples --kind sessions``, its clicks only) the two-tower model.
Each cell: mean ± sample standard deviation over the seeds of HR@10 and NDCG@10, full ranking
(seen items excluded) and sampled (100 never-interacted items), beside popularity.

Scale (one process, synthetic clustered vectors, d = 64): the exact index's and FAISS's build time,
memory and top-100 queries/s with recall against exact; the cascade's users/s (retrieve 500 from the
index, score them with an MMoE ranker); training samples/s of the sampled-softmax model against the
pointwise ranker at the same batch on the default synthetic data set. Results:
``benchmarks/results/RETRIEVAL.md``.
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

import numpy as np
import torch

from benchmarks.common import ML100K_SOURCE, machine_info
from benchmarks.scale import peak_rss_mib

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "RETRIEVAL.md"
ML100K_RETRIEVAL = "configs/movielens100k_retrieval.yaml"
ML100K_RANKER = "configs/movielens100k_next_item.yaml"
SESSIONS_RETRIEVAL = "configs/sessions_retrieval.yaml"
PROTOCOLS = ("full", "sampled_100")


def cli(*args: str, timeout: float = 7200) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, "-m", "towerrec.trainer.cli", *args]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result


# ------------------------------------------------------------------------------------------ quality
def evaluate(config: str, run_dir: Path, seed: int, extra: list[str], evaluate_extra: list[str] = ()) -> dict:
    """fit + recommend --evaluate of one config and seed; the evaluation's JSON."""
    overrides = [f"--seed={seed}", f"--run_dir={run_dir}", *extra]
    if not (run_dir / "metrics.json").exists():
        cli("fit", "--config", config, *overrides)
    output = run_dir / f"evaluation-{len(evaluate_extra)}.parquet"
    if not output.with_name(output.name + ".metrics.json").exists():
        cli(
            "recommend",
            "--config",
            config,
            *overrides,
            *evaluate_extra,
            "--k",
            "10",
            "--evaluate",
            "--output",
            str(output),
        )
    return json.loads(output.with_name(output.name + ".metrics.json").read_text())


def quality(seeds: list[int], work: Path, ranker_seeds: list[int] | None = None) -> dict[str, dict]:
    """{data set: {variant: [one evaluation JSON per seed]}}; the variants with the ranker (it scores
    every item of every list: the slow path this benchmark is about) run ``ranker_seeds`` only."""
    ranker_seeds = seeds if ranker_seeds is None else ranker_seeds
    results: dict[str, dict] = {}
    sessions_log = work / "sessions_clicks.csv"
    if not sessions_log.exists():
        import pyarrow.compute as pc
        import pyarrow.csv as pacsv

        from towerrec.data.samples import session_clicks

        clicks = session_clicks(num_users=1000, steps=20, num_items=400)
        pacsv.write_csv(clicks.filter(pc.equal(clicks["click"], 1)).drop_columns(["click"]), sessions_log)
    sessions = [f"--data.prepare.source={sessions_log}", f"--data.path={work / 'data-sessions'}"]
    variants = {
        "planted click log": {
            "two-tower, SASRec-style": (SESSIONS_RETRIEVAL, sessions, []),
            "two-tower, HSTU-style": (
                SESSIONS_RETRIEVAL,
                [*sessions, "--model.sequence.attention=pointwise"],
                [],
            ),
            "two-tower, mean bag": (SESSIONS_RETRIEVAL, [*sessions, "--model.sequence.encoder=mean"], []),
        }
    }
    if ML100K_SOURCE.exists():
        ml = [f"--data.prepare.source={ML100K_SOURCE}"]
        retrieval = [*ml, f"--data.path={work / 'data-ml100k-llo'}"]
        ranker = [*ml, f"--data.path={work / 'data-ml100k-next-item'}"]
        variants["MovieLens 100K"] = {
            "two-tower, SASRec-style": (ML100K_RETRIEVAL, retrieval, []),
            "two-tower, HSTU-style": (
                ML100K_RETRIEVAL,
                [*retrieval, "--model.sequence.attention=pointwise"],
                [],
            ),
            "two-tower, mean bag": (ML100K_RETRIEVAL, [*retrieval, "--model.sequence.encoder=mean"], []),
            "ranker as retriever (scores every item)": (ML100K_RANKER, ranker, []),
        }
    for data, cells in variants.items():
        results[data] = {}
        for name, (config, extra, evaluate_extra) in cells.items():
            runs = []
            for seed in ranker_seeds if name.startswith("ranker") else seeds:
                run_dir = work / f"{data}-{name}-{seed}".replace(" ", "_").replace(",", "")
                print(f"[bench] {data}: {name}, seed {seed}", flush=True)
                runs.append(evaluate(config, run_dir, seed, extra, evaluate_extra))
            results[data][name] = runs
        if data == "MovieLens 100K":  # the cascade: SASRec-style retrieval, the ranker's order
            ranker_config = work / "ranker.yaml"
            runs = []
            for seed in ranker_seeds:
                ranker_dir = work / f"{data}-ranker_as_retriever_(scores_every_item)-{seed}".replace(" ", "_")
                ranker_config.write_text(
                    f"base: {ROOT / ML100K_RANKER}\nrun_dir: {ranker_dir}\nseed: {seed}\n"
                    f"data:\n  path: {work / 'data-ml100k-next-item'}\n  prepare:\n    source: {ML100K_SOURCE}\n"
                )
                run_dir = work / f"{data}-two-tower_SASRec-style-{seed}".replace(" ", "_")
                runs.append(
                    evaluate(
                        ML100K_RETRIEVAL, run_dir, seed, retrieval, ["--recommend.ranker", str(ranker_config)]
                    )
                )
            results[data]["cascade: SASRec-style retrieves 300, the ranker orders"] = runs
            shared = []  # two runs, shared tables: the ranker's item and user tables start from the retrieval run's
            for seed in ranker_seeds:
                run_dir = work / f"{data}-ranker_tables_from_retrieval-{seed}".replace(" ", "_")
                source = work / f"{data}-two-tower_SASRec-style-{seed}".replace(" ", "_")
                shared.append(
                    evaluate(
                        ML100K_RANKER,
                        run_dir,
                        seed,
                        [
                            *ranker,
                            f"--trainer.tables_from={source}",
                            "--trainer.tables_from_names=[t_item,t_user_id]",
                        ],
                    )
                )
            results[data]["ranker, t_item and t_user_id from the two-tower run (two runs, shared tables)"] = (
                shared
            )
    return results


def mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}"


def quality_table(results: dict[str, dict], seeds: list[int]) -> list[str]:
    lines = []
    for data, cells in results.items():
        lines += [
            f"### {data} (leave-last-out; {len(seeds)} seed(s): {', '.join(map(str, seeds))})",
            "",
            "| model | full HR@10 | full NDCG@10 | sampled-100 HR@10 | sampled-100 NDCG@10 | distinct items in lists | lists with the top item |",
            "|---|---|---|---|---|---|---|",
        ]
        popularity_done = False
        for name, runs in cells.items():
            who = "cascade" if name.startswith("cascade") else "model"
            full = [run["full"][who] for run in runs]
            sampled = [run["sampled_100"]["model"] for run in runs] if who == "model" else None
            cells_text = [
                mean_std([f["hit_rate@10"] for f in full]),
                mean_std([f["ndcg@10"] for f in full]),
                mean_std([s["hit_rate@10"] for s in sampled]) if sampled else "–",
                mean_std([s["ndcg@10"] for s in sampled]) if sampled else "–",
                f"{statistics.mean(f['distinct_items'] for f in full):.0f}",
                f"{statistics.mean(f['top_item_share'] for f in full):.2f}",
            ]
            label = name if len(runs) == len(seeds) else f"{name} ({len(runs)} seed{'s' * (len(runs) > 1)})"
            lines.append(f"| {label} | " + " | ".join(cells_text) + " |")
            if not popularity_done and who == "model":
                popular = runs[0]["full"]["popularity"]
                sampled_pop = runs[0]["sampled_100"]["popularity"]
                lines.append(
                    f"| popularity | {popular['hit_rate@10']:.4f} | {popular['ndcg@10']:.4f} | "
                    f"{sampled_pop['hit_rate@10']:.4f} | {sampled_pop['ndcg@10']:.4f} | "
                    f"{popular['distinct_items']} | {popular['top_item_share']:.2f} |"
                )
                popularity_done = True
        lines.append("")
    return lines


# ------------------------------------------------------------------------------------------ scale
def clustered_vectors(count: int, dim: int, seed: int, centres: int = 1000) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    middle = rng.normal(size=(centres, dim)).astype(np.float32)
    vectors = middle[rng.integers(0, centres, count)] + 0.5 * rng.normal(size=(count, dim)).astype(np.float32)
    return torch.nn.functional.normalize(torch.from_numpy(vectors), dim=1)


def index_scale(num_items: int, num_queries: int, k: int = 100) -> list[dict]:
    from towerrec.serving.index import IndexSettings, ItemIndex, faiss_available

    items = clustered_vectors(num_items, 64, 0)
    queries = clustered_vectors(num_queries, 64, 1)
    rows = []
    started = time.perf_counter()
    exact = ItemIndex(items, "exact", IndexSettings(block_rows=262144))
    build = time.perf_counter() - started
    started = time.perf_counter()
    truth = exact.search(queries, k).items.numpy()
    seconds = time.perf_counter() - started
    rows.append({"index": "exact (blocked matmul)", "build_s": build, "memory_mib": items.numel() * 4 / 2**20,
                 "queries_per_s": num_queries / seconds, "recall": 1.0})  # fmt: skip
    if faiss_available():
        import faiss

        for kind, settings in (
            ("hnsw (M 32, ef 128)", IndexSettings(hnsw_m=32, hnsw_ef_search=128)),
            ("hnsw (M 32, ef 256)", IndexSettings(hnsw_m=32, hnsw_ef_search=256)),
            ("ivf (4·sqrt(N) lists, probe 32)", IndexSettings(ivf_probe=32)),
            ("ivf (4·sqrt(N) lists, probe 64)", IndexSettings(ivf_probe=64)),
        ):
            started = time.perf_counter()
            index = ItemIndex(items, kind.split()[0], settings)
            build = time.perf_counter() - started
            started = time.perf_counter()
            found = index.search(queries, k).items.numpy()
            seconds = time.perf_counter() - started
            recall = float(np.mean([len(np.intersect1d(a, b)) / k for a, b in zip(found, truth)]))
            size = len(faiss.serialize_index(index.faiss_index)) / 2**20
            rows.append({"index": kind, "build_s": build, "memory_mib": size, "queries_per_s": num_queries / seconds,
                         "recall": recall})  # fmt: skip
    return rows


def cascade_scale(num_items: int, num_users: int, retrieved: int = 500) -> dict:
    """users/s of retrieve ``retrieved`` from an exact index + score them with an MMoE ranker over
    synthetic user/item features (an untrained model: the speed is the same)."""
    from towerrec.data.config import SparseFeature
    from towerrec.data.jagged import Jagged
    from towerrec.models.builder import build_model
    from towerrec.models.config import ModelConfig, TaskConfig
    from towerrec.serving.catalogue import Entities
    from towerrec.serving.index import ItemIndex
    from towerrec.serving.scoring import ModelScorer
    from towerrec.trainer.config import load_config

    rng = np.random.default_rng(3)
    sparse = [
        SparseFeature("user_id", num_embeddings=num_users + 1, side="user"),
        SparseFeature("item_id", num_embeddings=num_items + 1, side="item"),
        SparseFeature("category", num_embeddings=1001, side="item"),
        SparseFeature("region", num_embeddings=51, side="user"),
    ]
    tasks = [TaskConfig("ctr"), TaskConfig("cvr")]
    model = build_model(
        sparse=sparse, num_dense=0, tasks=tasks, model=ModelConfig(tower="mmoe"),
        table_rows={f.name: f.num_embeddings for f in sparse}, embedding_device="cpu",
    ).eval()  # fmt: skip
    users = Entities(
        np.arange(num_users), {"user_id": Jagged.single(np.arange(1, num_users + 1)),
                               "region": Jagged.single(rng.integers(1, 51, num_users))},
        np.zeros((num_users, 0), np.float32), np.ones(num_users, bool),
    )  # fmt: skip
    items = Entities(
        np.arange(num_items), {"item_id": Jagged.single(np.arange(1, num_items + 1)),
                               "category": Jagged.single(rng.integers(1, 1001, num_items))},
        np.zeros((num_items, 0), np.float32), np.ones(num_items, bool),
    )  # fmt: skip
    declared = ", ".join(
        f"{{name: {f.name}, side: {f.side}, num_embeddings: {f.num_embeddings}}}" for f in sparse
    )
    cfg = load_config(
        "configs/default.yaml",
        [f"data.sparse=[{declared}]", "data.dense=[]", "tasks=[{name: ctr}, {name: cvr}]", "model.alpha=null",
         "recommend.task_weights={ctr: 1.0}"],
    )  # fmt: skip
    index = ItemIndex(clustered_vectors(num_items, 64, 0))
    queries = clustered_vectors(num_users, 64, 1)
    scorer = ModelScorer(model, cfg, users, items, np.arange(num_users), np.arange(num_items))
    started = time.perf_counter()
    fetched = index.search(queries, retrieved).items.numpy()
    retrieve_s = time.perf_counter() - started
    started = time.perf_counter()
    pairs = np.repeat(np.arange(num_users), retrieved)
    for start in range(0, len(pairs), 65536):
        scorer.score_pairs(pairs[start : start + 65536], fetched.ravel()[start : start + 65536])
    rank_s = time.perf_counter() - started
    return {"users": num_users, "items": num_items, "retrieved": retrieved, "retrieve_s": retrieve_s,
            "rank_s": rank_s, "users_per_s": num_users / (retrieve_s + rank_s)}  # fmt: skip


def steady_samples_per_s(config: str, overrides: list[str], steps: int, warmup: int = 10) -> float:
    """Training samples/s of ``fit``'s loop (step start to step start after ``warmup`` steps)."""
    import lightning as L

    from towerrec.trainer.build import build
    from towerrec.trainer.config import load_config
    from towerrec.trainer.run import finish

    starts: list[float] = []

    class Clock(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            starts.append(time.perf_counter())

    cfg = load_config(config, [*overrides, f"trainer.max_steps={steps}", "checkpoint.resume=never",
                               "trainer.progress_bar=off", "trainer.loggers=[]"])  # fmt: skip
    trainer, module, datamodule, checkpointing = build(cfg, extra_callbacks=[Clock()])
    trainer.callbacks.remove(checkpointing)
    trainer.fit(module, datamodule=datamodule)
    finish()
    return (len(starts) - 1 - warmup) * cfg.data.batch_size / (starts[-1] - starts[warmup])


def training_speed(work: Path, steps: int = 60, batch: int = 512) -> dict:
    """samples/s of fit's steady loop: the pointwise ranker (the default config) against the two-tower
    model with in-batch and 256 sampled negatives over the same synthetic data set, the same batch."""
    common = [f"data.path={work / 'data-synthetic'}", f"data.batch_size={batch}", "data.val_split=null",
              "data.test_split=null", f"run_dir={work / 'speed'}"]  # fmt: skip
    two_tower = [
        "model.objective=retrieval", "tasks=[]",
        "data.sparse=[{name: user_id, side: user}, {name: item_id, side: item}, {name: region, side: user}]",
        "data.dense=[{name: user_activity, side: user}]", "model.retrieval.num_sampled_negatives=256",
    ]  # fmt: skip
    return {
        "pointwise ranker (Shared-Bottom, 2 tasks)": steady_samples_per_s(
            "configs/default.yaml", common, steps
        ),
        "two-tower, sampled softmax (in-batch + 256)": steady_samples_per_s(
            "configs/default.yaml", [*common, *two_tower], steps
        ),
    }


def _native_bf16() -> bool:
    from towerrec.trainer.precision import native_bf16

    return native_bf16("cpu")


# ------------------------------------------------------------------------------------------ main
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quality", action="store_true")
    parser.add_argument("--scale", action="store_true")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument(
        "--ranker-seeds", type=int, nargs="+", default=None, help="seeds of the variants with the ranker"
    )
    parser.add_argument("--items", type=int, default=1_000_000)
    parser.add_argument("--users", type=int, default=100_000)
    parser.add_argument("--queries", type=int, default=10_000)
    parser.add_argument(
        "--work", type=Path, default=None, help="keep runs here (default: a temporary folder)"
    )
    args = parser.parse_args(argv)
    both = not (args.quality or args.scale)
    info = machine_info()
    lines = [
        "# Retrieval: quality and scale",
        "",
        f"`python -m benchmarks.retrieval {' '.join(argv if argv is not None else sys.argv[1:])}` at commit "
        f"{info['git_commit']}, {info['date']}; {info['cpu_model']} ({info['cpus']} CPUs, "
        f"native bf16: {'yes' if torch.backends.mkldnn.is_available() and _native_bf16() else 'no'}); "
        f"load average {os.getloadavg()[0]:.1f} at the start.",
        "",
    ]
    with tempfile.TemporaryDirectory(prefix="towerrec-retrieval-") as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        if args.quality or both:
            results = quality(args.seeds, work, args.ranker_seeds)
            (work / "quality.json").write_text(
                json.dumps({"seeds": args.seeds, "results": results}, indent=1)
            )
        if (work / "quality.json").exists():  # this run's, or an earlier one's in the same --work
            saved = json.loads((work / "quality.json").read_text())
            if "results" not in saved:  # written before the seeds were recorded: the default ones
                saved = {"seeds": [0, 1, 2], "results": saved}
            lines += ["## Quality", "", *quality_table(saved["results"], saved["seeds"])]
        if args.scale or both:
            torch.set_num_threads(2)
            rows = index_scale(args.items, args.queries)
            lines += [
                f"## Index: {args.items:,} items × 64, top-100 of {args.queries:,} queries (2 threads)",
                "",
                "| index | build s | memory MiB | queries/s | recall@100 vs exact |",
                "|---|---|---|---|---|",
                *(f"| {r['index']} | {r['build_s']:.1f} | {r['memory_mib']:.0f} | {r['queries_per_s']:,.0f} | {r['recall']:.3f} |" for r in rows),
                "",
            ]  # fmt: skip
            cascade = cascade_scale(args.items, min(args.users, 20_000))
            lines += [
                f"## Cascade: retrieve {cascade['retrieved']} of {cascade['items']:,} items, rank them with MMoE",
                "",
                f"{cascade['users']:,} users: retrieval {cascade['retrieve_s']:.1f} s, ranking {cascade['rank_s']:.1f} s: "
                f"**{cascade['users_per_s']:,.0f} users/s**; peak RSS {peak_rss_mib():,.0f} MiB.",
                "",
            ]
            speed = training_speed(work)
            lines += [
                "## Training samples/s at the same batch (512)",
                "",
                "| model | samples/s |",
                "|---|---|",
            ]
            lines += [f"| {name} | {value:,.0f} |" for name, value in speed.items()] + [""]
    RESULTS.write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
