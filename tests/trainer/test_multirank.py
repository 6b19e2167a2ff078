"""Distributed invariants on in-process gloo ranks (``tests.multirank``), across the config matrix
towers × loss balancing × precision × train pipeline, on the product's own trainer.

The matrix is covered, not multiplied out: every tower × balancer pair is one cell, its pipeline
chosen so that each tower and each balancer runs under both pipelines (a Latin square); every cell
runs in fp32, and a few cells also in bf16-mixed, at least one per pipeline (bf16 matmuls are
emulated on CPUs without native bf16: a cell in bf16 costs as much as the whole cell in fp32 again).
Sequence encoders, resumes and the balancers' resumes are covered the same way.

For every cell, a 2-rank run trains K steps from the real reader and a 1-rank run trains on
the same global batches (each step: rank 0's batch, then rank 1's). Then:

- the dense replicas of the 2 ranks are bitwise identical;
- the 2-rank model (dense parameters and every embedding table) equals the 1-rank model within a
  tolerance stated from first principles: the 2-rank run may round differently, but by no more
  than two computations that are mathematically the same already differ. In fp32 that yardstick is
  the 1-rank run on the same global batches with the ranks' rows in the other order (same sums,
  another summation order), and the 2-rank run may differ by twice that, plus the worst-case
  rounding of a sum of the global batch's B rows relative to the update (B fp32 ulp, B × 2^-24, of
  the tensor's largest update: per-rank partial sums and the all-reduce add terms in another
  order), plus 2 ulp of the tensor's largest value. In bf16-mixed, matmul outputs and weight-gradient sums are rounded to 8
  bits: the 1-rank model carries one such rounding of each gradient sum, the 2-rank model one per
  rank's partial sum, so their difference may reach W + 1 = 3 roundings of the size that separates
  the 1-rank bf16 model from the 1-rank fp32 one (the yardstick), plus the rounding of a partial sum
  relative to the update: 4 bf16 ulp (4 × 2^-8) of the tensor's largest update.
- the lightning and sparse_dist pipelines give bitwise the same 2-rank model.

The configs use SGD for both the dense and the embedding optimizer so that the update is linear in
the gradient and the comparison tests the gradients themselves (Adam's first step is ~lr·sign(g),
which amplifies rounding of near-zero gradients); the stateful optimizers run identically on
identical gradients, which the replica and resume tests cover with the defaults. Tasks include a
masked task (conversion given click) and a sample weight column, so ranks hold different numbers of
counted rows: the loss must be normalised over the global batch, not per rank.
"""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import SESSIONS_CONFIG, TINY_SYNTHETIC, tiny_sessions_overrides
from tests.trainer import rank_jobs

pytestmark = pytest.mark.slow

NUM_STEPS = 3
BATCH_PER_RANK = 32
TOWERS = ("shared_bottom", "mmoe", "ple", "esmm")
BALANCERS = ("fixed", "uncertainty", "pcgrad", "gradnorm")
PIPELINES = ("lightning", "sparse_dist")
TASKS = (
    "[{name: rating, type: regression, label: rating, min_value: 1.0, max_value: 5.0},"
    " {name: ctr, type: binary, label: click}, {name: cvr, type: binary, label: conversion, mask: click}]"
)
ESMM_TASKS = (
    "[{name: ctr, type: binary, label: click}, {name: cvr, type: binary, label: conversion, mask: click},"
    " {name: ctcvr, type: binary, label: conversion}]"
)


def matrix_overrides(data, run_dir, tower: str, balancing: str, precision: str, pipeline: str) -> list[str]:
    overrides = [
        f"data.path={data}", *TINY_SYNTHETIC, f"run_dir={run_dir}", "data.val_split=null", "data.test_split=null",
        "data.validate_on_start=false",
        f"data.batch_size={BATCH_PER_RANK}", "data.sample_weight_column=user_activity",
        f"model.tower={tower}", f"model.loss_balancing={balancing}", "model.alpha=null",
        "model.num_levels=2", f"trainer.precision={precision}", f"trainer.train_pipeline={pipeline}",
        "trainer.dense_optimizer.type=sgd", "trainer.dense_optimizer.lr=0.05",
        "trainer.embedding_optimizer.type=sgd", "trainer.embedding_optimizer.lr=0.5",
        f"tasks={ESMM_TASKS if tower == 'esmm' else TASKS}",
    ]  # fmt: skip
    if tower == "esmm":
        overrides += ["model.esmm_ctr_task=ctr", "model.esmm_cvr_task=cvr", "model.esmm_ctcvr_task=ctcvr"]
    return overrides


