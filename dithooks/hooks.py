"""The hook manager: attach functions to named hook points, list them, remove them.

Reading is passive: a read hook gets the live value and must return ``None`` (it must not
modify the tensor in place either; copy what you keep). Changing the model is explicit: an
intervention returns the replacement value. Everything attached is removed on ``remove_all()``
or when a ``with`` block exits, even on error.

    hm = HookManager(model)
    with hm.hooks(read={"blocks.*.resid_post": lambda v, ctx: seen.append(v.norm())}):
        model(x, timestep=t, class_labels=y)
"""

from __future__ import annotations

import contextlib
import functools
import itertools
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping, Protocol, runtime_checkable

import torch
from torch import nn

from .adapters import ModelAdapter, adapter_for
from .adapters.spec import plain_output
from .errors import DithooksError
from .hookpoints import HookPoint


@dataclass
class SamplingState:
    """Where the sampler is; hook functions see it through :class:`HookContext`.

    ``batch_axes`` says how the model's batch dimension is laid out, outermost first, e.g.
    ``(("cfg", 2), ("sample", 4))`` with guidance: rows 0-3 are the conditional branch.
    """

    step: int | None = None
    timestep: float | None = None
    batch_axes: tuple[tuple[str, int], ...] = ()
    extras: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class HookContext:
    """What a hook function knows besides the value: where in the model and the run it is.

    ``info`` carries what an extension used to compute a value it made (for ``jvp`` points:
    ``g`` and ``window`` of the JVP, ``attention`` = the block's live ``{g, window}``; on DiT
    blocks also ``linearise(point, direction, parts)`` and ``out_proj(z)``, see
    :mod:`dithooks.jvp_hooks`).
    """

    name: str
    layer: int | None
    step: int | None
    timestep: float | None
    batch_axes: tuple[tuple[str, int], ...]
    point: HookPoint
    info: Mapping[str, Any] = field(default_factory=dict)


HookFn = Callable[[torch.Tensor, HookContext], Any]


@runtime_checkable
class BindableReader(Protocol):
    """A read function that can also be *bound* to one hook point: ``bind(point, context)``
    returns a function of the value alone, and ``context()`` gives the :class:`HookContext` of
    the call in progress when the bound function needs it (rarely: the capture's recorder needs
    it only when it plans a point). The manager binds, once per point whenever what is attached
    changes, a reader that is the only function on its module's points, and then calls the bound
    function per value: no context is built or checked per call, which is most of the
    dispatcher's cost on small models (docs/benchmarks.md run (k)). Anywhere else the reader is
    called as an ordinary read function, ``reader(value, ctx)``."""

    def __call__(self, value: torch.Tensor, ctx: HookContext) -> Any: ...

    def bind(self, point: HookPoint, context: Callable[[], HookContext]) -> Callable[[torch.Tensor], Any]: ...


def _attention_extension():
    from .attention_hooks import AttentionHooks
    return AttentionHooks


def _jvp_extension():
    from .jvp_hooks import JVPHooks
    return JVPHooks


#: hook-point kind -> (extension name, factory returning the class built as cls(manager)); a
#: manager builds the extensions whose kinds its adapter's points use
EXTENSION_TYPES: dict[str, tuple[str, Callable[[], Any]]] = {
    "processor": ("attention", _attention_extension),
    "jvp": ("jvp", _jvp_extension),
}


def register_extension_type(kind: str, name: str, factory: Callable[[], Any]) -> None:
    """Make managers build ``factory()(manager)`` as extension ``name`` for points of ``kind``."""
    EXTENSION_TYPES[kind] = (name, factory)


@dataclass(frozen=True)
class AttachedHook:
    id: int
    name: str
    mode: str  # "read" or "replace"
    fn: HookFn

    def describe(self) -> str:
        fn_name = getattr(self.fn, "__qualname__", repr(self.fn))
        return f"#{self.id} {self.mode:<7} {self.name}  <- {fn_name}"


class _Dispatch:
    """What one module's torch hook does now; :meth:`HookManager._sync` keeps it current.

    ``reads``: when every function attached to the module's points only reads and no replaced
    value is carried into the module (the capture case), one entry per point - ``(point, its
    reader (None: the output itself), its hooks, [cached context])`` - run by
    :meth:`HookManager._run_reads` without the
    general path's per-call work; None otherwise (the general path).

    ``direct``: when, besides, the module has one point with one function attached and that
    function is a :class:`BindableReader`, ``(point's reader or None, bound function, hook)``:
    the bound function is called with the value alone; None otherwise."""

    __slots__ = ("reads", "direct")

    def __init__(self) -> None:
        self.reads: tuple | None = None
        self.direct: tuple | None = None


