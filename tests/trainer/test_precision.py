"""``trainer.precision: auto``: bf16 autocast only where the hardware and the step's size pay for it."""

from __future__ import annotations

import pytest
import torch

import towerrec.trainer.precision as precision_module
from towerrec.trainer.config import load_config
from towerrec.trainer.precision import AUTO_BF16_MIN_MACS, dense_macs_per_sample, resolve_precision


def test_auto_autocasts_to_bf16_only_on_native_bf16_from_the_threshold(monkeypatch):
    monkeypatch.setattr(precision_module, "native_bf16", lambda device_type: True)
    macs = 30_000
    small = AUTO_BF16_MIN_MACS // macs - 1
    assert resolve_precision("auto", "cpu", small, macs)[0] == "32-true"
    assert resolve_precision("auto", "cpu", small + 2, macs)[0] == "bf16-mixed"
    assert resolve_precision("32-true", "cpu", 10**6, macs) == ("32-true", "set in the config")
    assert resolve_precision("bf16-mixed", "cpu", 1, macs)[0] == "bf16-mixed"
    monkeypatch.setattr(precision_module, "native_bf16", lambda device_type: False)
    chosen, why = resolve_precision("auto", "cpu", 10**6, macs)
    assert chosen == "32-true" and "no native bf16" in why


@pytest.mark.parametrize("major, native", [(7, False), (8, True), (9, True)])
def test_only_gpus_with_bf16_units_count_as_native(monkeypatch, major, native):
    """A V100 (compute capability 7.0) emulates bf16: torch.cuda.is_bf16_supported() says True there
    unless emulation is excluded; auto must not choose bf16 on it."""
    from types import SimpleNamespace

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=None: SimpleNamespace(major=major))
    monkeypatch.setattr(torch.cuda, "_check_bf16_tensor_supported", lambda device: True)  # emulation works
    monkeypatch.setattr(torch.version, "hip", None)
    assert torch.cuda.is_bf16_supported()  # what the default call says, emulation included
    assert precision_module.native_bf16("cuda") is native
    assert (resolve_precision("auto", "cuda", 2**20, 10**4)[0] == "bf16-mixed") is native


@pytest.mark.parametrize(
    "avx512_bf16, amx, native", [(False, False, False), (True, False, True), (False, True, True)]
)
def test_only_cpus_with_avx512_bf16_or_amx_count_as_native(monkeypatch, avx512_bf16, amx, native):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    assert precision_module.native_bf16("cpu") is native


def test_dense_multiply_adds_count_every_dense_matrix_and_no_table():
    from towerrec.models.builder import build_model

    cfg = load_config(
        "configs/default.yaml", ["model.tower=mmoe", "model.num_experts=3", "model.expert_dims=[8]"]
    )
    rows = {f.name: 1000 for f in cfg.data.sparse}
    model = build_model(sparse=cfg.data.sparse, num_dense=len(cfg.data.dense), tasks=cfg.tasks, model=cfg.model,
                        table_rows=rows, embedding_device="meta")  # fmt: skip
    expected = model.tower.experts.weights[0].numel()  # (3, in, 8): 3 experts' first layer
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            expected += module.weight.numel()
    assert dense_macs_per_sample(model) == expected
    assert expected < 1000 * 16  # no table counted


def resolved_precision(data: str, run_dir: str, native: bool, batch: int) -> str:
    """On a pool rank (the trainer sets environment variables, threads and a process group, which
    must not leak into the test process): the precision ``build`` hands to Lightning."""
    from tests.conftest import TINY_SYNTHETIC
    from towerrec.trainer.build import build

    cfg = load_config(
        "configs/default.yaml",
        [*TINY_SYNTHETIC, f"data.path={data}", f"run_dir={run_dir}", f"data.batch_size={batch}"],
    )
    assert cfg.trainer.precision == "auto"  # the default
    original, precision_module.native_bf16 = precision_module.native_bf16, lambda device_type: native
    try:
        trainer, *_ = build(cfg)
    finally:
        precision_module.native_bf16 = original  # the pool's rank runs later tests
    return trainer.precision


@pytest.mark.parametrize(
    "native, batch, chosen", [(True, 512, "32-true"), (True, 2**20, "bf16-mixed"), (False, 2**20, "32-true")]
)
def test_the_trainer_runs_the_resolved_precision(tiny_data, tmp_path, rank_pools, native, batch, chosen):
    assert rank_pools(1).run(resolved_precision, str(tiny_data), str(tmp_path), native, batch) == [chosen]


def scores_after_bf16_training(data: str, run_dir: str) -> dict[str, float]:
    """On a pool rank: trains 2 bf16 steps, then scores a test batch three ways; returns the largest
    differences from the fp32 forward."""
    from tests.conftest import TINY_SYNTHETIC
    from towerrec.models.heads import predictions
    from towerrec.trainer.build import build

    cfg = load_config(
        "configs/default.yaml",
        [*TINY_SYNTHETIC, f"data.path={data}", f"run_dir={run_dir}", "trainer.precision=bf16-mixed",
         "trainer.max_steps=2", "checkpoint.every_n_steps=0"],
    )  # fmt: skip
    trainer, module, datamodule, _ = build(cfg)
    trainer.fit(module, datamodule=datamodule)
    assert trainer.precision == "bf16-mixed"
    batch = next(iter(datamodule.test_dataloader()))
    module.eval()
    with torch.no_grad():
        fp32 = predictions(module(batch)[1], module.inner.output_kinds)
        with torch.autocast("cpu", dtype=torch.bfloat16):  # what Lightning wraps each step in
            scored = module.eval_predictions(batch)
            autocast = predictions(module(batch)[1], module.inner.output_kinds)
    return {
        "scored": float((scored - fp32).abs().max()),
        "autocast": float((autocast.float() - fp32).abs().max()),
    }


def test_evaluation_and_predict_score_in_fp32_after_bf16_training(tiny_data, tmp_path, rank_pools):
    """bf16 autocast trains; scoring (test, predict) runs fp32, as the exported model does."""
    (differences,) = rank_pools(1).run(scores_after_bf16_training, str(tiny_data), str(tmp_path))
    assert differences["scored"] == 0
    assert differences["autocast"] > 1e-5  # scoring under bf16 would differ
