"""Routing versus modulation in the linearised replica attention difference (THEORY §3, §5).

Per head, at the symmetric state ``h^a = h^b = h`` with pattern ``A`` (``[..., N, N]``, rows
sum to 1, queries on rows) and values ``V`` (``[..., N, d_h]``), a replica perturbation
``h^{a,b} = h ± δ`` gives value and logit perturbations ``δV``, ``δL_intra``, ``δL_inter``
and, to first order [25],

    (O^a − O^b)/2 = ρ(g) · A δV  +  ξ(g) · (δA_intra + g δA_inter) V
    ρ(g) = (1−g)/(1+g)  (routing gate),     ξ(g) = 1/(1+g)  (modulation gate),

with the softmax Jacobian ``δA_ij = A_ij (δL_ij − Σ_k A_ik δL_ik)`` [87–88]. Leading dims
(batch, head, step, ...) broadcast through every function; norms are over the last two axes
(token × channel Frobenius norms), so results have the leading shape.

Appendix B ([85–106]) bounds the pattern-modulation residual by the routing term:

    ‖δA V‖_F / ‖A δV‖_F ≤ Δ_max √(N/N_min) ε_V ‖V‖_F / ((√(1−ε_δ²) − a ε_δ) ‖δV‖_F)   [105]

Which δA when g > 0 (decision)
------------------------------
The proof of [93–99] uses only that ``δA`` is the softmax Jacobian at the row-stochastic
``A`` applied to *some* logit perturbation ``δL`` (and Δ is computed from that same δL).
At the symmetric state every block (aa, ab) has the same pattern ``A``, and the Jacobian is
linear in δL, so the pattern perturbation that actually multiplies V in the modulation term,

    δA_g = δA_intra + g δA_inter = J_A(δL_g),     δL_g = δL_intra + g δL_inter,

is itself such an image. We therefore apply [105] to ``δA_g`` with ``Δ_max`` taken from
``δL_g``: it is exactly the paper's statement at g = 0 (δA_g = δA_intra), remains a proven
inequality for every g, bounds the quantity the modulation term contains, and is never looser
than combining the two per-block bounds by the triangle inequality (because
``Δ_max(δL_g) ≤ Δ_max(δL_intra) + g Δ_max(δL_inter)``). The ratio it bounds is **ungated**;
the gated ratio ``‖M‖/‖R‖ = (ξ/ρ) ‖δA_g V‖/‖A δV‖ = ‖δA_g V‖/((1−g)‖A δV‖)`` is bounded by
``bound/(1−g)`` (infinite at g = 1, where routing vanishes). For reference the report also
carries the paper-literal intra-only ratio and bound (``*_intra`` keys).

How ``a = ‖A P_⊥‖_op`` is computed
---------------------------------
[103] needs the gain of ``A`` on mean-free token fields, ``sup {‖A x‖ : x ⊥ 1, ‖x‖ = 1}``.
Because ``P_⊥`` is an orthogonal projector this equals the largest singular value of the
N×N matrix ``A P_⊥ = A − (A1/N) 1ᵀ`` (subtract each row's mean). Two tempting shortcuts are
wrong: ``‖A‖_op`` is always ≥ 1 (``A 1 = 1``), too loose; ``‖P_⊥ A P_⊥‖_op`` drops the
constant component of ``A x`` and can be 0 while ``a = √(N−1)`` (every row attending the
same key), which would make [104] false. ``a`` may exceed 1; then the denominator of [105]
can be ≤ 0 and the bound is vacuous (reported as ``inf`` with ``bound_valid = False``).

``a`` is an eigenvalue of an N×N matrix with no exact shortcut: ``A P_⊥`` is not a product of
N×d_h factors (A is the elementwise softmax of the rank-d_h ``Q Kᵀ``, generically of full rank),
so no d_h×d_h Gram matrix has its spectrum. From 64 tokens it is computed by batched Lanczos on
``G = (A P_⊥)(A P_⊥)ᵀ`` with G never formed (two N×N matrix-vector products per step, ~16 steps
at 256 tokens, stopped on the residual; :func:`_gram_top_eigenvalue_lanczos`), below that and for
heads it does not converge on by the dense eigensolver: ~0.3 block forwards at S width (float64),
against ~1.6 for the Gram matrix and ``eigvalsh``. ``a_method="upper"`` (probe option ``a=upper``)
replaces it by a rigorous upper bound ā ≥ a (:func:`mean_free_operator_norm_upper`), which keeps
[104] and [105] proven: both are monotone in ``a`` in the safe direction (a larger ``a`` only lowers
the lower bound).
"""

from __future__ import annotations

import math
import threading

import torch

from dithooks.attention import functional as AF
from dithooks.gates import rho as routing_gate, xi as modulation_gate  # one home: dithooks.gates

from .attention_width import effective_width

__all__ = [
    "routing_gate",
    "modulation_gate",
    "attention_pattern",
    "logit_perturbations",
    "combined_logit_perturbation",
    "centred_logit_perturbation",
    "softmax_jacobian_apply",
    "routing_term",
    "modulation_term",
    "attention_difference_terms",
    "linearised_difference",
    "mean_free",
    "coherence_fraction",
    "mean_free_operator_norm",
    "mean_free_operator_norm_upper",
    "logit_spread",
    "modulation_row_bound",
    "modulation_frobenius_bound",
    "routing_lower_bound",
    "routing_dominance_bound",
    "routing_dominance_report",
    "routing_dominance_report_from_qkv",
    "clear_report_workspace",
    "combine_head_norms",
    "modal_gains",
]


# --------------------------------------------------------------------------------------
# small helpers
# --------------------------------------------------------------------------------------


def _cast(x: torch.Tensor | None, dtype: torch.dtype | None) -> torch.Tensor | None:
    if x is None or dtype is None:
        return x
    return x.to(dtype)


# The routing report's large work buffers (its float64 copies of A, δL_intra, δL_inter, and its N×d
# operands and products) are kept between calls, per thread: a fresh multi-MB array costs its page
# faults on every call (the allocator hands large freed blocks back to the system), measured ~15 ms of
# a ~60 ms report at S width (256 tokens, 12 heads). Each kept buffer is at most WORKSPACE_SLOT_BYTES
# (larger arrays are allocated per call, as before); at most 9 are kept per thread.
# clear_report_workspace() frees this thread's.
WORKSPACE_SLOT_BYTES = 64 << 20
_workspace = threading.local()


def clear_report_workspace() -> None:
    """Free the routing report's work buffers kept for this thread."""
    _workspace.__dict__.pop("buffers", None)


