"""A background writer that streams captured tensors into a Zarr group.

Hook functions run on the sampling thread and only hand a CPU copy to :meth:`StoreWriter.put`;
the Zarr encoding and file I/O happen on one writer thread. For small writes (a capture's steps
below ``recorder.INLINE_STEP_BYTES``) :attr:`StoreWriter.inline` encodes on the caller's thread
and hands the writer thread only the file writes, which release the interpreter lock: the
writer thread's Python work would otherwise compete with sampling for the lock (when torch's
threads take every core, those file writes are done on the sampling thread too, a batch of steps
at a time: :attr:`StoreWriter.sync_files`). The queue is bounded in bytes, so
a writer that falls behind slows sampling down instead of letting memory grow with the number
of steps. Work is done in order, so a step is marked complete only after all its data is on
disk. A write error (a full disk, say) stops the writer and is raised on the sampling thread at
its next call.

Arrays it creates (format 2): floating-point arrays have the fill value NaN, so a chunk that was
never written reads as NaN, never as zeros (bfloat16, stored as raw bits, uses the bits of NaN);
every chunk is written even when it equals the fill value, and carries a CRC32C checksum, so
``dithooks verify`` can tell a missing or damaged chunk from data. The writer counts the
non-finite values it writes per array and row (:attr:`StoreWriter.nonfinite`).

How it writes (format unchanged, readable by zarr-python and xarray): on a local store, arrays
are created by writing their ``zarr.json`` and whole chunks / shards are encoded and written by
:class:`zarrio.ChunkEncoder`, one atomic file write (temporary ``*.partial`` file, then a rename)
per chunk or shard, the interpreter lock released during the write; a write that covers part of
an unsharded chunk reads, updates and rewrites the chunk. zarr-python is used only for what that
does not cover: part of a shard, layouts the encoder does not write, memory stores. On an object store
(``s3://``, :mod:`.storage`) the same encoder writes each chunk or shard as one PUT. zarr-python's own path costs the sampling thread far more: its event
loop and thread pool compete for the interpreter lock, and it reads a shard back before replacing
it (docs/benchmarks.md).
"""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import zarr

from ..errors import StoreError
from .codecs import compressor_config, compressors, to_numpy, zarr_dtype
from .storage import is_url
from .zarrio import (ArrayMeta, ArrayReader, ChunkEncoder, CorruptStoreError, array_metadata, write_atomic,
                     write_json_atomic)


@dataclass(frozen=True)
class ArraySpec:
    """Shape and naming of one stored array; created on first write if it does not exist."""

    name: str
    dims: tuple[str, ...]
    shape: tuple[int, ...]
    chunks: tuple[int, ...]
    dtype: torch.dtype
    attrs: tuple[tuple[str, Any], ...] = ()
    # a shard is one file holding several chunks: written whole, read chunk by chunk
    shards: tuple[int, ...] | None = None
    # False: the writer does not count its non-finite values; the caller does (latents chunks
    # are written padded with NaN for rows not known yet, which is no data: store/steps.py)
    counted: bool = True


class WriterFailed(StoreError):
    pass


# bfloat16 NaN as stored (raw uint16 bits): sign 0, exponent all ones, quiet bit
BF16_NAN_BITS = 0x7FC0
ARRAY_CONFIG = {"write_empty_chunks": True}


def fill_value(dtype: torch.dtype):
    """NaN for floating dtypes (missing data must never read as a number), 0 otherwise."""
    if dtype == torch.bfloat16:
        return BF16_NAN_BITS
    return float("nan") if dtype.is_floating_point else 0


def count_nonfinite(data: np.ndarray, dtype: torch.dtype, index: Any) -> dict[Any, int]:
    """Non-finite values in ``data`` written at ``array[index]``: {row: count} along the first
    dim (``"all"`` for writes of a whole array), only rows that have some."""
    if dtype in (torch.bfloat16, torch.float16):
        # on the bits (numpy's float16 isfinite is ~8x slower): |x| with exponent all ones is
        # inf or NaN; one pass finds out whether there is any (almost always not)
        bits = data.view(np.uint16)
        limit = 0x7F80 if dtype == torch.bfloat16 else 0x7C00
        if not bits.size or int((bits & 0x7FFF).max()) < limit:
            return {}
        bad = (bits & limit) == limit
    elif dtype.is_floating_point:
        bad = ~np.isfinite(data)
    else:
        return {}
    if not bad.any():
        return {}
    first = index[0] if isinstance(index, tuple) and index else index
    if isinstance(first, (int, np.integer)):
        return {int(first): int(bad.sum())}
    if isinstance(first, slice) and first.step in (None, 1) and first.start is not None and bad.ndim:
        per_row = bad.reshape(bad.shape[0], -1).sum(axis=1)
        return {first.start + i: int(c) for i, c in enumerate(per_row) if c}
    return {"all": int(bad.sum())}


