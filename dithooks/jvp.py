"""Linearised DiT blocks: per-block JVPs and the routing / modulation split (THEORY §3).

Setting: one DiT block (``BasicTransformerBlock``, ``norm_type="ada_norm_zero"``) [13-14]

    h_mid  = h     + a1 * W_O Attn(adaLN1(h))            a1 = gate_msa
    h_post = h_mid + a2 * MLP(adaLN2(h_mid))             a2 = gate_mlp

with the conditioning (timestep, class label) held fixed, linearised in its residual input
``h`` along a direction ``delta``. Replica language (THEORY §2-3): two replicas at
``h^{a,b} = h +- eps*delta`` around the *symmetric state* ``h``, coupled with strength ``g``
[19]. Every part returned by :func:`block_jvp` is the derivative at ``eps = 0`` of half the
replica difference, ``d/d eps [(f(h^a) - f(h^b)) / 2]``, of some piece ``f`` of the block; at
``g = 0`` this is simply the ordinary JVP ``J_f(h) delta``.

Parts (all shaped like ``h``: (B, N, D), in residual-stream units):

``full``
    ``d h_post``: the whole block, identity included. Exactly
    ``delta + attn + mlp + cross``.
``attn``
    the attention branch ``a1 * W_O (O^a - O^b)/2``: ``a1 * W_O [rho R + xi M]`` per THEORY §3
    (W_O's bias drops out). Always the true (gated) coupled JVP.
``routing``
    value path only, pattern frozen at the symmetric state: ``a1 * W_O [rho(g) A dV]``
    (``apply_gates=False``: ``a1 * W_O [A dV]``).
``modulation``
    query/key path only, values frozen: ``a1 * W_O [xi(g) (dA_intra + g dA_inter) V]``
    (``apply_gates=False``: without ``xi``). With gates, ``routing + modulation == attn``.
``modulation_intra``, ``modulation_inter``
    ``a1 * W_O [dA_intra V]`` and ``a1 * W_O [dA_inter V]``, never gated.
``mlp``
    ``a2 * J_MLP(h_mid) delta``: the MLP branch (adaLN2 included) linearised at the symmetric
    ``h_mid`` and applied to ``delta`` itself. Token-wise (block-diagonal in token space), the
    ``J_MLP`` term of the propagator [33].
``cross``
    ``a2 * J_MLP(h_mid) attn``: the a1*a2 cross term the propagator drops [31-33].

Per-head quantities before ``W_O`` come from :func:`linearise_attention` (attention input and
its tangent given) or :func:`block_attention_terms` (a block's residual state and direction given);
:mod:`dithooks.probes.attention_terms` computes the same terms from captured ``A, dL, V, dV``.

Two methods give the same numbers: ``"fused"`` (default) propagates the tangent by hand (linear
maps as one GEMM each, LayerNorm and GELU by their analytic derivatives, the softmax by its
Jacobian [87-88]), computing the primal once and every requested part in the same pass; given
a :class:`BlockPrimal` read from the block's own forward (``primal=``, what the JVP hook points
do while sampling) it computes tangents only, about one block forward for ``full`` and two for
every part at once; ``"autograd"`` is the reference: ``torch.func.jvp`` through the actual
diffusers modules (math SDPA backend, since forward AD fails through CPU SDPA), with replicas
run for real through a coupled :class:`~dithooks.attention.processor.HookedAttnProcessor` and the
pattern or the values frozen by its interventions. The tests pin one to the other and both to
finite differences. The fused method calls module ``forward`` methods directly, so hook
functions do not fire during linearisation; pass ``conditioning``
to linearise at intervened adaLN values.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from .attention.functional import attention_pattern, logit_perturbations, softmax_jvp, softmax_jvp_matmul
from .attention.install import temporary_processor
from .attention.processor import HookedAttnProcessor
from .attention.window import window_mask
from .gates import rho, validate_coupling, xi

ALL_PARTS = ("full", "attn", "routing", "modulation", "modulation_intra", "modulation_inter",
             "mlp", "cross")
DEFAULT_PARTS = ("full", "attn", "routing", "modulation", "mlp")


# -- conditioning ------------------------------------------------------------------------------
@dataclass(frozen=True)
class AdaLNConditioning:
    """The six adaLN-Zero vectors of a block, each (B, D): chunks of ``norm1.linear``."""

    shift_msa: torch.Tensor
    scale_msa: torch.Tensor
    gate_msa: torch.Tensor
    shift_mlp: torch.Tensor
    scale_mlp: torch.Tensor
    gate_mlp: torch.Tensor


def adaln_conditioning(block: nn.Module, timestep: torch.Tensor, class_labels: torch.Tensor,
                       dtype: torch.dtype = torch.float32) -> AdaLNConditioning:
    """Shift/scale/gate vectors from (t, y), as ``AdaLayerNormZero.forward`` computes them."""
    norm1 = block.norm1
    emb = norm1.emb(timestep, class_labels, hidden_dtype=dtype)
    emb = norm1.linear.forward(norm1.silu(emb))  # .forward: adaLN hook functions do not fire
    return AdaLNConditioning(*emb.chunk(6, dim=1))


def _check_block(block: nn.Module) -> None:
    if getattr(block, "norm_type", None) != "ada_norm_zero":
        raise NotImplementedError(f"block_jvp handles adaLN-Zero DiT blocks, got norm_type="
                                  f"{getattr(block, 'norm_type', None)!r}")
    if block.attn2 is not None or block.pos_embed is not None or block._chunk_size is not None:
        raise NotImplementedError("block_jvp handles DiT blocks without cross-attention, "
                                  "block-level positional embedding or chunked feed-forward")
    if block.attn1.residual_connection:
        raise NotImplementedError("attention with residual_connection=True is not supported")


def adaln1(block: nn.Module, h: torch.Tensor, cond: AdaLNConditioning) -> torch.Tensor:
    """``x = LayerNorm(h) (1 + scale_msa) + shift_msa``: what attention reads [13] (hooks stay silent)."""
    return block.norm1.norm.forward(h) * (1 + cond.scale_msa[:, None]) + cond.shift_msa[:, None]


# -- attention, linearised ---------------------------------------------------------------------
def _split_heads(attn: nn.Module, t: torch.Tensor) -> torch.Tensor:
    b, n, c = t.shape
    return t.view(b, n, attn.heads, c // attn.heads).transpose(1, 2)


def _merge_heads(t: torch.Tensor) -> torch.Tensor:
    b, heads, n, d = t.shape
    return t.transpose(1, 2).reshape(b, n, heads * d)


def project_qkv(attn: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-head ``Q, K, V`` (B, heads, N, d_head) as the processor computes them (norm_q/k too)."""
    return _qkv_primal(attn, (attn.to_q(x), attn.to_k(x), attn.to_v(x)))


