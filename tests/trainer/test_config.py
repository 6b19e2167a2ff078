"""Configs: every file in configs/ loads; bad keys, types and values are rejected naming the key."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from towerrec.trainer.config import ConfigError, dump_yaml, load_config, validate_for_device

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_config_file_loads_and_round_trips(path, tmp_path):
    cfg = load_config(path)
    assert (cfg.tasks or cfg.model.objective == "retrieval") and cfg.data.sparse
    dumped = tmp_path / "resolved.yaml"
    dumped.write_text(dump_yaml(cfg))
    assert load_config(dumped) == cfg
    validate_for_device(cfg, "cpu")


def test_config_headers_show_how_to_run_them():
    for path in CONFIGS:
        header = path.read_text().split("\n\n")[0]
        assert re.search(rf"towerrec (fit|plan) --config configs/{re.escape(path.name)}", header), path.name
        assert header.count("towerrec ") >= 2, f"{path.name}: give the command and one override example"


def test_overrides_and_base_merge():
    cfg = load_config("configs/movielens100k_mmoe.yaml", ["trainer.max_epochs=3", "model.num_experts=8"])
    assert cfg.model.tower == "mmoe" and cfg.model.num_experts == 8 and cfg.trainer.max_epochs == 3
    assert cfg.data.prepare.format == "movielens100k"  # from the base file


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["model.bogus=1"], r"model\.bogus: unknown key"),
        (["trainer.max_epochs=three"], r"trainer\.max_epochs: expected an integer, got 'three'"),
        (["model.alpha=1.5"], r"model\.alpha: must be in \[0, 1\], got 1\.5"),
        (["data.sparse.0.embedding_dim=-4"], r"data\.sparse\[0\]\.embedding_dim: must be > 0, got -4"),
        (
            ["model.tower=transformer"],
            r"model\.tower: 'transformer' is not one of shared_bottom, mmoe, ple, esmm",
        ),
        (["model.interaction=attention"], r"model\.interaction: 'attention' is not one of none, dot"),
        (["model.loss_balancing=magic"], r"model\.loss_balancing: 'magic' is not one of fixed, uncertainty"),
        (
            [
                "data.sparse=[{name: a, multi_hot: true, pooling: mean, table: t},"
                " {name: b, multi_hot: true, pooling: sum, table: t}]",
            ],
            r"data\.sparse\[1\]\.pooling: table 't' pools 'mean' for multi-hot feature 'a'",
        ),
        (["tasks.0.type=ranking"], r"tasks\[0\]\.type: 'ranking' is not one of regression, binary"),
        (["data.batch_size=0"], r"data\.batch_size: must be > 0"),
        (["sharding.sharding_types=[diagonal]"], r"sharding\.sharding_types\[0\]: 'diagonal' is not one of"),
        (["trainer.non_finite_loss=ignore"], r"trainer\.non_finite_loss: 'ignore' is not one of stop, skip"),
        (["recommend.task_weights={nope: 1.0}"], r"recommend\.task_weights: 'nope' is not one of"),
        (["model.embedding_l2=-0.1"], r"model\.embedding_l2: must be >= 0, got -0\.1"),
        (
            ["data.sparse.0.train_drop_prob=1.0"],
            r"data\.sparse\[0\]\.train_drop_prob: must be in \[0, 1\), got 1\.0",
        ),
        (
            ["data.sparse.0.train_drop_prob=0.2"],  # user_id: one id per row
            r"data\.sparse\[0\]\.train_drop_prob: only for multi_hot features with pooling: mean",
        ),
        (
            ["trainer.embedding_optimizer.weight_decay=0.01"],  # default type rowwise_adagrad
            r"trainer\.embedding_optimizer\.weight_decay: only the adam embedding optimizer applies it",
        ),
    ],
)
def test_bad_values_name_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config("configs/default.yaml", overrides)


def test_cpu_rejects_cuda_only_sharding():
    cfg = load_config("configs/default.yaml", ["sharding.table_constraints={t_user_id: [row_wise]}"])
    with pytest.raises(ConfigError, match=r"'row_wise' needs CUDA"):
        validate_for_device(cfg, "cpu")
    cfg = load_config("configs/default.yaml", ["trainer.embedding_optimizer.type=adam"])
    with pytest.raises(ConfigError, match=r"trainer\.embedding_optimizer\.type: adam needs CUDA"):
        validate_for_device(cfg, "cpu")
    validate_for_device(cfg, "cuda")
    validate_for_device(cfg, "cuda")


def test_missing_config_file():
    with pytest.raises(ConfigError, match=r"--config: nowhere\.yaml does not exist"):
        load_config("nowhere.yaml")


@pytest.mark.parametrize(
    "text,message",
    [
        # a second section would replace the first whole: the learning rate above would be lost
        ("trainer:\n  max_epochs: 3\n  dense_optimizer: {type: adam, lr: 0.01}\nmodel:\n  tower: mmoe\n"
         "trainer:\n  max_epochs: 2\n", "line 6: key 'trainer' is given twice (first on line 1)"),
        ("trainer:\n  max_epochs: 3\n  log_every_n_steps: 5\n  max_epochs: 4\n",
         "line 4: key 'max_epochs' is given twice (first on line 2)"),
        ("tasks:\n  - {name: ctr, type: binary, label: click, label: buy}\n",
         "line 2: key 'label' is given twice (first on line 2)"),
    ],
)  # fmt: skip
def test_a_key_given_twice_is_refused_naming_it_and_both_lines(tmp_path, text, message):
    path = tmp_path / "twice.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(err.value) == f"{path}: {message}; keep one"


def test_a_key_given_twice_in_a_base_file_or_an_override_is_refused(tmp_path):
    (tmp_path / "base.yaml").write_text("seed: 1\nseed: 2\n")
    (tmp_path / "top.yaml").write_text("base: base.yaml\nrun_dir: runs/x\n")
    with pytest.raises(
        ConfigError, match=re.escape(f"{tmp_path / 'base.yaml'}: line 2: key 'seed' is given twice")
    ):
        load_config(tmp_path / "top.yaml")
    with pytest.raises(
        ConfigError, match=r"override trainer.dense_optimizer: line 1: key 'lr' is given twice"
    ):
        load_config(None, ["trainer.dense_optimizer={type: adam, lr: 0.1, lr: 0.2}"])


def test_a_config_that_is_not_utf8_text_or_not_a_file_is_named_in_one_line(tmp_path):
    latin1 = tmp_path / "latin1.yaml"
    latin1.write_bytes("seed: 0\nrun_dir: runs/café\n".encode("latin-1"))
    binary = tmp_path / "model.pt"
    binary.write_bytes(b"PK\x03\x04\x00\x00\x08\x08\x00\xff\x00\x00")
    nul = tmp_path / "nul.yaml"
    nul.write_bytes(b"seed: 0\nrun_dir: a\x00b\n")
    for path, message in (
        (latin1, "line 2: byte 0xe9 is not UTF-8 text"),
        (binary, "line 1: byte 0xff is not UTF-8 text"),
        (nul, "line 2: not valid YAML (character '\\x00' is not allowed in YAML"),
        (tmp_path, "is a folder, not a YAML file"),
    ):
        with pytest.raises(ConfigError) as err:
            load_config(path)
        assert message in str(err.value) and str(path) in str(err.value) and "\n" not in str(err.value)


def test_trainer_num_threads_survives_lightnings_launcher(monkeypatch):
    """Lightning's launcher sets torch's threads to CPUs / processes unless OMP_NUM_THREADS is set."""
    import torch
    from lightning.fabric.utilities.distributed import _set_num_threads_if_needed, _suggested_max_num_threads

    from towerrec.trainer.distributed.environment import set_threads

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(
        torch, "set_num_threads", lambda n: monkeypatch.setattr(torch, "get_num_threads", lambda: n)
    )
    wanted = _suggested_max_num_threads(1) + 1  # what Lightning would not choose by itself
    set_threads(load_config("configs/default.yaml", [f"trainer.num_threads={wanted}"]).trainer.num_threads, 1)
    _set_num_threads_if_needed(num_processes=1)  # what Trainer.fit does when it launches
    assert torch.get_num_threads() == wanted


def test_background_decode_only_with_a_spare_cpu(monkeypatch):
    import torch

    from towerrec.trainer.datamodule import decode_in_background

    assert decode_in_background(True) and not decode_in_background(False)
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 1, 2, 3})
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert decode_in_background(None)  # 1 thread x 2 processes on 4 CPUs: 2 spare
        torch.set_num_threads(2)
        assert not decode_in_background(None)  # 2 x 2 = every CPU busy: decode inline
    finally:
        torch.set_num_threads(threads)


def test_mean_pooling_is_a_sum_divided_by_the_bag_size_on_one_kernel_group():
    """Every pooled table sums (one fbgemm kernel per rank, whatever the poolings); a mean-pooled
    bag is divided by its size in the model, so it equals nn.EmbeddingBag's mean (an empty bag: 0),
    and a single id on the same table is its row."""
    import torch
    from torchrec.modules.embedding_configs import PoolingType
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    from towerrec.models.builder import build_model, embedding_tables

    cfg = load_config(
        "configs/default.yaml",
        [
            "data.sparse=[{name: item_id, table: t_items}, {name: history, multi_hot: true, pooling: mean, table: t_items},"
            " {name: tags, multi_hot: true}]",
            "data.dense=[]",
        ],
    )
    rows = {"item_id": 10, "history": 10, "tags": 7}
    assert {t.pooling for t in embedding_tables(cfg.data.sparse, rows)} == {PoolingType.SUM}
    model = build_model(sparse=cfg.data.sparse, num_dense=0, tasks=cfg.tasks, model=cfg.model, table_rows=rows,
                        embedding_device="cpu")  # fmt: skip
    assert model.mean_pooled == ["history"]
    sparse = KeyedJaggedTensor(
        keys=["item_id", "history", "tags"],
        values=torch.tensor([3, 5, 1, 2, 4, 9, 6, 0, 1, 0]),
        lengths=torch.tensor([1, 1, 1, 3, 0, 2, 1, 1, 0]),
    )
    seen = {}
    model.interaction.register_forward_hook(lambda module, args, out: seen.update(features=args[0]))
    model.eval()(sparse, torch.zeros(3, 0))
    item, history, tags = seen["features"]
    weights = {
        t.name: model.embeddings.embedding_bags[t.name].weight
        for t in embedding_tables(cfg.data.sparse, rows)
    }
    t_items = weights["t_items"].detach()
    torch.testing.assert_close(item, t_items[[3, 5, 1]])
    expected = torch.nn.functional.embedding_bag(
        torch.tensor([2, 4, 9, 6, 0]), t_items, torch.tensor([0, 3, 3]), mode="mean"
    )
    torch.testing.assert_close(history, expected)
    assert not history[1].any()  # the empty bag
    t_tags = weights[next(n for n in weights if n != "t_items")].detach()
    torch.testing.assert_close(tags, torch.stack([t_tags[1], t_tags[0], torch.zeros(t_tags.shape[1])]))


@pytest.mark.parametrize(
    "overrides,message",
    [
        (
            ["tasks=[{name: ctr, label: click}]"],
            "tasks: model.objective: retrieval trains on the rows as positives",
        ),
        (["recommend.item_feature=nothing"], "recommend.item_feature: 'nothing' must be a single-valued"),
        (["model.sequence.encoder=din"], "model.sequence.encoder: din attends from a candidate item"),
        (["data.sparse.0.side=null"], "user have no side"),
        (["model.retrieval.all_positions=true", "model.sequence.encoder=mean"], "needs one history"),
        (["model.retrieval.in_batch_negatives=false"], "leaves no negatives"),
        (["model.retrieval.temperature=0"], "model.retrieval.temperature"),
    ],
)
def test_retrieval_configs_are_checked_naming_the_key(overrides, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config("configs/sessions_retrieval.yaml", overrides)


def test_retrieval_with_item_side_features_refuses_sampled_negatives():
    tree = ["data.sparse.1.side=item", "model.retrieval.num_sampled_negatives=8"]
    load_config("configs/sessions_retrieval.yaml", tree[:1])  # an id-only item tower: fine
    with pytest.raises(ConfigError, match="item tower must read the item id alone"):
        load_config(
            "configs/sessions_retrieval.yaml",
            [
                *tree,
                "data.sparse=[{name: user, side: user}, {name: item, side: item}, {name: item_cat, column: item, side: item}]",
            ],
        )