class HookManager:
    """Attaches user functions to an adapter's named hook points on one model."""

    # False: bindable readers are called as ordinary read functions (for benchmarks and tests)
    bind_readers = True

    def __init__(self, model: nn.Module, adapter: ModelAdapter | None = None):
        self.model = model
        self.adapter = adapter if adapter is not None else adapter_for(model)
        self.state = SamplingState()
        self._hooks: dict[int, AttachedHook] = {}
        self._ids = itertools.count(1)
        # (module path, kind) -> torch handle; one dispatcher per module and kind
        self._torch_handles: dict[tuple[str, str], Any] = {}
        self._dispatch: dict[tuple[str, str], _Dispatch] = {}  # same keys: what each dispatcher does
        # (module path, tuple item or None) -> pending (new - old) to add to that module's output
        # (see HookPoint.carry_to / carry_item)
        self._carry: dict[tuple[str, int | None], torch.Tensor] = {}
        # extensions (attention processors, JVPs) register here: kind -> object with sync(manager)
        self._extensions: dict[str, Any] = {}
        self._named: dict[str, Any] = {}  # extension name ("attention", "jvp") -> object
        self._by_name: dict[str, list[AttachedHook]] = {}
        self._by_module: dict[tuple[str, str], list[HookPoint]] = {}
        self._suspended = 0
        kinds = {p.kind for p in self.adapter.hook_points().values()}
        for kind, (name, factory) in EXTENSION_TYPES.items():
            if kind in kinds:
                self.register_extension(kind, factory()(self), name=name)

    # -- public API --------------------------------------------------------------------------
    def hook_points(self) -> dict[str, HookPoint]:
        return self.adapter.hook_points()

    def add_hook(self, names: str | list[str], fn: HookFn) -> list[AttachedHook]:
        """Read ``names`` (exact names or globs) with ``fn(value, ctx)``; ``fn`` must return None."""
        return self._add(names, fn, "read")

    def add_intervention(self, names: str | list[str], fn: HookFn) -> list[AttachedHook]:
        """Replace ``names`` with ``fn(value, ctx)`` (returning None keeps the value)."""
        return self._add(names, fn, "replace")

    def remove(self, hooks: AttachedHook | list[AttachedHook]) -> None:
        for h in [hooks] if isinstance(hooks, AttachedHook) else hooks:
            self._hooks.pop(h.id, None)
        self._sync()

    def remove_all(self) -> None:
        self._hooks.clear()
        self._sync()

    def attached(self) -> list[AttachedHook]:
        """What is attached now, in attachment order."""
        return list(self._hooks.values())

    def describe(self) -> str:
        rows = [h.describe() for h in self.attached()]
        return "\n".join(rows) if rows else "(no hooks attached)"

    @contextlib.contextmanager
    def hooks(self, read: dict[str, HookFn] | None = None,
              replace: dict[str, HookFn] | None = None) -> Iterator["HookManager"]:
        """Attach for the duration of a ``with`` block; removes exactly what it added."""
        added: list[AttachedHook] = []
        try:
            # everything attached first and the torch hooks made to match once (attaching N
            # points one by one re-synced N times)
            added = self._add_many([(name, fn, "read") for name, fn in (read or {}).items()]
                                   + [(name, fn, "replace") for name, fn in (replace or {}).items()])
            yield self
        finally:
            self.remove(added)

    def __enter__(self) -> "HookManager":
        return self

    def __exit__(self, *exc) -> None:
        self.remove_all()

    def register_extension(self, kind: str, extension: Any, name: str | None = None) -> None:
        """Let a component own hook points of ``kind`` (e.g. ``processor``, ``jvp``); ``name`` makes
        it reachable through :meth:`extension` (default: the kind)."""
        self._extensions[kind] = extension
        self._named[name or kind] = extension

    def extension(self, name: str, required: bool = False) -> Any:
        """The extension called ``name`` (``"attention"``, ``"jvp"``), or None when this model has
        none; ``required=True`` raises a one-line :class:`DithooksError` instead of returning None."""
        ext = self._named.get(name)
        if ext is None and required:
            what = {"attention": "attention processors (coupling, windows, attention internals)",
                    "jvp": "JVP hook points (blocks.{i}.jvp.*)"}.get(name, f"the {name!r} extension")
            raise DithooksError(f"{type(self.model).__name__} ({self.adapter.family}) has no {what}")
        return ext

    @contextlib.contextmanager
    def suspended(self) -> Iterator[None]:
        """Within the block, no attached function runs and every hook passes values through
        (for extensions that call a block again, e.g. a JVP through the block's own modules)."""
        self._suspended += 1
        try:
            yield
        finally:
            self._suspended -= 1

    # -- internals ---------------------------------------------------------------------------
    def _add(self, names: str | list[str], fn: HookFn, mode: str) -> list[AttachedHook]:
        return self._add_many([(names, fn, mode)])

    def _add_many(self, requests: list[tuple[str | list[str], HookFn, str]]) -> list[AttachedHook]:
        """Attach every ``(names, fn, mode)`` request, then sync the torch hooks once; a request
        that fails leaves nothing of the call attached."""
        added: list[AttachedHook] = []
        try:
            for names, fn, mode in requests:
                if not callable(fn):
                    raise DithooksError(f"hook function for {names!r} is not callable")
                resolved = self.adapter.resolve([names] if isinstance(names, str) else list(names))
                for name in resolved:
                    point = self.adapter.point(name)
                    if mode == "replace" and not point.writable:
                        raise DithooksError(f"hook point {name!r} is read-only")
                    if point.kind not in ("pre", "post") and point.kind not in self._extensions:
                        raise DithooksError(f"hook point {name!r} needs the {point.kind!r} extension, "
                                            "which is not enabled on this manager")
                    h = AttachedHook(next(self._ids), name, mode, fn)
                    self._hooks[h.id] = h
                    added.append(h)
            if added:
                self._sync()
        except Exception:  # a request the model cannot serve leaves nothing half-attached
            if added:
                for h in added:
                    self._hooks.pop(h.id, None)
                self._sync()
            raise
        return added

    def _points_by_module(self) -> dict[tuple[str, str], list[HookPoint]]:
        groups: dict[tuple[str, str], list[HookPoint]] = {}
        for h in self._hooks.values():
            p = self.adapter.point(h.name)
            if p.kind not in ("pre", "post"):
                continue
            key = (p.module_path, p.kind)
            if p not in groups.setdefault(key, []):
                groups[key].append(p)
            if h.mode == "replace" and p.carry_to is not None:
                groups.setdefault((p.carry_to, "post"), [])
        return groups

    def _sync(self) -> None:
        """Make the torch hooks match what is attached: one dispatcher per module and kind."""
        wanted = self._points_by_module()
        for key in list(self._torch_handles):
            if key not in wanted:
                self._torch_handles.pop(key).remove()
                self._dispatch.pop(key, None)
        for key in wanted:
            if key in self._torch_handles:
                continue
            path, kind = key
            module = self.model.get_submodule(path)
            slot = self._dispatch[key] = _Dispatch()
            if kind == "pre":
                handle = module.register_forward_pre_hook(self._make_pre(path, slot), with_kwargs=True)
            else:
                handle = module.register_forward_hook(self._make_post(path, slot), with_kwargs=True)
            self._torch_handles[key] = handle
        self._by_name = {}
        for h in self._hooks.values():
            self._by_name.setdefault(h.name, []).append(h)
        self._by_module = {key: pts for key, pts in wanted.items()}
        self._plan_dispatch(wanted)
        for ext in self._extensions.values():
            ext.sync(self)
        if not self._hooks:
            self._carry.clear()

    def _plan_dispatch(self, wanted: dict[tuple[str, str], list[HookPoint]]) -> None:
        """Give each dispatcher its read-only plan where one applies (see :class:`_Dispatch`)."""
        carried = set()
        for h in self._hooks.values():
            if h.mode == "replace":
                p = self.adapter.point(h.name)
                if p.carry_to is not None:
                    carried.add(p.carry_to)
        for key, slot in self._dispatch.items():
            entries = [(p, self._by_name.get(p.name, [])) for p in wanted.get(key, [])]
            slot.direct = None
            if key[0] in carried or any(h.mode != "read" for _, hs in entries for h in hs):
                slot.reads = None
            else:
                # reader None: the value is the module's output itself (no call needed)
                slot.reads = tuple((p, None if p.read is plain_output else p.read, tuple(hs), [None])
                                   for p, hs in entries)
                if (self.bind_readers and not carried and len(entries) == 1 and len(entries[0][1]) == 1
                        and isinstance(entries[0][1][0].fn, BindableReader)):
                    point, (h,) = entries[0]
                    bound = h.fn.bind(point, functools.partial(self.context, point))
                    slot.direct = (slot.reads[0][1], bound, h)

    def hooks_for(self, name: str) -> list[AttachedHook]:
        return self._by_name.get(name, [])

    def context(self, point: HookPoint, batch_axes: tuple[tuple[str, int], ...] | None = None,
                info: Mapping[str, Any] | None = None) -> HookContext:
        s = self.state
        axes = s.batch_axes if batch_axes is None else batch_axes
        return HookContext(point.name, point.layer, s.step, s.timestep, axes, point, info or {})

    def run_hooks(self, point: HookPoint, value: torch.Tensor,
                  batch_axes: tuple[tuple[str, int], ...] | None = None,
                  info: Mapping[str, Any] | None = None) -> tuple[torch.Tensor, bool]:
        """Call the functions attached to ``point``; return (value to use, whether it changed).

        ``batch_axes`` overrides the sampler's layout for values whose batch differs from the
        model's (a replica-difference JVP has no ``replica`` axis); ``info`` becomes ``ctx.info``."""
        if self._suspended:
            return value, False
        ctx = self.context(point, batch_axes, info)
        changed = False
        for h in self.hooks_for(point.name):
            out = h.fn(value, ctx)
            if h.mode == "read":
                if out is not None:
                    raise self._passive_error(h)
                continue
            if out is None:
                continue
            if not isinstance(out, torch.Tensor) or out.shape != value.shape:
                got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
                raise DithooksError(f"intervention on {point.name} returned {got}, "
                                    f"expected a tensor of shape {tuple(value.shape)}")
            value, changed = out.to(value.dtype), True
        return value, changed

    def _points_on(self, path: str, kind: str) -> list[HookPoint]:
        return self._by_module.get((path, kind), [])

    def _passive_error(self, h: AttachedHook) -> DithooksError:
        return DithooksError(f"read hook {h.describe()} returned a value; reading is passive - "
                             "use add_intervention() to replace a value")

    def _run_reads(self, reads: tuple, args: tuple, kwargs: dict, output: Any) -> None:
        """The read-only path (:class:`_Dispatch`): read each point, call its functions with a
        context made once per point and step (its fields are those of :meth:`context`)."""
        s = self.state
        step, timestep, axes = s.step, s.timestep, s.batch_axes
        for point, read, hooks, cache in reads:
            ctx = cache[0]
            if ctx is None or ctx.step != step or ctx.timestep != timestep or ctx.batch_axes != axes:
                ctx = cache[0] = HookContext(point.name, point.layer, step, timestep, axes, point, {})
            value = output if read is None else read(args, kwargs, output)
            for h in hooks:
                if h.fn(value, ctx) is not None:
                    raise self._passive_error(h)

    def _make_pre(self, path: str, slot: _Dispatch):
        run_reads = self._run_reads

        def pre_hook(module, args, kwargs):
            if self._suspended:
                return None
            direct = slot.direct
            if direct is not None:
                read, fn, h = direct
                if fn(None if read is None else read(args, kwargs, None)) is not None:
                    raise self._passive_error(h)
                return None
            reads = slot.reads
            if reads is not None:
                run_reads(reads, args, kwargs, None)
                return None
            changed_any = False
            for point in self._points_on(path, "pre"):
                old = point.read(args, kwargs, None)
                new, changed = self.run_hooks(point, old)
                if changed:
                    args, kwargs = point.write(args, kwargs, None, new)
                    changed_any = True
                    if point.carry_to is not None:
                        key = (point.carry_to, point.carry_item)
                        self._carry[key] = self._carry.get(key, 0) + (new - old)
            return (args, kwargs) if changed_any else None
        return pre_hook

    def _make_post(self, path: str, slot: _Dispatch):
        run_reads = self._run_reads

        def post_hook(module, args, kwargs, output):
            if self._suspended:
                return None
            direct = slot.direct
            if direct is not None and not self._carry:
                read, fn, h = direct
                if fn(output if read is None else read(args, kwargs, output)) is not None:
                    raise self._passive_error(h)
                return None
            reads = slot.reads
            if reads is not None and not self._carry:
                run_reads(reads, args, kwargs, output)
                return None
            changed_any = False
            for key in [k for k in self._carry if k[0] == path]:
                # a value this module re-used internally was replaced: bring its output in line
                delta = self._carry.pop(key)
                if key[1] is None:
                    output = output + delta
                else:
                    output = list(output)
                    output[key[1]] = output[key[1]] + delta
                    output = tuple(output)
                changed_any = True
            for point in self._points_on(path, "post"):
                value = point.read(args, kwargs, output)
                new, changed = self.run_hooks(point, value)
                if changed:
                    output = point.write(args, kwargs, output, new)
                    changed_any = True
            return output if changed_any else None
        return post_hook
