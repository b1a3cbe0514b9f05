"""Where a store lives: a local folder or an object-store URL (``s3://bucket/run.zarr``, any
fsspec protocol).

The store code is written against the small part of :class:`pathlib.Path` it needs (``/``,
``name``, ``exists``, ``is_dir``, ``iterdir``, ``read_text``, ``stat().st_size``, ...) plus the
few operations below. A local store is a :class:`~pathlib.Path` and takes exactly the code paths
it always took (``writev`` into a temporary file and a rename, ``pread``, hard-linked lock
files); a URL is an :class:`ObjectPath`, which answers the same calls through an fsspec file
system, and the operations that differ on an object store dispatch here:

============================  =================================  =================================
operation                     local folder                       object store
============================  =================================  =================================
write a file whole            temporary file + rename            one PUT (atomic by itself)
read a byte range             ``pread``                          ranged GET
create exclusively (lock)     hard link / ``O_EXCL``             PUT with ``If-None-Match: *``
a prefix / folder             ``mkdir``                          nothing to create
delete a tree                 ``shutil.rmtree``                  delete every key under the prefix
Zarr store (zarr-python)      the folder's path                  ``zarr.storage.FsspecStore``
============================  =================================  =================================

Credentials and endpoint come from fsspec's usual places: environment (``AWS_ACCESS_KEY_ID``,
``AWS_ENDPOINT_URL``, ...), the ``storage_options`` of :func:`as_path` / ``open_store``, or
the environment variable ``DITHOOKS_STORAGE_OPTIONS`` (JSON, e.g.
``{"endpoint_url": "http://localhost:9000"}``) for the command line.
"""

from __future__ import annotations

import json
import os
import re
import threading
from pathlib import Path, PurePath
from typing import Any, Iterator, NamedTuple

from ..errors import StoreError

# "s3://bucket/key": a scheme of two or more letters (so "C:/..." stays a path)
_URL = re.compile(r"^(?P<scheme>[A-Za-z][A-Za-z0-9+.-]+)://(?P<rest>.*)$")
# what pathlib makes of a URL: "s3://b/k" -> "s3:/b/k" (typer's Path options do this)
_COLLAPSED = re.compile(r"^(?P<scheme>[A-Za-z][A-Za-z0-9+.-]+):/(?P<rest>[^/].*)$")
ENV_OPTIONS = "DITHOOKS_STORAGE_OPTIONS"
PUT_CONCURRENCY = 8  # parts of one large object uploaded at once (multipart)

_LOCK = threading.Lock()
_FS: dict[tuple[str, str, bool], Any] = {}          # (protocol, options as JSON, async) -> file system
_PREFIX_OPTIONS: dict[str, dict[str, Any]] = {}   # url prefix -> storage options given for it


def is_url(x: Any) -> bool:
    """An object-store location (an :class:`ObjectPath`, or a ``scheme://`` string other than
    ``file://``)."""
    if isinstance(x, ObjectPath):
        return True
    if isinstance(x, str) and "://" in x:
        m = _URL.match(x)
        return m is not None and m["scheme"].lower() != "file"
    return False


def default_options() -> dict[str, Any]:
    """Storage options for URLs given without any: ``DITHOOKS_STORAGE_OPTIONS`` (JSON)."""
    text = os.environ.get(ENV_OPTIONS)
    if not text:
        return {}
    try:
        opts = json.loads(text)
    except ValueError as e:
        raise StoreError(f"{ENV_OPTIONS} is not valid JSON ({e})") from None
    if not isinstance(opts, dict):
        raise StoreError(f"{ENV_OPTIONS} must be a JSON object, e.g. '{{\"endpoint_url\": \"http://host:9000\"}}'")
    return opts


