"""The README's "train on your own CSV/Parquet" block, run as written, in a fresh folder.

A user copies that block into a shell: it must train from a raw CSV with string ids, and what it
gives back (lists, predictions, the exported client) must speak those ids.
"""

from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

REPO = Path(__file__).resolve().parents[1]
BLOCK = re.compile(r"<!-- quickstart:start -->\s*```bash\n(.*?)```\s*<!-- quickstart:end -->", re.S)


def quickstart_block() -> str:
    found = BLOCK.search((REPO / "README.md").read_text())
    assert found, "README.md has no quickstart block between the quickstart markers"
    return found.group(1)


@pytest.fixture(scope="module")
def quickstart(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    folder = tmp_path_factory.mktemp("quickstart")
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",  # towerrec, python
        "PYTHONUNBUFFERED": "1",
    }
    env.pop("PYTHONPATH", None)  # the installed package, as a user has it
    script = "set -euo pipefail\n" + quickstart_block()
    result = subprocess.run(
        ["bash", "-c", script], cwd=folder, env=env, capture_output=True, text=True, timeout=900
    )
    assert result.returncode == 0, f"{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    return folder, result


def test_quickstart_lists_speak_the_users_string_ids(quickstart):
    folder, _ = quickstart
    with open(folder / "recs.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    users = {row["original_user"] for row in rows}
    assert users == {"u0001", "u0002", "someone-new"}
    for user in users:
        items = [row["original_item"] for row in rows if row["original_user"] == user]
        assert len(items) == 5 and len(set(items)) == 5
        assert all(re.fullmatch(r"sku-\d{4}", item) for item in items), items


def test_quickstart_predictions_and_the_exported_client_agree_on_raw_rows(quickstart):
    folder, result = quickstart
    predictions = pq.read_table(folder / "predictions").to_pylist()
    first = predictions[0]
    assert {"row", "ts", "user", "item", "click_label", "click", "purchase_label", "purchase"} <= set(first)
    assert re.fullmatch(r"u\d{4}", first["user"]) and re.fullmatch(r"sku-\d{4}", first["item"])
    # the client scored the README's row (printed as a list of dicts)
    printed = result.stdout.strip().splitlines()[-1]
    assert re.fullmatch(r"\[\{'click': [0-9.e-]+, 'purchase': [0-9.e-]+\}\]", printed), printed

    # The same raw test rows through the client, in a process that never imports towerrec, give
    # the predictions `predict` wrote.
    with open(folder / "shop.csv", newline="") as handle:
        raw = {(r["ts"], r["user"], r["item"]): r for r in csv.DictReader(handle)}
    # ids never seen in training have no vocabulary entry: predictions name them null
    known = [p for p in predictions if p["user"] is not None and p["item"] is not None]
    assert len(known) > 0.9 * len(predictions)
    sample = known[:: max(1, len(known) // 200)]
    rows = [raw[(str(p["ts"]), p["user"], p["item"])] for p in sample]
    probe = (
        "import json, sys\n"
        "from client import Scorer\n"
        "rows = json.load(sys.stdin)\n"
        "scores = Scorer('.').score(rows)\n"
        "leaked = sorted(m for m in sys.modules if m.split('.')[0] in ('trainer', 'data', 'models', 'serving'))\n"
        "print(json.dumps({'scores': scores, 'leaked': leaked}))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    client = subprocess.run(
        [sys.executable, "-c", probe],
        cwd=folder / "export",
        input=json.dumps(rows),
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    answer = json.loads(client.stdout)
    assert answer["leaked"] == []
    for prediction, score in zip(sample, answer["scores"]):
        for task in ("click", "purchase"):
            assert score[task] == pytest.approx(prediction[task], abs=1e-5), (task, prediction)
