"""``trainer.precision: auto``: the dense part's precision, chosen from the hardware and the step's
size.

bf16 autocast halves the bytes and, on hardware with native bf16 matrix units (CUDA with bf16,
CPUs with AVX512-BF16 or AMX), runs the matmuls several times faster, but it adds a cast of every
weight and activation each step. Measured on the benchmark towers (2 threads, AVX512-BF16;
``python -m benchmarks.small_steps``, benchmarks/results/SMALL_STEPS.md), bf16 is 1.03-1.21x
slower per step at 256-512 rows, about even at 1024 and faster from 2048 (0.75-0.88x the fp32
step): it pays once a step's dense multiply-adds (per-rank batch × dense weights) reach about 5e7.

Autocast covers training steps only: evaluation and ``predict`` score in fp32, as the exported
model does (``MultiTaskModule.eval_predictions``). The choice is made once, before training, and
printed; set ``trainer.precision`` explicitly to pin it (a resumed run on other hardware may
otherwise choose differently).
"""

from __future__ import annotations

import torch
from torch import nn

from towerrec.models.tables import dense_named_parameters

AUTO_BF16_MIN_MACS = 50_000_000
"""Dense multiply-adds per step (per rank) from which ``auto`` autocasts to bf16."""


def native_bf16(device_type: str) -> bool:
    """Whether this device runs bf16 matmuls natively (not emulated in fp32)."""
    if device_type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


def dense_macs_per_sample(model: nn.Module) -> int:
    """Multiply-adds per sample of the dense part: one per weight of every matrix (embedding
    tables excluded; attention over a sequence costs more than its weights, so this is a floor)."""
    return sum(
        p.numel()
        for name, p in dense_named_parameters(model)
        if p.dim() >= 2 and not any(part.startswith("bias") for part in name.split("."))
    )


def resolve_precision(
    precision: str, device_type: str, batch_size: int, macs_per_sample: int
) -> tuple[str, str]:
    """(the Lightning precision to run, why): ``auto`` becomes ``bf16-mixed`` or ``32-true``."""
    if precision != "auto":
        return precision, "set in the config"
    macs = batch_size * macs_per_sample
    if not native_bf16(device_type):
        return "32-true", f"auto: this {device_type} has no native bf16 matmul"
    if macs < AUTO_BF16_MIN_MACS:
        return "32-true", (
            f"auto: {macs / 1e6:.0f}M dense multiply-adds a step (batch {batch_size}) are below "
            f"{AUTO_BF16_MIN_MACS / 1e6:.0f}M, where bf16's casts cost more than its faster matmuls"
        )
    return "bf16-mixed", (
        f"auto: native bf16 on this {device_type} and {macs / 1e6:.0f}M dense multiply-adds a step (batch {batch_size})"
    )
