"""Many workers capture into ONE store (docs/scaling.md, "Multi-worker capture").

The seeds are split into contiguous *regions* (``regions[r] = (lo, hi)``, all of size
``ceil(N / W)`` but the last). The skeleton is created once (:func:`create_multi_store`): the
single-process skeleton (metadata, coordinates for every seed, ``step_complete``) plus

* ``region_complete`` (step, region), bool, one chunk per (step, region): worker ``r`` marks its
  column once a step of its region is on disk;
* the metadata key ``regions`` (``[[lo, hi], ...]``);
* ``.dithooks-regions/<r>/``: worker ``r``'s lock (``.dithooks.lock``, the store lock's format)
  and its ``status.json`` (status, error, non-finite counts of its region).

Every array is chunked (and sharded) along ``sample`` by region, so no two workers ever write
one file: worker ``r`` writes the chunks of its samples (hook arrays, ``latents``, ``rng_state``)
and its ``region_complete`` column, and sets ``step_complete[s]`` when it finds every region's
mark of step ``s`` (the last worker to finish a step does; writing the same ``True`` twice is
harmless). Metadata (the group's attributes) is written only by whoever holds the store lock:
the skeleton's creator and the finaliser (:func:`finalise`), which merges the workers'
statuses and non-finite counts and consolidates. A worker restarted (``--resume``) redoes its
region's steps from its first unmarked one.

Launchers: :func:`capture_workers` (``dithooks capture --workers N``: N local processes),
:func:`capture_dask` (``--workers N --scheduler local|ADDRESS``: one Dask task per region) and
:func:`capture_torchrun` (one process per rank under torchrun).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..errors import DithooksError, StoreError
from ..store.layout import LATENTS, RNG_STATE, STEP_COMPLETE, is_layer_dim, layers_per_chunk
from ..store.lock import StoreLock
from ..store.metadata import ATTR_KEY, RESUME_KEYS, completeness, now
from ..store.steps import StepLog, nonfinite_from_meta, nonfinite_json, nonfinite_totals
from ..store.storage import as_path, zarr_store
from ..store.writer import ArraySpec, StoreWriter
from .config import CaptureConfig, check_config
from .session import CaptureResult, CaptureSession

REGION_COMPLETE = "region_complete"
REGIONS_DIR = ".dithooks-regions"
REGIONS_KEY = "regions"


def split_regions(num_samples: int, workers: int) -> list[tuple[int, int]]:
    """Contiguous regions of ``ceil(N / W)`` samples (the last may be smaller)."""
    if workers < 1:
        raise DithooksError(f"--workers must be at least 1, got {workers}")
    if workers > num_samples:
        raise DithooksError(f"--workers {workers} is more than the {num_samples} seeds: each worker needs one")
    c = math.ceil(num_samples / workers)
    regions = [(i * c, min(num_samples, (i + 1) * c)) for i in range(workers) if i * c < num_samples]
    if len(regions) != workers:
        raise DithooksError(f"{num_samples} seeds do not split into {workers} regions of {c} "
                            f"(only {len(regions)} would be used): choose --workers so that each gets seeds")
    return regions


def region_dir(path: Path, region: int) -> Path:
    return as_path(path) / REGIONS_DIR / str(region)


def _check_multi_config(cfg: CaptureConfig) -> None:
    if cfg.probes:
        raise DithooksError("probes cannot run in a multi-worker capture yet (their outputs span all samples): "
                            "capture with --workers, then run the probes offline, or capture in one process")
    if cfg.conditioning is not None or cfg.prompts is not None:
        raise DithooksError("multi-worker capture supports class-conditional models only for now")


# -- writing one region --------------------------------------------------------------------------
class RegionWriter(StoreWriter):
    """A :class:`StoreWriter` whose writes of a region's arrays land in the whole store's arrays:
    the ``sample`` dim grows to ``total`` samples, chunked (and sharded) by ``region_size``, and
    every write is moved to ``[lo, hi)`` along it."""

    def __init__(self, group: Any, *, lo: int, hi: int, total: int, region_size: int, **kw: Any):
        self.lo, self.hi, self.total, self.region_size = lo, hi, total, region_size
        self._global: dict[str, ArraySpec] = {}
        super().__init__(group, **kw)

    def global_spec(self, spec: ArraySpec) -> ArraySpec:
        g = self._global.get(spec.name)
        if g is not None:
            return g
        if "sample" not in spec.dims:
            raise StoreError(f"array {spec.name} has no sample dim: a multi-worker capture cannot write it")
        p = spec.dims.index("sample")
        n = spec.shape[p]
        c = self.region_size

        def along(chunks: tuple[int, ...] | None) -> tuple[int, ...] | None:
            if chunks is None:
                return None
            k = chunks[p]
            return chunks[:p] + ((c if k == n else k),) + chunks[p + 1:]

        shape = spec.shape[:p] + (self.total,) + spec.shape[p + 1:]
        chunks, shards = along(spec.chunks), along(spec.shards)
        if shards is not None and len(spec.dims) > 1 and is_layer_dim(spec.dims[1]):
            # layers per chunk from the region's chunk size (layout.hook_array_spec's rule), so
            # every worker makes the same zarr.json whatever its own number of samples
            import torch

            itemsize = torch.empty((), dtype=spec.dtype).element_size()
            per_layer = int(np.prod(chunks[2:])) * itemsize
            chunks = (chunks[0], layers_per_chunk(spec.shape[1], per_layer)) + chunks[2:]
        g = self._global[spec.name] = dataclasses.replace(spec, shape=shape, chunks=chunks, shards=shards)
        return g

    def region_index(self, spec: ArraySpec, index: tuple) -> tuple:
        p = spec.dims.index("sample")
        index = tuple(index) if isinstance(index, tuple) else (index,)
        if len(index) > p:
            raise StoreError(f"a region write of {spec.name} selects along sample")
        return index + (slice(None),) * (p - len(index)) + (slice(self.lo, self.hi),)

    def put(self, spec: ArraySpec, index: tuple, value: Any) -> None:
        super().put(self.global_spec(spec), self.region_index(spec, index), value)


class RegionStepLog(StepLog):
    """Step bookkeeping of one region: marks ``region_complete[:, region]``, then
    ``step_complete`` of the steps every region has; non-finite counts go to the region's
    ``status.json`` (the group's attributes belong to the store lock's holder)."""

    region: int = 0
    status_file: Path | None = None
    chunk_latents = False  # a region's rows: a chunk per row, no earlier rows to read back on resume
    shard_steps = False  # and a shard per step: each region's steps are marked on their own
    eager_chunks = False  # (the same zarr.json from every worker)

    def mark_complete(self, rows: slice) -> None:
        self.writer.call(self._record_nonfinite)
        self.writer.set(REGION_COMPLETE, (rows, self.region), True)
        self.writer.call(lambda: mark_steps_complete(self.writer, rows))

    def _record_nonfinite(self) -> None:
        table = nonfinite_json(self.nonfinite)
        text = json.dumps(table, sort_keys=True)
        if text == self._written:
            return
        write_status(self.status_file, {"nonfinite": table})
        self._written = text


def _region_marks(root: Path) -> np.ndarray:
    import zarr

    return np.asarray(zarr.open_array(zarr_store(as_path(root) / REGION_COMPLETE, read_only=True),
                                      mode="r")[...], dtype=bool)


def mark_steps_complete(writer: StoreWriter, rows: slice) -> None:
    """Set ``step_complete`` for the steps in ``rows`` that every region has marked."""
    from ..store.writer import store_root

    marks = _region_marks(store_root(writer.group))
    target = writer.existing(STEP_COMPLETE)
    for s in range(rows.start, rows.stop):
        if marks[s].all():
            target.write((slice(s, s + 1),), np.ones(1, dtype=bool))


def read_status(path: Path | None) -> dict[str, Any]:
    try:
        return json.loads(as_path(path).read_text())
    except Exception:
        return {}


def write_status(path: Path | None, update: dict[str, Any]) -> None:
    if path is None:
        return
    from ..store.zarrio import write_json_atomic

    write_json_atomic(str(path), {**read_status(path), **update})


def region_config(cfg: CaptureConfig, lo: int, hi: int) -> CaptureConfig:
    """The request of one region: its seeds and labels (``cfg`` already checked)."""
    labels = tuple(cfg.labels)
    return dataclasses.replace(cfg, seeds=tuple(cfg.seeds)[lo:hi],
                               labels=labels[lo:hi] if len(labels) == len(cfg.seeds) else labels)


class RegionSession(CaptureSession):
    """One worker of a multi-worker capture: region ``region`` of the store at ``cfg.out``."""

    def __init__(self, cfg: CaptureConfig, region: int, loaded: Any = None):
        import functools

        cfg = dataclasses.replace(cfg)
        check_config(cfg)  # labels per seed, before the seeds are split
        _check_multi_config(cfg)
        meta = read_multi_meta(as_path(cfg.out))
        regions = [tuple(r) for r in meta[REGIONS_KEY]]
        if not 0 <= region < len(regions):
            raise DithooksError(f"region {region} does not exist: {cfg.out} has {len(regions)} regions")
        if list(meta.get("seeds") or []) != [int(s) for s in cfg.seeds]:
            raise StoreError(f"{cfg.out} was made for other seeds than this request")
        if meta.get("labels") is not None and list(meta["labels"]) != [int(y) for y in cfg.labels]:
            raise StoreError(f"{cfg.out} was made for other labels than this request")
        self.region, (self.lo, self.hi) = region, regions[region]
        self.full_cfg, self.regions = cfg, regions
        super().__init__(region_config(cfg, self.lo, self.hi), loaded)
        c = max(hi - lo for lo, hi in regions)
        self._writer_class = functools.partial(RegionWriter, lo=self.lo, hi=self.hi, total=len(cfg.seeds),
                                               region_size=c)
        self.status_file = region_dir(self.path, region) / "status.json"
        self._region_lock: StoreLock | None = None

        def log_class(*a: Any, **kw: Any) -> RegionStepLog:
            log = RegionStepLog(*a, **kw)
            log.region, log.status_file = self.region, self.status_file
            return log

        self._log_class = log_class

    def open_store(self) -> tuple[Any, int]:
        import zarr

        from ..store.lifecycle import command_text

        self._region_lock = StoreLock(region_dir(self.path, self.region),
                                      command=command_text(self._command)).acquire()
        try:
            group = zarr.open_group(zarr_store(self.path), mode="r+", zarr_format=3)
            meta = dict(group.attrs[ATTR_KEY])
            request = self.request()
            for key in RESUME_KEYS:
                if key in ("seeds", "labels"):
                    continue
                if meta.get(key) != request.get(key):
                    raise StoreError(f"cannot write region {self.region} of {self.path}: its {key} differs "
                                     "from this request")
            marks = _region_marks(self.path)[:, self.region]
            start = int(np.argmin(marks)) if not marks.all() else len(marks)
            self._meta = meta
            self._ran = True  # from here on, run() ends by writing the region's status
            write_status(self.status_file, {"status": "running", "error": None, "started": now(),
                                            "finished": None, "pid": os.getpid(), "from_step": start})
            return group, start
        except BaseException:
            self.release_store()
            raise

    def run(self, progress: Any = None) -> CaptureResult:
        self._ran = False
        try:
            return super().run(progress)
        except StoreError:
            status = read_status(self.status_file)
            if not self._ran or status.get("status") not in ("interrupted", "failed"):
                raise
            marks = _region_marks(self.path)[:, self.region]
            raise StoreError(f"capture {status['status']}: {describe_region(self.regions, self.region, marks, status)}; "
                             "continue with --resume (same options)") from None

    def release_store(self) -> None:
        lock, self._region_lock = self._region_lock, None
        if lock is not None:
            lock.release()

    def _state_at(self, group: Any, step: int):
        import torch

        from ..sampling import TrajectoryState
        if step == 0:
            return None, None
        sel = self._sample_sel(group[LATENTS].metadata.dimension_names)
        lat = np.asarray(group[LATENTS][(step,) + sel])
        if lat.size and np.isnan(lat).all():
            raise StoreError(f"cannot resume region {self.region} of {self.path}: the latents before step "
                             f"{step} are missing; replace it with --overwrite")
        rng_arr = group[RNG_STATE]
        sel_r = self._sample_sel(rng_arr.metadata.dimension_names)
        rng = None
        for k in range(step, -1, -1):
            row = np.asarray(rng_arr[(k,) + sel_r])
            if row.any():
                rng = row
                break
        if rng is None:
            raise StoreError("the store holds no RNG state to resume from")
        lat_t = torch.from_numpy(lat)
        last_rng = torch.from_numpy(rng.copy())
        if self.cfg.replicas is not None:
            lat_t, rng = lat_t.reshape((-1,) + tuple(lat_t.shape[2:])), rng.reshape((-1,) + rng.shape[2:])
        return TrajectoryState(step, lat_t, [torch.from_numpy(r.copy()) for r in rng]), last_rng

    def _sample_sel(self, dims: Sequence[str]) -> tuple:
        p = list(dims).index("sample")
        return (slice(None),) * (p - 1) + (slice(self.lo, self.hi),)

    def _finish(self, group: Any, status: str, error: str | None = None, nonfinite: dict | None = None) -> None:
        write_status(self.status_file, {"status": status, "error": error, "finished": now(),
                                        "nonfinite": nonfinite_json(nonfinite or {})})


# -- the store -----------------------------------------------------------------------------------
def read_multi_meta(path: Path) -> dict[str, Any]:
    import zarr

    try:
        meta = dict(zarr.open_group(zarr_store(path, read_only=True), mode="r").attrs[ATTR_KEY])
    except Exception:
        raise StoreError(f"{path} is not a dithooks store") from None
    if REGIONS_KEY not in meta:
        raise StoreError(f"{path} is a single-process store: it has no worker regions")
    return meta


class MultiStore:
    """The whole store of a multi-worker capture, held under the store lock by the launcher
    (or torchrun's rank 0): creates the skeleton, later merges the workers' results."""

    def __init__(self, cfg: CaptureConfig, workers: int, loaded: Any = None):
        cfg = dataclasses.replace(cfg)
        check_config(cfg)
        _check_multi_config(cfg)
        self.cfg = cfg
        self.regions = split_regions(len(cfg.seeds), workers)
        self.session = CaptureSession(cfg, loaded)
        self.path = self.session.path
        self.group: Any = None
        self.meta: dict[str, Any] = {}

    def open(self) -> "MultiStore":
        s = self.session

        def build(folder: Path) -> None:
            from ..store.zarrio import array_metadata, write_group, write_json_atomic

            s._marks_chunk = 1  # workers mark steps on their own: a chunk (file) per step, no shared file
            s._build(folder)
            steps, w = self.cfg.sampler.steps, len(self.regions)
            (folder / REGION_COMPLETE).mkdir()
            write_json_atomic(str(folder / REGION_COMPLETE / "zarr.json"),
                              array_metadata((steps, w), (1, 1), "bool", False, dims=("step", "region"), crc=False))
            for r in range(w):
                region_dir(folder, r).mkdir(parents=True)
            s._meta[REGIONS_KEY] = [list(r) for r in self.regions]
            write_group(folder, {ATTR_KEY: s._meta})

        def reopen() -> tuple[Any, int]:
            import zarr

            meta = read_multi_meta(self.path)
            if [tuple(r) for r in meta[REGIONS_KEY]] != self.regions:
                raise StoreError(f"cannot resume {self.path}: it was made by {len(meta[REGIONS_KEY])} workers, "
                                 f"not {len(self.regions)}")
            request = s.request()
            for key in RESUME_KEYS:
                if meta.get(key) != request.get(key):
                    raise StoreError(f"cannot resume {self.path}: its {key} differs from this request")
            group = zarr.open_group(zarr_store(self.path), mode="r+", zarr_format=3)
            meta.update(status="running", error=None, finished=None, runs=list(meta.get("runs", [])) + [now()])
            group.attrs[ATTR_KEY] = meta
            s._meta = meta
            return group, 0

        self.group, _ = s.store.open(build, reopen)
        self.meta = s._meta
        return self

    def release(self) -> None:
        self.session.release_store()

    def finalise(self) -> dict[str, Any]:
        """Merge the regions: ``step_complete`` from ``region_complete``, non-finite counts, the
        status (``complete`` when every region is); consolidate. Returns a summary."""
        from ..store.files import remove_partials

        path = self.path
        marks = _region_marks(path)
        done = marks.all(axis=1)
        sc = self.group[STEP_COMPLETE]
        if not np.array_equal(np.asarray(sc[...]), done):
            sc[...] = done
        statuses = [read_status(region_dir(path, r) / "status.json") for r in range(len(self.regions))]
        nonfinite: dict[str, dict[Any, int]] = {}
        for st in statuses:
            for a, rows in nonfinite_from_meta(st.get("nonfinite")).items():
                for k, v in rows.items():
                    nonfinite.setdefault(a, {})[k] = nonfinite.setdefault(a, {}).get(k, 0) + v
        incomplete = [r for r in range(len(self.regions)) if not marks[:, r].all()]
        if not incomplete:
            remove_partials(path)  # every worker is done
            status, error = "complete", None
        else:
            status = "failed" if any(statuses[r].get("status") == "failed" for r in incomplete) else "interrupted"
            error = "; ".join(describe_region(self.regions, r, marks[:, r], statuses[r]) for r in incomplete)
        self.meta = self.session.store.finish(self.group, self.meta, status, error, nonfinite_json(nonfinite))
        return {"status": status, "error": error, "incomplete_regions": incomplete,
                "worker_seconds": [st.get("seconds") for st in statuses],
                "nonfinite": nonfinite_totals(nonfinite), **completeness(done)}


def describe_region(regions: Sequence[tuple[int, int]], r: int, marks: np.ndarray, status: dict) -> str:
    lo, hi = regions[r]
    held = [int(s) for s in np.flatnonzero(marks)]
    steps = f"steps {held[0]}-{held[-1]}" if held else "no steps"
    why = f" ({status.get('status')}: {status['error']})" if status.get("error") else (
        f" ({status['status']})" if status.get("status") else "")
    return f"region {r} (samples {lo}-{hi - 1}) holds {steps} of 0-{len(marks) - 1}{why}"


def region_report(path: Path) -> dict[str, Any]:
    """Which regions hold which steps (a store mid-way or complete)."""
    meta = read_multi_meta(as_path(path))
    regions = [tuple(r) for r in meta[REGIONS_KEY]]
    marks = _region_marks(as_path(path))
    return {"regions": [{"region": r, "samples": list(regions[r]),
                         "steps": [int(s) for s in np.flatnonzero(marks[:, r])],
                         "status": read_status(region_dir(path, r) / "status.json").get("status")}
                        for r in range(len(regions))],
            "complete_steps": [int(s) for s in np.flatnonzero(marks.all(axis=1))]}


# -- launchers -----------------------------------------------------------------------------------
def run_region(cfg: CaptureConfig, region: int, loaded: Any = None, threads: int | None = None,
               fail_after: int | None = None) -> CaptureResult:
    """Worker ``region``: capture its seeds into the (existing) multi-worker store ``cfg.out``.
    ``fail_after``: raise after that many steps (tests: a worker that dies mid-way)."""
    if threads:
        import torch

        torch.set_num_threads(threads)
    session = RegionSession(cfg, region, loaded)
    res = session.run(progress=_fail_after(fail_after) if fail_after is not None else None)
    write_status(session.status_file, {"seconds": round(res.seconds, 3), "steps_run": res.steps_run})
    return res


class WorkerKilled(RuntimeError):
    """Raised by a test's worker after its given number of steps (a simulated crash)."""


def _fail_after(k: int):
    def progress(steps):
        for i, s in enumerate(steps):
            if i == k:
                raise WorkerKilled(f"worker stopped after {k} steps (test)")
            yield s
    return progress


def _worker_main(cfg: CaptureConfig, region: int, threads: int | None, fail_after: int | None) -> None:
    import signal
    import sys

    def interrupt(signum, frame):  # the launcher's terminate(): keep the finished steps, as Ctrl-C does
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)
    try:
        run_region(cfg, region, threads=threads, fail_after=fail_after)
    except (Exception, KeyboardInterrupt) as e:  # one line; the region's status.json has the rest
        print(f"dithooks: worker {region}: {e}", file=sys.stderr)
        sys.exit(1)


