"""A small reader and writer for the Zarr v3 arrays that dithooks writes, without zarr-python.

Writing (end of this module): :func:`array_metadata` (the ``zarr.json`` zarr-python writes for
the same ``create_array`` call), :class:`ChunkEncoder` (whole chunks and shards: inner chunks, the
shard index and CRC32C checksums, byte for byte what zarr-python writes), :func:`write_atomic`
(temporary ``*.partial`` file, then a rename), :func:`write_array`, :func:`write_group` and
:func:`consolidate` for a store's skeleton. The store writer (``writer.py``) uses them; tests
compare files and metadata with zarr-python's.

Why not zarr-python for reading: importing it costs ~0.7 s (``dithooks query`` must start fast),
and its indexing pays per call and per chunk far more than the bytes cost. The layouts a capture
writes are simple - a regular chunk grid, optionally sharded (``sharding_indexed`` with the index
at the end), chunks encoded as raw little-endian ``bytes`` (``vlen-utf8`` for strings) followed by
optional ``zstd``/``blosc``/``crc32c`` - and this module reads exactly those:

* only the chunks (and, for uncompressed chunks, only the byte span) that a selection touches are
  read, with ``preadv`` straight into a numpy buffer;
* it knows which chunks were **never written** (no file, or a shard index entry marked empty) and
  reports them instead of handing back the fill value, and it checks what it reads (shard index
  checksum and bounds, chunk sizes, decompression), raising :class:`CorruptStoreError` naming the
  file.

Any other codec (``transpose``, a big-endian ``bytes``, ...) falls back to zarr-python for the data
(imported only then); the existence checks stay ours.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from ..errors import StoreError
from .storage import as_path, is_url

MISSING = np.uint64(2**64 - 1)  # a shard index entry (offset, nbytes) for a chunk never written

DTYPES = {n: np.dtype(n) for n in ("bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32",
                                   "uint64", "float16", "float32", "float64")}
BYTES_CODECS = ("zstd", "blosc", "crc32c", "gzip")


class CorruptStoreError(StoreError):
    """A store file (metadata or chunk) that exists but cannot be read as what it claims to be."""


def read_json(path: Path, what: str) -> dict:
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise StoreError(f"{what}: {path} is missing") from None
    except OSError as e:
        raise StoreError(f"{what}: cannot read {path} ({e.strerror or e})") from None
    try:
        obj = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CorruptStoreError(f"{path} is damaged (not valid JSON: {e}); the store cannot be read "
                                "until it is repaired or rewritten") from None
    if not isinstance(obj, dict):
        raise CorruptStoreError(f"{path} is damaged (not a JSON object)")
    return obj


def _fill(value: Any, dtype: np.dtype | None) -> Any:
    if dtype is None:
        return value if value is not None else ""
    if isinstance(value, str):
        special = {"NaN": np.nan, "Infinity": np.inf, "-Infinity": -np.inf}
        if value in special:
            return special[value]
        if value.startswith("0x"):  # a float given by its bits
            bits = int(value, 16)
            return np.array([bits], dtype=f"<u{dtype.itemsize}").view(dtype)[0]
    if value is None:
        return 0
    return dtype.type(value)


def _named(codec: dict) -> tuple[str, dict]:
    return codec.get("name", ""), codec.get("configuration") or {}


@dataclass
class ArrayMeta:
    """What ``<array>/zarr.json`` says, in the form the reader needs."""

    name: str
    dir: Path
    shape: tuple[int, ...]
    dtype: np.dtype | None       # None: variable-length strings
    fill_value: Any
    dims: tuple[str, ...]
    attrs: dict
    outer: tuple[int, ...]       # the chunk grid: one file per outer chunk (a shard when sharded)
    inner: tuple[int, ...]       # the decoding unit: inner chunk of a shard, else == outer
    sharded: bool
    chain: tuple[str, ...]       # bytes->bytes codecs applied after the array->bytes one, in write order
    index_crc: bool
    index_at_end: bool
    key_prefix: str              # "c/" for the default encoding, "" for v2
    separator: str
    native: bool                 # False: decode chunks through zarr-python
    raw: dict

    @classmethod
    def load(cls, root: Path, name: str) -> "ArrayMeta":
        d = root / name
        m = read_json(d / "zarr.json", f"array {name}")
        try:
            return cls._parse(d, name, m)
        except (KeyError, TypeError, ValueError, IndexError) as e:
            raise CorruptStoreError(f"{d / 'zarr.json'} is damaged (bad or missing field: {e})") from None

    @classmethod
    def from_json(cls, d: Path, name: str, m: dict) -> "ArrayMeta":
        """The metadata of array ``name`` in folder ``d`` from its already-read ``zarr.json``
        ``m``; a malformed one raises :class:`CorruptStoreError` (as :meth:`load`)."""
        try:
            return cls._parse(as_path(d), name, m)
        except (KeyError, TypeError, ValueError, IndexError, AttributeError) as e:
            raise CorruptStoreError(f"{as_path(d) / 'zarr.json'} is damaged (bad or missing field: {e})") from None

    @classmethod
    def _parse(cls, d: Path, name: str, m: dict) -> "ArrayMeta":
        if m.get("node_type") != "array" or m.get("zarr_format") != 3:
            raise CorruptStoreError(f"{d / 'zarr.json'} does not describe a Zarr v3 array")
        shape = tuple(int(n) for n in m["shape"])
        dt = m["data_type"]
        dtype = None if dt == "string" else DTYPES.get(dt) if isinstance(dt, str) else None
        native = dtype is not None or dt == "string"
        grid = m["chunk_grid"]
        if grid.get("name") != "regular":
            native = False
        outer = tuple(int(n) for n in grid["configuration"]["chunk_shape"])
        codecs = list(m["codecs"])
        inner, sharded, index_crc, index_at_end = outer, False, False, True
        if codecs and _named(codecs[0])[0] == "sharding_indexed":
            conf = _named(codecs[0])[1]
            sharded = True
            inner = tuple(int(n) for n in conf["chunk_shape"])
            index_at_end = conf.get("index_location", "end") == "end"
            idx = [_named(c) for c in conf.get("index_codecs", [])]
            if not idx or idx[0][0] != "bytes" or idx[0][1].get("endian", "little") != "little" \
                    or any(n != "crc32c" for n, _ in idx[1:]):
                native = False
            index_crc = any(n == "crc32c" for n, _ in idx[1:])
            if len(codecs) > 1 or any(o % i for o, i in zip(outer, inner)):
                native = False
            codecs = list(conf["codecs"])
        named = [_named(c) for c in codecs]
        if not named or named[0][0] not in ("bytes", "vlen-utf8"):
            native = False  # an array->array codec (transpose, ...) first
        elif named[0][0] == "bytes" and (named[0][1].get("endian", "little") != "little" or dtype is None):
            native = False
        elif named[0][0] == "vlen-utf8" and dt != "string":
            native = False
        chain = tuple(n for n, _ in named[1:])
        if any(n not in BYTES_CODECS for n in chain):
            native = False
        enc_name, enc = _named(m.get("chunk_key_encoding") or {"name": "default"})
        sep = enc.get("separator", "/" if enc_name == "default" else ".")
        prefix = "c" + sep if enc_name == "default" else ""
        dims = tuple(m.get("dimension_names") or ()) or tuple(f"dim_{i}" for i in range(len(shape)))
        return cls(name, d, shape, dtype, _fill(m.get("fill_value"), dtype), tuple(str(x) for x in dims),
                   dict(m.get("attributes") or {}), outer, inner, sharded, chain, index_crc, index_at_end,
                   prefix, sep, native, m)

    def __post_init__(self) -> None:
        self.per_shard = tuple(o // i for o, i in zip(self.outer, self.inner))  # inner chunks per file, per dim
        self._dir = str(self.dir)
        self.remote = is_url(self.dir)  # an object store: sizes and byte ranges through fsspec

    @property
    def inner_grid(self) -> tuple[int, ...]:
        return tuple(-(-n // c) for n, c in zip(self.shape, self.inner))

    def key(self, outer_index: tuple[int, ...]) -> str:
        if not outer_index:
            return "c" if self.key_prefix else "0"
        return self.key_prefix + self.separator.join(str(i) for i in outer_index)

    def path(self, outer_index: tuple[int, ...]) -> str:
        return os.path.join(self._dir, self.key(outer_index))


@dataclass(frozen=True)
class Block:
    """One inner chunk's share of a selection: which chunk, what in it, where in the output."""

    chunk: tuple[int, ...]
    local: tuple[Any, ...]   # per dim: slice (step > 0) or int array, inside the chunk
    out: tuple[Any, ...]     # per dim: slice or int array, inside the output


