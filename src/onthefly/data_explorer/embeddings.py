"""Embeddings, k-means clustering and hard-cluster ranking: `compute_embeddings`,
`cluster_embeddings`, `select_hard_clusters`, and `propose_subsets` which chains them with
per-sample losses.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from .batches import batch_size_of, split_batch
from .calling import CallCache, cache_for, call_model, ensure_tensor_output
from .scan import run_scan
from .spool import ChunkedArraySpool, close_spools, spooled_as_arrays

EXPLORER_EXTRA = "pip install 'onthefly[explorer]'"

EmbeddingHook = Callable[[Any, Any, torch.Tensor], torch.Tensor]


@dataclass
class EmbeddingResult:
    """(N, D) float32 embeddings and the root-dataset index of each row.

    Arrays, or `ChunkedArraySpool`s with `materialize=False` (call `close()` when done).
    """

    embeddings: np.ndarray | ChunkedArraySpool
    indices: np.ndarray | ChunkedArraySpool
    meta: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.indices)

    def to_numpy(self) -> tuple[np.ndarray, np.ndarray]:
        """(embeddings, indices) as arrays (memory-mapped for spools: valid until `close`)."""
        return spooled_as_arrays(self.embeddings, self.indices)  # type: ignore[return-value]

    def close(self) -> None:
        close_spools(self.embeddings, self.indices)


def last_linear_layer(model: nn.Module) -> nn.Linear:
    """The last `nn.Linear` in the model's module order (usually the classifier head)."""
    found = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not found:
        raise ValueError(
            f"{type(model).__name__} has no nn.Linear layer to take embeddings from; pass "
            "layer=<module or name> or embedding_hook=fn(model, inputs, outputs)"
        )
    return found[-1]


def _pool(t: torch.Tensor, n: int, where: str) -> torch.Tensor:
    if t.dim() == 0 or t.shape[0] != n:
        raise ValueError(f"{where} gave a tensor of shape {tuple(t.shape)} for a batch of {n}")
    if t.dim() == 1:
        return t.reshape(n, 1)
    if t.dim() > 2:
        # (B, T, D) token or (B, H, W, D) spatial features: average the middle dimensions.
        return t.reshape(n, -1, t.shape[-1]).mean(dim=1)
    return t


