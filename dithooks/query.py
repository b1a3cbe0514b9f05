"""Reductions of captured values to small tables (what ``dithooks query`` prints)."""

from __future__ import annotations

from typing import Any

import numpy as np

from .errors import DithooksError
from .store.reader import Selection

REDUCTIONS = ("norm", "mean", "std", "rms", "absmax", "none")
INDEX_DIMS = ("step", "layer", "cfg", "replica", "sample", "latent_step")


def reduce_selection(sel: Selection, how: str = "norm", over: list[str] | None = None) -> Selection:
    """Reduce the value dims (all non-index dims unless ``over`` names some) with ``how``.

    ``norm`` is the L2 norm, ``rms`` the root mean square, ``absmax`` the largest magnitude.
    """
    if how not in REDUCTIONS:
        raise DithooksError(f"unknown reduction {how!r}; choose one of {', '.join(REDUCTIONS)}")
    if how == "none":
        return sel
    over = over or [d for d in sel.dims if d not in INDEX_DIMS]
    missing = [d for d in over if d not in sel.dims]
    if missing:
        raise DithooksError(f"cannot reduce over {missing[0]!r}: {sel.name} has dims {', '.join(sel.dims)}")
    axes = tuple(sel.dims.index(d) for d in over)
    v = sel.values.astype(np.float64)
    if how == "norm":
        r = np.sqrt((v**2).sum(axis=axes))
    elif how == "mean":
        r = v.mean(axis=axes)
    elif how == "std":
        r = v.std(axis=axes)
    elif how == "rms":
        r = np.sqrt((v**2).mean(axis=axes))
    else:
        r = np.abs(v).max(axis=axes)
    dims = tuple(d for d in sel.dims if d not in over)
    return Selection(sel.name, r, dims, {d: sel.coords[d] for d in dims})


def to_records(sel: Selection, value_name: str = "value") -> list[dict[str, Any]]:
    """One record per element: its coordinates and its value (for tables, JSON, CSV)."""
    grids = np.meshgrid(*[sel.coords[d] for d in sel.dims], indexing="ij") if sel.dims else []
    flat_vals = sel.values.reshape(-1)
    records = []
    for i, v in enumerate(flat_vals):
        rec = {d: _plain(g.reshape(-1)[i]) for d, g in zip(sel.dims, grids)}
        rec[value_name] = float(v)
        records.append(rec)
    return records


def _plain(x: Any) -> Any:
    return x.item() if hasattr(x, "item") else x
