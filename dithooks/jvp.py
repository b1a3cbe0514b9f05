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
Jacobian [87-88]), computing the primal once and every requested part in the same pass, about
2x the cost of a forward; ``"autograd"`` is the reference: ``torch.func.jvp`` through the actual
diffusers modules (math SDPA backend, since forward AD fails through CPU SDPA), with replicas
run for real through a coupled :class:`~dithooks.attention.processor.HookedAttnProcessor` and the
pattern or the values frozen by its interventions. The tests pin one to the other and both to
finite differences. The fused method calls module ``forward`` methods directly where the
adapter places hooks, so hook functions do not fire during linearisation; pass ``conditioning``
to linearise at intervened adaLN values.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

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
    """``x = LayerNorm(h) (1 + scale_msa) + shift_msa``: what attention reads [13]."""
    return block.norm1.norm(h) * (1 + cond.scale_msa[:, None]) + cond.shift_msa[:, None]


def mlp_branch(block: nn.Module, h_mid: torch.Tensor, cond: AdaLNConditioning) -> torch.Tensor:
    """``a2 * FF(LayerNorm(h_mid) (1 + scale_mlp) + shift_mlp)``: the gated MLP branch [14]."""
    y = block.norm3.forward(h_mid) * (1 + cond.scale_mlp[:, None]) + cond.shift_mlp[:, None]
    return cond.gate_mlp[:, None] * block.ff.forward(y)


