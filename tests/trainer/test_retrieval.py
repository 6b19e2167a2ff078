"""Two-tower retrieval (``model.objective: retrieval``): the sampled-softmax loss against a brute
force, and the distributed invariants on in-process gloo ranks (``tests.multirank``): 2 ranks × B
rows train the model 1 rank × 2B rows trains (candidates gathered across ranks with gradient),
identical replicas, and an interrupted run resumes bit for bit."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.conftest import IMPLICIT_CONFIG, tiny_implicit_overrides
from tests.trainer import rank_jobs
from tests.trainer.test_multirank import (
    BATCH_PER_RANK,
    bitwise_equal,
    check_two_ranks_train_the_model_one_rank_would,
    tensors,
)
from towerrec.models.retrieval import sampled_softmax_sums


def test_sampled_softmax_with_every_item_as_candidate_is_the_full_softmax():
    generator = torch.Generator().manual_seed(0)
    num_items, dim = 12, 5
    items = torch.nn.functional.normalize(torch.randn(num_items, dim, generator=generator), dim=1)
    users = torch.nn.functional.normalize(torch.randn(4, dim, generator=generator), dim=1)
    targets = torch.tensor([3, 0, 11, 3])
    zeros = torch.zeros(num_items)
    sums = sampled_softmax_sums(
        users, torch.ones(4), items[targets], targets, torch.zeros(4),
        items, torch.arange(num_items), zeros, torch.ones(num_items, dtype=torch.bool), temperature=0.1, k=1,
    )  # fmt: skip
    full = torch.nn.functional.cross_entropy(users @ items.T / 0.1, targets, reduction="sum")
    torch.testing.assert_close(sums[0, 0], full)
    assert sums[1, 0] == 4
    assert sums[2, 0] == ((users @ items.T).argmax(1) == targets).sum()  # hit@1


def test_logq_correction_and_padding_rows():
    """Each logit loses its candidate's log expected count; a candidate not valid (a padding row)
    and a candidate with the target's id (an accidental hit) are no negatives."""
    users = torch.tensor([[1.0, 0.0]])
    items = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8], [0.0, -1.0]])
    ids = torch.tensor([7, 8, 7, 9])  # candidate 2 is the target's item again
    log_counts = torch.tensor([0.5, 1.5, 0.5, -2.0])
    valid = torch.tensor([True, True, True, False])
    sums = sampled_softmax_sums(
        users, torch.tensor([2.0]), items[:1], ids[:1], log_counts[:1], items, ids, log_counts, valid, 1.0
    )
    positive = 1.0 - 0.5
    expected = torch.logsumexp(torch.tensor([positive, 0.0 - 1.5]), 0) - positive
    torch.testing.assert_close(sums[:, 0], torch.stack([2 * expected, torch.tensor(2.0), torch.tensor(2.0)]))


RETRIEVAL_CELLS = {  # user tower encoder × negatives: each path of the loss on the sharded tables
    "mean-in_batch": ["model.sequence.encoder=mean"],
    "transformer-sampled": ["model.sequence.encoder=transformer", "model.retrieval.num_sampled_negatives=8"],
    "hstu-all_positions": [
        "model.sequence.encoder=transformer", "model.sequence.attention=pointwise",
        "model.retrieval.all_positions=true", "model.retrieval.num_sampled_negatives=4",
    ],
}  # fmt: skip


def retrieval_overrides(data, run_dir, cell: str, precision: str, pipeline: str) -> list[str]:
    return [
        *tiny_implicit_overrides(data), f"run_dir={run_dir}", "data.val_split=null", "data.test_split=null",
        "data.validate_on_start=false", f"data.batch_size={BATCH_PER_RANK}", *RETRIEVAL_CELLS[cell],
        f"trainer.precision={precision}", f"trainer.train_pipeline={pipeline}",
        "trainer.dense_optimizer.type=sgd", "trainer.dense_optimizer.lr=0.05",
        "trainer.embedding_optimizer.type=sgd", "trainer.embedding_optimizer.lr=0.5",
    ]  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize(
    "cell,pipeline,precisions",
    [
        ("mean-in_batch", "lightning", ("32-true",)),
        ("transformer-sampled", "sparse_dist", ("32-true",)),
        ("hstu-all_positions", "lightning", ("32-true", "bf16-mixed")),
    ],
    ids=str,
)
def test_two_ranks_train_the_retrieval_model_one_rank_would(
    rank_pools, tiny_implicit, tmp_path, cell, pipeline, precisions
):
    check_two_ranks_train_the_model_one_rank_would(
        rank_pools,
        lambda precision, pipe: retrieval_overrides(tiny_implicit, tmp_path, cell, precision, pipe),
        pipeline,
        config=IMPLICIT_CONFIG,
        precisions=precisions,
    )


@pytest.mark.slow
def test_interrupted_and_resumed_retrieval_equals_uninterrupted_bit_for_bit(
    rank_pools, tiny_implicit, tmp_path
):
    def overrides(run_dir) -> list[str]:
        return [
            *tiny_implicit_overrides(tiny_implicit), f"run_dir={run_dir}", "data.val_split=null",
            "data.test_split=null", "data.validate_on_start=false", "data.batch_size=64",
            "data.shuffle_window_rows=512", "model.sequence.dropout=0.1", "model.retrieval.num_sampled_negatives=16",
            "trainer.max_epochs=2", "checkpoint.every_n_steps=0",
        ]  # fmt: skip

    pool = rank_pools(2)
    straight = pool.run(rank_jobs.fit, overrides(tmp_path / "straight"), config=IMPLICIT_CONFIG)
    interrupted = tmp_path / "interrupted"
    first = pool.run(rank_jobs.fit, [*overrides(interrupted), "trainer.max_steps=9"], config=IMPLICIT_CONFIG)
    assert first[0]["global_step"] == 9
    resumed = pool.run(rank_jobs.fit, overrides(interrupted), config=IMPLICIT_CONFIG)
    assert resumed[0]["global_step"] == straight[0]["global_step"] > 9
    assert bitwise_equal(resumed[0]["dense"], resumed[1]["dense"]) == []
    assert bitwise_equal(tensors(resumed), tensors(straight)) == []
    assert any(name.startswith("towers.history_encoders.") for name in resumed[0]["dense"])
    assert np.isfinite(next(iter(resumed[0]["dense"].values()))).all()
