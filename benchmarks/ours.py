"""Our trainer on the ML-100K benchmark task (see ``benchmarks.common``), in a fresh process.

    python -m benchmarks.ours --data DIR --tower mmoe --batch-size 4096 --epochs 3 [--profile]

Runs the product path (``towerrec.trainer.build.build`` → Lightning ``fit`` → ``test``) and prints one JSON
line: steady-state training samples/s (step-start to step-start intervals after the first epoch),
test RMSE (rating) and AUC (like). ``--profile`` instead times the parts of a step (see ``profile``).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

from benchmarks.common import EMBEDDING_DIM, MULTI_HOT, NUM_THREADS, SPARSE, TOWERS, steady_samples_per_s


def config_tree(
    data: str,
    tower: str,
    batch_size: int,
    epochs: int,
    run_dir: str,
    threads: int = NUM_THREADS,
    precision: str = "auto",
    compile_dense: bool = False,
    background_decode: bool | None = None,
) -> dict:
    """The benchmark task as a towerrec config (dict form of a YAML file)."""
    sparse = [{"name": name, "embedding_dim": EMBEDDING_DIM} for name in SPARSE]
    sparse.append({"name": MULTI_HOT, "embedding_dim": EMBEDDING_DIM, "multi_hot": True, "pooling": "mean"})
    return {
        "seed": 0,
        "run_dir": run_dir,
        "data": {
            "path": data,
            "batch_size": batch_size,
            "eval_batch_size": 4096,
            "val_split": None,
            "sparse": sparse,
            "dense": [],
            "validate_on_start": False,
            "background_decode": background_decode,
        },
        "tasks": [
            {"name": "rating", "type": "regression", "label": "rating", "min_value": 1.0, "max_value": 5.0},
            {"name": "like", "type": "binary", "label": "click"},
        ],
        "model": {"tower": tower, "dropout": 0.0, **TOWERS[tower]},
        "trainer": {
            "accelerator": "cpu",
            "max_epochs": epochs,
            "num_threads": threads,
            "precision": precision,
            "compile": compile_dense,
            "embedding_optimizer": {"type": "rowwise_adagrad", "lr": 0.05},
            "dense_optimizer": {"type": "adam", "lr": 0.001},
            "progress_bar": "off",
            "log_every_n_steps": 50,
        },
        "checkpoint": {"resume": "never", "keep_last": 1},
    }


def load(tree: dict):
    from towerrec.trainer.config import Config, validate
    from towerrec.trainer.typed_config import build_dataclass

    cfg = build_dataclass(Config, tree, "")
    validate(cfg)
    return cfg


def step_timer():
    import lightning as L

    class StepTimer(L.Callback):
        """Records each training step's start time (wall clock and this process's CPU time) and
        rows, per epoch."""

        def __init__(self) -> None:
            self.starts: list[list[float]] = []
            self.cpu_starts: list[list[float]] = []
            self.rows: list[list[int]] = []

        def on_train_epoch_start(self, trainer, pl_module) -> None:
            self.starts.append([])
            self.cpu_starts.append([])
            self.rows.append([])

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            self.starts[-1].append(time.perf_counter())
            self.cpu_starts[-1].append(time.process_time())
            self.rows[-1].append(batch.batch_size)

    return StepTimer()


def fit_and_test(tree: dict) -> dict:
    from towerrec.trainer.build import build
    from towerrec.trainer.run import finish

    cfg = load(tree)
    timer = step_timer()
    started = time.perf_counter()
    trainer, module, datamodule, _ = build(cfg, extra_callbacks=[timer])
    trainer.fit(module, datamodule=datamodule)
    total = time.perf_counter() - started
    trainer.test(module, datamodule=datamodule, verbose=False)
    metrics = module.last_metrics["test"]
    finish()
    return {
        "samples_per_s": steady_samples_per_s(timer.starts, timer.rows),
        "epoch_steps": [len(s) for s in timer.starts],
        "wall_s": total,
        "rmse": metrics["rating"]["rmse"],
        "auc": metrics["like"]["auc"],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--tower", choices=sorted(TOWERS), default="mmoe")
    parser.add_argument("--batch-size", type=int, default=4096)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument(
        "--threads", type=int, default=NUM_THREADS, help="torch threads (trainer.num_threads)"
    )
    parser.add_argument(
        "--precision", choices=("auto", "32-true", "bf16-mixed"), default="auto", help="trainer.precision"
    )
    parser.add_argument(
        "--compile", action="store_true", help="trainer.compile (torch.compile the dense part)"
    )
    parser.add_argument(
        "--decode",
        choices=("auto", "background", "inline"),
        default="auto",
        help="data.background_decode: null (auto) / true / false",
    )
    parser.add_argument("--profile", action="store_true", help="time the parts of a step instead")
    parser.add_argument(
        "--prototypes", action="store_true", help="measure monkeypatched candidate changes instead"
    )
    args = parser.parse_args(argv)
    os.environ.setdefault("PL_DISABLE_FORK", "1")
    with tempfile.TemporaryDirectory() as run_dir:
        tree = config_tree(
            args.data,
            args.tower,
            args.batch_size,
            args.epochs,
            run_dir,
            args.threads,
            args.precision,
            args.compile,
            {"auto": None, "background": True, "inline": False}[args.decode],
        )
        if args.prototypes:
            from benchmarks.breakdown import prototypes

            result = prototypes(load(tree))
        elif args.profile:
            from benchmarks.breakdown import profile

            result = profile(load(tree))
        else:
            result = fit_and_test(tree)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
