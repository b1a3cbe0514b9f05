"""A capture store's lifecycle: create, replace (--overwrite) or reopen (--resume) it under its
writer's lock, and mark how the run ended.

The store is held under its writer's lock (``.dithooks.lock``, :mod:`.lock`) from
:meth:`StoreLifecycle.open` until :meth:`StoreLifecycle.release`. A new store is built under a
temporary name next to the target and renamed into place once its skeleton is complete, so a
killed or failed creation never leaves a half-made store at the target (:mod:`.files`).
``--overwrite`` deletes only what dithooks wrote.

On an object store (``s3://bucket/run.zarr``, :mod:`.storage`) a prefix cannot be renamed, so a
store is built in place instead: the writer's lock is taken first (a conditional PUT, which
also decides between two processes creating the same store), then the skeleton is written with
the root metadata that makes it a dithooks store last. A creation killed before that leaves a
half-made store, which ``dithooks ls`` reports as such and ``--overwrite`` replaces; a creation
that fails deletes what it wrote. ``--overwrite`` deletes the old store's objects (only what
dithooks wrote, as on a disk) before writing the new one: unlike on a disk, a failed
``--overwrite`` does not bring the old store back.
"""

from __future__ import annotations

import errno
import os
import shutil
import warnings
from pathlib import Path
from typing import Any, Callable

from ..errors import DithooksError, StoreError
from .files import describe_foreign, foreign_entries, remove_leftovers, temp_path
from .lock import LOCK_NAME, StoreLock
from .metadata import ATTR_KEY, now
from .storage import ObjectPath, as_path, remove_children, zarr_store
from .verify import DamagedStore, inspect_store

MODES = ("create", "overwrite", "resume")


def command_text(command: dict[str, Any]) -> str:
    """How a lock names its holder: the dithooks command line, or "dithooks (Python)"."""
    if command.get("argv"):
        return "dithooks " + " ".join(command["argv"])
    return f"dithooks {command['name']}" if command.get("name") else "dithooks (Python)"



def _build(build: Callable[[Path], None], where: Any, target: Any) -> None:
    """Run ``build(where)``; anything it raises that is not already one line becomes
    ``cannot create TARGET: ...``."""
    try:
        build(where)
    except (DithooksError, KeyboardInterrupt):
        raise
    except Exception as e:
        msg = f"{e.strerror or e}" if isinstance(e, OSError) else f"{type(e).__name__}: {e}"
        raise StoreError(f"cannot create {target}: {msg}") from None

