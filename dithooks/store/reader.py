"""Reading capture stores: what they hold, and slices of one hook point."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import zarr

from ..errors import StoreError
from ..hookpoints import layer_template, store_array_name, unknown_name_message
from .codecs import decode
from .metadata import ATTR_KEY, completeness

COORDS = ("step", "timestep", "layer", "sample", "label", "seed", "cfg", "latent_step", "replica")


@dataclass(frozen=True)
class ArrayInfo:
    name: str
    dims: tuple[str, ...]
    shape: tuple[int, ...]
    dtype: str
    nbytes_logical: int
    nbytes_stored: int
    hook: str | None


@dataclass
class Selection:
    """Values of one array after selecting along its index dims (step, layer, cfg, sample, ...)."""

    name: str
    values: np.ndarray
    dims: tuple[str, ...]
    coords: dict[str, np.ndarray]


class CaptureStore:
    """A capture store opened read-only (``xarray.open_zarr`` reads the same files)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.exists():
            raise StoreError(f"no store at {self.path}")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                self.group = zarr.open_group(str(self.path), mode="r", use_consolidated=False)
        except Exception:
            raise StoreError(f"{self.path} is not a Zarr store") from None
        if ATTR_KEY not in self.group.attrs:
            raise StoreError(f"{self.path} is a Zarr store but not a dithooks capture (no '{ATTR_KEY}' metadata)")
        self.meta: dict[str, Any] = dict(self.group.attrs[ATTR_KEY])

    # -- what is in it -----------------------------------------------------------------------
    def completeness(self) -> dict[str, Any]:
        info = completeness(np.asarray(self.group["step_complete"][...]))
        info["status"] = self.meta.get("status")
        if self.meta.get("status") == "running" and not info["complete"]:
            # nothing is running it now unless another process is: it was killed mid-way
            info["status"] = "incomplete"
        return info

    def array_names(self) -> list[str]:
        return sorted(k for k in self.group.array_keys() if k not in COORDS)

    def array_info(self, name: str) -> ArrayInfo:
        a = self.group[name]
        logical = int(np.prod(a.shape)) * a.dtype.itemsize if a.shape else a.dtype.itemsize
        stored = sum(f.stat().st_size for f in (self.path / name).rglob("*") if f.is_file())
        return ArrayInfo(name, tuple(a.metadata.dimension_names or ()), tuple(a.shape),
                         str(a.attrs.get("dithooks_dtype", a.dtype)), logical, stored, a.attrs.get("hook"))

    def coord(self, name: str) -> np.ndarray:
        return np.asarray(self.group[name][...]) if name in self.group else np.array([])

    # -- slices ------------------------------------------------------------------------------
    def resolve(self, hook: str) -> tuple[str, int | None]:
        """A hook name (``blocks.3.resid_post``), template or array name -> (array, layer or None)."""
        names = self.array_names()
        if hook in names:
            return hook, None
        template, layer = layer_template(hook)
        array = store_array_name(hook) if layer is not None else hook.replace("{i}.", "").replace("*.", "")
        if array in names:
            if layer is not None and layer not in self.coord("layer").tolist():
                raise StoreError(f"layer {layer} was not captured in {self.path} "
                                 f"(captured: {self.coord('layer').tolist()})")
            return array, layer
        raise StoreError(unknown_name_message(hook, names).replace("`dithooks hooks` lists them all",
                                                                    "`dithooks ls` lists the store"))

    def select(self, hook: str, **sel: Any) -> Selection:
        """Read ``hook`` restricted to ``sel`` (dim -> int, list or slice, in coordinate values).

        Only the chunks covering the selection are read. ``layer`` selects by block index and
        ``cfg`` by name (``cond``/``uncond``); other dims by position.
        """
        array, layer = self.resolve(hook)
        if layer is not None:
            sel = {**sel, "layer": layer}
        a = self.group[array]
        dims = tuple(a.metadata.dimension_names)
        unknown = [d for d in sel if d not in dims and sel[d] is not None]
        if unknown:
            raise StoreError(f"{array} has no dimension {unknown[0]!r} (its dims: {', '.join(dims)})")
        index: list[Any] = []
        coords: dict[str, np.ndarray] = {}
        for d, n in zip(dims, a.shape):
            positions = self._positions(d, n, sel.get(d))
            index.append(positions)
            coords[d] = self._coord_values(d, n)[positions]
        values = a.oindex[tuple(index)]
        values = decode(np.asarray(values), dict(a.attrs))
        return Selection(array, values, dims, coords)

    def _coord_values(self, dim: str, n: int) -> np.ndarray:
        c = self.coord(dim) if dim in COORDS else np.array([])
        return c if c.size == n else np.arange(n)

    def _positions(self, dim: str, n: int, want: Any) -> np.ndarray:
        values = self._coord_values(dim, n)
        if want is None:
            return np.arange(n)
        if isinstance(want, slice):
            return np.arange(n)[want]
        wants = list(want) if isinstance(want, (list, tuple, np.ndarray)) else [want]
        out = []
        for w in wants:
            if dim in ("layer", "cfg", "replica"):
                hits = np.flatnonzero(np.array([str(v) for v in values.tolist()]) == str(w))
                if hits.size == 0:
                    raise StoreError(f"{dim} {w!r} is not in the store (it has {', '.join(map(str, values))})")
                out.append(int(hits[0]))
            else:
                w = int(w)
                if not -n <= w < n:
                    raise StoreError(f"{dim} {w} is out of range: the store has {dim} 0-{n - 1}")
                out.append(w % n)
        return np.array(out, dtype=int)


def open_store(path: str | Path) -> CaptureStore:
    return CaptureStore(path)


def parse_index(spec: str | None) -> Any:
    """CLI index text: ``5``, ``-1``, ``0:10``, ``::2``, ``0,5,9`` or a name like ``cond``."""
    if spec is None or spec == "" or spec == "all":
        return None
    if ":" in spec:
        parts = [int(p) if p.strip() else None for p in spec.split(":")]
        return slice(*parts)
    items: Sequence[str] = [p.strip() for p in spec.split(",") if p.strip()]
    out: list[Any] = []
    for it in items:
        if "-" in it[1:] and it.replace("-", "").isdigit():
            lo, hi = it.split("-", 1) if not it.startswith("-") else (it, it)
            out.extend(range(int(lo), int(hi) + 1))
        else:
            out.append(int(it) if it.lstrip("-").isdigit() else it)
    return out if len(out) != 1 else out[0]
