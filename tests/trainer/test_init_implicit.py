"""`towerrec init` on implicit logs (no label: a retrieval config), on logs ordered by a position
in each user's sequence, on logs with sampled negatives, and on a label with one value."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import yaml

from tests.conftest import run_cli
from towerrec.data.config import DataConfig
from towerrec.data.prepare import prepare
from towerrec.data.samples import implicit_log, write_csv
from towerrec.trainer.config import Config, load_config
from towerrec.trainer.dataset_setup import input_schema
from towerrec.trainer.typed_config import build_dataclass


def init(tmp_path: Path, source: Path, *flags: str, check: bool = True):
    config = tmp_path / f"{source.stem}.yaml"
    result = run_cli(["init", "--source", str(source), "--output", str(config), *flags], check=check)
    return config, result


def prepare_data_section(config: Path, tmp_path: Path):
    """Prepares what the config's ``data`` section describes, as ``fit`` would (the model section
    is the trainer's to load)."""
    tree = yaml.safe_load(config.read_text())
    tree["data"]["path"] = str(tmp_path / "data")
    tree["data"]["prepare"]["source"] = str(tmp_path / tree["data"]["prepare"]["source"])
    cfg = Config(data=build_dataclass(DataConfig, tree["data"], "data"), tasks=[])
    return prepare(cfg.data.prepare, cfg.data.path, input_schema(cfg))


def test_init_without_a_label_writes_the_retrieval_config_and_its_data_prepares(tmp_path):
    table = implicit_log(num_rows=3000, num_users=150, num_items=80, seed=1)
    rows = table.to_pylist()
    rows[5]["item"] = None  # an empty item cell: dropped and counted, as the config says
    source = tmp_path / "plays.csv"
    write_csv(table.from_pylist(rows, schema=table.schema), source)
    config, result = init(tmp_path, source)
    assert "a retrieval config for an implicit log" in result.stdout
    text = config.read_text()
    assert (
        f"towerrec fit --config {config}" in text
        and f"towerrec recommend --config {config} --k 10 --evaluate" in text
    )
    tree = yaml.safe_load(text)
    prepare_section = tree["data"]["prepare"]
    assert {k: prepare_section[k] for k in ("split", "min_events_per_user", "time_column", "user_column")} == {
        "split": "leave_last_out", "min_events_per_user": 3, "time_column": "ts", "user_column": "user"}  # fmt: skip
    assert prepare_section["histories"] == [
        {"name": "hist_items", "column": "item", "max_length": 50, "events": "all"}
    ]
    assert prepare_section["missing_sparse"] == "drop"
    sparse = {f["name"]: f for f in tree["data"]["sparse"]}
    assert sparse["user"]["side"] == "user" and sparse["item"]["side"] == "item"
    assert sparse["hist_items"] == {"name": "hist_items", "side": "user", "embedding_dim": 32, "sequence": True,
                                    "table": "t_item", "candidate": "item", "max_length": 50}  # fmt: skip
    assert sparse["item"]["table"] == "t_item" and sparse["item"]["embedding_dim"] == 32
    assert tree["tasks"] == [] and tree["model"]["objective"] == "retrieval"
    assert tree["model"]["retrieval"] == {"dim": 64, "temperature": 0.05, "num_sampled_negatives": 0,
                                          "logq_correction": True, "all_positions": False}  # fmt: skip
    assert tree["model"]["sequence"]["encoder"] == "transformer"
    assert tree["recommend"] == {"user_feature": "user", "item_feature": "item", "k": 10}

    meta = prepare_data_section(config, tmp_path)
    assert meta.report["cleaning"]["sparse_missing_dropped"]["item"] == 1
    kept = [r for i, r in enumerate(rows) if i != 5]
    counts = {}
    for r in kept:
        counts[r["user"]] = counts.get(r["user"], 0) + 1
    users = ["<oov>", *meta.vocabulary("user").tolist()]
    items = ["<oov>", *meta.vocabulary("item").tolist()]
    test = pq.read_table(meta.root / "test").to_pylist()
    assert sorted(users[r["user"]] for r in test) == sorted(u for u, n in counts.items() if n >= 3)
    by_user = {}
    for r in sorted(kept, key=lambda r: r["ts"]):
        by_user.setdefault(r["user"], []).append(r["item"])
    for r in test[:40]:  # the history is every earlier event (validation's included), oldest first
        events = by_user[users[r["user"]]]
        expected = [i if i in items else "<oov>" for i in events[:-1][-50:]]
        assert [items[i] for i in r["hist_items"]] == expected


def test_the_retrieval_config_init_writes_loads_with_its_towers(tmp_path):
    source = tmp_path / "plays.csv"
    write_csv(implicit_log(num_rows=600, num_users=40, num_items=30), source)
    config, _ = init(tmp_path, source)
    cfg = load_config(config)
    assert cfg.model.objective == "retrieval" and cfg.tasks == []
    sides = {f.name: f.side for f in cfg.data.sparse}
    assert sides == {"user": "user", "item": "item", "hist_items": "user"}


def position_log(path: Path, label: bool, negatives: int = 0, num_users: int = 40, seed: int = 0) -> Path:
    """user,item,pos[,rated]: pos counts each user's events from 0 (rows are not in order); with
    ``negatives``, each event has that many rated=0 rows at its position."""
    rng = np.random.default_rng(seed)
    lines = ["user,item,pos" + (",rated" if label else "")]
    for u in range(num_users):
        for pos in rng.permutation(int(rng.integers(2, 9))):
            item = int(rng.integers(30))
            lines.append(f"u{u},i{item},{pos}" + (",1" if label else ""))
            for other in rng.choice([i for i in range(30) if i != item], negatives, replace=False):
                lines.append(f"u{u},i{other},{pos},0")
    path.write_text("\n".join(lines) + "\n")
    return path