@dataclass(frozen=True)
class AttentionDifference:
    """Linearised attention difference at the symmetric state, per head (THEORY §3, [20-25]).

    Shapes: ``(B, heads, N, N)`` for ``A``, ``dL_*``, ``dA_*``; ``(B, heads, N, d_head)`` for
    ``Q, K, V, dQ, dK, dV, O, R, M, M_intra, M_inter``. All before ``W_O`` and before ``a1``.

    * ``A = softmax(Q K^T / sqrt(d_h))`` (window-masked if a window was given), ``O = A V``;
    * ``dL_intra = (dQ K^T + Q dK^T)/sqrt(d_h)`` (block aa; bb is ``-dL_intra``),
      ``dL_inter = (dQ K^T - Q dK^T)/sqrt(d_h)`` (block ab; ba is ``-dL_inter``);
    * ``dA_x = A * (dL_x - rowsum(A * dL_x))``, the softmax Jacobian [87-88] (rows sum to 0);
    * ``R = A dV`` (routing, ungated), ``M_intra = dA_intra V``, ``M_inter = dA_inter V``,
      ``M = M_intra + g M_inter`` (modulation, ungated: no ``xi``);
    * :meth:`difference` ``= rho(g) R + xi(g) M = (O^a - O^b)/2`` to first order [25].

    Outside a window ``A`` and ``dA`` are 0; ``dL`` there is not masked and carries no meaning.
    """

    A: torch.Tensor
    dL_intra: torch.Tensor
    dL_inter: torch.Tensor
    dA_intra: torch.Tensor
    dA_inter: torch.Tensor
    Q: torch.Tensor
    K: torch.Tensor
    V: torch.Tensor
    dQ: torch.Tensor
    dK: torch.Tensor
    dV: torch.Tensor
    O: torch.Tensor
    R: torch.Tensor
    M: torch.Tensor
    M_intra: torch.Tensor
    M_inter: torch.Tensor
    g: float
    rho: float
    xi: float

    def difference(self, apply_gates: bool = True) -> torch.Tensor:
        """Per-head ``rho R + xi M`` (or ``R + M`` ungated)."""
        if apply_gates:
            return self.rho * self.R + self.xi * self.M
        return self.R + self.M


