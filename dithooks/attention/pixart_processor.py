"""PixArt's hooked processor: self-attention as DiT's, cross-attention to the text read only.

A PixArt block has two ``Attention`` modules: ``attn1`` (self-attention over the image tokens)
and ``attn2`` (image queries, text keys/values, the prompt's padding mask). One
:class:`HookedPixArtAttnProcessor` is installed on both and tells them apart by the call, as
diffusers' processors do: ``encoder_hidden_states`` is None for self-attention.

* Self-attention calls are :class:`~dithooks.attention.processor.HookedAttnProcessor`'s own:
  ``attn.*`` names, replica coupling (``g``) and Chebyshev windows.
* Cross-attention calls go to an inner ``HookedAttnProcessor`` that is never coupled or windowed
  (keys are text tokens: no grid to window, and both replicas of a pair read the same text) and
  emits its values as ``cross_attn.*`` (:data:`CROSS_NAME_DIMS`). With nothing wanted it is
  diffusers' ``AttnProcessor2_0`` step for step, fused SDPA, bit for bit (tested).
"""

from __future__ import annotations

import torch

from .processor import HookedAttnProcessor

#: cross-attention values (``query`` = image tokens, ``text_key``/``text_token`` = prompt tokens)
CROSS_NAME_DIMS: dict[str, tuple[str, ...]] = {
    "cross_attn.q": ("batch", "head", "token", "head_channel"),
    "cross_attn.k": ("batch", "head", "text_token", "head_channel"),
    "cross_attn.v": ("batch", "head", "text_token", "head_channel"),
    "cross_attn.logits": ("batch", "head", "query", "text_key"),
    "cross_attn.pattern": ("batch", "head", "query", "text_key"),
    "cross_attn.n_eff": ("batch", "head", "query"),
    "cross_attn.entropy": ("batch", "head", "query"),
    "cross_attn.pattern_headmean": ("batch", "query", "text_key"),
}

CROSS_NAME_DOCS: dict[str, str] = {
    "cross_attn.q": "cross-attention queries per head, from the image tokens (cross_attn.in)",
    "cross_attn.k": "cross-attention keys per head, from the projected text (context_embed.out)",
    "cross_attn.v": "cross-attention values per head, from the projected text",
    "cross_attn.logits": "image -> text scores Q K^T/sqrt(d_h) plus the padding mask (-10000 on padding)",
    "cross_attn.pattern": "image -> text attention probabilities, rows sum to 1 over the prompt's tokens",
    "cross_attn.n_eff": "effective number of text tokens each image token reads, 1/sum_j A_ij^2",
    "cross_attn.entropy": "row entropy of the image -> text pattern, in nats",
    "cross_attn.pattern_headmean": "image -> text pattern averaged over heads",
}

CROSS_WRITABLE = frozenset({"cross_attn.q", "cross_attn.k", "cross_attn.v", "cross_attn.logits",
                            "cross_attn.pattern"})
_PREFIX = "cross_"  # cross_attn.X <-> attn.X of the inner processor


class HookedPixArtAttnProcessor(HookedAttnProcessor):
    """``HookedAttnProcessor`` for self-attention plus an uncoupled, unwindowed inner one for
    cross-attention, whose values are emitted as ``cross_attn.*``. ``wanted`` takes both kinds of
    names; ``g`` and ``window`` act on self-attention only."""

    def __init__(self, layer: int, emit=None, wanted: frozenset[str] = frozenset(), coupling=None,
                 window=None, query_tile: int = 512, query_tokens=None, top_k=None):
        self._cross = HookedAttnProcessor(layer, emit=self._emit_cross, query_tile=query_tile)
        super().__init__(layer, emit, wanted, coupling, window, query_tile, query_tokens, top_k)

    @property
    def wanted(self) -> frozenset[str]:
        return self._wanted | frozenset(_PREFIX + n for n in self._cross.wanted)

    @wanted.setter
    def wanted(self, names) -> None:
        names = frozenset(names)
        cross = frozenset(n for n in names if n.startswith("cross_attn."))
        unknown = cross - set(CROSS_NAME_DIMS)
        if unknown:
            raise ValueError(f"unknown cross-attention names {sorted(unknown)}; known: {sorted(CROSS_NAME_DIMS)}")
        HookedAttnProcessor.wanted.fset(self, names - cross)
        self._cross.wanted = frozenset(n[len(_PREFIX):] for n in cross)

    def _emit_cross(self, name: str, value: torch.Tensor):
        return value if self.emit is None else self.emit(_PREFIX + name, value)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 *args, **kwargs):
        if encoder_hidden_states is None:
            return super().__call__(attn, hidden_states, None, attention_mask, temb, *args, **kwargs)
        return self._cross(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)
