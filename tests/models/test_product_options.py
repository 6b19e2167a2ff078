"""Model options added for the MovieLens quality work: concat_dot interaction and Wide & Deep."""

from __future__ import annotations

import torch

from towerrec.models.config import ModelConfig
from towerrec.models.interaction import build_interaction
from towerrec.models.towers import build_tower


def test_concat_dot_keeps_the_concatenation_and_adds_every_pairwise_dot_product():
    cfg = ModelConfig(interaction="concat_dot")
    dims = [8, 8, 4]
    layer = build_interaction(cfg, dims, num_dense=3)
    embeddings = [torch.randn(5, d) for d in dims]
    dense = torch.randn(5, 3)
    out = layer(embeddings, dense)
    assert out.shape == (5, layer.out_dim)
    concat = torch.cat([*embeddings, dense], dim=1)
    assert layer.out_dim >= concat.shape[1] + 3  # three pairs of features
    assert any(
        torch.allclose(out[:, i : i + concat.shape[1]], concat)
        for i in range(out.shape[1] - concat.shape[1] + 1)
    )


def test_wide_and_deep_widens_every_task_output_and_delegates_shared_parameters():
    plain = build_tower(ModelConfig(tower="mmoe"), 12, 2)
    wide = build_tower(ModelConfig(tower="mmoe", wide=True), 12, 2)
    assert wide.out_dim == plain.out_dim + 12
    x = torch.randn(4, 12)
    outputs = wide(x)  # (deep, wide) pairs standing for their concatenation
    assert len(outputs) == 2 and all(d.shape[1] + w.shape[1] == wide.out_dim for d, w in outputs)
    assert all(torch.equal(w, x) for _, w in outputs)
    assert {id(p) for p in wide.shared_parameters()} == {id(p) for p in wide.deep.shared_parameters()}
    # the heads read a pair exactly as they would read the concatenated vector
    from towerrec.models.config import TaskConfig
    from towerrec.models.heads import TaskHeads

    tasks = [TaskConfig("rating", type="regression", min_value=1.0, max_value=5.0), TaskConfig("ctr")]
    heads = TaskHeads(tasks, wide.out_dim)
    concatenated = [torch.cat([d, w], dim=1) for d, w in outputs]
    torch.testing.assert_close(heads(outputs), heads(concatenated))
