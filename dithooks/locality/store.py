"""Resumable Zarr v3 stores of a grid of cells, shared by the locality measurements.

A measurement is a grid of *cells* (e.g. one (trajectory, step) of the gap scan, one (mode,
level) of forward-backward, one window of a windowed scan). Each cell's arrays are written, then
the cell's flag in ``cell_complete`` is set; ``--resume`` skips flagged cells, so an interrupted
run continues where it stopped and a resumed store equals an unbroken one.

Layout: every array carries ``dimension_names``; a 1-D array named like a dimension is that
dimension's coordinate, so ``xarray.open_zarr(store)`` reads the store as it is. The group
attribute ``dithooks`` holds::

    {"kind": "locality-gaps" | "locality-forward-backward" | "locality-windowed",
     "format_version": 1, <request fields>, "versions": {...}, "started", "finished", "runs",
     "status": "running" | "complete" | "interrupted" | "failed", "error",
     "cell_dims": [...], "seconds": wall time of all runs,
     "summary": {"tables": [{"title": ..., "rows": [{...}, ...]}],
                 "figures": ["figures/<name>.svg", ...], "notes": ["...", ...]}}

which is the convention ``dithooks report`` renders (a PNG sits beside each listed SVG).
"""

from __future__ import annotations

import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import zarr

from ..errors import StoreError
from ..store.metadata import ATTR_KEY, jsonable, library_versions, now

FORMAT_VERSION = 1
MODES = ("create", "resume", "overwrite")
DONE = "cell_complete"


@dataclass(frozen=True)
class ArrayDef:
    dims: tuple[str, ...]
    dtype: str = "float32"


def store_mode(resume: bool, overwrite: bool) -> str:
    if resume and overwrite:
        raise StoreError("--resume and --overwrite exclude each other")
    return "resume" if resume else "overwrite" if overwrite else "create"


def read_meta(path: str | Path) -> dict[str, Any]:
    """The ``dithooks`` attribute of a store; a one-line error when it is not one."""
    try:
        g = zarr.open_group(str(path), mode="r")
        return dict(g.attrs[ATTR_KEY])
    except Exception:
        raise StoreError(f"{path} is not a dithooks store") from None


