"""The README's "Train on an implicit log" block, run as written, in a fresh folder.

A user with a user,item,time CSV and no label copies that block into a shell: `init` must write a
retrieval config that `fit` trains as is, and `recommend --evaluate` must give lists in the file's
own ids and next-item metrics (both protocols) that beat popularity on the sample's planted
sequential signal.
"""

from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BLOCK = re.compile(r"<!-- implicit:start -->\s*```bash\n(.*?)```\s*<!-- implicit:end -->", re.S)


def implicit_block() -> str:
    found = BLOCK.search((REPO / "README.md").read_text())
    assert found, "README.md has no block between the implicit markers"
    return found.group(1)


@pytest.fixture(scope="module")
def implicit_run(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    folder = tmp_path_factory.mktemp("implicit")
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",  # towerrec, python
        "PYTHONUNBUFFERED": "1",
    }
    env.pop("PYTHONPATH", None)  # the installed package, as a user has it
    script = "set -euo pipefail\n" + implicit_block()
    result = subprocess.run(
        ["bash", "-c", script], cwd=folder, env=env, capture_output=True, text=True, timeout=1500
    )
    assert result.returncode == 0, f"{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    return folder, result


@pytest.mark.slow
def test_the_implicit_block_evaluates_next_items_by_both_protocols_beating_popularity(implicit_run):
    folder, result = implicit_run
    config = (folder / "plays.yaml").read_text()
    assert "objective: retrieval" in config and "split: leave_last_out" in config
    assert (
        "leave_last_out:" in result.stdout and "min_events_per_user" in result.stdout
    )  # users held out, said
    metrics = json.loads((folder / "recs.csv.metrics.json").read_text())
    for protocol in ("full", "sampled_100"):
        model, popularity = metrics[protocol]["model"], metrics[protocol]["popularity"]
        assert model["hit_rate@10"] > popularity["hit_rate@10"], (protocol, model, popularity)
        assert model["ndcg@10"] > popularity["ndcg@10"], (protocol, model, popularity)


@pytest.mark.slow
def test_the_implicit_block_lists_speak_the_files_ids(implicit_run):
    folder, _ = implicit_run
    with open(folder / "recs.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    with open(folder / "plays.csv", newline="") as handle:
        seen: dict[str, set[str]] = {}
        for row in csv.DictReader(handle):
            seen.setdefault(row["user"], set()).add(row["item"])
    item_key = "original_item" if "original_item" in rows[0] else "item"
    user_key = "original_user" if "original_user" in rows[0] else "user"
    lists: dict[str, list[str]] = {}
    for row in rows:
        lists.setdefault(row[user_key], []).append(row[item_key])
    assert len(lists) > 1000
    for user, items in lists.items():
        assert re.fullmatch(r"u\d{4}", user) and user in seen
        assert len(items) == 10 and len(set(items)) == 10
        assert all(re.fullmatch(r"i\d{4}", item) for item in items), items
