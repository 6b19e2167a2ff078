"""Shared pieces of the benchmarks: the ML-100K benchmark task, machine facts, JSON child runs.

The benchmark task (identical for our trainer and the peers)::

    features  user_id, item_id, gender, age_bucket, occupation (one id each), genres (multi-hot, mean)
              every table 16-dim; no dense features
    tasks     rating (regression, MSE) and like = rating >= 4 (binary, BCE), loss weights 1 : 1
    towers    mmoe:          4 experts [64], gates, per-task heads [32]
              shared_bottom: bottom [128, 64], per-task heads [32]
    data      MovieLens 100K, canonical u1 split (train = u1.base less a 10% validation slice, test = u1.test)
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
ML100K_SOURCE = Path(os.environ.get("TOWERREC_ML100K", ROOT.parent / "shared" / "data" / "ml-100k"))
PEERS_DIR = Path(__file__).resolve().parent / ".peers"
SPARSE = ("user_id", "item_id", "gender", "age_bucket", "occupation")
MULTI_HOT = "genres"
EMBEDDING_DIM = 16
NUM_THREADS = 2
TOWERS = {
    "mmoe": {"num_experts": 4, "expert_dims": [64], "head_dims": [32]},
    "shared_bottom": {"bottom_dims": [128, 64], "head_dims": [32]},
}


# ------------------------------------------------------------------------------------------ machine
def machine_info() -> dict[str, str]:
    """CPU count and model, versions, git commit and date (for the results header)."""
    model = "?"
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    info = {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "cpus": str(os.cpu_count()), "cpu_model": model}
    try:
        info["git_commit"] = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            cwd=ROOT,
            timeout=10,
        ).stdout.strip()
        info["git_commit"] += " (+ uncommitted changes)" if dirty else ""
    except (OSError, subprocess.SubprocessError):
        info["git_commit"] = "unknown"
    import fbgemm_gpu
    import lightning
    import pyarrow
    import torch
    import torchrec

    info.update(
        python=platform.python_version(),
        torch=torch.__version__,
        torchrec=torchrec.__version__,
        fbgemm_gpu=getattr(fbgemm_gpu, "__version__", "?"),
        lightning=lightning.__version__,
        pyarrow=pyarrow.__version__,
    )
    return info


# ------------------------------------------------------------------------------------------ data
def prepare_ml100k(out: Path) -> Path:
    """Converts ML-100K u1 with our converter, once: train = u1.base minus the product config's 10%
    validation slice (71,994 rows), test = u1.test (20,000 rows)."""
    from towerrec.data.config import PrepareConfig
    from towerrec.data.dataset import is_complete
    from towerrec.data.prepare import prepare

    if not is_complete(out):
        cfg = PrepareConfig(format="movielens100k", source=str(ML100K_SOURCE), split="u1", val_fraction=0.1)
        prepare(cfg, str(out))
    return out


def export_arrays(dataset: Path, out: Path) -> Path:
    """The train and test splits as plain numpy arrays for the peers (``.npz``; genres padded with 0,
    ids start at 1 so 0 is free for padding)."""
    import pyarrow.parquet as pq

    arrays = {}
    for split in ("train", "test"):
        table = pq.read_table(dataset / split, columns=[*SPARSE, MULTI_HOT, "rating", "click"])
        for name in SPARSE:
            arrays[f"{split}/{name}"] = table.column(name).to_numpy().astype(np.int64)
        genres = table.column(MULTI_HOT).combine_chunks()
        offsets = genres.offsets.to_numpy()
        values = genres.values.to_numpy()
        lengths = np.diff(offsets)
        padded = np.zeros((len(lengths), 6), dtype=np.int64)
        for j in range(6):
            have = lengths > j
            padded[have, j] = values[offsets[:-1][have] + j]
        arrays[f"{split}/{MULTI_HOT}"] = padded
        arrays[f"{split}/rating"] = table.column("rating").to_numpy().astype(np.float32)
        arrays[f"{split}/like"] = table.column("click").to_numpy().astype(np.float32)
    vocab = {
        name: int(max(arrays[f"train/{name}"].max(), arrays[f"test/{name}"].max())) + 1
        for name in (*SPARSE, MULTI_HOT)
    }
    np.savez(out, **arrays)
    out.with_suffix(".json").write_text(json.dumps(vocab))
    return out


def steady_samples_per_s(
    step_starts: list[list[float]], step_rows: list[list[int]], skip_epochs: int = 1
) -> float:
    """Training-loop samples/s from per-epoch lists of step start times: the interval from one step's
    start to the next step's start (data + forward + backward + optimizers + loop), within epochs
    after the first ``skip_epochs`` (warm-up); epoch boundaries (checkpoints, evaluation) are excluded."""
    rows = seconds = 0.0
    for starts, sizes in list(zip(step_starts, step_rows))[skip_epochs:]:
        for k in range(len(starts) - 1):
            seconds += starts[k + 1] - starts[k]
            rows += sizes[k]
    return rows / seconds if seconds else float("nan")


def run_json(command: list[str], timeout: float, env: dict | None = None) -> dict:
    """Runs a child that prints one JSON object on its last stdout line; returns it (or an error)."""
    child_env = {**os.environ, "OMP_NUM_THREADS": str(NUM_THREADS), "PYTHONPATH": str(ROOT), **(env or {})}
    try:
        done = subprocess.run(
            command, capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=child_env
        )
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s: {' '.join(command[:4])}"}
    lines = [line for line in done.stdout.strip().splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        return {"error": f"exit {done.returncode}: {' | '.join(tail)}"}
    return json.loads(lines[-1])


def python() -> str:
    return sys.executable
