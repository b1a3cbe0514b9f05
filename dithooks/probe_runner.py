"""Running probes inside a capture: route hooked values to them, store what they return.

Part of the core (the probes themselves, in ``probes/``, use only :mod:`dithooks.probe_api`).
The capture session owns one :class:`ProbeRunner`. It attaches read hooks for
:attr:`ProbeRunner.hook_names` (the union of the probes' needs), forwards each value with
:meth:`ProbeRunner.observe`, and after every step calls :meth:`ProbeRunner.emit_step` *before*
it marks the step complete, so ``step_complete`` covers probe outputs too.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch

from .errors import DithooksError, HookNameError
from .hooks import HookContext
from .probe_api import Output, Probe, ProbeError, RunInfo, make_probe
from .store.layout import probe_array_name, probe_attrs
from .store.writer import ArraySpec

Put = Callable[[ArraySpec, Any, torch.Tensor], None]


def _failed(probe: Probe, where: str, e: BaseException) -> ProbeError:
    text = " ".join(str(e).split()) or "(no message)"
    return ProbeError(f"probe {probe.label()} raised in {where}: {type(e).__name__}: {text}")


def _guarded(probe: Probe, where: str, fn: Callable, *args: Any) -> Any:
    """Call a probe's own code; its errors become one-line :class:`ProbeError` naming the probe."""
    try:
        return fn(*args)
    except DithooksError:
        raise
    except Exception as e:
        raise _failed(probe, where, e) from e


