"""Attention internals as hook points: the bridge from the hook manager to attention processors.

``blocks.{i}.attn.{q,k,v,logits,pattern,...}`` are values that exist only inside an attention
processor. This extension installs the adapter's hooked processor (``adapter.make_processor``;
DiT: :class:`~dithooks.attention.processor.HookedAttnProcessor`) on the adapter's attention
modules (``adapter.attention_modules``) of exactly the layers that have such a hook attached (or
that are coupled or windowed), so unhooked layers keep diffusers' own fused-SDPA processor, and
puts the originals back (through :mod:`dithooks.attention.install`) when the hooks go. Which
processor names exist, their dims and docs, is the adapter's ``processor_names``. The
processor calls back with each requested name; the hook manager runs the attached functions,
and an intervention's return value replaces the tensor.
"""

from __future__ import annotations

import numbers
from typing import Any, Sequence

from .attention.install import install_processors, restore_processors
from .errors import DithooksError
from .hookpoints import block_name, split_name


_UNSET = object()  # configure(): an option not given keeps its value


class AttentionHooks:
    """Hook-manager extension owning ``processor`` hook points, replica coupling and windows.

    ``coupling`` (g) and ``window`` (Chebyshev radius r) apply to ``layers`` (None = every block);
    change them with :meth:`set_coupling` / :meth:`set_window` (the sampler does, between steps)
    and the processor options with :meth:`configure`, all validated.
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
        self._processors: dict[int, Any] = {}  # layer -> the adapter's hooked processor
        self._saved: dict[str, Any] = {}
        self._manager = manager

    # -- settings ------------------------------------------------------------------------------
    def configure(self, *, query_tile: Any = _UNSET, query_tokens: Any = _UNSET, top_k: Any = _UNSET,
                  num_tokens: int | None = None) -> None:
        """Set the processor options given (validated; one-line :class:`DithooksError` on bad
        input); options not given keep their value, ``None`` clears ``query_tokens``/``top_k``.

        ``num_tokens`` (default: the adapter's geometry) bounds ``query_tokens`` and ``top_k``.
        Installed processors are rebuilt with the new options."""
        if num_tokens is None and self._manager is not None:
            try:
                num_tokens = self._manager.adapter.geometry.num_tokens
            except NotImplementedError:
                num_tokens = None
        tile, k, queries = self.query_tile, self.top_k, self.query_tokens
        if query_tile is not _UNSET:
            if isinstance(query_tile, bool) or not isinstance(query_tile, numbers.Integral) or query_tile < 1:
                raise DithooksError(f"query tile must be at least 1, got {query_tile}")
            tile = int(query_tile)
        if top_k is not _UNSET:
            if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, numbers.Integral) or top_k < 1
                                      or (num_tokens is not None and top_k > num_tokens)):
                top = f"1-{num_tokens}" if num_tokens is not None else ">= 1"
                raise DithooksError(f"top-k must lie in {top} (the number of tokens), got {top_k}")
            k = None if top_k is None else int(top_k)
        if query_tokens is not _UNSET:
            bad = [q for q in (query_tokens or ()) if isinstance(q, bool) or not isinstance(q, numbers.Integral)
                   or q < 0 or (num_tokens is not None and q >= num_tokens)]
            if bad:
                top = f"0-{num_tokens - 1}" if num_tokens is not None else ">= 0"
                raise DithooksError(f"query token {bad[0]} is out of range: this model has tokens {top}")
            queries = [int(q) for q in query_tokens] if query_tokens else None
        self.query_tile, self.top_k, self.query_tokens = tile, k, queries  # all or nothing
        if self._manager is not None:  # rebuild installed processors with the new options
            for layer in list(self._processors):
                self._uninstall(self._manager, layer)
            self.sync(self._manager)

    def _layers(self, layers: Sequence[int] | None, what: str) -> set[int] | None:
        if layers is None:
            return None
        out = set()
        n = self._manager.adapter.num_layers if self._manager is not None else None
        for i in layers:
            if isinstance(i, bool) or not isinstance(i, numbers.Integral) or i < 0 or (n is not None and i >= n):
                top = f"0-{n - 1}" if n is not None else ">= 0"
                raise DithooksError(f"{what} layer {i!r} is out of range: this model has blocks {top}")
            out.add(int(i))
        return out

    def set_coupling(self, g: float | None, layers: Sequence[int] | None = None) -> None:
        """Couple replica halves of the batch with strength g (None = uncoupled)."""
        self.coupling, self.coupling_layers = g, self._layers(layers, "coupled")
        if self._manager is not None:
            self.sync(self._manager)

    def set_window(self, radius: int | None, layers: Sequence[int] | None = None) -> None:
        """Restrict attention to a Chebyshev window of ``radius`` tokens (None = global)."""
        self.window, self.window_layers = radius, self._layers(layers, "windowed")
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
        adapter = manager.adapter
        n = adapter.num_layers
        wanted: dict[int, set[str]] = {}
        for h in manager.attached():
            p = adapter.point(h.name)
            if p.kind == "processor":
                wanted.setdefault(p.layer, set()).add(split_name(h.name)[1])
        for layer in range(n):
            g, r = self.layer_settings(layer)
            names = frozenset(wanted.get(layer, ()))
            if not names and g is None and r is None:
                self._uninstall(manager, layer)
                continue
            proc = self._processors.get(layer)
            if proc is None:
                try:
                    proc = adapter.make_processor(layer, self._emitter(manager, layer), coupling=g, window=r,
                                                  query_tile=self.query_tile, query_tokens=self.query_tokens,
                                                  top_k=self.top_k)
                except ValueError as e:
                    raise DithooksError(f"block {layer}: {e}") from None
                self._saved.update(install_processors(adapter, [layer], lambda _layer, p=proc: p))
                self._processors[layer] = proc
            try:
                proc.wanted, proc.g, proc.window = names, g, r
            except ValueError as e:  # e.g. top-k without k: the user's request, not a bug
                raise DithooksError(f"block {layer}: {e}") from None

    def _uninstall(self, manager, layer: int) -> None:
        if self._processors.pop(layer, None) is None:
            return
        paths = manager.adapter.attention_modules(layer)
        restore_processors(manager.model, {p: self._saved.pop(p) for p in paths if p in self._saved})

    def processor(self, layer: int):
        """The hooked processor installed on block ``layer`` now, or None."""
        return self._processors.get(layer)

    @staticmethod
    def _emitter(manager, layer: int):
        def emit(local: str, value):
            point = manager.adapter.point(block_name(layer, local))
            new, _ = manager.run_hooks(point, value)
            return new
        return emit