def full_tables(rank_results: list[dict]) -> dict[str, np.ndarray]:
    """Every table assembled from the ranks' shards (row and column offsets)."""
    shards: dict[str, list] = {}
    for result in rank_results:
        for table, parts in result["tables"].items():
            shards.setdefault(table, []).extend(parts)
    tables = {}
    for table, parts in shards.items():
        rows = max(r + a.shape[0] for r, _, a in parts)
        cols = max(c + a.shape[1] for _, c, a in parts)
        full = np.full((rows, cols), np.nan, dtype=np.float32)
        for r, c, a in parts:
            full[r : r + a.shape[0], c : c + a.shape[1]] = a
        assert not np.isnan(full).any(), f"{table}: the shards do not cover the table"
        tables[table] = full
    return tables


def tensors(rank_results: list[dict]) -> dict[str, np.ndarray]:
    """Dense parameters (rank 0's replica) and full tables of a run, by name."""
    return {**rank_results[0]["dense"], **{f"table {k}": v for k, v in full_tables(rank_results).items()}}


def assert_close_within_rounding(
    actual: dict,
    expected: dict,
    yardstick: dict,
    initial: dict,
    roundings: int,
    update_ulps: float,
    what: str,
) -> None:
    """Per tensor: |actual - expected| <= roundings × |yardstick - expected|
    + update_ulps × max |expected - initial| + 2 ulp(max |expected|) (see the module docstring)."""
    assert actual.keys() == expected.keys()
    for name, value in expected.items():
        difference = np.abs(actual[name] - value).max()
        update = np.abs(value - initial[name]).max()
        allowed = (
            roundings * np.abs(yardstick[name] - value).max()
            + update_ulps * update
            + 2 * np.spacing(np.abs(value).max())
        )
        assert difference <= allowed, (
            f"{what}: {name} differs by {difference:.3g} from the 1-rank model, more than rounding "
            f"explains ({allowed:.3g}; largest update {update:.3g})"
        )


def covering_cells() -> list[tuple[str, str, str, tuple[str, ...]]]:
    """(tower, balancer, pipeline, precisions): each tower × balancer pair once; the pipeline
    alternates along rows and columns, so each tower and each balancer meets both pipelines twice;
    bf16-mixed in one cell of each pipeline (the towers with the most matmuls per task)."""
    cells = []
    for row, tower in enumerate(TOWERS):
        for column, balancing in enumerate(BALANCERS):
            pipeline = PIPELINES[(row + column) % 2]
            precisions = ("32-true", "bf16-mixed") if (tower, balancing) in BF16_CELLS else ("32-true",)
            cells.append((tower, balancing, pipeline, precisions))
    return cells


BF16_CELLS = {("ple", "gradnorm"), ("mmoe", "uncertainty")}  # sparse_dist and lightning (see above)


def test_the_covering_design_covers_every_pair_pipeline_and_precision():
    cells = covering_cells()
    assert sorted((t, b) for t, b, _, _ in cells) == sorted(itertools.product(TOWERS, BALANCERS))
    for axis, values in ((0, TOWERS), (1, BALANCERS)):
        for value in values:
            assert {c[2] for c in cells if c[axis] == value} == set(PIPELINES), value
    bf16 = [c for c in cells if "bf16-mixed" in c[3]]
    assert {c[2] for c in bf16} == set(PIPELINES) and len(bf16) == 2
    assert all(c[3][0] == "32-true" for c in cells)  # the bf16 yardstick is the fp32 model


@pytest.mark.parametrize(
    "tower,balancing,pipeline,precisions",
    covering_cells(),
    ids=lambda v: "+".join(v) if isinstance(v, tuple) else str(v),
)
def test_two_ranks_train_the_model_one_rank_would(
    rank_pools, tiny_data, tmp_path, tower, balancing, pipeline, precisions
):
    check_two_ranks_train_the_model_one_rank_would(
        rank_pools,
        lambda precision, pipe: matrix_overrides(tiny_data, tmp_path, tower, balancing, precision, pipe),
        pipeline,
        precisions=precisions,
    )


SEQUENCE_CELLS = {  # encoder settings × tower: each sequence encoder on the sharded unpooled tables
    "din": ("shared_bottom", ["model.sequence.encoder=din"]),
    "transformer": ("mmoe", ["model.sequence.encoder=transformer", "model.sequence.num_layers=2"]),
    "hstu": ("ple", ["model.sequence.encoder=transformer", "model.sequence.attention=pointwise"]),
}


