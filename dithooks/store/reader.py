"""Reading capture stores: what they hold, and slices of one hook point.

What is read is what was written, or nothing:

* a step that ``step_complete`` does not mark is refused (:class:`IncompleteStepsError`, one line
  naming the complete steps) unless the caller passes ``allow_incomplete=True``; then it is read,
  an :class:`IncompleteDataWarning` says so, and whatever was never written is NaN - never the
  array's fill value (0 in stores written before the fill became NaN);
* a chunk missing from a step that *is* marked complete (a deleted file) is damage: refused
  (:class:`MissingChunkError`), or NaN with a warning under ``allow_incomplete``;
* a chunk or ``zarr.json`` that cannot be decoded is :class:`CorruptStoreError` (NaN with a
  warning under ``allow_incomplete`` for chunks; metadata is always refused).

``step_complete`` plus the existence of each chunk is the truth; the fill value is never trusted.
``rng_state`` is the one sparse array (a row is written only when a generator moved), so its
missing rows read as 0 without complaint.

Selections use basic slicing wherever a dim's selection is a range (contiguous or strided), read
only the chunks - and for uncompressed chunks only the bytes - they cover, and keep the stored
dtype (bf16 becomes float32). Reading never imports torch or zarr-python (see ``zarrio``).
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from ..errors import DithooksError, StoreError
from ..hookpoints import layer_template, store_array_name, unknown_name_message
from .codecs import decode
from ..lists import parse_spans, split_items
from .layout import COORDS, RNG_STATE, STEP_COMPLETE, is_coordinate, is_layer_dim
from .metadata import ATTR_KEY, completeness
from .storage import as_path, zarr_store
from .zarrio import ArrayMeta, ArrayReader, Block, ChunkMissing, CorruptStoreError, blocks, out_shape, read_json

# arrays whose missing chunks are by design (read as their fill value, no completeness checks)
SPARSE = (RNG_STATE,)
UNCHECKED = COORDS + (STEP_COMPLETE,) + SPARSE  # and the partial layer coordinates (is_coordinate)

__all__ = ["ArrayInfo", "CaptureStore", "CorruptStoreError", "IncompleteDataWarning", "IncompleteStepsError",
           "MissingChunkError", "Selection", "SelectionError", "ValueRange", "open_store", "parse_index"]


class SelectionError(DithooksError, ValueError):
    """A malformed or impossible selection (``--step abc``, ``0:50:0``, an unknown dim, ...)."""


class IncompleteStepsError(StoreError):
    """A read of steps that ``step_complete`` does not mark (allow with ``allow_incomplete``)."""


class MissingChunkError(StoreError):
    """A chunk file (or a chunk in a shard) that should be there and is not."""


class IncompleteDataWarning(UserWarning):
    """Data read with ``allow_incomplete``: some steps are not complete or some chunks read as NaN."""


# loud: every such read warns, not only the first from each line of code
warnings.filterwarnings("always", category=IncompleteDataWarning)


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
    """Values of one array after selecting along its index dims (step, layer, cfg, sample, ...).

    ``missing`` counts the chunks that read as NaN (only ever non-zero with ``allow_incomplete``);
    ``incomplete_steps`` lists selected steps that ``step_complete`` does not mark.
    """

    name: str
    values: np.ndarray
    dims: tuple[str, ...]
    coords: dict[str, np.ndarray]
    missing: int = 0
    incomplete_steps: list[int] = field(default_factory=list)
    reduced: tuple[str, ...] = ()   # dims a reduction removed (query.reduce_*)


@dataclass(frozen=True)
class ValueRange:
    """An inclusive range ``lo-hi`` of coordinate values (``hi`` None: open, ``20-``)."""

    lo: int
    hi: int | None = None


@dataclass
class Plan:
    """A resolved selection of one array, before reading: per-dim slices/positions and coords."""

    meta: ArrayMeta
    reader: ArrayReader
    index: tuple[slice | np.ndarray, ...]
    dims: tuple[str, ...]
    coords: dict[str, np.ndarray]
    incomplete_steps: list[int]
    bad: dict[tuple[int, ...], str]   # chunk -> why it reads as NaN (missing / corrupt), filled by check
    allow: bool = False
    sparse: bool = False              # missing chunks read as the fill value (rng_state)
    fill: set = field(default_factory=set)  # missing chunks read as the fill value (format-1 int/bool arrays)

    @property
    def shape(self) -> tuple[int, ...]:
        return out_shape(self.index)

    @property
    def dtype(self) -> np.dtype:
        """The dtype values come in: the stored one (bf16 -> float32), made NaN-capable if anything
        in the selection reads as NaN."""
        m = self.meta
        dt = np.dtype(np.float32) if m.attrs.get("dithooks_dtype") == "bfloat16" else \
            m.dtype if m.dtype is not None else np.dtype(object)
        return nan_dtype(dt) if self.bad else dt

    def blocks(self) -> Iterator[Block]:
        return blocks(self.meta, self.index)


class CaptureStore:
    """A capture store opened read-only (``xarray.open_zarr`` reads the same files).

    ``allow_incomplete`` is the default for :meth:`select` (see the module docstring).
    ``path`` may be an object-store URL (``s3://bucket/run.zarr``); ``storage_options`` (fsspec's:
    ``endpoint_url``, ``key``, ``secret``, ...) then say how to reach it (else the environment).
    """

    def __init__(self, path: str | Path, allow_incomplete: bool = False,
                 storage_options: dict[str, Any] | None = None):
        self.path = as_path(path, storage_options)
        self.allow_incomplete = allow_incomplete
        if not self.path.exists():
            raise StoreError(f"no store at {self.path}")
        if not (self.path / "zarr.json").is_file():
            raise StoreError(f"{self.path} is not a Zarr store (no zarr.json)" if self.path.is_dir()
                             else f"{self.path} is not a Zarr store (not a directory)")
        root = read_json(self.path / "zarr.json", "store")
        attrs = root.get("attributes") or {}
        if root.get("node_type") != "group" or ATTR_KEY not in attrs:
            raise StoreError(f"{self.path} is a Zarr store but not a dithooks capture (no '{ATTR_KEY}' metadata)")
        self.meta: dict[str, Any] = dict(attrs[ATTR_KEY])
        self._metas: dict[str, ArrayMeta] = {}
        self._readers: dict[str, ArrayReader] = {}
        self._coords: dict[str, np.ndarray] = {}
        self._names: list[str] | None = None
        self._group = None

    @property
    def group(self):
        """The store as a zarr-python group (imported on first use; the reader does not need it)."""
        if self._group is None:
            import zarr

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                self._group = zarr.open_group(zarr_store(self.path, read_only=True), mode="r",
                                              use_consolidated=False)
        return self._group

    # -- what is in it -----------------------------------------------------------------------
    def array_names(self) -> list[str]:
        if self._names is None:
            self._names = sorted(p.name for p in self.path.iterdir()
                                 if p.is_dir() and (p / "zarr.json").is_file() and not is_coordinate(p.name)
                                 and self._is_array(p.name))
        return list(self._names)

    def _is_array(self, name: str) -> bool:
        try:
            return read_json(self.path / name / "zarr.json", name).get("node_type") == "array"
        except StoreError:
            return True  # a damaged array is still listed; reading it says what is wrong

    def array_meta(self, name: str) -> ArrayMeta:
        if name not in self._metas:
            if not (self.path / name / "zarr.json").exists():
                raise StoreError(f"{self.path} has no array {name!r}")
            self._metas[name] = ArrayMeta.load(self.path, name)
        return self._metas[name]

    def _reader(self, name: str) -> ArrayReader:
        if name not in self._readers:
            self._readers[name] = ArrayReader(self.array_meta(name))
        return self._readers[name]

    def array_info(self, name: str) -> ArrayInfo:
        m = self.array_meta(name)
        item = m.dtype.itemsize if m.dtype is not None else 8
        logical = int(np.prod(m.shape)) * item
        stored = sum(f.stat().st_size for f in m.dir.rglob("*") if f.is_file())
        dtype = str(m.attrs.get("dithooks_dtype", m.dtype if m.dtype is not None else "string"))
        return ArrayInfo(name, m.dims, m.shape, dtype, logical, stored, m.attrs.get("hook"))

    def coord(self, name: str) -> np.ndarray:
        """A whole coordinate (or other small) array; empty if the store has none of that name."""
        if name not in self._coords:
            if not (self.path / name / "zarr.json").exists():
                return np.array([])
            self._coords[name] = self._read_all(name)
        return self._coords[name]

    def _read_all(self, name: str) -> np.ndarray:
        m = self.array_meta(name)
        r = self._reader(name)
        index = tuple(slice(0, n, 1) for n in m.shape)
        out = np.full(m.shape, m.fill_value, dtype=m.dtype if m.dtype is not None else object)
        for b in blocks(m, index):
            try:
                out[b.out] = r.read_block(b)
            except ChunkMissing:
                if name not in SPARSE:
                    raise MissingChunkError(f"{self.path} is damaged: {r.describe(b.chunk)} is missing") from None
        return decode(out, m.attrs)

    def step_complete(self) -> np.ndarray:
        """Which steps are on disk (``step_complete``; an unwritten chunk of it means not complete)."""
        if "step_complete" not in self._coords:
            if not (self.path / "step_complete" / "zarr.json").exists():
                raise CorruptStoreError(f"{self.path} is damaged: its step_complete array is missing, so "
                                        "which steps are on disk is unknown")
            m = self.array_meta("step_complete")
            r = self._reader("step_complete")
            out = np.zeros(m.shape, dtype=bool)
            for b in blocks(m, tuple(slice(0, n, 1) for n in m.shape)):
                try:
                    out[b.out] = r.read_block(b).astype(bool)
                except ChunkMissing:
                    pass  # never marked
            self._coords["step_complete"] = out
        return self._coords["step_complete"]

    def completeness(self) -> dict[str, Any]:
        info = completeness(self.step_complete())
        info["status"] = self.meta.get("status")
        if self.meta.get("status") == "running" and not info["complete"]:
            # nothing is running it now unless another process is: it was killed mid-way
            info["status"] = "incomplete"
        return info

    # -- slices ------------------------------------------------------------------------------
    def resolve(self, hook: str) -> tuple[str, int | None]:
        """A hook name (``blocks.3.resid_post``), template or array name -> (array, layer or None)."""
        names = self.array_names()
        if hook in names:
            return hook, None
        template, layer = layer_template(hook)
        array = store_array_name(hook) if layer is not None else hook.replace("{i}.", "").replace("*.", "")
        if array in names:
            if layer is not None:
                ldim = self._layer_dim(array) or "layer"
                have = self.coord(ldim).tolist()
                if layer not in have:
                    where = "" if ldim == "layer" else f" for {array} (its point exists only in some blocks)"
                    raise StoreError(f"layer {layer} was not captured in {self.path}{where} "
                                     f"(captured: {_compact(have)})")
            return array, layer
        if is_coordinate(hook) and (self.path / hook / "zarr.json").exists():
            return hook, None
        raise StoreError(unknown_name_message(hook, names).replace("unknown hook point", "no array or hook point")
                         .replace("`dithooks hooks` lists them all", f"`dithooks ls {self.path}` lists the store"))

    def plan(self, hook: str, allow_incomplete: bool | None = None, **sel: Any) -> Plan:
        """Resolve ``hook`` and ``sel`` to what will be read, and check it may be read.

        Raises :class:`IncompleteStepsError`, :class:`MissingChunkError` or
        :class:`CorruptStoreError` unless ``allow_incomplete``; then warns
        (:class:`IncompleteDataWarning`) and marks what reads as NaN in ``plan.bad``.
        """
        allow = self.allow_incomplete if allow_incomplete is None else allow_incomplete
        array, layer = self.resolve(hook)
        if layer is not None:
            if sel.get("layer") is not None:
                raise SelectionError(f"{hook} already selects layer {layer}: give the layer once "
                                     f"(or query {store_array_name(hook)} with a layer selection)")
            sel = {**sel, "layer": layer}
        m = self.array_meta(array)
        ldim = self._layer_dim(array)
        if ldim not in (None, "layer") and "layer" in sel:  # a point only some blocks have
            sel = {(ldim if d == "layer" else d): v for d, v in sel.items()}
        unknown = [d for d in sel if d not in m.dims and sel[d] is not None]
        if unknown:
            raise SelectionError(f"{array} has no dimension {unknown[0]!r} (its dims: {', '.join(m.dims)})")
        index, coords = [], {}
        for d, n in zip(m.dims, m.shape):
            values = self._coord_values(d, n)
            pos = positions(d, values, sel.get(d))
            index.append(pos)
            coords[d] = values[pos] if isinstance(pos, slice) else values[pos]
        plan = Plan(m, self._reader(array), tuple(index), m.dims, coords, [], {}, allow, sparse=array in SPARSE)
        self._check(plan, allow)
        return plan

    def select(self, hook: str, allow_incomplete: bool | None = None, **sel: Any) -> Selection:
        """Read ``hook`` restricted to ``sel`` (dim -> int, list, slice or :class:`ValueRange`).

        ``layer`` selects by block index (``-1``: the last captured block; a range selects the
        captured blocks in it), ``cfg``/``replica`` by name (``cond``/``uncond``, ``a``/``b``), other
        dims by position. Every dim is kept (an int selects a length-1 dim). Only the chunks covering
        the selection are read; the stored dtype is kept (bf16 -> float32; NaN where data is
        missing forces a float dtype).
        """
        plan = self.plan(hook, allow_incomplete, **sel)
        values = self.read(plan)
        return Selection(plan.meta.name, values, plan.dims, plan.coords, len(plan.bad), plan.incomplete_steps)

    def read(self, plan: Plan) -> np.ndarray:
        """All of a plan's values in one array (use :meth:`iter_values` to go chunk by chunk)."""
        out = np.empty(plan.shape, dtype=plan.dtype)
        for b, v in self.iter_values(plan):
            if v.dtype.kind == "f" and out.dtype.kind in "biu":  # a chunk found damaged while reading
                out = out.astype(nan_dtype(out.dtype))
            assign(out, b.out, v)
        return out

    def iter_values(self, plan: Plan) -> Iterator[tuple[Block, np.ndarray]]:
        """Each block of the plan (at most one chunk) with its decoded values: NaN for chunks in
        ``plan.bad`` or found damaged under ``allow``; the fill value where a missing chunk is by
        design (``plan.sparse``, ``plan.fill``)."""
        m = plan.meta
        for b in plan.blocks():
            if b.chunk not in plan.bad:
                try:
                    if b.chunk not in plan.fill:
                        yield b, decode(plan.reader.read_block(b), m.attrs)
                        continue
                except ChunkMissing:
                    if not (plan.sparse or plan.allow):
                        raise MissingChunkError(f"{self.path} is damaged: {plan.reader.describe(b.chunk)} "
                                                "is missing") from None
                    if plan.sparse:
                        plan.fill.add(b.chunk)
                except CorruptStoreError as e:
                    if not plan.allow:
                        raise
                    warnings.warn(f"{e}; read as NaN", IncompleteDataWarning, stacklevel=2)
                if b.chunk in plan.fill:
                    fill = np.full(out_shape(b.local), m.fill_value, dtype=m.dtype if m.dtype is not None else object)
                    yield b, decode(fill, m.attrs)
                    continue
                plan.bad[b.chunk] = "unreadable"
            yield b, np.full(out_shape(b.local), np.nan, dtype=nan_dtype(plan.dtype))

    # -- checks ------------------------------------------------------------------------------
    def _check(self, plan: Plan, allow: bool) -> None:
        m = plan.meta
        if m.name in UNCHECKED or is_coordinate(m.name):
            return
        done = self.step_complete()
        for d, step_of in (("step", 0), ("latent_step", 1)):  # latent_step k > 0 is x after step k - 1
            if d in plan.dims and m.shape[m.dims.index(d)] == done.size + step_of:
                pos = np.arange(m.shape[m.dims.index(d)])[plan.index[m.dims.index(d)]]
                steps = pos - step_of
                steps = steps[(steps >= 0) & (steps < done.size)]
                plan.incomplete_steps = sorted(set(plan.incomplete_steps) | set(steps[~done[steps]].tolist()))
        if plan.incomplete_steps and not allow:
            where = f"{m.name}: step{'s' if len(plan.incomplete_steps) > 1 else ''} " \
                    f"{_compact(plan.incomplete_steps)} {'are' if len(plan.incomplete_steps) > 1 else 'is'} " \
                    f"not complete in {self.path}"
            have = _compact(np.flatnonzero(done).tolist()) or "none"
            raise IncompleteStepsError(f"{where} (complete steps: {have}); select complete steps, or allow "
                                       "incomplete data (--allow-incomplete) to read them with NaN where never written")
        if plan.sparse:
            return
        # format 1 wrote no chunk that equalled the fill value (0): a missing chunk of an integer or
        # bool array may be all 0/False; a float chunk of exact zeros is taken to be damage
        fill_ok = int(self.meta.get("format_version", 1)) < 2 and m.dtype is not None and \
            m.dtype.kind in "biu" and m.attrs.get("dithooks_dtype") != "bfloat16"
        step_dim = m.dims.index("step") if "step" in m.dims else None
        missing_done, n_blocks = [], 0
        for b in plan.blocks():
            n_blocks += 1
            if b.chunk in plan.bad:
                continue
            try:
                present = plan.reader.exists(b.chunk)
            except CorruptStoreError as e:
                if not allow:
                    raise
                plan.bad[b.chunk] = str(e)
                continue
            if present:
                continue
            if step_dim is not None:
                lo = b.chunk[step_dim] * m.inner[step_dim]
                chunk_steps = range(lo, min(lo + m.inner[step_dim], done.size))
                on_done = any(done[s] for s in chunk_steps)
            else:
                on_done = bool(done.all())
            if on_done and fill_ok:
                plan.fill.add(b.chunk)
                continue
            plan.bad[b.chunk] = "missing"
            if on_done:
                missing_done.append(b.chunk)
        if plan.bad and not allow:
            c = missing_done[0] if missing_done else next(iter(plan.bad))
            n = len(plan.bad)
            why = ("although its step is marked complete" if step_dim is not None and missing_done
                   else "although the store is complete" if missing_done else "(never written)")
            raise MissingChunkError(
                f"{self.path} is damaged: {plan.reader.describe(c)} is missing {why}"
                f"{f' ({n} missing chunks in this selection)' if n > 1 else ''}; it is not read as zeros - "
                "`dithooks verify` checks the whole store, --allow-incomplete reads missing data as NaN")
        if allow and (plan.bad or plan.incomplete_steps):
            parts = []
            if plan.incomplete_steps:
                parts.append(f"steps {_compact(plan.incomplete_steps)} are not marked complete")
            if plan.bad:
                parts.append(f"{len(plan.bad)} of {n_blocks} chunks were never written or are damaged and read as NaN")
            warnings.warn(f"reading incomplete data from {self.path} ({m.name}): " + "; ".join(parts),
                          IncompleteDataWarning, stacklevel=3)

    def _layer_dim(self, array: str) -> str | None:
        """The array's layer dim: ``layer``, a partial one (``layer_0-22``), or None."""
        return next((d for d in self.array_meta(array).dims if is_layer_dim(d)), None)

    def _coord_values(self, dim: str, n: int) -> np.ndarray:
        c = self.coord(dim) if is_coordinate(dim) else np.array([])
        return c if c.size == n else np.arange(n)


