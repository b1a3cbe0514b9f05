"""Reopening a capture store to continue it (--resume): is it the same request, where to start,
and the sampler state to start from.

A resume continues from the first step not marked in ``step_complete`` (or earlier, when a
chunk of a marked step is missing or cut short), with the latents and generator states stored
before that step.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..errors import StoreError
from .files import remove_partials
from .layout import LATENTS, RNG_STATE, STEP_COMPLETE
from .metadata import ATTR_KEY, RESUME_KEYS, completeness, now
from .steps import nonfinite_before
from .storage import zarr_store
from .verify import DamagedStore, inspect_store, verify_store


def _short(v: Any) -> str:
    s = repr(v)
    return s if len(s) <= 60 else s[:57] + "..."


def reopen(path: Path, request: dict[str, Any], *, steps: int, not_resumable: Sequence[str] = (),
           command: dict[str, Any] | None = None) -> tuple[Any, dict[str, Any], int]:
    """Check that the store at ``path`` (held under its lock) can continue ``request`` and mark
    it running again; returns ``(group, metadata, first step to run)``.

    ``not_resumable``: probes that carry state across steps (they cannot continue mid-way).
    """
    import zarr

    try:
        layout = inspect_store(path)
    except DamagedStore as e:
        raise DamagedStore(f"cannot resume: {e}") from None
    except StoreError as e:
        raise StoreError(f"{path} is not a dithooks store: cannot resume it ({e})") from None
    if layout.kind != "capture":
        raise StoreError(f"{path} is a {layout.kind} store, not a capture: cannot resume it here")
    remove_partials(path)  # writes a killed run left half-done (we hold the lock)
    group = zarr.open_group(zarr_store(path), mode="r+", zarr_format=3)
    meta = dict(layout.meta)
    meta.setdefault("probes", [])  # stores from before probes existed had none
    for key in tuple(RESUME_KEYS) + ("probes",):
        if meta.get(key) != request.get(key):
            raise StoreError(f"cannot resume {path}: its {key} differs from this request "
                             f"(stored {_short(meta.get(key))}, asked {_short(request.get(key))})")
    info = completeness(layout.step_complete)
    start = info["resume_from_step"]
    # a chunk of a step marked complete that is missing or cut short: redo from that step
    check = verify_store(path, decode=False, layout=layout)
    if not check.ok:
        if check.first_bad_step is None:
            raise DamagedStore(f"cannot resume {path}: {check.summary(1)}; replace it by running the "
                               "command that made it with --overwrite")
        start = min(start, check.first_bad_step)
    if not_resumable and 0 < start < steps:
        # their state (e.g. a step-0 basis) is not in the store: continuing would be wrong
        raise StoreError(f"cannot resume {path} at step {start}: probe {not_resumable[0]} carries state "
                         "across steps and cannot continue mid-way; rerun it with --overwrite")
    if start < steps and layout.step_complete[start:].any():
        group[STEP_COMPLETE][start:] = False  # steps to redo are not complete
    meta["nonfinite"] = nonfinite_before(meta.get("nonfinite") or {}, layout.arrays, start)
    if command is not None:
        meta.setdefault("command", command)
    meta.update(status="running", error=None, finished=None, runs=list(meta.get("runs", [])) + [now()])
    group.attrs[ATTR_KEY] = meta
    return group, meta, start


def trajectory_at(group: Any, path: Path, step: int) -> tuple[np.ndarray, np.ndarray]:
    """The stored latents and generator states before ``step`` (> 0), in the store's layout
    (``[replica,] sample, ...``)."""
    lat = np.asarray(group[LATENTS][step])
    if lat.size and np.isnan(lat).all():  # never written (fill value): nothing to continue from
        raise DamagedStore(f"cannot resume {path}: the latents before step {step} are missing; "
                           "replace it by running the command that made it with --overwrite")
    return lat, rng_state_at(group, step)


def rng_state_at(group: Any, step: int) -> np.ndarray:
    """The generators' state before ``step``: the last row written at or before it.

    A row is written only when some generator moved (:class:`.steps.StepLog`); unwritten rows
    hold the fill value 0, which no torch generator state is (it starts with a non-zero seed).
    """
    arr = group[RNG_STATE]
    for k in range(step, -1, -1):
        row = np.asarray(arr[k])
        if row.any():
            return row
    raise StoreError("the store holds no RNG state to resume from")