def sequence_overrides(data, run_dir, encoder: str, precision: str, pipeline: str) -> list[str]:
    tower, settings = SEQUENCE_CELLS[encoder]
    return [
        *tiny_sessions_overrides(data), f"run_dir={run_dir}", "data.val_split=null", "data.test_split=null",
        "data.validate_on_start=false", f"data.batch_size={BATCH_PER_RANK}", f"model.tower={tower}",
        *settings, "model.num_levels=2", f"trainer.precision={precision}", f"trainer.train_pipeline={pipeline}",
        "trainer.dense_optimizer.type=sgd", "trainer.dense_optimizer.lr=0.05",
        "trainer.embedding_optimizer.type=sgd", "trainer.embedding_optimizer.lr=0.5",
    ]  # fmt: skip


SEQUENCE_COVER = [  # each encoder once, both pipelines, bf16-mixed on the transformer's attention
    ("din", "lightning", ("32-true",)),
    ("transformer", "sparse_dist", ("32-true", "bf16-mixed")),
    ("hstu", "sparse_dist", ("32-true",)),
]


@pytest.mark.parametrize(
    "encoder,pipeline,precisions",
    SEQUENCE_COVER,
    ids=lambda v: "+".join(v) if isinstance(v, tuple) else str(v),
)
def test_two_ranks_train_the_sequence_model_one_rank_would(
    rank_pools, tiny_sessions, tmp_path, encoder, pipeline, precisions
):
    """Histories through the sharded EmbeddingCollection (sharing the item table) and each encoder."""
    check_two_ranks_train_the_model_one_rank_would(
        rank_pools,
        lambda precision, pipe: sequence_overrides(tiny_sessions, tmp_path, encoder, precision, pipe),
        pipeline,
        config=SESSIONS_CONFIG,
        precisions=precisions,
    )


def check_two_ranks_train_the_model_one_rank_would(
    rank_pools, overrides_for, pipeline, config=rank_jobs.BASE_CONFIG, precisions=("32-true", "bf16-mixed")
):
    """``overrides_for(precision, pipeline)``: the config of the cell (see the module docstring)."""
    pool1, pool2 = rank_pools(1), rank_pools(2)
    models = {}
    for precision in precisions:
        overrides = overrides_for(precision, pipeline)
        two = pool2.run(rank_jobs.train, overrides, NUM_STEPS, config=config)
        for name in two[0]["dense"]:
            assert np.array_equal(two[0]["dense"][name], two[1]["dense"][name]), (
                f"{precision}: dense replica {name} differs between the ranks"
            )
        assert two[0]["global_step"] == NUM_STEPS
        (one,) = pool1.run(rank_jobs.train, overrides, NUM_STEPS, reference_world_size=2, config=config)
        assert [rows.tolist() for _, rows in one["steps"]] == [
            np.concatenate([a, b]).tolist() for (_, a), (_, b) in zip(two[0]["steps"], two[1]["steps"])
        ]
        models[precision] = (tensors(two), tensors([one]))
        initial = tensors([one["initial"]])
    fp32_two, fp32_one = models["32-true"]
    (reordered,) = pool1.run(
        rank_jobs.train,
        overrides_for("32-true", pipeline),
        NUM_STEPS,
        reference_world_size=2,
        reverse=True,
        config=config,
    )
    global_batch = 2 * BATCH_PER_RANK
    assert_close_within_rounding(
        fp32_two, fp32_one, tensors([reordered]), initial, 2, global_batch * 2.0**-24, "32-true"
    )
    if "bf16-mixed" in models:
        bf16_two, bf16_one = models["bf16-mixed"]
        assert_close_within_rounding(bf16_two, bf16_one, fp32_one, initial, 3, 4 * 2.0**-8, "bf16-mixed")
    if pipeline == "sparse_dist":  # the same model as Lightning's own step, bit for bit
        plain = pool2.run(rank_jobs.train, overrides_for("32-true", "lightning"), NUM_STEPS, config=config)
        for name, value in tensors(plain).items():
            assert np.array_equal(value, fp32_two[name]), f"sparse_dist vs lightning: {name} differs"