def open_store(path: str | Path, allow_incomplete: bool = False,
               storage_options: dict[str, Any] | None = None) -> CaptureStore:
    return CaptureStore(path, allow_incomplete=allow_incomplete, storage_options=storage_options)


# -- selections ----------------------------------------------------------------------------
def nan_dtype(dtype: np.dtype) -> np.dtype:
    """A dtype that can hold NaN for values of ``dtype`` (floats keep theirs)."""
    if dtype.kind == "f":
        return dtype
    if dtype.kind in "biu" and dtype.itemsize <= 2:
        return np.dtype(np.float32)
    return np.dtype(np.float64) if dtype.kind in "biu" else dtype


def assign(out: np.ndarray, where: tuple[Any, ...], values: np.ndarray) -> None:
    """``out[where] = values`` with per-dim slices or position arrays (orthogonal indexing)."""
    if all(isinstance(w, slice) for w in where):
        out[where] = values
    else:
        out[np.ix_(*[np.arange(w.start, w.stop) if isinstance(w, slice) else w for w in where])] = values


def positions(dim: str, values: np.ndarray, want: Any) -> slice | np.ndarray:
    """Positions along ``dim`` (coordinate ``values``) that ``want`` selects: a slice with step > 0
    when they form a range (so reading uses basic slicing), else an int array."""
    n = len(values)
    if want is None:
        return slice(0, n, 1)
    if isinstance(want, slice):
        try:
            start, stop, step = want.indices(n)
        except (TypeError, ValueError) as e:
            raise SelectionError(f"bad {dim} slice {_slice_text(want)}: {e}") from None
        if step > 0:
            return slice(start, max(start, stop), step)
        return _as_range(np.arange(start, stop, step))
    if isinstance(want, range):
        want = list(want)
    items = list(want) if isinstance(want, (list, tuple, np.ndarray)) else [want]
    if not items:
        raise SelectionError(f"empty {dim} selection")
    out: list[int] = []
    for w in items:
        out.extend(_item_positions(dim, values, w))
    return _as_range(np.array(out, dtype=np.int64))