def _pattern(q: torch.Tensor, k: torch.Tensor, window: int | None) -> torch.Tensor:
    """The (window-masked) pattern, as the processor's explicit path forms it."""
    mask = window_mask(q.shape[-2], window, q.device) if window is not None else None
    return attention_pattern(q, k, mask)


def linearise_attention(attn_module: nn.Module, x: torch.Tensor, dx: torch.Tensor,
                               g: float = 0.0, *, window: int | None = None) -> AttentionDifference:
    """Per-head ``A, dL_intra, dL_inter, V, dV, R, M, ...`` at the symmetric state.

    ``x = adaLN1(h)`` is the block's attention input at the symmetric state and ``dx`` its JVP
    along the replica half-difference ``delta`` (``x^{a,b} = x +- dx`` to first order). ``dQ``,
    ``dK``, ``dV`` are the projections' JVPs (``W dx``, through ``norm_q``/``norm_k`` if any).
    See :class:`AttentionDifference` for the definitions.
    """
    g = validate_coupling(g)
    with torch.no_grad():
        (q, k, v), (dq, dk, dv) = qkv_jvp(attn_module, x, dx)
        A = _pattern(q, k, window)
        dL_intra, dL_inter = logit_perturbations(q, k, dq, dk)
        dA_intra, dA_inter = softmax_jvp(A, dL_intra), softmax_jvp(A, dL_inter)
        M_intra, M_inter = torch.matmul(dA_intra, v), torch.matmul(dA_inter, v)
        return AttentionDifference(
            A=A, dL_intra=dL_intra, dL_inter=dL_inter, dA_intra=dA_intra, dA_inter=dA_inter,
            Q=q, K=k, V=v, dQ=dq, dK=dk, dV=dv, O=torch.matmul(A, v), R=torch.matmul(A, dv),
            M=M_intra + g * M_inter, M_intra=M_intra, M_inter=M_inter, g=g, rho=rho(g), xi=xi(g))


def block_attention_terms(block: nn.Module, h: torch.Tensor, delta: torch.Tensor, *,
                          timestep: torch.Tensor, class_labels: torch.Tensor, g: float = 0.0,
                          window: int | None = None,
                          conditioning: AdaLNConditioning | None = None) -> AttentionDifference:
    """Per-head linearised attention of one block at residual state ``h`` along ``delta``.

    Runs adaLN1 and its JVP (``x = adaLN1(h)``, ``dx = J_adaLN1 delta``) and hands them to
    :func:`linearise_attention`: the pattern, logit perturbations, values and value
    perturbations that the routing/modulation analysis (THEORY §3, Appendix B) needs.
    """
    _check_block(block)
    g = validate_coupling(g)
    timestep = torch.as_tensor(timestep, device=h.device).reshape(-1).expand(h.shape[0])
    class_labels = torch.as_tensor(class_labels, device=h.device).reshape(-1).expand(h.shape[0])
    with torch.no_grad():
        cond = conditioning if conditioning is not None else adaln_conditioning(
            block, timestep, class_labels, h.dtype)
        y, dy = layer_norm_jvp(block.norm1.norm, h, delta)
        x = y * (1 + cond.scale_msa[:, None]) + cond.shift_msa[:, None]
        dx = dy * (1 + cond.scale_msa[:, None])
        return linearise_attention(block.attn1, x, dx, g, window=window)


# -- block JVP ---------------------------------------------------------------------------------
def _check_parts(parts: Sequence[str]) -> tuple[str, ...]:
    parts = tuple(parts)
    unknown = set(parts) - set(ALL_PARTS)
    if unknown:
        raise ValueError(f"unknown JVP parts {sorted(unknown)}; known: {list(ALL_PARTS)}")
    return parts