def resume_overrides(data, run_dir, balancing: str, pipeline: str, batch_size: int) -> list[str]:
    return [
        f"data.path={data}", *TINY_SYNTHETIC, f"run_dir={run_dir}", "data.val_split=null",
        "data.test_split=null", "data.validate_on_start=false", f"data.batch_size={batch_size}", "data.shuffle_window_rows=512",
        f"model.loss_balancing={balancing}", "model.alpha=null", "model.dropout=0.1",
        f"trainer.train_pipeline={pipeline}", "trainer.max_epochs=2", "checkpoint.every_n_steps=0",
        "trainer.log_every_n_steps=5", "trainer.check_replicas_every_n_steps=5",
    ]  # fmt: skip


def bitwise_equal(a: dict, b: dict) -> list[str]:
    return [name for name in a if not np.array_equal(a[name], b[name])]


@pytest.mark.parametrize(
    "balancing,pipeline",  # each balancer's state once, each pipeline's twice
    [
        ("fixed", "lightning"),
        ("uncertainty", "sparse_dist"),
        ("pcgrad", "lightning"),
        ("gradnorm", "sparse_dist"),
    ],
)
def test_interrupted_and_resumed_equals_uninterrupted_bit_for_bit(
    rank_pools, tiny_data, tmp_path, balancing, pipeline
):
    pool = rank_pools(2)
    straight = pool.run(
        rank_jobs.fit, resume_overrides(tiny_data, tmp_path / "straight", balancing, pipeline, 64)
    )
    interrupted = tmp_path / "interrupted"
    first = pool.run(
        rank_jobs.fit,
        [*resume_overrides(tiny_data, interrupted, balancing, pipeline, 64), "trainer.max_steps=13"],
    )
    assert first[0]["global_step"] == 13
    resumed = pool.run(rank_jobs.fit, resume_overrides(tiny_data, interrupted, balancing, pipeline, 64))
    assert resumed[0]["global_step"] == straight[0]["global_step"]
    for rank in range(2):
        assert bitwise_equal(resumed[rank]["dense"], straight[rank]["dense"]) == []
        assert not bitwise_equal(resumed[0]["dense"], resumed[1]["dense"]), "replicas differ"
    assert bitwise_equal(tensors(resumed), tensors(straight)) == []
    np.testing.assert_array_equal(resumed[0]["balance"], straight[0]["balance"])


@pytest.mark.parametrize("encoder,pipeline", [("din", "lightning"), ("transformer", "sparse_dist")])
def test_interrupted_and_resumed_sequence_model_equals_uninterrupted_bit_for_bit(
    rank_pools, tiny_sessions, tmp_path, encoder, pipeline
):
    def overrides(run_dir) -> list[str]:
        return [
            *tiny_sessions_overrides(tiny_sessions), f"run_dir={run_dir}", "data.val_split=null",
            "data.test_split=null", "data.validate_on_start=false", "data.batch_size=64",
            "data.shuffle_window_rows=512", f"model.sequence.encoder={encoder}", "model.sequence.dropout=0.1",
            "model.dropout=0.1", f"trainer.train_pipeline={pipeline}", "trainer.max_epochs=2",
            "checkpoint.every_n_steps=0",
        ]  # fmt: skip

    pool = rank_pools(2)
    straight = pool.run(rank_jobs.fit, overrides(tmp_path / "straight"), config=SESSIONS_CONFIG)
    interrupted = tmp_path / "interrupted"
    first = pool.run(rank_jobs.fit, [*overrides(interrupted), "trainer.max_steps=13"], config=SESSIONS_CONFIG)
    assert first[0]["global_step"] == 13
    resumed = pool.run(rank_jobs.fit, overrides(interrupted), config=SESSIONS_CONFIG)
    assert resumed[0]["global_step"] == straight[0]["global_step"] > 13
    assert bitwise_equal(tensors(resumed), tensors(straight)) == []
    assert any(name.startswith("sequence_encoders.") for name in resumed[0]["dense"])
    assert "table t_item" in tensors(resumed)


def rows_per_epoch(*runs: list[dict]) -> dict[int, np.ndarray]:
    epochs: dict[int, list] = {}
    for run in runs:
        for result in run:
            for epoch, rows in result["steps"]:
                epochs.setdefault(epoch, []).append(rows)
    return {epoch: np.sort(np.concatenate(rows)) for epoch, rows in epochs.items()}


