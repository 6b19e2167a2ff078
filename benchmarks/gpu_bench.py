"""One-device training benchmark on a DLRM-sized model (the GPU check runs it on an H200).

    python -m benchmarks.gpu_bench                       # CUDA: 26 sparse x 128, tables up to 10M rows, batch 16K
    python -m benchmarks.gpu_bench --tiny --device cpu   # smoke size, runs anywhere

The model is the product's: ``TrainingModel`` (MMoE tower, 2 binary tasks) sharded by the
trainer's planner (the GPU's own memory as budget) into ``DistributedModelParallel`` with the fused
row-wise Adagrad, trained by TorchRec's ``TrainPipelineSparseDist`` with Adam on the dense part and
bf16 autocast on a GPU with native bf16, batches copied from pinned memory. Batches are synthetic
(Zipf-like ids) and generated up front, so the figure is the training step, not the reader. Prints
JSON: samples/s, peak device memory, and the share of step time in embedding lookups (fbgemm
forward + backward kernels) vs everything else, from the profiler.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch
import torch.distributed as dist
from torchrec.distributed.train_pipeline import TrainPipelineSparseDist
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from towerrec.data.batch import Batch
from towerrec.data.config import DenseFeature, SparseFeature
from towerrec.models.builder import build_model
from towerrec.models.config import TaskConfig
from towerrec.trainer.config import Config, load_config
from towerrec.trainer.distributed.sharding import job_cluster, shard_model
from towerrec.trainer.module import TrainingModel
from towerrec.trainer.precision import native_bf16

TABLE_ROWS = (
    [10_000_000, 5_000_000, 2_000_000, 1_000_000] + [500_000] * 4 + [100_000] * 6 + [10_000] * 6 + [1_000] * 6
)


def make_config(tiny: bool, batch_size: int) -> Config:
    cfg = load_config(None, ["data.sparse=[{name: x}]", "tasks=[{name: ctr}]"])
    rows = [r // 10_000 + 10 for r in TABLE_ROWS] if tiny else TABLE_ROWS
    dim = 16 if tiny else 128
    cfg.data.sparse = [
        SparseFeature(name=f"C{i + 1}", num_embeddings=r, embedding_dim=dim) for i, r in enumerate(rows)
    ]
    cfg.data.dense = [DenseFeature(name=f"I{i + 1}") for i in range(13)]
    cfg.data.batch_size = batch_size
    cfg.tasks = [
        TaskConfig(name="ctr", type="binary", label="click"),
        TaskConfig(name="cvr", type="binary", label="conv"),
    ]
    cfg.model.tower = "mmoe"
    cfg.model.num_experts = 4 if tiny else 8
    cfg.model.expert_dims = [64] if tiny else [512, 256]
    cfg.model.head_dims = [32] if tiny else [128]
    return cfg


def synthetic_batches(cfg: Config, num: int, device: torch.device, generator: torch.Generator) -> list[Batch]:
    batches = []
    size = cfg.data.batch_size
    for _ in range(num):
        values = []
        for feature in cfg.data.sparse:
            skewed = torch.rand(size, generator=generator) ** 3  # popular ids are frequent
            values.append((skewed * feature.num_embeddings).long().clamp_max(feature.num_embeddings - 1))
        sparse = KeyedJaggedTensor(
            keys=[f.name for f in cfg.data.sparse],
            values=torch.cat(values),
            lengths=torch.ones(size * len(cfg.data.sparse), dtype=torch.int32),
        )
        labels = (torch.rand(size, 2, generator=generator) < 0.3).float()
        batches.append(
            Batch(
                sparse,
                torch.randn(size, 13, generator=generator),
                labels,
                torch.ones(size, 2),
                torch.ones(size),
                torch.arange(size),
            )
        )
    return batches


class _DenseOptimizer:
    def __init__(self, params):
        self.adam = torch.optim.Adam(params, lr=1e-3)

    def zero_grad(self):
        self.adam.zero_grad(set_to_none=True)

    def step(self):
        self.adam.step()


class _Pipeline(TrainPipelineSparseDist):
    """The model returns per-task loss sums and weight sums (2, T); back-propagate their mean losses."""

    def _backward(self, loss_sums: torch.Tensor) -> None:
        (loss_sums[0] / loss_sums[1].clamp_min(1e-12)).sum().backward()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch-size", type=int, default=16384)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--tiny", action="store_true", help="small tables and batch (smoke test)")
    args = parser.parse_args()
    batch_size = 512 if args.tiny else args.batch_size
    device = torch.device(args.device, 0) if args.device == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29517")
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=0, world_size=1)

    cfg = make_config(args.tiny, batch_size)
    torch.manual_seed(0)
    with torch.device(device):
        model = build_model(
            sparse=cfg.data.sparse, num_dense=13, tasks=cfg.tasks, model=cfg.model,
            table_rows={f.name: f.num_embeddings for f in cfg.data.sparse}, embedding_device="meta",
            model_class=TrainingModel,
        )  # fmt: skip
    tables = model.embeddings.embedding_bag_configs()
    cluster = job_cluster(cfg.sharding, world_size=1, local_world_size=1, device=device)  # the GPU's memory
    if device.type == "cpu":
        cluster.memory_gb_per_device = 64
    dmp, plan, _ = shard_model(
        model, tables=tables, sharding=cfg.sharding, embedding_optimizer=cfg.trainer.embedding_optimizer,
        batch_size=batch_size, cluster=cluster, process_group=dist.group.WORLD, device=device,
    )  # fmt: skip
    dense = [p for n, p in dmp.named_parameters() if "embedding_bags" not in n]
    pipeline = _Pipeline(dmp, _DenseOptimizer(dense), device, execute_all_batches=True)
    generator = torch.Generator().manual_seed(0)
    batches = [
        b.pinned_for(device) for b in synthetic_batches(cfg, 8, device, generator)
    ]  # as the trainer copies
    bf16 = device.type == "cuda" and native_bf16("cuda")  # as trainer.precision: auto at this size
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)

    def run(steps: int) -> None:
        it = (batches[i % len(batches)] for i in range(steps + 2))
        with autocast:
            for _ in range(steps):
                pipeline.progress(it)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    run(args.warmup)
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    run(args.steps)
    sync()
    elapsed = time.perf_counter() - start
    samples_per_s = args.steps * batch_size / elapsed

    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        run(5)
        sync()
    attr = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    events = prof.key_averages()
    total = sum(getattr(e, attr) for e in events) or 1.0
    embedding = sum(
        getattr(e, attr) for e in events if "embedding" in e.key.lower() or "fbgemm" in e.key.lower()
    )
    result = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "batch_size": batch_size,
        "bf16_autocast": bf16,
        "tables": len(tables),
        "embedding_parameters": sum(t.num_embeddings * t.embedding_dim for t in tables),
        "samples_per_s": round(samples_per_s),
        "step_ms": round(1000 * elapsed / args.steps, 2),
        "peak_device_memory_gb": round(torch.cuda.max_memory_allocated(device) / 1024**3, 2)
        if device.type == "cuda"
        else None,
        "embedding_share_of_step": round(embedding / total, 3),
        "dense_and_other_share_of_step": round(1 - embedding / total, 3),
        "reference_samples_per_s": {
            "torchrec_dlrm_a100_batch16k": 740_000,
            "mlperf_dlrm_dcnv2_per_h200": 1_900_000,
        },
        "plan": {
            name: f"{s.sharding_type}/{s.compute_kernel}" for p in plan.plan.values() for name, s in p.items()
        },
    }
    print(json.dumps(result, indent=1))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