def compute_embeddings(
    model: Any,
    dataset_or_loader: Dataset | DataLoader,
    *,
    embedding_hook: EmbeddingHook | None = None,
    layer: nn.Module | str | None = None,
    indices: Any = None,
    batch_size: int | None = None,
    max_dims: int | None = None,
    mirror_train_semantics: bool = False,
    amp: bool = False,
    materialize: bool = True,
    progress: Callable[[int, int | None], None] | None = None,
    cancel: Callable[[], bool] | None = None,
    device: torch.device | str | None = None,
    seed: int = 1337,
    num_workers: int = 0,
    cache: CallCache | None = None,
    spool_dir: str | None = None,
) -> EmbeddingResult:
    """One embedding row per sample, paired with its root-dataset index (same order and
    guarantees as `compute_per_sample_losses`).

    Default: the input of `layer` (a module or its dotted name), else of the model's last
    `nn.Linear`, captured with a forward hook; (B, T, D) inputs are averaged over T. With
    `embedding_hook(model, inputs, outputs)`, its (B, D) return value is used instead
    (`inputs` is the batch's model input, `outputs` the model's output tensor).
    `max_dims` keeps the first dimensions only.
    """
    call_cache = cache_for(model, cache)
    captured: list[torch.Tensor] = []
    handle = None
    source = "hook"
    if embedding_hook is None:
        if not isinstance(model, nn.Module):
            raise TypeError("compute_embeddings needs an nn.Module model unless embedding_hook is given")
        target = model.get_submodule(layer) if isinstance(layer, str) else (layer or last_linear_layer(model))
        if not any(m is target for m in model.modules()):
            raise ValueError(f"layer {type(target).__name__} is not a submodule of the model")
        source = f"input of {type(target).__name__}"

        def grab(_module: nn.Module, inputs: tuple[Any, ...]) -> None:
            if inputs and isinstance(inputs[0], torch.Tensor):
                captured.append(inputs[0])

        handle = target.register_forward_pre_hook(grab)

    def batch_embeddings(batch: Any) -> torch.Tensor:
        captured.clear()
        outputs = call_model(model, batch, call_cache)
        n = batch_size_of(batch)
        if embedding_hook is not None:
            emb = embedding_hook(model, split_batch(batch).first, ensure_tensor_output(outputs))
            if not isinstance(emb, torch.Tensor):
                raise TypeError(f"embedding_hook returned {type(emb).__name__}, expected a (B, D) tensor")
            emb = _pool(emb, n, "embedding_hook")
        else:
            if not captured:
                raise RuntimeError(f"the embedding layer ({source}) was not called by the model's forward")
            emb = _pool(captured[-1], n, source)
        return emb[:, :max_dims] if max_dims is not None else emb

    try:
        sink, plan, dev = run_scan(
            model,
            dataset_or_loader,
            batch_embeddings,
            materialize=materialize,
        spool_dir=spool_dir,
            indices=indices,
            batch_size=batch_size,
            mirror_train_semantics=mirror_train_semantics,
            seed=seed,
            device=device,
            num_workers=num_workers,
            amp=amp,
            progress=progress,
            cancel=cancel,
        )
    finally:
        if handle is not None:
            handle.remove()
    embeddings, idx = sink.result(empty_width=max_dims)
    meta = {
        "samples": sink.rows,
        "dims": sink.width,
        "source": source,
        "mode": "train_mirror" if mirror_train_semantics else "eval",
        "seed": seed,
        "batch_size": plan.batch_size,
        "device": str(dev),
        "non_finite": sink.non_finite,
        "elapsed_s": sink.elapsed_s,
    }
    return EmbeddingResult(embeddings, idx, meta)


def _as_matrix(features: Any) -> np.ndarray:
    if isinstance(features, ChunkedArraySpool):
        features = features.to_numpy()
    elif isinstance(features, torch.Tensor):
        features = features.detach().cpu().numpy()
    x = np.asarray(features) if not isinstance(features, np.ndarray) else features
    if x.ndim == 1:
        x = x.reshape(-1, 1)
    if x.ndim != 2:
        raise ValueError(f"features must be (N,) or (N, D), got shape {x.shape}")
    return x


def cluster_embeddings(
    embeddings: Any,
    k: int = 8,
    *,
    seed: int = 0,
    batch_size: int = 4096,
    n_init: int = 3,
    max_fit_samples: int = 100_000,
    chunk_rows: int = 65_536,
) -> np.ndarray:
    """A k-means cluster label (int64) for every row, from scikit-learn's `MiniBatchKMeans`.

    Fits on at most `max_fit_samples` rows (a seeded random choice) and labels all rows chunk
    by chunk, so memory stays bounded for memory-mapped inputs. Same input and seed, same labels.
    """
    try:
        from sklearn.cluster import MiniBatchKMeans
    except ImportError as exc:
        raise ImportError(f"cluster_embeddings needs scikit-learn: {EXPLORER_EXTRA}") from exc
    x = _as_matrix(embeddings)
    n = len(x)
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise ValueError(f"k must be a positive int, got {k!r}")
    if n < k:
        raise ValueError(f"cannot make {k} clusters from {n} samples")
    rng = np.random.default_rng(seed)
    fit_rows = np.sort(rng.choice(n, size=max_fit_samples, replace=False)) if n > max_fit_samples else None
    fit_x = np.asarray(x[fit_rows] if fit_rows is not None else x, dtype=np.float32)
    bad = int(np.count_nonzero(~np.isfinite(fit_x).all(axis=1)))
    if bad:
        raise ValueError(f"{bad} feature rows contain NaN or infinity; drop or fill them before clustering")
    km = MiniBatchKMeans(n_clusters=k, random_state=seed, batch_size=batch_size, n_init=n_init)
    km.fit(fit_x)
    if fit_rows is None:
        return km.labels_.astype(np.int64)
    labels = np.empty(n, dtype=np.int64)
    for start in range(0, n, chunk_rows):
        chunk = np.asarray(x[start : start + chunk_rows], dtype=np.float32)
        if not np.isfinite(chunk).all():
            raise ValueError(f"feature rows {start}..{start + len(chunk) - 1} contain NaN or infinity")
        labels[start : start + len(chunk)] = km.predict(chunk)
    return labels


