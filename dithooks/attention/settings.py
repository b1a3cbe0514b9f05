"""The settings every hooked attention processor shares, validated in one place.

A hooked processor (DiT's :class:`~dithooks.attention.processor.HookedAttnProcessor`, the joint
core :class:`~dithooks.attention.joint_processor.JointAttention` of SD3/Flux) holds

* ``wanted`` - the local names to compute and emit (a subset of the class's :attr:`known_names`);
  ``attn.pattern_query`` needs ``query_tokens`` and ``attn.topk_idx``/``attn.topk_val`` need
  ``top_k``;
* ``g`` - replica coupling (``None`` = uncoupled), checked by :func:`dithooks.gates.validate_coupling`;
* ``window`` - a Chebyshev radius (``None`` = global), checked by
  :func:`dithooks.attention.window.validate_radius`; setting it drops cached masks;
* ``query_tile``, ``query_tokens``, ``top_k`` - fixed at construction;

and emits writable values the same way (:meth:`ProcessorSettings._emit_writable`: a replacement
of another shape is refused).

The hook manager and the sampler change ``wanted``/``g``/``window`` between calls through these
validating setters; a bad value is a ``ValueError`` (the attention extension turns it into a
one-line :class:`~dithooks.errors.DithooksError`).
"""

from __future__ import annotations

from typing import Sequence

import torch

from ..gates import validate_coupling
from .window import validate_radius

#: names that need ``query_tokens`` / ``top_k``
QUERY_NAMES = frozenset({"attn.pattern_query"})
TOPK_NAMES = frozenset({"attn.topk_idx", "attn.topk_val"})


class ProcessorSettings:
    """Validated ``wanted``/``g``/``window`` plus ``query_tile``/``query_tokens``/``top_k``.

    Subclasses set :attr:`known_names` and call :meth:`_init_settings` from ``__init__``."""

    #: the local names this processor can emit
    known_names: frozenset[str] = frozenset()
    #: how unknown names are described in the error ("attention", "joint-attention")
    names_kind: str = "attention"

    def _init_settings(self, wanted=frozenset(), coupling: float | None = None, window: int | None = None,
                       query_tile: int = 512, query_tokens: Sequence[int] | None = None,
                       top_k: int | None = None) -> None:
        self.query_tokens = None if query_tokens is None else tuple(int(i) for i in query_tokens)
        self.top_k = None if top_k is None else int(top_k)
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        if int(query_tile) < 1:
            raise ValueError(f"query_tile must be >= 1, got {query_tile}")
        self.query_tile = int(query_tile)
        self.wanted = wanted
        self.g = coupling
        self.window = window

    @property
    def wanted(self) -> frozenset[str]:
        return self._wanted

    @wanted.setter
    def wanted(self, names) -> None:
        names = frozenset(names)
        unknown = names - self.known_names
        if unknown:
            raise ValueError(f"unknown {self.names_kind} names {sorted(unknown)}; known: {sorted(self.known_names)}")
        if names & QUERY_NAMES and not self.query_tokens:
            raise ValueError("attn.pattern_query needs query_tokens")
        if names & TOPK_NAMES and self.top_k is None:
            raise ValueError("attn.topk_idx / attn.topk_val need top_k")
        self._wanted = names

    @property
    def g(self) -> float | None:
        return self._g

    @g.setter
    def g(self, value: float | None) -> None:
        self._g = None if value is None else validate_coupling(value)

    @property
    def window(self) -> int | None:
        return self._window

    @window.setter
    def window(self, radius: int | None) -> None:
        self._window = validate_radius(radius)
        self._mask_cache: dict[tuple, object] = {}

    def active_names(self) -> frozenset[str]:
        """Names that will be computed and emitted on the next call (none without ``emit``)."""
        return self._wanted if self.emit is not None else frozenset()

    def _emit_writable(self, name: str, value: torch.Tensor) -> torch.Tensor:
        """Emit a writable value; the replacement ``emit`` returns (same shape), else ``value``."""
        new = self.emit(name, value)
        if new is None or new is value:
            return value
        if not isinstance(new, torch.Tensor) or new.shape != value.shape:
            got = tuple(new.shape) if isinstance(new, torch.Tensor) else type(new).__name__
            raise ValueError(f"replacement for {name} has shape {got}, expected {tuple(value.shape)}")
        return new.to(dtype=value.dtype, device=value.device)


__all__ = ["ProcessorSettings", "QUERY_NAMES", "TOPK_NAMES"]