class StoreWriter:
    # False: every write through zarr-python (the path before direct writes; for benchmarks)
    direct = True
    # chunk key separator of the arrays it creates: "." keeps an array's chunk files in its
    # folder (c.3.0.0.0.0), "/" nests a folder per index (c/3/0/0/0/0: 4 mkdirs per step)
    separator = "."
    # False: inline mode queues each file write on its own (the writer before 2026-12-02; for
    # benchmarks); True: they are held and handed over per batch of steps (submit)
    hold = True
    # inline mode: write the held files on the sampling thread itself (at submit) instead of the
    # writer thread? None: when torch's threads take every core (a writer thread then has no core
    # of its own and takes one from torch's threads mid-operation: docs/benchmarks.md run (i));
    # True/False: always/never (benchmarks, tests)
    sync_files: bool | None = None

    def __init__(self, group: zarr.Group, *, compression: str = "none",
                 max_pending_bytes: int = 256 * 2**20, nonfinite: dict | None = None):
        self.group = group
        # array -> {row (or "all"): number of NaN/inf values written there}; filled on the
        # writer thread, so read it after flush() or from a call()
        self.nonfinite: dict[str, dict[Any, int]] = nonfinite if nonfinite is not None else {}
        self.compression = compression
        self.max_pending_bytes = max_pending_bytes
        self._queue: queue.Queue = queue.Queue()
        self._pending = 0
        self._cond = threading.Condition()
        self._error: BaseException | None = None
        self._arrays: dict[str, zarr.Array] = {}
        self.bytes_written = 0
        self.peak_pending_bytes = 0
        # see the ``inline`` property
        self._inline_mode = False
        # inline mode on a folder: the file writes (and calls) queued by the sampling thread are
        # held here and handed over as one queue item by submit() (or any wait): one wake-up of
        # the writer thread per batch of steps instead of one per file (see submit)
        self._held: list[tuple] = []
        from .storage import ObjectPath

        self._remote = isinstance(store_root(group) if self.direct else None, ObjectPath)
        self._pool: Any = None      # object stores: the PUTs in flight (_sink)
        self._inflight: dict[str, Any] = {}
        self._thread = threading.Thread(target=self._run, name="dithooks-store-writer", daemon=True)
        self._thread.start()

    # -- sampling thread ---------------------------------------------------------------------
    @property
    def inline(self) -> bool:
        """False (default): ``put``/``set`` hand everything to the writer thread. True: they
        encode on the caller's thread (many small writes: the writer thread's Python work would
        compete with sampling for the interpreter lock, docs/benchmarks.md) and hand the writer
        thread only the file writes (``open``/``writev``/``rename``, which release the lock), in
        order, so a step's mark still reaches the disk after its data. Switching waits for what
        is queued."""
        return self._inline_mode

    @inline.setter
    def inline(self, on: bool) -> None:
        if bool(on) != self._inline_mode:
            self.flush()
            self._inline_mode = bool(on)

    def put(self, spec: ArraySpec, index: tuple, value: torch.Tensor) -> None:
        """Queue ``value`` (a CPU tensor the caller no longer touches) for ``array[index]``."""
        if self._inline_mode:
            return self._inline("write", spec, index, value)
        nbytes = value.numel() * value.element_size()
        self._account(nbytes)
        self._queue.put(("write", spec, index, value, nbytes))

    def _account(self, nbytes: int) -> None:
        """Wait until ``nbytes`` more fit in the queue's memory bound, then count them."""
        if self._held and self._pending + nbytes > self.max_pending_bytes:
            self.submit()  # what is held counts too: it must be on its way before we wait for it
        with self._cond:
            while self._pending > 0 and self._pending + nbytes > self.max_pending_bytes and self._error is None:
                self._cond.wait()
            self._raise_if_failed()
            self._pending += nbytes
            self.peak_pending_bytes = max(self.peak_pending_bytes, self._pending)

    def _write_file(self, path: str, pieces: list) -> int:
        """The encoder's sink in inline mode: the file write, queued for the writer thread."""
        nbytes = sum(memoryview(p).nbytes for p in pieces)
        self._account(nbytes)
        self._enqueue(("file", path, pieces, None, nbytes))
        return nbytes

    def _holding(self) -> bool:
        return (self.hold and self._inline_mode and not self._remote
                and threading.current_thread() is not self._thread)

    def _enqueue(self, item: tuple) -> None:
        """Queue one item for the writer thread; in inline mode on a folder, hold it for
        :meth:`submit` (order is kept: held items run in order, before anything queued later)."""
        if self._holding():
            self._held.append(item)
        else:
            self._queue.put(item)

    def submit(self) -> None:
        """Hand the held writes to the writer thread, as one queue item (inline mode: the
        recorder calls this after each batch of steps; every wait for the writer does it first).
        Each queue item wakes the writer thread, whose wake-ups compete with sampling for the
        interpreter lock: one per batch of steps, not one per file. When torch's threads take
        every core (``sync_files``) the held writes are done here instead, in order, and a write
        error is raised here at once."""
        if self._held:
            held, self._held = self._held, []
            if self._writes_here() and not self._queue.unfinished_tasks:  # nothing queued before them
                for one in held:
                    self._run_item(*one)
                self._raise_if_failed()
                return
            self._queue.put(("batch", held, None, None, 0))  # its items' bytes are counted each

    def _writes_here(self) -> bool:
        """Should :meth:`submit` write the held files on this thread (see ``sync_files``)?"""
        if self.sync_files is not None:
            return self.sync_files
        return torch.get_num_threads() >= usable_cores()

    # -- object stores: several PUTs in flight ---------------------------------------------------
    # On an object store a chunk's PUT waits mostly on the network, so the writer thread keeps up
    # to PUTS_IN_FLIGHT of them going at once; anything that must follow them (a step's marks,
    # every call(), a read-modify-write, close) first waits for all of them. Local files are
    # written at once, as always.
    PUTS_IN_FLIGHT = 8

    def _sink(self, path: str, pieces: list) -> int:
        """Where the writer thread puts an encoded file: at once (a folder), or as one more PUT in
        flight (an object store)."""
        if "://" not in path or not is_url(path):
            return write_atomic(path, pieces)
        import concurrent.futures

        if self._pool is None:
            self._pool = concurrent.futures.ThreadPoolExecutor(self.PUTS_IN_FLIGHT,
                                                               thread_name_prefix="dithooks-put")
        same = self._inflight.pop(path, None)
        if same is not None:  # the same object again: its first PUT lands first
            same.result()
        while len(self._inflight) >= self.PUTS_IN_FLIGHT:
            self._inflight.pop(next(iter(self._inflight))).result()
        self._inflight[path] = self._pool.submit(write_atomic, path, pieces)
        return sum(memoryview(p).nbytes for p in pieces)

    def _wait_puts(self) -> None:
        """Wait for every PUT in flight; raise the first one's error."""
        first = None
        while self._inflight:
            try:
                self._inflight.pop(next(iter(self._inflight))).result()
            except BaseException as e:
                first = first or e
        if first is not None:
            raise first

    def set(self, name: str, index: Any, value: Any) -> None:
        """Queue ``array[index] = value`` for an array that already exists in the store (e.g. the
        ``step_complete`` marks: ``set("step_complete", slice(3, 5), True)``); ``value`` is small
        (no memory accounting) and broadcast to the selection."""
        if self._inline_mode:
            if self._remote:  # its file must follow the PUTs in flight: a barrier first
                self._queue.put(("call", _nothing, None, None, 0))
            return self._inline("set", name, index, value)
        self._raise_if_failed()
        self._queue.put(("set", name, index, value, 0))

    def call(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` on the writer thread after everything queued before it (in inline mode too:
        after the file writes queued before it)."""
        self._raise_if_failed()
        self._enqueue(("call", fn, None, None, 0))

    def flush(self) -> None:
        """Wait until everything queued is on disk; raise the writer's error if it failed."""
        self.submit()
        done = threading.Event()
        self._queue.put(("call", done.set, None, None, 0))
        while not done.wait(0.05):
            if self._error is not None or not self._thread.is_alive():
                break
        self._raise_if_failed()

    def close(self) -> None:
        try:
            self.submit()
        except WriterFailed:
            pass  # kept in self.error (as an error on the writer thread is): the thread still stops
        self._queue.put(None)
        self._thread.join()

    @property
    def error(self) -> BaseException | None:
        return self._error

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise WriterFailed(describe_write_error(self._error)) from self._error

    def _inline(self, kind: str, a: Any, b: Any, c: Any) -> None:
        """Encode one write on this thread (its file writes are queued in order); an error stops
        the writer as it does on the writer thread, and is raised here at once."""
        self._raise_if_failed()
        try:
            self._do(kind, a, b, c)
        except WriterFailed:
            raise
        except Exception as e:
            self._error = e
            self._raise_if_failed()

    # -- writer thread -----------------------------------------------------------------------
    def array(self, spec: ArraySpec) -> "ArrayTarget":
        """The array ``spec`` names, created (metadata only) if it does not exist yet."""
        arr = self._arrays.get(spec.name)
        if arr is not None:
            return arr
        root = store_root(self.group) if self.direct else None
        if root is None:  # not a folder (a memory store, ...): zarr-python does everything
            arr = ZarrTarget(self._zarr_array(spec))
        else:
            meta_file = root / spec.name / "zarr.json"
            if not meta_file.exists():
                (root / spec.name).mkdir(parents=True, exist_ok=True)
                write_json_atomic(str(meta_file), self.metadata(spec))
            meta = ArrayMeta.load(root, spec.name)
            if tuple(meta.shape) != tuple(spec.shape):
                raise StoreError(f"array {spec.name} in the store has shape {tuple(meta.shape)}, "
                                 f"this capture makes {tuple(spec.shape)}")
            arr = DirectTarget(meta, lambda: self._zarr_array(spec), self._direct_io)
        self._arrays[spec.name] = arr
        return arr

    def file_shape(self, name: str) -> tuple[int, ...] | None:
        """The shape of one file (shard, else chunk) of array ``name`` in the store, None if the
        store has no such array yet. Call it only while nothing is queued for that array."""
        arr = self._arrays.get(name)
        if isinstance(arr, DirectTarget):
            return tuple(arr.meta.outer)
        root = store_root(self.group) if self.direct else None
        if root is not None:
            if isinstance(root, Path) and not (root / name / "zarr.json").is_file():
                return None
            try:
                return tuple(ArrayMeta.load(root, name).outer)
            except CorruptStoreError:
                raise
            except StoreError:  # no zarr.json (object stores): no such array yet
                return None
        if name not in self.group:
            return None
        z = self.group[name]
        return tuple(z.shards or z.chunks)

    def existing(self, name: str) -> "ArrayTarget":
        """An array of the store by name (it must exist)."""
        arr = self._arrays.get(name)
        if arr is not None:
            return arr
        root = store_root(self.group) if self.direct else None
        if root is None:
            arr = ZarrTarget(self.group[name].with_config(ARRAY_CONFIG))
        else:
            arr = DirectTarget(ArrayMeta.load(root, name), lambda: self.group[name].with_config(ARRAY_CONFIG),
                               self._direct_io)
        self._arrays[name] = arr
        return arr

    def _direct_io(self) -> tuple[Callable[[str, list], int], Callable[[], None]]:
        """(where encoded files go, what to call before reading or writing other than through
        the encoder) for the current mode: on the writer thread, write at once; inline, queue
        the file and wait for the queue before anything else touches the files."""
        if self._inline_mode and threading.current_thread() is not self._thread:
            return self._write_file, self._drain
        return self._sink, self._wait_puts

    def _drain(self) -> None:
        """Inline mode: wait until the queued file writes are on disk."""
        if self._held or self._queue.unfinished_tasks:
            self.flush()

    def metadata(self, spec: ArraySpec) -> dict:
        """The ``zarr.json`` of a new array (what zarr-python's ``create_array`` writes for it)."""
        attrs = dict(spec.attrs)
        if spec.dtype == torch.bfloat16:
            attrs["dithooks_dtype"] = "bfloat16"
        return array_metadata(spec.shape, spec.chunks, zarr_dtype(spec.dtype), fill_value(spec.dtype),
                              shards=spec.shards, dims=spec.dims, attrs=attrs,
                              compressor=compressor_config(self.compression), separator=self.separator)

    def _zarr_array(self, spec: ArraySpec) -> zarr.Array:
        if spec.name in self.group:
            arr = self.group[spec.name]
            if tuple(arr.shape) != tuple(spec.shape):
                raise StoreError(f"array {spec.name} in the store has shape {tuple(arr.shape)}, "
                                 f"this capture makes {tuple(spec.shape)}")
            return arr.with_config(ARRAY_CONFIG)
        attrs = dict(spec.attrs)
        if spec.dtype == torch.bfloat16:
            attrs["dithooks_dtype"] = "bfloat16"
        compressor = compressors(self.compression)
        return self.group.create_array(
            name=spec.name, shape=spec.shape, chunks=spec.chunks, shards=spec.shards,
            dtype=zarr_dtype(spec.dtype),
            dimension_names=spec.dims,
            compressors=([compressor] if compressor is not None else []) + [zarr.codecs.Crc32cCodec()],
            fill_value=fill_value(spec.dtype), attributes=attrs, config=ARRAY_CONFIG)

    def _do(self, kind: str, a: Any, b: Any, c: Any) -> None:
        if kind == "write":
            data = to_numpy(c)
            self.array(a).write(b, data)
            self.bytes_written += data.nbytes
            if self._inline_mode and threading.current_thread() is not self._thread:
                # counted on the writer thread too (numpy releases the interpreter lock), before
                # the marks queued after it; the data stays untouched until its files are written
                self._enqueue(("count", lambda: self._count(data, a, b), None, None, 0))
            else:
                self._count(data, a, b)
        elif kind == "set":
            self.existing(a).write(b, np.asarray(c))
        elif kind == "file":
            self._sink(a, b)
        else:
            a()

    def _count(self, data: np.ndarray, spec: ArraySpec, index: Any) -> None:
        if not getattr(spec, "counted", True):
            return
        bad = count_nonfinite(data, spec.dtype, index)
        if bad:
            self.nonfinite.setdefault(spec.name, {}).update(bad)

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                try:
                    self._wait_puts()
                except BaseException as e:
                    self._error = self._error or e
                if self._pool is not None:
                    self._pool.shutdown()
                return
            try:
                for one in (item[1] if item[0] == "batch" else (item,)):
                    self._run_item(*one)
            finally:
                self._queue.task_done()

    def _run_item(self, kind: str, a: Any, b: Any, c: Any, nbytes: int) -> None:
        """One queued write or call, on the writer thread; after an error, only the accounting."""
        try:
            if self._error is None:
                if kind in ("set", "call"):  # after the files queued before them
                    self._wait_puts()
                self._do(kind, a, b, c)
        except BaseException as e:  # kept and raised on the sampling thread
            self._error = e
        finally:
            if nbytes:
                with self._cond:
                    self._pending -= nbytes
                    self._cond.notify_all()
            elif self._error is not None:
                with self._cond:
                    self._cond.notify_all()


def usable_cores() -> int:
    """The CPU cores this process may run on."""
    import os

    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        return os.cpu_count() or 1


def store_root(group: zarr.Group) -> Path | None:
    """The folder of a group on a local store (a :class:`~pathlib.Path`), or its location on an
    object store (a :class:`.storage.ObjectPath`: chunks are then PUT whole, one object each),
    else None."""
    store = getattr(group, "store", None)
    if isinstance(store, zarr.storage.FsspecStore):
        from .storage import ObjectPath

        protocol = store.fs.protocol
        protocol = protocol[0] if isinstance(protocol, (tuple, list)) else protocol
        if protocol in ("file", "local", "memory"):
            return None
        root = ObjectPath(f"{protocol}://{store.path.strip('/')}")
        return root / group.path if group.path else root
    root = getattr(store, "root", None)
    if root is None or not isinstance(store, zarr.storage.LocalStore):
        return None
    return Path(root) / group.path if group.path else Path(root)


def region_of(index: Any, shape: tuple[int, ...]) -> tuple[tuple[tuple[int, int], ...], tuple[int, ...]] | None:
    """``array[index]`` as per-dim [start, stop) and the shape of that block (ints kept as size-1
    dims); None for anything but ints and slices of step 1 (then zarr-python does the write)."""
    if not isinstance(index, tuple):
        index = (index,)
    if len(index) == 1 and index[0] is Ellipsis:
        index = ()
    if len(index) > len(shape):
        return None
    region = []
    for ix, n in zip(index, shape):
        if isinstance(ix, (int, np.integer)) and not isinstance(ix, bool):
            i = int(ix) + (n if ix < 0 else 0)
            if not 0 <= i < n:
                return None
            region.append((i, i + 1))
        elif isinstance(ix, slice) and ix.step in (None, 1):
            a, b, _ = ix.indices(n)
            region.append((a, max(a, b)))
        else:
            return None
    region += [(0, n) for n in shape[len(index):]]
    return tuple(region), tuple(b - a for a, b in region)


class ArrayTarget:
    """Where :class:`StoreWriter` writes one array (:meth:`StoreWriter.array`)."""

    def write(self, index: Any, data: np.ndarray) -> None:  # pragma: no cover - interface
        raise NotImplementedError


class ZarrTarget(ArrayTarget):
    def __init__(self, arr: zarr.Array):
        self.zarr = arr

    def write(self, index: Any, data: np.ndarray) -> None:
        self.zarr[index] = data


def _nothing() -> None:
    pass


class DirectTarget(ArrayTarget):
    """Whole chunks and shards written by :class:`zarrio.ChunkEncoder`; anything else (a write
    that covers part of a chunk, a layout the encoder does not write) through zarr-python.
    ``io()``: (the encoder's sink, what to call before any other access to the files), see
    :meth:`StoreWriter._direct_io`."""

    def __init__(self, meta: ArrayMeta, open_zarr: Callable[[], zarr.Array],
                 io: Callable[[], tuple] = lambda: (write_atomic, _nothing)):
        self.meta = meta
        self.io = io
        self.encoder = ChunkEncoder(meta) if ChunkEncoder.supports(meta) else None
        self._open_zarr = open_zarr
        self._zarr: zarr.Array | None = None
        self.direct_writes = 0
        self.zarr_writes = 0

    def write(self, index: Any, data: np.ndarray) -> None:
        sink, drain = self.io()
        if self.encoder is not None:
            self.encoder.sink = sink
            got = region_of(index, self.meta.shape)
            if got is not None:
                region, block = got
                data = np.asarray(data)
                if data.shape != block:
                    if int(np.prod(data.shape)) == int(np.prod(block)):
                        data = data.reshape(block)
                    else:
                        data = np.broadcast_to(data, block)
                if self.encoder.aligned(region):
                    self.encoder.write(region, data)
                    self.direct_writes += 1
                    return
                drain()  # a read-modify-write reads what queued writes may still replace
                if self._update(region, data):
                    self.direct_writes += 1
                    return
        drain()
        if self._zarr is None:
            self._zarr = self._open_zarr()
        self._zarr[index] = data
        self.zarr_writes += 1

    def _update(self, region: tuple[tuple[int, int], ...], data: np.ndarray) -> bool:
        """A write that covers part of some (unsharded) chunks: each touched chunk is read (the
        fill value if it was never written), updated and written whole, atomically. False when
        the layout does not allow it (sharded). Edge chunks are stored whole (padded with the
        fill value), as zarr-python stores them."""
        import itertools

        from .zarrio import Block, ChunkMissing

        m = self.meta
        if m.sharded:
            return False
        reader = ArrayReader(m)
        ranges = [range(a // o, -(-b // o)) for (a, b), o in zip(region, m.outer)]
        for outer in itertools.product(*ranges):
            lo = tuple(c * o for c, o in zip(outer, m.outer))
            try:
                chunk = np.array(reader.read_block(Block(outer, tuple(slice(0, o, 1) for o in m.outer), ())))
            except ChunkMissing:
                chunk = np.full(m.outer, m.fill_value, dtype=m.dtype)
            inside = tuple(slice(max(a, l) - l, min(b, l + o) - l) for (a, b), l, o in zip(region, lo, m.outer))
            src = tuple(slice(max(a, l) - a, min(b, l + o) - a) for (a, b), l, o in zip(region, lo, m.outer))
            chunk[inside] = data[src]
            self.encoder.write(tuple((l, l + o) for l, o in zip(lo, m.outer)), chunk)
        return True


def describe_write_error(e: BaseException) -> str:
    import errno

    if isinstance(e, OSError) and e.errno == errno.ENOSPC:
        return "the disk is full"
    if isinstance(e, StoreError):
        return str(e)
    return f"{type(e).__name__}: {e}"