def _item_positions(dim: str, values: np.ndarray, w: Any) -> list[int]:
    n = len(values)
    if isinstance(w, ValueRange):
        if is_layer_dim(dim):
            vals = values.astype(np.int64)
            hi = vals.max() if w.hi is None else w.hi
            hits = np.flatnonzero((vals >= w.lo) & (vals <= hi)).tolist()
            if not hits:
                raise SelectionError(f"no captured layer in {w.lo}-{'' if w.hi is None else w.hi} "
                                     f"(captured: {_compact(vals.tolist())})")
            return hits
        hi = n - 1 if w.hi is None else w.hi
        if w.lo >= n or hi >= n:
            raise SelectionError(f"{dim} {w.lo}-{'' if w.hi is None else w.hi} is out of range: "
                                 f"the store has {dim} 0-{n - 1}")
        return list(range(w.lo, hi + 1))
    if isinstance(w, (bool, np.bool_, float, np.floating)):
        raise SelectionError(f"{dim} {w!r} is not an index (whole numbers, ranges or names)")
    if isinstance(w, str) and _INT.match(w.strip()):
        w = int(w)
    if is_layer_dim(dim):  # block indices; -1 is the last captured block
        vals = values.astype(np.int64).tolist()
        if not isinstance(w, (int, np.integer)):
            raise SelectionError(f"layer {w!r} is not a block index")
        if w < 0 and -len(vals) <= w:
            return [len(vals) + int(w)]
        if int(w) in vals:
            return [vals.index(int(w))]
        raise SelectionError(f"layer {w} is not in the store (captured: {_compact(vals)})")
    if isinstance(w, str):  # names: cfg cond/uncond, replica a/b
        names = [str(v) for v in values.tolist()]
        if w in names:
            return [names.index(w)]
        raise SelectionError(f"{dim} {w!r} is not in the store (it has {', '.join(names)})")
    if not isinstance(w, (int, np.integer)):
        raise SelectionError(f"{dim} {w!r} is not a position")
    i = int(w)
    if not -n <= i < n:
        raise SelectionError(f"{dim} {i} is out of range: the store has {dim} 0-{n - 1}")
    return [i % n]