@dataclass
class ClusterSummary:
    """One cluster: its label, size, mean loss and the dataset indices of its members."""

    cluster: int
    size: int
    mean_loss: float
    indices: np.ndarray

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (non-finite mean loss becomes None)."""
        mean = self.mean_loss if np.isfinite(self.mean_loss) else None
        return {"cluster": self.cluster, "size": self.size, "mean_loss": mean, "indices": self.indices.tolist()}


def select_hard_clusters(
    labels: Any, losses: Any, indices: Any = None, *, top_k: int | None = None, min_size: int = 1
) -> list[ClusterSummary]:
    """Clusters ranked by mean loss, hardest first (NaN losses ignored; all-NaN clusters last).

    `indices` names each row (e.g. root-dataset indices); positions 0..N-1 when omitted.
    `top_k` keeps the first clusters only; clusters smaller than `min_size` are left out.
    """
    lab = np.asarray(labels).reshape(-1)
    loss = np.asarray(_as_matrix(losses)[:, 0], dtype=np.float64)
    idx = np.arange(len(lab), dtype=np.int64) if indices is None else np.asarray(indices, dtype=np.int64).reshape(-1)
    if not (len(lab) == len(loss) == len(idx)):
        raise ValueError(f"labels ({len(lab)}), losses ({len(loss)}) and indices ({len(idx)}) differ in length")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    out: list[ClusterSummary] = []
    for c in np.unique(lab):
        members = lab == c
        size = int(members.sum())
        if size < min_size:
            continue
        vals = loss[members]
        finite = vals[np.isfinite(vals)]
        mean = float(finite.mean()) if finite.size else float("nan")
        out.append(ClusterSummary(int(c), size, mean, idx[members]))
    out.sort(key=lambda s: (not np.isfinite(s.mean_loss), -s.mean_loss if np.isfinite(s.mean_loss) else 0.0, s.cluster))
    return out[:top_k] if top_k is not None else out


def propose_subsets(
    model: Any,
    dataset_or_loader: Dataset | DataLoader,
    loss_fn: Callable[..., Any],
    *,
    k: int = 5,
    indices: Any = None,
    top_k: int | None = None,
    embedding_hook: EmbeddingHook | None = None,
    batch_size: int | None = None,
    seed: int = 0,
    device: torch.device | str | None = None,
    progress: Callable[[int, int | None], None] | None = None,
) -> list[ClusterSummary]:
    """k-means subset proposals: cluster the embeddings, rank clusters by mean per-sample loss."""
    from .losses import compute_per_sample_losses

    common = dict(indices=indices, batch_size=batch_size, device=device, progress=progress)
    scored = compute_per_sample_losses(model, dataset_or_loader, loss_fn, **common)
    emb = compute_embeddings(model, dataset_or_loader, embedding_hook=embedding_hook, **common)
    if not np.array_equal(scored.indices, emb.indices):
        raise RuntimeError("loss and embedding scans visited different samples; is the dataset deterministic?")
    labels = cluster_embeddings(emb.embeddings, k=k, seed=seed)
    return select_hard_clusters(labels, scored.losses, scored.indices, top_k=top_k)