def set_storage_options(prefix: str, options: dict[str, Any]) -> None:
    """Use fsspec ``options`` for every URL under ``prefix`` (``s3://bucket`` or a store's URL) in
    this process: captures (``CaptureConfig(out=...)``), readers, zarr-python through
    :func:`zarr_store`. The longest registered prefix wins; unregistered URLs use
    ``DITHOOKS_STORAGE_OPTIONS`` and the environment."""
    m = _URL.match(str(prefix))
    if m is None:
        raise StoreError(f"{prefix} is not a URL (e.g. s3://bucket)")
    with _LOCK:
        _PREFIX_OPTIONS[f"{m['scheme'].lower()}://{m['rest'].rstrip('/')}"] = dict(options)


def options_for(url: str) -> dict[str, Any]:
    """The storage options registered for the longest prefix of ``url`` (:func:`as_path` with
    ``storage_options``), else the defaults."""
    best = None
    with _LOCK:
        for prefix, opts in _PREFIX_OPTIONS.items():
            if (url == prefix or url.startswith(prefix.rstrip("/") + "/")) and (best is None or len(prefix) > len(best[0])):
                best = (prefix, opts)
    return dict(best[1]) if best is not None else default_options()


def as_path(x: Any, storage_options: dict[str, Any] | None = None) -> "Path | ObjectPath":
    """A store location: :class:`ObjectPath` for URLs (also a URL that went through
    :class:`pathlib.Path`, ``s3:/b/k``), else a :class:`~pathlib.Path`."""
    if isinstance(x, ObjectPath):
        return x if storage_options is None else ObjectPath(x.url, storage_options)
    if isinstance(x, PurePath):
        s = str(x)
        m = _COLLAPSED.match(s)
        if m is not None and not x.is_absolute() and m["scheme"].lower() != "file":
            return ObjectPath(f"{m['scheme']}://{m['rest']}", storage_options)
        return x if isinstance(x, Path) else Path(x)
    s = os.fspath(x)
    if isinstance(s, str) and "://" in s:
        m = _URL.match(s)
        if m is not None:
            if m["scheme"].lower() == "file":
                return Path(m["rest"])
            return ObjectPath(s, storage_options)
    return Path(s)


def filesystem(url: str, asynchronous: bool = False) -> Any:
    """The fsspec file system for ``url`` (one per protocol and options; listings are not
    cached: other processes write the same store)."""
    try:
        import fsspec
    except ImportError:  # pragma: no cover - zarr depends on it... optionally
        raise StoreError(f"{url}: object storage needs fsspec (pip install 'dithooks[s3]')") from None
    protocol = _URL.match(url)["scheme"].lower()
    opts = options_for(url)
    key = (protocol, json.dumps(opts, sort_keys=True, default=str), asynchronous)
    with _LOCK:
        fs = _FS.get(key)
    if fs is not None:
        return fs
    kw = dict(opts)
    if protocol in ("s3", "s3a"):
        kw.setdefault("use_listings_cache", False)
        # whole-object reads in one GET (with more, s3fs asks for the size first: a HEAD per read)
        kw.setdefault("max_concurrency", 1)
    if asynchronous:
        kw["asynchronous"] = True
    try:
        fs = fsspec.filesystem(protocol, **kw)
    except ImportError as e:
        pkg = "s3fs" if protocol in ("s3", "s3a") else "the fsspec backend for " + protocol
        raise StoreError(f"{url}: reading and writing {protocol}:// stores needs {pkg} "
                         f"(pip install 'dithooks[s3]'): {e}") from None
    except (ValueError, TypeError) as e:
        raise StoreError(f"{url}: bad storage options ({e})") from None
    with _LOCK:
        _FS[key] = fs
    return fs


def _describe(e: BaseException) -> str:
    text = str(e).splitlines()[0] if str(e) else ""
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


class _Stat(NamedTuple):
    st_size: int
    st_mtime: float


def _guard(what: str, url: str):
    """Turn a file system's errors (no connection, no credentials, access denied) into one-line
    :class:`StoreError`; ``FileNotFoundError`` / ``FileExistsError`` pass (they mean something)."""
    return _Guard(what, url)