class CellStore:
    """A store whose cells (index tuples over ``cell_dims``) are written and flagged one by one."""

    def __init__(self, path: Path, group: zarr.Group):
        self.path = Path(path)
        self.group = group
        self.meta = dict(group.attrs[ATTR_KEY])
        self.cell_dims = tuple(self.meta["cell_dims"])
        self._t0 = time.perf_counter()

    # -- opening -----------------------------------------------------------------------------
    @classmethod
    def open(cls, path: str | Path, *, kind: str, request: dict[str, Any], mode: str,
             coords: dict[str, tuple[tuple[str, ...], Any]], arrays: dict[str, ArrayDef],
             sizes: dict[str, int], cell_dims: tuple[str, ...]) -> "CellStore":
        """Create (refusing an existing path), overwrite (only a dithooks store or an empty
        directory) or resume (the stored kind and request must equal this one) a store."""
        if mode not in MODES:
            raise StoreError(f"unknown store mode {mode!r}")
        path = Path(path)
        request = jsonable(request)
        exists = path.exists()
        if exists and mode == "create":
            raise StoreError(f"{path} already exists: use --resume to continue it or --overwrite to replace it")
        if exists and mode == "overwrite":
            empty = path.is_dir() and not any(path.iterdir())
            if not (empty or _is_dithooks_store(path)):
                raise StoreError(f"{path} exists and is not a dithooks store: refusing to overwrite it")
            shutil.rmtree(path)
            exists = False
        if mode == "resume":
            if not exists:
                raise StoreError(f"nothing to resume: {path} does not exist")
            return cls._reopen(path, kind, request)
        return cls._create(path, kind, request, coords, arrays, sizes, cell_dims)

    @classmethod
    def _create(cls, path, kind, request, coords, arrays, sizes, cell_dims) -> "CellStore":
        try:
            group = zarr.open_group(str(path), mode="w", zarr_format=3)
        except OSError as e:
            raise StoreError(f"cannot create {path}: {e.strerror or e}") from None
        meta = {"kind": kind, "format_version": FORMAT_VERSION, **request, "cell_dims": list(cell_dims),
                "versions": library_versions(), "started": now(), "finished": None, "runs": [now()],
                "status": "running", "error": None, "seconds": 0.0, "summary": None}
        group.attrs[ATTR_KEY] = meta
        for name, (dims, values) in coords.items():
            values = np.asarray(values)
            text = values.dtype.kind in "US"
            a = group.create_array(name=name, shape=values.shape, dtype=str if text else values.dtype,
                                   dimension_names=dims, fill_value="" if text else 0)
            a[...] = values
        for name, spec in arrays.items():
            shape = tuple(sizes[d] for d in spec.dims)
            chunks = tuple(1 if d in cell_dims else max(1, sizes[d]) for d in spec.dims)
            fill = False if spec.dtype == "bool" else 0
            group.create_array(name=name, shape=shape, chunks=chunks, dtype=spec.dtype,
                               dimension_names=spec.dims, fill_value=fill)
        done = group.create_array(name=DONE, shape=tuple(sizes[d] for d in cell_dims), dtype="bool",
                                  chunks=tuple(sizes[d] for d in cell_dims), dimension_names=cell_dims,
                                  fill_value=False)
        done[...] = False
        return cls(path, group)

    @classmethod
    def _reopen(cls, path, kind, request) -> "CellStore":
        if not _is_dithooks_store(path):
            raise StoreError(f"{path} is not a dithooks store: cannot resume it")
        group = zarr.open_group(str(path), mode="r+", zarr_format=3)
        meta = dict(group.attrs[ATTR_KEY])
        if meta.get("kind") != kind:
            raise StoreError(f"cannot resume {path}: it is a {meta.get('kind')!r} store, not {kind!r}")
        for key, value in request.items():
            if meta.get(key) != value:
                raise StoreError(f"cannot resume {path}: its {key} differs from this request "
                                 f"(stored {_short(meta.get(key))}, asked {_short(value)})")
        meta.update(status="running", error=None, finished=None, runs=list(meta.get("runs", [])) + [now()])
        group.attrs[ATTR_KEY] = meta
        return cls(path, group)

    # -- cells ---------------------------------------------------------------------------------
    def done_mask(self) -> np.ndarray:
        return np.asarray(self.group[DONE][...], dtype=bool)

    def pending(self) -> list[tuple[int, ...]]:
        """Cell indices not yet flagged complete, in C order."""
        return [tuple(int(i) for i in idx) for idx in np.argwhere(~self.done_mask())]

    def write(self, name: str, index: tuple, value: Any) -> None:
        self.group[name][index] = np.asarray(value)

    def mark(self, cell: tuple[int, ...]) -> None:
        """Flag a cell complete (after all its arrays are written: the order makes resume safe)."""
        self.group[DONE][tuple(cell)] = True

    def read(self, name: str) -> np.ndarray:
        return np.asarray(self.group[name][...])

    def coord(self, name: str) -> np.ndarray:
        return self.read(name)

    @property
    def complete(self) -> bool:
        return bool(self.done_mask().all())

    # -- closing -------------------------------------------------------------------------------
    def update_meta(self, **fields) -> None:
        meta = dict(self.group.attrs[ATTR_KEY])
        meta.update(jsonable(fields))
        self.group.attrs[ATTR_KEY] = meta
        self.meta = meta

    def consolidate(self) -> None:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                zarr.consolidate_metadata(str(self.path))
        except Exception:
            pass

    def finish(self, status: str, error: str | None = None, summary: dict | None = None) -> None:
        fields: dict[str, Any] = {"status": status, "error": error, "finished": now(),
                                  "seconds": round(float(self.meta.get("seconds") or 0.0)
                                                   + time.perf_counter() - self._t0, 3)}
        self._t0 = time.perf_counter()
        if summary is not None:
            fields["summary"] = summary
        try:
            self.update_meta(**fields)
        except Exception:  # e.g. a full disk; cell_complete still tells the truth
            pass
        self.consolidate()


def run_cells(store: CellStore, groups: Iterable[list[tuple[int, ...]]], work, progress=None) -> int:
    """Call ``work(cells)`` for each group of pending cells (it writes and marks them); keeps the
    store's status right on interruption or failure. Returns the number of cells run."""
    groups = list(groups)
    n = 0
    bar = progress(total=sum(len(g) for g in groups)) if progress else None
    try:
        for cells in groups:
            work(cells)
            n += len(cells)
            if bar is not None:
                bar.update(len(cells))
    except KeyboardInterrupt:
        store.finish("interrupted", "interrupted")
        raise
    except BaseException as e:
        store.finish("failed", f"{type(e).__name__}: {e}")
        raise
    finally:
        if bar is not None:
            bar.close()
    return n


def _is_dithooks_store(path: Path) -> bool:
    try:
        return ATTR_KEY in zarr.open_group(str(path), mode="r").attrs
    except Exception:
        return False


def _short(v: Any) -> str:
    s = repr(v)
    return s if len(s) <= 60 else s[:57] + "..."
