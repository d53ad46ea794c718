"""Small models and datasets shared by the data_explorer tests."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import Dataset

N_FEATURES = 6
N_CLASSES = 4


class MLP(nn.Module):
    """Two layers, optional dropout and batch norm; the hidden activations feed the head."""

    def __init__(self, dropout: float = 0.0, batchnorm: bool = False) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Linear(N_FEATURES, 16),
            nn.BatchNorm1d(16) if batchnorm else nn.Identity(),
            nn.ReLU(),
            nn.Dropout(dropout),
        )
        self.head = nn.Linear(16, N_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


class PairDataset(Dataset):
    """(features, label) pairs, fixed by a seed; item i is always the same."""

    def __init__(self, n: int, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, N_FEATURES, generator=g)
        self.y = torch.randint(0, N_CLASSES, (n,), generator=g)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x[i], self.y[i]


def reference_losses(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Hand-computed per-sample cross-entropy in eval mode."""
    was = model.training
    model.eval()
    with torch.no_grad():
        out = nn.functional.cross_entropy(model(x), y, reduction="none")
    model.train(was)
    return out


@pytest.fixture
def model() -> MLP:
    torch.manual_seed(0)
    return MLP()


@pytest.fixture
def data() -> PairDataset:
    return PairDataset(103)
