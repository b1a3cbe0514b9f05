"""a = ‖A P_⊥‖_op [103] by batched Lanczos (probes/attention_terms.py) against numpy's SVD/eigvalsh.

The Lanczos path (from LANCZOS_MIN_N tokens, or forced with ``min_n=0``) must give the dense solver's
number to its accuracy (rtol 1e-12 in float64, what the Appendix-B identity tests ask of ``a``) on
random, peaked, near-degenerate, exactly degenerate and rank-deficient ``A P_⊥``; unconverged heads
fall back to the dense solver; the Rayleigh quotient never exceeds λ_max.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from dithooks.probes import attention_terms as at
from dithooks.probes.attention_terms import mean_free_operator_norm, routing_dominance_report


def t(x):
    return torch.as_tensor(np.asarray(x, dtype=np.float64))


def np_a(A):
    """Largest singular value of A P_⊥ per matrix, by numpy's SVD."""
    N = A.shape[-1]
    P = np.eye(N) - np.ones((N, N)) / N
    return np.linalg.svd(A @ P, compute_uv=False)[..., 0]


def np_softmax(L):
    e = np.exp(L - L.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def with_spectrum(rng, N, s):
    """A = 1 1ᵀ/N + U diag(s) Wᵀ with W ⊥ 1: A 1 = 1 and A P_⊥ = U diag(s) Wᵀ, singular values s.

    Not entrywise non-negative (the operator norm does not need it) but exact in its spectrum."""
    k = len(s)
    U = np.linalg.qr(rng.standard_normal((N, k)))[0]
    X = rng.standard_normal((N, k))
    X -= X.mean(0)
    W = np.linalg.qr(X)[0]
    return np.ones((N, N)) / N + U @ np.diag(s) @ W.T


def mf(A):
    """A P_⊥ as a tensor (what the Lanczos routine takes)."""
    A = np.asarray(A, dtype=np.float64)
    return t(A - A.mean(-1, keepdims=True))


def lanczos_a(A, **kw):
    return at._mean_free_operator_norm(t(A), min_n=0, **kw).numpy()


@pytest.mark.parametrize("N", [5, 17, 64, 97])
def test_lanczos_matches_svd_on_softmax_patterns(N):
    rng = np.random.default_rng(N)
    for scale in (0.5, 2.0, 6.0):  # near-uniform, typical, peaked
        A = np_softmax(rng.standard_normal((3, 2, N, N)) * scale)
        a = lanczos_a(A)
        assert a.shape == (3, 2)
        np.testing.assert_allclose(a, np_a(A), rtol=1e-12)
        # the default dispatch agrees with the forced Lanczos and with the dense solver
        np.testing.assert_allclose(mean_free_operator_norm(t(A)).numpy(), a, rtol=1e-12)
        np.testing.assert_allclose(at._mean_free_operator_norm_dense(t(A)).numpy(), a, rtol=1e-12)


@pytest.mark.parametrize("gap", [0.0, 1e-12, 1e-8, 1e-4, 1e-2])
def test_near_degenerate_top_singular_values(gap):
    rng = np.random.default_rng(7)
    N = 80
    s = np.concatenate([[1.0, 1.0 - gap, 1.0 - 2 * gap], np.linspace(0.9, 0.05, 20)])
    A = np.stack([with_spectrum(rng, N, s * c) for c in (0.3, 1.0, 2.5)])
    a = lanczos_a(A)
    # θ is within ρ ≤ 1.8e-12 θ of some eigenvalue of G, at worst the bottom of the top cluster
    # (width 2·gap in σ); a relative error of 1e-12 in a
    rtol = 1e-12 + 2 * gap if gap < 1e-10 else 1e-12
    np.testing.assert_allclose(a, np_a(A), rtol=rtol)
    np.testing.assert_allclose(a, [0.3, 1.0, 2.5], rtol=rtol)
    assert (a <= np_a(A) * (1 + 1e-14)).all()  # the Rayleigh quotient never exceeds λ_max


def test_flat_spectrum_and_clusters():
    rng = np.random.default_rng(8)
    N = 72
    cases = [
        np.full(N - 1, 0.7),  # every singular value equal (A P_⊥ = 0.7 × an isometry on 1^⊥)
        np.linspace(1.0, 0.999, N - 1),  # a tight cluster: slow Lanczos, dense fallback allowed
        np.concatenate([[1.0], np.full(N - 2, 0.999999)]),
    ]
    A = np.stack([with_spectrum(rng, N, s) for s in cases])
    np.testing.assert_allclose(lanczos_a(A), np_a(A), rtol=1e-12)
    np.testing.assert_allclose(lanczos_a(A), [0.7, 1.0, 1.0], rtol=1e-12)


@pytest.mark.parametrize("rank", [1, 2, 5])
def test_rank_deficient(rank):
    rng = np.random.default_rng(rank)
    N = 66
    s = np.linspace(1.5, 0.5, rank)
    A = np.stack([with_spectrum(rng, N, s), with_spectrum(rng, N, s[::-1] * 0.1)])
    a = lanczos_a(A)
    np.testing.assert_allclose(a, np_a(A), rtol=1e-12)
    np.testing.assert_allclose(a, [1.5, 0.15], rtol=1e-12)
    lam, done = at._gram_top_eigenvalue_lanczos(mf(A))
    assert done.all()  # the Krylov space is invariant after ≤ rank + 1 steps: exact, no fallback


def test_special_patterns():
    N = 70
    L = np.zeros((N, N))
    L[:, 0] = 60.0
    sink = np_softmax(L)  # every row attends key 0: rank one, a = √(N−1)
    ident = np.eye(N)  # A P_⊥ = P_⊥: a = 1 with N−1 equal singular values
    uniform = np.full((N, N), 1.0 / N)  # A P_⊥ = 0
    A = np.stack([sink, ident, uniform])
    a = lanczos_a(A)
    np.testing.assert_allclose(a[:2], [math.sqrt(N - 1), 1.0], rtol=1e-12)
    assert a[2] < 1e-15  # the rounding of A P_⊥, not of A (the product runs on the formed A P_⊥)
    np.testing.assert_allclose(a, np_a(A), rtol=1e-12, atol=1e-13)


def test_rayleigh_quotient_never_exceeds_lambda_max_and_fallback():
    rng = np.random.default_rng(3)
    N = 90
    A = np_softmax(rng.standard_normal((6, N, N)) * 3)
    lam_max = np_a(A) ** 2
    for k in (2, 3, 4, 6, 8, 10):
        lam, done = at._gram_top_eigenvalue_lanczos(mf(A), k_max=k, tol=0.0)
        assert not done.any()  # tol 0 is never met (the residual is not exactly zero)
        assert (lam.numpy() <= lam_max * (1 + 1e-14)).all()
        assert (lam.numpy() > 0).all()
    # the Ritz values rise towards λ_max as k grows
    lam4 = at._gram_top_eigenvalue_lanczos(mf(A), k_max=4, tol=0.0)[0].numpy()
    lam10 = at._gram_top_eigenvalue_lanczos(mf(A), k_max=10, tol=0.0)[0].numpy()
    assert (lam4 <= lam10 * (1 + 1e-14)).all() and (lam_max - lam10 < lam_max - lam4).all()
    # unconverged heads go to the dense solver: a Krylov dimension of 3 still gives the exact a
    saved = at.LANCZOS_K_MAX
    try:
        at.LANCZOS_K_MAX = 3
        np.testing.assert_allclose(lanczos_a(A), np.sqrt(lam_max), rtol=1e-12)
    finally:
        at.LANCZOS_K_MAX = saved


def test_converged_heads_are_reported_as_such_and_shapes():
    rng = np.random.default_rng(4)
    N = 64
    A = np_softmax(rng.standard_normal((5, N, N)) * 2)
    lam, done = at._gram_top_eigenvalue_lanczos(mf(A))
    assert done.all()
    np.testing.assert_allclose(lam.numpy(), np_a(A) ** 2, rtol=2e-12)
    # a head needing more steps than the others (a tight cluster) beside quick ones: the quick
    # ones keep their values when the slow one carries on alone
    slow = with_spectrum(rng, N, np.concatenate([[1.0, 0.99], np.linspace(0.98, 0.9, 30)]))
    B = np.concatenate([A, slow[None]])
    np.testing.assert_allclose(lanczos_a(B), np_a(B), rtol=1e-12)
    # leading dims are kept; an empty batch gives an empty result
    assert at._mean_free_operator_norm(torch.zeros(0, 3, N, N, dtype=torch.float64)).shape == (0, 3)


def test_passive_and_deterministic():
    rng = np.random.default_rng(5)
    A = t(np_softmax(rng.standard_normal((2, 3, 64, 64)) * 2))
    before = A.clone()
    torch.manual_seed(123)
    state = torch.get_rng_state()
    a1 = at._mean_free_operator_norm(A)
    assert torch.equal(torch.get_rng_state(), state)  # the start vector has its own generator
    assert torch.equal(A, before)
    assert torch.equal(at._mean_free_operator_norm(A), a1)  # same number every call


def test_float32_and_non_finite():
    rng = np.random.default_rng(6)
    A = np_softmax(rng.standard_normal((4, 64, 64)) * 2)
    a32 = at._mean_free_operator_norm(torch.as_tensor(A, dtype=torch.float32))
    assert a32.dtype == torch.float32
    np.testing.assert_allclose(a32.numpy(), np_a(A), rtol=1e-5)
    bad = t(A)
    bad[1, 3, 4] = math.nan
    with pytest.raises(RuntimeError):  # as the dense solver: no silent number for a NaN pattern
        at._mean_free_operator_norm(bad, min_n=0)
    with pytest.raises(RuntimeError):
        at._mean_free_operator_norm_dense(bad)


def test_report_at_lanczos_size_matches_numpy():
    """The routing report at N ≥ LANCZOS_MIN_N: its a is the SVD's, and [104]/[105] hold."""
    rng = np.random.default_rng(9)
    N, d = at.LANCZOS_MIN_N, 8
    A = np_softmax(rng.standard_normal((2, N, N)) * 2)
    dLi, dLe = rng.standard_normal((2, 2, N, N))
    V, dV = rng.standard_normal((2, 2, N, d))
    dV += 3 * rng.standard_normal((2, 1, d))  # mostly coherent δV, so the bound is valid
    rep = routing_dominance_report(*(t(x) for x in (A, dLi, dLe, V, dV)), 0.3)
    np.testing.assert_allclose(rep["a"].numpy(), np_a(A), rtol=1e-12)
    assert rep["routing_lower_bound_holds"].all() and rep["bound_holds"].all()
    assert rep["bound_valid"].any()


def _report_inputs(seed, B=4, N=128, d=32):
    rng = np.random.default_rng(seed)
    A = np_softmax(rng.standard_normal((B, N, N)) * 2)
    dLi, dLe = rng.standard_normal((2, B, N, N))
    V, dV = rng.standard_normal((2, B, N, d))
    return [torch.as_tensor(x, dtype=torch.float32) for x in (A, dLi, dLe, V, dV)]


def test_report_work_buffers_never_alias_results(monkeypatch):
    """The report keeps its large work buffers between calls (per thread): a later call must not change
    an earlier result, and the numbers equal those computed with no kept buffers."""
    first, second = _report_inputs(1), _report_inputs(2)
    # large enough for the kept buffers and the products into them (N×N and N×(d+1) arrays)
    assert first[0].numel() >= 1 << 16 and first[3][..., :1].numel() * 33 >= 1 << 14
    at.clear_report_workspace()
    rep1 = routing_dominance_report(*first, 0.3)
    snap = {k: v.clone() for k, v in rep1.items()}
    rep2 = routing_dominance_report(*second, 0.3)
    for k in rep1:
        torch.testing.assert_close(rep1[k], snap[k], rtol=0, atol=0, equal_nan=True, msg=k)
    monkeypatch.setattr(at, "WORKSPACE_SLOT_BYTES", 0)  # every array fresh, as before the buffers
    fresh2 = routing_dominance_report(*second, 0.3)
    for k in rep2:
        torch.testing.assert_close(rep2[k], fresh2[k], rtol=1e-14, atol=0, equal_nan=True, msg=k)
    np.testing.assert_allclose(rep2["a"].numpy(), np_a(second[0].double().numpy()
                                                       / second[0].double().numpy().sum(-1, keepdims=True)), rtol=1e-12)


def test_report_work_buffers_are_per_thread():
    import threading

    inputs = [_report_inputs(s) for s in range(4)]
    serial = [routing_dominance_report(*x, 0.3)["measured_ratio"] for x in inputs]
    out = [None] * 4

    def run(i):
        for _ in range(3):
            out[i] = routing_dominance_report(*inputs[i], 0.3)["measured_ratio"]

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    for i in range(4):
        torch.testing.assert_close(out[i], serial[i], rtol=1e-14, atol=0)


def _local_patterns(widths, side=10, seed=0):
    """Local attention on a side×side token grid (Gaussian fall-off of the given widths, noisy logits):
    A ≈ I + E for narrow windows, a flat top of the spectrum (the hard case for Lanczos)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.meshgrid(np.arange(side), np.arange(side), indexing="ij")
    pos = np.stack([yy.ravel(), xx.ravel()], -1)
    D2 = ((pos[:, None] - pos[None]) ** 2).sum(-1)
    N = side * side
    return np.stack([np_softmax(-D2 / (2 * w * w) + 0.3 * rng.standard_normal((N, N))) for w in widths])


def test_flat_topped_local_patterns_go_to_the_dense_solver():
    A = _local_patterns([0.5, 1.0, 2.0, 4.0])
    s = np.linalg.svd(A - A.mean(-1, keepdims=True), compute_uv=False)
    assert s[0, 1] / s[0, 0] > 0.999  # the narrowest window: a flat top
    np.testing.assert_allclose(mean_free_operator_norm(t(A)).numpy(), s[:, 0], rtol=1e-12)
    # the Lanczos routine gives up on the flat-topped head early (its rate predicts > k_max steps)
    # and returns a Ritz value below λ_max; the wide window converges
    lam, done = at._gram_top_eigenvalue_lanczos(mf(A))
    assert not done[0] and done[3]
    assert (lam.numpy() <= s[:, 0] ** 2 * (1 + 1e-14)).all()
