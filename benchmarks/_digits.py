"""Shared by the mining benchmarks: scikit-learn's bundled digits, fixed-seed splits and label
noise, a small MLP, a plain training epoch, and ranking figures (P@k, AUROC)."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

CLASSES = 10


class ArrayDataset(Dataset):
    """(features, label) pairs from arrays, fetched a batch at a time (`__getitems__`) so that
    loading costs little next to the model."""

    def __init__(self, x: np.ndarray, y: np.ndarray) -> None:
        self.x = torch.as_tensor(x, dtype=torch.float32)
        self.y = torch.as_tensor(y, dtype=torch.long)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x[i], self.y[i]

    def __getitems__(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.as_tensor(indices)
        return self.x[idx], self.y[idx]


def batch_collate(batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """`__getitems__` already returns a collated batch."""
    return batch


def load_digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """The 1797 8x8 digits, pixels scaled to [0, 1], and their labels (bundled with scikit-learn)."""
    from sklearn.datasets import load_digits

    data = load_digits()
    return (data.data / 16.0).astype(np.float32), data.target.astype(np.int64)


def stratified_split(y: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train positions, test positions), stratified by class, fixed by `seed`."""
    from sklearn.model_selection import train_test_split

    pos = np.arange(len(y))
    train, test = train_test_split(pos, test_size=test_fraction, stratify=y, random_state=seed)
    return np.sort(train), np.sort(test)


def flip_labels(y: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(noisy labels, flipped mask): exactly round(fraction * n) labels moved to another class,
    chosen uniformly, fixed by `seed`."""
    rng = np.random.default_rng(seed)
    n = len(y)
    flipped = np.zeros(n, dtype=bool)
    flipped[rng.choice(n, size=int(round(fraction * n)), replace=False)] = True
    noisy = y.copy()
    noisy[flipped] = (y[flipped] + rng.integers(1, CLASSES, size=int(flipped.sum()))) % CLASSES
    return noisy, flipped


def make_mlp(seed: int, hidden: int = 256) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                         nn.Linear(hidden, CLASSES))


def make_loader(ds: Dataset, batch_size: int, seed: int, shuffle: bool = True) -> DataLoader:
    return DataLoader(ds, batch_size=batch_size, shuffle=shuffle, collate_fn=batch_collate,
                      generator=torch.Generator().manual_seed(seed))


def train_epoch(model: nn.Module, loader: DataLoader, opt: torch.optim.Optimizer, loss_fn: nn.Module) -> int:
    """One plain epoch; returns the number of optimizer steps."""
    model.train()
    steps = 0
    for xb, yb in loader:
        opt.zero_grad(set_to_none=True)
        loss_fn(model(xb), yb).backward()
        opt.step()
        steps += 1
    return steps


@torch.no_grad()
def predict_probs(model: nn.Module, x: np.ndarray | torch.Tensor) -> np.ndarray:
    was = model.training
    model.eval()
    out = torch.softmax(model(torch.as_tensor(x, dtype=torch.float32)), dim=1).numpy()
    model.train(was)
    return out


def precision_at_k(scores: np.ndarray, truth: np.ndarray, k: int) -> float:
    """Fraction of true positives among the k highest scores (ties broken by position)."""
    top = np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")[:k]
    return float(np.asarray(truth, dtype=bool)[top].mean())


def auroc(scores: np.ndarray, truth: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(np.asarray(truth, dtype=bool), np.asarray(scores, dtype=np.float64)))
