"""Hooked JOINT attention (MMDiT: SD3, Flux): image and text tokens in one softmax.

In an MMDiT block the image stream and the text (context) stream project their own q/k/v, the
two are concatenated along the token axis and ONE softmax runs over the joint sequence
(SD3: ``[image; text]``, Flux: ``[text; image]``). This module is the hooked version of that
softmax, shared by the families:

* :class:`JointAttention` - the family-independent core. It works on the joint sequence in
  SDPA's layout ``(batch, head, S, head_channel)`` with ``S = N image + L text`` tokens in the
  family's ``order`` and does emission, replica coupling and windows
  (:meth:`JointAttention.attend_joint`). A family processor projects q/k/v exactly as its
  diffusers processor does and calls the core only when :attr:`JointAttention.hooked` is True;
  otherwise it runs diffusers' own code, so an unhooked layer is bit-for-bit diffusers' and
  keeps the fused SDPA kernel.
* :class:`HookedJointAttnProcessor` - SD3's processor (mirrors ``JointAttnProcessor2_0``;
  also serves SD3.5's image-only ``attn2`` when called without ``encoder_hidden_states``).

Hook points (local names, see :data:`NAME_DIMS` / :data:`NAME_DOCS`)::

    attn.q/k/v                image tokens' q/k/v, after norm_q/norm_k and rotary (if any)
    attn.context_q/k/v        text tokens' q/k/v, after norm_added_q/k and rotary (if any)
    attn.logits               image->image scores q k^T/sqrt(d) (-inf outside a window)
    attn.pattern              image->image block of the JOINT softmax (rows sum to < 1)
    attn.pattern_image_text   image queries -> text keys block
    attn.pattern_text_image   text queries -> image keys block
    attn.pattern_joint        the whole (S x S) joint pattern, rows sum to 1
    attn.logits_inter / attn.pattern_inter   coupled runs: image->partner-image scores and
                              their own row softmax
    attn.n_eff / attn.entropy  per image query, over its whole joint row (N + L keys)

Coupling (g, THEORY §2 eq [19]) acts on image query rows only, with the batch replica-major
``[a; b]``: ``O^a_img = 1/(1+g) Attn_joint(a)_img + g/(1+g) Attn(Q^a_img -> K^b_img, V^b_img)``;
text rows keep their uncoupled joint output. At ``g == 0`` the inter call is skipped (exactly the
uncoupled model). A Chebyshev window of radius r masks image->image pairs only (text<->image
stays unmasked) and masks the inter block alike; r >= side-1 builds no mask (global bit for bit).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from .functional import (attend, couple, effective_width, row_entropy, scaled_logits, softmax_rows,
                         swap_replica_halves, top_k_rows)
from .processor import NAME_DIMS as _SHARED_DIMS
from .settings import ProcessorSettings
from .window import joint_window_mask

Emit = Callable[[str, torch.Tensor], "torch.Tensor | None"]
ORDERS = ("image_first", "text_first")

QKV_NAMES = frozenset({"attn.q", "attn.k", "attn.v"})
CONTEXT_QKV_NAMES = frozenset({"attn.context_q", "attn.context_k", "attn.context_v"})
BLOCK_NAMES = frozenset({"attn.pattern", "attn.pattern_image_text", "attn.pattern_text_image",
                         "attn.pattern_joint"})
MATRIX_NAMES = frozenset({"attn.logits"}) | BLOCK_NAMES
INTER_NAMES = frozenset({"attn.logits_inter", "attn.pattern_inter"})
REDUCTION_NAMES = frozenset({"attn.n_eff", "attn.entropy", "attn.pattern_headmean", "attn.pattern_query",
                             "attn.topk_idx", "attn.topk_val"})
#: names that need the explicit softmax of the joint (intra) attention
INTRA_PATTERN_NAMES = MATRIX_NAMES | REDUCTION_NAMES
ALL_NAMES = QKV_NAMES | CONTEXT_QKV_NAMES | MATRIX_NAMES | INTER_NAMES | REDUCTION_NAMES
#: names whose replacement (what ``emit`` returns) changes the layer's output
WRITABLE_NAMES = QKV_NAMES | CONTEXT_QKV_NAMES | MATRIX_NAMES | INTER_NAMES

#: axes of each emitted tensor: the names DiT's processor also emits keep its dims (one vocabulary,
#: :data:`dithooks.attention.processor.NAME_DIMS`); the text-stream and joint blocks are added here
NAME_DIMS: dict[str, tuple[str, ...]] = {
    **{name: dims for name, dims in _SHARED_DIMS.items() if name in ALL_NAMES},
    "attn.context_q": ("batch", "head", "text_token", "head_channel"),
    "attn.context_k": ("batch", "head", "text_token", "head_channel"),
    "attn.context_v": ("batch", "head", "text_token", "head_channel"),
    "attn.pattern_image_text": ("batch", "head", "query", "text_key"),
    "attn.pattern_text_image": ("batch", "head", "text_query", "key"),
    "attn.pattern_joint": ("batch", "head", "joint_query", "joint_key"),
}
assert set(NAME_DIMS) == ALL_NAMES

NAME_DOCS: dict[str, str] = {
    "attn.q": "image tokens' queries per head (after norm_q and rotary embedding, if any)",
    "attn.k": "image tokens' keys per head (after norm_k and rotary embedding, if any)",
    "attn.v": "image tokens' values per head",
    "attn.context_q": "text tokens' queries per head (after norm_added_q and rotary, if any)",
    "attn.context_k": "text tokens' keys per head (after norm_added_k and rotary, if any)",
    "attn.context_v": "text tokens' values per head",
    "attn.logits": "image->image scores q k^T/sqrt(d_h), -inf outside a window",
    "attn.pattern": "image->image block of the JOINT softmax; rows sum to less than 1 (the rest "
                    "of each row goes to text keys: attn.pattern_image_text)",
    "attn.pattern_image_text": "image queries -> text keys block of the joint softmax",
    "attn.pattern_text_image": "text queries -> image keys block of the joint softmax",
    "attn.pattern_joint": "the whole joint pattern over the sequence in the family's order "
                          "(SD3 [image; text], Flux [text; image]); rows sum to 1",
    "attn.logits_inter": "coupled runs only: image->partner-image scores (a-half rows: L^ab)",
    "attn.pattern_inter": "coupled runs only: image->partner-image probabilities, their own row "
                          "softmax over the partner's image keys",
    "attn.n_eff": "effective attention width 1/sum_j A_ij^2 of each image query over its whole "
                  "joint row (image and text keys), in [1, N + L]",
    "attn.entropy": "entropy -sum_j A_ij ln A_ij (nats) of each image query's whole joint row",
    "attn.pattern_headmean": "attn.pattern (the image->image block of the joint softmax) averaged over heads",
    "attn.pattern_query": "rows of attn.pattern (image->image block) for the processor's query_tokens "
                          "(image token indices), in that order",
    "attn.topk_idx": "image-key indices of the top_k largest entries of each attn.pattern row (int64, "
                     "descending; the joint softmax's probabilities, text keys not ranked)",
    "attn.topk_val": "the top_k largest entries of each attn.pattern row (image keys), descending",
}


class JointAttention(ProcessorSettings):
    """Emission, replica coupling and Chebyshev windows for one joint-attention layer.

    Args:
        layer: block index (bookkeeping only; names given to ``emit`` are local).
        emit: ``emit(local_name, tensor)`` returning the tensor to use (a replacement for
            interventions; ``None`` or the same tensor keeps the value).
        wanted: local names to compute and emit (subset of :data:`ALL_NAMES`).
        coupling: g (None = uncoupled; 0 = coupled bookkeeping, uncoupled output).
        window: Chebyshev radius on the (square, row-major) image token grid (None = global).
        order: ``"image_first"`` (SD3: [image; text]) or ``"text_first"`` (Flux: [text; image]).
        query_tile: query rows per tile when only reductions are wanted.
        query_tokens: image token indices whose attn.pattern rows ``attn.pattern_query`` reports.
        top_k: ``k`` of ``attn.topk_idx`` / ``attn.topk_val``.

    The settings (``wanted``, ``g``, ``window``, ``query_tile``, ``query_tokens``, ``top_k``) are
    validated by :class:`~dithooks.attention.settings.ProcessorSettings`, as DiT's processor's.
    The pattern reductions ``pattern_headmean``/``pattern_query``/``topk_*`` describe
    ``attn.pattern`` (image queries, image keys, the joint softmax's probabilities);
    ``n_eff``/``entropy`` the whole joint row.
    """

    known_names = ALL_NAMES
    names_kind = "joint-attention"

    def __init__(self, layer: int = 0, emit: Emit | None = None, wanted=frozenset(),
                 coupling: float | None = None, window: int | None = None,
                 order: str = "image_first", query_tile: int = 512, query_tokens=None, top_k: int | None = None):
        if order not in ORDERS:
            raise ValueError(f"order must be one of {ORDERS}, got {order!r}")
        self.layer = int(layer)
        self.emit = emit
        self.order = order
        self._init_settings(wanted, coupling, window, query_tile, query_tokens, top_k)

    @property
    def hooked(self) -> bool:
        """True when a call must go through :meth:`attend_joint` (else run diffusers' own code)."""
        return bool(self.active_names()) or self._g is not None or self._window is not None

    # -- the core ----------------------------------------------------------------------------
    def _slices(self, S: int, L: int) -> tuple[slice, slice]:
        """(image, text) positions in the joint sequence of length S with L text tokens."""
        if self.order == "image_first":
            return slice(0, S - L), slice(S - L, S)
        return slice(L, S), slice(0, L)

    def _join(self, img: torch.Tensor, txt: torch.Tensor) -> torch.Tensor:
        if txt.shape[2] == 0:
            return img
        return torch.cat([img, txt], dim=2) if self.order == "image_first" else torch.cat([txt, img], dim=2)

    def attend_joint(self, Q: torch.Tensor, K: torch.Tensor, V: torch.Tensor, text_tokens: int,
                     rotary: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
        """Joint attention output (B, H, S, D) for joint Q, K, V (B, H, S, D) in ``order``.

        ``text_tokens`` = L (0: image-only self-attention); ``rotary`` is applied to Q and K
        first. Emits what is wanted; replacements are used.
        """
        S, L = Q.shape[2], int(text_tokens)
        if not 0 <= L < S:
            raise ValueError(f"text_tokens={L} must lie in [0, {S})")
        img, txt = self._slices(S, L)
        N = S - L
        if rotary is not None:
            Q, K = rotary(Q), rotary(K)
        active = self.active_names()
        Q = self._emit_split(Q, img, txt, "attn.q", "attn.context_q", active)
        K = self._emit_split(K, img, txt, "attn.k", "attn.context_k", active)
        V = self._emit_split(V, img, txt, "attn.v", "attn.context_v", active)

        mask = self._window_mask(N, L, Q.device)  # image->image windowed, text rows/cols open
        if active & INTRA_PATTERN_NAMES:
            out = self._explicit(Q, K, V, mask, img, txt, active)
        elif mask is None:
            out = F.scaled_dot_product_attention(Q, K, V, dropout_p=0.0, is_causal=False)
        else:
            out = F.scaled_dot_product_attention(Q, K, V, attn_mask=mask, dropout_p=0.0, is_causal=False)

        g = self._g
        if g is None:
            return out
        if Q.shape[0] % 2:
            raise ValueError(f"a coupled layer needs a replica-major batch [a; b] of even size, got {Q.shape[0]}")
        inter_wanted = active & INTER_NAMES
        if g == 0.0 and not inter_wanted:
            return out  # exactly the uncoupled model: the inter call is skipped, not weighted by 0
        win = None if mask is None else mask[img, img]
        q_i = Q[:, :, img]
        k_p, v_p = swap_replica_halves(K[:, :, img]), swap_replica_halves(V[:, :, img])
        if inter_wanted:
            out_inter = self._explicit_inter(q_i, k_p, v_p, win, active)
        else:
            out_inter = F.scaled_dot_product_attention(q_i, k_p, v_p, attn_mask=win, dropout_p=0.0,
                                                       is_causal=False)
        if g == 0.0:
            return out
        return self._join(couple(out[:, :, img], out_inter, g), out[:, :, txt])

    # -- explicit softmax ----------------------------------------------------------------------
    def _explicit(self, Q, K, V, mask, img, txt, active) -> torch.Tensor:
        """The joint softmax written out (functional.py); equals SDPA to float error."""
        reductions = active & REDUCTION_NAMES
        if not active & MATRIX_NAMES:  # reductions only: query tiles, never the whole S x S
            stats: list[dict] = []
            out = attend(Q, K, V, mask, tile=self.query_tile,
                         on_tile=lambda i0, p: stats.append(self._row_stats(p, i0, reductions, img)))
            self._emit_reductions(stats, reductions, img)
            return out
        logits = scaled_logits(Q, K, mask)
        if "attn.logits" in active:
            logits = self._emit_block(logits, "attn.logits", img, img)
        p = softmax_rows(logits, V.dtype)
        if "attn.pattern_joint" in active:
            p = self._emit_writable("attn.pattern_joint", p)
        for name, rows, cols in (("attn.pattern", img, img), ("attn.pattern_image_text", img, txt),
                                 ("attn.pattern_text_image", txt, img)):
            if name in active:
                p = self._emit_block(p, name, rows, cols)
        if reductions:
            self._emit_reductions([self._row_stats(p, 0, reductions, img)], reductions, img)
        return torch.matmul(p, V)

    def _explicit_inter(self, q, k, v, win, active) -> torch.Tensor:
        logits = scaled_logits(q, k, win)
        if "attn.logits_inter" in active:
            logits = self._emit_writable("attn.logits_inter", logits)
        p = softmax_rows(logits, v.dtype)
        if "attn.pattern_inter" in active:
            p = self._emit_writable("attn.pattern_inter", p)
        return torch.matmul(p, v)

    def _row_stats(self, p: torch.Tensor, i0: int, names, img: slice) -> dict[str, object]:
        """Statistics of joint rows ``i0 .. i0 + p.shape[2]`` of the pattern (B, H, T, S): over the
        whole row (n_eff, entropy) or over its image keys (the attn.pattern reductions)."""
        p = p.float()
        out: dict[str, object] = {}
        if "attn.n_eff" in names:
            out["attn.n_eff"] = effective_width(p)
        if "attn.entropy" in names:
            out["attn.entropy"] = row_entropy(p)
        p_img = p[..., img]
        if "attn.pattern_headmean" in names:
            out["attn.pattern_headmean"] = p_img.mean(1)
        if "attn.pattern_query" in names:
            n_image = img.stop - img.start
            idx = torch.tensor(self.query_tokens, device=p.device)
            if idx.min() < 0 or idx.max() >= n_image:
                raise ValueError(f"query_tokens must lie in [0, {n_image}) (image tokens), got {self.query_tokens}")
            rows = idx + img.start  # joint positions of the image queries
            inside = (rows >= i0) & (rows < i0 + p.shape[2])
            out["attn.pattern_query"] = (inside.nonzero().flatten(), p_img[:, :, rows[inside] - i0])
        if names & {"attn.topk_idx", "attn.topk_val"}:
            val, idx = top_k_rows(p_img, self.top_k)
            out["attn.topk_idx"], out["attn.topk_val"] = idx, val
        return out

    def _emit_reductions(self, stats: list[dict], names, img: slice) -> None:
        """Emit each statistic for the image query rows (tiles joined in row order)."""
        for name in sorted(names):
            if name == "attn.pattern_query":
                first = stats[0][name][1]
                value = first.new_zeros(first.shape[:2] + (len(self.query_tokens), first.shape[-1]))
                for st in stats:
                    pos, vals = st[name]
                    value[:, :, pos] = vals
            else:
                dim = 1 if name == "attn.pattern_headmean" else 2
                parts = [st[name] for st in stats]
                value = parts[0] if len(parts) == 1 else torch.cat(parts, dim=dim)
                value = value[:, img] if dim == 1 else value[:, :, img]
            self.emit(name, value)  # derived statistic: a replacement has no effect

    # -- emission helpers ------------------------------------------------------------------------
    def _emit_block(self, m: torch.Tensor, name: str, rows: slice, cols: slice) -> torch.Tensor:
        """Emit the (rows, cols) block of a (B, H, S, S) matrix; write a replacement back."""
        block = m[:, :, rows, cols]
        new = self._emit_writable(name, block)
        if new is block:
            return m
        m = m.clone()
        m[:, :, rows, cols] = new
        return m

    def _emit_split(self, X, img, txt, name_img, name_txt, active) -> torch.Tensor:
        """Emit the image and text parts of a joint (B, H, S, D) tensor; rejoin replacements."""
        if not active & {name_img, name_txt}:
            return X
        xi, xt = X[:, :, img], X[:, :, txt]
        ni = self._emit_writable(name_img, xi) if name_img in active else xi
        nt = self._emit_writable(name_txt, xt) if name_txt in active and xt.shape[2] else xt
        if ni is xi and nt is xt:
            return X
        return self._join(ni, nt)

    def _window_mask(self, n_image: int, n_text: int, device) -> torch.Tensor | None:
        if self._window is None:
            return None
        key = (n_image, n_text, device)
        if key not in self._mask_cache:
            self._mask_cache[key] = joint_window_mask(n_image, self._window, n_text,
                                                      text_first=self.order == "text_first", device=device)
        return self._mask_cache[key]


def _project(attn, x: torch.Tensor, projections: tuple[str, str, str], norms: tuple[str, str],
             head_dim: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """q, k, v of one stream in SDPA's layout (B, H, tokens, head_dim), q and k through their norms
    (``None`` norms skipped), and head_dim (default: the key width / heads): JointAttnProcessor2_0's
    lines, the same for either stream."""
    q, k, v = (getattr(attn, name)(x) for name in projections)
    if head_dim is None:
        head_dim = k.shape[-1] // attn.heads
    q, k, v = (y.view(x.shape[0], -1, attn.heads, head_dim).transpose(1, 2) for y in (q, k, v))
    norm_q, norm_k = (getattr(attn, name) for name in norms)
    if norm_q is not None:
        q = norm_q(q)
    if norm_k is not None:
        k = norm_k(k)
    return q, k, v, head_dim


class HookedJointAttnProcessor(JointAttention):
    """SD3's joint-attention processor with hook points, coupling and windows.

    Unhooked (:attr:`hooked` False) it calls diffusers' ``JointAttnProcessor2_0`` itself (bit for
    bit, fused SDPA). Hooked, it mirrors that processor line for line and replaces only the
    ``scaled_dot_product_attention`` call with :meth:`JointAttention.attend_joint`.
    """

    def __init__(self, layer: int = 0, emit: Emit | None = None, wanted=frozenset(),
                 coupling: float | None = None, window: int | None = None, **kwargs):
        from diffusers.models.attention_processor import JointAttnProcessor2_0

        kwargs.setdefault("order", "image_first")
        super().__init__(layer, emit, wanted, coupling, window, **kwargs)
        self._plain = JointAttnProcessor2_0()

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, *args, **kwargs):
        if not self.hooked:
            return self._plain(attn, hidden_states, encoder_hidden_states, attention_mask, *args, **kwargs)
        if attention_mask is not None:
            raise NotImplementedError("the hooked joint processor does not take an attention mask "
                                      "(JointAttnProcessor2_0 ignores it too)")
        residual = hidden_states
        batch_size = hidden_states.shape[0]
        # the image stream's q/k/v (to_q/k/v, norm_q/k), then the text stream's (add_*_proj, norm_added_q/k)
        query, key, value, head_dim = _project(attn, hidden_states, ("to_q", "to_k", "to_v"), ("norm_q", "norm_k"))

        text_tokens = 0
        if encoder_hidden_states is not None:
            c_query, c_key, c_value, _ = _project(attn, encoder_hidden_states, ("add_q_proj", "add_k_proj", "add_v_proj"),
                                                  ("norm_added_q", "norm_added_k"), head_dim)
            query = torch.cat([query, c_query], dim=2)
            key = torch.cat([key, c_key], dim=2)
            value = torch.cat([value, c_value], dim=2)
            text_tokens = encoder_hidden_states.shape[1]

        # hooked: the one deviation from JointAttnProcessor2_0
        hidden_states = self.attend_joint(query, key, value, text_tokens)
        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = hidden_states.to(query.dtype)

        if encoder_hidden_states is not None:
            hidden_states, encoder_hidden_states = (
                hidden_states[:, : residual.shape[1]],
                hidden_states[:, residual.shape[1]:],
            )
            if not attn.context_pre_only:
                encoder_hidden_states = attn.to_add_out(encoder_hidden_states)

        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if encoder_hidden_states is not None:
            return hidden_states, encoder_hidden_states
        return hidden_states


__all__ = ["ALL_NAMES", "HookedJointAttnProcessor", "JointAttention", "NAME_DIMS", "NAME_DOCS",
           "ORDERS", "WRITABLE_NAMES", "swap_replica_halves"]