class StoreLifecycle:
    """Opening, holding and closing one capture store at ``path``."""

    def __init__(self, path: Path, mode: str, command: dict[str, Any]):
        if mode not in MODES:
            raise DithooksError(f"unknown mode {mode!r}")
        self.path = as_path(path)
        self.mode = mode
        self.command = command
        self.lock: StoreLock | None = None

    # -- open ----------------------------------------------------------------------------------
    def open(self, build: Callable[[Path], None], reopen: Callable[[], tuple[Any, int]]) -> tuple[Any, int]:
        """Create, replace or reopen the store; returns the Zarr group and the first step to run.

        ``build(folder)`` writes a new store's skeleton into ``folder``, first emptying it but for
        the lock (:func:`~.skeleton.write_skeleton` does; an object store's prefix still holds the
        old store on --overwrite); ``reopen()`` checks
        an existing store (held under the lock by then) and returns ``(group, first step)``.
        """
        path, mode = self.path, self.mode
        remove_leftovers(path)
        exists = path.exists() or path.is_symlink()
        if isinstance(path, ObjectPath) and exists and not path.is_dir():
            raise StoreError(f"{path} exists and is an object, not a store (a store is a prefix of objects)")
        if exists and mode == "create":
            raise StoreError(f"{path} already exists: use --overwrite to replace it "
                             "or --resume to continue it")
        if not exists and mode == "resume":
            raise StoreError(f"nothing to resume: {path} does not exist")
        old = self._lock_existing(replacing=exists and mode == "overwrite") if exists else None
        try:
            if mode == "resume":
                self.lock = old
                return reopen()
            if isinstance(path, ObjectPath):
                return self._create_in_place(old, build), 0
            return self._create(old, build), 0
        except BaseException:
            self.release()
            if old is not None:
                old.release()
            raise

    def release(self) -> None:
        """Give up the store's writer lock."""
        lock, self.lock = self.lock, None
        if lock is not None:
            lock.release()

    def _lock_existing(self, replacing: bool) -> StoreLock:
        path = self.path
        what = "overwrite" if replacing else "resume"
        if not path.is_dir():
            raise StoreError(f"{path} exists and is not a folder: refusing to {what} it")
        if replacing and path.is_symlink():  # the rename into place would replace the link, not its folder
            raise StoreError(f"{path} is a symbolic link: overwrite the folder it points to "
                             f"({path.resolve()}) instead")
        if replacing:
            self._check_replaceable()  # before the lock: a folder we refuse is not touched at all
        lock = StoreLock(path, command=command_text(self.command)).acquire()
        if replacing:
            try:
                self._check_replaceable()  # again, now that no dithooks writer can change it
            except BaseException:
                lock.release()
                raise
        return lock

    def _check_replaceable(self) -> None:
        """--overwrite deletes only what dithooks wrote: refuse a folder with anything else."""
        path = self.path
        if any(p.name != LOCK_NAME for p in path.iterdir()):  # else an empty folder
            try:
                inspect_store(path)
            except DamagedStore:
                pass  # half-made or damaged dithooks store: replacing it is the way out
            except StoreError:
                raise StoreError(f"{path} exists and is not a dithooks store: refusing to overwrite it") from None
        foreign = foreign_entries(path)
        if foreign:
            raise StoreError(f"refusing to overwrite {path}: it holds files dithooks did not write "
                             f"({describe_foreign(foreign)}); move them out first")

    def _create(self, old: StoreLock | None, build: Callable[[Path], None]) -> Any:
        """Build the store's skeleton under a temporary name, then rename it into place (moving
        an old store aside first when replacing one, and deleting it after)."""
        import zarr

        target = self.path
        tmp = temp_path(target, "new")
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            if tmp.exists():  # left by this very process (a pid reused): never a live store
                shutil.rmtree(tmp)
            tmp.mkdir()
        except OSError as e:
            raise StoreError(f"cannot create {target}: {e.strerror or e}") from None
        lock = StoreLock(tmp, command=command_text(self.command))
        trash = None
        try:
            _build(build, tmp, target)
            lock.acquire()  # after the build: Zarr's mode "w" empties the folder it is given
            if old is not None:
                trash = temp_path(target, "old")
                os.rename(target, trash)
                old.moved_to(trash)
            try:
                os.rename(tmp, target)
            except OSError as e:
                if trash is not None and not target.exists():
                    os.rename(trash, target)  # put the old store back
                    old.moved_to(target)
                    trash = None
                if e.errno in (errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR, errno.EISDIR):
                    raise StoreError(f"{target} was created by another process meanwhile: "
                                     "use --overwrite to replace it or --resume to continue it") from None
                raise StoreError(f"cannot create {target}: {e.strerror or e}") from None
            lock.moved_to(target)
        except BaseException:
            lock.release()
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        self.lock = lock
        if trash is not None:
            old.release()
            shutil.rmtree(trash, ignore_errors=True)  # verified to hold only what dithooks wrote
        return zarr.open_group(str(target), mode="r+", zarr_format=3)

    def _create_in_place(self, old: StoreLock | None, build: Callable[[Path], None]) -> Any:
        """Object stores: lock, write the skeleton in place (its root metadata last), open it.
        ``old``: the lock of the store being replaced (--overwrite), checked replaceable."""
        import zarr

        target = self.path
        lock = old or StoreLock(target, command=command_text(self.command)).acquire()
        ours = False  # whether the objects there now are ours to delete on failure
        try:
            others = [p for p in target.iterdir() if p.name != LOCK_NAME]
            if old is None and others:  # made by another process between our check and our lock
                raise StoreError(f"{target} was created by another process meanwhile: "
                                 "use --overwrite to replace it or --resume to continue it")
            ours = True
            # --overwrite: the old store (only what dithooks wrote, checked) goes as the build
            # empties the prefix: build() starts with write_skeleton's remove_children
            _build(build, target, target)
        except BaseException as e:
            if ours and not isinstance(e, KeyboardInterrupt):
                try:  # a failed creation leaves nothing but the lock, released below
                    remove_children(target, keep=LOCK_NAME)
                except Exception:
                    pass
            lock.release()
            raise
        self.lock = lock
        return zarr.open_group(zarr_store(target), mode="r+", zarr_format=3)

    # -- close ---------------------------------------------------------------------------------
    def finish(self, group: Any, meta: dict[str, Any], status: str, error: str | None = None,
               nonfinite: dict | None = None) -> dict[str, Any]:
        """Mark how the run ended (``complete``, ``interrupted``, ``failed``) in the metadata and
        consolidate it; returns the metadata written. Never raises: a full disk can make even
        this fail, and ``step_complete`` still tells the truth."""
        try:
            meta = dict(meta or group.attrs[ATTR_KEY])
        except Exception:
            return dict(meta or {})
        meta.update(status=status, error=error, finished=now())
        if nonfinite is not None:
            meta["nonfinite"] = nonfinite
        try:
            from .zarrio import consolidate

            # attributes and consolidated metadata in one atomic write (zarr-python: two, ~15-30 ms)
            if not consolidate(self.path, {ATTR_KEY: meta}):
                group.attrs[ATTR_KEY] = meta
                import zarr

                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    zarr.consolidate_metadata(str(self.path))
        except Exception:
            pass
        return meta