def block_jvp(block: nn.Module, h: torch.Tensor, delta: torch.Tensor, *, timestep: torch.Tensor,
              class_labels: torch.Tensor, parts: Sequence[str] = DEFAULT_PARTS, g: float = 0.0,
              apply_gates: bool = True, window: int | None = None,
              conditioning: AdaLNConditioning | None = None,
              method: str = "fused", heads: Sequence[str] = (),
              primal: BlockPrimal | None = None) -> dict[str, torch.Tensor]:
    """Linearise one DiT block at ``h`` (B, N, D) along ``delta``; returns ``{part: (B, N, D)}``.

    ``timestep`` and ``class_labels`` (B,) are held fixed; ``g`` is the replica coupling [19] at
    which the difference mode is propagated (0: the ordinary JVP); ``apply_gates`` says whether
    ``routing``/``modulation`` carry ``rho(g)``/``xi(g)``; ``window`` restricts attention as the
    local denoiser does (THEORY §7). The parts are defined in the module docstring. The model
    should be in ``eval()`` mode (dropout is not linearised).

    ``heads`` (fused only): per-head terms from :data:`HEAD_TERMS` computed in the same pass
    (as :func:`block_attention_terms` gives them), returned under their names. ``primal``
    (fused only): a :class:`BlockPrimal` of the block's own forward at ``h``; the primal is then
    not recomputed (``conditioning`` is ignored: ``primal.cond`` is used).
    """
    parts = _check_parts(parts)
    unknown = set(heads) - set(HEAD_TERMS)
    if unknown:
        raise ValueError(f"unknown head terms {sorted(unknown)}; known: {list(HEAD_TERMS)}")
    if method != "fused" and (heads or primal is not None):
        raise ValueError("heads and primal are options of the fused method")
    g = validate_coupling(g)
    _check_block(block)
    if h.shape != delta.shape or h.ndim != 3:
        raise ValueError(f"h and delta must both be (B, N, D), got {tuple(h.shape)} and "
                         f"{tuple(delta.shape)}")
    if primal is None:  # the embedders want one timestep / label per batch row
        timestep = torch.as_tensor(timestep, device=h.device).reshape(-1).expand(h.shape[0])
        class_labels = torch.as_tensor(class_labels, device=h.device).reshape(-1).expand(h.shape[0])
    if method == "autograd":
        return _block_jvp_autograd(block, h, delta, timestep, class_labels, parts, g, apply_gates,
                                   window)
    if method != "fused":
        raise ValueError(f"method must be 'fused' or 'autograd', got {method!r}")
    with torch.no_grad():  # forward mode only: no backward graph through the parameters
        if primal is not None:
            return block_tangents(block, h, delta, primal, parts, g, apply_gates, window, tuple(heads))
        cond = conditioning if conditioning is not None else adaln_conditioning(
            block, timestep, class_labels, h.dtype)
        return _block_jvp_fused(block, h, delta, cond, parts, g, apply_gates, window, tuple(heads))


def _block_jvp_fused(block, h, delta, cond, parts, g, apply_gates, window, heads=()):
    """The separate-primal path: the block's primal recomputed at ``h``, then :func:`block_tangents`."""
    return block_tangents(block, h, delta, block_primal(block, h, cond), parts, g, apply_gates, window,
                          heads)


@dataclass(frozen=True)
class BlockPrimal:
    """What the tangent pass of a block needs from the block's own forward at ``h``.

    ``cond``: the adaLN vectors; ``qkv``: the outputs of ``attn1.to_q/to_k/to_v`` (B, N, D), before
    the head split and ``norm_q``/``norm_k``; ``h_mid``: the residual after attention (``norm3``'s
    input), None to rebuild it from the pattern; ``ff_hidden``: the output of the GELU layer's
    projection inside ``ff`` (the pre-activation), None to recompute the feed-forward primal;
    ``attn_heads``: attention's output before ``W_O``, heads merged (B, N, D): ``A V``, the input
    of ``attn1.to_out[0]``, None to form it from the pattern.
    Captured from a sampling forward (:mod:`dithooks.jvp_hooks`) the tangent rides along that
    forward: no projection of the block runs twice.
    """

    cond: AdaLNConditioning
    qkv: tuple[torch.Tensor, torch.Tensor, torch.Tensor]
    h_mid: torch.Tensor | None = None
    ff_hidden: torch.Tensor | None = None
    attn_heads: torch.Tensor | None = None


def block_primal(block: nn.Module, h: torch.Tensor, cond: AdaLNConditioning) -> BlockPrimal:
    """The primal pieces of :class:`BlockPrimal` computed anew at ``h`` (module hooks stay silent)."""
    x = adaln1(block, h, cond)
    attn = block.attn1
    return BlockPrimal(cond, (attn.to_q.forward(x), attn.to_k.forward(x), attn.to_v.forward(x)))


HEAD_TERMS = ("heads.pattern", "heads.v", "heads.dv", "heads.dlogits_intra", "heads.dlogits_inter")