@pytest.mark.parametrize(
    "first,second",
    [((2, 32), (1, 64)), ((1, 64), (2, 32)), ((2, 32), (2, 48)), ((2, 32), (1, 32))],
    ids=["2to1-same-global-batch", "1to2-same-global-batch", "2to2-other-batch", "2to1-half-global-batch"],
)
def test_resume_on_another_world_size_sees_every_row_once_per_epoch(
    rank_pools, tiny_data, tmp_path, first, second
):
    """(world size, batch per rank) before and after a mid-epoch interruption; 2 epochs."""
    from towerrec.data.dataset import DatasetMeta

    num_rows = DatasetMeta.load(tiny_data).num_rows("train")
    run_dir = tmp_path / "run"
    interrupted_at = 9
    before = rank_pools(first[0]).run(
        rank_jobs.fit,
        [
            *resume_overrides(tiny_data, run_dir, "fixed", "lightning", first[1]),
            f"trainer.max_steps={interrupted_at}",
        ],
    )
    after = rank_pools(second[0]).run(
        rank_jobs.fit, resume_overrides(tiny_data, run_dir, "fixed", "lightning", second[1])
    )
    epochs = rows_per_epoch(before, after)
    assert sorted(epochs) == [0, 1]
    for epoch, rows in epochs.items():
        np.testing.assert_array_equal(rows, np.arange(num_rows), err_msg=f"epoch {epoch}: not every row once")

    # steps: the ones before, the rest of epoch 0 in the new layout, then a full epoch of it
    def batches(rows: int, layout: tuple[int, int]) -> int:  # per rank: ceil(ceil(rows / W) / B)
        return math.ceil(math.ceil(rows / layout[0]) / layout[1])

    first_batches = batches(num_rows, first)
    second_rest = batches(num_rows - interrupted_at * first[0] * first[1], second)
    second_epoch = batches(num_rows, second)
    assert first_batches > interrupted_at
    assert after[0]["global_step"] == interrupted_at + second_rest + second_epoch
    if first[0] * first[1] == second[0] * second[1]:  # the same global batch: the straight run's steps
        straight = rank_pools(first[0]).run(
            rank_jobs.fit, resume_overrides(tiny_data, tmp_path / "straight", "fixed", "lightning", first[1])
        )
        assert after[0]["global_step"] == straight[0]["global_step"]


def test_the_replica_guard_names_the_first_parameter_that_diverged(rank_pools, tiny_data, tmp_path):
    overrides = [
        *resume_overrides(tiny_data, tmp_path / "run", "fixed", "lightning", 32),
        "trainer.check_replicas_every_n_steps=4", "trainer.max_steps=20", "checkpoint.resume=never",
    ]  # fmt: skip
    messages = rank_pools(2).run(rank_jobs.fit_with_desync, overrides, 6, "heads.units.1.bias")
    for message in messages:  # both ranks stop, at the first check after the nudge
        assert message.startswith(
            "step 8: the dense replicas differ between ranks: heads.units.1.bias on rank 1"
        )


def test_metrics_of_two_ranks_equal_one_process_on_the_same_predictions(rank_pools):
    """Each rank holds a random half of the rows (a user's rows on both ranks); the sums, the AUC
    histograms and the per-user AUCs cross ranks, never the rows of one rank to all."""
    from towerrec.trainer.metrics import task_metrics

    seed = 3
    per_rank = rank_pools(2).run(rank_jobs.sharded_metrics, seed)
    rows = rank_jobs.evaluation_rows(seed)
    single = task_metrics(
        rows["preds"],
        rows["labels"],
        rows["mask"],
        rows["weights"],
        *rank_jobs.EVALUATION_TASKS,
        rows["groups"],
    )
    assert per_rank[0] == per_rank[1]
    assert per_rank[0].keys() == single.keys()
    for task, values in single.items():
        assert per_rank[0][task].keys() == values.keys()
        for name, value in values.items():
            assert per_rank[0][task][name] == pytest.approx(value, rel=1e-12, abs=1e-15), f"{task}/{name}"
    assert single["ctr"]["gauc_users"] > 300 and "gauc" in single["cvr"]


# ----------------------------------------------------------------------------- dynamic ids
DYNAMIC_IDS = [  # user_id and item_id (300 users, 150 items in tiny_data) with maps that evict
    "data.sparse.0.id_mapping=dynamic", "data.sparse.0.dynamic={capacity: 100, evict_chunk: 8}",
    "data.sparse.1.id_mapping=dynamic", "data.sparse.1.dynamic={capacity: 70, policy: lfu}",
]  # fmt: skip


def assert_same_id_maps(a: dict, b: dict, what: str) -> None:
    assert a.keys() == b.keys() and a, what
    for name in a:
        assert np.array_equal(a[name], b[name]), f"{what}: dynamic_ids.{name} differs"


