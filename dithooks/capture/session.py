"""One capture run, orchestrated: checked request -> plan -> open store -> sample with hooks ->
record steps -> finish. Each stage has its own module:

    config.py      CaptureConfig and its checks (once, before anything is loaded or written)
    plan.py        hook names, planned arrays, the request as metadata
    recorder.py    hooked values -> per-step writes, buffered, marked complete
    dithooks/store/lifecycle.py  create / overwrite / resume under the lock, finish
    dithooks/store/skeleton.py   a new store's coordinates and step_complete
    dithooks/store/resume.py     reopening a store and the state to continue from
    dithooks/store/steps.py      latents, RNG rows, step marks, non-finite counts
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from ..errors import StoreError
from ..hooks import HookContext, HookManager
from ..layers import parse_layers
from ..loading import LoadedModel, load_model
from ..probe_runner import ProbeRunner
from ..sampling import Sampler, TrajectoryState
from ..store.layout import sample_coords
from ..store.lifecycle import StoreLifecycle
from ..store.metadata import ATTR_KEY, FORMAT_VERSION, completeness, how_to_continue, invocation, library_versions, now
from ..store.resume import reopen, trajectory_at
from ..store.skeleton import Coordinates, write_skeleton
from ..store.storage import as_path
from ..store.steps import StepLog, nonfinite_from_meta, nonfinite_totals
from ..store.writer import StoreWriter, WriterFailed
from .config import CaptureConfig, check_against_model, check_config, compute_dtype, resolve_conditioning
from .plan import (PlannedArray, array_layers, expand_hooks, hook_array_table, partial_layer_dims, planned_arrays,
                   request_metadata)
from .recorder import StepRecorder


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


class CaptureSession:
    """One capture run: checked request, planned arrays, open store, writer, hooks and sampler.

    Everything that can be refused is refused in ``__init__``, before the store is touched.
    """

    # what writes the run's arrays and step marks (a multi-worker region run replaces them:
    # dithooks/capture/multi.py)
    _writer_class: Callable[..., Any] = StoreWriter
    _log_class: Callable[..., Any] = StepLog
    # steps per chunk of step_complete (None: one chunk; a multi-worker store: 1, each worker marks)
    _marks_chunk: int | None = None

    def __init__(self, cfg: CaptureConfig, loaded: LoadedModel | None = None):
        self.store_dtype = check_config(cfg)
        self.cfg = cfg
        self.loaded = loaded or load_model(cfg.model, device=cfg.device, dtype=compute_dtype(cfg.compute_dtype))
        adapter = self.loaded.adapter
        self.layers = parse_layers(cfg.layers, adapter.num_layers)
        self.hooks = HookManager(self.loaded.transformer, adapter)
        available = list(adapter.hook_points())
        # what is asked for first (a hook or a probe this family cannot give is the real refusal),
        # then what it is conditioned on
        self.hook_names = adapter.resolve(expand_hooks(adapter.check_offered(cfg.hooks), self.layers, available))
        self.probes = ProbeRunner(cfg.probes, lambda pats: adapter.resolve(
            expand_hooks(adapter.check_offered(pats), self.layers, available)))
        self.conditioning = resolve_conditioning(cfg, adapter)
        self.sample_coords = sample_coords(self.conditioning.kind)
        rows = len(cfg.seeds) * (2 if cfg.sampler.cfg else 1)
        self._window_layers = check_against_model(cfg, adapter, self.hooks, self._wants_jvp(), rows)
        self.sampler = Sampler(self.loaded, cfg.sampler, self.hooks, cfg.device, replicas=cfg.replicas)
        self.sampler.conditioning(self.conditioning.sampler_input, len(cfg.seeds))  # checked by the adapter
        if self.probes:  # probes check the run's layout now, so a bad setup never touches disk
            self._start_probes(0)
        self.path = as_path(cfg.out)  # a folder, or an object-store URL (dithooks/store/storage.py)
        self._command = invocation()  # which dithooks command (if any) runs this capture
        self.store = StoreLifecycle(self.path, cfg.mode, self._command)
        self.writer: StoreWriter | None = None
        self._meta: dict[str, Any] = {}
        self._recorder: StepRecorder | None = None
        self._log: StepLog | None = None

    def _wants_jvp(self) -> bool:
        names = self.hook_names + self.probes.hook_names
        return any(not n.startswith("modules.") and self.loaded.adapter.point(n).kind == "jvp" for n in names)

    # -- plan ----------------------------------------------------------------------------------
    def planned_arrays(self) -> list[PlannedArray]:
        """What the raw hooks will write, sized from the model geometry before anything runs."""
        return planned_arrays(self.loaded.adapter, self.hook_names, steps=self.cfg.sampler.steps,
                              layers=self.layers, batch_axes=self.sampler.batch_axes(len(self.cfg.seeds)),
                              jvp_direction=self.cfg.jvp.direction, store_dtype=self.store_dtype,
                              top_k=self.cfg.top_k, query_tokens=self.cfg.query_tokens,
                              text_tokens=self.conditioning.text_tokens)

    def request(self) -> dict[str, Any]:
        """The request as stored metadata."""
        return request_metadata(self.cfg, self.loaded, self.sampler, self.conditioning, self.hook_names,
                                self.layers, self._wants_jvp(), self.probes.describe())

    def coordinates(self) -> Coordinates:
        c = self.conditioning
        return Coordinates(steps=self.cfg.sampler.steps, timesteps=self.sampler.timesteps, layers=self.layers,
                           seeds=self.cfg.seeds, labels=c.labels if c.kind == "class" else None,
                           prompts=c.prompts if c.kind == "text" else None, cfg=self.cfg.sampler.cfg,
                           replicas=self.cfg.replicas is not None,
                           layer_dims=partial_layer_dims(self.hook_names, self.layers))

    # -- store lifecycle -------------------------------------------------------------------------
    def open_store(self) -> tuple[Any, int]:
        """Create, replace or reopen the store; returns the group and the first step to run.
        The store is held under its writer's lock until :meth:`release_store` (see
        dithooks/store/lifecycle.py)."""
        return self.store.open(self._build, self._reopen)

    def release_store(self) -> None:
        """Give up the store's writer lock (run() does this when it ends)."""
        self.store.release()

    def _build(self, folder: Path) -> None:
        """The store's skeleton: metadata, coordinates, ``step_complete`` (all False)."""
        meta = {"format_version": FORMAT_VERSION, **self.request(), "versions": library_versions(),
                "started": now(), "finished": None, "status": "running", "error": None, "runs": [now()],
                "command": self._command, "nonfinite": {}, "hook_arrays": hook_array_table(self.hook_names)}
        write_skeleton(folder, meta, self.coordinates(), marks_chunk=self._marks_chunk)
        self._meta = meta

    def _reopen(self) -> tuple[Any, int]:
        group, meta, start = reopen(self.path, self.request(), steps=self.cfg.sampler.steps,
                                    not_resumable=self.probes.not_resumable(), command=self._command)
        self._meta = meta
        return group, start

    def _state_at(self, group: Any, step: int) -> tuple[TrajectoryState | None, Any]:
        """The sampler state before ``step`` and the stored RNG row it came from."""
        if step == 0:
            return None, None
        lat, rng = trajectory_at(group, self.path, step)
        lat = torch.from_numpy(lat)
        last_rng = torch.from_numpy(rng.copy())  # as stored: the next write is skipped if unchanged
        if self.cfg.replicas is not None:  # (replica, sample, ...) -> the sampler's [a-half; b-half]
            lat, rng = lat.reshape((-1,) + tuple(lat.shape[2:])), rng.reshape((-1,) + rng.shape[2:])
        return TrajectoryState(step, lat, [torch.from_numpy(r.copy()) for r in rng]), last_rng

    # -- run ---------------------------------------------------------------------------------
    def run(self, progress: Callable | None = None) -> CaptureResult:
        group, start = self.open_store()
        try:
            return self._run(group, start, progress)
        finally:
            self.release_store()

    def _run(self, group: Any, start: int, progress: Callable | None) -> CaptureResult:
        cfg, steps = self.cfg, self.cfg.sampler.steps
        t0 = time.perf_counter()
        nonfinite = nonfinite_from_meta(self._meta.get("nonfinite"))
        if start >= steps:
            self._finish(group, "complete", nonfinite=nonfinite)
            return CaptureResult(self.path, 0, steps, 0.0, 0, self.hook_names, start, nonfinite_totals(nonfinite))
        self.writer = self._writer_class(group, compression=cfg.compression, max_pending_bytes=cfg.max_pending_bytes,
                                  nonfinite=nonfinite)
        state, last_rng = self._state_at(group, start)
        log = self._log = self._log_class(group, self.writer, self._meta, steps=steps, num_samples=len(cfg.seeds),
                                  replicas=cfg.replicas is not None, sample_coords=self.sample_coords,
                                  nonfinite=nonfinite, last_rng=last_rng, first_step=start)
        rec = self._recorder = StepRecorder(log, steps=steps, layers=self.layers, store_dtype=self.store_dtype,
                                            sample_coords=self.sample_coords, probes=self.probes,
                                            array_layers=array_layers(self.hook_names, self.layers))
        status, error = "complete", None
        attention = self.hooks.extension("attention")
        try:
            if start == 0:
                from ..sampling import initial_replica_state, initial_state
                sigma = float(getattr(self.sampler.scheduler, "init_noise_sigma", 1.0))
                state = (initial_state(self.loaded, cfg.seeds, sigma) if cfg.replicas is None
                         else initial_replica_state(self.loaded, cfg.seeds, cfg.replicas, sigma))
                log.write_states([state])
            read = {n: rec for n in self.hook_names}  # bindable: see StepRecorder.bind
            if self.probes:
                self._start_probes(start)
                raw = set(self.hook_names)

                def observe(value: torch.Tensor, ctx: HookContext) -> None:
                    # one read hook per point serves both the raw capture and the probes that need it
                    if ctx.name in raw:
                        rec.record(value, ctx)
                    self.probes.observe(value, ctx)

                read = {n: observe for n in dict.fromkeys(self.hook_names + self.probes.hook_names)}
            if cfg.window is not None:  # set for the run only, so a session never leaves processors behind
                attention.set_window(cfg.window, self._window_layers)
            with self.hooks.hooks(read=read):
                self.sampler.run(self.conditioning.sampler_input, cfg.seeds, state=state,
                                 on_step=rec.end_step, progress=progress)
            self.writer.flush()
        except KeyboardInterrupt:
            status = "interrupted"
            with contextlib.suppress(Exception):
                rec.flush_pending()  # the finished steps still buffered are kept
                self.writer.flush()
        except WriterFailed as e:
            status, error = "failed", str(e)
        except BaseException as e:
            status, error = "failed", f"{type(e).__name__}: {e}"
            with contextlib.suppress(Exception):  # steps finished before the failure are kept too
                rec.flush_pending()
                self.writer.flush()
            raise
        finally:
            if cfg.window is not None:
                attention.set_window(None)
            self.writer.close()
            self._finish(group, status, error, nonfinite)
        if status == "complete":  # every step marked: nothing to read back (a zarr read costs ~10 ms)
            return CaptureResult(self.path, steps - start, steps, time.perf_counter() - t0,
                                 self.writer.bytes_written, self.hook_names, start, nonfinite_totals(nonfinite))
        info = completeness(np.asarray(group["step_complete"][...]))
        hint = how_to_continue(self._meta, self.path, self._command)
        if status == "interrupted":
            raise StoreError(f"capture interrupted: {self.path} holds steps {info['complete_steps']} "
                             f"of 0-{steps - 1}; {hint}")
        raise StoreError(f"capture failed ({error}): {self.path} holds steps {info['complete_steps']} "
                         f"of 0-{steps - 1}; fix the cause and {hint}")

    def _start_probes(self, first_step: int) -> None:
        n = len(self.cfg.seeds)
        axes = self.sampler.batch_axes(n)
        steps = self.cfg.sampler.steps
        sizes = {"step": steps, "layer": len(self.layers), "latent_step": steps + 1, **{a: k for a, k in axes}}
        c = self.conditioning
        self.probes.start(steps=steps, layers=self.layers, batch_axes=axes,
                          labels=c.labels if c.kind == "class" else c.prompts, seeds=self.cfg.seeds,
                          timesteps=self.sampler.timesteps, first_step=first_step, dim_sizes=sizes,
                          num_tokens=self.loaded.adapter.geometry.num_tokens, sample_coords=self.sample_coords)

    def _finish(self, group: Any, status: str, error: str | None = None,
                nonfinite: dict | None = None) -> None:
        from ..store.steps import nonfinite_json

        self._meta = self.store.finish(group, self._meta, status, error, nonfinite_json(nonfinite or {}))


def capture(cfg: CaptureConfig, loaded: LoadedModel | None = None, progress: Callable | None = None) -> CaptureResult:
    """Run a capture described by ``cfg`` (see :class:`CaptureConfig`)."""
    return CaptureSession(cfg, loaded).run(progress=progress)


def is_store(path: Path) -> bool:
    """A directory with a Zarr group whose attributes carry dithooks metadata."""
    try:
        import zarr

        g = zarr.open_group(str(path), mode="r")
        return ATTR_KEY in g.attrs
    except Exception:
        return False
