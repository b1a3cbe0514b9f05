"""The attention math every processor, the JVP and the probes share: one home per formula.

Pure functions on per-head tensors (leading axes ``(batch, head)`` or any others broadcast);
queries on rows, keys on columns. Hooked processors (DiT's :class:`HookedAttnProcessor`, the
joint-attention processors of SD3/Flux), :mod:`dithooks.jvp` and the probes call these instead
of writing the formulas out again.

Pattern (THEORY §1, eq [16, 18])
    :func:`scaled_logits` ``L = (Q s) K^T`` (+ mask), ``s = 1/sqrt(d_head)`` (SDPA's default);
    :func:`softmax_rows` the row softmax (float32 for half-precision logits, as fused kernels
    accumulate); :func:`attention_pattern` both; :func:`attend` ``softmax(L) V`` written out in
    query tiles, handing each tile's probabilities to a callback (the processor's reductions).
    Masks are boolean (True = may attend; SDPA's convention) or additive (0 / -inf), with or
    without a query axis; :func:`combine_masks` joins an additive mask with a boolean one.
Softmax Jacobian (THEORY §3, eq [87-88])
    :func:`logit_perturbations` ``dL_intra, dL_inter`` from ``q, k, dq, dk``;
    :func:`centred_logit_perturbation` ``c = dL - rowsum(A dL)`` on the support of ``A``
    (:func:`full_support` says whether that is every key),
    :func:`softmax_jvp` ``dA = A c`` (rows sum to 0), :func:`softmax_jvp_matmul` ``dA V`` without
    forming ``dA`` (one N x N product fewer).
Replica coupling (THEORY §2, eq [19])
    :func:`swap_replica_halves` (``[a; b] -> [b; a]``), :func:`couple` ``O = 1/(1+g) O_intra +
    g/(1+g) O_inter`` (``O_intra`` itself at ``g == 0``: exactly the uncoupled model); the gates
    ``rho``/``xi`` and the weights live in :mod:`dithooks.gates` (re-exported here).
Row reductions (THEORY §5, eq [92])
    :func:`effective_width` ``1/sum_j A_ij^2``, :func:`row_entropy` ``-sum_j A_ij ln A_ij``,
    :func:`top_k_rows`.
Windows (THEORY §7)
    :func:`window_mask` (square grid) and :func:`joint_window_mask` (an image grid inside a joint
    [image; text] or [text; image] sequence), from :mod:`dithooks.attention.window`.
"""

from __future__ import annotations

from typing import Callable, Iterator

import torch

from ..gates import mixture_weights, rho, validate_coupling, xi
from .window import additive_window_mask, joint_window_mask, window_mask

__all__ = [
    "default_scale", "scaled_logits", "softmax_rows", "attention_pattern", "query_tiles", "attend",
    "combine_masks", "logit_perturbations", "full_support", "centred_logit_perturbation", "softmax_jvp",
    "softmax_jvp_matmul",
    "swap_replica_halves", "couple", "mixture_weights", "rho", "xi", "validate_coupling",
    "effective_width", "row_entropy", "top_k_rows", "window_mask", "additive_window_mask",
    "joint_window_mask",
]

# -- the pattern --------------------------------------------------------------------------------
def default_scale(head_dim: int) -> float:
    """SDPA's default softmax scale ``1/sqrt(d_head)``."""
    return head_dim ** -0.5


def scaled_logits(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None = None, *,
                  scale: float | None = None, rows: tuple[int, int] | None = None) -> torch.Tensor:
    """``L = (q * scale) k^T`` plus ``mask``: (..., Nq, d) x (..., Nk, d) -> (..., Nq, Nk).

    ``q`` is scaled rather than the logits (Nq x d instead of Nq x Nk: one pass less over the big
    tensor). ``mask``: boolean (True = may attend; False gets ``-inf``) or additive, broadcast
    against the logits; a mask with a query axis (``mask.shape[-2] > 1``) covering all queries is
    cut to ``rows = (i0, i1)`` when ``q`` holds only those rows (a query tile).
    """
    if scale is None:
        scale = default_scale(q.shape[-1])
    logits = torch.matmul(q * scale, k.transpose(-1, -2))
    if mask is None:
        return logits
    if rows is not None and mask.shape[-2] > 1:
        mask = mask[..., rows[0]:rows[1], :]
    if mask.dtype == torch.bool:
        return logits.masked_fill(~mask, float("-inf"))
    return logits + mask


