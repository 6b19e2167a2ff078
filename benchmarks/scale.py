"""One scale-sweep point: our trainer on the synthetic data set, one or more processes.

    python -m benchmarks.scale --data DIR --batch-size 4096 --steps 30 [--rows 2000000] [--hbm-gb 1.0]
    python -m torch.distributed.run --nproc_per_node 2 -m benchmarks.scale --data DIR ...

Each rank prints one JSON line: rank, world size, steady samples/s of all ranks together
(step-start intervals after 3 warm-up steps, times world size), peak RSS (VmHWM) and, when the
planner refuses the tables, the error message.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

from benchmarks.common import NUM_THREADS


def peak_rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--batch-size", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument(
        "--rows", type=int, help="rows of the user_id and item_id tables (default: vocabulary)"
    )
    parser.add_argument("--dim", type=int, default=16, help="embedding dim of user_id and item_id")
    parser.add_argument(
        "--hbm-gb", type=float, help="sharding.hbm_gb: per-rank memory budget for the planner"
    )
    parser.add_argument("--threads", type=int, help="torch threads per rank (default: CPUs / ranks)")
    args = parser.parse_args(argv)
    from benchmarks.loop import rate
    from benchmarks.ours import load, step_timer
    from towerrec.trainer.build import build
    from towerrec.trainer.errors import PlanDoesNotFit
    from towerrec.trainer.run import finish
    from towerrec.trainer.typed_config import read_config_tree

    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    with tempfile.TemporaryDirectory() as run_dir:
        tree = read_config_tree(Path(__file__).resolve().parent.parent / "configs" / "default.yaml")
        tree["data"].update(
            path=args.data,
            batch_size=args.batch_size,
            val_split=None,
            test_split=None,
            validate_on_start=False,
        )
        tree["data"].pop("prepare")
        for feature in tree["data"]["sparse"]:
            if feature["name"] in ("user_id", "item_id"):
                feature["embedding_dim"] = args.dim
                if args.rows:
                    feature["num_embeddings"] = args.rows
        tree["run_dir"] = run_dir
        tree["trainer"].update(
            max_epochs=1,
            max_steps=args.steps,
            accelerator="cpu",
            progress_bar="off",
            num_threads=args.threads or max(1, NUM_THREADS // world_size),
        )
        tree["checkpoint"] = {"every_n_steps": 0, "keep_last": 1, "resume": "never"}
        if args.hbm_gb:
            tree["sharding"] = {"hbm_gb": args.hbm_gb}
        result = {"rank": rank, "world_size": world_size}
        timer = step_timer()
        try:
            trainer, module, datamodule, _ = build(load(tree), extra_callbacks=[timer])
            trainer.fit(module, datamodule=datamodule)
            result["samples_per_s"] = rate(timer.starts[0], timer.rows[0]) * world_size
            result["steps"] = len(timer.starts[0])
            result["plan"] = trainer.strategy.plan_text
            result["plan_summary"] = trainer.strategy.plan_summary
            result["dense_parameters"] = sum(p.numel() for _, p in trainer.strategy._replicas.parameters)
        except PlanDoesNotFit as err:
            result["refused"] = str(err)
        result["peak_rss_mib"] = peak_rss_mib()
        finish()
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
