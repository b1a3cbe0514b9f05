"""Capture: sample with hooks attached and stream every hooked value into a Zarr store.

Store layout (all arrays carry ``dimension_names``, so ``xarray.open_zarr`` reads them as is)::

    step, timestep (step)          sampling step index and the scheduler's timestep value
    layer (layer)                  the captured block indices
    sample, label, seed (sample)   one row per sample
    cfg (cfg)                      "cond", "uncond" when guidance is on
    blocks.<point> (step, layer, [cfg,] sample, <value dims>)   e.g. blocks.resid_post
    <point> (step, [cfg,] sample, <value dims>)                  e.g. final.out
    latents (latent_step, sample, latent_channel, height, width) x before each step and the result
    rng_state (latent_step, sample, rng_byte)   each sample's generator state, for --resume
                                   (rows written only when a state changed)
    probe.<probe>.<output> (step, [layer,] ...)   outputs of probes (probes/api.py), or without
                                   step for those computed once at the end
    step_complete (step)           True once every array of that step is on disk

One shard (file) per step holds every captured layer; chunks inside it hold one layer (several
consecutive layers when layers are small), so reading a slice touches only the chunks it needs.
Small steps are buffered and written several at a time; a step is marked in ``step_complete``
only after everything of it is on disk.
"""

from __future__ import annotations

import contextlib
import difflib
import errno
import fnmatch
import json
import os
import shutil
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import zarr

from .errors import DithooksError, HookNameError, StoreError
from .hookpoints import layer_template, store_array_name
from .hooks import HookContext, HookManager
from .layers import parse_layers
from .loading import LoadedModel, load_model
from .probe_runner import ProbeRunner
from .jvp_hooks import JVPSettings, check_direction, jvp_batch_axes
from .sampling import ReplicaSpec, Sampler, SamplerSpec, TrajectoryState
from .store.codecs import COMPRESSIONS, storage_dtype
from .store.files import describe_foreign, foreign_entries, remove_leftovers, remove_partials, temp_path
from .store.lock import LOCK_NAME, StoreLock
from .store.metadata import (ATTR_KEY, FORMAT_VERSION, RESUME_KEYS, completeness, how_to_continue,
                             invocation, jsonable, library_versions, now)
from .store.verify import DamagedStore, StoreLayout, inspect_store, verify_store
from .store.writer import ARRAY_CONFIG, ArraySpec, StoreWriter, WriterFailed

DEFAULT_HOOKS = ("resid_post",)
MODES = ("create", "overwrite", "resume")


@dataclass
class CaptureConfig:
    """Everything that defines a capture; the CLI builds one of these from its options."""

    out: str
    model: str | None = None
    layers: str = "all"
    hooks: tuple[str, ...] = DEFAULT_HOOKS
    sampler: SamplerSpec = field(default_factory=SamplerSpec)
    labels: tuple[int, ...] = (0,)
    seeds: tuple[int, ...] = (0,)
    storage_dtype: str = "fp16"
    compute_dtype: str = "fp32"
    compression: str = "none"
    device: str = "cpu"
    mode: str = "create"
    max_pending_bytes: int = 256 * 2**20
    # probes measured online and stored as probe.<name>.<output> (see docs/writing-probes.md):
    # Probe instances, registered names / import paths, or (name, {options})
    probes: tuple = ()
    # replica pairs (THEORY §2): each seed becomes a pair (a, b); stores gain a `replica` dim
    replicas: ReplicaSpec | None = None
    # attention processor settings (hook-points.md): Chebyshev window radius on `window_layers`
    # (None = all blocks), reductions' top-k and chosen query rows, query tile of the explicit path
    window: int | None = None
    window_layers: str | None = None
    top_k: int | None = None
    query_tokens: tuple[int, ...] | None = None
    query_tile: int = 512
    # how blocks.{i}.jvp.* are computed (dithooks/jvp_hooks.py)
    jvp: JVPSettings = field(default_factory=JVPSettings)


@dataclass(frozen=True)
class PlannedArray:
    """An array a capture will write: its name, dims, shape and size (before compression)."""

    name: str
    dims: tuple[str, ...]
    shape: tuple[int, ...]
    nbytes: int
    hook: str


# steps buffered per store write (small models): at most BATCH_STEPS steps and BATCH_BYTES
BATCH_STEPS = 16
BATCH_BYTES = 8 * 2**20

# chunks of small layers are grouped up to this size (see layers_per_chunk)
MIN_CHUNK_BYTES = 2**20

# value dims whose size grows with N^2: the arrays worth a warning before a capture starts
PATTERN_DIMS = ("query", "key")


@dataclass
class CaptureResult:
    path: Path
    steps_run: int
    steps_total: int
    seconds: float
    bytes_written: int
    hooks: list[str]
    resumed_from: int = 0
    # array -> number of NaN/inf values in it (whole store, after this run); empty when none
    nonfinite: dict[str, int] = field(default_factory=dict)