class _Guard:
    def __init__(self, what: str, url: str):
        self.what, self.url = what, url

    def __enter__(self) -> None:
        return None

    def __exit__(self, et, e, tb) -> bool:
        if e is None or isinstance(e, (FileNotFoundError, FileExistsError, StoreError, KeyboardInterrupt,
                                       SystemExit, GeneratorExit)):
            return False
        if isinstance(e, PermissionError):
            raise StoreError(f"cannot {self.what} {self.url}: access denied ({_describe(e)})") from None
        if isinstance(e, Exception):
            raise StoreError(f"cannot {self.what} {self.url}: {_describe(e)}") from None
        return False


class _Listing:
    """Every object under one prefix, from one recursive LIST: what :class:`ObjectPath` answers
    ``exists``/``is_dir``/``is_file``/``stat``/``iterdir`` from for paths under that prefix."""

    __slots__ = ("root", "files", "dirs")

    def __init__(self, root: str, found: dict[str, dict]):
        self.root = root.rstrip("/")
        self.files: dict[str, tuple[int, float]] = {}
        self.dirs: set[str] = {self.root}
        for name, info in found.items():
            name = str(name).rstrip("/")
            if info.get("type", "file") != "file" or not name.startswith(self.root + "/"):
                continue
            self.files[name] = (int(info.get("size") or 0), _mtime(info))
            parent = name.rsplit("/", 1)[0]
            while len(parent) > len(self.root) and parent not in self.dirs:
                self.dirs.add(parent)
                parent = parent.rsplit("/", 1)[0]

    def covers(self, key: str) -> bool:
        return key == self.root or key.startswith(self.root + "/")

    def children(self, key: str) -> list[tuple[str, str]]:
        """(full key, "file" | "directory") of the entries directly under ``key``."""
        base = key.rstrip("/") + "/"
        out = {}
        for name in list(self.files) + list(self.dirs):
            if name.startswith(base) and "/" not in name[len(base):]:
                out[name] = "file" if name in self.files else "directory"
        return sorted(out.items())


