"""Is a store whole? Structure checks (``inspect_store``) and chunk checks (``verify_store``).

``inspect_store`` reads the store's metadata files directly (plain JSON, no Zarr) and turns every
way a store can be half-made or damaged into a one-line :class:`StoreError` that says what the
folder is and what to do: a folder whose creation was interrupted, an unreadable ``zarr.json``,
a missing ``step_complete``.

``verify_store`` then checks, for every step marked in ``step_complete``, that each array's chunk
(or shard) file of that step exists and is whole: the file's size, and for shards their index
(its checksum, every inner chunk present and inside the file). With ``decode=True`` it also reads
every such chunk through Zarr, which checks each chunk's CRC32C (stores of format 2 and later) and
decompresses it. Problems are reported per (array, step).

Which steps an array's rows belong to: ``step`` arrays row by row; ``latents`` row k (x before
step k) with step k - 1 (row 0 with step 0); ``rng_state`` rows are written only when a generator
moved, so only row 0 must exist; arrays without a step dim (coordinates, probe outputs computed
once) are checked when every step is marked (coordinates always).
"""

from __future__ import annotations

import itertools
import json
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..errors import StoreError
from .files import FIGURES, PARTIAL, REGIONS_DIR, is_temp_name
from .layout import COORDS, STEP_COMPLETE, row_role
from .lock import LOCK_NAME
from .metadata import ATTR_KEY
from .skeleton import CREATING_KEY
from .storage import ObjectPath, as_path, read_range, total_bytes, zarr_store
from .zarrio import ArrayMeta as ZarrArrayMeta
_FIXED_CODECS = {"bytes", "crc32c", "transpose"}
_EMPTY = 2**64 - 1


class DamagedStore(StoreError):
    """A store that is half-made or whose metadata cannot be read: nothing can resume it."""


