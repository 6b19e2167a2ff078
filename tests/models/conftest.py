"""Shared fixtures of the model tests: tiny tasks and a planted synthetic problem."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from towerrec.models.config import TaskConfig


@dataclass
class PlantedProblem:
    """Features (N, num_features) and labels (N, T) with real signal; train/test split by row."""

    features: torch.Tensor
    labels: torch.Tensor
    tasks: list[TaskConfig]
    num_train: int

    def split(self, part: str) -> tuple[torch.Tensor, torch.Tensor]:
        rows = slice(0, self.num_train) if part == "train" else slice(self.num_train, None)
        return self.features[rows], self.labels[rows]


def make_planted_problem(num_rows: int = 3072, num_features: int = 8, seed: int = 0) -> PlantedProblem:
    """A regression task (``rating``: linear + quadratic signal + noise) and a binary task (``click``)."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(num_rows, num_features, generator=generator)
    a, b = torch.randn(num_features, generator=generator), torch.randn(num_features, generator=generator)
    rating = x @ a + 0.5 * (x[:, 0] * x[:, 1]) + 0.3 * torch.randn(num_rows, generator=generator)
    click = (torch.rand(num_rows, generator=generator) < torch.sigmoid(3.0 * (x @ b) / b.norm())).float()
    tasks = [TaskConfig("rating", type="regression"), TaskConfig("click", type="binary")]
    return PlantedProblem(x, torch.stack([rating, click], dim=1), tasks, num_train=num_rows * 2 // 3)


@pytest.fixture(autouse=True)
def single_thread():
    """Tiny models run fastest (and reproducibly) on one thread, also when the machine is busy."""
    num_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(num_threads)


@pytest.fixture
def planted_problem() -> PlantedProblem:
    return make_planted_problem()