def evictions(result: dict) -> int:
    """Rows evicted so far in a run's id maps (meta[4] of each)."""
    return sum(int(v[4]) for k, v in result["dynamic_ids"].items() if k.endswith(".meta"))


def test_two_ranks_map_dynamic_ids_and_train_the_model_one_rank_would(rank_pools, tiny_data, tmp_path):
    """Each step's ids of both ranks go to one global update: the maps are bitwise identical on the
    ranks and to a 1-rank run's on the same global batches (in either row order), and the model
    (rows re-initialised when given to new ids) matches it within rounding."""
    num_steps = 8
    overrides = [
        *matrix_overrides(tiny_data, tmp_path, "shared_bottom", "fixed", "32-true", "lightning"), *DYNAMIC_IDS,
    ]  # fmt: skip
    two = rank_pools(2).run(rank_jobs.train, overrides, num_steps)
    for name in two[0]["dense"]:
        assert np.array_equal(two[0]["dense"][name], two[1]["dense"][name]), f"dense replica {name} differs"
    assert_same_id_maps(two[0]["dynamic_ids"], two[1]["dynamic_ids"], "rank 0 vs rank 1")
    assert evictions(two[0]) > 0, "the maps never evicted: the cell does not test row reuse"
    pool1 = rank_pools(1)
    (one,) = pool1.run(rank_jobs.train, overrides, num_steps, reference_world_size=2)
    (reordered,) = pool1.run(rank_jobs.train, overrides, num_steps, reference_world_size=2, reverse=True)
    assert_same_id_maps(two[0]["dynamic_ids"], one["dynamic_ids"], "2 ranks vs 1 rank")
    assert_same_id_maps(one["dynamic_ids"], reordered["dynamic_ids"], "1 rank vs 1 rank reordered")
    assert_close_within_rounding(
        tensors(two), tensors([one]), tensors([reordered]), tensors([one["initial"]]), 2,
        2 * BATCH_PER_RANK * 2.0**-24, "dynamic ids",
    )  # fmt: skip


def test_interrupted_and_resumed_dynamic_ids_equal_uninterrupted_bit_for_bit(rank_pools, tiny_data, tmp_path):
    def overrides(run_dir) -> list[str]:
        return [*resume_overrides(tiny_data, run_dir, "fixed", "lightning", 64), *DYNAMIC_IDS]

    pool = rank_pools(2)
    straight = pool.run(rank_jobs.fit, overrides(tmp_path / "straight"))
    interrupted = tmp_path / "interrupted"
    first = pool.run(rank_jobs.fit, [*overrides(interrupted), "trainer.max_steps=13"])
    assert first[0]["global_step"] == 13
    resumed = pool.run(rank_jobs.fit, overrides(interrupted))
    assert resumed[0]["global_step"] == straight[0]["global_step"] > 13
    assert evictions(first[0]) > 0 and evictions(straight[0]) > evictions(first[0])
    for rank in range(2):
        assert_same_id_maps(resumed[rank]["dynamic_ids"], straight[rank]["dynamic_ids"], f"rank {rank}")
        assert bitwise_equal(resumed[rank]["dense"], straight[rank]["dense"]) == []
    assert bitwise_equal(tensors(resumed), tensors(straight)) == []


@pytest.mark.parametrize("first,second", [((2, 32), (1, 64)), ((1, 64), (2, 32))], ids=["2to1", "1to2"])
def test_resume_with_dynamic_ids_on_another_world_size_keeps_every_ids_row(
    rank_pools, tiny_data, tmp_path, first, second
):
    """The maps and tables a resumed run starts from are the saved ones, whatever the number of
    ranks (every id keeps its row and its row's vector); the run then sees every row once per epoch."""
    from towerrec.data.dataset import DatasetMeta

    run_dir = tmp_path / "run"
    before = rank_pools(first[0]).run(
        rank_jobs.fit,
        [
            *resume_overrides(tiny_data, run_dir, "fixed", "lightning", first[1]),
            *DYNAMIC_IDS,
            "trainer.max_steps=9",
        ],
    )
    after = rank_pools(second[0]).run(
        rank_jobs.fit, [*resume_overrides(tiny_data, run_dir, "fixed", "lightning", second[1]), *DYNAMIC_IDS]
    )
    assert evictions(before[0]) > 0
    for rank, result in enumerate(after):
        assert_same_id_maps(
            result["initial"]["dynamic_ids"], before[0]["dynamic_ids"], f"loaded on rank {rank}"
        )
        assert_same_id_maps(result["dynamic_ids"], after[0]["dynamic_ids"], f"rank {rank} at the end")
    assert bitwise_equal(tensors([r["initial"] for r in after]), tensors(before)) == []
    num_rows = DatasetMeta.load(tiny_data).num_rows("train")
    for epoch, rows in rows_per_epoch(before, after).items():
        np.testing.assert_array_equal(rows, np.arange(num_rows), err_msg=f"epoch {epoch}: not every row once")


