"""Interactions: shapes, the DLRM dot products and the DCNv2 cross formula."""

from __future__ import annotations

import pytest
import torch

from towerrec.models.config import ModelConfig
from towerrec.models.interaction import INTERACTIONS, CrossInteraction, DotInteraction, build_interaction


def inputs(embedding_dims: list[int], num_dense: int, batch_size: int = 5):
    return [torch.randn(batch_size, dim) for dim in embedding_dims], torch.randn(batch_size, num_dense)


@pytest.mark.parametrize("name", sorted(INTERACTIONS))
@pytest.mark.parametrize("embedding_dims", [[4, 4, 4], [8, 4, 2]])
@pytest.mark.parametrize("low_rank", [None, 3])
def test_shapes_and_backward(name, embedding_dims, low_rank):
    cfg = ModelConfig(interaction=name, dense_dims=[6], dcn_low_rank=low_rank)
    interaction = build_interaction(cfg, embedding_dims, num_dense=3)
    embeddings, dense = inputs(embedding_dims, 3)
    for e in embeddings:
        e.requires_grad_(True)
    out = interaction(embeddings, dense)
    assert out.shape == (5, interaction.out_dim)
    out.square().sum().backward()
    assert all(e.grad is not None and torch.isfinite(e.grad).all() for e in embeddings)


def test_dot_output_is_dense_projection_then_pairwise_dots():
    interaction = DotInteraction([4, 4, 4], num_dense=3, cfg=ModelConfig(dense_dims=[6]))
    embeddings, dense = inputs([4, 4, 4], 3)
    out = interaction(embeddings, dense)
    projected = interaction.dense_mlp(dense)
    vectors = [projected, *embeddings]
    expected_dots = [(vectors[i] * vectors[j]).sum(1) for i in range(4) for j in range(i + 1, 4)]
    assert interaction.out_dim == 4 + 6
    torch.testing.assert_close(out, torch.cat([projected, torch.stack(expected_dots, dim=1)], dim=1))


def test_dot_projects_unequal_embeddings_to_the_widest():
    interaction = DotInteraction([8, 4, 8], num_dense=2, cfg=ModelConfig())
    assert interaction.dim == 8
    assert isinstance(interaction.projections[0], torch.nn.Identity)
    assert interaction.projections[1].weight.shape == (8, 4)
    assert interaction.out_dim == 8 + 6


def test_dot_without_dense_features_is_dots_only():
    interaction = DotInteraction([4, 4, 4], num_dense=0, cfg=ModelConfig())
    embeddings, dense = inputs([4, 4, 4], 0)
    assert interaction(embeddings, dense).shape == (5, 3) == (5, interaction.out_dim)
    with pytest.raises(ValueError, match="model.interaction=dot"):
        DotInteraction([4], num_dense=0, cfg=ModelConfig())


@pytest.mark.parametrize("low_rank", [None, 2])
def test_cross_layers_follow_dcn_v2(low_rank):
    interaction = CrossInteraction(
        [3, 2], num_dense=2, cfg=ModelConfig(dcn_num_layers=2, dcn_low_rank=low_rank)
    )
    assert interaction.out_dim == 7
    embeddings, dense = inputs([3, 2], 2)
    x0 = torch.cat([*embeddings, dense], dim=1)
    x = x0
    for layer in interaction.layers:
        if low_rank is None:
            weight, bias = layer.linear.weight, layer.linear.bias
        else:
            v, u = layer.linear[0].weight, layer.linear[1]
            weight, bias = u.weight @ v, u.bias  # W = U Vᵀ of rank 2
            assert torch.linalg.matrix_rank(weight) <= low_rank
        x = x0 * (x @ weight.T + bias) + x
    torch.testing.assert_close(interaction(embeddings, dense), x)


def test_cross_with_zero_weights_is_identity():
    interaction = CrossInteraction([3, 2], num_dense=2, cfg=ModelConfig(dcn_num_layers=3))
    for parameter in interaction.parameters():
        torch.nn.init.zeros_(parameter)
    embeddings, dense = inputs([3, 2], 2)
    torch.testing.assert_close(interaction(embeddings, dense), torch.cat([*embeddings, dense], dim=1))


@pytest.mark.parametrize(
    "overrides, key",
    [
        ({"interaction": "cross"}, "model.interaction"),
        ({"interaction": "dcn", "dcn_low_rank": 0}, "model.dcn_low_rank"),
    ],
)
def test_bad_interaction_config_names_the_key(overrides, key):
    with pytest.raises(ValueError, match=key):
        build_interaction(ModelConfig(**overrides), [4, 4], 2)
