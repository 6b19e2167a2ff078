"""The GPU check's pieces that can run without a GPU."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import REPO


def test_gpu_check_script_parses_and_documents_its_steps():
    subprocess.run(["bash", "-n", "benchmarks/gpu_check.sh"], cwd=REPO, check=True)
    usage = subprocess.run(["bash", "benchmarks/gpu_check.sh"], cwd=REPO, capture_output=True, text=True)
    assert usage.returncode == 2 and "fbgemm-gpu 1.6.0 + torchrec 1.6.1" in usage.stdout


@pytest.mark.slow
def test_gpu_benchmark_runs_at_smoke_size_on_cpu():
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.gpu_bench", "--tiny", "--device", "cpu", "--steps", "3", "--warmup", "1"],
        cwd=REPO, capture_output=True, text=True, timeout=300, check=True,
    )  # fmt: skip
    report = json.loads(result.stdout[result.stdout.index("{") :])
    assert report["tables"] == 26 and report["samples_per_s"] > 0
    assert 0 < report["embedding_share_of_step"] < 1
