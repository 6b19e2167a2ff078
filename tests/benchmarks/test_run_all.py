"""Smoke tests of the benchmark harness on tiny inputs (no peers, no training)."""

from __future__ import annotations

import pytest

from benchmarks import run_all
from benchmarks.common import steady_samples_per_s
from benchmarks.loop import ListStream, rate

pytestmark = pytest.mark.slow


def test_steady_rate_skips_warmup_epoch_and_epoch_ends():
    starts = [[0.0, 5.0, 9.0], [10.0, 11.0, 12.0, 50.0]]  # epoch 2: 3 intervals of 1 s... then an epoch end
    rows = [[8, 8, 8], [4, 4, 4, 2]]
    assert steady_samples_per_s(starts, rows) == pytest.approx(12 / 40)
    assert steady_samples_per_s([[0.0, 1.0, 2.0], [3.0, 4.0, 5.0]], [[4, 4, 4], [4, 4, 4]]) == pytest.approx(
        4.0
    )


def test_list_stream_and_rate():
    class FakeBatch:
        position = -1
        batch_size = 2

    stream = ListStream([FakeBatch() for _ in range(5)])
    assert len(stream) == 5 and [b.position for b in stream] == list(range(5))
    stream.mark_consumed(stream.batches[2])
    assert stream.state_dict() == {"consumed": 3}
    assert rate([0, 0, 0, 1.0, 2.0, 3.0], [2] * 6) == pytest.approx(2.0)


def test_report_renders(tmp_path, monkeypatch):
    monkeypatch.setattr(run_all, "RESULTS", tmp_path)
    system = {"samples_per_s": 100.0, "all_samples_per_s": [100.0], "rmse": 1.0, "auc": 0.7, "error": None}
    peer_row = {
        "tower": "mmoe",
        "batch_size": 4096,
        "reps": 1,
        "threads": 2,
        "towerrec": dict(system),
        "towerrec fp32": dict(system, samples_per_s=150.0),
        "torch-rechub": dict(system, samples_per_s=20.0),
        "DeepCTR-Torch": dict(system, samples_per_s=float("nan"), error="not installed"),
    }
    point = {
        "processes": 1,
        "batch_size": 256,
        "rows": None,
        "dim": 16,
        "samples_per_s": 10.0,
        "peak_rss_mib": [1.0],
    }
    sections = {
        "load_start": "0",
        "epochs": 2,
        "peers": [peer_row],
        "ceilings": {"sgemm_gflops_1t": 1.0},
        "breakdown": [{"tower": "mmoe", "threads": 2, "result": {"error": "boom"}}],
        "loop": [
            {
                "batch_size": 4096,
                "method": "interleaved",
                "lightning_step_ms": {"median": 20.9, "p25": 20.0, "p75": 23.0, "steps": 400},
                "bare_step_ms": {"median": 20.0, "p25": 19.0, "p75": 22.0, "steps": 410},
                "overhead": 20.9 / 20.0 - 1,
                "epoch_overheads": [0.02, 0.06, 0.10],
            },
        ],
        "scale": {
            "batch": [point],
            "tables": [],
            "processes": [],
            "budget": [{"processes": 1, "refused": "does not fit", "peak_rss_mib": [1.0]}],
        },
        "data": "| a | b |",
        "prototypes": {"as_is": 10.0, "gate_bmm": 20.0},
    }

    class Args:
        quick = True

    path = run_all.write_report({"cpus": "2"}, Args(), sections, 1.0)
    text = path.read_text()
    # default, fp32, bf16+compile (not run), rechub, deepctr (failed); ratios to the faster peer;
    # the target is judged on the default
    assert "| MMoE | 4096 | 2 | 1 | 2 | 100 | 150 | n/a | 20 | n/a | 5.00x, 7.50x, n/a | 5x met |" in text
    # Lightning overhead judged on the median step times (4.5%: met), per-pair ratios beside them
    assert (
        "| 4096 | 400 | 20.00 ms (19.00-22.00) | 20.90 ms (20.00-23.00) | +4.5% | +6.0% (+2.0% to +10.0%) "
        "| <= 5% met |" in text
    )
    assert (
        "refused" in text
        and "gate_bmm" in text
        and "DeepCTR-Torch mmoe batch 4096: **not installed**" in text
    )


def test_forced_bf16_is_not_run_on_a_cpu_without_native_bf16(monkeypatch, tmp_path):
    """On an AVX2-only CPU a forced bf16 step is emulated (~70x slower GEMMs): the bf16+compile
    column says why it is empty instead of timing it; the default (auto: fp32 there) still runs."""
    ran = []
    monkeypatch.setattr(run_all, "native_bf16", lambda device_type: False)
    monkeypatch.setattr(run_all, "run_ours", lambda *args: ran.append(args[5]) or {"samples_per_s": 1.0})
    monkeypatch.setattr(run_all, "run_peer", lambda *args: {"samples_per_s": 1.0})
    (row,) = run_all.speed_vs_peers(tmp_path, tmp_path, [("mmoe", 256, 1, 2, 2)], {})
    assert "bf16-mixed" not in ran and sorted(ran) == ["32-true", "auto"]
    assert row["towerrec bf16+compile"]["error"] == run_all.NOT_NATIVE_BF16
    assert row["towerrec"]["samples_per_s"] == 1.0
