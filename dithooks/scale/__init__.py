"""dithooks at scale: stores as Dask arrays, the built-in probes' offline forms as Dask graphs,
and context-parallel gathering (see docs/scaling.md).

Needs the optional extra ``scale`` (``dask[array,distributed]``); importing this package does not
import Dask, torch or zarr-python - the submodules do what they need when they are used.
"""

from __future__ import annotations

__all__ = ["StoreArray", "concat_samples", "dask_array", "difference_modes", "n_eff_summary", "routing_summary"]


def __getattr__(name: str):  # lazy: `import dithooks.scale` stays cheap and works without Dask
    if name in ("StoreArray", "concat_samples", "dask_array"):
        from . import dask_store

        return getattr(dask_store, name)
    if name in ("difference_modes", "n_eff_summary", "routing_summary"):
        from . import analysis

        return getattr(analysis, name)
    raise AttributeError(f"module 'dithooks.scale' has no attribute {name!r}")