def test_rows_given_to_new_ids_restart_from_their_initial_values_on_every_shard(
    rank_pools, tiny_data, tmp_path
):
    """Rows reused after an eviction are re-initialised where they live (column-wise shards on 2
    ranks): weights back to the table's initial values of the row, row-wise Adagrad state zeroed."""
    overrides = [
        f"data.path={tiny_data}", *TINY_SYNTHETIC, f"run_dir={tmp_path}", "data.val_split=null",
        "data.test_split=null", "data.validate_on_start=false", f"data.batch_size={BATCH_PER_RANK}",
        "sharding.sharding_types=[column_wise]", *DYNAMIC_IDS,
    ]  # fmt: skip
    checked = rank_pools(2).run(rank_jobs.train_checking_resets, overrides, 12)
    for result in checked:
        assert result["reused"] > 0 and result["rows"] > 0, result
        assert result["wrong_weights"] == 0 and result["wrong_state"] == 0, result


DYNAMIC_SEQUENCE_IDS = [  # the item and its history share t_item, so they share one id map
    "data.sparse.1.id_mapping=dynamic", "data.sparse.1.dynamic={capacity: 100, evict_chunk: 4}",
    "data.sparse.2.id_mapping=dynamic", "data.sparse.2.dynamic={capacity: 100, evict_chunk: 4}",
]  # fmt: skip


@pytest.fixture(scope="module")
def dynamic_sessions(tmp_path_factory) -> Path:
    """``tiny_sessions``' click log prepared with raw item ids (history lists included)."""
    from towerrec.data.prepare import prepare
    from towerrec.data.samples import session_clicks, write_csv
    from towerrec.trainer.config import load_config
    from towerrec.trainer.dataset_setup import input_schema

    root = tmp_path_factory.mktemp("dynamic_sessions")
    write_csv(session_clicks(num_users=300, steps=10, num_items=120, seed=1), root / "sessions.csv")
    cfg = load_config(SESSIONS_CONFIG, [*tiny_sessions_overrides(root / "data"), *DYNAMIC_SEQUENCE_IDS])
    prepare(cfg.data.prepare, str(root / "data"), input_schema(cfg))
    return root / "data"


def test_two_ranks_map_dynamic_ids_of_histories_as_one_rank(rank_pools, dynamic_sessions, tmp_path):
    """Raw item ids in the candidate and in the history (an unpooled sequence table) go through one
    shared map: replicas and the 1-rank run on the same global batches agree."""
    from towerrec.data.dataset import DatasetMeta
    from towerrec.data.reader import StoredRows

    meta = DatasetMeta.load(dynamic_sessions)
    stored = StoredRows(meta, "train", ["item", "hist_items"]).take(np.arange(meta.num_rows("train")))
    items = set(stored.column("item").to_numpy().tolist())
    history = set(stored.column("hist_items").combine_chunks().flatten().to_numpy().tolist())
    assert meta.columns["hist_items"]["mapping"] == "dynamic" and history <= items | {-(2**63)}
    overrides = [
        *sequence_overrides(dynamic_sessions, tmp_path, "din", "32-true", "lightning"), *DYNAMIC_SEQUENCE_IDS,
        "data.batch_size=8",  # each row brings its item and up to 10 history items: ~100 distinct per step
    ]  # fmt: skip
    two = rank_pools(2).run(rank_jobs.train, overrides, 12, config=SESSIONS_CONFIG)
    assert_same_id_maps(two[0]["dynamic_ids"], two[1]["dynamic_ids"], "rank 0 vs rank 1")
    assert evictions(two[0]) > 0
    (one,) = rank_pools(1).run(rank_jobs.train, overrides, 12, reference_world_size=2, config=SESSIONS_CONFIG)
    assert_same_id_maps(two[0]["dynamic_ids"], one["dynamic_ids"], "2 ranks vs 1 rank")
    (reordered,) = rank_pools(1).run(
        rank_jobs.train, overrides, 12, reference_world_size=2, reverse=True, config=SESSIONS_CONFIG
    )
    assert_close_within_rounding(
        tensors(two), tensors([one]), tensors([reordered]), tensors([one["initial"]]), 2,
        2 * 8 * 2.0**-24, "dynamic ids of histories",
    )  # fmt: skip