def _launch(cfg: CaptureConfig, workers: int, loaded: Any, run_regions: Any, again: str = "") -> dict[str, Any]:
    """What every local launcher does around its workers: create (or reopen, ``--resume``) the
    skeleton under the store lock, ``run_regions(ms)``, then merge (also when it raised) and
    release. Returns the summary; raises StoreError when a region is incomplete."""
    t0 = time.perf_counter()
    ms = MultiStore(cfg, workers, loaded).open()
    try:
        try:
            run_regions(ms)
        finally:
            summary = ms.finalise()
    finally:
        ms.release()
    return _summarise(summary, ms, t0, again)


def capture_workers(cfg: CaptureConfig, workers: int, loaded: Any = None, threads: int | None = None,
                    fail: dict[int, int] | None = None, spawn: bool = True) -> dict[str, Any]:
    """``dithooks capture --workers N``: create (or reopen, ``--resume``) the store, run one local
    process per region (multiprocessing, spawn), then merge. ``fail``: region -> raise after that
    many steps (tests). ``spawn`` False: the regions run one after another in this process
    (with ``loaded``; the same store, for tests and debugging). Returns :meth:`MultiStore.finalise`'s summary plus ``seconds``; raises
    StoreError when a region is incomplete."""
    import multiprocessing as mp

    if threads is None:  # the CPU cores shared out (torch would give each worker all of them)
        threads = max(1, (os.cpu_count() or 1) // workers)

    def in_turn(ms: MultiStore) -> None:
        for r in range(len(ms.regions)):
            try:
                run_region(dataclasses.replace(ms.cfg, mode="resume"), r, loaded, fail_after=(fail or {}).get(r))
            except (WorkerKilled, StoreError):
                pass  # recorded in the region's status.json, reported by finalise

    def processes(ms: MultiStore) -> None:
        ctx = mp.get_context("spawn")
        procs = [ctx.Process(target=_worker_main, name=f"dithooks-region-{r}",
                             args=(ms.cfg, r, threads, (fail or {}).get(r)))
                 for r in range(len(ms.regions))]
        for p in procs:
            p.start()
        try:
            for p in procs:
                p.join()
        except BaseException:
            for p in procs:
                if p.is_alive():
                    p.terminate()
            for p in procs:
                p.join()
            raise

    return _launch(cfg, workers, loaded, processes if spawn else in_turn)


# -- Dask ----------------------------------------------------------------------------------------
def _dask_region(cfg: CaptureConfig, region: int, threads: int | None, fail_after: int | None) -> dict[str, Any]:
    """The task of one region on a Dask worker: :func:`run_region`, its failure returned as one
    line (the region's status.json has the rest), so no traceback reaches worker or client logs."""
    try:
        res = run_region(cfg, region, threads=threads, fail_after=fail_after)
        return {"region": region, "error": None, "steps_run": res.steps_run}
    except (Exception, KeyboardInterrupt) as e:
        return {"region": region, "error": str(e) if isinstance(e, DithooksError) else f"{type(e).__name__}: {e}"}


CONNECT_TIMEOUT = 20.0  # seconds to reach a --scheduler address


def dask_client(scheduler: str, workers: int, threads: int = 1, timeout: float | None = None) -> tuple[Any, Any]:
    """``(client, cluster)``: ``"local"`` starts a LocalCluster of ``workers`` worker processes
    (``threads`` threads each; the cluster is returned to be closed); anything else is a
    scheduler address (``tcp://host:8786``) to connect to (cluster None). One line when it fails."""
    try:
        from distributed import Client, LocalCluster
    except ImportError:
        raise DithooksError("--scheduler needs Dask distributed: pip install 'dithooks[scale]'") from None
    if scheduler == "local":
        cluster = LocalCluster(n_workers=workers, threads_per_worker=threads, processes=True,
                               dashboard_address=None)
        try:
            return Client(cluster), cluster
        except BaseException:
            cluster.close()
            raise
    if "://" not in scheduler:
        raise DithooksError(f"--scheduler must be 'local' or a scheduler address such as tcp://host:8786, "
                            f"got {scheduler!r}")
    try:
        return Client(scheduler, timeout=CONNECT_TIMEOUT if timeout is None else timeout), None
    except Exception as e:
        raise DithooksError(f"cannot reach the Dask scheduler {scheduler}: {type(e).__name__}: "
                            f"{str(e).splitlines()[0] if str(e) else ''}".rstrip(": ")) from None


def capture_dask(cfg: CaptureConfig, workers: int, scheduler: str = "local", loaded: Any = None,
                 threads: int | None = None, fail: dict[int, int] | None = None,
                 timeout: float | None = None) -> dict[str, Any]:
    """``dithooks capture --workers N --scheduler local|ADDRESS``: as :func:`capture_workers`, but
    each region is one task (``client.submit(run_region, ...)``) on a Dask cluster: a
    LocalCluster of N worker processes, or an existing scheduler's workers (they need dithooks,
    the model path and the store path, i.e. a shared file system). The launcher connects first
    (a bad address writes nothing), then creates the skeleton, then merges after the tasks."""
    if threads is None:
        threads = max(1, (os.cpu_count() or 1) // workers) if scheduler == "local" else None
    split_regions(len(cfg.seeds), workers)  # refuse a bad --workers before starting a cluster
    client, cluster = dask_client(scheduler, workers, threads or 1, timeout)

    def tasks(ms: MultiStore) -> None:
        run_cfg = dataclasses.replace(ms.cfg, mode="resume")
        futures = [client.submit(_dask_region, run_cfg, r, threads, (fail or {}).get(r), pure=False)
                   for r in range(len(ms.regions))]
        try:
            for r, f in enumerate(futures):
                try:
                    out = f.result()
                except Exception as e:  # the task's worker died (KilledWorker) or was lost
                    out = {"error": f"{type(e).__name__}: {e}"}
                status_file = region_dir(ms.path, r) / "status.json"
                if out.get("error") and read_status(status_file).get("status") not in ("failed", "interrupted"):
                    # it failed before its region was opened (e.g. no model there): say so in the store
                    write_status(status_file, {"status": "failed", "error": out["error"], "finished": now()})
        except BaseException:
            client.cancel(futures)
            raise

    try:
        return _launch(cfg, workers, loaded, tasks, again=f" --scheduler {scheduler}")
    finally:
        client.close()
        if cluster is not None:
            cluster.close()


def _summarise(summary: dict[str, Any], ms: MultiStore, t0: float, again: str = "") -> dict[str, Any]:
    summary["seconds"] = round(time.perf_counter() - t0, 3)
    summary["workers"] = len(ms.regions)
    if summary["status"] != "complete":
        raise StoreError(f"multi-worker capture incomplete: {summary['error']}; "
                         f"continue with --resume (same options and --workers {len(ms.regions)}{again})")
    return summary


def torchrun_rank() -> tuple[int, int] | None:
    """``(RANK, WORLD_SIZE)`` when run by torchrun with more than one process, else None."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
    except ValueError:
        raise DithooksError("RANK and WORLD_SIZE must be integers (torchrun sets them)") from None
    return (rank, world) if world > 1 else None


def capture_torchrun(cfg: CaptureConfig, loaded: Any = None, rank: int | None = None,
                     world: int | None = None) -> dict[str, Any]:
    """One rank of a torchrun launch (``torchrun --nproc-per-node W -m dithooks capture ...
    --device cuda:$LOCAL_RANK``): rank 0 creates (or reopens) the store, every rank captures
    region ``RANK``, rank 0 merges. The ranks meet at barriers of a gloo process group (it
    carries no tensors, so CPU and GPU ranks alike). Returns the summary on every rank."""
    import torch.distributed as dist

    if rank is None or world is None:
        rank, world = torchrun_rank() or (0, 1)
    own = not dist.is_initialized()
    if own:
        dist.init_process_group("gloo")
    t0 = time.perf_counter()
    ms, failure = None, None
    try:
        if rank == 0:
            try:
                ms = MultiStore(cfg, world, loaded).open()
            except Exception as e:  # every rank waits for this answer
                failure = str(e) if isinstance(e, DithooksError) else f"{type(e).__name__}: {e}"
        box = [failure]
        dist.broadcast_object_list(box, src=0)
        if box[0] is not None:
            raise StoreError(box[0])
        try:
            run_region(cfg, rank, loaded)
        except (Exception, KeyboardInterrupt) as e:  # the others still meet us at the barrier
            failure = str(e)
        dist.barrier()
        summary: dict[str, Any] = {}
        if rank == 0:
            try:
                summary = ms.finalise()
            finally:
                ms.release()
            summary["seconds"] = round(time.perf_counter() - t0, 3)
            summary["workers"] = world
        box = [summary]
        dist.broadcast_object_list(box, src=0)
        summary = box[0]
    finally:
        if ms is not None:
            ms.release()
        if own:
            dist.destroy_process_group()
    if summary.get("status") != "complete":
        raise StoreError(f"multi-worker capture incomplete: {summary.get('error') or failure}; "
                         f"continue with --resume (same options, same number of ranks)")
    return summary