def _work(slot: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An uninitialised ``shape`` tensor the caller may write: a view of this thread's kept buffer
    ``slot`` for CPU arrays of 16 Ki elements up to WORKSPACE_SLOT_BYTES, else a fresh one."""
    n = math.prod(shape)
    if n < 1 << 14 or device.type != "cpu" or n * dtype.itemsize > WORKSPACE_SLOT_BYTES:
        return torch.empty(shape, dtype=dtype, device=device)  # small: fresh is cheaper; large: not kept
    buffers = _workspace.__dict__.setdefault("buffers", {})
    buf = buffers.get((slot, dtype))
    if buf is None or buf.numel() < n:
        buf = buffers[(slot, dtype)] = torch.empty(n, dtype=dtype)
    return buf[:n].view(shape)


def _own_copy(x: torch.Tensor | None, dtype: torch.dtype | None, slot: str) -> torch.Tensor | None:
    """``x`` cast to ``dtype`` (its own dtype if None) in a tensor the caller may write (:func:`_work`),
    never ``x`` itself."""
    if x is None:
        return None
    dtype = x.dtype if dtype is None else dtype
    if x.numel() < 1 << 14:
        return x.to(dtype, copy=True)
    return _work(slot, tuple(x.shape), dtype, x.device).copy_(x)


def _fro(x: torch.Tensor) -> torch.Tensor:
    """Frobenius norm over the last two axes (tokens × channels, or rows × columns)."""
    return torch.linalg.vector_norm(x, dim=(-2, -1))


def _safe_div(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """num/den with 0/0 → 0 (a zero field has zero fraction in any subspace)."""
    out = num / den
    return torch.where((num == 0) & (den == 0), torch.zeros_like(out), out)


# --------------------------------------------------------------------------------------
# pattern, logits, softmax Jacobian [16, 20–24, 87–88]
# --------------------------------------------------------------------------------------


def attention_pattern(
    Q: torch.Tensor, K: torch.Tensor, *, scale: float | None = None, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """Row-softmax pattern ``A = softmax(Q Kᵀ · scale)`` [16]; scale defaults to ``1/√d_h``
    (:func:`dithooks.attention.functional.attention_pattern`, computed in ``dtype``)."""
    return AF.attention_pattern(Q, K, scale=scale, dtype=dtype)


def logit_perturbations(
    Q: torch.Tensor,
    K: torch.Tensor,
    dQ: torch.Tensor,
    dK: torch.Tensor,
    *,
    scale: float | None = None,
    dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(δL_intra, δL_inter)`` of THEORY §3, each ``[..., N, N]``.

    ``δL_intra = (δQ Kᵀ + Q δKᵀ)·s`` (block aa; bb gets −δL_intra) and
    ``δL_inter = (δQ Kᵀ − Q δKᵀ)·s`` (block ab; ba gets −δL_inter), ``s = 1/√d_h`` by default.
    """
    Q, K, dQ, dK = (_cast(t, dtype) for t in (Q, K, dQ, dK))
    return AF.logit_perturbations(Q, K, dQ, dK, scale=scale)


def combined_logit_perturbation(
    dL_intra: torch.Tensor, dL_inter: torch.Tensor | None, g: float
) -> torch.Tensor:
    """``δL_g = δL_intra + g δL_inter``: the logit perturbation behind ``δA_intra + g δA_inter``.

    Valid because the softmax Jacobian at the common symmetric-state pattern is linear in δL.
    """
    if dL_inter is None or g == 0:
        return dL_intra
    return dL_intra + g * dL_inter


#: ``c_ij = δL_ij − Σ_k A_ik δL_ik`` on the support of A (the bracket of [87–88]); 0 off it
centred_logit_perturbation = AF.centred_logit_perturbation
#: first-order pattern change ``δA = A ⊙ (δL − rowsum(A ⊙ δL))`` [87–88]; rows sum to 0 [89]
softmax_jacobian_apply = AF.softmax_jvp


# --------------------------------------------------------------------------------------
# the two terms of [25]
# --------------------------------------------------------------------------------------


def routing_term(A: torch.Tensor, dV: torch.Tensor, g: float = 0.0) -> torch.Tensor:
    """Spatial routing term ``R = ρ(g) A δV`` (pattern frozen, values moved) [25]."""
    return routing_gate(g) * (A @ dV)


def modulation_term(
    A: torch.Tensor,
    dL_intra: torch.Tensor,
    dL_inter: torch.Tensor | None,
    V: torch.Tensor,
    g: float = 0.0,
) -> torch.Tensor:
    """Pattern modulation term ``M = ξ(g) (δA_intra + g δA_inter) V`` [25]."""
    dA_g = softmax_jacobian_apply(A, combined_logit_perturbation(dL_intra, dL_inter, g))
    return modulation_gate(g) * (dA_g @ V)


def attention_difference_terms(
    A: torch.Tensor,
    dL_intra: torch.Tensor,
    dL_inter: torch.Tensor | None,
    V: torch.Tensor,
    dV: torch.Tensor,
    g: float = 0.0,
    *,
    dtype: torch.dtype | None = None,
) -> dict[str, torch.Tensor]:
    """All pieces of ``(O^a − O^b)/2 = R + M`` [25] for one head (or a batch of heads).

    Returns ``routing`` (R), ``modulation`` (M), ``total`` (R + M), ``dA_intra``,
    ``dA_inter`` (zeros if ``dL_inter`` is None), ``dA_g = dA_intra + g dA_inter``,
    ``routing_ungated`` (``A δV``) and ``modulation_ungated`` (``δA_g V``).
    """
    A, dL_intra, dL_inter, V, dV = (_cast(t, dtype) for t in (A, dL_intra, dL_inter, V, dV))
    dA_intra = softmax_jacobian_apply(A, dL_intra)
    dA_inter = softmax_jacobian_apply(A, dL_inter) if dL_inter is not None else torch.zeros_like(dA_intra)
    dA_g = dA_intra + g * dA_inter
    routing_ungated = A @ dV
    modulation_ungated = dA_g @ V
    R = routing_gate(g) * routing_ungated
    Mo = modulation_gate(g) * modulation_ungated
    return {
        "routing": R,
        "modulation": Mo,
        "total": R + Mo,
        "dA_intra": dA_intra,
        "dA_inter": dA_inter,
        "dA_g": dA_g,
        "routing_ungated": routing_ungated,
        "modulation_ungated": modulation_ungated,
    }


def linearised_difference(
    A: torch.Tensor,
    dL_intra: torch.Tensor,
    dL_inter: torch.Tensor | None,
    V: torch.Tensor,
    dV: torch.Tensor,
    g: float = 0.0,
    *,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """``R + M = ρ(g) A δV + ξ(g) δA_g V`` [25] alone: the ``total`` of
    :func:`attention_difference_terms` with one softmax Jacobian (of ``δL_g``) instead of two
    and no ``δA`` kept (what the routing probe's linearisation error compares)."""
    A, dL_intra, dL_inter, V, dV = (_cast(t, dtype) for t in (A, dL_intra, dL_inter, V, dV))
    dL_g = combined_logit_perturbation(dL_intra, dL_inter, g)
    out = (A * centred_logit_perturbation(A, dL_g)) @ V
    if modulation_gate(g) != 1.0:
        out = out * modulation_gate(g)
    r = routing_gate(g)
    return out if r == 0.0 else out.add_(A @ dV, alpha=r)


# --------------------------------------------------------------------------------------
# Appendix-B ingredients [85–104]
# --------------------------------------------------------------------------------------


def mean_free(X: torch.Tensor) -> torch.Tensor:
    """``P_⊥ X``: remove the token mean (axis −2) of a token field ``[..., N, d]`` [85–86]."""
    return X - X.mean(dim=-2, keepdim=True)


def coherence_fraction(X: torch.Tensor) -> torch.Tensor:
    """``ε = ‖P_⊥ X‖_F / ‖X‖_F`` ([100] for V, [102] for δV); 0 for a zero field.

    Small ε: the field is dominated by its constant-token component (spatially coherent).
    """
    return _safe_div(_fro(mean_free(X)), _fro(X))


def mean_free_operator_norm(A: torch.Tensor) -> torch.Tensor:
    """``a = ‖A P_⊥‖_op`` [103]: largest singular value of ``A − (A1/N)1ᵀ``, ``[..., N, N] → [...]``.

    Equals ``sup_{x ⊥ 1, ‖x‖=1} ‖A x‖`` (see module docstring for why neither ``‖A‖_op`` nor
    ``‖P_⊥ A P_⊥‖_op`` will do). ``√λ_max`` of the Gram matrix ``G = (A P_⊥)(A P_⊥)ᵀ``: from
    :data:`LANCZOS_MIN_N` (64) tokens by batched Lanczos with G never formed, O(N²) per step, stopped
    when the top Ritz pair's residual is ≤ eps^{3/4}·θ (θ ≤ λ_max always; equal to the dense solver's
    value to ~1e-15 relative on every pattern measured, and to the width of the top cluster plus
    eps^{3/4} when the top singular values are that close: see :func:`_gram_top_eigenvalue_lanczos`);
    below 64 tokens, and for heads not converged in :data:`LANCZOS_K_MAX` steps, by a dense
    symmetric eigensolver on G, O(N³).
    """
    return _mean_free_operator_norm(A)


def mean_free_operator_norm_upper(A: torch.Tensor) -> torch.Tensor:
    """A rigorous upper bound ``ā ≥ a = ‖A P_⊥‖_op`` [103] without an eigenvalue solver, ``[..., N, N] → [...]``.

    ``ā = ‖A P_⊥‖_{S8} = (Σ_i σ_i⁸)^{1/8}`` (Schatten-8 norm) from the Gram matrix ``G = (A P_⊥)(A P_⊥)ᵀ``:
    ``a² = λ_max(G) ≤ ‖Gᵀ G‖_F^{1/2}``; two N×N products (BLAS 3) instead of a tridiagonalisation,
    ~half the time at N = 256. Loose by the factor ``(1 + Σ_{i≥2} (σ_i/σ_1)⁸)^{1/8}``: 0-4 % on the
    patterns measured (docs/benchmarks.md), up to ``N^{1/8}`` for a flat spectrum. The rounding of
    both products (``|fl(XY) − XY| ≤ γ_N |X||Y|``, so ``‖Ĝ − G‖_F ≤ γ_N ‖A P_⊥‖_F²``) and of the norms
    is added, so ``ā ≥ a`` holds for the computed ``A P_⊥`` (as exactly as ``a`` is defined from it).
    For float64 input the products run in float32 where float32 products are IEEE single precision
    (not under TF32 or a ``float32_matmul_precision`` other than "highest"; else in float64), with
    the rounding of ``fl32(A P_⊥)`` and of each product added (~1e-4 relative at N = 256).

    Why an upper bound keeps [105] valid: [104] is ``‖A δV‖ ≥ (√(1−ε_δ²) − a ε_δ)‖δV‖`` and its right
    side decreases in ``a``; with ``ā ≥ a`` the lower bound is smaller, the ratio bound [105] larger
    (or vacuous), and both remain proven inequalities, only looser.
    """
    return _mean_free_operator_norm_upper(A)


def _exact_float32_matmul(device: torch.device) -> bool:
    """Whether float32 matrix products round as IEEE single precision here (no TF32/bfloat16)."""
    if torch.get_float32_matmul_precision() != "highest":
        return False
    return device.type == "cpu" or (device.type == "cuda" and not torch.backends.cuda.matmul.allow_tf32)


def _mean_free_operator_norm_upper(A: torch.Tensor, work: tuple[torch.Tensor | None, torch.Tensor | None] = (None, None)
                                   ) -> torch.Tensor:
    # The two N×N products run in float32 (half the time of float64) when float32 products are
    # IEEE-exact here; every rounding is bounded and added, so ā ≥ a still holds for the computed
    # float64 A P_⊥ =: M. With M' = fl32(M), G' = M'M'ᵀ, Ĝ = fl32(M'M'ᵀ), F̂ = fl32(ĜᵀĜ), γ = γ_N(fp32):
    #   a = σ₁(M) ≤ σ₁(M') + ‖M' − M‖_F ≤ √λ_max(G') + u₃₂‖M‖_F          (Weyl)
    #   λ_max(G') ≤ ‖Ĝ‖₂ + ‖Ĝ − G'‖_F ≤ ‖Ĝ‖₂ + γ‖M'‖_F²                (|fl(XY) − XY| ≤ γ|X||Y|)
    #   ‖Ĝ‖₂² = λ_max(ĜᵀĜ) ≤ ‖ĜᵀĜ‖_F ≤ ‖F̂‖_F + γ‖Ĝ‖_F²
    # Norms are taken in float64 and inflated by their own rounding bound.
    N = A.shape[-1]
    f64 = torch.float64 if A.dtype == torch.float64 else A.dtype
    low = torch.float32 if A.dtype == torch.float64 and _exact_float32_matmul(A.device) else A.dtype
    u_hi = torch.finfo(A.dtype).eps / 2
    u_lo = torch.finfo(low).eps / 2
    gam = lambda n, u: n * u / (1 - n * u)  # noqa: E731  γ_n of the standard rounding model
    fro = lambda x: (torch.linalg.vector_norm(x, dim=(-2, -1), dtype=f64)  # noqa: E731
                     * (1 + 2 * gam(x.shape[-1] * x.shape[-2], torch.finfo(f64).eps / 2)))
    M = _right_mean_free(A, work[0])
    fro_M = fro(M)
    rounding_M = u_lo * fro_M if low != A.dtype else torch.zeros_like(fro_M)  # ‖M' − M‖_F ≤ u₃₂‖M‖_F
    fro_M_low = fro_M * (1 + u_lo)  # ≥ ‖M'‖_F
    # buffers: M', Ĝ and F̂ in the spare ones when given (float32 halves of a float64 buffer)
    bufs = [None, None, None]
    if all(w is not None and w.is_contiguous() for w in work):
        if low == A.dtype:
            bufs = [M, work[1], work[0]]
        elif torch.finfo(low).bits * 2 == torch.finfo(A.dtype).bits:
            n = M.numel()
            halves = work[1].view(-1).view(low)
            bufs = [halves[:n].view(M.shape), halves[n:].view(M.shape), work[0].view(-1).view(low)[:n].view(M.shape)]
    Ml = M if low == A.dtype else (bufs[0].copy_(M) if bufs[0] is not None else M.to(low))
    mm = lambda x, y, out: torch.matmul(x, y, out=out) if out is not None else x @ y  # noqa: E731
    G = mm(Ml, Ml.transpose(-2, -1), bufs[1])
    fro_G = fro(G)
    F = mm(G.transpose(-2, -1), G, bufs[2])  # ĜᵀĜ (Ĝ need not be exactly symmetric); M is spent
    g_N = gam(N, u_lo)
    lam = torch.sqrt(fro(F) + g_N * fro_G * fro_G) + g_N * fro_M_low * fro_M_low  # ≥ λ_max(G')
    return ((torch.sqrt(lam) + rounding_M) * (1 + 8 * u_hi)).to(A.dtype)


def _mean_free_operator_norm_dense(A: torch.Tensor, work: tuple[torch.Tensor | None, torch.Tensor | None] = (None, None)
                                   ) -> torch.Tensor:
    """``a`` from the N×N Gram matrix and a dense symmetric eigensolver, O(N³) per head; ``work``: two
    free buffers shaped and typed like ``A`` (or None) for ``A P_⊥`` and its Gram matrix."""
    return _gram_top_eigenvalue_dense(_right_mean_free(A, work[0]), work[1]).clamp_min(0).sqrt()


def _right_mean_free(A: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """``A P_⊥``: each row minus its mean ((A P_∥)_ij = (Σ_k A_ik)/N for every column j), into
    ``out`` when given."""
    mean = A.mean(dim=-1, keepdim=True)
    return torch.sub(A, mean, out=out) if out is not None else A - mean


def _gram_top_eigenvalue_dense(M: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """``λ_max(M Mᵀ)`` by a dense symmetric eigensolver, O(N³) per head; ``out``: a buffer for M Mᵀ."""
    gram = torch.matmul(M, M.transpose(-2, -1), out=out) if out is not None else M @ M.transpose(-2, -1)
    return torch.linalg.eigvalsh(gram)[..., -1]


# Lanczos for a = √λ_max(G), G = (A P_⊥)(A P_⊥)ᵀ = A P_⊥ Aᵀ, without forming G (docs/attention-math.md,
# "The routing report"). Below LANCZOS_MIN_N tokens the dense solver is faster (measured: N = 16 dense
# 0.2 ms against 2.7 ms for 12 heads; N = 256 dense 50 ms against ~11 ms).
LANCZOS_MIN_N = 64
LANCZOS_K_MAX = 48  # Krylov dimension before the unconverged heads fall back to the dense solver
_LANCZOS_FIRST_CHECK = 8
_lanczos_starts: dict = {}


def _lanczos_start(N: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A fixed pseudo-random unit start vector (its own generator: the global RNG is never touched)."""
    key = (N, dtype, str(device))
    v = _lanczos_starts.get(key)
    if v is None:
        v = torch.randn(N, generator=torch.Generator().manual_seed(20261201), dtype=torch.float64)
        v = (v / torch.linalg.vector_norm(v)).to(dtype=dtype, device=device)
        if len(_lanczos_starts) > 64:
            _lanczos_starts.clear()
        _lanczos_starts[key] = v
    return v


def _gram_top_eigenvalue_lanczos(M: torch.Tensor, k_max: int = LANCZOS_K_MAX, tol: float | None = None,
                                 first_check: int = _LANCZOS_FIRST_CHECK) -> tuple[torch.Tensor, torch.Tensor]:
    """``λ_max(G)`` of ``G = M Mᵀ`` for ``M = A P_⊥`` ``[b, N, N]`` by batched Lanczos, G never formed.

    Each step applies ``G u = M (Mᵀ u)`` (two batched N×N matrix-vector products), with full
    reorthogonalisation (classical Gram-Schmidt, twice) against the Krylov basis. ``M`` is the formed
    ``A P_⊥``, not ``A`` with ``P_⊥`` applied to the vectors: A's rows carry a constant part of size
    1/N that ``P_⊥`` would cancel only after the product, leaving rounding of size eps·‖A‖² ≥ eps in λ
    (measured: a = 3e-9 for the uniform pattern, where a = 0).
    From step ``first_check`` on, the tridiagonal ``T_k`` is diagonalised (again when the slowest head's
    residual, at its rate since the last check, would meet the tolerance: 1-6 steps later). Its top Ritz
    value θ is the Rayleigh quotient of a unit vector y in the Krylov space, so ``θ ≤ λ_max`` (up to
    rounding), and the residual ``ρ = ‖G y − θ y‖ = β_k |s_k|`` (s: T's top eigenvector) puts an
    eigenvalue of G within ρ of θ. A head is done when ``ρ ≤ tol·θ`` (default ``eps^{3/4}``: 1.8e-12 in
    float64, 6.4e-6 in float32). The faster Kato–Temple rule ``ρ²/gap ≤ tol·θ`` is not used: its gap has
    to be estimated from the Ritz values, which overstate it while a near-degenerate top cluster is not
    yet resolved (measured: a = 1 with σ₂ = 1 − 1e-8 stopped 2e-8 low). What is guaranteed: θ ≤ λ_max;
    an eigenvalue of G lies in [θ − ρ, θ + ρ]. Not a certificate that it is λ_max: a Krylov method
    cannot see an eigenvector its start vector misses (probability zero with the start's fixed random part;
    rounding adds such components anyway); for a cluster at the top the error is ~ρ·|c₂/c₁| (the start
    vector's components along the top two eigenvectors). In every test case and measured pattern the
    result equals the dense solver's to ≤ 5e-15 relative (tests/test_operator_norm.py).

    Returns ``(λ [b], converged [b] bool)``; heads not converged within ``k_max`` steps (or with NaN/inf)
    have ``converged`` False and their last top Ritz value (≤ λ_max) in λ, and are left to the caller.
    """
    b, N = M.shape[0], M.shape[-1]
    dtype, device = M.dtype, M.device
    eps = torch.finfo(dtype).eps
    tol = eps ** 0.75 if tol is None else tol
    k_max = max(2, min(k_max, N))
    lam = torch.zeros(b, dtype=dtype, device=device)
    done = torch.zeros(b, dtype=torch.bool, device=device)
    idx = torch.arange(b, device=device)  # the heads still iterating
    quit = torch.zeros(b, dtype=torch.bool, device=device)  # of those, the ones given up (see below)
    Q = torch.empty(b, k_max + 1, N, dtype=dtype, device=device)  # rows: the Krylov basis
    # start: M's row norms (the queries whose mean-free rows are large weigh most in the top left
    # singular vector: ~2 steps fewer on the patterns measured) plus a fixed random vector, so that
    # no eigenvector is missed by the start's structure (e.g. A = I: row norms ∝ 1, G 1 = 0)
    rows = torch.linalg.vector_norm(M, dim=-1)
    rows /= torch.linalg.vector_norm(rows, dim=-1, keepdim=True).clamp_min(torch.finfo(dtype).tiny)
    rows += _lanczos_start(N, dtype, device)
    Q[:, 0] = rows / torch.linalg.vector_norm(rows, dim=-1, keepdim=True)
    alpha = torch.zeros(b, k_max, dtype=dtype, device=device)
    beta = torch.zeros(b, k_max, dtype=dtype, device=device)
    scale = torch.zeros(b, dtype=dtype, device=device)  # max |α|, β so far: the size of T
    Mt = M.transpose(-2, -1)
    check, last = min(first_check, k_max), None  # the next step with a convergence check; (k, log need)
    for j in range(k_max):
        q = Q[:, j:j + 1]                                   # [b, 1, N]
        w = torch.bmm(torch.bmm(q, M), Mt)                  # (M Mᵀ q)ᵀ (bmm: no matmul dispatch per call)
        basis = Q[:, :j + 1]
        h = torch.bmm(basis, w.transpose(-2, -1))           # [b, j+1, 1]
        w = torch.baddbmm(w, h.transpose(-2, -1), basis, alpha=-1)
        h2 = torch.bmm(basis, w.transpose(-2, -1))          # second pass: orthogonal to rounding
        w = torch.baddbmm(w, h2.transpose(-2, -1), basis, alpha=-1)
        aj = h[:, j, 0] + h2[:, j, 0]
        bj = torch.linalg.vector_norm(w, dim=-1)[:, 0]
        alpha[:, j], beta[:, j] = aj, bj
        scale = torch.maximum(scale, torch.maximum(aj.abs(), bj))
        # an invariant subspace (β ≈ 0, e.g. A P_⊥ of low rank): the next vector is 0, T decouples
        inv = torch.where(bj > N * eps * scale, 1 / bj, 0)
        torch.mul(w[:, 0], inv[:, None], out=Q[:, j + 1])
        k = j + 1
        if k < check:
            continue
        T = torch.diag_embed(alpha[:, :k]) + torch.diag_embed(beta[:, :k - 1], 1) + torch.diag_embed(beta[:, :k - 1], -1)
        theta, S = torch.linalg.eigh(T)
        top = theta[:, -1]
        rho = (bj * S[:, -1, -1]).abs()
        finite = torch.isfinite(top)
        ok = (rho <= tol * top) & finite
        open_ = ~done[idx]
        lam[idx[open_]] = top[open_]  # the latest Ritz value where not yet converged
        done[idx[ok & open_]] = True
        going = open_ & ~ok & finite & ~quit  # NaN/inf heads stop here, unconverged
        # log of how far each head's residual is from the tolerance, and its rate per step since the
        # last check: a head predicted to need more than k_max steps (a flat top of the spectrum, e.g.
        # a local-attention pattern A ≈ I + E: hundreds of steps) is given up, to the dense solver
        need = torch.log((rho / (tol * top)).clamp_min(1.0))
        steps = torch.full_like(need, 2.0)
        if last is not None:
            rate = (last[1] - need) / (k - last[0])
            steps = torch.where(rate > 0, need / rate.clamp_min(torch.finfo(dtype).tiny), 2.0).clamp_max(1e6)
            if k >= 2 * first_check:
                hopeless = (rate <= 0) | (k + steps > k_max)
            else:  # early rates understate the (superlinear) convergence and may not yet be positive
                hopeless = (rate > 0) & (k + steps > 2 * k_max)
            quit |= going & hopeless
            going &= ~hopeless
        n_left = int(going.sum())
        if n_left == 0:
            break
        # next check: when the slowest head would reach the tolerance at its rate
        check, last = k + max(1, min(6, math.ceil(float(steps[going].amax())))), (k, need)
        if 2 * n_left <= len(idx):  # half or fewer left: carry on with those only (copying them costs
            # ≤ half a step, each later step is at least halved)
            keep = going.nonzero()[:, 0]
            idx, Q, alpha, beta, scale, quit = idx[keep], Q[keep], alpha[keep], beta[keep], scale[keep], quit[keep]
            last = (k, need[keep])
            M = M.index_select(0, keep)
            Mt = M.transpose(-2, -1)
    return lam, done


def _mean_free_operator_norm(A: torch.Tensor, work: tuple[torch.Tensor | None, torch.Tensor | None] = (None, None),
                             min_n: int | None = None) -> torch.Tensor:
    """:func:`mean_free_operator_norm`; ``work``: two free buffers shaped and typed like ``A`` (or
    None) for ``A P_⊥`` and the dense path's Gram matrix (the routing report passes its spent δA
    buffers). From ``min_n`` tokens (default :data:`LANCZOS_MIN_N`) by Lanczos, the heads it does not
    converge on (and non-finite ones) by the dense solver."""
    N = A.shape[-1]
    if N < (LANCZOS_MIN_N if min_n is None else min_n) or A.numel() == 0:
        return _mean_free_operator_norm_dense(A, work)
    flat = _right_mean_free(A, work[0]).reshape(-1, N, N)
    lam, done = _gram_top_eigenvalue_lanczos(flat)
    if not bool(done.all()):
        rest = (~done).nonzero()[:, 0]
        lam[rest] = _gram_top_eigenvalue_dense(flat[rest])
    return lam.clamp_min(0).sqrt().reshape(A.shape[:-2])


def logit_spread(A: torch.Tensor, dL: torch.Tensor) -> torch.Tensor:
    """Per-row logit spread ``Δ_i = max_j |δL_ij − Σ_k A_ik δL_ik|`` [96], ``[..., N]``.

    The max runs over keys with ``A_ij > 0`` (all keys for an unmasked softmax), which is all
    the Cauchy–Schwarz step [94–97] needs.
    """
    return _spread(centred_logit_perturbation(A, dL))


# The formulas of [98], [99], [104], [105] from their ingredients: the public helpers below and
# routing_dominance_report (which computes every ingredient once) share them.
def _spread(c: torch.Tensor) -> torch.Tensor:
    # max |c_ij| over keys: the same number as vector_norm(ord=inf) (NaN propagates alike), ~5x faster
    # on CPU. Large c: max(max c, −min c), no N×N |c| temporary; small: abs().amax, fewer calls.
    if c.numel() < 1 << 16:
        return c.abs().amax(dim=-1)
    return torch.maximum(c.amax(dim=-1), c.amin(dim=-1).neg_())


def _row_bound(delta: torch.Tensor, norm_perp_V: torch.Tensor, n_eff: torch.Tensor) -> torch.Tensor:
    return delta * norm_perp_V[..., None] / torch.sqrt(n_eff)  # [98]


def _frobenius_bound(delta_max: torch.Tensor, n: int, n_min: torch.Tensor, norm_perp_V: torch.Tensor) -> torch.Tensor:
    return delta_max * torch.sqrt(n / n_min) * norm_perp_V  # [99]


def _routing_lower_bound(eps_d: torch.Tensor, a: torch.Tensor, norm_dV: torch.Tensor) -> torch.Tensor:
    return (torch.sqrt(torch.clamp(1 - eps_d * eps_d, min=0)) - a * eps_d) * norm_dV  # [104]


def _ratio_bound(num: torch.Tensor, lower: torch.Tensor) -> torch.Tensor:
    """``num / lower`` where the lower bound is positive, ``+inf`` (vacuous) elsewhere [105]."""
    return torch.where(lower > 0, num / lower.clamp_min(torch.finfo(lower.dtype).tiny),
                       torch.full_like(num, math.inf))


def modulation_row_bound(A: torch.Tensor, dL: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
    """Per-row bound [98]: ``‖(δA V)_i‖ ≤ Δ_i ‖P_⊥ V‖_F / √N_eff,i``, ``[..., N]``."""
    return _row_bound(logit_spread(A, dL), _fro(mean_free(V)), effective_width(A))


def modulation_frobenius_bound(A: torch.Tensor, dL: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
    """Frobenius bound [99]: ``‖δA V‖_F ≤ Δ_max √(N/N_min) ‖P_⊥ V‖_F``, ``[...]``."""
    return _frobenius_bound(logit_spread(A, dL).amax(dim=-1), A.shape[-1], effective_width(A).amin(dim=-1),
                            _fro(mean_free(V)))


def routing_lower_bound(A: torch.Tensor, dV: torch.Tensor) -> torch.Tensor:
    """Lower bound [104]: ``‖A δV‖_F ≥ (√(1−ε_δ²) − a ε_δ) ‖δV‖_F``, ``[...]`` (may be ≤ 0)."""
    return _routing_lower_bound(coherence_fraction(dV), mean_free_operator_norm(A), _fro(dV))


def routing_dominance_bound(
    A: torch.Tensor, dL: torch.Tensor, V: torch.Tensor, dV: torch.Tensor
) -> torch.Tensor:
    """Bound [105] on the ungated ratio ``‖δA V‖_F / ‖A δV‖_F`` with ``δA = J_A(dL)``.

    ``+inf`` where the denominator ``(√(1−ε_δ²) − a ε_δ)‖δV‖_F`` is not positive (vacuous).
    """
    return _ratio_bound(modulation_frobenius_bound(A, dL, V), routing_lower_bound(A, dV))


def _default_rtol(dtype: torch.dtype) -> float:
    # The inequalities are exact; the slack only absorbs rounding in the O(N d) sums.
    return 1e3 * torch.finfo(dtype).eps


def routing_dominance_report(
    A: torch.Tensor,
    dL_intra: torch.Tensor,
    dL_inter: torch.Tensor | None,
    V: torch.Tensor,
    dV: torch.Tensor,
    g: float = 0.0,
    *,
    dtype: torch.dtype | None = torch.float64,
    renormalise: bool = True,
    rtol: float | None = None,
    a_method: str = "exact",
) -> dict[str, torch.Tensor]:
    """Every Appendix-B ingredient, the measured ratios, the bounds and checks, per head.

    Shapes: ``A``, ``dL_*`` ``[..., N, N]``; ``V``, ``dV`` ``[..., N, d_h]``. Every output is
    ``[...]`` (one value per head/step/...) except the per-row ``N_eff``, ``Delta``,
    ``row_measured`` and ``row_bound`` (``[..., N]``).

    ``a_method``: ``"exact"`` (default) computes ``a = ‖A P_⊥‖_op`` [103] as
    :func:`mean_free_operator_norm` (Lanczos from 64 tokens, a dense eigensolver below); ``"upper"``
    uses the rigorous upper bound :func:`mean_free_operator_norm_upper` (two N×N products, no
    eigenvalue solver; about the time of the Lanczos at N = 256): key ``a`` is then ``ā ≥ a`` and every bound
    built on it ([104], [105], their checks) is the looser but still proven one; key
    ``a_exact`` says which (a bool).

    ``dtype`` (default float64) is the compute dtype. ``renormalise`` divides A by its row sums
    after measuring ``stochasticity_residual``: the identities assume an exactly stochastic A,
    and a captured fp32/bf16 pattern is only approximately so. ``rtol`` is the relative slack
    of the ``*_holds`` checks (default ``1e3·eps(dtype)``): a failed check is a bug, not a
    finding.

    The bound is applied to ``δA_g = δA_intra + g δA_inter`` with Δ from ``δL_g`` (module
    docstring explains why); at g = 0 that is the paper's intra-only statement.

    Keys
    ----
    ``N``, ``N_eff`` [..., N], ``N_min``, ``Delta`` [..., N] and ``Delta_max`` (of δL_g),
    ``Delta_max_intra``, ``Delta_max_inter``, ``eps_V``, ``eps_delta``, ``a``, ``norm_V``,
    ``norm_dV``, ``norm_perp_V``;
    ``routing_norm`` ‖A δV‖ and ``modulation_norm`` ‖δA_g V‖ (ungated),
    ``routing_norm_gated`` ‖R‖ = ρ‖AδV‖, ``modulation_norm_gated`` ‖M‖ = ξ‖δA_g V‖,
    ``routing_dominance`` ‖AδV‖/‖δA_g V‖ and ``routing_dominance_gated`` ‖R‖/‖M‖ (user-facing);
    ``measured_ratio`` ‖δA_g V‖/‖AδV‖, ``bound`` [105], ``bound_valid``, ``bound_holds``,
    ``tightness`` (measured/bound, NaN when the bound is vacuous);
    ``measured_ratio_gated`` ‖M‖/‖R‖ and ``bound_gated`` = bound/(1−g);
    ``measured_ratio_intra``, ``bound_intra``, ``bound_intra_holds`` (paper-literal, δA_intra);
    ``row_measured``/``row_bound``/``row_bound_holds`` [98], ``frobenius_bound``/
    ``frobenius_bound_holds`` [99], ``summed_row_bound`` (√Σ_i row_bound_i², between the two),
    ``routing_lower_bound``/``routing_lower_bound_holds`` [104];
    identity residuals (max-abs): ``stochasticity_residual`` |A1 − 1| (before renormalising),
    ``dA_row_sum_residual`` |δA_g 1|, ``mean_free_residual`` ‖δA_g V − δA_g P_⊥V‖_F [90],
    ``constant_preservation_residual`` |A P_∥ − P_∥| [91].
    """
    # Large N×N temporaries are few and reused in place (buffers this function owns: the copies of
    # A and δL, kept between calls): a fresh multi-MB array costs its page faults on every call.
    if a_method not in ("exact", "upper"):
        raise ValueError(f"a_method must be 'exact' or 'upper', not {a_method!r}")
    # A, δL_intra, δL_inter: copies this function owns (kept work buffers, see _work), written in place;
    # V is copied into the first d columns of [V, 1] (δA_g V and δA_g 1 in one product)
    A, dL_intra, dL_inter = _own_copy(A, dtype, "A"), _own_copy(dL_intra, dtype, "dL_intra"), \
        _own_copy(dL_inter, dtype, "dL_inter")
    d = V.shape[-1]
    if V.numel() < 1 << 14:  # small: fewer calls
        V, dV = _cast(V, dtype), _cast(dV, dtype)
        V_ones = torch.cat([V, torch.ones_like(V[..., :1])], dim=-1)
    else:
        dV = _own_copy(dV, dtype, "dV")
        V_ones = _work("V_ones", (*V.shape[:-1], d + 1), V.dtype if dtype is None else dtype, V.device)
        V = V_ones[..., :d].copy_(V)
        V_ones.select(-1, d).fill_(1)
    rtol = _default_rtol(A.dtype) if rtol is None else rtol
    N = A.shape[-1]

    row_sums = A.sum(dim=-1)
    stochasticity_residual = (row_sums - 1).abs().amax(dim=-1)
    if renormalise:
        A.div_(row_sums[..., None])

    # The bracket c of [87–88] is linear in δL (on the support of A), so c_g = c_intra + g c_inter
    # and δA_g = A c_g: each logit perturbation is centred once, and δA_g V and δA_g 1 come from
    # one product of δA_g with [V, 1]. c_intra and c_inter are this function's own buffers (computed
    # into δL's copy, or new), so c_g and the δA's are formed in them in place.
    full = AF.full_support(A)

    def centred(dL):
        if full:  # c = δL − rowsum(A ⊙ δL), in δL's own copy
            # einsum forms no N×N temporary (large inputs); mul-sum has less per-call overhead (small)
            rowdot = torch.einsum("...ij,...ij->...i", A, dL) if A.numel() >= 1 << 16 else (A * dL).sum(-1)
            return dL.sub_(rowdot[..., None])
        return centred_logit_perturbation(A, dL, full=full)

    c_intra = centred(dL_intra)
    c_inter = centred(dL_inter) if dL_inter is not None else None
    delta_max_intra = _spread(c_intra).amax(dim=-1)
    delta_max_inter = _spread(c_inter).amax(dim=-1) if c_inter is not None else torch.zeros_like(delta_max_intra)
    c_g = c_intra if c_inter is None or g == 0 else torch.add(c_intra, c_inter, alpha=g, out=c_inter)  # one pass

    # ---- ingredients -----------------------------------------------------------------
    n_eff = effective_width(A)
    n_min = n_eff.amin(dim=-1)
    delta = _spread(c_g)
    delta_max = delta.amax(dim=-1)
    # P_⊥V and P_⊥δV (coherence_fraction, mean_free) in one work buffer, for their norms only
    perp = _work("perp", tuple(dV.shape), dV.dtype, dV.device)
    norm_V, norm_dV = _fro(V), _fro(dV)
    norm_perp_V = _fro(torch.sub(V, V.mean(dim=-2, keepdim=True), out=perp))
    eps_V = _safe_div(norm_perp_V, norm_V)
    eps_d = _safe_div(_fro(torch.sub(dV, dV.mean(dim=-2, keepdim=True), out=perp)), norm_dV)

    # ---- measured terms --------------------------------------------------------------
    def mm(x, y, slot, cols):  # large products into work buffers
        if A.numel() < 1 << 16 or x.shape[:-2] != y.shape[:-2]:
            return x @ y
        return torch.matmul(x, y, out=_work(slot, (*x.shape[:-2], N, cols), A.dtype, A.device))

    AdV = mm(A, dV, "AdV", d)
    dA_g = c_g.mul_(A)
    dA_wide = mm(dA_g, V_ones, "dA_wide", d + 1)  # [δA_g V, δA_g 1]
    dAV, dA_ones = dA_wide[..., :d], dA_wide[..., d]
    # paper-literal: δA_intra alone (c_intra's buffer is free once c_g is formed)
    dAV_intra = dAV if c_g is c_intra else mm(c_intra.mul_(A), V, "dAV_intra", d)
    # a = ‖A P_⊥‖_op, A P_⊥ and its Gram matrix formed in the spent δA buffers
    spare = (dA_g, None if c_g is c_intra else c_intra)
    spare = spare if all(x is None or x.is_contiguous() for x in spare) else (None, None)
    a = (_mean_free_operator_norm_upper if a_method == "upper" else _mean_free_operator_norm)(A, spare)
    routing_norm = _fro(AdV)
    modulation_norm = _fro(dAV)
    rho, xi = routing_gate(g), modulation_gate(g)
    routing_norm_gated = rho * routing_norm
    modulation_norm_gated = xi * modulation_norm
    measured = modulation_norm / routing_norm
    measured_gated = modulation_norm_gated / routing_norm_gated

    # ---- bounds ----------------------------------------------------------------------
    row_measured = torch.linalg.vector_norm(dAV, dim=-1)
    row_bound = _row_bound(delta, norm_perp_V, n_eff)
    frob_bound = _frobenius_bound(delta_max, N, n_min, norm_perp_V)
    summed_row_bound = torch.linalg.vector_norm(row_bound, dim=-1)
    lower = _routing_lower_bound(eps_d, a, norm_dV)
    valid = lower > 0
    inf = torch.full_like(frob_bound, math.inf)
    bound = _ratio_bound(frob_bound, lower)
    tightness = torch.where(valid, measured / bound, torch.full_like(bound, math.nan))
    bound_gated = bound / (1 - g) if g < 1 else inf

    measured_intra = _fro(dAV_intra) / routing_norm
    bound_intra = _ratio_bound(_frobenius_bound(delta_max_intra, N, n_min, norm_perp_V), lower)

    def holds(measured_value, bound_value, scale):
        # measured ≤ bound up to rounding. The slack is relative to `scale`, the size of the
        # operands before cancellation (e.g. ‖V‖ rather than ‖P_⊥V‖, which can be ~0 for a
        # constant V while δA V is then pure rounding). NaN measured (0/0) counts as holding.
        ok = measured_value <= bound_value + rtol * (bound_value.abs() + scale)
        return ok | torch.isnan(measured_value)

    lower_safe = lower.clamp_min(torch.finfo(lower.dtype).tiny)
    width_factor = torch.sqrt(N / n_min) * norm_V
    ratio_scale = torch.where(valid, delta_max * width_factor / lower_safe, inf)
    ratio_scale_intra = torch.where(valid, delta_max_intra * width_factor / lower_safe, inf)

    # ---- identity residuals [89–91] ---------------------------------------------------
    dA_row_sum_residual = dA_ones.abs().amax(dim=-1)  # δA_g 1
    # δA_g V − δA_g P_⊥V = (δA_g 1) mean(V)ᵀ (V − P_⊥V is the token mean in every row): its norm
    # is ‖δA_g 1‖ ‖mean V‖, without a second product with δA_g
    mean_free_residual = torch.linalg.vector_norm(dA_ones, dim=-1) * torch.linalg.vector_norm(
        V.mean(dim=-2), dim=-1)
    # A P_∥ − P_∥ has entries (Σ_k A_ik − 1)/N (the same in every column of row i): no N×N product
    constant_preservation_residual = ((A.sum(dim=-1) - 1).abs() / N).amax(dim=-1)

    return {
        "g": torch.tensor(float(g), dtype=A.dtype),
        "rho": torch.tensor(float(rho), dtype=A.dtype),
        "xi": torch.tensor(float(xi), dtype=A.dtype),
        "N": torch.tensor(N),
        "N_eff": n_eff,
        "N_min": n_min,
        "Delta": delta,
        "Delta_max": delta_max,
        "Delta_max_intra": delta_max_intra,
        "Delta_max_inter": delta_max_inter,
        "eps_V": eps_V,
        "eps_delta": eps_d,
        "a": a,
        "a_exact": torch.tensor(a_method == "exact"),
        "norm_V": norm_V,
        "norm_dV": norm_dV,
        "norm_perp_V": norm_perp_V,
        "routing_norm": routing_norm,
        "modulation_norm": modulation_norm,
        "routing_norm_gated": routing_norm_gated,
        "modulation_norm_gated": modulation_norm_gated,
        "routing_dominance": routing_norm / modulation_norm,
        "routing_dominance_gated": routing_norm_gated / modulation_norm_gated,
        "measured_ratio": measured,
        "measured_ratio_gated": measured_gated,
        "bound": bound,
        "bound_gated": bound_gated,
        "bound_valid": valid,
        "bound_holds": holds(measured, bound, ratio_scale),
        "tightness": tightness,
        "measured_ratio_intra": measured_intra,
        "bound_intra": bound_intra,
        "bound_intra_holds": holds(measured_intra, bound_intra, ratio_scale_intra),
        "row_measured": row_measured,
        "row_bound": row_bound,
        "row_bound_holds": holds(row_measured, row_bound, delta * norm_V[..., None] / torch.sqrt(n_eff)).all(dim=-1),
        "frobenius_bound": frob_bound,
        "frobenius_bound_holds": holds(modulation_norm, frob_bound, delta_max * width_factor),
        "summed_row_bound": summed_row_bound,
        "routing_lower_bound": lower,
        "routing_lower_bound_holds": holds(lower, routing_norm, (1 + a) * norm_dV),
        "stochasticity_residual": stochasticity_residual,
        "dA_row_sum_residual": dA_row_sum_residual,
        "mean_free_residual": mean_free_residual,
        "constant_preservation_residual": constant_preservation_residual,
    }


def routing_dominance_report_from_qkv(
    Q: torch.Tensor,
    K: torch.Tensor,
    V: torch.Tensor,
    dQ: torch.Tensor,
    dK: torch.Tensor,
    dV: torch.Tensor,
    g: float = 0.0,
    *,
    scale: float | None = None,
    dtype: torch.dtype | None = torch.float64,
    rtol: float | None = None,
) -> dict[str, torch.Tensor]:
    """:func:`routing_dominance_report` from the symmetric-state ``Q, K, V`` and their
    perturbations (``[..., N, d_h]``); the pattern and logit perturbations use ``1/√d_h``."""
    A = attention_pattern(Q, K, scale=scale, dtype=dtype)
    dL_intra, dL_inter = logit_perturbations(Q, K, dQ, dK, scale=scale, dtype=dtype)
    return routing_dominance_report(A, dL_intra, dL_inter, V, dV, g, dtype=dtype, renormalise=False, rtol=rtol)


def combine_head_norms(norms: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Layer-level Frobenius norm from per-head norms: ``√Σ_h ‖·‖_h²`` (THEORY §5)."""
    return torch.linalg.vector_norm(norms, dim=dim)


# --------------------------------------------------------------------------------------
# modal gains [44–46, 59]
# --------------------------------------------------------------------------------------


def modal_gains(
    v: torch.Tensor,
    routing_response: torch.Tensor,
    modulation_response: torch.Tensor,
    *,
    mlp_response: torch.Tensor | None = None,
    g: float | None = None,
    feature_ndim: int = 1,
    dtype: torch.dtype | None = torch.float64,
) -> dict[str, torch.Tensor]:
    """Per-mode gains along direction(s) ``v`` from precomputed linear responses.

    ``routing_response = 𝓡̃ v`` and ``modulation_response = 𝓜̃ v`` are the (ungated) JVPs along
    ``v`` (computed elsewhere); the last ``feature_ndim`` axes form the vector (use 2 for
    ``[N, d]`` token maps), leading axes (modes, layers, ...) broadcast. Returns

    - ``chi = vᵀ 𝓡̃ v / vᵀv`` (routing gain), ``pi = vᵀ 𝓜̃ v / vᵀv`` (modulation gain) [44–46];
      for unit v these are exactly ``vᵀ𝓡̃v``, ``vᵀ𝓜̃v``; the Rayleigh quotient makes a
      non-unit v (with responses computed along that same v) give the same gains;
    - ``ratio = |pi| / |chi|``: the reviewer's untested assumption is ``ratio ≪ 1`` for
      leading modes [59];
    - with ``mlp_response``: ``f`` (MLP gain); with ``g``: ``rho_chi = ρ(g)χ``,
      ``xi_pi = ξ(g)π``, and with both ``kappa = 1 + ρχ + ξπ + f`` [44].
    """
    v, r, m, f_resp = (_cast(t, dtype) for t in (v, routing_response, modulation_response, mlp_response))
    dims = tuple(range(-feature_ndim, 0))
    vv = (v * v).sum(dim=dims)
    chi = (v * r).sum(dim=dims) / vv
    pi = (v * m).sum(dim=dims) / vv
    out = {"chi": chi, "pi": pi, "ratio": pi.abs() / chi.abs()}
    if f_resp is not None:
        out["f"] = (v * f_resp).sum(dim=dims) / vv
    if g is not None:
        out["rho_chi"] = routing_gate(g) * chi
        out["xi_pi"] = modulation_gate(g) * pi
        if f_resp is not None:
            out["kappa"] = 1 + out["rho_chi"] + out["xi_pi"] + out["f"]
    return out
