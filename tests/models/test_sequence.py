"""Sequence encoders: left padding, masks, empty histories, precision, and the model around them."""

from __future__ import annotations

import pytest
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from towerrec.data.config import DataConfig, SparseFeature
from towerrec.models.builder import build_model
from towerrec.models.config import ModelConfig, SequenceConfig, TaskConfig
from towerrec.models.sequence import SequenceEncoder, pad_left

ENCODERS = [("din", "softmax"), ("transformer", "softmax"), ("transformer", "pointwise")]


def test_pad_left_puts_each_row_at_the_end_and_keeps_the_most_recent():
    values = torch.arange(1, 8, dtype=torch.float32).unsqueeze(1)  # rows [1], [], [2 3 4 5 6], [7]
    padded, valid = pad_left(values, torch.tensor([1, 0, 5, 1]), 3)
    assert padded.squeeze(-1).tolist() == [[0, 0, 1], [0, 0, 0], [4, 5, 6], [0, 0, 7]]
    assert valid.tolist() == [[False, False, True], [False] * 3, [True] * 3, [False, False, True]]


def encoder_inputs(lengths: list[int], dim: int = 8, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    values = torch.randn(sum(lengths), dim, generator=generator)
    candidate = torch.randn(len(lengths), dim, generator=generator)
    return values, torch.tensor(lengths), candidate


@pytest.mark.parametrize("encoder,attention", ENCODERS)
def test_a_rows_interest_depends_on_its_own_history_only(encoder, attention):
    torch.manual_seed(0)
    module = SequenceEncoder(8, 4, SequenceConfig(encoder=encoder, attention=attention, num_heads=2)).eval()
    values, lengths, candidate = encoder_inputs([2, 4, 1])
    out = module(values, lengths, candidate)
    assert out.shape == (3, 8) and torch.isfinite(out).all()
    changed = values.clone()
    changed[2:6] += torch.randn(4, 8)  # row 1's history only
    again = module(changed, lengths, candidate)
    assert torch.equal(again[0], out[0]) and torch.equal(again[2], out[2])
    assert not torch.allclose(again[1], out[1])
    # rows are encoded alone: a batch of one row gives the same interest (up to rounding)
    alone = module(values[:2], lengths[:1], candidate[:1])
    torch.testing.assert_close(alone[0], out[0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("encoder,attention", ENCODERS)
def test_empty_histories_are_finite_and_din_reads_a_zero_interest(encoder, attention):
    module = SequenceEncoder(8, 4, SequenceConfig(encoder=encoder, attention=attention)).eval()
    values, lengths, candidate = encoder_inputs([0, 3, 0])
    out = module(values, lengths, candidate)
    assert torch.isfinite(out).all()
    if encoder == "din":
        assert torch.equal(out[0], torch.zeros(8)) and torch.equal(out[2], torch.zeros(8))


def test_the_transformer_reads_the_order_of_the_history():
    torch.manual_seed(0)
    module = SequenceEncoder(8, 4, SequenceConfig(encoder="transformer")).eval()
    values, lengths, candidate = encoder_inputs([3])
    assert not torch.allclose(module(values, lengths, candidate), module(values.flip(0), lengths, candidate))


def sequence_model(encoder: str = "din", attention: str = "softmax"):
    sparse = [
        SparseFeature("user_id", embedding_dim=8),
        SparseFeature("item_id", embedding_dim=8, table="t_item"),
        SparseFeature(
            "hist", sequence=True, table="t_item", embedding_dim=8, candidate="item_id", max_length=5
        ),
        SparseFeature("hist_age", sequence=True, embedding_dim=8, align_with="hist", max_length=5),
    ]
    DataConfig(sparse=sparse).check()
    torch.manual_seed(0)
    return build_model(
        sparse=sparse, num_dense=1, tasks=[TaskConfig("ctr")],
        model=ModelConfig(sequence=SequenceConfig(encoder=encoder, attention=attention)),
        table_rows={"user_id": 10, "item_id": 20, "hist": 20, "hist_age": 8}, embedding_device="cpu",
    )  # fmt: skip


def sequence_batch(lengths: list[int], seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    rows, n = len(lengths), sum(lengths)
    ones = torch.ones(rows, dtype=torch.int64)
    sparse = KeyedJaggedTensor(
        keys=["user_id"], values=torch.randint(0, 10, (rows,), generator=generator), lengths=ones
    )
    sequences = KeyedJaggedTensor(
        keys=["item_id", "hist", "hist_age"],
        values=torch.cat(
            [
                torch.randint(0, 20, (rows + n,), generator=generator),
                torch.randint(0, 8, (n,), generator=generator),
            ]
        ),
        lengths=torch.cat([ones, torch.tensor(lengths), torch.tensor(lengths)]),
    )
    return sparse, torch.zeros(rows, 1), sequences


@pytest.mark.parametrize("encoder,attention", ENCODERS)
def test_gradients_reach_the_shared_item_table_through_the_history_and_bf16_runs(encoder, attention):
    model = sequence_model(encoder, attention)
    sparse, dense, sequences = sequence_batch([3, 0, 5, 1])
    model(sparse, dense, sequences).sum().backward()
    table = model.sequence_embeddings.embeddings["t_item"].weight
    history_ids = sequences["hist"].values().unique()
    assert (table.grad[history_ids].abs().sum(1) > 0).all()
    assert all(
        p.grad is not None
        for n, p in model.sequence_encoders.named_parameters()
        if "score" in n or "blocks" in n
    )
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(sparse, dense, sequences)
    assert torch.isfinite(out.float()).all()


def test_a_sequence_table_takes_sequences_and_single_ids_of_one_dim_only():
    with pytest.raises(ValueError, match="one embedding_dim"):
        DataConfig(sparse=[
            SparseFeature("item_id", embedding_dim=8, table="t_item"),
            SparseFeature("hist", sequence=True, table="t_item", embedding_dim=8, candidate="item_id"),
            SparseFeature("hist_age", sequence=True, embedding_dim=4, align_with="hist"),
        ]).check()  # fmt: skip
    with pytest.raises(ValueError, match="shares the sequence table"):
        DataConfig(sparse=[
            SparseFeature("item_id", embedding_dim=8, table="t_item"),
            SparseFeature("bag", multi_hot=True, table="t_item", embedding_dim=8),
            SparseFeature("hist", sequence=True, table="t_item", embedding_dim=8, candidate="item_id"),
        ]).check()  # fmt: skip
    with pytest.raises(ValueError, match="candidate: a sequence needs"):
        SparseFeature("hist", sequence=True).check()


def test_compiled_dense_part_with_a_sequence_matches_eager():
    """``trainer.compile`` compiles ``dense_forward``, the sequence encoders included."""
    import copy

    eager = sequence_model("transformer", "softmax")
    compiled = copy.deepcopy(eager)
    compiled.compile_dense()
    for lengths in ([3, 0, 5, 1],):
        sparse, dense, sequences = sequence_batch(lengths, seed=len(lengths))
        outputs = [model(sparse, dense, sequences) for model in (eager, compiled)]
        torch.testing.assert_close(outputs[1], outputs[0], rtol=1e-4, atol=1e-5)
        for model, out in zip((eager, compiled), outputs):
            model.zero_grad()
            out.sum().backward()
        for (name, p_eager), p_compiled in zip(
            eager.sequence_encoders.named_parameters(), compiled.sequence_encoders.parameters()
        ):
            torch.testing.assert_close(p_compiled.grad, p_eager.grad, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("attention", ["softmax", "pointwise"])
def test_the_last_layer_computing_the_candidate_alone_equals_all_positions(attention):
    module = SequenceEncoder(8, 6, SequenceConfig(encoder="transformer", attention=attention)).eval()
    values, lengths, candidate = encoder_inputs([0, 3, 6, 2, 5])
    encoder = module.encoder
    history, valid = pad_left(values, lengths, 6)
    tokens = encoder.input_norm(
        torch.cat(
            [
                (history + module.position) * valid.unsqueeze(-1),
                (candidate + encoder.candidate_position).unsqueeze(1),
            ],
            1,
        )
    )
    keys = torch.cat([valid, valid.new_ones(5, 1)], 1)
    allowed = encoder.causal & (keys.unsqueeze(1) | torch.eye(7, dtype=torch.bool))
    for layer in encoder.blocks:  # every position through every layer
        tokens = layer(tokens, allowed)
    torch.testing.assert_close(module(values, lengths, candidate), encoder.norm(tokens[:, -1]))
