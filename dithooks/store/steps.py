"""Step bookkeeping of a capture store: the trajectory rows (``latents``, ``rng_state``), the
``step_complete`` marks and the non-finite counts in the metadata, written in this order for
each batch of steps so that a step is marked only after everything of it is on disk.

All writes go through the store's :class:`~dithooks.store.writer.StoreWriter` (``put`` for data,
``call`` for work that must run after the data queued before it).
"""

from __future__ import annotations

import json
from typing import Any, Sequence

import numpy as np

from .layout import LATENTS, STEP_COMPLETE, latents_spec, rng_spec, rows_kept_by_resume
from .metadata import ATTR_KEY


class StepLog:
    """Writes the per-step bookkeeping of one run into ``group`` through ``writer``.

    ``chunk_latents``: latents in chunks of several rows (:func:`.layout.latent_rows_per_chunk`),
    each rewritten whole from rows kept here; False: a chunk per row (multi-worker regions).
    ``shard_steps``: may the capture's hook arrays keep several steps in one shard (file)
    (:class:`dithooks.capture.recorder.StepRecorder`); False: a shard per step (multi-worker regions).
    ``eager_chunks``: may large steps' hook arrays get a file per chunk of layers, each written as
    soon as it is recorded (``StepRecorder._eager``); False: a shard per step (multi-worker regions,
    whose workers must all make the same ``zarr.json`` whatever their own number of samples).

    ``meta``: the store's metadata dict (updated in place when the non-finite counts change);
    ``nonfinite``: array -> {row: count}, shared with the writer, which fills it.
    """

    chunk_latents = True
    shard_steps = True
    eager_chunks = True

    def __init__(self, group: Any, writer: Any, meta: dict[str, Any], *, steps: int, num_samples: int,
                 replicas: bool, sample_coords: Sequence[str], nonfinite: dict[str, dict[Any, int]],
                 last_rng: Any = None, first_step: int = 0):
        """``first_step``: where this run starts; every step before it is marked (a resume starts at
        the first unmarked step and unmarks the steps after it, store/resume.py)."""
        self.group, self.writer, self.meta = group, writer, meta
        self._first_step = first_step
        self._marks: np.ndarray | None = None  # every step's mark, when step_complete is one chunk
        self._marks_whole: bool | None = None  # is it? (read from its layout at the first mark)
        self._latent_chunk: tuple[int, Any] | None = None  # (first row, rows) of the latents chunk being filled
        self.steps, self.n, self.replicas = steps, num_samples, replicas
        self.sample_coords = tuple(sample_coords)
        self.nonfinite = nonfinite
        self._written = json.dumps(nonfinite_json(nonfinite), sort_keys=True)
        self._last_rng = last_rng  # as stored: the next rng row is skipped if unchanged

    def write_states(self, states: Sequence[Any]) -> None:
        """Latents and RNG states of consecutive steps (sampling.TrajectoryState); latent_step k is
        x before step k (k = 0 is x_T; k = steps is the result)."""
        import torch

        n = self.n
        lats, rngs = [], []
        for state in states:
            lat, rng = state.latents, torch.stack(state.rng_states)
            if self.replicas:  # the sampler's [a-half; b-half] rows -> (replica, sample)
                lat, rng = lat.reshape((2, n) + tuple(lat.shape[1:])), rng.reshape(2, n, -1)
            lats.append(lat)
            rngs.append(rng)
        k0 = states[0].step
        spec = latents_spec(self.steps, tuple(lats[0].shape), self.replicas, self.sample_coords,
                            rows_per_chunk=None if self.chunk_latents else 1)
        if spec.chunks[0] == 1:
            self.writer.put(spec, (slice(k0, k0 + len(states)),), torch.stack(lats))
        else:
            self._put_latents(spec, k0, torch.stack(lats))
        # deterministic samplers (DDIM, eta = 0) never draw: a row is written only when a state
        # moved (resume reads the last row written, resume.rng_state_at)
        for state, rng in zip(states, rngs):
            if self._last_rng is not None and torch.equal(rng, self._last_rng):
                continue
            self._last_rng = rng
            self.writer.put(rng_spec(self.steps, tuple(rng.shape), self.replicas), (state.step,), rng)

    def _put_latents(self, spec: Any, k0: int, rows: Any) -> None:
        """Latents rows ``k0...`` in chunks of several rows: each chunk they touch is written whole
        (one atomic file, no read back) from the rows kept here; rows not known yet hold the fill
        value NaN until a later batch rewrites the chunk. A resume starting inside a chunk reads
        that chunk's earlier rows from the store first."""
        import dataclasses

        import torch

        from .writer import count_nonfinite

        # the NaN of rows not known yet is no data: the real rows' non-finite values are counted
        # here, and the counts recorded on the writer thread (in order with the writer's own
        # counts, which it keeps); the writer counts none of these chunks
        bad = count_nonfinite(rows.detach().float().cpu().numpy(), torch.float32, (slice(k0, k0 + rows.shape[0]),))
        if bad:
            self.writer.call(lambda: self.nonfinite.setdefault(LATENTS, {}).update(bad))
        spec = dataclasses.replace(spec, counted=False)
        size, total = spec.chunks[0], spec.shape[0]
        k, i, n = k0, 0, rows.shape[0]
        while i < n:
            lo = (k // size) * size
            hi = min(lo + size, total)
            if self._latent_chunk is None or self._latent_chunk[0] != lo:
                buf = torch.full((hi - lo,) + tuple(spec.shape[1:]), float("nan"), dtype=torch.float32)
                if k > lo:  # rows an earlier run wrote (a resume inside this chunk)
                    buf[:k - lo] = torch.from_numpy(np.asarray(self.group[LATENTS][lo:k], dtype=np.float32))
                self._latent_chunk = (lo, buf)
            buf = self._latent_chunk[1]
            take = min(n - i, hi - k)
            buf[k - lo:k - lo + take] = rows[i:i + take]
            self.writer.put(spec, (slice(lo, hi),), buf.clone())  # the writer owns what it is given
            k, i = k + take, i + take

    def mark_complete(self, rows: slice) -> None:
        """After the data of ``rows`` (queued before): their non-finite counts, then their marks.

        ``step_complete`` in one chunk (stores since 2026-12-02): the whole array is rewritten from
        the marks kept here (one small file per batch of steps, written atomically, no read
        back); in a chunk per step (older stores, multi-worker stores): the marked rows' files."""
        self.writer.call(self._record_nonfinite)  # counts of a step precede its mark
        if self._marks_whole is None:
            meta = getattr(self.writer.existing(STEP_COMPLETE), "meta", None)
            self._marks_whole = meta is not None and tuple(meta.outer) == (self.steps,)
            self._marks = np.arange(self.steps) < self._first_step
        if not self._marks_whole:
            self.writer.set(STEP_COMPLETE, rows, True)  # direct chunk writes (zarr's setitem: ~60 ms)
            return
        self._marks[rows] = True
        self.writer.set(STEP_COMPLETE, slice(0, self.steps), self._marks.copy())

    def nonfinite_table(self) -> dict[str, dict[str, int]]:
        return nonfinite_json(self.nonfinite)

    def _record_nonfinite(self) -> None:
        """Store the non-finite counts in the metadata when they changed (rarely: NaNs are news)."""
        table = nonfinite_json(self.nonfinite)
        text = json.dumps(table, sort_keys=True)
        if text == self._written:
            return
        self.meta["nonfinite"] = table
        self.group.attrs[ATTR_KEY] = self.meta
        self._written = text


def nonfinite_json(nonfinite: dict[str, dict[Any, int]]) -> dict[str, dict[str, int]]:
    """array -> {row: count} as stored in the metadata (rows as text, sorted)."""
    return {a: {str(k): int(v) for k, v in sorted(rows.items(), key=lambda kv: str(kv[0]))}
            for a, rows in sorted(nonfinite.items()) if rows}


def nonfinite_from_meta(table: dict | None) -> dict[str, dict[Any, int]]:
    """The metadata's counts back as array -> {row (int, or "all"): count}."""
    return {a: {(k if k == "all" else int(k)): int(v) for k, v in rows.items()}
            for a, rows in (table or {}).items()}


def nonfinite_totals(nonfinite: dict[str, dict[Any, int]]) -> dict[str, int]:
    return {a: sum(rows.values()) for a, rows in nonfinite.items() if rows}


def nonfinite_before(table: dict, arrays: dict[str, Any], start: int) -> dict:
    """The non-finite counts of rows a resume from ``start`` keeps (the rest is rewritten);
    ``arrays``: name -> anything with ``dims`` (the store's layout)."""
    out = {}
    for name, rows in table.items():
        a = arrays.get(name)
        limit = rows_kept_by_resume(a.dims if a is not None else (), start)
        kept = {k: v for k, v in rows.items() if k != "all" and int(k) < limit}
        if kept:
            out[name] = kept
    return out