def block_tangents(block: nn.Module, h: torch.Tensor, delta: torch.Tensor, primal: BlockPrimal,
                   parts: Sequence[str] = DEFAULT_PARTS, g: float = 0.0, apply_gates: bool = True,
                   window: int | None = None, heads: Sequence[str] = ()) -> dict[str, torch.Tensor]:
    """The JVP parts (and per-head terms ``heads``, names from :data:`HEAD_TERMS`) of a block at ``h``.

    Only tangents are computed here: every primal value comes from ``primal`` (the pattern is
    re-formed from its ``Q, K``; ``h_mid`` from ``A V`` when not given). Call under ``no_grad``.
    Parts that map per-head terms through ``W_O`` share one GEMM; equal terms (at ``g = 0`` the
    modulation is its intra part) are mapped once. Part values may be views of one tensor.
    """
    cond = primal.cond
    attn = block.attn1
    want = set(parts)
    out: dict[str, torch.Tensor] = {}
    need_mlp = bool(want & {"mlp", "full", "cross"})
    need_attn_tangent = bool(heads) or bool(want - {"mlp"})

    A = attn_d = None
    if need_attn_tangent:
        dx = layer_norm_tangent(block.norm1.norm, h, delta, scale=1 + cond.scale_msa[:, None])
        (q, k, v), (dq, dk, dv) = _qkv_tangents(attn, primal.qkv, dx)
    elif primal.h_mid is None:  # the primal h_mid is formed from A V
        q, k, v = _qkv_primal(attn, primal.qkv)
    if need_attn_tangent or primal.h_mid is None:
        k, v = k.contiguous(), v.contiguous()  # each feeds several matmuls: copy them once
        A = _pattern(q, k, window)
    if need_attn_tangent:
        s = q.shape[-1] ** -0.5
        inter = g != 0.0 or "modulation_inter" in want or "heads.dlogits_inter" in heads
        if inter or "heads.dlogits_intra" in heads:
            dqk = torch.matmul(dq * s, k.transpose(-1, -2))  # dQ K^T / sqrt(d_h)
            qdk = torch.matmul(q * s, dk.transpose(-1, -2))  # Q dK^T / sqrt(d_h)
            dL_intra, dL_inter = dqk + qdk, (dqk - qdk if inter else None)
        else:  # [dQ, Q] [K, dK]^T: both terms in one matmul, no N x N sum
            dL_intra = torch.matmul(torch.cat([dq, q], -1).mul_(s), torch.cat([k, dk], -1).transpose(-1, -2))
            dL_inter = None
        if heads:
            terms = {"heads.pattern": A, "heads.v": v, "heads.dv": dv, "heads.dlogits_intra": dL_intra,
                     "heads.dlogits_inter": dL_inter}
            out.update({n: terms[n] for n in heads})
    O = None  # A V per head: what attention computed (given by the forward, else formed once)
    if primal.attn_heads is not None:
        O = _split_heads(attn, primal.attn_heads)
    if want - {"mlp"}:
        if O is None:
            O = torch.matmul(A, v)

        R = torch.matmul(A, dv)
        M_intra = softmax_jvp_matmul(A, dL_intra, v, O)  # dA V, the softmax Jacobian [87-88]
        M_inter = softmax_jvp_matmul(A, dL_inter, v, O) if g != 0.0 or "modulation_inter" in want else None
        M = M_intra + g * M_inter if g != 0.0 else M_intra
        r, x_i = rho(g), xi(g)

        def times(c, t):  # c * t, and t itself for c = 1 (exact either way)
            return t if c == 1.0 else c * t

        per_head: dict[str, torch.Tensor] = {}
        if "routing" in want:
            per_head["routing"] = times(r, R) if apply_gates else R
        if "modulation" in want:
            per_head["modulation"] = times(x_i, M) if apply_gates else M
        if "modulation_intra" in want:
            per_head["modulation_intra"] = M_intra
        if "modulation_inter" in want:
            per_head["modulation_inter"] = M_inter
        attn_from_parts = apply_gates and "routing" in per_head and "modulation" in per_head
        if want & {"attn", "full", "cross"} and not attn_from_parts:
            per_head["attn"] = times(r, R) + times(x_i, M)
        out.update(_to_residual(attn, cond, per_head))
        if want & {"attn", "full", "cross"}:
            attn_d = out["routing"] + out["modulation"] if attn_from_parts else out["attn"]
            out["attn"] = attn_d
    if need_mlp:
        h_mid = primal.h_mid
        if h_mid is None:
            # primal h_mid at the symmetric state (the coupled output equals A V there for any g)
            o = attn.to_out[0].forward(_merge_heads(O if O is not None else torch.matmul(A, v)))
            o = o / attn.rescale_output_factor
            h_mid = h + cond.gate_msa[:, None] * o
        tangents = {}
        if "mlp" in want or {"full", "cross"} <= want:
            tangents["mlp"] = delta
        if "cross" in want or {"full", "mlp"} <= want:
            tangents["cross"] = attn_d
        if "full" in want and not tangents:
            tangents["mid"] = delta + attn_d  # J_MLP(delta + attn) in one tangent pass
        names = list(tangents)
        stacked = tangents[names[0]][None] if len(names) == 1 else torch.stack([tangents[n] for n in names])
        jv = mlp_branch_jvp(block, h_mid, cond, stacked, ff_hidden=primal.ff_hidden)
        jv = dict(zip(names, jv.unbind(0)))
        out.update({n: jv[n] for n in ("mlp", "cross") if n in want})
        if "full" in want:
            out["full"] = delta + attn_d + (jv["mid"] if "mid" in jv else jv["mlp"] + jv["cross"])
    return {p: out[p] for p in (*parts, *heads)}


