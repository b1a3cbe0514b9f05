"""Attention internals as hook points: the bridge from the hook manager to attention processors.

``blocks.{i}.attn.{q,k,v,logits,pattern,...}`` are values that exist only inside an attention
processor. This extension installs :class:`~dithooks.attention.processor.HookedAttnProcessor`
on exactly the layers that have such a hook attached (or that are coupled or windowed), so
unhooked layers keep diffusers' own fused-SDPA processor, and puts the originals back when the
hooks go. The processor calls back with each requested name; the hook manager runs the
attached functions, and an intervention's return value replaces the tensor.
"""

from __future__ import annotations

from typing import Any, Sequence

from .attention.install import attention_modules
from .attention.processor import ALL_NAMES, NAME_DIMS, NAME_DOCS, WRITABLE_NAMES, HookedAttnProcessor
from .errors import DithooksError
from .hookpoints import HookPoint


def _no_write(*_):  # processor points are written by the processor itself (see emit)
    raise AssertionError("processor hook points are replaced inside the processor")


def attention_points(layer: int, module_path: str) -> dict[str, HookPoint]:
    """The processor hook points of block ``layer``."""
    pts = {}
    for local in sorted(ALL_NAMES):
        name = f"blocks.{layer}.{local}"
        pts[name] = HookPoint(name, "blocks.{i}." + local, module_path, "processor", NAME_DIMS[local],
                              NAME_DOCS[local], layer, write=_no_write if local in WRITABLE_NAMES else None)
    return pts


class AttentionHooks:
    """Hook-manager extension owning ``processor`` hook points, replica coupling and windows.

    ``coupling`` (g) and ``window`` (Chebyshev radius r) apply to ``layers`` (None = every block)
    and are plain attributes the sampler may change between steps via :meth:`set_coupling`.
    """

    def __init__(self, manager=None, query_tile: int = 512, query_tokens: Sequence[int] | None = None,
                 top_k: int | None = None):
        self.query_tile = query_tile
        self.query_tokens = query_tokens
        self.top_k = top_k
        self.coupling: float | None = None
        self.coupling_layers: set[int] | None = None
        self.window: int | None = None
        self.window_layers: set[int] | None = None
        self._processors: dict[int, HookedAttnProcessor] = {}
        self._saved: dict[str, Any] = {}
        self._manager = manager

    # -- settings ------------------------------------------------------------------------------
    def set_coupling(self, g: float | None, layers: Sequence[int] | None = None) -> None:
        """Couple replica halves of the batch with strength g (None = uncoupled)."""
        self.coupling, self.coupling_layers = g, None if layers is None else set(layers)
        if self._manager is not None:
            self.sync(self._manager)

    def set_window(self, radius: int | None, layers: Sequence[int] | None = None) -> None:
        """Restrict attention to a Chebyshev window of ``radius`` tokens (None = global)."""
        self.window, self.window_layers = radius, None if layers is None else set(layers)
        if self._manager is not None:
            self.sync(self._manager)

    def _applies(self, layer: int, value, layers: set[int] | None) -> bool:
        return value is not None and (layers is None or layer in layers)

    def layer_settings(self, layer: int) -> tuple[float | None, int | None]:
        """(coupling g, window radius) that block ``layer`` runs with now; None where unset."""
        g = self.coupling if self._applies(layer, self.coupling, self.coupling_layers) else None
        r = self.window if self._applies(layer, self.window, self.window_layers) else None
        return g, r

    # -- the extension protocol ------------------------------------------------------------------
    def sync(self, manager) -> None:
        self._manager = manager
        n = manager.adapter.num_layers
        wanted: dict[int, set[str]] = {}
        for h in manager.attached():
            p = manager.adapter.point(h.name)
            if p.kind == "processor":
                wanted.setdefault(p.layer, set()).add(h.name.split(".", 2)[2])
        for layer in range(n):
            g, r = self.layer_settings(layer)
            names = frozenset(wanted.get(layer, ()))
            if not names and g is None and r is None:
                self._uninstall(manager, layer)
                continue
            proc = self._processors.get(layer)
            if proc is None:
                proc = HookedAttnProcessor(layer, emit=self._emitter(manager, layer), wanted=frozenset(),
                                           coupling=g, window=r, query_tile=self.query_tile,
                                           query_tokens=self.query_tokens, top_k=self.top_k)
                for path, module in attention_modules(manager.model, layer).items():
                    self._saved.setdefault(path, module.processor)
                    module.set_processor(proc)
                self._processors[layer] = proc
            try:
                proc.wanted, proc.g, proc.window = names, g, r
            except ValueError as e:  # e.g. top-k without k: the user's request, not a bug
                raise DithooksError(f"block {layer}: {e}") from None

    def _uninstall(self, manager, layer: int) -> None:
        if self._processors.pop(layer, None) is None:
            return
        for path in attention_modules(manager.model, layer):
            if path in self._saved:
                manager.model.get_submodule(path).set_processor(self._saved.pop(path))

    @staticmethod
    def _emitter(manager, layer: int):
        def emit(local: str, value):
            point = manager.adapter.point(f"blocks.{layer}.{local}")
            new, _ = manager.run_hooks(point, value)
            return new
        return emit
