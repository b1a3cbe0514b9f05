"""Reductions of captured values to small tables (what ``dithooks query`` prints).

:func:`reduce_store` streams: it reads one chunk at a time (see ``CaptureStore.iter_values``),
reduces it in float64 in slabs of at most ``SLAB_ELEMENTS`` values, and folds the partial results
into the (small) output, so peak memory is bounded by a chunk, not by the selection.
:func:`reduce_selection` does the same to values already in memory. :func:`iter_rows` yields the
table rows in batches, so nothing builds a Python object per element except for rows printed.
"""

from __future__ import annotations

import math
from typing import Any, Iterator

import numpy as np

from .errors import DithooksError
from .store.layout import INDEX_DIMS, is_layer_dim
from .store.reader import CaptureStore, Selection, assign

REDUCTIONS = ("norm", "mean", "std", "rms", "absmax", "none")
SLAB_ELEMENTS = 1 << 20  # values reduced at once in float64 (8 MiB of temporaries)


def reduced_dims(dims: tuple[str, ...], name: str, how: str, over: list[str] | None) -> list[str]:
    if how not in REDUCTIONS:
        raise DithooksError(f"unknown reduction {how!r}; choose one of {', '.join(REDUCTIONS)}")
    over = list(over) if over else [d for d in dims if d not in INDEX_DIMS and not is_layer_dim(d)]
    missing = [d for d in over if d not in dims]
    if missing:
        raise DithooksError(f"cannot reduce over {missing[0]!r}: {name} has dims {', '.join(dims)}")
    return over


class Reducer:
    """Folds partial reductions of blocks into an output over the kept dims.

    norm/rms keep sum of squares; mean the sum; std (population, ddof 0) the count, mean and
    M2 combined with Chan et al.'s pairwise update; absmax the running maximum (NaN propagates).
    """

    def __init__(self, how: str, shape: tuple[int, ...], axes: tuple[int, ...], ndim: int):
        self.how, self.axes = how, axes
        self.kept = tuple(i for i in range(ndim) if i not in axes)
        oshape = tuple(shape[i] for i in self.kept)
        self.count = np.zeros(oshape)
        self.acc = np.full(oshape, -np.inf) if how == "absmax" else np.zeros(oshape)
        self.m2 = np.zeros(oshape) if how == "std" else None

    def add(self, out: tuple[Any, ...], v: np.ndarray) -> None:
        """Fold block values ``v`` whose place in the selection is ``out`` (per-dim slices/positions)."""
        for where, piece in _slabs(out, v):
            self._fold(tuple(where[i] for i in self.kept), piece)

    def _fold(self, where: tuple[Any, ...], v: np.ndarray) -> None:
        n = math.prod(v.shape[i] for i in self.axes)
        if n == 0:
            return
        x = v.astype(np.float64)
        if self.how in ("norm", "rms"):
            part = np.einsum(_sq_spec(v.ndim, self.axes), x, x)
            self._update(where, part, n, np.add)
        elif self.how == "mean":
            self._update(where, x.sum(axis=self.axes), n, np.add)
        elif self.how == "absmax":
            self._update(where, np.abs(x).max(axis=self.axes, initial=-np.inf), n, np.maximum)
        else:  # std: combine (n_a, mean_a, M2_a) with the block's (n_b, mean_b, M2_b)
            mean_b = x.mean(axis=self.axes, keepdims=True)
            d = x - mean_b
            m2_b = np.einsum(_sq_spec(v.ndim, self.axes), d, d)
            mean_b = mean_b.reshape(m2_b.shape)
            ix = _ix(where)
            na, mean_a, m2_a = self.count[ix], self.acc[ix], self.m2[ix]
            tot = na + n
            delta = mean_b - mean_a
            with np.errstate(invalid="ignore", divide="ignore"):
                self.acc[ix] = mean_a + delta * (n / tot)
                self.m2[ix] = m2_a + m2_b + delta**2 * (na * n / tot)
            self.count[ix] = tot

    def _update(self, where, part, n, op) -> None:
        ix = _ix(where)
        self.acc[ix] = op(self.acc[ix], part)
        self.count[ix] += n

    def result(self) -> np.ndarray:
        with np.errstate(invalid="ignore", divide="ignore"):
            if self.how == "norm":
                return np.sqrt(self.acc)
            if self.how == "rms":
                return np.sqrt(self.acc / self.count)
            if self.how == "mean":
                return self.acc / self.count
            if self.how == "std":
                return np.sqrt(self.m2 / self.count)
            return np.where(self.count > 0, self.acc, np.nan)


