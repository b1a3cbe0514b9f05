"""A diffusers attention processor that exposes attention internals, couples replicas and windows.

:class:`HookedAttnProcessor` replaces ``AttnProcessor2_0`` on a hooked layer. It mirrors that
processor step for step (to_q/to_k/to_v, head split via ``attn.heads``, ``norm_q``/``norm_k``,
``prepare_attention_mask``, ``to_out[0]``, ``to_out[1]``, ``residual_connection``,
``rescale_output_factor``), so with nothing requested, no coupling and no window it returns the
default processor's output **bit-for-bit** and keeps the fused SDPA kernel.

Three independent features, each only paid for when used:

* **Emission** (THEORY §1, §5). ``emit(local_name, tensor) -> tensor`` is called for each name in
  ``wanted`` (see :data:`NAME_DIMS`); what it returns is used in place of the tensor for the
  writable names (:data:`WRITABLE_NAMES`: q, k, v, logits, pattern and their inter variants),
  so an intervention on ``attn.v`` or ``attn.pattern`` changes the layer's output. Derived
  statistics (:data:`REDUCTION_NAMES`) are read-only: what ``emit`` returns for them is ignored.
  Only when a pattern-like name is wanted does the layer leave SDPA for the explicit softmax,
  evaluated in query tiles so the reductions never hold more than ``tile x N`` per head.
* **Replica coupling** (THEORY §2, eq [18-19]). With ``g`` not ``None`` the batch is replica-major
  ``[a-half; b-half]`` and

      O^a = 1/(1+g) attn(Q^a, K^a, V^a) + g/(1+g) attn(Q^a, K^b, V^b)     (b symmetric)

  with a separate row softmax per block, computed as two ordinary attention calls (never a
  2N x 2N softmax). At ``g == 0`` the inter call is skipped, so the output is exactly the
  uncoupled model. ``processor.g`` is a plain mutable attribute: the sampler changes it per step.
* **Chebyshev window** (THEORY §7): softmax restricted to ``max(|drow|, |dcol|) <= window`` on the
  token grid, for intra and inter blocks alike; a window covering the grid builds no mask.

The softmax scale is SDPA's default ``1/sqrt(d_head)``, as in ``AttnProcessor2_0`` (which does
not pass ``attn.scale`` either; the two agree for DiT). The formulas (logits and masks, the tiled
softmax, the coupling mixture, the row reductions) are those of :mod:`dithooks.attention.functional`,
which the joint-attention processors, the JVP and the probes share.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from .functional import (attend, combine_masks, couple, effective_width, row_entropy, scaled_logits,
                         softmax_rows, swap_replica_halves, top_k_rows)
from .settings import ProcessorSettings
from .window import window_mask

__all__ = ["HookedAttnProcessor", "swap_replica_halves", "ALL_NAMES", "NAME_DIMS", "NAME_DOCS",
           "WRITABLE_NAMES", "REDUCTION_NAMES", "INTER_NAMES", "PATTERN_NAMES", "QKV_NAMES"]

Emit = Callable[[str, torch.Tensor], "torch.Tensor | None"]

QKV_NAMES = frozenset({"attn.q", "attn.k", "attn.v"})
MATRIX_NAMES = frozenset({"attn.logits", "attn.pattern"})
INTER_NAMES = frozenset({"attn.logits_inter", "attn.pattern_inter"})
REDUCTION_NAMES = frozenset({"attn.n_eff", "attn.entropy", "attn.pattern_headmean",
                             "attn.pattern_query", "attn.topk_idx", "attn.topk_val"})
#: names that need the explicit softmax of the intra (ordinary) attention
INTRA_PATTERN_NAMES = MATRIX_NAMES | REDUCTION_NAMES
PATTERN_NAMES = INTRA_PATTERN_NAMES | INTER_NAMES
ALL_NAMES = QKV_NAMES | PATTERN_NAMES
#: names whose replacement (the value ``emit`` returns) changes the layer's output
WRITABLE_NAMES = QKV_NAMES | MATRIX_NAMES | INTER_NAMES

#: axes of each emitted tensor (``query`` of pattern_query runs over ``query_tokens``)
NAME_DIMS: dict[str, tuple[str, ...]] = {
    "attn.q": ("batch", "head", "token", "head_channel"),
    "attn.k": ("batch", "head", "token", "head_channel"),
    "attn.v": ("batch", "head", "token", "head_channel"),
    "attn.logits": ("batch", "head", "query", "key"),
    "attn.pattern": ("batch", "head", "query", "key"),
    "attn.logits_inter": ("batch", "head", "query", "key"),
    "attn.pattern_inter": ("batch", "head", "query", "key"),
    "attn.n_eff": ("batch", "head", "query"),
    "attn.entropy": ("batch", "head", "query"),
    "attn.pattern_headmean": ("batch", "query", "key"),
    "attn.pattern_query": ("batch", "head", "query", "key"),
    "attn.topk_idx": ("batch", "head", "query", "rank"),
    "attn.topk_val": ("batch", "head", "query", "rank"),
}

NAME_DOCS: dict[str, str] = {
    "attn.q": "queries per head, after norm_q (if any): Q = x W_Q [16]",
    "attn.k": "keys per head, after norm_k (if any): K = x W_K",
    "attn.v": "values per head: V = x W_V",
    "attn.logits": "pre-softmax scores Q K^T/sqrt(d_h) plus masks (-inf outside a window) [16]; "
                   "coupled runs: the intra blocks L^aa (a-half) and L^bb (b-half) [17]",
    "attn.pattern": "attention probabilities A = softmax(logits), rows sum to 1 [18]; "
                    "coupled runs: A^aa / A^bb",
    "attn.logits_inter": "coupled runs only: inter-replica scores L^ab (a-half rows) and L^ba "
                         "(b-half rows) [17]",
    "attn.pattern_inter": "coupled runs only: inter-replica probabilities A^ab / A^ba, their own "
                          "row softmax [18]",
    "attn.n_eff": "effective attention width 1/sum_j A_ij^2 of each query row, in [1, N] [92]",
    "attn.entropy": "row entropy -sum_j A_ij ln A_ij in nats (0 ln 0 = 0)",
    "attn.pattern_headmean": "A averaged over heads",
    "attn.pattern_query": "rows of A for the processor's query_tokens, in that order",
    "attn.topk_idx": "key indices of the top_k largest A_ij per row (int64, descending)",
    "attn.topk_val": "the top_k largest A_ij per row, descending",
}


class HookedAttnProcessor(ProcessorSettings):
    """Attention processor with hook emission, replica coupling [19] and a Chebyshev window.

    Args:
        layer: block index (for the caller's bookkeeping; names passed to ``emit`` are local).
        emit: ``emit(local_name, tensor)`` returning the tensor to use (the same one for read
            hooks, a replacement for interventions; ``None`` also keeps the value).
        wanted: local names to compute and emit (subset of :data:`ALL_NAMES`). Empty: plain SDPA.
        coupling: ``g`` (``None`` = uncoupled; ``0`` = coupled bookkeeping, uncoupled output).
        window: Chebyshev radius r on the token grid, ``None`` = global.
        query_tile: query rows per tile on the explicit path (memory ``tile x N`` per head).
        query_tokens: query rows reported by ``attn.pattern_query``.
        top_k: ``k`` of ``attn.topk_idx`` / ``attn.topk_val``.

    Reductions describe the intra pattern ``A`` (``A^aa``/``A^bb`` when coupled), the matrix of
    THEORY §5; the inter blocks are only available in full (``attn.*_inter``).
    """

    known_names = ALL_NAMES

    def __init__(self, layer: int, emit: Emit | None = None, wanted: frozenset[str] = frozenset(),
                 coupling: float | None = None, window: int | None = None, query_tile: int = 512,
                 query_tokens: Sequence[int] | None = None, top_k: int | None = None):
        self.layer = int(layer)
        self.emit = emit
        self._init_settings(wanted, coupling, window, query_tile, query_tokens, top_k)

    # settings (wanted, g, window: validated setters) and _emit_writable: ProcessorSettings

    # -- the processor protocol --------------------------------------------------------------
    def __call__(self, attn, hidden_states: torch.Tensor,
                 encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None,
                 *args, **kwargs) -> torch.Tensor:
        # Mirrors diffusers' AttnProcessor2_0 line for line; deviations are marked "hooked:".
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)

        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)

        self_attention = encoder_hidden_states is None
        batch_size, sequence_length, _ = (
            hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape
        )
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])

        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)

        inner_dim = key.shape[-1]
        head_dim = inner_dim // attn.heads
        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        # hooked: q/k/v are emitted before attention so that a replacement takes effect
        active = self.active_names()
        for name in ("attn.q", "attn.k", "attn.v"):
            if name in active:
                if name == "attn.q":
                    query = self._emit_writable(name, query)
                elif name == "attn.k":
                    key = self._emit_writable(name, key)
                else:
                    value = self._emit_writable(name, value)

        if (self._g is not None or self._window is not None) and not self_attention:
            raise NotImplementedError("replica coupling and windows apply to self-attention only")
        mask = self._combine_masks(attention_mask, query.shape[-2], key.shape[-2], query)
        hidden_states = self._attend(query, key, value, mask, active)

        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = hidden_states.to(query.dtype)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        hidden_states = hidden_states / attn.rescale_output_factor
        return hidden_states

    # -- attention ------------------------------------------------------------------------------
    def _attend(self, q, k, v, mask, active) -> torch.Tensor:
        """Per-head attention output (B, heads, N, d_head), coupled per eq [19] when ``g`` is set."""
        g = self._g
        if g is not None and q.shape[0] % 2:
            raise ValueError(f"a coupled layer needs a replica-major batch [a; b] of even size, "
                             f"got {q.shape[0]}")
        if active & INTRA_PATTERN_NAMES:
            out = self._explicit(q, k, v, mask, active, inter=False)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=0.0, is_causal=False)
        if g is None:
            return out
        inter_wanted = active & INTER_NAMES
        if g == 0.0 and not inter_wanted:
            return out  # exactly the uncoupled model: the cross call is skipped, not weighted by 0
        # the a-half attends the b-half's keys/values and vice versa; a per-batch key mask
        # belongs to the keys, so it travels with them
        k_p, v_p = swap_replica_halves(k), swap_replica_halves(v)
        mask_p = swap_replica_halves(mask) if mask is not None and mask.ndim == 4 and mask.shape[0] > 1 else mask
        if inter_wanted:
            out_inter = self._explicit(q, k_p, v_p, mask_p, active, inter=True)
        else:
            out_inter = F.scaled_dot_product_attention(q, k_p, v_p, attn_mask=mask_p, dropout_p=0.0,
                                                       is_causal=False)
        return couple(out, out_inter, g)

    def _explicit(self, q, k, v, mask, active, inter: bool) -> torch.Tensor:
        """Softmax attention written out, emitting what is wanted; equals SDPA to float error.

        If the full logits/pattern are wanted they are built (N x N per head, as asked) and the
        emitted values, possibly replaced, are the ones used. Otherwise the rows are processed
        ``query_tile`` at a time and only reductions are kept.
        """
        logits_name, pattern_name = (("attn.logits_inter", "attn.pattern_inter") if inter
                                     else ("attn.logits", "attn.pattern"))
        reductions = frozenset() if inter else active & REDUCTION_NAMES
        if logits_name in active or pattern_name in active:
            logits = scaled_logits(q, k, mask)
            if logits_name in active:
                logits = self._emit_writable(logits_name, logits)
            pattern = softmax_rows(logits, v.dtype)
            if pattern_name in active:
                pattern = self._emit_writable(pattern_name, pattern)
            if reductions:
                self._emit_reductions([self._reduce_tile(pattern, 0, reductions)], reductions)
            return torch.matmul(pattern, v)
        tiles: list[dict] = []
        on_tile = (lambda i0, p: tiles.append(self._reduce_tile(p, i0, reductions))) if reductions else None
        out = attend(q, k, v, mask, tile=self.query_tile, on_tile=on_tile)
        if reductions:
            self._emit_reductions(tiles, reductions)
        return out

    # -- reductions -----------------------------------------------------------------------------
    def _reduce_tile(self, p: torch.Tensor, i0: int, names: frozenset[str]) -> dict[str, torch.Tensor]:
        """Row statistics of a (B, heads, T, N) block of probabilities starting at query ``i0``."""
        p = p.float()
        out: dict[str, torch.Tensor] = {}
        if "attn.n_eff" in names:
            out["attn.n_eff"] = effective_width(p)  # 1/sum_j A_ij^2 [92]
        if "attn.entropy" in names:
            out["attn.entropy"] = row_entropy(p)
        if "attn.pattern_headmean" in names:
            out["attn.pattern_headmean"] = p.mean(1)
        if "attn.pattern_query" in names:
            idx = torch.tensor(self.query_tokens, device=p.device)
            n_total = p.shape[-1]
            if idx.min() < 0 or idx.max() >= n_total:
                raise ValueError(f"query_tokens must lie in [0, {n_total}), got {self.query_tokens}")
            inside = (idx >= i0) & (idx < i0 + p.shape[2])
            out["attn.pattern_query"] = (inside.nonzero().flatten(), p[:, :, idx[inside] - i0])
        if names & {"attn.topk_idx", "attn.topk_val"}:
            val, idx = top_k_rows(p, self.top_k)
            out["attn.topk_idx"], out["attn.topk_val"] = idx, val
        return out

    def _emit_reductions(self, tiles: list[dict], names: frozenset[str]) -> None:
        for name in sorted(names):
            if name == "attn.pattern_query":
                first = tiles[0][name][1]
                rows = first.new_zeros(first.shape[:2] + (len(self.query_tokens), first.shape[-1]))
                for t in tiles:
                    pos, vals = t[name]
                    rows[:, :, pos] = vals
                value = rows
            else:
                dim = 1 if name == "attn.pattern_headmean" else 2
                parts = [t[name] for t in tiles]
                value = parts[0] if len(parts) == 1 else torch.cat(parts, dim=dim)
            self.emit(name, value)  # derived statistic: a returned replacement has no effect

    # -- helpers -----------------------------------------------------------------------------------
    def _combine_masks(self, attention_mask, n_q: int, n_k: int, like: torch.Tensor):
        """The caller's (prepared, additive) mask combined with the window mask, or ``None``."""
        if self._window is None:
            return attention_mask
        if n_q != n_k:
            raise ValueError("a Chebyshev window needs as many queries as keys")
        key = (n_q, like.device)
        if key not in self._mask_cache:
            self._mask_cache[key] = window_mask(n_q, self._window, like.device)
        win = self._mask_cache[key]
        if win is None:  # the window covers the grid: the global model exactly
            return attention_mask
        return combine_masks(attention_mask, win)  # boolean alone: SDPA and the explicit path take it
