"""Torch-level analysis utilities: calling any model and loss on any batch, per-sample losses,
disk spooling, embeddings, clustering, training dynamics, suggested cut-offs and subset export.

Importing this package loads neither scikit-learn, pandas nor pyarrow; the functions that need
them import them when called (install them with `pip install 'onthefly[explorer]'`).
"""

from __future__ import annotations

from .batches import (
    BatchParts,
    batch_size_of,
    map_batch,
    move_to_device,
    select_sample,
    split_batch,
)
from .calling import (
    CallCache,
    InputCandidate,
    InputRecipe,
    ModelCallError,
    call_model,
    ensure_tensor_output,
    model_input_candidates,
    targets_for,
)
from .cartography import (
    CLASSIFICATION_METRICS,
    HARDER_WHEN_HIGHER,
    METRICS,
    DynamicsSummary,
    summarize_dynamics,
)
from .classification import (
    ClassificationShapeError,
    TaskSpec,
    classification_stats,
    infer_task,
)
from .cutoff import (
    CutoffError,
    CutoffResult,
    confident_learning,
    mixture_cutoff,
    suggest_cutoff,
)
from .dynamics import DynamicsError, DynamicsRecord, DynamicsRecorder, DynamicsSchedule
from .embeddings import (
    ClusterSummary,
    EmbeddingResult,
    cluster_embeddings,
    compute_embeddings,
    last_linear_layer,
    propose_subsets,
    select_hard_clusters,
)
from .export import FORMATS, ExportResult, atomic_write, export_subset_table
from .loss_calls import (
    ALREADY_PER_SAMPLE,
    ONE_BY_ONE,
    REDUCTION_NONE,
    VMAP,
    LossCallError,
    LossShapeError,
    _call_batch_loss,
    apply_loss_with_warning_guard,
    call_batch_loss,
    coerce_to_per_sample,
    compute_batch_loss,
    extract_loss_value,
    reduction_none,
)
from .losses import PerSampleResult, compute_per_sample_losses, select_by_loss_range
from .scaling import (
    FeatureScaling,
    FeatureScalingError,
    fit_feature_scaling,
    standardize_features,
)
from .scan import (
    ScanCancelled,
    analysis_mode,
    dataset_indices_of,
    model_device,
    rng_guard,
    root_dataset,
)
from .spool import ChunkedArraySpool

__all__ = [
    "ALREADY_PER_SAMPLE",
    "BatchParts",
    "CLASSIFICATION_METRICS",
    "CallCache",
    "ChunkedArraySpool",
    "ClassificationShapeError",
    "ClusterSummary",
    "CutoffError",
    "CutoffResult",
    "DynamicsError",
    "DynamicsRecord",
    "DynamicsRecorder",
    "DynamicsSchedule",
    "DynamicsSummary",
    "EmbeddingResult",
    "ExportResult",
    "FORMATS",
    "FeatureScaling",
    "FeatureScalingError",
    "HARDER_WHEN_HIGHER",
    "InputCandidate",
    "InputRecipe",
    "LossCallError",
    "LossShapeError",
    "METRICS",
    "ModelCallError",
    "ONE_BY_ONE",
    "PerSampleResult",
    "REDUCTION_NONE",
    "ScanCancelled",
    "TaskSpec",
    "VMAP",
    "_call_batch_loss",
    "analysis_mode",
    "apply_loss_with_warning_guard",
    "atomic_write",
    "batch_size_of",
    "call_batch_loss",
    "call_model",
    "classification_stats",
    "cluster_embeddings",
    "coerce_to_per_sample",
    "compute_batch_loss",
    "compute_embeddings",
    "compute_per_sample_losses",
    "confident_learning",
    "dataset_indices_of",
    "ensure_tensor_output",
    "export_subset_table",
    "extract_loss_value",
    "fit_feature_scaling",
    "infer_task",
    "last_linear_layer",
    "map_batch",
    "mixture_cutoff",
    "model_device",
    "model_input_candidates",
    "move_to_device",
    "propose_subsets",
    "reduction_none",
    "rng_guard",
    "root_dataset",
    "select_by_loss_range",
    "select_hard_clusters",
    "select_sample",
    "split_batch",
    "standardize_features",
    "suggest_cutoff",
    "summarize_dynamics",
    "targets_for",
]