def test_init_orders_events_by_a_position_column_instead_of_a_time_split(tmp_path):
    config, _ = init(tmp_path, position_log(tmp_path / "seq.csv", label=False))
    prepare_section = yaml.safe_load(config.read_text())["data"]["prepare"]
    assert prepare_section["split"] == "leave_last_out" and prepare_section["time_column"] == "pos"
    assert "a position in each user's sequence" in config.read_text()
    # with a label too: the position is still the order of each user's events, not a time to cut at
    labelled = tmp_path / "labelled"
    labelled.mkdir()
    source = position_log(labelled / "seq.csv", label=True, negatives=2)
    config, _ = init(labelled, source, "--label", "rated")
    prepare_section = yaml.safe_load(config.read_text())["data"]["prepare"]
    assert prepare_section["split"] == "leave_last_out" and prepare_section["time_column"] == "pos"


def test_init_on_a_log_with_sampled_negatives_marks_the_interactions(tmp_path):
    source = position_log(tmp_path / "sampled.csv", label=True, negatives=3)
    config, _ = init(tmp_path, source, "--label", "rated")
    tree = yaml.safe_load(config.read_text())
    prepare_section = tree["data"]["prepare"]
    assert prepare_section["interaction_column"] == "rated"
    assert prepare_section["histories"] == [
        {"name": "hist_items", "column": "item", "where": "rated", "max_length": 50, "events": "all"}
    ]
    assert (
        tree["recommend"]["interaction_column"] == "rated" and tree["recommend"]["relevance_task"] == "rated"
    )

    cfg = load_config(config, [f"data.path={tmp_path / 'data'}", f"data.prepare.source={source}"])
    meta = prepare(cfg.data.prepare, cfg.data.path, input_schema(cfg))
    raw = pacsv.read_csv(source).to_pylist()
    last = {}
    for r in raw:
        last[r["user"]] = max(last.get(r["user"], -1), r["pos"])
    users = ["<oov>", *meta.vocabulary("user").tolist()]
    items = ["<oov>", *meta.vocabulary("item").tolist()]
    test = pq.read_table(meta.root / "test").to_pylist()
    for r in test:  # the last interaction of the user and its sampled rows, never another position
        assert int(r["pos"]) == last[users[r["user"]]]
    per_user = {}
    for r in test:
        per_user.setdefault(r["user"], []).append(r["rated"])
    assert all(sorted(flags) == [0.0, 0.0, 0.0, 1.0] for flags in per_user.values())
    positives = {(r["user"], r["pos"]): r["item"] for r in raw if r["rated"] == 1}
    for r in test:  # histories hold interactions only, in position order
        name = users[r["user"]]
        earlier = [positives[(name, p)] for p in range(int(r["pos"]))][-50:]
        assert [items[i] for i in r["hist_items"]] == [i if i in items else "<oov>" for i in earlier]


def test_init_on_a_click_log_without_shared_times_keeps_todays_config(tmp_path):
    lines = ["user,item,ts,click"] + [f"u{k % 30},i{k % 17},{1000 + k},{k % 3 == 0:d}" for k in range(900)]
    source = tmp_path / "clicks.csv"
    source.write_text("\n".join(lines) + "\n")
    config, _ = init(tmp_path, source, "--label", "click")
    tree = yaml.safe_load(config.read_text())
    assert tree["data"]["prepare"]["split"] == "time" and "histories" not in tree["data"]["prepare"]
    assert "interaction_column" not in tree["recommend"]


def test_init_refuses_a_constant_label_naming_the_column_and_its_value(tmp_path):
    source = tmp_path / "plays.csv"
    write_csv(implicit_log(num_rows=600, num_users=40, num_items=30), source)
    config, result = init(tmp_path, source, "--label", "click=ts > 0", check=False)
    assert result.returncode == 2
    assert re.search(
        r"--label click: derived: ts > 0; the value 1 on every one of the [\d,]+ sampled rows", result.stderr
    )
    assert not config.exists()


def test_init_without_a_label_needs_a_user_and_an_item(tmp_path):
    source = tmp_path / "numbers.csv"
    source.write_text("a,b\n" + "\n".join(f"{k},{k * 2}" for k in range(50)) + "\n")
    config, result = init(tmp_path, source, check=False)
    assert result.returncode == 2 and "needs a user and an item column (--user, --item)" in result.stderr
    assert not config.exists()


def test_init_without_a_label_on_a_log_with_sampled_negatives_trains_on_the_interactions(tmp_path):
    source = position_log(tmp_path / "sampled.csv", label=True, negatives=2)
    config, _ = init(tmp_path, source)
    tree = yaml.safe_load(config.read_text())
    prepare_section = tree["data"]["prepare"]
    assert prepare_section["interaction_column"] == "rated" and prepare_section["time_column"] == "pos"
    assert prepare_section["histories"][0]["where"] == "rated"
    assert tree["data"]["sample_weight_column"] == "rated"  # weight 0: the sampled rows are no positives
    assert tree["recommend"]["interaction_column"] == "rated"
    assert "rated" not in {f["name"] for f in tree["data"]["sparse"]}
    meta = prepare_data_section(config, tmp_path)
    test = pq.read_table(meta.root / "test", columns=["user", "rated"]).to_pylist()
    assert sum(r["rated"] for r in test) == len({r["user"] for r in test})  # one interaction per user