def softmax_rows(logits: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Row softmax of ``logits``, returned in ``dtype`` (default: the logits' dtype).

    Half-precision logits (float16/bfloat16) are normalised in float32, as fused kernels
    accumulate, then cast.
    """
    dtype = logits.dtype if dtype is None else dtype
    if logits.dtype in (torch.float16, torch.bfloat16):
        return torch.softmax(logits, dim=-1, dtype=torch.float32).to(dtype)
    return torch.softmax(logits, dim=-1).to(dtype)


def attention_pattern(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None = None, *,
                      scale: float | None = None, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``A = softmax((q s) k^T + mask)`` row-wise [16, 18]; rows sum to 1 (within the mask).

    ``dtype``: compute dtype (``q``, ``k`` are cast first; default: theirs).
    """
    if dtype is not None:
        q, k = q.to(dtype), k.to(dtype)
    return softmax_rows(scaled_logits(q, k, mask, scale=scale), q.dtype)


def query_tiles(n: int, tile: int) -> Iterator[tuple[int, int]]:
    """``(i0, i1)`` row ranges of at most ``tile`` queries covering ``range(n)``."""
    if tile < 1:
        raise ValueError(f"tile must be >= 1, got {tile}")
    for i0 in range(0, n, tile):
        yield i0, min(i0 + tile, n)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None, *,
           tile: int | None = None, scale: float | None = None,
           on_tile: Callable[[int, torch.Tensor], None] | None = None) -> torch.Tensor:
    """``softmax((q s) k^T + mask) v`` written out, ``tile`` query rows at a time (None: all).

    Memory ``tile x Nk`` per head for the probabilities; ``on_tile(i0, p)`` receives each
    tile's probabilities (``p`` rows ``i0 .. i0 + p.shape[-2]``) in ``v``'s dtype, e.g. to keep
    row reductions. Equals ``F.scaled_dot_product_attention`` to float error; every tiling gives
    the same numbers bit for bit (row-wise operations only).
    """
    n_q = q.shape[-2]
    if scale is None:
        scale = default_scale(q.shape[-1])
    outs = []
    for i0, i1 in query_tiles(n_q, tile or max(n_q, 1)):
        qt = q if (i0, i1) == (0, n_q) else q[..., i0:i1, :]
        p = softmax_rows(scaled_logits(qt, k, mask, scale=scale, rows=(i0, i1)), v.dtype)
        outs.append(torch.matmul(p, v))
        if on_tile is not None:
            on_tile(i0, p)
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=-2)


def combine_masks(additive: torch.Tensor | None, allowed: torch.Tensor | None) -> torch.Tensor | None:
    """One mask from an additive mask (0/-inf/bias, any broadcastable shape) and a boolean one
    (True = may attend). Either may be ``None``; with only the boolean one it is returned as is
    (SDPA and :func:`scaled_logits` both take it)."""
    if allowed is None:
        return additive
    if additive is None:
        return allowed
    blocked = torch.zeros(allowed.shape, dtype=additive.dtype, device=allowed.device)
    return additive + blocked.masked_fill(~allowed, float("-inf"))