def expand_hooks(patterns: tuple[str, ...] | list[str], layers: list[int], available: list[str]) -> list[str]:
    """Turn short names (``resid_post``, ``attn.out``) into per-layer names for ``layers``.

    Globs (``blocks.2*.mlp.out``, ``*.resid_post``) expand against ``available`` and keep only
    points of the selected ``layers`` (and points outside blocks); a glob that selects nothing
    there, or a full per-block name (``blocks.3.resid_post``) of a block outside ``layers``, is
    refused with :class:`HookNameError`. ``modules.*`` names pass through unchanged.
    """
    from .layers import format_layers

    out: list[str] = []
    templates = {layer_template(n)[0] for n in available}
    short = sorted(t[len("blocks.{i}."):] for t in templates if t.startswith("blocks.{i}."))
    known = set(available)
    chosen = set(layers)
    for p in patterns:
        p = p.strip()
        if not p:
            continue
        if "blocks.{i}." + p in templates:
            out += [f"blocks.{i}.{p}" for i in layers]
        elif p.startswith("modules."):
            out.append(p)
        elif any(c in p for c in "*?["):
            hits = [n for n in available if fnmatch.fnmatchcase(n, p)]
            kept = [n for n in hits if layer_template(n)[1] is None or layer_template(n)[1] in chosen]
            if not kept:
                where = (f" among the selected blocks {format_layers(sorted(chosen))} (--layers)" if hits
                         else "")
                raise HookNameError(f"hook pattern {p!r} matches no hook point{where} "
                                    "(`dithooks hooks` lists them all)")
            out += kept
        elif p in known:
            layer = layer_template(p)[1]
            if layer is not None and layer not in chosen:
                raise HookNameError(f"hook point {p!r} is in block {layer}, which --layers "
                                    f"({format_layers(sorted(chosen))}) does not select: add it to --layers, "
                                    f"or use the short name {p.split('.', 2)[2]!r}")
            out.append(p)
        elif "." not in p or not p.startswith(("blocks.", "final.", "embed.")):
            close = difflib.get_close_matches(p, short + sorted(n for n in known if not n.startswith("blocks.")), 4, 0.5)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise HookNameError(f"unknown hook point {p!r}{hint} (`dithooks hooks` lists them all)")
        else:
            out.append(p)
    return out


def _compute_dtype(name: str) -> torch.dtype:
    table = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    if name not in table:
        raise DithooksError(f"unknown compute dtype {name!r}; choose one of {', '.join(table)}")
    return table[name]