def dim_blocks(sel: slice | np.ndarray, chunk: int) -> list[tuple[int, Any, Any]]:
    """Split one dim's selection (a slice with step > 0, or positions) by chunks of ``chunk``."""
    out = []
    if isinstance(sel, slice):
        start, stop, step = sel.start, sel.stop, sel.step
        if stop <= start:
            return out
        done = 0
        for c in range(start // chunk, (stop - 1) // chunk + 1):
            lo, hi = c * chunk, min(stop, (c + 1) * chunk)
            first = start if start >= lo else start + -(-(lo - start) // step) * step
            if first >= hi:
                continue
            count = len(range(first, hi, step))
            out.append((c, slice(first - lo, hi - lo, step), slice(done, done + count)))
            done += count
        return out
    pos = np.asarray(sel, dtype=np.int64)
    cs = pos // chunk
    for c in np.unique(cs):
        where = np.flatnonzero(cs == c)
        out.append((int(c), pos[where] - int(c) * chunk, where))
    return out


def blocks(meta: ArrayMeta, sel: tuple[slice | np.ndarray, ...]) -> Iterator[Block]:
    per_dim = [dim_blocks(s, c) for s, c in zip(sel, meta.inner)]
    if not meta.shape:
        yield Block((), (), ())
        return
    import itertools

    for combo in itertools.product(*per_dim):
        yield Block(tuple(c for c, _, _ in combo), tuple(l for _, l, _ in combo), tuple(o for _, _, o in combo))


def out_shape(sel: tuple[slice | np.ndarray, ...]) -> tuple[int, ...]:
    return tuple(len(range(s.start, s.stop, s.step)) if isinstance(s, slice) else len(s) for s in sel)


class ChunkMissing(Exception):
    """A chunk that was never written (raised by :meth:`ArrayReader.read_block`)."""


class ArrayReader:
    """Reads blocks of one array; remembers shard indexes it has read."""

    def __init__(self, meta: ArrayMeta):
        self.meta = meta
        self._index: dict[tuple[int, ...], tuple[np.ndarray, int] | None] = {}
        self._zarr = None
        self._sizes: dict[str, int] | None = None  # object stores: chunk object -> size

    # -- where a chunk is --------------------------------------------------------------------
    def _shard_index(self, shard: tuple[int, ...]) -> tuple[np.ndarray, int] | None:
        if shard in self._index:
            return self._index[shard]
        m = self.meta
        path = m.path(shard)
        size = self._size(path)
        if size is None:
            self._index[shard] = None
            return None
        n = int(np.prod(m.per_shard))
        nbytes = 16 * n + (4 if m.index_crc else 0)
        if size < nbytes:
            raise CorruptStoreError(f"{path} is damaged: {size} bytes, shorter than its shard index ({nbytes} bytes)")
        if m.remote:
            raw = self._get(path, size - nbytes if m.index_at_end else 0, nbytes)
        else:
            with open(path, "rb") as f:
                f.seek(size - nbytes if m.index_at_end else 0)
                raw = f.read(nbytes)
        if m.index_crc:
            try:
                import google_crc32c
            except ImportError:  # pragma: no cover - zarr installs it
                google_crc32c = None
            if google_crc32c is not None:
                want = int(np.frombuffer(raw[-4:], "<u4")[0])
                if google_crc32c.value(raw[:-4]) != want:
                    raise CorruptStoreError(f"{path} is damaged: its shard index fails its checksum")
        index = np.frombuffer(raw[:16 * n], "<u8").reshape(m.per_shard + (2,))
        data_lo, data_hi = (0, size - nbytes) if m.index_at_end else (nbytes, size)
        used = ~((index[..., 0] == MISSING) & (index[..., 1] == MISSING))
        off, cnt = index[..., 0][used], index[..., 1][used]
        if used.any() and (np.any(off < data_lo) or np.any(off + cnt > data_hi) or np.any(off + cnt < off)):
            raise CorruptStoreError(f"{path} is damaged: its shard index points outside the file (truncated?)")
        self._index[shard] = (index, size)
        return self._index[shard]

    def location(self, chunk: tuple[int, ...]) -> tuple[str, int, int] | None:
        """(file, offset, nbytes) of an inner chunk, or None if it was never written."""
        m = self.meta
        if not m.sharded:
            path = m.path(chunk)
            n = self._size(path)
            return None if n is None else (path, 0, n)
        shard = tuple(c // p for c, p in zip(chunk, m.per_shard))
        got = self._shard_index(shard)
        if got is None:
            return None
        index, _ = got
        off, n = index[tuple(c % p for c, p in zip(chunk, m.per_shard))]
        if off == MISSING and n == MISSING:
            return None
        return m.path(shard), int(off), int(n)

    def exists(self, chunk: tuple[int, ...]) -> bool:
        return self.location(chunk) is not None

    def _size(self, path: str) -> int | None:
        """A chunk (shard) file's size, None if there is none. Object stores: from one listing of
        the array's objects, taken on first use (this reader then sees the array as it was)."""
        if not self.meta.remote:
            try:
                return os.stat(path).st_size
            except FileNotFoundError:
                return None
        if self._sizes is None:
            from .storage import listing

            self._sizes = listing(self.meta._dir)
        return self._sizes.get(path[len(self.meta._dir) + 1:])

    def _get(self, path: str, off: int, n: int) -> bytes:
        """Object stores: ``n`` bytes of ``path`` from ``off`` (one ranged GET)."""
        from .storage import read_range

        try:
            return read_range(path, off, n)
        except FileNotFoundError:
            return b""

    def describe(self, chunk: tuple[int, ...]) -> str:
        """Where a chunk lives, for messages: the file, and the chunk within a shard."""
        m = self.meta
        if not m.sharded:
            return f"{m.name}/{m.key(chunk)}"
        shard = tuple(c // p for c, p in zip(chunk, m.per_shard))
        inner = tuple(c % p for c, p in zip(chunk, m.per_shard))
        return f"{m.name}/{m.key(shard)} (inner chunk {','.join(map(str, inner))})"

    # -- reading -----------------------------------------------------------------------------
    def read_block(self, block: Block) -> np.ndarray:
        """The block's values (its ``local`` part of the chunk), or raise :class:`ChunkMissing`."""
        m = self.meta
        if not m.native:
            return self._read_block_zarr(block)
        loc = self.location(block.chunk)
        if loc is None:
            raise ChunkMissing(self.describe(block.chunk))
        path, off, n = loc
        if m.dtype is not None and not m.chain and all(isinstance(s, slice) for s in block.local):
            return self._read_span(path, off, n, block)
        data = self._decode(self._pread(path, off, n, block.chunk), block)
        return _take(data, block.local)

    def _read_span(self, path: str, off: int, n: int, block: Block) -> np.ndarray:
        """Uncompressed chunk: read only the bytes between the first and last selected element."""
        m = self.meta
        item = m.dtype.itemsize
        want = int(np.prod(m.inner)) * item
        if n != want:
            raise CorruptStoreError(f"{self.describe(block.chunk)} in {m.dir.parent} is damaged: "
                                    f"{n} bytes where {want} were expected")
        strides = [item] * len(m.inner)
        for i in range(len(m.inner) - 2, -1, -1):
            strides[i] = strides[i + 1] * m.inner[i + 1]
        counts = [len(range(s.start, s.stop, s.step)) for s in block.local]
        if 0 in counts:
            return np.empty(counts, dtype=m.dtype)
        first = sum(s.start * st for s, st in zip(block.local, strides))
        last = sum((s.start + (c - 1) * s.step) * st for s, c, st in zip(block.local, counts, strides))
        span = last - first + item
        if m.remote:
            buf = np.frombuffer(self._pread(path, off + first, span, block.chunk), dtype=m.dtype).copy()
        else:  # straight into the array's buffer (no bytes object in between)
            buf = np.empty(span // item, dtype=m.dtype)
            try:
                f = open(path, "rb", buffering=0)
            except FileNotFoundError:  # deleted since its shard index was read
                raise ChunkMissing(self.describe(block.chunk)) from None
            with f:
                got = os.preadv(f.fileno(), [memoryview(buf).cast("B")], off + first)
            if got != span:
                raise CorruptStoreError(f"{self.describe(block.chunk)} in {m.dir.parent} is damaged: file ends early")
        return np.ndarray(tuple(counts), dtype=m.dtype, buffer=buf,
                          strides=tuple(s.step * st for s, st in zip(block.local, strides)))

    def _pread(self, path: str, off: int, n: int, chunk: tuple[int, ...]) -> bytes:
        if self.meta.remote:
            data = self._get(path, off, n)
            if len(data) != n:
                raise CorruptStoreError(f"{self.describe(chunk)} in {self.meta.dir.parent} is damaged: "
                                        "file ends early")
            return data
        try:
            f = open(path, "rb", buffering=0)
        except FileNotFoundError:  # deleted since its shard index (or size) was read
            raise ChunkMissing(self.describe(chunk)) from None
        with f:
            data = os.pread(f.fileno(), n, off)
        if len(data) != n:
            raise CorruptStoreError(f"{self.describe(chunk)} in {self.meta.dir.parent} is damaged: file ends early")
        return data

    def _decode(self, data: bytes, block: Block) -> np.ndarray:
        m = self.meta
        where = f"{self.describe(block.chunk)} in {m.dir.parent}"
        try:
            for name in reversed(m.chain):
                data = _bytes_decode(name, data, where)
            if m.dtype is None:
                values = _vlen_utf8(data, int(np.prod(m.inner)), where)
            else:
                want = int(np.prod(m.inner)) * m.dtype.itemsize
                if memoryview(data).nbytes != want:
                    raise CorruptStoreError(f"{where} is damaged: {len(data)} bytes where {want} were expected")
                values = np.frombuffer(data, dtype=m.dtype, count=want // m.dtype.itemsize)
        except CorruptStoreError:
            raise
        except Exception as e:  # a decompressor's own error on garbage
            raise CorruptStoreError(f"{where} is damaged: {type(e).__name__}: {e}") from None
        return values.reshape(m.inner)

    def _read_block_zarr(self, block: Block) -> np.ndarray:
        m = self.meta
        shard = tuple(c // p for c, p in zip(block.chunk, m.per_shard))
        if self._size(m.path(shard)) is None:
            raise ChunkMissing(self.describe(block.chunk))
        if self._zarr is None:
            import warnings

            import zarr

            from .storage import zarr_store

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                self._zarr = zarr.open_array(zarr_store(m.dir, read_only=True), mode="r")
        region = tuple(slice(c * i + s.start, c * i + s.stop, s.step) if isinstance(s, slice) else c * i + s
                       for c, i, s in zip(block.chunk, m.inner, block.local))
        try:
            if all(isinstance(s, slice) for s in region):
                return np.asarray(self._zarr[region])
            return np.asarray(self._zarr.oindex[region])
        except Exception as e:
            raise CorruptStoreError(f"{self.describe(block.chunk)} in {m.dir.parent} cannot be read: "
                                    f"{type(e).__name__}: {e}") from None


def _take(data: np.ndarray, local: tuple[Any, ...]) -> np.ndarray:
    v = data[tuple(s if isinstance(s, slice) else slice(None) for s in local)]
    for axis, s in enumerate(local):
        if not isinstance(s, slice):
            v = np.take(v, s, axis=axis)
    return v


CRC32C_RESIDUE = 0x48674BC7  # crc32c(data + crc32c(data) as 4 little-endian bytes), for any data


def _bytes_decode(name: str, data: Any, where: str) -> Any:
    """Undo one bytes->bytes codec. Returns a bytes-like object; ``crc32c`` returns a view without
    the checksum (checked over the whole buffer against the CRC residue: no copy of the body)."""
    if name == "crc32c":
        import google_crc32c

        mv = memoryview(data).cast("B")
        if len(mv) < 4:
            raise CorruptStoreError(f"{where} is damaged: shorter than its checksum")
        whole = data if isinstance(data, bytes) else bytes(mv)
        if google_crc32c.value(whole) != CRC32C_RESIDUE:
            raise CorruptStoreError(f"{where} is damaged: it fails its checksum")
        return mv[:-4]
    if name == "zstd":
        from numcodecs.zstd import Zstd

        return Zstd().decode(data)
    if name == "blosc":
        from numcodecs.blosc import Blosc

        return Blosc().decode(data)
    if name == "gzip":
        import gzip

        return gzip.decompress(data)
    raise CorruptStoreError(f"{where}: unsupported codec {name}")  # pragma: no cover (checked on load)


def _vlen_utf8(data: bytes, count: int, where: str) -> np.ndarray:
    """numcodecs' VLenUTF8 layout: u4 item count, then per item u4 length and UTF-8 bytes."""
    mv = memoryview(data).cast("B")
    if len(mv) < 4:
        raise CorruptStoreError(f"{where} is damaged: too short for its string count")
    n = int(np.frombuffer(mv[:4], "<u4")[0])
    if n != count:
        raise CorruptStoreError(f"{where} is damaged: {n} strings where {count} were expected")
    out, pos = [], 4
    for _ in range(n):
        k = int(np.frombuffer(mv[pos:pos + 4], "<u4")[0])
        pos += 4
        if pos + k > len(data):
            raise CorruptStoreError(f"{where} is damaged: a string runs past the end")
        out.append(bytes(mv[pos:pos + k]).decode("utf-8"))
        pos += k
    return np.array(out, dtype=object)


# -- writing -----------------------------------------------------------------------------------
# The same layouts, written directly: whole chunks (or whole shards: inner chunks, then the index
# with its CRC32C) in one atomic file write each. What zarr-python writes for these arrays, byte
# for byte in meaning (tests compare both ways), without its event loop, thread pool and the
# read-back of a shard it is about to replace.

WRITABLE_CHAINS = ((), ("crc32c",), ("zstd", "crc32c"), ("blosc", "crc32c"), ("zstd",), ("blosc",))


def array_metadata(shape: tuple[int, ...], chunks: tuple[int, ...], data_type: str, fill_value: Any, *,
                   shards: tuple[int, ...] | None = None, dims: tuple[str, ...] | None = None,
                   attrs: dict | None = None, compressor: dict | None = None, crc: bool = True,
                   separator: str = "/") -> dict:
    """``zarr.json`` of a Zarr v3 array as zarr-python 3 writes it (``create_array`` with
    ``chunks``, ``shards``, ``compressors=[compressor, crc32c]``, ``dimension_names``).

    ``compressor``: None, ``{"name": "zstd", "level": 1}`` or ``{"name": "blosc", "cname":
    "lz4", "clevel": 5, "shuffle": "bitshuffle"}``. ``fill_value``: a number, NaN, or a bool.
    ``separator``: of the default chunk key encoding; ``"."`` keeps every chunk file of the array
    in its folder (``c.3.0.0``: no folder per step to create)."""
    dtype = np.dtype(data_type)
    bytes_codec: dict = {"name": "bytes"}
    if dtype.itemsize > 1:
        bytes_codec["configuration"] = {"endian": "little"}
    chain: list[dict] = [bytes_codec]
    if compressor is not None:
        c = dict(compressor)
        name = c.pop("name")
        if name == "zstd":
            chain.append({"name": "zstd", "configuration": {"level": int(c.get("level", 0)),
                                                            "checksum": bool(c.get("checksum", False))}})
        elif name == "blosc":
            chain.append({"name": "blosc", "configuration": {
                "typesize": dtype.itemsize, "cname": c.get("cname", "lz4"), "clevel": int(c.get("clevel", 5)),
                "shuffle": c.get("shuffle", "bitshuffle"), "blocksize": int(c.get("blocksize", 0))}})
        else:
            raise ValueError(f"unsupported compressor {name!r}")
    if crc:
        chain.append({"name": "crc32c"})
    if shards is not None:
        codecs = [{"name": "sharding_indexed", "configuration": {
            "chunk_shape": [int(n) for n in chunks], "codecs": chain,
            "index_codecs": [{"name": "bytes", "configuration": {"endian": "little"}}, {"name": "crc32c"}],
            "index_location": "end"}}]
        grid = shards
    else:
        codecs, grid = chain, chunks
    if isinstance(fill_value, (bool, np.bool_)) or dtype.kind == "b":
        fill: Any = bool(fill_value)
    elif dtype.kind == "f":
        f = float(fill_value)
        fill = "NaN" if f != f else "Infinity" if f == np.inf else "-Infinity" if f == -np.inf else f
    else:
        fill = int(fill_value)
    meta = {"shape": [int(n) for n in shape], "data_type": dtype.name,
            "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": [int(n) for n in grid]}},
            "chunk_key_encoding": {"name": "default", "configuration": {"separator": separator}},
            "fill_value": fill, "codecs": codecs, "attributes": dict(attrs or {})}
    if dims is not None:
        meta["dimension_names"] = list(dims)
    meta.update(zarr_format=3, node_type="array", storage_transformers=[])
    return meta


_PARTIAL_BASE = [0, 0, 0]  # [random 128-bit base, writes so far, pid that drew the base]


def partial_name(path: str) -> str:
    """The temporary name of an atomic write (zarr-python's ``*.<32 hex>.partial`` pattern, which
    ``--resume`` and ``--overwrite`` know): a random base per process plus a counter (no random
    bytes to read per file; a forked child draws its own base)."""
    if _PARTIAL_BASE[2] != os.getpid() or _PARTIAL_BASE[1] >> 64:
        _PARTIAL_BASE[:] = [int.from_bytes(os.urandom(16), "little"), 0, os.getpid()]
    _PARTIAL_BASE[1] += 1
    token = (_PARTIAL_BASE[0] + _PARTIAL_BASE[1]) % (1 << 128)
    head, tail = os.path.split(path)
    stem = tail.rsplit(".", 1)[0] if "." in tail else tail
    return os.path.join(head, f"{stem}.{token:032x}.partial")


def _write_new(path: str, pieces: list) -> int:
    """Write ``pieces`` (bytes-like objects) as the file ``path`` (created or truncated);
    returns the number of bytes. The interpreter lock is released during the write (``os.writev``)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_CLOEXEC", 0), 0o666)
    total = 0
    try:
        views = [memoryview(p).cast("B") for p in pieces]
        views = [v for v in views if len(v)]
        while views:
            n = os.writev(fd, views[:512])
            total += n
            while views and n >= len(views[0]):
                n -= len(views[0])
                views.pop(0)
            if n:
                views[0] = views[0][n:]
    finally:
        os.close(fd)
    return total


def write_atomic(path: str, pieces: list) -> int:
    """Write ``pieces`` (bytes-like objects) as the file ``path``: into a temporary file next to it,
    then renamed over it, so a kill leaves the old file or the new one, never a mix. Returns the
    number of bytes. The interpreter lock is released during the write (``os.writev``).
    An object-store URL is written with one PUT instead (atomic by itself: :mod:`.storage`)."""
    if "://" in path and is_url(path):
        from .storage import put

        return put(path, pieces)
    tmp = partial_name(path)
    try:
        total = _write_new(tmp, pieces)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return total


def write_private(path: str, pieces: list) -> int:
    """Write a file inside a folder nobody reads yet (a store's build folder, renamed into place
    only once whole: :mod:`.lifecycle`): in place, without :func:`write_atomic`'s temporary name
    and rename (a kill leaves the build folder, which the next writer deletes, never the target).
    Object-store URLs: one PUT, as :func:`write_atomic`."""
    if "://" in path and is_url(path):
        return write_atomic(path, pieces)
    return _write_new(path, pieces)


def _json_bytes(obj: dict) -> bytes:
    return json.dumps(obj, indent=2, allow_nan=True).encode()


def write_json_atomic(path: str, obj: dict) -> None:
    write_atomic(path, [_json_bytes(obj)])


class ChunkEncoder:
    """Encodes whole chunks and shards of one array (its :class:`ArrayMeta`), for :meth:`write`."""

    def __init__(self, meta: ArrayMeta):
        if not self.supports(meta):
            raise ValueError(f"array {meta.name}: layout not writable directly")
        self.meta = meta
        conf = meta.raw["codecs"][0]["configuration"]["codecs"] if meta.sharded else meta.raw["codecs"]
        self._steps = []
        for c in conf[1:]:
            name, cfg = _named(c)
            if name == "zstd":
                from numcodecs.zstd import Zstd

                self._steps.append(("codec", Zstd(level=int(cfg.get("level", 0)),
                                                  checksum=bool(cfg.get("checksum", False)))))
            elif name == "blosc":
                from numcodecs.blosc import Blosc

                shuffle = {"noshuffle": Blosc.NOSHUFFLE, "shuffle": Blosc.SHUFFLE,
                           "bitshuffle": Blosc.BITSHUFFLE}[cfg.get("shuffle", "bitshuffle")]
                self._steps.append(("codec", Blosc(cname=cfg.get("cname", "lz4"), clevel=int(cfg.get("clevel", 5)),
                                                   shuffle=shuffle, blocksize=int(cfg.get("blocksize", 0)))))
            else:
                self._steps.append(("crc", None))
        self._dirs: set[str] = set()
        # where a file's pieces go: written at once, or handed to another thread (the pieces
        # may be views of the caller's data, which must then stay untouched until written)
        self.sink: Callable[[str, list], int] = write_atomic

    @staticmethod
    def supports(meta: ArrayMeta) -> bool:
        """Layouts this encoder writes: native fixed-size dtypes, default ``/`` keys, regular
        grid, (sharded with the index at its end, checksummed) bytes + optional zstd/blosc + crc32c."""
        m = meta
        if not m.native or m.dtype is None or m.key_prefix not in ("c/", "c.") or m.separator not in "/.":
            return False
        if m.dtype.byteorder == ">" or m.chain not in WRITABLE_CHAINS:
            return False
        if m.sharded and not (m.index_at_end and m.index_crc):
            return False
        return True

    def encode(self, chunk: np.ndarray) -> list:
        """One chunk's bytes, as pieces (no copy of uncompressed data)."""
        data: Any = np.ascontiguousarray(chunk)
        pieces = [data]
        for kind, codec in self._steps:
            if kind == "codec":
                data = codec.encode(data)
                pieces = [data]
            else:
                pieces.append(np.uint32(_crc32c(pieces)).astype("<u4").tobytes())
        return pieces

    def _mkdirs(self, path: str) -> None:
        d = os.path.dirname(path)
        if d not in self._dirs:
            if not self.meta.remote:  # object stores: nothing to create
                os.makedirs(d, exist_ok=True)
            self._dirs.add(d)

    def aligned(self, region: tuple[tuple[int, int], ...]) -> bool:
        """Does ``region`` (per dim [start, stop)) consist of whole outer chunks inside the array?
        A chunk or shard cut by the array's end counts as whole (an edge chunk is written padded
        with the fill value, as Zarr stores edge chunks; an edge shard holds the inner chunks
        that reach into the array, the others marked missing in its index)."""
        m = self.meta
        return len(region) == len(m.shape) and all(
            a % o == 0 and (b % o == 0 or b == n) and a < b <= n
            for (a, b), o, n in zip(region, m.outer, m.shape))

    def _padded(self, block: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        """``block`` (cut by the array's end) as a whole chunk of ``shape``, the rest the fill value."""
        if block.shape == shape:
            return block
        full = np.full(shape, self.meta.fill_value, dtype=self.meta.dtype)
        full[tuple(slice(0, n) for n in block.shape)] = block
        return full

    def write(self, region: tuple[tuple[int, int], ...], data: np.ndarray) -> int:
        """Write ``data`` (the values of ``region``, whole outer chunks: :meth:`aligned`) as one file
        per outer chunk. Returns the bytes written."""
        import itertools

        m = self.meta
        data = np.asarray(data, dtype=m.dtype)
        total = 0
        ranges = [range(a // o, -(-b // o)) for (a, b), o in zip(region, m.outer)]  # an edge chunk included
        for outer in itertools.product(*ranges):
            sel = tuple(slice(c * o - a, (c + 1) * o - a) for c, o, (a, _) in zip(outer, m.outer, region))
            block = data[sel]
            path = m.path(outer)
            self._mkdirs(path)
            if not m.sharded:  # an edge chunk: stored whole, the rest the fill value
                total += self.sink(path, self.encode(self._padded(block, m.outer)))
                continue
            pieces: list = []
            index = np.empty(m.per_shard + (2,), dtype="<u8")
            off = 0
            for inner in itertools.product(*(range(p) for p in m.per_shard)):
                if any(i * c >= n for i, c, n in zip(inner, m.inner, block.shape)):
                    index[inner] = (MISSING, MISSING)  # an edge shard: this chunk lies past the array's end
                    continue
                isel = tuple(slice(i * c, (i + 1) * c) for i, c in zip(inner, m.inner))
                enc = self.encode(self._padded(block[isel], m.inner))
                n = sum(memoryview(p).nbytes for p in enc)
                index[inner] = (off, n)
                off += n
                pieces += enc
            raw = index.tobytes()
            pieces += [raw, np.uint32(_crc32c([raw])).astype("<u4").tobytes()]
            total += self.sink(path, pieces)
        return total


def _crc32c(pieces: list) -> int:
    import google_crc32c

    if len(pieces) == 1:
        return google_crc32c.value(_readonly(pieces[0]))
    c = google_crc32c.Checksum()
    for p in pieces:
        c.update(_readonly(p))
    return int.from_bytes(c.digest(), "big")


def _readonly(p: Any) -> Any:
    if isinstance(p, bytes):
        return p
    if isinstance(p, np.ndarray):
        v = p.reshape(-1).view(np.uint8)
        if v.flags.writeable:
            v = v.view()
            v.flags.writeable = False
        return v
    return bytes(p)


# -- small arrays and groups (a store's skeleton) --------------------------------------------------
def write_array(root: str | Path, name: str, values: Any, dims: tuple[str, ...] | None = None, *,
                fill_value: Any = None, attrs: dict | None = None, separator: str = "/",
                private: bool = False) -> None:
    """A small array (a coordinate) as one uncompressed chunk, metadata first: what zarr-python's
    ``create_array(..., compressors=None)`` then ``a[...] = values`` writes. Strings (numpy ``U``/
    ``S``/object) are stored as Zarr v3 ``string`` (``vlen-utf8``). ``private``: ``root`` is a
    build folder nobody reads yet (:func:`write_private`); else every file is written atomically."""
    write = write_private if private else write_atomic
    values = np.asarray(values)
    folder = as_path(root) / name
    folder.mkdir(parents=True, exist_ok=True)
    shape = tuple(values.shape)
    chunks = tuple(max(1, n) for n in shape)
    if values.dtype.kind in "USO":
        meta = array_metadata(shape, chunks, "uint8", 0, dims=dims, attrs=attrs, crc=False, separator=separator)
        meta.update(data_type="string", fill_value="" if fill_value is None else fill_value,
                    codecs=[{"name": "vlen-utf8", "configuration": {}}])
        items = [str(v).encode("utf-8") for v in values.reshape(-1)]
        body = [np.uint32(len(items)).astype("<u4").tobytes()]
        for b in items:
            body += [np.uint32(len(b)).astype("<u4").tobytes(), b]
    else:
        meta = array_metadata(shape, chunks, values.dtype.name, 0 if fill_value is None else fill_value,
                              dims=dims, attrs=attrs, crc=False, separator=separator)
        body = [np.ascontiguousarray(values, dtype=values.dtype.newbyteorder("<"))]
    write(str(folder / "zarr.json"), [_json_bytes(meta)])
    if values.size:
        key = ("c" + separator + separator.join("0" for _ in shape)) if shape else "c"
        path = folder / key
        if separator == "/":
            path.parent.mkdir(parents=True, exist_ok=True)
        write(str(path), body)


GROUP_KEYS = ("attributes", "zarr_format", "consolidated_metadata", "node_type")


def write_group(root: str | Path, attrs: dict | None = None, consolidated: dict | None = None, *,
                private: bool = False) -> None:
    """A group's ``zarr.json`` (atomically; in place when ``private``: :func:`write_array`): its
    attributes and, if given, the consolidated metadata of its members (name -> their
    ``zarr.json``), as zarr-python writes them."""
    meta: dict = {"attributes": dict(attrs or {}), "zarr_format": 3}
    if consolidated is not None:
        meta["consolidated_metadata"] = {"kind": "inline", "must_understand": False, "metadata": consolidated}
    meta["node_type"] = "group"
    root = as_path(root)
    root.mkdir(parents=True, exist_ok=True)
    (write_private if private else write_atomic)(str(root / "zarr.json"), [_json_bytes(meta)])


def consolidate(root: str | Path, attrs: dict | None = None) -> bool:
    """Consolidate a group's metadata like ``zarr.consolidate_metadata``: every member array's
    ``zarr.json`` inlined in the group's, with ``attrs`` merged into its attributes first (one
    atomic write for both). Only groups whose members are all arrays (capture stores); returns
    False (nothing written) for anything else, then use zarr-python."""
    root = as_path(root)
    group = read_json(root / "zarr.json", "group")
    if group.get("node_type") != "group" or group.get("zarr_format") != 3:
        return False
    members = {}
    for p in sorted(root.iterdir()):
        meta_file = p / "zarr.json"
        if not p.is_dir() or not meta_file.is_file():
            continue
        m = read_json(meta_file, f"array {p.name}")
        if m.get("node_type") != "array":
            return False
        members[p.name] = m
    write_group(root, {**(group.get("attributes") or {}), **(attrs or {})}, members)
    return True