class ObjectPath:
    """A location in an object store, with the part of :class:`pathlib.Path` the store code
    uses. A "folder" is a key prefix: it exists when some key lies under it, and needs no
    creating. :meth:`iterdir` and :meth:`rglob` list everything under the prefix once (one
    recursive LIST); the paths they return, and paths made from those with ``/``, answer
    ``exists``/``is_dir``/``is_file``/``stat``/``iterdir`` from that listing (a snapshot, as a
    directory listing is), while reads (:meth:`read_bytes`) always go to the store."""

    __slots__ = ("url", "_listing")

    def __init__(self, url: str, storage_options: dict[str, Any] | None = None, _listing: _Listing | None = None):
        m = _URL.match(str(url))
        if m is None:
            raise StoreError(f"{url} is not a URL")
        rest = m["rest"].rstrip("/")
        self.url = f"{m['scheme'].lower()}://{rest}"
        self._listing = _listing
        if storage_options is not None:
            set_storage_options(self.url, storage_options)

    # -- naming --------------------------------------------------------------------------------
    @property
    def fs(self) -> Any:
        return filesystem(self.url)

    @property
    def key(self) -> str:
        """The file system's path (``bucket/key``)."""
        return self.url.split("://", 1)[1]

    @property
    def storage_options(self) -> dict[str, Any]:
        return options_for(self.url)

    def _at(self, url: str) -> "ObjectPath":
        """``url`` with this path's listing when the listing covers it."""
        lst = self._listing
        key = url.split("://", 1)[1]
        return ObjectPath(url, _listing=lst if lst is not None and lst.covers(key) else None)

    def __truediv__(self, name: Any) -> "ObjectPath":
        name = str(name).strip("/")
        return self._at(f"{self.url}/{name}") if name else self

    @property
    def name(self) -> str:
        return self.key.rsplit("/", 1)[-1]

    @property
    def parent(self) -> "ObjectPath":
        scheme, key = self.url.split("://", 1)
        return self._at(f"{scheme}://{key.rsplit('/', 1)[0]}") if "/" in key else self

    def __str__(self) -> str:
        return self.url

    def __repr__(self) -> str:
        return f"ObjectPath({self.url!r})"

    def __eq__(self, other: Any) -> bool:
        return isinstance(other, ObjectPath) and other.url == self.url

    def __hash__(self) -> int:
        return hash(self.url)

    def __lt__(self, other: "ObjectPath") -> bool:
        return self.url < other.url

    def __reduce__(self):  # pickles by URL (no listing); the options travel with it
        return (_unpickle, (self.url, self.storage_options))

    def resolve(self) -> "ObjectPath":
        return self

    def expanduser(self) -> "ObjectPath":
        return self

    def is_absolute(self) -> bool:
        return True

    def listed(self) -> "ObjectPath":
        """This location with a fresh listing of everything under it (one recursive LIST)."""
        with _guard("list", self.url):
            try:
                found = self.fs.find(self.key, detail=True)
            except FileNotFoundError:
                found = {}
        return ObjectPath(self.url, _listing=_Listing(self.key, found))

    # -- queries -------------------------------------------------------------------------------
    def exists(self) -> bool:
        lst = self._listing
        if lst is not None:
            return self.key in lst.files or self.key in lst.dirs
        with _guard("read", self.url):
            return bool(self.fs.exists(self.key))

    def is_dir(self) -> bool:
        lst = self._listing
        if lst is not None:
            return self.key in lst.dirs
        with _guard("read", self.url):
            return bool(self.fs.isdir(self.key))

    def is_file(self) -> bool:
        lst = self._listing
        if lst is not None:
            return self.key in lst.files
        with _guard("read", self.url):
            try:
                return self.fs.info(self.key).get("type") == "file"
            except FileNotFoundError:
                return False

    def is_symlink(self) -> bool:
        return False

    def stat(self) -> _Stat:
        lst = self._listing
        if lst is not None:
            if self.key not in lst.files:
                if self.key in lst.dirs:
                    return _Stat(0, 0.0)
                raise FileNotFoundError(self.url)
            return _Stat(*lst.files[self.key])
        with _guard("read", self.url):
            info = self.fs.info(self.key)
        return _Stat(int(info.get("size") or 0), _mtime(info))

    def iterdir(self) -> Iterator["ObjectPath"]:
        lst = self._listing if self._listing is not None else self.listed()._listing
        scheme = self.url.split("://", 1)[0]
        for key, _ in lst.children(self.key):
            yield ObjectPath(f"{scheme}://{key}", _listing=lst)

    def rglob(self, pattern: str = "*") -> Iterator["ObjectPath"]:
        """Every object under this prefix (``pattern`` must be ``*``); objects only."""
        if pattern != "*":  # pragma: no cover - the store code uses "*" only
            raise ValueError("ObjectPath.rglob supports '*' only")
        lst = self._listing if self._listing is not None else self.listed()._listing
        scheme = self.url.split("://", 1)[0]
        base = self.key + "/"
        for key in sorted(lst.files):
            if key.startswith(base):
                yield ObjectPath(f"{scheme}://{key}", _listing=lst)

    def read_bytes(self) -> bytes:
        with _guard("read", self.url):
            return self.fs.cat_file(self.key)

    def read_text(self, encoding: str = "utf-8") -> str:
        return self.read_bytes().decode(encoding)

    # -- changes (they do not update a listing: take a fresh one) -----------------------------------
    def mkdir(self, *args: Any, **kwargs: Any) -> None:
        """Nothing to create: a prefix exists once a key lies under it."""

    def write_bytes(self, data: bytes) -> int:
        return put(self.url, [data])

    def unlink(self, missing_ok: bool = False) -> None:
        with _guard("delete", self.url):
            try:
                self.fs.rm_file(self.key)
            except FileNotFoundError:
                if not missing_ok:
                    raise


def _unpickle(url: str, options: dict[str, Any]) -> ObjectPath:
    return ObjectPath(url, options or None)


def _mtime(info: dict) -> float:
    t = info.get("LastModified") or info.get("mtime") or info.get("last_modified")
    if t is None:
        return 0.0
    try:
        return float(t.timestamp())
    except AttributeError:
        try:
            return float(t)
        except (TypeError, ValueError):
            return 0.0