@dataclass(frozen=True)
class ChunkFiles:
    """Where one array's chunk (shard) files are and how big they must be.

    Built on :class:`zarrio.ArrayMeta` (the one parser of ``zarr.json``); this adds what the
    checks need: the exact size of a chunk nothing compresses, and the size of a shard index.
    """

    meta: ZarrArrayMeta
    raw_bytes: int | None              # exact size of one (inner) chunk when nothing compresses it
    index_bytes: int                   # size of a shard's index (0 when not sharded)

    @classmethod
    def of(cls, meta: ZarrArrayMeta) -> "ChunkFiles":
        m = meta.raw
        itemsize = meta.dtype.itemsize if meta.dtype is not None else None
        codecs = list(m.get("codecs") or [])
        if meta.sharded:
            conf = codecs[0].get("configuration") or {}
            index_codecs = [c.get("name") for c in conf.get("index_codecs") or [{"name": "bytes"}, {"name": "crc32c"}]]
            n_inner = int(np.prod(meta.per_shard))
            index_bytes = 16 * n_inner + 4 * index_codecs.count("crc32c")
            raw = _fixed_size(conf.get("codecs") or [], meta.inner, itemsize)
        else:
            index_bytes, raw = 0, _fixed_size(codecs, meta.outer, itemsize)
        return cls(meta, raw, index_bytes)

    @property
    def name(self) -> str:
        return self.meta.name

    @property
    def shape(self) -> tuple[int, ...]:
        return self.meta.shape

    @property
    def dims(self) -> tuple[str, ...]:
        return self.meta.dims

    @property
    def grid(self) -> tuple[int, ...]:
        """Chunk (shard) shape of files."""
        return self.meta.outer

    @property
    def inner(self) -> tuple[int, ...] | None:
        """Chunk shape inside a shard, for sharded arrays."""
        return self.meta.inner if self.meta.sharded else None

    @property
    def index_at_end(self) -> bool:
        return self.meta.index_at_end

    @property
    def index_crc(self) -> bool:
        return self.meta.index_crc

    @property
    def attrs(self) -> dict:
        return self.meta.attrs

    @property
    def counts(self) -> tuple[int, ...]:
        return tuple(math.ceil(n / c) if c else 0 for n, c in zip(self.shape, self.grid))

    @property
    def inner_per_file(self) -> int:
        return int(np.prod(self.meta.per_shard)) if self.meta.sharded else 1

    def key(self, idx: tuple[int, ...]) -> str:
        return self.meta.key(tuple(idx))

    def files_of_row(self, row: int) -> list[tuple[int, ...]]:
        """Chunk-grid indices of the files that hold row ``row`` of the first dim."""
        rest = [range(n) for n in self.counts[1:]]
        return [(row // self.grid[0],) + t for t in itertools.product(*rest)]

    def all_files(self) -> list[tuple[int, ...]]:
        return list(itertools.product(*[range(n) for n in self.counts]))

    def region(self, idx: tuple[int, ...]) -> tuple[slice, ...]:
        return tuple(slice(i * c, min((i + 1) * c, n)) for i, c, n in zip(idx, self.grid, self.shape))


# the name older code used for the per-array view of a store
ArrayMeta = ChunkFiles


def _parse_meta(folder: Path, meta: dict) -> ZarrArrayMeta:
    """zarrio's parser on the ``zarr.json`` already read (one read per array)."""
    parse = getattr(ZarrArrayMeta, "from_json", None) or ZarrArrayMeta._parse
    return parse(folder, folder.name, meta)


def _fixed_size(codecs: list, chunk: tuple[int, ...], itemsize: int | None) -> int | None:
    names = [c.get("name") for c in codecs]
    if itemsize is None or any(n not in _FIXED_CODECS for n in names):
        return None
    return int(np.prod(chunk)) * itemsize + 4 * names.count("crc32c")


@dataclass
class Problem:
    array: str
    step: int | None
    what: str
    row: int | None = None  # the array's own row (latent_step) when it differs from the step

    def line(self) -> str:
        where = "" if self.step is None else f" step {self.step}"
        if self.row is not None and self.row != self.step:
            where = f" latent_step {self.row} (step {self.step})" if self.step is not None else f" row {self.row}"
        return f"{self.array}{where}: {self.what}"

    def as_dict(self) -> dict[str, Any]:
        return {"array": self.array, "step": self.step, "row": self.row, "problem": self.what}


@dataclass
class StoreLayout:
    """A store's metadata as read from its files (see :func:`inspect_store`)."""

    path: Path
    meta: dict
    kind: str
    arrays: dict[str, ChunkFiles]
    step_complete: np.ndarray | None
    format_version: int

    @property
    def steps_total(self) -> int:
        return 0 if self.step_complete is None else int(self.step_complete.size)

    @property
    def strict(self) -> bool:
        """Format 2 stores write every chunk (even all-fill ones) and checksum it."""
        return self.format_version >= 2


def _read_json(path: Path) -> dict:
    data = json.loads(path.read_text())
    if not isinstance(data, dict):
        raise ValueError("not a JSON object")
    return data


def _remake(path: Path) -> str:
    return f"replace it by running the command that made it with --overwrite (--out {path})"


def inspect_store(path: str | Path, kinds: tuple[str, ...] | None = None) -> StoreLayout:
    """Read a store's metadata from its files; a half-made or damaged store is a one-line
    :class:`DamagedStore`, a folder that is no store at all a :class:`StoreError`."""
    path = as_path(path)
    if not path.exists():
        raise StoreError(f"no store at {path}")
    if not path.is_dir():
        raise StoreError(f"{path} is a file, not a store (a store is a folder)")
    entries = [p for p in path.iterdir() if p.name not in (LOCK_NAME,) and not is_temp_name(p.name)]
    root = path / "zarr.json"
    if not root.exists():
        if not entries:
            raise DamagedStore(f"{path} is an empty folder, not a store; to write a store there, run the "
                               f"command with --overwrite (--out {path})")
        if any((p / "zarr.json").exists() for p in entries if p.is_dir()):
            raise DamagedStore(f"{path} is a damaged store: its group metadata {root} is missing; {_remake(path)}")
        raise StoreError(f"{path} is not a dithooks store (no zarr.json)")
    try:
        group = _read_json(root)
    except (OSError, ValueError) as e:
        raise DamagedStore(f"{path} is a damaged store: its metadata {root} is unreadable ({_short(e)}); "
                           f"{_remake(path)}") from None
    if group.get("node_type") != "group":
        raise StoreError(f"{path} is a Zarr {group.get('node_type')}, not a dithooks store")
    meta = (group.get("attributes") or {}).get(ATTR_KEY)
    arrays_dirs = [p for p in entries if p.is_dir() and p.name not in (FIGURES, REGIONS_DIR)]
    if not isinstance(meta, dict):
        if not arrays_dirs or (group.get("attributes") or {}).get(CREATING_KEY):
            raise DamagedStore(f"{path} is a half-made store (its creation was interrupted before its metadata "
                               f"was written): nothing in it can be read or resumed; {_remake(path)}")
        raise StoreError(f"{path} is a Zarr store but not a dithooks store (no '{ATTR_KEY}' metadata)")
    kind = str(meta.get("kind", "capture"))
    if kinds is not None and kind not in kinds:
        raise StoreError(f"{path} is a {kind} store, not a {' or '.join(kinds)} store")
    arrays: dict[str, ChunkFiles] = {}
    for d in sorted(arrays_dirs):
        f = d / "zarr.json"
        if not f.exists() and all(PARTIAL.match(p.name) for p in d.iterdir()):
            continue  # a write killed before the array's metadata appeared: no array yet
        if not f.exists():
            raise DamagedStore(f"{path} is damaged: array {d.name} has no metadata ({f} is missing); {_remake(path)}")
        try:
            m = _read_json(f)
            if m.get("node_type") != "array":
                continue  # a nested group (protocol stores keep capture runs in subgroups)
            arrays[d.name] = ChunkFiles.of(_parse_meta(d, m))
        except StoreError as e:  # zarrio's one-line reason names the file already
            raise DamagedStore(f"{path} is damaged: the metadata of array {d.name} ({f}) is unreadable "
                               f"({_short(e)}); {_remake(path)}") from None
        except (OSError, ValueError, KeyError, TypeError, AttributeError, IndexError) as e:
            raise DamagedStore(f"{path} is damaged: the metadata of array {d.name} ({f}) is unreadable "
                               f"({_short(e)}); {_remake(path)}") from None
    done = None
    if kind == "capture":
        if STEP_COMPLETE not in arrays:
            half = "half-made" if not any(n not in COORDS for n in arrays) else "damaged"
            raise DamagedStore(f"{path} is a {half} store: it has no step_complete array, so what is on disk "
                               f"is unknown; {_remake(path)}")
        done = _read_step_complete(path, arrays[STEP_COMPLETE])
    try:
        version = int(meta.get("format_version", 1))
    except (TypeError, ValueError):
        version = 1
    return StoreLayout(path, meta, kind, arrays, done, version)


def _short(e: BaseException) -> str:
    s = str(e).splitlines()[0] if str(e) else type(e).__name__
    return s if len(s) <= 80 else s[:77] + "..."


def _read_step_complete(path: Path, a: ChunkFiles) -> np.ndarray:
    import zarr

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            arr = zarr.open_array(zarr_store(path / "step_complete", read_only=True), mode="r")
            return np.asarray(arr[...], dtype=bool)
    except Exception as e:  # a corrupt chunk of it: unknown what is on disk
        raise DamagedStore(f"{path} is damaged: step_complete cannot be read ({_short(e)}); "
                           f"{_remake(path)}") from None


# -- chunk checks ------------------------------------------------------------------------------
@dataclass
class VerifyReport:
    store: str
    kind: str
    steps_total: int
    steps_marked: int
    decoded: bool
    arrays: int = 0
    files_checked: int = 0
    chunks_decoded: int = 0
    problems: list[Problem] = field(default_factory=list)
    # the first step whose data is not all on disk (resume restarts there); None when a problem
    # lies outside the steps (a coordinate, step_complete): no resume can repair it
    first_bad_step: int | None = None
    repairable: bool = True

    @property
    def ok(self) -> bool:
        return not self.problems

    def as_dict(self) -> dict[str, Any]:
        return {"store": self.store, "kind": self.kind, "ok": self.ok, "decoded": self.decoded,
                "steps_total": self.steps_total, "steps_marked_complete": self.steps_marked,
                "arrays": self.arrays, "files_checked": self.files_checked, "chunks_decoded": self.chunks_decoded,
                "first_bad_step": self.first_bad_step, "repairable": self.repairable,
                "problems": [p.as_dict() for p in self.problems]}

    def summary(self, limit: int = 3) -> str:
        if self.ok:
            return "ok"
        shown = "; ".join(p.line() for p in self.problems[:limit])
        more = f" (+{len(self.problems) - limit} more)" if len(self.problems) > limit else ""
        return f"{len(self.problems)} damaged chunk{'s' if len(self.problems) != 1 else ''}: {shown}{more}"


def _crc32c(data: bytes) -> int | None:
    try:
        import google_crc32c
    except ImportError:
        return None
    return int(google_crc32c.value(data))


class RowsProblem(str):
    """A problem with a file that concerns only some of the rows it holds (``rows``, along the
    first dim): a shard of several steps that lacks the chunks of some of them."""

    rows: set[int]

    def __new__(cls, what: str, rows: set[int]) -> "RowsProblem":
        self = super().__new__(cls, what)
        self.rows = rows
        return self


def _inner_rows(a: ChunkFiles, idx: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """For each inner chunk of shard file ``idx`` (index order): its first row along the first
    dim, and whether it reaches into the array (an edge shard's other chunks are never written)."""
    starts = [np.arange(p) * c + i * g for p, c, i, g in zip(a.meta.per_shard, a.meta.inner, idx, a.grid)]
    grids = np.meshgrid(*starts, indexing="ij")
    inside = np.ones(grids[0].shape, bool)
    for g, n in zip(grids, a.shape):
        inside &= g < n
    return grids[0].reshape(-1), inside.reshape(-1)


def check_file(a: ChunkFiles, file: Path, strict: bool, data: bytes | None = None,
               idx: tuple[int, ...] | None = None, rows: set[int] | None = None) -> str | None:
    """What is wrong with one chunk/shard file without decoding it (None: looks whole).
    ``data``: the file's bytes, when they were read already (object stores: one GET).
    ``idx``/``rows``: the file's index in the chunk grid and the rows (along the first dim) it must
    hold; a shard may then lack the chunks of other rows (a shard of several steps whose later
    steps are not done yet) and those past the array's end. Without them every chunk must be there.
    A shard that lacks chunks of needed rows says which (:class:`RowsProblem`)."""
    try:
        size = file.stat().st_size if data is None else len(data)
    except FileNotFoundError:
        return "missing chunk file" if a.inner is None else "missing shard file"
    except OSError as e:
        return f"unreadable ({e.strerror})"
    if a.inner is None:
        if size == 0:
            return "empty chunk file"
        if a.raw_bytes is not None and size != a.raw_bytes:
            return f"chunk file has {size} bytes, {a.raw_bytes} expected (truncated or overwritten)"
        return None
    if size < a.index_bytes:
        return f"shard file truncated ({size} bytes)"
    try:
        if data is not None:
            index = data[size - a.index_bytes:] if a.index_at_end else data[:a.index_bytes]
        elif isinstance(file, ObjectPath):
            index = read_range(file.url, size - a.index_bytes if a.index_at_end else 0, a.index_bytes)
        else:
            with open(file, "rb") as f:
                if a.index_at_end:
                    f.seek(size - a.index_bytes)
                index = f.read(a.index_bytes)
    except OSError as e:
        return f"unreadable ({e.strerror})"
    if len(index) != a.index_bytes:
        return f"shard file truncated ({size} bytes)"
    body = index[:-4] if a.index_crc else index
    if a.index_crc:
        crc = _crc32c(body)
        if crc is not None and crc != int.from_bytes(index[-4:], "little"):
            return "shard index checksum does not match (truncated or overwritten)"
    entries = np.frombuffer(body, dtype="<u8").reshape(-1, 2)
    empty = (entries[:, 0] == _EMPTY) & (entries[:, 1] == _EMPTY)
    if strict and empty.any():
        if idx is None:
            return f"{int(empty.sum())} of {len(entries)} chunks missing from the shard"
        first, inside = _inner_rows(a, idx)
        span = a.meta.inner[0]
        needed = inside & np.array([rows is None or any(r in rows for r in range(f, f + span)) for f in first])
        lacking = empty & needed
        if lacking.any():
            lost = {int(r) for f in first[lacking] for r in range(int(f), int(f) + span) if rows is None or r in rows}
            return RowsProblem(f"{int(lacking.sum())} of {int(needed.sum())} chunks missing from the shard", lost)
    data_end = size - a.index_bytes if a.index_at_end else size
    data_start = 0 if a.index_at_end else a.index_bytes
    used = entries[~empty]
    if used.size and ((used[:, 0] < data_start) | (used[:, 0] + used[:, 1] > data_end)).any():
        return "shard truncated (a chunk reaches past its end)"
    if a.raw_bytes is not None and used.size and (used[:, 1] != a.raw_bytes).any():
        return "a chunk in the shard has the wrong size"
    return None


def _decode_object(a: ChunkFiles, idx: tuple[int, ...], data: bytes) -> int:
    """Decode every chunk of one chunk or shard file from its bytes (checksums, decompression,
    sizes: zarrio's reader); returns how many; raises on the first that does not decode."""
    from .zarrio import MISSING, ArrayReader, Block

    r = ArrayReader(a.meta)
    if a.inner is None:
        r._decode(data, Block(tuple(idx), (), ()))
        return 1
    n = a.inner_per_file
    lo = len(data) - a.index_bytes if a.index_at_end else 0
    index = np.frombuffer(data[lo:lo + 16 * n], dtype="<u8").reshape(-1, 2)
    per = a.meta.per_shard
    done = 0
    for k, inner in enumerate(itertools.product(*(range(p) for p in per))):
        off, nbytes = index[k]
        if off == MISSING and nbytes == MISSING:
            continue
        chunk = tuple(i * p + j for i, p, j in zip(idx, per, inner))
        r._decode(data[int(off):int(off) + int(nbytes)], Block(chunk, (), ()))
        done += 1
    return done


def _rows_needed(layout: StoreLayout, a: ChunkFiles) -> tuple[str, list[tuple[int, int]]]:
    """How ``a``'s rows map onto steps: (role, [(row, step)]) of the rows that must be whole
    (roles: :func:`layout.row_role`)."""
    done = layout.step_complete if layout.step_complete is not None else np.zeros(0, bool)
    marked = np.flatnonzero(done).tolist()
    every = bool(done.size) and bool(done.all())
    role = row_role(a.name, a.dims, a.shape[0] if a.shape else 0, int(done.size))
    if role in ("flags", "coordinate"):
        return role, []
    if role == "step":
        return role, [(s, s) for s in marked]
    if role == "rng":  # rows only where a generator moved; row 0 always
        return role, [(0, 0)] if marked and marked[0] == 0 else []
    if role == "latent":
        rows = [(0, 0)] if marked and marked[0] == 0 else []
        return role, rows + [(s + 1, s) for s in marked]
    return "whole", [] if not every else [(-1, 0)]


def verify_store(path: str | Path, decode: bool = True, layout: StoreLayout | None = None,
                 progress: Callable[[str], None] | None = None) -> VerifyReport:
    """Check every chunk of every step marked complete (see the module docstring)."""
    layout = layout or inspect_store(path)
    done = layout.step_complete
    rep = VerifyReport(str(layout.path), layout.kind, layout.steps_total,
                       int(done.sum()) if done is not None else 0, decode)
    group = None
    remote = isinstance(layout.path, ObjectPath)
    if decode:
        import zarr

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            group = zarr.open_group(zarr_store(layout.path, read_only=True), mode="r", use_consolidated=False)
    # object stores: which objects exist, and their sizes, from one listing (not a HEAD per object)
    base = layout.path.listed() if isinstance(layout.path, ObjectPath) else layout.path
    for name, a in layout.arrays.items():
        if progress:
            progress(name)
        rep.arrays += 1
        folder = base / name
        if layout.kind != "capture":
            role, rows = "other", []
        else:
            role, rows = _rows_needed(layout, a)
        checks: list[tuple[tuple[int, ...], int | None, int | None, bool]] = []  # (file, step, row, must exist)
        if role in ("step", "latent", "rng"):
            for row, step in rows:
                checks += [(idx, step, row if role != "step" else None, True) for idx in a.files_of_row(row)]
            if role == "rng" and decode:  # the other rows that exist must decode too
                listed = {idx for idx, *_ in checks}
                for idx in a.all_files():
                    r = idx[0] * a.grid[0]
                    step = max(r - 1, 0)
                    if idx not in listed and step < done.size and done[step]:
                        checks.append((idx, step, r, False))
        elif role == "whole" and rows:
            checks += [(idx, None, None, layout.strict) for idx in a.all_files()]
        elif role in ("coordinate", "flags", "other"):
            strict_coord = layout.strict and role == "coordinate"
            checks += [(idx, None, None, strict_coord) for idx in a.all_files()]
        # a file holding several rows (latents in chunks of rows) is checked once; a problem with
        # it is reported for each step it holds
        by_file: dict[tuple[int, ...], list[tuple[int | None, int | None, bool]]] = {}
        for idx, step, row, must in checks:
            by_file.setdefault(idx, []).append((step, row, must))

        def needed_rows(uses: list) -> set[int] | None:
            """The rows a file must hold: those of its marked steps (None: all, for files not
            checked per step)."""
            if role not in ("step", "latent", "rng"):
                return None
            return {step if row is None else row for step, row, _ in uses if step is not None}

        for idx, uses in by_file.items():
            must = any(m for _, _, m in uses)
            file = folder / a.key(idx)
            if not must and not file.exists():
                continue
            rep.files_checked += 1
            if remote and decode and a.meta.native:  # one GET: checked and decoded from the bytes
                try:
                    data = file.read_bytes()
                except FileNotFoundError:
                    data = None
                what = check_file(a, file, layout.strict, data, idx=idx, rows=needed_rows(uses)) if data is not None else \
                    ("missing chunk file" if a.inner is None else "missing shard file")
                if what is None:
                    try:
                        rep.chunks_decoded += _decode_object(a, idx, data)
                    except Exception as e:
                        what = f"does not decode ({_short(e)})"
            else:
                what = check_file(a, file, layout.strict, idx=idx, rows=needed_rows(uses))
            if what is None and group is not None and not (remote and a.meta.native):
                try:
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")
                        np.asarray(group[name][a.region(idx)])
                    # the chunks inside the array (an edge shard holds no others)
                    rep.chunks_decoded += int(_inner_rows(a, idx)[1].sum()) if a.inner is not None else 1
                except Exception as e:
                    what = f"does not decode ({_short(e)})"
            if what is not None:
                if role == "coordinate" or role == "flags":
                    rep.repairable = False
                lost = getattr(what, "rows", None)  # only some of the file's rows concerned
                for step, row, _ in uses:
                    if lost is not None and (step if row is None else row) not in lost:
                        continue
                    rep.problems.append(Problem(name, step, str(what), row))
                    if role in ("step", "latent", "rng", "whole"):
                        s = 0 if step is None else step
                        rep.first_bad_step = s if rep.first_bad_step is None else min(rep.first_bad_step, s)
    if not rep.repairable:
        rep.first_bad_step = None
    return rep


def stored_bytes(path: str | Path) -> int:
    return total_bytes(as_path(path))