def _to_residual(attn: nn.Module, cond: AdaLNConditioning,
                 per_head: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``a1 * W_O z / rescale`` (no bias) of each per-head tangent ``z``, all in one GEMM."""
    if not per_head:
        return {}
    unique: list[torch.Tensor] = []
    index: dict[str, int] = {}
    for name, z in per_head.items():
        i = next((j for j, u in enumerate(unique) if u is z), None)
        if i is None:
            unique.append(z)
            i = len(unique) - 1
        index[name] = i
    # (P, B, heads, N, d) -> (P, B, N, heads*d): stacking the transposed views is the one copy
    b, n_heads, n, d = unique[0].shape
    z = torch.stack([u.transpose(1, 2) for u in unique]).view(len(unique), b, n, n_heads * d)
    res = F.linear(z, attn.to_out[0].weight).mul_(cond.gate_msa[:, None])
    if attn.rescale_output_factor != 1.0:
        res = res / attn.rescale_output_factor
    return {name: res[i] for name, i in index.items()}


# -- forward-mode pieces written out --------------------------------------------------------------
# torch.func.jvp of nn.Linear runs two matmuls for the tangent on CPU (the weight's absent
# tangent is materialised), tripling the cost of every projection; linear maps are therefore
# propagated by hand (dy = W dx, one GEMM, all tangents stacked), and only elementwise maps and
# norms go through the analytic formulas below. The autograd method cross-checks all of it.
def layer_norm_jvp(norm: nn.Module, x: torch.Tensor, dx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(norm(x), J dx)`` for a LayerNorm over the last axis; ``dx`` may carry extra leading axes.

    ``J dx = rstd (dx - mean(dx) - xhat mean(xhat dx))`` (times the weight when affine).
    """
    if not _plain_layer_norm(norm):
        return _jvp_stacked(norm.forward, x, dx)
    # .forward: hooks on the norm (resid_mid reads norm3's input) stay silent
    return norm.forward(x), layer_norm_tangent(norm, x, dx)


def _plain_layer_norm(norm: nn.Module) -> bool:
    return isinstance(norm, nn.LayerNorm) and len(norm.normalized_shape) == 1


def layer_norm_tangent(norm: nn.Module, x: torch.Tensor, dx: torch.Tensor,
                       scale: torch.Tensor | None = None) -> torch.Tensor:
    """``J dx`` of :func:`layer_norm_jvp` alone (the primal ``norm(x)`` is not formed), times
    ``scale`` when given (broadcast against ``x``: adaLN's ``1 + scale``)."""
    if not _plain_layer_norm(norm):
        t = _jvp_stacked(norm.forward, x, dx)[1]
        return t if scale is None else t * scale
    # xhat and 1/std in one pass, as LayerNorm itself computes them
    xhat, _, rstd = torch.native_layer_norm(x, norm.normalized_shape, None, None, norm.eps)
    factor = rstd.to(x.dtype)
    if norm.weight is not None:
        factor = factor * norm.weight
    if scale is not None:
        factor = factor * scale
    dxhat = dx - dx.mean(-1, keepdim=True)
    dxhat.sub_(xhat * (xhat * dx).mean(-1, keepdim=True))
    return dxhat.mul_(factor)


def qkv_jvp(attn: nn.Module, x: torch.Tensor, dx: torch.Tensor):
    """``((Q, K, V), (dQ, dK, dV))`` per head, as :func:`project_qkv` computes them."""
    return _qkv_tangents(attn, (attn.to_q.forward(x), attn.to_k.forward(x), attn.to_v.forward(x)), dx)


def _qkv_tangents(attn: nn.Module, qkv: Sequence[torch.Tensor], dx: torch.Tensor):
    """Per-head ``(Q, K, V), (dQ, dK, dV)`` from the projections' outputs ``qkv`` (B, N, D)."""
    prims, tans = [], []
    for lin, proj, norm in zip(qkv, (attn.to_q, attn.to_k, attn.to_v), (attn.norm_q, attn.norm_k, None)):
        p, t = _split_heads(attn, lin), _split_heads(attn, F.linear(dx, proj.weight))
        if norm is not None:
            p, t = torch.func.jvp(norm, (p,), (t,))
        prims.append(p)
        tans.append(t)
    return tuple(prims), tuple(tans)


def _qkv_primal(attn: nn.Module, qkv: Sequence[torch.Tensor]):
    out = []
    for lin, norm in zip(qkv, (attn.norm_q, attn.norm_k, None)):
        p = _split_heads(attn, lin)
        out.append(norm(p) if norm is not None else p)
    return tuple(out)


def mlp_branch_jvp(block: nn.Module, h_mid: torch.Tensor, cond: AdaLNConditioning,
                   tangents: torch.Tensor, ff_hidden: torch.Tensor | None = None) -> torch.Tensor:
    """``a2 J_MLP(h_mid) t`` for a stack of tangents (T, B, N, D); the primal runs once.

    ``ff_hidden``: the GELU projection's output of the forward at ``h_mid`` (see
    :class:`BlockPrimal`); given, and the feed-forward a GELU-Linear one, no primal runs here.
    """
    dz = layer_norm_tangent(block.norm3, h_mid, tangents, scale=1 + cond.scale_mlp[:, None])
    if ff_hidden is not None and gelu_linear_layers(block.ff, ff_hidden.device) is not None:
        dout = feed_forward_tangent(block.ff, ff_hidden, dz)
    else:
        z = block.norm3.forward(h_mid) * (1 + cond.scale_mlp[:, None]) + cond.shift_mlp[:, None]
        _, dout = feed_forward_jvp(block.ff, z, dz)
    return dout.mul_(cond.gate_mlp[:, None])


def gelu_linear_layers(ff: nn.Module, device: torch.device | None = None):
    """``(GELU, Linear)`` when ``ff.net`` is diffusers' GELU-proj, dropout, Linear (else None)."""
    from diffusers.models.activations import GELU

    layers = [m for m in getattr(ff, "net", ()) if not isinstance(m, nn.Dropout)]
    if (len(layers) != 2 or type(layers[0]) is not GELU or not isinstance(layers[1], nn.Linear)
            or (device is not None and torch.device(device).type == "mps")):
        return None
    return layers[0], layers[1]


def feed_forward_tangent(ff: nn.Module, ff_hidden: torch.Tensor, dx: torch.Tensor) -> torch.Tensor:
    """``J_ff dx`` of a GELU-Linear feed-forward from its GELU pre-activation ``ff_hidden``."""
    gelu, out = gelu_linear_layers(ff)
    du = F.linear(dx, gelu.proj.weight)
    # gelu'(u), from the op autograd itself uses
    if du.shape == ff_hidden.shape:  # one tangent: gelu_backward scales it directly
        return F.linear(torch.ops.aten.gelu_backward(du, ff_hidden, approximate=gelu.approximate), out.weight)
    slope = torch.ops.aten.gelu_backward(torch.ones_like(ff_hidden), ff_hidden, approximate=gelu.approximate)
    return F.linear(du.mul_(slope), out.weight)


def feed_forward_jvp(ff: nn.Module, x: torch.Tensor, dx: torch.Tensor):
    """``(ff(x), J dx)`` for diffusers' FeedForward (GELU-proj, dropout, Linear), eval mode."""
    from diffusers.models.activations import GELU

    for i, layer in enumerate(ff.net):
        if isinstance(layer, nn.Dropout):
            continue  # identity in eval mode
        if isinstance(layer, nn.Linear):
            x, dx = layer.forward(x), F.linear(dx, layer.weight)
        elif type(layer) is GELU and x.device.type != "mps":
            u, du = layer.proj.forward(x), F.linear(dx, layer.proj.weight)
            x = F.gelu(u, approximate=layer.approximate)
            # gelu'(u), from the op autograd itself uses
            slope = torch.ops.aten.gelu_backward(torch.ones_like(u), u, approximate=layer.approximate)
            dx = slope * du
        else:  # anything else (GEGLU, ...): generic forward AD over the remaining layers
            rest = nn.Sequential(*list(ff.net)[i:])
            return _jvp_stacked(rest, x, dx)
    return x, dx


def _jvp_stacked(fn, x: torch.Tensor, dx: torch.Tensor):
    """``torch.func.jvp`` of ``fn`` at ``x`` for ``dx`` shaped like ``x`` or a stack of them."""
    if dx.shape == x.shape:
        return torch.func.jvp(fn, (x,), (dx,))
    y = fn(x)
    return y, torch.func.vmap(lambda t: torch.func.jvp(fn, (x,), (t,))[1])(dx)


# -- reference: autograd through the actual diffusers modules ------------------------------------
def _block_jvp_autograd(block, h, delta, timestep, class_labels, parts, g, apply_gates, window):
    """Reference: ``torch.func.jvp`` through diffusers' own modules, math SDPA backend.

    At ``g = 0`` this is the plain JVP of the block (or branch) at ``h``. At ``g > 0`` the
    replicas run for real, as the replica-major batch ``[h + u; h - u]`` through a coupled
    :class:`HookedAttnProcessor`, and the JVP is taken of ``u -> (f^a - f^b)/2`` at ``u = 0``.
    Routing/modulation freeze Q,K or V by replacing them (an intervention) with their
    symmetric-state values, which carry no tangent.
    """
    attn = block.attn1
    b = h.shape[0]
    t1 = torch.as_tensor(timestep).reshape(-1).expand(b)
    y1 = torch.as_tensor(class_labels).reshape(-1).expand(b)
    out: dict[str, torch.Tensor] = {}

    def jvp_at(f, gg: float, frozen: dict | None = None):
        """JVP of ``f(hh, t, y)`` (difference mode when coupled), with optional frozen q/k/v."""
        paired = gg != 0.0
        frozen = {n: (torch.cat([v, v]) if paired else v) for n, v in (frozen or {}).items()}
        proc = HookedAttnProcessor(-1, emit=(lambda n, t: frozen.get(n, t)) if frozen else None,
                                   wanted=frozenset(frozen), coupling=gg if paired else None,
                                   window=window)
        with temporary_processor(attn, proc):
            if not paired:
                return torch.func.jvp(lambda hh: f(hh, t1, y1), (h,), (delta,))[1]

            def fn(u):
                y = f(torch.cat([h + u, h - u]), torch.cat([t1, t1]), torch.cat([y1, y1]))
                return (y[:b] - y[b:]) / 2
            return torch.func.jvp(fn, (torch.zeros_like(delta),), (delta,))[1]

    def attn_branch(hh, tt, yy):  # a1 * Attn(adaLN1(hh)) through the real modules
        x, gate_msa, *_ = block.norm1(hh, tt, yy, hidden_dtype=hh.dtype)
        return gate_msa[:, None] * attn(x)

    with torch.no_grad(), sdpa_kernel([SDPBackend.MATH]):
        x0, gate_msa, shift_mlp, scale_mlp, gate_mlp = block.norm1(h, t1, y1, hidden_dtype=h.dtype)
        q0, k0, v0 = project_qkv(attn, x0)
        frozen_qk, frozen_v = {"attn.q": q0, "attn.k": k0}, {"attn.v": v0}
        if "full" in parts:
            out["full"] = jvp_at(lambda hh, tt, yy: block(hh, timestep=tt, class_labels=yy), g)
        attn_d = jvp_at(attn_branch, g)
        out["attn"] = attn_d
        if "routing" in parts:
            # frozen pattern: (O^a - O^b)/2 = rho(g) A dV; ungated is the same at g = 0
            out["routing"] = jvp_at(attn_branch, g if apply_gates else 0.0, frozen_qk)
        if {"modulation", "modulation_intra", "modulation_inter"} & set(parts):
            mod_g = jvp_at(attn_branch, g, frozen_v)  # xi(g) (dA_intra + g dA_inter) V
            out["modulation"] = mod_g if apply_gates else mod_g / xi(g)
            intra = jvp_at(attn_branch, 0.0, frozen_v)  # g = 0: dA_intra V
            out["modulation_intra"] = intra
            out["modulation_inter"] = jvp_at(attn_branch, 1.0, frozen_v) / xi(1.0) - intra
        if {"mlp", "cross"} & set(parts):
            with temporary_processor(attn, HookedAttnProcessor(-1, window=window)):
                h_mid = h + gate_msa[:, None] * attn(x0)

            def mlp(hh):
                y = block.norm3(hh) * (1 + scale_mlp[:, None]) + shift_mlp[:, None]
                return gate_mlp[:, None] * block.ff(y)
            if "mlp" in parts:
                out["mlp"] = torch.func.jvp(mlp, (h_mid,), (delta,))[1]
            if "cross" in parts:
                out["cross"] = torch.func.jvp(mlp, (h_mid,), (attn_d,))[1]
    return {p: out[p] for p in parts}
