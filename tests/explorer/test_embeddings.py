"""Embeddings, seeded k-means and hard-cluster ranking."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Subset, TensorDataset

from onthefly.data_explorer import (
    ClusterSummary,
    cluster_embeddings,
    compute_embeddings,
    compute_per_sample_losses,
    last_linear_layer,
    propose_subsets,
    select_hard_clusters,
)

from .conftest import MLP, PairDataset


def test_default_embedding_is_input_of_last_linear(model: MLP, data: PairDataset) -> None:
    model.train()
    result = compute_embeddings(model, DataLoader(data, batch_size=16, shuffle=True))
    assert model.training
    assert last_linear_layer(model) is model.head
    model.eval()
    with torch.no_grad():
        hidden = model.body(data.x).numpy()
    assert result.embeddings.shape == (103, 16) and result.embeddings.dtype == np.float32
    np.testing.assert_array_equal(result.indices, np.arange(103))
    np.testing.assert_allclose(result.embeddings, hidden, atol=1e-6)
    assert result.meta["dims"] == 16 and result.meta["source"] == "input of Linear"


def test_layer_by_name_max_dims_and_subset_indices(model: MLP, data: PairDataset) -> None:
    sub = Subset(data, [5, 9, 1])
    result = compute_embeddings(model, sub, layer="body.0", max_dims=4)
    np.testing.assert_array_equal(result.indices, [5, 9, 1])
    np.testing.assert_allclose(result.embeddings, data.x[[5, 9, 1], :4].numpy(), atol=0)
    with pytest.raises(ValueError, match="not a submodule"):
        compute_embeddings(model, sub, layer=nn.Linear(2, 2))


def test_user_hook_and_sequence_pooling(model: MLP) -> None:
    x = torch.randn(10, 3, 6, generator=torch.Generator().manual_seed(0))  # (B, T, F)
    ds = TensorDataset(x, torch.zeros(10, 3, dtype=torch.long))
    seen = []

    def hook(m, inputs, outputs):
        seen.append((m is model, inputs.shape, outputs.shape))
        return inputs  # (B, T, F): averaged over T

    result = compute_embeddings(model, ds, embedding_hook=hook, batch_size=4)
    np.testing.assert_allclose(result.embeddings, x.mean(dim=1).numpy(), atol=1e-6)
    assert seen[0] == (True, (4, 3, 6), (4, 3, 4))
    with pytest.raises(ValueError, match="shape"):
        compute_embeddings(model, ds, embedding_hook=lambda m, i, o: i[:1])


def test_model_without_linear_needs_a_hook(data: PairDataset) -> None:
    with pytest.raises(ValueError, match="no nn.Linear"):
        compute_embeddings(nn.Sequential(nn.Identity()), data)


def _blobs() -> np.ndarray:
    rng = np.random.default_rng(0)
    centres = np.array([[0.0, 0.0], [10.0, 10.0], [-10.0, 10.0]])
    return np.concatenate([c + rng.normal(scale=0.5, size=(40, 2)) for c in centres]).astype(np.float32)


def test_cluster_embeddings_finds_blobs_and_is_seeded() -> None:
    x = _blobs()
    labels = cluster_embeddings(x, k=3, seed=1)
    assert labels.dtype == np.int64 and labels.shape == (120,)
    for block in range(3):
        assert len(set(labels[block * 40 : (block + 1) * 40].tolist())) == 1
    assert len(set(labels.tolist())) == 3
    np.testing.assert_array_equal(cluster_embeddings(x, k=3, seed=1), labels)
    # fitted on a sample, then labelled chunk by chunk: same partition
    chunked = cluster_embeddings(x, k=3, seed=1, max_fit_samples=60, chunk_rows=17)
    for block in range(3):
        assert len(set(chunked[block * 40 : (block + 1) * 40].tolist())) == 1
    assert len(set(cluster_embeddings(torch.arange(10.0), k=2).tolist())) == 2  # 1-D features


def test_cluster_embeddings_bad_input() -> None:
    with pytest.raises(ValueError, match="3 clusters from 2"):
        cluster_embeddings(np.ones((2, 2)), k=3)
    with pytest.raises(ValueError, match="positive int"):
        cluster_embeddings(np.ones((2, 2)), k=0)
    bad = _blobs()
    bad[3, 1] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        cluster_embeddings(bad, k=3)


def test_cluster_embeddings_names_the_extra_when_sklearn_missing(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "sklearn", None)
    monkeypatch.setitem(sys.modules, "sklearn.cluster", None)
    with pytest.raises(ImportError, match=r"pip install 'onthefly\[explorer\]'"):
        cluster_embeddings(_blobs(), k=3)


def test_select_hard_clusters_ranks_by_mean_loss() -> None:
    labels = np.array([0, 0, 1, 1, 1, 2, 3])
    losses = np.array([1.0, 3.0, 5.0, np.nan, 7.0, 0.5, np.nan])
    idx = np.array([10, 11, 12, 13, 14, 15, 16])
    ranked = select_hard_clusters(labels, losses, idx)
    assert [c.cluster for c in ranked] == [1, 0, 2, 3]
    assert ranked[0] == ClusterSummary(1, 3, 6.0, ranked[0].indices)
    np.testing.assert_array_equal(ranked[0].indices, [12, 13, 14])
    assert ranked[0].to_dict() == {"cluster": 1, "size": 3, "mean_loss": 6.0, "indices": [12, 13, 14]}
    assert ranked[-1].to_dict()["mean_loss"] is None
    assert [c.cluster for c in select_hard_clusters(labels, losses, idx, top_k=2)] == [1, 0]
    assert [c.cluster for c in select_hard_clusters(labels, losses, min_size=2)] == [1, 0]
    with pytest.raises(ValueError, match="length"):
        select_hard_clusters(labels, losses[:3])


def test_propose_subsets_finds_the_hard_region() -> None:
    # Two well-separated groups; the model is right on group A and wrong on group B.
    g = torch.Generator().manual_seed(0)
    xa = torch.randn(30, 2, generator=g) * 0.1 + torch.tensor([5.0, 0.0])
    xb = torch.randn(30, 2, generator=g) * 0.1 + torch.tensor([-5.0, 0.0])
    x = torch.cat([xa, xb])
    y = torch.cat([torch.zeros(30, dtype=torch.long), torch.zeros(30, dtype=torch.long)])
    model = nn.Sequential(nn.Linear(2, 2))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[1.0, 0.0], [-1.0, 0.0]]))
        model[0].bias.zero_()
    ds = TensorDataset(x, y)
    proposals = propose_subsets(model, ds, nn.CrossEntropyLoss(), k=2, embedding_hook=lambda m, i, o: i)
    assert len(proposals) == 2
    assert sorted(proposals[0].indices.tolist()) == list(range(30, 60))
    scored = compute_per_sample_losses(model, ds, nn.CrossEntropyLoss())
    assert proposals[0].mean_loss == pytest.approx(float(scored.losses[30:].mean()), rel=1e-6)
    assert proposals[0].mean_loss > proposals[1].mean_loss
