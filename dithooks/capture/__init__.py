"""Capture: sample with hooks attached and stream every hooked value into a Zarr store.

The store's format is described (and built) in :mod:`dithooks.store` (``layout.py`` first);
this package only orchestrates a run:

    config.py     CaptureConfig and its checks; conditioning (labels or prompt embeddings)
    plan.py       hook names (expand_hooks), planned arrays, the request as metadata
    recorder.py   hooked values -> per-step writes, buffered and marked complete
    session.py    CaptureSession: plan -> open store -> sample -> record -> finish
"""

from __future__ import annotations

from ..store.layout import MIN_CHUNK_BYTES, layers_per_chunk
from ..store.lifecycle import MODES
from .config import DEFAULT_HOOKS, CaptureConfig, SampleConditioning, _compute_dtype, compute_dtype  # noqa: F401
from .plan import PATTERN_DIMS, PlannedArray, expand_hooks
from .recorder import BATCH_BYTES, BATCH_STEPS, StepRecorder
from .session import CaptureResult, CaptureSession, capture, is_store

__all__ = ["BATCH_BYTES", "BATCH_STEPS", "CaptureConfig", "CaptureResult", "CaptureSession", "DEFAULT_HOOKS",
           "MIN_CHUNK_BYTES", "MODES", "PATTERN_DIMS", "PlannedArray", "SampleConditioning", "StepRecorder",
           "capture", "compute_dtype", "expand_hooks", "is_store", "layers_per_chunk"]
