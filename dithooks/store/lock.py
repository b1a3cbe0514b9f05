"""An exclusive writer's lock on a store: a file ``.dithooks.lock`` inside the store folder.

The lock file holds JSON ``{"pid", "host", "pid_start", "command", "since"}`` of its owner. It is
created atomically with its content (written to a private file, then hard-linked into place, which
fails if a lock is there already), so a lock file is never seen half-written. A second writer is
refused with one line naming the owner. A lock whose owner is gone is *stale* and is reclaimed:
the owner ran on this host and its pid no longer runs (or now belongs to a process that started
later, i.e. the pid was reused). A lock from another host is never reclaimed automatically: the
message says which file to delete once you are sure nothing writes the store there.

Readers (``dithooks ls``, ``query``, xarray) ignore the lock.

On an object store (``s3://...``, :mod:`.storage`) the lock is the object ``.dithooks.lock``
under the store's prefix, created by a conditional PUT (``If-None-Match: *``), which the server
refuses when the object exists: the same one-winner guarantee as the hard link. Staleness is
judged the same way (same host, dead pid); a lock left by another machine is never taken over
(the message names the object to delete). Breaking a stale lock re-reads it and deletes it only
if it is still the stale one; two processes breaking the same stale lock at the same moment can
both proceed (S3 has no conditional delete everywhere): a documented limitation.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from ..errors import StoreError
from .storage import ObjectPath, as_path, create_exclusive

LOCK_NAME = ".dithooks.lock"

# locks this process holds now (path -> token): a lock of our own pid that is not listed here is
# a leftover of an earlier process that had the same pid (pids are reused, e.g. in containers)
_HELD: dict[str, str] = {}
_HELD_GUARD = threading.Lock()


class StoreLocked(StoreError):
    """The store is being written by another process (or a lock cannot be taken)."""


def hostname() -> str:
    return socket.gethostname()


def process_start(pid: int) -> int | None:
    """When ``pid`` started (clock ticks since boot, Linux /proc), or None where unknown."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read().decode("ascii", "replace")
        # the command name (field 2) may hold spaces and parentheses: fields after the last ')'
        return int(stat[stat.rindex(")") + 2:].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def pid_alive(pid: int, start: int | None = None) -> bool:
    """Whether process ``pid`` runs on this host (and, if ``start`` is known, is the same process)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: it exists
        pass
    except OSError:
        return False
    if start is not None:
        now_start = process_start(pid)
        if now_start is not None and now_start != start:
            return False  # the pid was reused by a process that started later
    return True


def owner_info(command: str | None = None) -> dict[str, Any]:
    pid = os.getpid()
    return {"pid": pid, "host": hostname(), "pid_start": process_start(pid),
            "command": command or " ".join([Path(sys.argv[0]).name] + sys.argv[1:])[:200],
            "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def read_lock(folder: str | Path) -> dict[str, Any] | None:
    """The owner recorded in ``folder``'s lock, ``{}`` for an unreadable lock, None if no lock."""
    path = as_path(folder) / LOCK_NAME
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    except OSError:
        return {}
    try:
        info = json.loads(text)
        return info if isinstance(info, dict) else {}
    except ValueError:
        return {}


def is_stale(info: dict[str, Any] | None, path: str | Path | None = None) -> bool:
    """True when a lock's owner certainly no longer runs (same host, pid gone or reused)."""
    if info is None:
        return True
    if not info:  # unreadable: junk, unless just made by a file system without hard links
        try:
            return path is None or time.time() - as_path(path).stat().st_mtime > 10
        except OSError:
            return True
    if info.get("host") != hostname():
        return False
    pid = int(info.get("pid", -1))
    if pid == os.getpid():
        return path is None or str(as_path(path).resolve()) not in _HELD
    return not pid_alive(pid, info.get("pid_start"))


def describe_owner(info: dict[str, Any]) -> str:
    if not info:
        return "an unknown process"
    return f"pid {info.get('pid')} on {info.get('host')} (since {info.get('since')}: {info.get('command')})"


class StoreLock:
    """Hold the writer's lock of ``folder`` (which must exist). Use as a context manager or call
    :meth:`release`; releasing twice is harmless."""

    def __init__(self, folder: str | Path, command: str | None = None):
        self.folder = as_path(folder)
        self.path = self.folder / LOCK_NAME
        self.remote = isinstance(self.folder, ObjectPath)
        self.token = uuid.uuid4().hex
        self.info = {**owner_info(command), "token": self.token}
        self.held = False

    def acquire(self) -> "StoreLock":
        for _ in range(5):
            if self._try_create():
                self.held = True
                with _HELD_GUARD:
                    _HELD[str(self.path.resolve())] = self.token
                self._sweep()
                return self
            info = read_lock(self.folder)
            if info is None:
                continue  # released meanwhile: try again
            if not is_stale(info, self.path):
                where = ("" if info.get("host") in (None, hostname()) else
                         f"; if nothing writes it on {info.get('host')}, delete {self.path}")
                raise StoreLocked(f"{self.folder} is being written by {describe_owner(info)}: "
                                  f"wait for it to finish or stop it{where}")
            self._break_stale(info)
        raise StoreLocked(f"cannot lock {self.folder}: its lock {self.path} keeps changing")

    def _try_create(self) -> bool:
        if self.remote:  # a conditional PUT: refused when the lock object exists
            return create_exclusive(self.path, json.dumps(self.info).encode())
        tmp = self.folder / f"{LOCK_NAME}.{self.token}.tmp"
        try:
            with open(tmp, "x") as f:
                json.dump(self.info, f)
        except FileNotFoundError:
            raise StoreError(f"cannot lock {self.folder}: the folder disappeared") from None
        except PermissionError as e:
            raise StoreError(f"cannot lock {self.folder}: {e.strerror}") from None
        try:
            os.link(tmp, self.path)  # atomic: fails if a lock is there
            return True
        except FileExistsError:
            return False
        except FileNotFoundError:  # the holder swept our private file away (_sweep): it is held
            return False
        except OSError:  # file systems without hard links: exclusive create, then content
            return self._try_create_exclusive()
        finally:
            try:
                os.unlink(tmp)
            except OSError:
                pass

    def _sweep(self) -> None:
        """Delete the private files (``.dithooks.lock.<token>.tmp|.stale``) that killed lockers
        left; only the holder does this, so none of them can still become the lock."""
        if self.remote:  # no private files there
            return
        prefix = LOCK_NAME + "."
        try:
            names = os.listdir(self.folder)
        except OSError:
            return
        for name in names:
            if name.startswith(prefix) and name.endswith((".tmp", ".stale")) and self.token not in name:
                try:
                    os.unlink(self.folder / name)
                except OSError:
                    pass

    def _try_create_exclusive(self) -> bool:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            json.dump(self.info, f)
        return True

    def _break_stale(self, info: dict[str, Any]) -> None:
        """Remove a stale lock, unless another process replaced it meanwhile."""
        if self.remote:  # re-read, delete only if it is still the stale one (see the module doc)
            if read_lock(self.folder) == info:
                self.path.unlink(missing_ok=True)
            return
        aside = self.folder / f"{LOCK_NAME}.{self.token}.stale"
        try:
            os.rename(self.path, aside)  # atomic: of several reclaimers only one moves it
        except FileNotFoundError:
            return
        moved = read_lock_file(aside)
        if moved != info and not is_stale(moved):  # a live owner took it in between: put it back
            try:
                os.link(aside, self.path)
            except OSError:
                pass
        try:
            os.unlink(aside)
        except OSError:
            pass

    def release(self) -> None:
        if not self.held:
            return
        self.held = False
        with _HELD_GUARD:
            _HELD.pop(str(self.path.resolve()), None)
        try:
            if (read_lock(self.folder) or {}).get("token") == self.token:
                if self.remote:
                    self.path.unlink(missing_ok=True)
                else:
                    os.unlink(self.path)
        except (OSError, StoreError):
            pass

    def moved_to(self, folder: str | Path) -> None:
        """The locked folder was renamed to ``folder`` (the lock file moved with it)."""
        with _HELD_GUARD:
            _HELD.pop(str(self.path.resolve()), None)
            self.folder = as_path(folder)
            self.path = self.folder / LOCK_NAME
            if self.held:
                _HELD[str(self.path.resolve())] = self.token

    def __enter__(self) -> "StoreLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def read_lock_file(path: Path) -> dict[str, Any] | None:
    try:
        info = json.loads(path.read_text())
        return info if isinstance(info, dict) else {}
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}
