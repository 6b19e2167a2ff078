"""`towerrec init`: a starter config decided from a file's columns, that loads and prepares as is."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from tests.conftest import run_cli
from towerrec.trainer.config import load_config


def survey_lines(num_rows: int = 2000, seed: int = 0) -> list[str]:
    """A headerless survey-like file with ', ' separators: '?' marks missing numbers, and a text
    column has a real 'NA' category."""
    rng = np.random.default_rng(seed)
    lines = []
    for row in range(num_rows):
        person = f"p{rng.integers(300):03d}"
        shop = f"s{rng.integers(40):02d}"
        region = ["north", "south", "NA"][int(shop[1:]) % 3]  # one region per shop
        age = "?" if rng.random() < 0.05 else str(int(rng.integers(18, 90)))
        income = f"{rng.lognormal(10, 1.5):.2f}"
        stars = int(rng.integers(1, 6))
        bought = int(rng.random() < 0.2)
        lines.append(f"{person}, {shop}, {region}, {age}, {income}, {stars}, {bought}, {1000 + row}")
    return lines


def test_init_decides_each_column_and_the_config_prepares_as_is(tmp_path):
    source = tmp_path / "survey.csv"
    source.write_text("\n".join(survey_lines()) + "\n")
    config = tmp_path / "survey.yaml"
    run_cli(["init", "--source", str(source), "--no-header", "--user", "c0", "--item", "c1",
             "--label", "c6", "--label", "c5", "--label", "liked=c5 >= 4", "--output", str(config)])  # fmt: skip
    text = config.read_text()
    assert "c3" in text and "filled with the sample median" in text  # '?' read as missing, not as text

    cfg = load_config(config, [f"data.path={tmp_path / 'data'}", f"run_dir={tmp_path / 'run'}"])
    prepare = cfg.data.prepare
    assert prepare.format == "csv" and prepare.csv.header is False and prepare.csv.delimiter == ","
    assert prepare.csv.null_values == ["?"] and not prepare.dedup
    tasks = {task.name: task for task in cfg.tasks}
    assert tasks["c6"].type == "binary" and tasks["liked"].type == "binary"
    assert tasks["c5"].type == "regression" and (tasks["c5"].min_value, tasks["c5"].max_value) == (1.0, 5.0)
    sparse = {feature.source_column: feature for feature in cfg.data.sparse}
    dense = {feature.source_column: feature for feature in cfg.data.dense}
    assert sparse["c0"].side == "user" and sparse["c1"].side == "item"
    assert sparse["c2"].side == "item"  # one region per shop: an item-side feature 'recommend' can use
    assert {"c3", "c4"} <= set(dense) and "c3" not in sparse
    assert dense["c4"].transform[0] == "log1p"  # heavy-tailed

    run_cli(["prepare", "--config", str(config), "--data.path", str(tmp_path / "data")])
    meta = json.loads((tmp_path / "data" / "metadata.json").read_text())
    assert (
        sum(end - start for pieces in meta["splits"].values() for _, start, end in pieces) == 2000
    )  # none dropped
    regions = pq.read_table(tmp_path / "data" / "vocabulary.c2.parquet").column("id").to_pylist()
    assert sorted(regions) == ["NA", "north", "south"]  # a text 'NA' is a category, not a missing value


def test_init_refuses_a_text_label_and_an_existing_config(tmp_path):
    source = tmp_path / "shop.csv"
    source.write_text("user,item,answer\nu1,i1,yes\nu2,i2,no\n")
    config = tmp_path / "shop.yaml"
    refused = run_cli(
        ["init", "--source", str(source), "--label", "answer", "--output", str(config)], check=False
    )
    assert refused.returncode == 2
    assert (
        "--label answer: the column holds text" in refused.stderr
        and "answer_yes=answer == 'yes'" in refused.stderr
    )
    config.write_text("# mine\n")
    again = run_cli(["init", "--source", str(source), "--label", "x=answer == 'yes'", "--output", str(config)],
                    check=False)  # fmt: skip
    assert again.returncode == 2 and "never writes over a config" in again.stderr
    assert config.read_text() == "# mine\n"


@pytest.mark.parametrize("entry", ["2x=click", "a b"])
def test_init_rejects_a_label_that_is_not_a_name(tmp_path, entry):
    source = tmp_path / "shop.csv"
    source.write_text("user,item,click\nu1,i1,1\nu2,i2,0\n")
    result = run_cli(["init", "--source", str(source), "--label", entry, "--output", str(tmp_path / "x.yaml")],
                     check=False)  # fmt: skip
    assert result.returncode == 2 and "a label is a column name or NAME=EXPRESSION" in result.stderr


def test_a_csv_with_a_byte_order_mark_and_crlf_lines_inits_and_prepares_as_written(tmp_path):
    """Excel's "CSV UTF-8": a byte-order mark before the first column's name, CRLF line ends."""
    from towerrec.trainer import cli

    lines = ["user,item,price,bought"] + [f"u{k % 30},i{k % 17},{k % 9}.5,{k % 2}" for k in range(400)]
    source = tmp_path / "marked.csv"
    source.write_bytes(b"\xef\xbb\xbf" + ("\r\n".join(lines) + "\r\n").encode())
    config = tmp_path / "marked.yaml"
    assert cli.main(["init", "--source", str(source), "--label", "bought", "--output", str(config)]) == 0
    assert "\ufeff" not in config.read_text()
    cfg = load_config(config)
    assert {feature.source_column for feature in cfg.data.sparse} >= {"user", "item"}
    assert cli.main(["prepare", "--config", str(config), "--data.path", str(tmp_path / "data")]) == 0
    users = pq.read_table(tmp_path / "data" / "vocabulary.user.parquet").column("id").to_pylist()
    assert sorted(users) == sorted(f"u{k}" for k in range(30))