class CaptureSession:
    """One capture run: validated request, open store, writer, hooks and sampler."""

    def __init__(self, cfg: CaptureConfig, loaded: LoadedModel | None = None):
        if cfg.mode not in MODES:
            raise DithooksError(f"unknown mode {cfg.mode!r}")
        if cfg.compression not in COMPRESSIONS:
            raise DithooksError(f"unknown compression {cfg.compression!r}; choose one of {', '.join(COMPRESSIONS)}")
        self.cfg = cfg
        self.store_dtype = storage_dtype(cfg.storage_dtype)
        if len(cfg.labels) == 1 and len(cfg.seeds) > 1:
            cfg.labels = tuple(cfg.labels) * len(cfg.seeds)
        if len(cfg.labels) != len(cfg.seeds):
            raise DithooksError(f"{len(cfg.labels)} labels for {len(cfg.seeds)} seeds: "
                                "give one label, or one per seed")
        self.loaded = loaded or load_model(cfg.model, device=cfg.device, dtype=_compute_dtype(cfg.compute_dtype))
        adapter = self.loaded.adapter
        self.layers = parse_layers(cfg.layers, adapter.num_layers)
        self.hooks = HookManager(self.loaded.transformer, adapter)
        available = list(adapter.hook_points())
        self.hook_names = adapter.resolve(expand_hooks(cfg.hooks, self.layers, available))
        self.probes = ProbeRunner(cfg.probes, lambda pats: adapter.resolve(expand_hooks(pats, self.layers, available)))
        self._configure_attention_and_jvp()
        self.sampler = Sampler(self.loaded, cfg.sampler, self.hooks, cfg.device, replicas=cfg.replicas)
        self.sampler.check_labels(cfg.labels)
        if self.probes:  # probes check the run's layout now, so a bad setup never touches disk
            self._start_probes(0)
        self.path = Path(cfg.out)
        self._specs: dict[str, ArraySpec] = {}
        self._layer_pos = {layer: i for i, layer in enumerate(self.layers)}
        self._slabs: dict[str, torch.Tensor] = {}
        self.writer: StoreWriter | None = None
        self._last_rng: torch.Tensor | None = None
        # finished steps not yet written: (step, {array: values}, state); see _flush_pending
        self._pending: list[tuple[int, dict[str, torch.Tensor], TrajectoryState]] = []
        self._batch: int | None = None
        self._command = invocation()  # which dithooks command (if any) runs this capture
        self._lock: StoreLock | None = None
        self._meta: dict[str, Any] = {}
        self._nonfinite: dict[str, dict[Any, int]] = {}
        self._nonfinite_written = "{}"

    def _configure_attention_and_jvp(self) -> None:
        cfg, n = self.cfg, self.loaded.adapter.num_layers
        att = getattr(self.hooks, "attention", None)
        wants_attention = (cfg.window is not None or cfg.top_k is not None or cfg.query_tokens
                           or cfg.replicas is not None)
        if wants_attention and att is None:
            raise DithooksError(f"{type(self.loaded.transformer).__name__} exposes no attention processors: "
                                "windows, top-k, query tokens and replica coupling are unavailable")
        if att is not None:
            N = self.loaded.adapter.geometry.num_tokens
            bad = [q for q in (cfg.query_tokens or ()) if not 0 <= q < N]
            if bad:
                raise DithooksError(f"query token {bad[0]} is out of range: this model has tokens 0-{N - 1}")
            if cfg.top_k is not None and not 1 <= cfg.top_k <= N:
                raise DithooksError(f"top-k must lie in 1-{N} (the number of tokens), got {cfg.top_k}")
            if cfg.query_tile < 1:
                raise DithooksError(f"query tile must be at least 1, got {cfg.query_tile}")
            att.query_tile, att.top_k = cfg.query_tile, cfg.top_k
            att.query_tokens = list(cfg.query_tokens) if cfg.query_tokens else None
            if cfg.window is not None:
                from .attention.window import validate_radius
                try:
                    validate_radius(cfg.window)
                except ValueError as e:
                    raise DithooksError(str(e)) from None
                # set for the run only (run() clears it), so a session never leaves processors behind
                self._window_layers = None if cfg.window_layers in (None, "all") else parse_layers(cfg.window_layers, n)
        if cfg.replicas is not None and cfg.replicas.layers is not None:
            bad = [layer for layer in cfg.replicas.layers if not 0 <= layer < n]
            if bad:
                raise DithooksError(f"coupled layer {bad[0]} is out of range: this model has blocks 0-{n - 1}")
        check_direction(cfg.jvp.direction)
        if self._wants_jvp():
            self._check_direction_shapes(cfg.jvp.direction)
            if isinstance(cfg.jvp.direction, str) and cfg.jvp.direction == "replica" and cfg.replicas is None:
                raise DithooksError("JVP direction 'replica' needs replica pairs (--pairs, --kappa or --coupling)")
            self.hooks.jvp.settings = cfg.jvp

    def _check_direction_shapes(self, direction) -> None:
        """Stored directions must fit a block's input (tokens, channels): refuse before disk."""
        geo = self.loaded.adapter.geometry
        rows = len(self.cfg.seeds) * (2 if self.cfg.sampler.cfg else 1)
        shape = (rows, geo.num_tokens, geo.width)
        tensors = direction.values() if isinstance(direction, dict) else [direction]
        for d in tensors:
            if isinstance(d, str) or callable(d) and not isinstance(d, torch.Tensor):
                continue
            t = torch.as_tensor(d)
            try:
                if torch.broadcast_shapes(tuple(t.shape), shape) != shape:
                    raise RuntimeError
            except RuntimeError:
                raise DithooksError(f"JVP direction of shape {tuple(t.shape)} does not fit a block's input "
                                    f"(tokens, channels) = ({geo.num_tokens}, {geo.width})") from None

    def _wants_jvp(self) -> bool:
        names = self.hook_names + self.probes.hook_names
        return any(not n.startswith("modules.") and self.loaded.adapter.point(n).kind == "jvp" for n in names)

    def planned_arrays(self) -> list[PlannedArray]:
        """What the raw hooks will write, sized from the model geometry before anything runs."""
        geo = self.loaded.adapter.geometry
        n = len(self.cfg.seeds)
        axes = self.sampler.batch_axes(n)
        sizes = {"token": geo.num_tokens, "query": geo.num_tokens, "key": geo.num_tokens,
                 "channel": geo.width, "head": geo.num_heads, "head_channel": geo.head_dim,
                 "rank": self.cfg.top_k or 0, "out_channel": geo.out_channels,
                 "height": geo.sample_size, "width": geo.sample_size}
        itemsize = torch.empty((), dtype=self.store_dtype).element_size()
        plan: dict[str, PlannedArray] = {}
        for name in self.hook_names:
            point = self.loaded.adapter.point(name)
            arr = store_array_name(name)
            b_axes = jvp_batch_axes(axes, self.cfg.jvp.direction) if point.kind == "jvp" else axes
            value_dims = tuple(point.dims[1:])
            if "..." in value_dims:  # generic module hooks: size unknown until the first call
                continue
            value = [sizes.get(d, 0) for d in value_dims]
            if layer_template(name)[0].endswith("attn.pattern_query") and self.cfg.query_tokens:
                value[value_dims.index("query")] = len(self.cfg.query_tokens)
            lead = (self.cfg.sampler.steps,) + ((len(self.layers),) if point.layer is not None else ())
            shape = lead + tuple(k for _, k in b_axes) + tuple(value)
            dims = ("step",) + (("layer",) if point.layer is not None else ()) + tuple(a for a, _ in b_axes) + value_dims
            plan[arr] = PlannedArray(arr, dims, shape, int(np.prod(shape)) * itemsize, layer_template(name)[0])
        return list(plan.values())

    # -- the request as stored metadata ------------------------------------------------------
    def request(self) -> dict[str, Any]:
        s = self.cfg.sampler
        return jsonable({
            "model_id": self.loaded.model_id,
            "model_class": type(self.loaded.transformer).__name__,
            "model_config": dict(self.loaded.transformer.config),
            "sampler": {"name": s.name, "steps": s.steps, "eta": s.eta, "guidance": s.guidance},
            "scheduler": {"class": type(self.sampler.scheduler).__name__,
                          "config": dict(self.sampler.scheduler.config)},
            "seeds": list(self.cfg.seeds), "labels": list(self.cfg.labels),
            "hooks": self.hook_names, "layers": self.layers,
            "storage_dtype": self.cfg.storage_dtype, "compute_dtype": self.cfg.compute_dtype,
            "compression": self.cfg.compression, "device": self.cfg.device,
            "batch_axes": [list(a) for a in self.sampler.batch_axes(len(self.cfg.seeds))],
            "extras": self._extras(),
            "probes": self.probes.describe(),
        })

    def _extras(self) -> dict[str, Any]:
        """Settings that change what is computed: replicas, attention processor options, JVPs."""
        c, extras = self.cfg, {}
        if c.replicas is not None:
            r = c.replicas
            extras["replicas"] = {"kappa": r.kappa, "g": r.g, "couple_until": r.couple_until,
                                  "share_noise_until": r.share_noise_until,
                                  "layers": None if r.layers is None else list(r.layers)}
        att = {k: v for k, v in (("window", c.window), ("window_layers", c.window_layers), ("top_k", c.top_k),
                                 ("query_tokens", list(c.query_tokens) if c.query_tokens else None))
               if v is not None}
        if att:
            extras["attention"] = att
        if self._wants_jvp():
            extras["jvp"] = c.jvp.describe()
        return extras

    # -- store lifecycle ---------------------------------------------------------------------
    def open_store(self) -> tuple[zarr.Group, int]:
        """Create, replace or reopen the store; returns the group and the first step to run.

        The store is held under its writer's lock (``.dithooks.lock``, store/lock.py) from here
        until :meth:`run` ends (:meth:`release_store`). A new store is built under a temporary
        name next to the target and renamed into place once its skeleton is complete, so a
        killed or failed creation never leaves a half-made store at the target (store/files.py).
        """
        path, mode = self.path, self.cfg.mode
        remove_leftovers(path)
        exists = path.exists() or path.is_symlink()
        if exists and mode == "create":
            raise StoreError(f"{path} already exists: use --overwrite to replace it "
                             "or --resume to continue it")
        if not exists and mode == "resume":
            raise StoreError(f"nothing to resume: {path} does not exist")
        old = self._lock_existing(replacing=exists and mode == "overwrite") if exists else None
        try:
            if mode == "resume":
                self._lock = old
                return self._reopen()
            return self._create(old), 0
        except BaseException:
            self.release_store()
            if old is not None:
                old.release()
            raise

    def release_store(self) -> None:
        """Give up the store's writer lock (run() does this when it ends)."""
        lock, self._lock = getattr(self, "_lock", None), None
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
        lock = StoreLock(path, command=self._command_text()).acquire()
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

    def _command_text(self) -> str:
        c = self._command
        if c.get("argv"):
            return "dithooks " + " ".join(c["argv"])
        return f"dithooks {c['name']}" if c.get("name") else "dithooks (Python)"

    def _create(self, old: StoreLock | None) -> zarr.Group:
        """Build the store's skeleton under a temporary name, then rename it into place (moving
        an old store aside first when replacing one, and deleting it after)."""
        target = self.path
        tmp = temp_path(target, "new")
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            if tmp.exists():  # left by this very process (a pid reused): never a live store
                shutil.rmtree(tmp)
            tmp.mkdir()
        except OSError as e:
            raise StoreError(f"cannot create {target}: {e.strerror or e}") from None
        lock = StoreLock(tmp, command=self._command_text())
        trash = None
        try:
            try:
                self._build(tmp)
            except (DithooksError, KeyboardInterrupt):
                raise
            except Exception as e:
                msg = f"{e.strerror or e}" if isinstance(e, OSError) else f"{type(e).__name__}: {e}"
                raise StoreError(f"cannot create {target}: {msg}") from None
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
        self._lock = lock
        if trash is not None:
            old.release()
            shutil.rmtree(trash, ignore_errors=True)  # verified to hold only what dithooks wrote
        return zarr.open_group(str(target), mode="r+", zarr_format=3)

    def _build(self, folder: Path) -> None:
        """The store's skeleton: metadata, coordinates, ``step_complete`` (all False)."""
        group = zarr.open_group(str(folder), mode="w", zarr_format=3)
        req = self.request()
        steps = self.cfg.sampler.steps
        n = len(self.cfg.seeds)
        meta = {"format_version": FORMAT_VERSION, **req, "versions": library_versions(),
                "started": now(), "finished": None, "status": "running", "error": None, "runs": [now()],
                "command": self._command, "nonfinite": {}, "hook_arrays": self._hook_array_table()}

        def coord(name, values, dims, dtype=None):
            values = np.asarray(values, dtype=dtype)
            text = values.dtype.kind in "US"  # variable-length strings: the dtype Zarr v3 specifies
            # uncompressed: a few bytes each, and readers then need no codec library at all
            a = group.create_array(name=name, shape=values.shape, dtype=str if text else values.dtype,
                                   dimension_names=dims, fill_value="" if text else 0, config=ARRAY_CONFIG,
                                   compressors=None)
            a[...] = values

        coord("step", np.arange(steps), ("step",), "int64")
        coord("timestep", self.sampler.timesteps, ("step",), "int64")
        coord("layer", self.layers, ("layer",), "int64")
        coord("sample", np.arange(n), ("sample",), "int64")
        coord("label", list(self.cfg.labels), ("sample",), "int64")
        coord("seed", list(self.cfg.seeds), ("sample",), "int64")
        coord("latent_step", np.arange(steps + 1), ("latent_step",), "int64")
        if self.cfg.sampler.cfg:
            coord("cfg", np.array(["cond", "uncond"]), ("cfg",), str)
        if self.cfg.replicas is not None:
            coord("replica", np.array(["a", "b"]), ("replica",), str)
        # all False: its chunks are written only when a step is marked (a missing one is False)
        group.create_array(name="step_complete", shape=(steps,), chunks=(1,), dtype="bool",
                           dimension_names=("step",), fill_value=False, compressors=None)
        group.attrs[ATTR_KEY] = meta  # last: a skeleton with metadata is a whole one
        self._meta = meta

    def _hook_array_table(self) -> dict[str, Any]:
        table: dict[str, Any] = {}
        for name in self.hook_names:
            template, layer = layer_template(name)
            entry = table.setdefault(store_array_name(name), {"hook": template, "layers": []})
            if layer is not None:
                entry["layers"].append(layer)
        return table

    def _reopen(self) -> tuple[zarr.Group, int]:
        try:
            layout = inspect_store(self.path)
        except DamagedStore as e:
            raise DamagedStore(f"cannot resume: {e}") from None
        except StoreError as e:
            raise StoreError(f"{self.path} is not a dithooks store: cannot resume it ({e})") from None
        if layout.kind != "capture":
            raise StoreError(f"{self.path} is a {layout.kind} store, not a capture: cannot resume it here")
        remove_partials(self.path)  # writes a killed run left half-done (we hold the lock)
        group = zarr.open_group(str(self.path), mode="r+", zarr_format=3)
        meta = dict(layout.meta)
        req = self.request()
        meta.setdefault("probes", [])  # stores from before probes existed had none
        for key in RESUME_KEYS + ("probes",):
            if meta.get(key) != req.get(key):
                raise StoreError(f"cannot resume {self.path}: its {key} differs from this request "
                                 f"(stored {_short(meta.get(key))}, asked {_short(req.get(key))})")
        info = completeness(layout.step_complete)
        start = info["resume_from_step"]
        # a chunk of a step marked complete that is missing or cut short: redo from that step
        check = verify_store(self.path, decode=False, layout=layout)
        if not check.ok:
            if check.first_bad_step is None:
                raise DamagedStore(f"cannot resume {self.path}: {check.summary(1)}; replace it by running the "
                                   "command that made it with --overwrite")
            start = min(start, check.first_bad_step)
        stateful = self.probes.not_resumable()
        if stateful and 0 < start < self.cfg.sampler.steps:
            # their state (e.g. a step-0 basis) is not in the store: continuing would be wrong
            raise StoreError(f"cannot resume {self.path} at step {start}: probe {stateful[0]} carries state "
                             "across steps and cannot continue mid-way; rerun it with --overwrite")
        if start < self.cfg.sampler.steps and layout.step_complete[start:].any():
            group["step_complete"][start:] = False  # steps to redo are not complete
        meta["nonfinite"] = _nonfinite_before(meta.get("nonfinite") or {}, layout, start)
        meta.setdefault("command", self._command)
        meta.update(status="running", error=None, finished=None, runs=list(meta.get("runs", [])) + [now()])
        group.attrs[ATTR_KEY] = meta
        self._meta = meta
        return group, start

    def _state_at(self, group: zarr.Group, step: int) -> TrajectoryState | None:
        if step == 0:
            return None
        lat = np.asarray(group["latents"][step])
        if lat.size and np.isnan(lat).all():  # never written (fill value): nothing to continue from
            raise DamagedStore(f"cannot resume {self.path}: the latents before step {step} are missing; "
                               "replace it by running the command that made it with --overwrite")
        lat = torch.from_numpy(lat)
        rng = self._rng_state_at(group, step)
        self._last_rng = torch.from_numpy(rng.copy())  # as stored: the next write is skipped if unchanged
        if self.cfg.replicas is not None:  # (replica, sample, ...) -> the sampler's [a-half; b-half]
            lat, rng = lat.reshape((-1,) + tuple(lat.shape[2:])), rng.reshape((-1,) + rng.shape[2:])
        return TrajectoryState(step, lat, [torch.from_numpy(r.copy()) for r in rng])

    @staticmethod
    def _rng_state_at(group: zarr.Group, step: int) -> np.ndarray:
        """The generators' state before ``step``: the last row written at or before it.

        A row is written only when some generator moved (see :meth:`_write_state`); unwritten rows
        hold the fill value 0, which no torch generator state is (it starts with a non-zero seed).
        """
        arr = group["rng_state"]
        for k in range(step, -1, -1):
            row = np.asarray(arr[k])
            if row.any():
                return row
        raise StoreError("the store holds no RNG state to resume from")

    # -- hooks -------------------------------------------------------------------------------
    def _spec(self, name: str, ctx: HookContext, value: torch.Tensor) -> ArraySpec:
        arr = store_array_name(name)
        spec = self._specs.get(arr)
        if spec is not None:
            return spec
        batch_dims = tuple(a for a, _ in ctx.batch_axes)
        batch_shape = tuple(n for _, n in ctx.batch_axes)
        value_dims = tuple(ctx.point.dims[1:])
        if value_dims and value_dims[-1] == "...":
            value_dims = tuple(f"dim_{i}" for i in range(value.dim() - 1))
        rest = batch_shape + tuple(value.shape[1:])
        steps = self.cfg.sampler.steps
        if ctx.layer is None:
            lead_dims, shape, chunks, shards = ("step",), (steps,) + rest, (1,) + rest, None
        else:
            # one shard (file) per step holds every layer, so a step is one write; inside it a
            # chunk holds one layer, or several when a layer is small (the codec pays per chunk,
            # ~0.5 ms, which dwarfs an 8 KiB chunk), so a (step, layer) read touches one chunk
            L = len(self.layers)
            lead_dims, shape = ("step", "layer"), (steps, L) + rest
            chunks, shards = (1, layers_per_chunk(L, int(np.prod(rest)) * torch.empty((), dtype=self.store_dtype).element_size())) + rest, (1, L) + rest
        spec = ArraySpec(arr, lead_dims + batch_dims + value_dims, shape, chunks, self.store_dtype,
                         (("coordinates", "timestep label seed"), ("hook", layer_template(name)[0]),
                          ("description", ctx.point.doc)), shards)
        self._specs[arr] = spec
        return spec

    def _record(self, value: torch.Tensor, ctx: HookContext) -> None:
        spec = self._spec(ctx.name, ctx, value)
        batch_shape = tuple(n for _, n in ctx.batch_axes)
        data = value.detach().to("cpu", dtype=self.store_dtype, copy=True)
        data = data.reshape(batch_shape + tuple(value.shape[1:]))
        if ctx.layer is None:
            self._slabs[spec.name] = data
            return
        slab = self._slabs.get(spec.name)
        if slab is None:  # this step's values of every captured layer, written at step end
            slab = self._slabs[spec.name] = torch.empty((len(self.layers),) + tuple(data.shape), dtype=data.dtype)
        slab[self._layer_pos[ctx.layer]] = data

    def _batch_size(self, step_values: dict[str, torch.Tensor], state: TrajectoryState) -> int:
        """Steps written per store write: every write costs ~10 ms of interpreter time however
        small, so small models batch up to BATCH_STEPS steps within BATCH_BYTES of memory."""
        step_bytes = sum(v.numel() * v.element_size() for v in step_values.values())
        step_bytes += state.latents.numel() * state.latents.element_size()
        return int(max(1, min(BATCH_STEPS, BATCH_BYTES // max(1, step_bytes))))

    def _flush_pending(self, group: zarr.Group) -> None:
        """Write the buffered steps (consecutive, each complete) and then mark them complete."""
        if not self._pending:
            return
        s0, n = self._pending[0][0], len(self._pending)
        rows = slice(s0, s0 + n)
        for name in self._pending[0][1]:
            stacked = torch.stack([values[name] for _, values, _ in self._pending])
            self.writer.put(self._specs[name], (rows,), stacked)
        self._write_states([state for _, _, state in self._pending])
        done = group["step_complete"]
        self.writer.call(lambda: self._record_nonfinite(group))  # counts of a step precede its mark
        self.writer.call(lambda: done.__setitem__(rows, True))
        self._pending = []

    def _nonfinite_json(self) -> dict[str, dict[str, int]]:
        return {a: {str(k): int(v) for k, v in sorted(rows.items(), key=lambda kv: str(kv[0]))}
                for a, rows in sorted(self._nonfinite.items()) if rows}

    def _record_nonfinite(self, group: zarr.Group) -> None:
        """Store the non-finite counts in the metadata when they changed (rarely: NaNs are news)."""
        table = self._nonfinite_json()
        text = json.dumps(table, sort_keys=True)
        if text == self._nonfinite_written:
            return
        self._meta["nonfinite"] = table
        group.attrs[ATTR_KEY] = self._meta
        self._nonfinite_written = text

    def _observe(self, value: torch.Tensor, ctx: HookContext) -> None:
        # one read hook per point serves both the raw capture and the probes that need it
        if ctx.name in self._raw_names:
            self._record(value, ctx)
        self.probes.observe(value, ctx)

    def _stored_dims(self) -> dict[str, int]:
        return {d: n for spec in self._specs.values() for d, n in zip(spec.dims, spec.shape)}

    def _on_step(self, group: zarr.Group, step: int, state: TrajectoryState) -> None:
        """After step ``step``: queue its probe outputs, buffer its hooked values and state; write
        the buffer (then mark those steps complete) every few steps and after the last."""
        values, self._slabs = self._slabs, {}
        if self.probes:
            self.probes.emit_step(step, self.writer.put, self._stored_dims())
            if step == self.cfg.sampler.steps - 1:  # once-only outputs, before the last mark
                self.probes.emit_finish(self.writer.put, self._stored_dims())
        if self._batch is None:
            self._batch = self._batch_size(values, state)
        self._pending.append((step, values, state))
        if len(self._pending) >= self._batch or step == self.cfg.sampler.steps - 1:
            self._flush_pending(group)

    def _write_states(self, states: list[TrajectoryState]) -> None:
        """Latents and RNG states of consecutive steps; latent_step k is x before step k
        (k = 0 is x_T; k = steps is the result)."""
        steps, n = self.cfg.sampler.steps, len(self.cfg.seeds)
        lats, rngs = [], []
        for state in states:
            lat, rng = state.latents, torch.stack(state.rng_states)
            if self.cfg.replicas is not None:  # the sampler's [a-half; b-half] rows -> (replica, sample)
                lat, rng = lat.reshape((2, n) + tuple(lat.shape[1:])), rng.reshape(2, n, -1)
            lats.append(lat)
            rngs.append(rng)
        batch_dims = ("replica", "sample") if self.cfg.replicas is not None else ("sample",)
        k0, lat0 = states[0].step, lats[0]
        self.writer.put(ArraySpec("latents", ("latent_step",) + batch_dims + ("latent_channel", "height", "width"),
                                  (steps + 1,) + tuple(lat0.shape), (1,) + tuple(lat0.shape), torch.float32,
                                  (("coordinates", "label seed"),
                                   ("description", "x before each step; the last is the result"))),
                        (slice(k0, k0 + len(states)),), torch.stack(lats))
        # deterministic samplers (DDIM, eta = 0) never draw: a row is written only when a state
        # moved (resume reads the last row written, _rng_state_at)
        for state, rng in zip(states, rngs):
            if self._last_rng is not None and torch.equal(rng, self._last_rng):
                continue
            self._last_rng = rng
            self.writer.put(ArraySpec("rng_state", ("latent_step",) + batch_dims + ("rng_byte",),
                                      (steps + 1,) + tuple(rng.shape), (1,) + tuple(rng.shape), torch.uint8,
                                      (("description", "generator states before each step; a row is written "
                                                       "only when they changed (0 = same as the row before)"),)),
                            (state.step,), rng)

    # -- run ---------------------------------------------------------------------------------
    def run(self, progress: Callable | None = None) -> CaptureResult:
        group, start = self.open_store()
        try:
            return self._run(group, start, progress)
        finally:
            self.release_store()

    def _run(self, group: zarr.Group, start: int, progress: Callable | None) -> CaptureResult:
        steps = self.cfg.sampler.steps
        t0 = time.perf_counter()
        self._nonfinite = {a: {(k if k == "all" else int(k)): int(v) for k, v in rows.items()}
                           for a, rows in (self._meta.get("nonfinite") or {}).items()}
        self._nonfinite_written = json.dumps(self._nonfinite_json(), sort_keys=True)
        if start >= steps:
            self._finish(group, "complete")
            totals = {a: sum(rows.values()) for a, rows in self._nonfinite.items() if rows}
            return CaptureResult(self.path, 0, steps, 0.0, 0, self.hook_names, start, totals)
        self.writer = StoreWriter(group, compression=self.cfg.compression,
                                  max_pending_bytes=self.cfg.max_pending_bytes, nonfinite=self._nonfinite)
        state = self._state_at(group, start)
        status, error = "complete", None
        try:
            if start == 0:
                from .sampling import initial_replica_state, initial_state
                sigma = float(self.sampler.scheduler.init_noise_sigma)
                state0 = (initial_state(self.loaded, self.cfg.seeds, sigma) if self.cfg.replicas is None
                          else initial_replica_state(self.loaded, self.cfg.seeds, self.cfg.replicas, sigma))
                self._write_states([state0])
                state = state0
            read = {n: self._record for n in self.hook_names}
            if self.probes:
                self._start_probes(start)
                read = {n: self._observe for n in dict.fromkeys(self.hook_names + self.probes.hook_names)}
            if self.cfg.window is not None:
                self.hooks.attention.set_window(self.cfg.window, self._window_layers)
            with self.hooks.hooks(read=read):
                self.sampler.run(self.cfg.labels, self.cfg.seeds, state=state,
                                 on_step=lambda s, st: self._on_step(group, s, st),
                                 progress=progress)
            self.writer.flush()
        except KeyboardInterrupt:
            status = "interrupted"
            with contextlib.suppress(Exception):
                self._flush_pending(group)  # the finished steps still buffered are kept
                self.writer.flush()
        except WriterFailed as e:
            status, error = "failed", str(e)
        except BaseException as e:
            status, error = "failed", f"{type(e).__name__}: {e}"
            with contextlib.suppress(Exception):  # steps finished before the failure are kept too
                self._flush_pending(group)
                self.writer.flush()
            raise
        finally:
            if self.cfg.window is not None:
                self.hooks.attention.set_window(None)
            self.writer.close()
            self._finish(group, status, error)
        info = completeness(np.asarray(group["step_complete"][...]))
        hint = how_to_continue(self._meta, self.path, self._command)
        if status == "interrupted":
            raise StoreError(f"capture interrupted: {self.path} holds steps {info['complete_steps']} "
                             f"of 0-{steps - 1}; {hint}")
        if status == "failed":
            raise StoreError(f"capture failed ({error}): {self.path} holds steps {info['complete_steps']} "
                             f"of 0-{steps - 1}; fix the cause and {hint}")
        totals = {a: sum(rows.values()) for a, rows in self._nonfinite.items() if rows}
        return CaptureResult(self.path, steps - start, steps, time.perf_counter() - t0,
                             self.writer.bytes_written, self.hook_names, start, totals)

    def _start_probes(self, first_step: int) -> None:
        self._raw_names = set(self.hook_names)
        n = len(self.cfg.seeds)
        axes = self.sampler.batch_axes(n)
        sizes = {"step": self.cfg.sampler.steps, "layer": len(self.layers), "latent_step": self.cfg.sampler.steps + 1,
                 **{a: k for a, k in axes}}
        self.probes.start(steps=self.cfg.sampler.steps, layers=self.layers, batch_axes=axes,
                          labels=self.cfg.labels, seeds=self.cfg.seeds, timesteps=self.sampler.timesteps,
                          first_step=first_step, dim_sizes=sizes,
                          num_tokens=self.loaded.adapter.geometry.num_tokens)

    def _finish(self, group: zarr.Group, status: str, error: str | None = None) -> None:
        try:
            meta = dict(self._meta or group.attrs[ATTR_KEY])
            meta.update(status=status, error=error, finished=now(), nonfinite=self._nonfinite_json())
            self._meta = meta
            group.attrs[ATTR_KEY] = meta
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                zarr.consolidate_metadata(str(self.path))
        except Exception:  # a full disk can make even this fail; step_complete still tells the truth
            pass


def layers_per_chunk(num_layers: int, layer_bytes: int, target: int = MIN_CHUNK_BYTES) -> int:
    """The largest divisor of ``num_layers`` (shards must be whole chunks) whose chunk stays
    within ``target`` bytes; 1 when one layer already reaches it."""
    fits = [d for d in range(1, num_layers + 1) if num_layers % d == 0 and d * layer_bytes <= target]
    return max(fits, default=1)


def is_store(path: Path) -> bool:
    """A directory with a Zarr group whose attributes carry dithooks metadata."""
    try:
        g = zarr.open_group(str(path), mode="r")
        return ATTR_KEY in g.attrs
    except Exception:
        return False


def _nonfinite_before(table: dict, layout: StoreLayout, start: int) -> dict:
    """The non-finite counts of rows a resume from ``start`` keeps (the rest is rewritten)."""
    out = {}
    for name, rows in table.items():
        a = layout.arrays.get(name)
        first = a.dims[0] if a is not None and a.dims else None
        limit = start if first == "step" else start + 1 if first == "latent_step" else 0
        kept = {k: v for k, v in rows.items() if k != "all" and int(k) < limit}
        if kept:
            out[name] = kept
    return out


def _short(v: Any) -> str:
    s = repr(v)
    return s if len(s) <= 60 else s[:57] + "..."


def capture(cfg: CaptureConfig, loaded: LoadedModel | None = None, progress: Callable | None = None) -> CaptureResult:
    """Run a capture described by ``cfg`` (see :class:`CaptureConfig`)."""
    return CaptureSession(cfg, loaded).run(progress=progress)
