"""A small resumable results store for protocol runs: one Zarr v3 directory.

Every array carries ``dimension_names``, so ``xarray.open_zarr(path)`` opens the store as a
Dataset as it is. The group attributes hold, under ``"dithooks"``, ``{"kind": ..., "request":
..., "status": ..., ...}``. Work is cut into *cells*, each with a boolean completion flag array;
a cell's values are written before its flag, so a flag that is set means the values are on disk.
"""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import zarr

from ..errors import StoreError
from ..store.metadata import ATTR_KEY, jsonable, library_versions, now


def json_clean(obj: Any) -> Any:
    """Like :func:`jsonable`, with NaN and infinities as ``None`` (attributes are strict JSON)."""
    obj = jsonable(obj)
    if isinstance(obj, float) and not np.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: json_clean(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [json_clean(v) for v in obj]
    return obj


def _open_group(path: Path, mode: str) -> zarr.Group | None:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return zarr.open_group(str(path), mode=mode, use_consolidated=False)
    except Exception:
        return None


def store_kind(path: str | Path) -> str | None:
    """The ``kind`` a dithooks results store says it is (``"capture"`` for capture stores), or None."""
    g = _open_group(Path(path), "r")
    if g is None or ATTR_KEY not in g.attrs:
        return None
    return dict(g.attrs[ATTR_KEY]).get("kind", "capture")


class ResultsStore:
    """Create, reopen and write a results store of one ``kind``."""

    def __init__(self, path: Path, group: zarr.Group):
        self.path = Path(path)
        self.group = group

    # -- lifecycle ---------------------------------------------------------------------------
    @staticmethod
    def check_can_create(path: str | Path, kind: str, overwrite: bool = False) -> None:
        """Refuse an existing ``path`` unless ``overwrite`` (and then only a dithooks store or an empty folder)."""
        path = Path(path)
        if not path.exists():
            return
        if not overwrite:
            raise StoreError(f"{path} already exists{describe_existing(path)}: use --overwrite to replace it"
                             + (" or --resume to continue it" if store_kind(path) == kind else ""))
        empty_dir = path.is_dir() and not any(path.iterdir())
        if not (store_kind(path) is not None or empty_dir):
            raise StoreError(f"{path} exists and is not a dithooks store: refusing to overwrite it")

    @classmethod
    def create(cls, path: str | Path, kind: str, request: dict, *, overwrite: bool = False) -> "ResultsStore":
        path = Path(path)
        cls.check_can_create(path, kind, overwrite)
        if path.exists():
            shutil.rmtree(path)
        try:
            group = zarr.open_group(str(path), mode="w", zarr_format=3)
        except OSError as e:
            raise StoreError(f"cannot create {path}: {e.strerror or e}") from None
        group.attrs[ATTR_KEY] = json_clean({"kind": kind, "format_version": 1, "request": request,
                                            "status": "running", "started": now(), "finished": None,
                                            "runs": [now()], "versions": library_versions()})
        return cls(path, group)

    @classmethod
    def open(cls, path: str | Path, kind: str, mode: str = "r") -> "ResultsStore":
        path = Path(path)
        if not path.exists():
            raise StoreError(f"no store at {path}" + (": nothing to resume" if mode != "r" else ""))
        group = _open_group(path, mode)
        if group is None:
            raise StoreError(f"{path} is not a Zarr store")
        found = store_kind(path)
        if found != kind:
            raise StoreError(f"{path} is not a {kind} store (it is {found or 'not a dithooks store'})")
        return cls(path, group)

    # -- metadata ----------------------------------------------------------------------------
    @property
    def meta(self) -> dict:
        return dict(self.group.attrs[ATTR_KEY])

    def update_meta(self, **fields) -> None:
        meta = self.meta
        meta.update(json_clean(fields))
        self.group.attrs[ATTR_KEY] = meta

    def finish(self, status: str) -> None:
        """Record the status and consolidate the metadata (so xarray opens it without warnings)."""
        self.update_meta(status=status, finished=now())
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                zarr.consolidate_metadata(str(self.path))
        except Exception:  # the flags still tell the truth without consolidated metadata
            pass

    # -- arrays ------------------------------------------------------------------------------
    def coord(self, name: str, values: Sequence, dims: tuple[str, ...]) -> None:
        values = np.asarray(values)
        text = values.dtype.kind in "US"
        a = self.group.create_array(name=name, shape=values.shape, dtype=str if text else values.dtype,
                                    dimension_names=dims, fill_value="" if text else 0)
        a[...] = values

    def array(self, name: str, dims: tuple[str, ...], shape: tuple[int, ...], dtype="float32",
              chunks: tuple[int, ...] | None = None, fill=np.nan, attrs: dict | None = None) -> None:
        a = self.group.create_array(name=name, shape=tuple(shape), chunks=chunks or tuple(shape), dtype=dtype,
                                    dimension_names=dims, fill_value=fill)
        if attrs:
            a.attrs.update(json_clean(attrs))

    def has(self, name: str) -> bool:
        return name in self.group.array_keys()

    def write(self, name: str, index, values) -> None:
        self.group[name][index] = np.asarray(values)

    def read(self, name: str) -> np.ndarray:
        return np.asarray(self.group[name][...])


def describe_existing(path: Path) -> str:
    """`` (a protocol1 store, 3 of 14 cells complete, interrupted)`` or empty."""
    g = _open_group(path, "r")
    if g is None or ATTR_KEY not in g.attrs:
        return ""
    meta = dict(g.attrs[ATTR_KEY])
    kind = meta.get("kind", "capture")
    cells = meta.get("cells")
    held = f", {cells['done']} of {cells['total']} cells complete" if isinstance(cells, dict) else ""
    return f" (a {kind} store{held}, {meta.get('status', 'unknown status')})"
