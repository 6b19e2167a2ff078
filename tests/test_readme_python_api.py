"""The README's "Use it from Python" block, run as written on 2 CPU ranks: a tower of the user's own,
trained by Lightning's Trainer with towerrec's strategy, and tested."""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BLOCK = re.compile(r"<!-- python-api:start -->\s*```python\n(.*?)```\s*<!-- python-api:end -->", re.S)


@pytest.mark.slow
def test_the_python_api_example_trains_a_user_tower_on_two_ranks(tmp_path):
    found = BLOCK.search((REPO / "README.md").read_text())
    assert found, "README.md has no block between the python-api markers"
    (tmp_path / "my_tower.py").write_text(found.group(1))
    (tmp_path / "configs").symlink_to(REPO / "configs")
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}
    env.pop("PYTHONPATH", None)  # the installed package, as a user has it
    result = subprocess.run(
        [sys.executable, "my_tower.py"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    printed = [line for line in result.stdout.splitlines() if line.startswith("test metrics:")]
    assert len(printed) == 1, result.stdout[-2000:]  # rank 0 alone prints
    metrics = ast.literal_eval(printed[0].removeprefix("test metrics:").strip())
    assert metrics["ctr"]["auc"] > 0.6 and metrics["rating"]["rmse"] < 1.5, metrics
    assert "GLOBAL_RANK: 1, MEMBER: 2/2" in result.stderr + result.stdout  # the second rank trained too
