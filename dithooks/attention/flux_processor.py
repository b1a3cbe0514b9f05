"""Flux's hooked attention processor: diffusers' ``FluxAttnProcessor`` around the shared joint core.

Flux runs one softmax over the joint sequence ``[text; image]`` in both block kinds:

* double-stream blocks call ``attn(x, encoder_hidden_states=xc, image_rotary_emb=...)``; the
  text tokens get their own projections (``add_q/k/v_proj``, ``norm_added_q/k``), the output is
  split back and projected by ``to_out`` (image) and ``to_add_out`` (text);
* single-stream blocks call ``attn(x, image_rotary_emb=...)`` on the joint sequence itself (one
  set of projections for all tokens, no output projection: ``pre_only``). Where the image tokens
  start is not an argument of that call, so the processor asks the model call record
  (:class:`dithooks.adapters.flux.FluxCall`).

Rotary embeddings are applied to the joint q and k after the RMS norms, exactly as diffusers
does, so ``attn.q``/``attn.k`` (and ``attn.context_q``/``context_k``) are the rotated vectors the
softmax uses: ``attn.pattern_joint == softmax(q k^T / sqrt(d))`` of the emitted tensors.

With nothing requested, no coupling and no window (:attr:`JointAttention.hooked` False) the call
goes to diffusers' own ``FluxAttnProcessor`` (bit for bit, its attention backend). Hooked, the
projections, norms and rotary are diffusers' lines in diffusers' layout ``(B, S, H, D)``; the
joint q/k/v are handed to :meth:`JointAttention.attend_joint` as the same ``(B, H, S, D)`` views
diffusers' native backend hands to SDPA, so a hooked layer that only reads (q/k/v, or coupling
at ``g = 0``) returns the unhooked output bit for bit. Emission, coupling on image rows and
windows on image->image pairs are the core's (see :mod:`dithooks.attention.joint_processor`).
"""

from __future__ import annotations

from typing import Any

import torch

from .joint_processor import JointAttention


def grid_from_ids(img_ids: torch.Tensor | None, n_image: int) -> tuple[int, int] | None:
    """(rows, cols) of the image token grid from Flux ``img_ids`` ``(N, 3) = (0, row, col)``.

    None when there are no ids or they are not FluxPipeline's row-major grid of ``n_image``
    tokens. Windows use the square row-major grid of the joint core; the ids are checked
    against it so a different layout is refused rather than windowed wrongly.
    """
    if img_ids is None or img_ids.shape[0] != n_image or n_image == 0:
        return None
    rows = int(img_ids[:, 1].max().item()) + 1
    cols = int(img_ids[:, 2].max().item()) + 1
    if rows * cols != n_image:
        return None
    r = torch.arange(n_image, device=img_ids.device) // cols
    c = torch.arange(n_image, device=img_ids.device) % cols
    if not (torch.equal(img_ids[:, 1].round().long(), r) and torch.equal(img_ids[:, 2].round().long(), c)):
        return None
    return rows, cols


class HookedFluxAttnProcessor(JointAttention):
    """``FluxAttnProcessor`` with hook emission, replica coupling [19] and Chebyshev windows.

    Args:
        layer: block index (bookkeeping).
        emit, wanted, coupling, window, query_tile: as :class:`JointAttention`.
        call: the model's :class:`~dithooks.adapters.flux.FluxCall` (text/image split of the
            current call: needed by single-stream blocks, and ``img_ids`` for the window grid).
    """

    def __init__(self, layer: int = 0, emit=None, wanted=frozenset(), coupling: float | None = None,
                 window: int | None = None, *, call: Any = None, **kwargs):
        from diffusers.models.transformers.transformer_flux import FluxAttnProcessor

        kwargs["order"] = "text_first"
        super().__init__(layer, emit, wanted, coupling, window, **kwargs)
        self.call = call
        self._plain = FluxAttnProcessor()

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None,
                 image_rotary_emb: torch.Tensor | None = None) -> Any:
        if not self.hooked:
            return self._plain(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)
        if attention_mask is not None:
            raise NotImplementedError("the hooked Flux processor does not take an attention mask")
        from diffusers.models.embeddings import apply_rotary_emb
        from diffusers.models.transformers.transformer_flux import _get_qkv_projections

        # FluxAttnProcessor, line for line, up to the attention call
        query, key, value, encoder_query, encoder_key, encoder_value = _get_qkv_projections(
            attn, hidden_states, encoder_hidden_states)
        query = query.unflatten(-1, (-1, attn.head_dim))
        key = key.unflatten(-1, (-1, attn.head_dim))
        value = value.unflatten(-1, (-1, attn.head_dim))
        query = attn.norm_q(query)
        key = attn.norm_k(key)
        if attn.added_kv_proj_dim is not None:
            encoder_query = encoder_query.unflatten(-1, (-1, attn.head_dim))
            encoder_key = encoder_key.unflatten(-1, (-1, attn.head_dim))
            encoder_value = encoder_value.unflatten(-1, (-1, attn.head_dim))
            encoder_query = attn.norm_added_q(encoder_query)
            encoder_key = attn.norm_added_k(encoder_key)
            query = torch.cat([encoder_query, query], dim=1)
            key = torch.cat([encoder_key, key], dim=1)
            value = torch.cat([encoder_value, value], dim=1)
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)

        # hooked: where the image tokens are, then the shared joint core instead of SDPA
        joint = query.shape[1]
        if encoder_hidden_states is not None:
            n_text = encoder_hidden_states.shape[1]
        elif self.call is not None:
            n_text = self.call.split(joint)
        else:
            raise ValueError("a Flux single-stream block needs the model call record to split text and image")
        if self._window is not None and getattr(self.call, "img_ids", None) is not None:
            grid = grid_from_ids(self.call.img_ids, joint - n_text)
            if grid is None or grid[0] != grid[1]:
                raise ValueError("a Chebyshev window needs img_ids of a square row-major token grid "
                                 "(FluxPipeline's (0, row, col) layout)")
        out = self.attend_joint(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), n_text)
        hidden_states = out.transpose(1, 2).flatten(2, 3)
        hidden_states = hidden_states.to(query.dtype)

        if encoder_hidden_states is not None:
            encoder_hidden_states, hidden_states = hidden_states.split_with_sizes(
                [encoder_hidden_states.shape[1], hidden_states.shape[1] - encoder_hidden_states.shape[1]], dim=1)
            hidden_states = attn.to_out[0](hidden_states.contiguous())
            hidden_states = attn.to_out[1](hidden_states)
            encoder_hidden_states = attn.to_add_out(encoder_hidden_states.contiguous())
            return hidden_states, encoder_hidden_states
        return hidden_states


__all__ = ["HookedFluxAttnProcessor", "grid_from_ids"]