class ProbeRunner:
    """The probes of one capture: their hook points, their state, their stored outputs."""

    def __init__(self, specs: Sequence[Any], resolve: Callable[[Sequence[str]], list[str]]):
        """``specs``: probes, names, import paths or ``(name, options)``; ``resolve`` expands
        hook patterns to hook point names (capture's ``--hooks`` rules)."""
        self.probes: list[Probe] = [make_probe(s) for s in specs]
        labels = [p.label() for p in self.probes]
        twice = sorted({x for x in labels if labels.count(x) > 1})
        if twice:
            raise ProbeError(f"probe {twice[0]!r} is given twice: its outputs would share arrays")
        self.hooks_of: dict[str, tuple[str, ...]] = {}
        self._listeners: dict[str, list[Probe]] = {}
        for p in self.probes:
            wanted = _guarded(p, "hook_points", p.hook_points)
            try:
                names = tuple(resolve(list(wanted)))
            except HookNameError as e:
                raise HookNameError(f"probe {p.label()}: {e}") from None
            self.hooks_of[p.label()] = names
            for n in names:
                self._listeners.setdefault(n, []).append(p)
        self._specs: dict[str, ArraySpec] = {}
        self._dims: dict[str, int] = {}
        self._steps = 0
        self._sample_coords: tuple[str, ...] = ("label", "seed")

    def __bool__(self) -> bool:
        return bool(self.probes)

    @property
    def hook_names(self) -> list[str]:
        """Every hook point some probe reads, in first-use order."""
        return list(self._listeners)

    def describe(self) -> list[dict[str, Any]]:
        """Metadata ``attrs['dithooks']['probes']``: name, class, options, hooks, resumable."""
        return [{**p.describe(), "hooks": list(self.hooks_of[p.label()])} for p in self.probes]

    def not_resumable(self) -> list[str]:
        return [p.label() for p in self.probes if not p.resumable]

    # -- during the run -----------------------------------------------------------------------
    def start(self, *, steps: int, layers: Sequence[int], batch_axes, labels, seeds, timesteps,
              first_step: int, dim_sizes: dict[str, int], num_tokens: int | None = None,
              sample_coords: Sequence[str] = ("label", "seed")) -> None:
        """Reset every probe; ``dim_sizes``: sizes of the store's coordinate dims (step, layer, ...);
        ``sample_coords``: the store's coordinates along ``sample`` (``prompt`` for text models).
        ``labels``: each sample's class, or its prompt row for text-conditioned models."""
        self._steps = steps
        self._sample_coords = tuple(sample_coords)
        self._dims = dict(dim_sizes)
        self._specs = {}
        for p in self.probes:
            _guarded(p, "start", p.start, RunInfo(steps=steps, layers=tuple(layers), batch_axes=tuple(tuple(a) for a in batch_axes),
                            labels=tuple(labels), seeds=tuple(seeds), timesteps=tuple(timesteps),
                            hook_names=self.hooks_of[p.label()], first_step=first_step,
                            num_tokens=num_tokens))

    def observe(self, value: torch.Tensor, ctx: HookContext) -> None:
        for p in self._listeners.get(ctx.name, ()):
            try:
                p.observe(ctx.name, value, ctx)
            except DithooksError:
                raise
            except Exception as e:
                raise _failed(p, f"observe ({ctx.name}, step {ctx.step})", e) from e

    def emit_step(self, step: int, put: Put, other_dims: dict[str, int] | None = None) -> None:
        """Queue every probe's outputs of ``step`` as ``array[step]``."""
        for p in self.probes:
            for out_name, out in (_guarded(p, f"end_step (step {step})", p.end_step, step) or {}).items():
                t = _guarded(p, f"end_step (step {step}), output {out_name!r}", out.tensor)
                spec = self._spec(p, out_name, out, t, per_step=True, other_dims=other_dims)
                put(spec, (step,), t)

    def emit_finish(self, put: Put, other_dims: dict[str, int] | None = None) -> None:
        """Queue every probe's once-only outputs (after the last step)."""
        for p in self.probes:
            for out_name, out in (_guarded(p, "finish", p.finish) or {}).items():
                t = _guarded(p, f"finish, output {out_name!r}", out.tensor)
                put(self._spec(p, out_name, out, t, per_step=False, other_dims=other_dims), Ellipsis, t)

    # -- arrays -------------------------------------------------------------------------------
    def _spec(self, probe: Probe, out_name: str, out: Output, t: torch.Tensor, *, per_step: bool,
              other_dims: dict[str, int] | None) -> ArraySpec:
        name = probe_array_name(probe.label(), out_name)
        dims = tuple(out.dims)
        where = f"probe {probe.label()} output {out_name!r}"
        if len(dims) != t.dim():
            raise ProbeError(f"{where} has {t.dim()} dims but names {len(dims)}: {dims}")
        if "step" in dims:
            raise ProbeError(f"{where}: leave 'step' out of the dims (it is added for per-step outputs)")
        if "layer" in dims and dims.index("layer") != 0:
            raise ProbeError(f"{where}: 'layer' must be the first dim")
        lead = ("step",) if per_step else ()
        shape = ((self._steps,) if per_step else ()) + tuple(t.shape)
        spec = self._specs.get(name)
        if spec is not None:
            if spec.shape != shape or spec.dims != lead + dims:
                raise ProbeError(f"{where} changed shape: {spec.shape[1:]} before, {tuple(t.shape)} now")
            return spec
        # a dim name means one size store-wide, or xarray cannot open the store
        known = {**(other_dims or {}), **self._dims}
        for d, n in zip(dims, t.shape):
            if known.get(d, n) != n:
                raise ProbeError(f"{where}: dim {d!r} has size {n}, but the store's {d!r} has size {known[d]} "
                                 "(rename the dim)")
            self._dims[d] = n
        all_dims = lead + dims
        attrs = probe_attrs(all_dims, probe.label(), out.description, self._sample_coords)
        if per_step:
            chunks = (1,) + tuple(t.shape)
        else:  # one chunk per layer (mode maps can be large), else one chunk
            chunks = ((1,) + tuple(t.shape[1:])) if dims[:1] == ("layer",) else tuple(t.shape)
        chunks = tuple(max(1, c) for c in chunks)
        spec = ArraySpec(name, all_dims, shape, chunks, t.dtype, attrs)
        self._specs[name] = spec
        return spec