# -- attention, linearised ---------------------------------------------------------------------
def _split_heads(attn: nn.Module, t: torch.Tensor) -> torch.Tensor:
    b, n, c = t.shape
    return t.view(b, n, attn.heads, c // attn.heads).transpose(1, 2)


def _merge_heads(t: torch.Tensor) -> torch.Tensor:
    b, heads, n, d = t.shape
    return t.transpose(1, 2).reshape(b, n, heads * d)


def project_qkv(attn: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-head ``Q, K, V`` (B, heads, N, d_head) as the processor computes them (norm_q/k too)."""
    q = _split_heads(attn, attn.to_q(x))
    k = _split_heads(attn, attn.to_k(x))
    v = _split_heads(attn, attn.to_v(x))
    if attn.norm_q is not None:
        q = attn.norm_q(q)
    if attn.norm_k is not None:
        k = attn.norm_k(k)
    return q, k, v


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


def _softmax_jvp(A: torch.Tensor, dL: torch.Tensor) -> torch.Tensor:
    """``dA_ij = A_ij (dL_ij - sum_k A_ik dL_ik)`` [87-88]."""
    AdL = A * dL
    return AdL - A * AdL.sum(-1, keepdim=True)


def _pattern(q: torch.Tensor, k: torch.Tensor, window: int | None) -> torch.Tensor:
    logits = torch.matmul(q, k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    mask = window_mask(q.shape[-2], window, q.device) if window is not None else None
    if mask is not None:
        logits = logits.masked_fill(~mask, float("-inf"))
    return torch.softmax(logits, dim=-1)


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
        s = q.shape[-1] ** -0.5
        dqk = torch.matmul(dq, k.transpose(-1, -2)) * s
        qdk = torch.matmul(q, dk.transpose(-1, -2)) * s
        dL_intra, dL_inter = dqk + qdk, dqk - qdk
        dA_intra, dA_inter = _softmax_jvp(A, dL_intra), _softmax_jvp(A, dL_inter)
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
              method: str = "fused") -> dict[str, torch.Tensor]:
    """Linearise one DiT block at ``h`` (B, N, D) along ``delta``; returns ``{part: (B, N, D)}``.

    ``timestep`` and ``class_labels`` (B,) are held fixed; ``g`` is the replica coupling [19] at
    which the difference mode is propagated (0: the ordinary JVP); ``apply_gates`` says whether
    ``routing``/``modulation`` carry ``rho(g)``/``xi(g)``; ``window`` restricts attention as the
    local denoiser does (THEORY §7). The parts are defined in the module docstring. The model
    should be in ``eval()`` mode (dropout is not linearised).
    """
    parts = _check_parts(parts)
    g = validate_coupling(g)
    _check_block(block)
    if h.shape != delta.shape or h.ndim != 3:
        raise ValueError(f"h and delta must both be (B, N, D), got {tuple(h.shape)} and "
                         f"{tuple(delta.shape)}")
    # the embedders want one timestep / label per batch row
    timestep = torch.as_tensor(timestep, device=h.device).reshape(-1).expand(h.shape[0])
    class_labels = torch.as_tensor(class_labels, device=h.device).reshape(-1).expand(h.shape[0])
    if method == "autograd":
        return _block_jvp_autograd(block, h, delta, timestep, class_labels, parts, g, apply_gates,
                                   window)
    if method != "fused":
        raise ValueError(f"method must be 'fused' or 'autograd', got {method!r}")
    with torch.no_grad():  # forward mode only: no backward graph through the parameters
        cond = conditioning if conditioning is not None else adaln_conditioning(
            block, timestep, class_labels, h.dtype)
        return _block_jvp_fused(block, h, delta, cond, parts, g, apply_gates, window)


def _block_jvp_fused(block, h, delta, cond, parts, g, apply_gates, window):
    attn = block.attn1
    gate1 = cond.gate_msa[:, None]
    w_o = attn.to_out[0].weight
    want = set(parts)

    def to_residual(z_heads):  # per-head tangent -> residual stream: a1 * W_O z (no bias)
        return gate1 * F.linear(_merge_heads(z_heads), w_o) / attn.rescale_output_factor

    y, dy = layer_norm_jvp(block.norm1.norm, h, delta)
    x, dx = y * (1 + cond.scale_msa[:, None]) + cond.shift_msa[:, None], dy * (1 + cond.scale_msa[:, None])
    (q, k, v), (dq, dk, dv) = qkv_jvp(attn, x, dx)
    A = _pattern(q, k, window)
    s = q.shape[-1] ** -0.5
    # A*dL_intra = P1 + P2 and A*dL_inter = P1 - P2: the inter block costs no extra matmul
    P1 = A * (torch.matmul(dq, k.transpose(-1, -2)) * s)
    P2 = A * (torch.matmul(q, dk.transpose(-1, -2)) * s)

    def dA(AdL):  # softmax Jacobian [87-88]
        return AdL - A * AdL.sum(-1, keepdim=True)

    R = torch.matmul(A, dv)
    M_intra = torch.matmul(dA(P1 + P2), v)
    M_inter = torch.matmul(dA(P1 - P2), v) if g != 0.0 or "modulation_inter" in want else None
    M = M_intra + g * M_inter if g != 0.0 else M_intra
    r, x_i = rho(g), xi(g)

    out: dict[str, torch.Tensor] = {}
    if "routing" in want:
        out["routing"] = to_residual(r * R if apply_gates else R)
    if "modulation" in want:
        out["modulation"] = to_residual(x_i * M if apply_gates else M)
    if "modulation_intra" in want:
        out["modulation_intra"] = to_residual(M_intra)
    if "modulation_inter" in want:
        out["modulation_inter"] = to_residual(M_inter)
    if want & {"attn", "full", "cross"}:
        if apply_gates and "routing" in out and "modulation" in out:
            attn_d = out["routing"] + out["modulation"]
        else:
            attn_d = to_residual(r * R + x_i * M)
        out["attn"] = attn_d
    if want & {"mlp", "full", "cross"}:
        # primal h_mid at the symmetric state (the coupled output equals A V there for any g)
        o = attn.to_out[0](_merge_heads(torch.matmul(A, v))) / attn.rescale_output_factor
        h_mid = h + gate1 * o
        tangents = {}
        if "mlp" in want or {"full", "cross"} <= want:
            tangents["mlp"] = delta
        if "cross" in want or {"full", "mlp"} <= want:
            tangents["cross"] = attn_d
        if "full" in want and not tangents:
            tangents["mid"] = delta + attn_d  # J_MLP(delta + attn) in one tangent pass
        names = list(tangents)
        jv = mlp_branch_jvp(block, h_mid, cond, torch.stack([tangents[n] for n in names]))
        jv = dict(zip(names, jv.unbind(0)))
        out.update({n: jv[n] for n in ("mlp", "cross") if n in want})
        if "full" in want:
            out["full"] = delta + attn_d + (jv["mid"] if "mid" in jv else jv["mlp"] + jv["cross"])
    return {p: out[p] for p in parts}


# -- forward-mode pieces written out --------------------------------------------------------------
# torch.func.jvp of nn.Linear runs two matmuls for the tangent on CPU (the weight's absent
# tangent is materialised), tripling the cost of every projection; linear maps are therefore
# propagated by hand (dy = W dx, one GEMM, all tangents stacked), and only elementwise maps and
# norms go through the analytic formulas below. The autograd method cross-checks all of it.
def layer_norm_jvp(norm: nn.Module, x: torch.Tensor, dx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(norm(x), J dx)`` for a LayerNorm over the last axis; ``dx`` may carry extra leading axes.

    ``J dx = rstd (dx - mean(dx) - xhat mean(xhat dx))`` (times the weight when affine).
    """
    if not isinstance(norm, nn.LayerNorm) or len(norm.normalized_shape) != 1:
        return _jvp_stacked(norm.forward, x, dx)
    y = norm.forward(x)  # .forward: hooks on the norm (resid_mid reads norm3's input) stay silent
    xc = x - x.mean(-1, keepdim=True)
    rstd = torch.rsqrt(xc.square().mean(-1, keepdim=True) + norm.eps)
    xhat = xc * rstd
    dxhat = rstd * (dx - dx.mean(-1, keepdim=True) - xhat * (xhat * dx).mean(-1, keepdim=True))
    if norm.weight is not None:
        dxhat = dxhat * norm.weight
    return y, dxhat


def qkv_jvp(attn: nn.Module, x: torch.Tensor, dx: torch.Tensor):
    """``((Q, K, V), (dQ, dK, dV))`` per head, as :func:`project_qkv` computes them."""
    prims, tans = [], []
    for proj, norm in ((attn.to_q, attn.norm_q), (attn.to_k, attn.norm_k), (attn.to_v, None)):
        p, t = _split_heads(attn, proj(x)), _split_heads(attn, F.linear(dx, proj.weight))
        if norm is not None:
            p, t = torch.func.jvp(norm, (p,), (t,))
        prims.append(p)
        tans.append(t)
    return tuple(prims), tuple(tans)


def mlp_branch_jvp(block: nn.Module, h_mid: torch.Tensor, cond: AdaLNConditioning,
                   tangents: torch.Tensor) -> torch.Tensor:
    """``a2 J_MLP(h_mid) t`` for a stack of tangents (T, B, N, D); the primal runs once."""
    y, dy = layer_norm_jvp(block.norm3, h_mid, tangents)
    z, dz = y * (1 + cond.scale_mlp[:, None]) + cond.shift_mlp[:, None], dy * (1 + cond.scale_mlp[:, None])
    _, dout = feed_forward_jvp(block.ff, z, dz)
    return cond.gate_mlp[:, None] * dout


def feed_forward_jvp(ff: nn.Module, x: torch.Tensor, dx: torch.Tensor):
    """``(ff(x), J dx)`` for diffusers' FeedForward (GELU-proj, dropout, Linear), eval mode."""
    from diffusers.models.activations import GELU

    for i, layer in enumerate(ff.net):
        if isinstance(layer, nn.Dropout):
            continue  # identity in eval mode
        if isinstance(layer, nn.Linear):
            x, dx = layer(x), F.linear(dx, layer.weight)
        elif type(layer) is GELU and x.device.type != "mps":
            u, du = layer.proj(x), F.linear(dx, layer.proj.weight)
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
@contextlib.contextmanager
def _temporary_processor(attn: nn.Module, processor) -> Iterator[None]:
    saved = attn.processor
    attn.set_processor(processor)
    try:
        yield
    finally:
        attn.set_processor(saved)


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
        with _temporary_processor(attn, proc):
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
            with _temporary_processor(attn, HookedAttnProcessor(-1, window=window)):
                h_mid = h + gate_msa[:, None] * attn(x0)

            def mlp(hh):
                y = block.norm3(hh) * (1 + scale_mlp[:, None]) + shift_mlp[:, None]
                return gate_mlp[:, None] * block.ff(y)
            if "mlp" in parts:
                out["mlp"] = torch.func.jvp(mlp, (h_mid,), (delta,))[1]
            if "cross" in parts:
                out["cross"] = torch.func.jvp(mlp, (h_mid,), (attn_d,))[1]
    return {p: out[p] for p in parts}