def reduce_store(store: CaptureStore, hook: str, how: str = "norm", over: list[str] | None = None,
                 allow_incomplete: bool | None = None, max_values: int | None = None, **sel: Any) -> Selection:
    """``store.select(hook, **sel)`` reduced with ``how`` over ``over`` (default: every value dim),
    streamed chunk by chunk. ``how="none"`` returns the selection itself (refused above
    ``max_values`` values, before anything is read)."""
    if how not in REDUCTIONS:
        raise DithooksError(f"unknown reduction {how!r}; choose one of {', '.join(REDUCTIONS)}")
    plan = store.plan(hook, allow_incomplete, **sel)
    over = reduced_dims(plan.dims, plan.meta.name, how, over)
    if how == "none":
        size = math.prod(plan.shape)
        if max_values is not None and size > max_values:
            raise DithooksError(f"{size} values without a reduction: narrow the selection, reduce "
                                "(--reduce norm), or use --json/--csv")
        values = store.read(plan)
        return Selection(plan.meta.name, values, plan.dims, plan.coords, len(plan.bad), plan.incomplete_steps)
    axes = tuple(plan.dims.index(d) for d in over)
    red = Reducer(how, plan.shape, axes, len(plan.dims))
    for b, v in store.iter_values(plan):
        red.add(b.out, v)
    dims = tuple(d for d in plan.dims if d not in over)
    return Selection(plan.meta.name, red.result(), dims, {d: plan.coords[d] for d in dims},
                     len(plan.bad), plan.incomplete_steps, tuple(over))


def reduce_selection(sel: Selection, how: str = "norm", over: list[str] | None = None) -> Selection:
    """Reduce the value dims (all non-index dims unless ``over`` names some) with ``how``.

    ``norm`` is the L2 norm, ``rms`` the root mean square, ``std`` the population standard
    deviation, ``absmax`` the largest magnitude. Works in float64 slabs, never on a float64 copy
    of the whole selection.
    """
    over = reduced_dims(sel.dims, sel.name, how, over)
    if how == "none":
        return sel
    axes = tuple(sel.dims.index(d) for d in over)
    red = Reducer(how, sel.values.shape, axes, len(sel.dims))
    red.add(tuple(slice(0, n, 1) for n in sel.values.shape), sel.values)
    dims = tuple(d for d in sel.dims if d not in over)
    return Selection(sel.name, red.result(), dims, {d: sel.coords[d] for d in dims},
                     sel.missing, sel.incomplete_steps, tuple(over))


# -- rows ------------------------------------------------------------------------------------
def iter_rows(sel: Selection, value_name: str = "value", extra: dict[str, tuple[str, np.ndarray]] | None = None,
              limit: int | None = None, batch: int = 4096, nan_as_none: bool = False) -> Iterator[list[dict[str, Any]]]:
    """Rows (coordinates, value, then ``extra`` columns) in batches of ``batch``, at most ``limit``.

    ``extra`` maps a column name to (dim, values indexed by that dim's coordinate), e.g. the
    timestep of each step. Values are Python floats (NaN stays NaN, or None with ``nan_as_none``).
    """
    extra = extra or {}
    shape = sel.values.shape
    total = int(np.prod(shape)) if shape else 1
    if limit is not None:
        total = min(total, limit)
    flat = sel.values.reshape(-1)
    coords = [np.asarray(sel.coords[d]) for d in sel.dims]
    for i0 in range(0, total, batch):
        i1 = min(total, i0 + batch)
        idx = np.unravel_index(np.arange(i0, i1), shape) if shape else ()
        cols = {d: _plain_list(c[ix]) for d, c, ix in zip(sel.dims, coords, idx)}
        vals = flat[i0:i1].astype(np.float64)
        cols[value_name] = vals.tolist()
        if nan_as_none and np.isnan(vals).any():
            cols[value_name] = [None if v != v else v for v in cols[value_name]]
        for name, (dim, table) in extra.items():
            if dim in sel.dims:
                ix = idx[sel.dims.index(dim)]
                cols[name] = _plain_list(np.asarray(table)[np.asarray(sel.coords[dim])[ix]])
        keys = list(cols)
        yield [dict(zip(keys, vals)) for vals in zip(*cols.values())]


def _plain_list(a: np.ndarray) -> list:
    return a.tolist() if a.dtype != object else [str(x) for x in a]


# -- helpers ---------------------------------------------------------------------------------
def _ix(where: tuple[Any, ...]) -> Any:
    if all(isinstance(w, slice) for w in where):
        return where
    return np.ix_(*[np.arange(w.start, w.stop, w.step) if isinstance(w, slice) else w for w in where])


def _sq_spec(ndim: int, axes: tuple[int, ...]) -> str:
    letters = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"[:ndim]
    kept = "".join(l for i, l in enumerate(letters) if i not in axes)
    return f"{letters},{letters}->{kept}"


def _slabs(out: tuple[Any, ...], v: np.ndarray) -> Iterator[tuple[tuple[Any, ...], np.ndarray]]:
    """Split ``v`` (placed at ``out``) along its leading axes into pieces of <= SLAB_ELEMENTS values."""
    if v.size <= SLAB_ELEMENTS or v.ndim == 0:
        yield out, v
        return
    axis = next((i for i, n in enumerate(v.shape) if n > 1), None)
    if axis is None:
        yield out, v
        return
    per = max(1, v.shape[axis] * SLAB_ELEMENTS // v.size)
    for a in range(0, v.shape[axis], per):
        b = min(v.shape[axis], a + per)
        w = out[axis]
        if isinstance(w, slice):
            st = w.step or 1
            sub = slice(w.start + a * st, w.start + b * st, st)
        else:
            sub = w[a:b]
        piece = v[(slice(None),) * axis + (slice(a, b),)]
        yield from _slabs(out[:axis] + (sub,) + out[axis + 1:], piece)