# -- the softmax Jacobian [87-88] --------------------------------------------------------------
def logit_perturbations(q: torch.Tensor, k: torch.Tensor, dq: torch.Tensor, dk: torch.Tensor, *,
                        scale: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(dL_intra, dL_inter)`` of the replica half-difference (THEORY §3, [20-24]):
    ``dL_intra = (dq k^T + q dk^T) s`` (block aa; bb is its negative) and
    ``dL_inter = (dq k^T - q dk^T) s`` (block ab; ba is its negative)."""
    if scale is None:
        scale = default_scale(q.shape[-1])
    from_q = torch.matmul(dq * scale, k.transpose(-1, -2))
    from_k = torch.matmul(q * scale, dk.transpose(-1, -2))
    return from_q + from_k, from_q - from_k


def full_support(A: torch.Tensor) -> bool:
    """Whether every entry of the pattern ``A`` is positive (every key read: no mask, no underflow)."""
    return bool(A.amin() > 0) if A.numel() else True


def centred_logit_perturbation(A: torch.Tensor, dL: torch.Tensor, *, full: bool | None = None) -> torch.Tensor:
    """``c_ij = dL_ij - sum_k A_ik dL_ik`` (the bracket of [87-88]), 0 where ``A_ij = 0``.

    Keys with ``A_ij = 0`` (masked or underflowed) cannot move the pattern to first order;
    zeroing them keeps a masked ``-inf``/NaN logit perturbation from poisoning the row.
    ``full``: :func:`full_support` of ``A`` if already known (saves a pass over ``A``).
    """
    if full is None:
        full = full_support(A)
    if full:  # every key is read (an unmasked softmax): nothing to cut out
        return dL - (A * dL).sum(dim=-1, keepdim=True)
    off = A <= 0
    dL = dL.masked_fill(off, 0.0)
    return (dL - (A * dL).sum(dim=-1, keepdim=True)).masked_fill_(off, 0.0)


def softmax_jvp(A: torch.Tensor, dL: torch.Tensor) -> torch.Tensor:
    """First-order pattern change ``dA = A * (dL - rowsum(A * dL))`` [87-88]; rows sum to 0 [89]."""
    return A * centred_logit_perturbation(A, dL)


def softmax_jvp_matmul(A: torch.Tensor, dL: torch.Tensor, v: torch.Tensor,
                       O: torch.Tensor | None = None) -> torch.Tensor:
    """``dA v`` with ``dA = softmax_jvp(A, dL)``, without forming ``dA``.

    ``dA v = (A*dL) v - rowsum(A*dL) (A v)``; ``O = A v`` if already known. ``dL`` must be
    finite where ``A`` is 0 (a window's logit perturbation is: it is not masked).
    """
    AdL = A * dL
    if O is None:
        O = torch.matmul(A, v)
    return torch.matmul(AdL, v).sub_(AdL.sum(-1, keepdim=True) * O)


# -- replica coupling [19] ------------------------------------------------------------------------
def swap_replica_halves(x: torch.Tensor) -> torch.Tensor:
    """``[a; b] -> [b; a]`` along dim 0: the partner of each batch row (replica-major layout)."""
    half = x.shape[0] // 2
    return torch.cat([x[half:], x[:half]], dim=0)


def couple(intra: torch.Tensor, inter: torch.Tensor | None, g: float) -> torch.Tensor:
    """``1/(1+g) intra + g/(1+g) inter`` [19]; ``intra`` itself (not weighted by 1) at ``g == 0``."""
    g = validate_coupling(g)
    if g == 0.0:
        return intra
    w_intra, w_inter = mixture_weights(g)
    return w_intra * intra + w_inter * inter


# -- row reductions [92] ------------------------------------------------------------------------------
def effective_width(p: torch.Tensor) -> torch.Tensor:
    """``N_eff,i = 1/sum_j p_ij^2`` of each row, ``(..., N) -> (...)``; in [1, N] for a stochastic row."""
    return torch.linalg.vector_norm(p, dim=-1).pow(-2)


def row_entropy(p: torch.Tensor) -> torch.Tensor:
    """``H_i = -sum_j p_ij ln p_ij`` of each row in nats (``0 ln 0 = 0``), ``(..., N) -> (...)``."""
    return torch.special.entr(p).sum(-1)


def top_k_rows(p: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(values, indices)`` of the ``k`` largest entries of each row, descending."""
    if k > p.shape[-1]:
        raise ValueError(f"top_k={k} exceeds the number of keys {p.shape[-1]}")
    return torch.topk(p, k, dim=-1)
