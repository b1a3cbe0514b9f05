"""Which files in a store folder dithooks wrote, and the folders it uses while it creates or
replaces a store.

A store is built under a temporary name next to its target, ``.<name>.dithooks-new-<host>-<pid>``,
and renamed into place once its skeleton (metadata, coordinates, ``step_complete``, lock) is
complete, so a store at the target is never half-made. ``--overwrite`` moves the old store aside to
``.<name>.dithooks-old-<host>-<pid>`` before the new one is renamed in, then deletes it. Such folders
left by a killed process are removed by the next writer of that store.

On an object store (:mod:`.storage`) there are no such folders (a prefix cannot be renamed):
the store is written in place, its root metadata last (:mod:`.lifecycle`), and no write leaves
a temporary object (a PUT is atomic by itself).

``--overwrite`` deletes only what dithooks wrote (:func:`foreign_entries` lists the rest):
Zarr metadata and chunk files of its arrays (and Zarr's ``*.partial`` files of an interrupted
write), its lock, and a ``figures/`` folder that experiment commands may write inside a store.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

from .lock import LOCK_NAME, hostname, pid_alive
from .storage import ObjectPath, as_path

FIGURES = "figures"
# a multi-worker capture's per-region locks and statuses (dithooks/capture/multi.py)
REGIONS_DIR = ".dithooks-regions"
PARTIAL = re.compile(r"^.+\.[0-9a-f]{32}\.partial$")  # zarr's atomic-write temporaries
_LOCK_TMP = re.compile(re.escape(LOCK_NAME) + r"\.[0-9a-f]{32}\.(tmp|stale)$")
_CHUNK = re.compile(r"^[0-9]+(\.[0-9]+)*$")
# a chunk file directly in an array folder: "c" (0-d arrays) or "c.3.0.1" (key separator ".")
_DOT_CHUNK = re.compile(r"^c(\.[0-9]+)*$")
_LEFTOVER = re.compile(r"^\.(?P<name>.+)\.dithooks-(?P<kind>new|old)-(?P<host>[A-Za-z0-9_-]+)-(?P<pid>[0-9]+)$")


def _host_tag() -> str:
    return re.sub(r"[^A-Za-z0-9_-]", "_", hostname())[:40] or "host"


def temp_path(target: Path, kind: str) -> Path:
    """Where a store for ``target`` is built (``new``) or an old one waits for deletion (``old``)."""
    return target.parent / f".{target.name}.dithooks-{kind}-{_host_tag()}-{os.getpid()}"


def is_temp_name(name: str) -> bool:
    return _LEFTOVER.match(name) is not None


def remove_leftovers(target: Path, keep: tuple[Path, ...] = ()) -> list[Path]:
    """Delete the build/replace folders of ``target`` left by dead processes on this host."""
    removed = []
    if isinstance(target, ObjectPath):  # stores on object storage are built in place
        return removed
    try:
        entries = list(target.parent.iterdir())
    except OSError:
        return removed
    for p in entries:
        m = _LEFTOVER.match(p.name)
        if not m or m["name"] != target.name or p in keep or m["host"] != _host_tag():
            continue
        pid = int(m["pid"])
        if pid == os.getpid() or pid_alive(pid):
            continue  # ours now, or a live process's
        if p.is_dir() and not foreign_entries(p):
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


def _zarr_node(folder: Path) -> str | None:
    """``array``/``group`` when ``folder/zarr.json`` says so; ``damaged`` when it is unreadable."""
    meta = folder / "zarr.json"
    if not meta.is_file():
        return None
    try:
        node = json.loads(meta.read_text()).get("node_type")
    except (OSError, ValueError, AttributeError):
        return "damaged"
    return node if node in ("array", "group") else "damaged"


def _chunks_foreign(folder: Path, rel: str) -> list[str]:
    out = []
    for p in sorted(folder.iterdir()):
        r = f"{rel}/{p.name}"
        if p.is_dir() and not p.is_symlink() and _CHUNK.match(p.name):
            out += _chunks_foreign(p, r)
        elif not (p.is_file() and not p.is_symlink() and (_CHUNK.match(p.name) or PARTIAL.match(p.name))):
            out.append(r + ("/" if p.is_dir() else ""))
    return out


def foreign_entries(folder: str | Path, rel: str = "") -> list[str]:
    """Paths (relative to ``folder``) that do not look like something dithooks wrote."""
    folder = as_path(folder)
    out: list[str] = []
    for p in sorted(folder.iterdir()):
        r = f"{rel}{p.name}"
        if p.is_symlink():
            out.append(r)
        elif p.is_file():
            top = not rel and (p.name == LOCK_NAME or _LOCK_TMP.match(p.name))
            if not (p.name == "zarr.json" or PARTIAL.match(p.name) or top):
                out.append(r)
        elif p.is_dir():
            if not rel and p.name in (FIGURES, REGIONS_DIR):
                continue
            node = _zarr_node(p)
            if node == "group":
                out += foreign_entries(p, r + "/")
            elif node in ("array", "damaged") or _zarr_array_remains(p):
                for q in sorted(p.iterdir()):
                    if q.name == "zarr.json" or (q.is_file() and PARTIAL.match(q.name)):
                        continue
                    if q.name == "c" and q.is_dir() and not q.is_symlink():
                        out += _chunks_foreign(q, f"{r}/c")
                    elif q.is_file() and not q.is_symlink() and _DOT_CHUNK.match(q.name):
                        continue
                    else:
                        out.append(f"{r}/{q.name}" + ("/" if q.is_dir() else ""))
            elif not rel and not any(p.iterdir()):
                continue  # empty: an array whose creation was cut short before its zarr.json
            else:
                out.append(r + "/")
        else:
            out.append(r)
    return out


def _zarr_array_remains(folder: Path) -> bool:
    """An array folder whose ``zarr.json`` is gone: only chunks (``c/``) and partial files left."""
    names = [p.name for p in folder.iterdir()]
    return bool(names) and all(n == "c" or _DOT_CHUNK.match(n) or PARTIAL.match(n) for n in names)


def describe_foreign(entries: list[str], limit: int = 3) -> str:
    shown = ", ".join(entries[:limit])
    return shown + (f" and {len(entries) - limit} more" if len(entries) > limit else "")


def remove_partials(folder: str | Path) -> int:
    """Delete Zarr's ``*.partial`` files (writes cut short by a kill) under ``folder``; call it
    only while holding the store's lock, when no write of ours is in flight."""
    removed = 0
    if isinstance(as_path(folder), ObjectPath):
        return removed  # object stores: a PUT leaves no temporary object
    for root, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if d != FIGURES or root != str(folder)]
        for f in files:
            if PARTIAL.match(f):
                try:
                    os.unlink(os.path.join(root, f))
                    removed += 1
                except OSError:
                    pass
    return removed