# -- operations that differ between a folder and an object store -----------------------------------
def _split(url: str) -> tuple[Any, str]:
    return filesystem(url), url.split("://", 1)[1]


def put(url: str, pieces: list) -> int:
    """Write the object ``url`` whole from ``pieces`` (bytes-like): one PUT, which an object store
    makes visible all at once or not at all (no temporary name needed). Returns its size."""
    data = b"".join(memoryview(p).cast("B") for p in pieces)
    fs, key = _split(url)
    # objects past s3fs's multipart threshold (100 MiB) go up in parts, several at a time
    kw = {"max_concurrency": PUT_CONCURRENCY} if getattr(fs, "max_concurrency", None) is not None else {}
    with _guard("write", url):
        try:
            fs.pipe_file(key, data, **kw)
        except FileNotFoundError as e:  # the bucket
            raise StoreError(f"cannot write {url}: {_describe(e)}") from None
    return len(data)


def create_exclusive(path: "Path | ObjectPath", data: bytes) -> bool:
    """Create ``path`` with ``data`` unless it exists (True: created). Object stores: a PUT with
    ``If-None-Match: *`` (S3 and S3-compatible servers that honour it)."""
    url = str(path)
    fs, key = _split(url)
    with _guard("write", url):
        try:
            fs.pipe_file(key, data, mode="create")
        except FileExistsError:
            return False
        except FileNotFoundError as e:
            raise StoreError(f"cannot write {url}: {_describe(e)}") from None
        except TypeError:  # an fsspec backend without exclusive create
            raise StoreError(f"cannot lock {url}: its file system ({type(fs).__name__}) cannot create a file "
                             "exclusively") from None
    return True


def listing(url: str) -> dict[str, int]:
    """key relative to ``url`` (``c.3.0.0``, ``c/0``) -> size of every object under the prefix
    ``url`` (the one recursive LIST of :meth:`ObjectPath.listed`)."""
    lst = ObjectPath(url).listed()._listing
    start = len(lst.root) + 1
    return {name[start:]: size for name, (size, _) in lst.files.items()}


def read_range(url: str, offset: int, nbytes: int) -> bytes:
    """``nbytes`` of the object ``url`` from ``offset`` (a ranged GET); FileNotFoundError if gone."""
    fs, key = _split(url)
    if nbytes <= 0:
        return b""
    with _guard("read", url):
        return fs.cat_file(key, start=offset, end=offset + nbytes)


def remove_tree(path: "Path | ObjectPath") -> None:
    """Delete a folder (or file) and everything in it; a prefix: every key under it."""
    if isinstance(path, ObjectPath):
        with _guard("delete", path.url):
            try:
                if path.is_dir():
                    path.fs.rm(path.key, recursive=True)
                else:
                    path.fs.rm_file(path.key)
            except FileNotFoundError:
                pass
        return
    import shutil

    p = Path(path)
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p)
    else:
        p.unlink()


def remove_children(folder: "Path | ObjectPath", keep: str | None = None) -> None:
    """Delete everything in ``folder`` but the entry named ``keep`` (the writer's lock)."""
    for p in list(folder.iterdir()) if folder.is_dir() else ():
        if p.name != keep:
            remove_tree(p)


def total_bytes(path: "Path | ObjectPath") -> int:
    """The bytes stored under a folder or prefix."""
    if isinstance(path, ObjectPath):
        return sum(p.stat().st_size for p in path.rglob("*"))
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            try:
                total += os.stat(os.path.join(root, f)).st_size
            except OSError:
                pass
    return total


def zarr_store(path: "Path | ObjectPath | str", read_only: bool = False) -> Any:
    """What to hand zarr-python for the store (or array) at ``path``: the folder's path, or an
    ``FsspecStore`` on the same URL and options."""
    if not is_url(path):
        return str(path)
    from zarr.storage import FsspecStore

    url = str(path)
    fs = filesystem(url, asynchronous=True)
    return FsspecStore(fs, read_only=read_only, path=url.split("://", 1)[1])
