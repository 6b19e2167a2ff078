"""``trainer.precision: auto``: the dense part's precision, chosen from the hardware and the step's
size.

bf16 autocast halves the bytes and, on hardware with native bf16 matrix units (CUDA devices of
compute capability 8.0 or later, CPUs with AVX512-BF16 or AMX), runs the matmuls several times
faster, but it adds a cast of every weight and activation each step: it pays only once a step's
dense multiply-adds (per-rank batch x dense weights) reach ``AUTO_BF16_MIN_MACS``. Where bf16 is
only emulated (older GPUs, CPUs without AVX512-BF16/AMX) it is far slower than fp32, and ``auto``
never chooses it there. The measurements behind the threshold: ``python -m benchmarks.small_steps``,
benchmarks/results/SMALL_STEPS.md.

Autocast covers training steps only: evaluation and ``predict`` score in fp32, as the exported
model does (``MultiTaskModule.eval_predictions``). The choice is made once, before training, and
printed; set ``trainer.precision`` explicitly to pin it (a resumed run on other hardware may
otherwise choose differently).

``16-mixed`` (fp16 with a loss scale) is refused when the config is loaded: the scaled loss would
reach the embedding tables' optimizer, which runs inside backward, before any unscaling.
"""

from __future__ import annotations

import torch
from torch import nn

from towerrec.models.tables import dense_named_parameters

AUTO_BF16_MIN_MACS = 50_000_000
"""Dense multiply-adds per step (per rank) from which ``auto`` autocasts to bf16."""


def native_bf16(device_type: str) -> bool:
    """Whether this device runs bf16 matmuls natively, not emulated: on CUDA compute capability
    8.0 or later (``torch.cuda.is_bf16_supported`` counts emulation as support unless told not
    to), on a CPU AVX512-BF16 or AMX (without them a bf16 matmul is tens of times slower than
    fp32)."""
    if device_type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)
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
