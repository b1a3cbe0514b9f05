"""What a capture store says about itself: the request, the environment, and what it holds."""

from __future__ import annotations

import datetime as _dt
import platform
from typing import Any

import numpy as np

from ..layers import format_layers

FORMAT_VERSION = 1
ATTR_KEY = "dithooks"

# Fields of the request that must match for --resume to continue a store.
RESUME_KEYS = ("model_id", "model_config", "sampler", "seeds", "labels", "hooks", "layers",
               "storage_dtype", "compute_dtype", "extras")


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def library_versions() -> dict[str, str]:
    import diffusers
    import torch
    import zarr

    from .. import __version__

    return {"dithooks": __version__, "torch": torch.__version__, "diffusers": diffusers.__version__,
            "zarr": zarr.__version__, "numpy": np.__version__, "python": platform.python_version()}


def jsonable(obj: Any) -> Any:
    """Config dicts hold tuples, numpy scalars and the like; make them plain JSON."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items() if not str(k).startswith("_")}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating,)):
        return float(obj)
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    return str(obj)


def completeness(steps_complete: np.ndarray) -> dict[str, Any]:
    """Summary of which steps are on disk: counts, the resumable prefix and any holes."""
    done = np.flatnonzero(steps_complete).tolist()
    total = int(steps_complete.size)
    prefix = int(np.argmin(steps_complete)) if not steps_complete.all() else total
    return {"steps_total": total, "steps_complete": len(done), "complete": len(done) == total,
            "resume_from_step": prefix, "complete_steps": format_layers(done) or "none"}
