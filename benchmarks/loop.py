"""Lightning overhead: our trainer vs a bare TorchRec loop on the same pre-materialised batches.

    python -m benchmarks.loop --data DIR --tower mmoe --batch-size 4096 --steps 40 --mode lightning|bare [--threads 1]
    python -m benchmarks.loop --data DIR --steps 40 --mode interleaved --epochs 12

Both build the same DMP (``MultiTaskModule.build_model()`` + ``shard_model``, 1-process gloo group)
with the same optimizers, and time step-start to step-start intervals after the first 3 steps, in
wall-clock time and in this process's CPU time. With one thread the CPU time is the work the loop
does, whatever else runs on the machine; wall-clock time also counts the time the OS gave others.
``lightning`` runs ``towerrec.trainer.build.build`` with the training stream replaced by an in-memory list
(``ListStream``); ``bare`` runs ``benchmarks.breakdown.bare_step`` in a for loop.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time

WARMUP_STEPS = 3


class ListStream:
    """Stands in for ``BatchStream``: yields pre-built batches (positions set), same interface."""

    def __init__(self, batches: list):
        self.batches = batches
        for position, batch in enumerate(batches):
            batch.position = position
        self.consumed = 0
        self.skipped_bad_rows = 0

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self):
        return iter(self.batches)

    def mark_consumed(self, batch_or_position) -> None:
        """Accepts a Batch (older trainer) or its position (trainer since the pipelined mode)."""
        position = getattr(batch_or_position, "position", batch_or_position)
        self.consumed = position + 1

    def state_dict(self) -> dict:
        return {"consumed": self.consumed}

    def load_state_dict(self, state: dict) -> None:
        self.consumed = state["consumed"]


def rate(starts: list[float], rows: list[int]) -> float:
    starts, rows = starts[WARMUP_STEPS:], rows[WARMUP_STEPS:]
    return sum(rows[:-1]) / (starts[-1] - starts[0])


def rates(starts: list[float], cpu_starts: list[float], rows: list[int]) -> dict:
    """Samples per second and per CPU-second, and each timed step's milliseconds (after warm-up)."""
    timed = starts[WARMUP_STEPS:]
    return {
        "samples_per_s": rate(starts, rows),
        "samples_per_cpu_s": rate(cpu_starts, rows),
        "step_ms": [(end - start) * 1e3 for start, end in zip(timed, timed[1:])],
    }


def fit_on_batches(cfg, batches: list, callbacks: list):
    """Trains with ``towerrec.trainer.build.build`` on ``batches`` (in memory) and returns the step timer."""
    from benchmarks.ours import step_timer
    from towerrec.trainer.build import build
    from towerrec.trainer.run import finish

    timer = step_timer()
    trainer, module, datamodule, _ = build(cfg, extra_callbacks=[timer, *callbacks])
    stream = ListStream(batches)
    datamodule.train_stream = stream
    datamodule.train_dataloader = lambda: stream
    trainer.fit(module, datamodule=datamodule)
    finish()
    return timer


def run_lightning(cfg, batches: list) -> dict[str, float]:
    timer = fit_on_batches(cfg, batches, [])
    return rates(timer.starts[0], timer.cpu_starts[0], timer.rows[0])


def run_bare(cfg, batches: list, num_embeddings) -> dict[str, float]:
    import torch

    from benchmarks.breakdown import build_dmp

    torch.set_num_threads(cfg.trainer.num_threads)
    torch.manual_seed(cfg.seed)
    _, dmp, optimizer = build_dmp(cfg, num_embeddings)
    return bare_epoch(dmp, optimizer, batches)


def bare_epoch(dmp, optimizer, batches: list) -> dict[str, float]:
    from benchmarks.breakdown import bare_step

    starts, cpu_starts, rows = [], [], []
    for batch in batches:
        starts.append(time.perf_counter())
        cpu_starts.append(time.process_time())
        rows.append(batch.batch_size)
        bare_step(dmp, optimizer, batch)
    starts.append(time.perf_counter())
    cpu_starts.append(time.process_time())
    rows.append(0)
    return rates(starts, cpu_starts, rows)


def run_interleaved(cfg, batches: list, num_embeddings) -> dict:
    """Per epoch: the Lightning epoch's rates, then the bare loop's over the same batches."""
    import lightning as L
    import torch

    from benchmarks.breakdown import build_dmp

    class BareAfterEachEpoch(L.Callback):
        def __init__(self) -> None:
            self.model = None
            self.rates: list[dict[str, float]] = []

        def on_train_epoch_end(self, trainer, pl_module) -> None:
            if self.model is None:  # built inside fit: the trainer's process group exists by then
                with torch.random.fork_rng():
                    torch.manual_seed(cfg.seed)
                    self.model = build_dmp(cfg, num_embeddings)[1:]
            self.rates.append(bare_epoch(*self.model, batches))

    bare = BareAfterEachEpoch()
    timer = fit_on_batches(cfg, batches, [bare])
    lightning = [rates(*epoch) for epoch in zip(timer.starts, timer.cpu_starts, timer.rows)]
    result: dict = {"epochs": [], "warmup_epochs": 1}
    for ours, theirs in zip(lightning, bare.rates):
        result["epochs"].append(
            {
                mode: {k: v for k, v in r.items() if k != "step_ms"}
                for mode, r in (("lightning", ours), ("bare", theirs))
            }
        )
    # Steps disturbed by other work only get slower: the median step is the undisturbed one.
    for mode, runs in (("lightning", lightning), ("bare", bare.rates)):
        steps = sorted(ms for run in runs[1:] for ms in run["step_ms"])
        result[f"{mode}_step_ms"] = {
            "median": statistics.median(steps),
            "p25": steps[len(steps) // 4],
            "p75": steps[3 * len(steps) // 4],
            "steps": len(steps),
        }
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--tower", default="mmoe")
    parser.add_argument("--batch-size", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--mode", choices=("lightning", "bare", "interleaved"), required=True)
    parser.add_argument("--epochs", type=int, default=12, help="interleaved: epoch pairs")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: least noisy here)")
    args = parser.parse_args(argv)
    from benchmarks.breakdown import materialize
    from benchmarks.ours import config_tree, load
    from towerrec.data.dataset import DatasetMeta

    with tempfile.TemporaryDirectory() as run_dir:
        epochs = args.epochs if args.mode == "interleaved" else 1
        cfg = load(config_tree(args.data, args.tower, args.batch_size, epochs, run_dir, args.threads))
        num_embeddings = DatasetMeta.load(cfg.data.path).table_rows(cfg.data.sparse)
        batches = materialize(cfg, num_embeddings, args.steps)
        if args.mode == "lightning":
            result = run_lightning(cfg, batches)
        elif args.mode == "bare":
            result = run_bare(cfg, batches, num_embeddings)
        else:
            result = run_interleaved(cfg, batches, num_embeddings)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