def _as_range(pos: np.ndarray) -> slice | np.ndarray:
    if pos.size == 1 or (pos.size > 1 and np.all(np.diff(pos) == pos[1] - pos[0]) and pos[1] > pos[0]):
        step = int(pos[1] - pos[0]) if pos.size > 1 else 1
        return slice(int(pos[0]), int(pos[-1]) + 1, step)
    return pos


def _slice_text(s: slice) -> str:
    return ":".join("" if v is None else str(v) for v in (s.start, s.stop, s.step))


def _compact(ints: Sequence[int]) -> str:
    from ..layers import format_layers

    return format_layers(sorted(int(i) for i in ints))


_INT = re.compile(r"^-?\d+$")
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def parse_index(spec: str | None, option: str = "--step", names: bool = False) -> Any:
    """CLI index text -> a selection for :meth:`CaptureStore.select`.

    ``5``, ``-1`` (the last), ``0:10``, ``::2``, ``-5:`` (Python slices, positions), ``0,5,9``,
    ``3-7`` (inclusive), ``20-`` (20 to the end), and names such as ``cond`` where ``names`` is
    true. Anything else raises :class:`SelectionError` with a one-line message.
    """
    if spec is None:
        return None
    text = spec.strip()
    usage = f"use e.g. 5, -1, 0:10, ::2, 0,5,9, 3-7 or 20-{' or a name' if names else ''}"
    if text == "" or text == "all":
        if text == "":
            raise SelectionError(f"empty {option}: {usage}, or leave it out for all")
        return None
    if ":" in text:
        parts = text.split(":")
        if len(parts) > 3 or not all(p.strip() == "" or _INT.match(p.strip()) for p in parts):
            raise SelectionError(f"malformed {option} {spec!r}: a slice is start:stop[:step] of whole numbers; {usage}")
        nums = [int(p) if p.strip() else None for p in parts]
        if len(nums) == 3 and nums[2] == 0:
            raise SelectionError(f"malformed {option} {spec!r}: a slice step cannot be 0")
        return slice(*nums)
    out: list[Any] = []
    example = usage[len("use e.g. "):]
    # the list syntax (items, "a-b" and open "a-" ranges) is dithooks.lists'; what an item means here
    # (positions, block indices, names, negative indices from the end) is the reader's
    for item in split_items(spec, option, example=example, error=SelectionError):
        if _INT.match(item):
            out.append(int(item))
        elif names and _NAME.match(item):
            out.append(item)
        else:
            try:
                (span,) = parse_spans(item, option, open_ended=True, example=example, error=SelectionError)
            except SelectionError:
                span = None
            if span is None or span.first < 0:  # a range of positions starts at 0 or later
                raise SelectionError(f"malformed {option} {spec!r}: {item!r} is not an index; {usage}")
            if span.last is not None and span.last < span.first:
                raise SelectionError(f"malformed {option} {spec!r}: empty range {item!r}")
            out.append(ValueRange(span.first, span.last))
    return out if len(out) != 1 else out[0]