@pytest.mark.parametrize("pipeline", PIPELINES)
def test_reading_the_step_outcome_after_backward_trains_the_same_model(
    rank_pools, tiny_data, tmp_path, pipeline
):
    """On CUDA the host reads whether a step's losses were finite only after backward was launched,
    the tables' gradients gated on the device (``MultiTaskModule.combined_loss``). Forced on these CPU
    ranks, that path trains bitwise the model of the read-before-backward path (PCGrad: its
    per-task all-reduce after the bucketed dense one)."""
    overrides = matrix_overrides(tiny_data, tmp_path, "mmoe", "pcgrad", "32-true", pipeline)
    before = rank_pools(2).run(rank_jobs.train, overrides, NUM_STEPS)
    after = rank_pools(2).run(rank_jobs.train_checking_after_backward, overrides, NUM_STEPS)
    assert [r["gated"] for r in before] == [False, False] and [r["gated"] for r in after] == [True, True]
    assert bitwise_equal(tensors(before), tensors(after)) == []


@pytest.mark.parametrize(
    "after_backward,pipeline", list(itertools.product((False, True), PIPELINES)), ids=str
)
def test_a_non_finite_step_on_one_rank_is_skipped_by_both_and_changes_nothing(
    rank_pools, tiny_data, tmp_path, after_backward, pipeline
):
    """Rank 0's batch 2 has infinite features: both ranks skip that step and no table or dense
    parameter moves (default optimizers: row-wise Adagrad tables, Adam dense), whether the outcome
    is read before backward or after it, the tables' gradients then zeroed on the device."""
    overrides = resume_overrides(tiny_data, tmp_path / "run", "fixed", pipeline, 32)
    results = rank_pools(2).run(rank_jobs.state_around_a_non_finite_step, overrides, 2, after_backward)
    for rank, result in enumerate(results):
        assert result["gated"] == after_backward and result["skipped"] and result["skipped_batches"] == 1
        assert result["global_step"] == 4  # training went on after the skipped batch
        before, after = result["before"], result["after"]
        assert bitwise_equal(before["dense"], after["dense"]) == [], f"rank {rank}: a dense parameter moved"
        for table, shards in before["tables"].items():
            for (_, _, old), (_, _, new) in zip(shards, after["tables"][table]):
                assert np.array_equal(old, new), f"rank {rank}: table {table} moved in the skipped step"


def test_dense_gradients_are_averaged_when_ranks_use_different_parameters(rank_pools):
    """A parameter unused by one rank's batch still goes through every rank's all-reduce (zeros for
    the missing gradient): the ranks neither hang nor disagree, and each gets the mean a single
    process would compute; a parameter no rank used keeps no gradient. When every parameter is used,
    every bucket's all-reduce starts during backward."""
    ranks = rank_pools(2).run(rank_jobs.reduce_partial_gradients)
    assert ranks[0]["num_buckets"] == 3
    assert ranks[1]["own"]["a"] is None and ranks[0]["own"]["a"] is not None
    expected = {
        "a": ranks[0]["own"]["a"] / 2,
        "b": (ranks[0]["own"]["b"] + ranks[1]["own"]["b"]) / 2,
    }
    for rank in ranks:
        assert rank["reduced"]["c"] is None
        for name, value in expected.items():
            np.testing.assert_allclose(rank["reduced"][name], value, rtol=1e-6)
    assert np.array_equal(ranks[0]["reduced"]["a"], ranks[1]["reduced"]["a"])
    assert [rank["started_during_backward"] for rank in ranks] == [3, 3]  # overlapped with backward


def test_gradient_buckets_do_not_depend_on_the_order_of_other_collectives_in_backward(rank_pools):
    """Rank 0's bucket of ``a`` starts before a collective that backward runs on the default group
    (as TorchRec's embedding gradients and retrieval's all-gather do); rank 1, whose batch leaves
    ``a`` unused, starts it after backward. In one group the two ranks would pair different
    collectives; the buckets' own group keeps them apart and every gradient is the mean."""
    ranks = rank_pools(2).run(rank_jobs.reduce_around_a_collective_in_backward)
    for rank in ranks:
        np.testing.assert_array_equal(rank["c"], [1.0, 3.0, 5.0, 7.0])  # (2 x0 + 2 x1) / 2
        np.testing.assert_array_equal(rank["a"], [0.0, 0.5, 1.0, 1.5])  # x0 / 2
