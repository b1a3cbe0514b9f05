"""Numerical core of the probes against independent plain-numpy computations and THEORY's
identities (THEORY §3–5). Everything is small and float64; the whole file runs in seconds."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from dithooks.probes.attention_terms import (
    attention_difference_terms,
    attention_pattern,
    centred_logit_perturbation,
    coherence_fraction,
    combine_head_norms,
    combined_logit_perturbation,
    linearised_difference,
    logit_perturbations,
    logit_spread,
    mean_free,
    mean_free_operator_norm,
    mean_free_operator_norm_upper,
    modal_gains,
    modulation_frobenius_bound,
    modulation_gate,
    modulation_row_bound,
    modulation_term,
    routing_dominance_bound,
    routing_dominance_report,
    routing_dominance_report_from_qkv,
    routing_gate,
    routing_lower_bound,
    routing_term,
    softmax_jacobian_apply,
)
from dithooks.probes.attention_width import (
    effective_width,
    effective_width_summary,
    row_entropy,
    width_summary,
)
from dithooks.probes.modes import (
    DifferenceModeBasis,
    band_energies,
    band_indices,
    default_mode_tolerance,
    energy_gap_ratio,
    fit_difference_modes_per_layer,
)

F64 = torch.float64


def t(x):
    return torch.as_tensor(np.asarray(x), dtype=F64)


# ======================================================================================
# plain-numpy references (written independently of the package code)
# ======================================================================================


def np_softmax(L):
    L = L - L.max(axis=-1, keepdims=True)
    e = np.exp(L)
    return e / e.sum(axis=-1, keepdims=True)


def np_coupled_attention(Qa, Ka, Va, Qb, Kb, Vb, g):
    """Blockwise-softmax replica attention, THEORY [19]."""
    s = 1.0 / math.sqrt(Qa.shape[-1])
    Aaa = np_softmax(Qa @ Ka.T * s)
    Aab = np_softmax(Qa @ Kb.T * s)
    Abb = np_softmax(Qb @ Kb.T * s)
    Aba = np_softmax(Qb @ Ka.T * s)
    Oa = (Aaa @ Va + g * Aab @ Vb) / (1 + g)
    Ob = (Abb @ Vb + g * Aba @ Va) / (1 + g)
    return Oa, Ob


def np_perp(N):
    return np.eye(N) - np.ones((N, N)) / N


def np_appendix_b(A, dL, V, dV):
    """Appendix-B ingredients and bound [92–105] straight from the formulas."""
    N = A.shape[-1]
    c = dL - (A * dL).sum(-1, keepdims=True)
    dA = A * c
    delta = np.abs(c).max(-1)
    n_eff = 1.0 / (A**2).sum(-1)
    P = np_perp(N)
    eps_V = np.linalg.norm(P @ V) / np.linalg.norm(V)
    eps_d = np.linalg.norm(P @ dV) / np.linalg.norm(dV)
    a = np.linalg.svd(A @ P, compute_uv=False)[0]
    num = delta.max() * np.sqrt(N / n_eff.min()) * eps_V * np.linalg.norm(V)
    den = (np.sqrt(1 - eps_d**2) - a * eps_d) * np.linalg.norm(dV)
    measured = np.linalg.norm(dA @ V) / np.linalg.norm(A @ dV)
    return dict(
        dA=dA, delta=delta, n_eff=n_eff, eps_V=eps_V, eps_d=eps_d, a=a, num=num, den=den,
        bound=num / den if den > 0 else np.inf, measured=measured,
    )


# ======================================================================================
# replica difference modes (THEORY §4)
# ======================================================================================


def _random_X(rng, M, D, decay=0.7):
    # distinct, decaying spectrum so eigenvectors are well separated
    scales = decay ** np.arange(M)
    return (rng.standard_normal((M, M)) * scales) @ rng.standard_normal((M, D))


@pytest.mark.parametrize("centre", [False, True])
def test_modes_match_eigenvectors_of_explicit_covariance(centre):
    rng = np.random.default_rng(0)
    M, D = 7, 40
    X = _random_X(rng, M, D)
    basis = DifferenceModeBasis.fit(t(X), centre=centre)

    Xc = X - X.mean(0) if centre else X
    C = Xc.T @ Xc / M  # small D: fine to form here
    w, U = np.linalg.eigh(C)
    w, U = w[::-1], U[:, ::-1]
    K = basis.n_modes
    assert K == (M - 1 if centre else M)  # centring leaves at most M-1 meaningful modes
    np.testing.assert_allclose(basis.eigenvalues.numpy(), w[:K], rtol=1e-10)
    # eigenvectors agree up to sign
    overlaps = np.abs(np.sum(basis.modes.numpy() * U[:, :K].T, axis=1))
    np.testing.assert_allclose(overlaps, 1.0, atol=1e-8)
    # v_k are eigenvectors of C
    V = basis.modes.numpy()
    np.testing.assert_allclose(V @ C, basis.eigenvalues.numpy()[:, None] * V, atol=1e-10)


def test_modes_orthonormal_and_unit_energy_at_step0():
    torch.manual_seed(1)
    M, N, d = 12, 16, 8
    X = torch.randn(M, N, d, dtype=torch.float32) * torch.linspace(2, 0.1, N)[:, None]
    basis = DifferenceModeBasis.fit(X)  # float64 by default
    assert basis.modes.dtype == F64 and basis.feature_shape == (N, d)
    K = basis.n_modes
    assert K == M
    np.testing.assert_allclose((basis.modes @ basis.modes.T).numpy(), np.eye(K), atol=1e-12)
    assert basis.orthonormality_error() < 1e-12
    np.testing.assert_allclose(basis.normalised_energy(X).numpy(), np.ones(K), atol=1e-12)
    assert basis.mode_maps().shape == (K, N, d)
    # E(0)=1 also for centred bases, both centring conventions
    for using in ("own", "fit"):
        b = DifferenceModeBasis.fit(X, centre=True, centre_using=using)
        assert b.n_modes == M - 1
        np.testing.assert_allclose(b.normalised_energy(X).numpy(), 1.0, atol=1e-10)


def test_modes_energy_at_later_step_matches_numpy():
    rng = np.random.default_rng(2)
    M, D = 9, 30
    X0 = _random_X(rng, M, D)
    basis = DifferenceModeBasis.fit(t(X0))
    V, lam = basis.modes.numpy(), basis.eigenvalues.numpy()
    Xs = rng.standard_normal((3, M, D))  # three later steps at once
    E = basis.normalised_energy(t(Xs)).numpy()
    E_ref = np.stack([((x @ V.T) ** 2).mean(0) / lam for x in Xs])
    np.testing.assert_allclose(E, E_ref, rtol=1e-12)
    np.testing.assert_allclose(basis.project(t(Xs)).numpy(), Xs @ V.T, rtol=1e-12, atol=1e-12)
    # energy is quadratic in the amplitude
    np.testing.assert_allclose(basis.normalised_energy(t(2 * X0)).numpy(), 4.0, rtol=1e-10)
    # centred "own" removes the per-step replica mean; "fit" removes the step-0 mean
    b_own = DifferenceModeBasis.fit(t(X0), centre=True, centre_using="own")
    b_fit = DifferenceModeBasis.fit(t(X0), centre=True, centre_using="fit")
    x = Xs[0]
    np.testing.assert_allclose(
        b_own.normalised_energy(t(x)).numpy(),
        (((x - x.mean(0)) @ b_own.modes.numpy().T) ** 2).mean(0) / b_own.eigenvalues.numpy(), rtol=1e-10)
    np.testing.assert_allclose(
        b_fit.normalised_energy(t(x)).numpy(),
        (((x - X0.mean(0)) @ b_fit.modes.numpy().T) ** 2).mean(0) / b_fit.eigenvalues.numpy(), rtol=1e-10)


def test_modes_tolerance_drops_null_directions():
    rng = np.random.default_rng(3)
    # rank 3 with 6 replicas (duplicated / combined rows)
    B = rng.standard_normal((3, 25))
    X = rng.standard_normal((6, 3)) @ B
    basis = DifferenceModeBasis.fit(t(X))
    assert basis.n_modes == 3
    assert basis.orthonormality_error() < 1e-8
    assert len(basis.gram_eigenvalues) == 6
    # M > D: at most D modes
    assert DifferenceModeBasis.fit(t(rng.standard_normal((10, 4)))).n_modes == 4
    # tolerance is relative and explicit
    w = np.array([1.0, 1e-3, 1e-6])
    Xw = np.diag(np.sqrt(w * 3)) @ np.linalg.qr(rng.standard_normal((20, 3)))[0].T
    assert DifferenceModeBasis.fit(t(Xw), rel_tol=1e-4).n_modes == 2
    assert DifferenceModeBasis.fit(t(Xw), rel_tol=1e-8).n_modes == 3
    assert DifferenceModeBasis.fit(t(Xw), max_modes=1).n_modes == 1
    assert default_mode_tolerance(torch.float32) > default_mode_tolerance(F64)
    with pytest.raises(ValueError):
        DifferenceModeBasis.fit(torch.zeros(4, 10))
    with pytest.raises(ValueError):
        DifferenceModeBasis.fit(t(X)).project(torch.zeros(6, 24, dtype=F64))


def test_mode_basis_float32_and_state_dict_roundtrip():
    torch.manual_seed(4)
    X = torch.randn(8, 50)
    b32 = DifferenceModeBasis.fit(X, dtype=torch.float32)
    assert b32.modes.dtype == torch.float32 and b32.orthonormality_error() < 1e-4
    np.testing.assert_allclose(b32.normalised_energy(X).numpy(), 1.0, atol=1e-4)
    b = DifferenceModeBasis.fit(X, centre=True)
    b2 = DifferenceModeBasis.from_state_dict(b.state_dict())
    torch.testing.assert_close(b2.normalised_energy(X), b.normalised_energy(X))
    per_layer = fit_difference_modes_per_layer({0: X, 5: 2 * X})
    np.testing.assert_allclose(per_layer[5].eigenvalues.numpy(), 4 * per_layer[0].eigenvalues.numpy(), rtol=1e-10)


def test_bands_and_gap_ratio():
    assert band_indices(None, 8, "lead").tolist() == [0, 1]
    assert band_indices(None, 8, "trail").tolist() == [6, 7]
    assert band_indices(0.25, 31, "lead").tolist() == list(range(8))  # 7.75 rounds to 8
    assert band_indices(0.1, 3, "trail").tolist() == [2]  # at least one mode
    assert band_indices(3, 8, "trail").tolist() == [5, 6, 7]
    assert band_indices([0, -1], 8, "lead").tolist() == [0, 7]
    for bad in (0.0, 1.5, 0, [8], [1, 1], True, []):
        with pytest.raises((ValueError, TypeError)):
            band_indices(bad, 8, "lead")
    rng = np.random.default_rng(5)
    E = rng.random((4, 3, 8)) + 0.1  # e.g. [layer, step, K]
    out = band_energies(t(E))
    np.testing.assert_allclose(out["E_lead"].numpy(), E[..., :2].mean(-1))
    np.testing.assert_allclose(out["E_trail"].numpy(), E[..., 6:].mean(-1))
    np.testing.assert_allclose(out["R"].numpy(), E[..., 6:].mean(-1) / E[..., :2].mean(-1))
    np.testing.assert_allclose(
        energy_gap_ratio(t(E), lead=[0], trail=[3, 5]).numpy(), E[..., [3, 5]].mean(-1) / E[..., 0])
    # at step 0 every band has energy 1, so R = 1
    X = torch.randn(8, 20, dtype=F64)
    b = DifferenceModeBasis.fit(X)
    assert abs(float(b.energy_gap_ratio(X)) - 1) < 1e-12
    be = b.band_energies(X, lead=0.5, trail=0.5)
    assert be["E"].shape == (8,)


# ======================================================================================
# attention width (THEORY [92])
# ======================================================================================


def test_effective_width_and_entropy_against_numpy():
    rng = np.random.default_rng(6)
    N = 10
    A = np_softmax(rng.standard_normal((3, 4, N, N)) * 2)  # [layer, head, N, N]
    n_eff = effective_width(t(A)).numpy()
    np.testing.assert_allclose(n_eff, 1 / (A**2).sum(-1), rtol=1e-12)
    assert (n_eff >= 1).all() and (n_eff <= N).all()
    H = row_entropy(t(A)).numpy()
    np.testing.assert_allclose(H, -(A * np.log(A)).sum(-1), rtol=1e-12)
    assert (n_eff <= np.exp(H) * (1 + 1e-12)).all()  # Rényi-2 ≤ Shannon width
    # equality cases: one-hot row → 1, uniform row → N; entropy 0 and log N
    onehot = torch.eye(N, dtype=F64)
    uniform = torch.full((N, N), 1 / N, dtype=F64)
    np.testing.assert_allclose(effective_width(onehot).numpy(), 1.0)
    np.testing.assert_allclose(effective_width(uniform).numpy(), N, rtol=1e-12)
    np.testing.assert_allclose(row_entropy(onehot).numpy(), 0.0)
    np.testing.assert_allclose(row_entropy(uniform).numpy(), math.log(N), rtol=1e-12)

    s = effective_width_summary(t(A))
    for key, ref in {"min": n_eff.min(-1), "q25": np.percentile(n_eff, 25, axis=-1),
                     "median": np.median(n_eff, axis=-1), "q75": np.percentile(n_eff, 75, axis=-1),
                     "max": n_eff.max(-1), "mean": n_eff.mean(-1)}.items():
        np.testing.assert_allclose(s[key].numpy(), ref, rtol=1e-12, err_msg=key)
    np.testing.assert_allclose(s["entropy_mean"].numpy(), H.mean(-1), rtol=1e-12)
    s2 = effective_width_summary(n_eff=t(n_eff))
    for key in ("min", "q25", "median", "q75", "max", "mean"):
        torch.testing.assert_close(s2[key], s[key])
    assert width_summary(t(n_eff))["min"].shape == (3, 4)
    with pytest.raises(ValueError):
        effective_width_summary()


# ======================================================================================
# softmax Jacobian, logit perturbations, routing + modulation (THEORY §3)
# ======================================================================================


def test_softmax_jacobian_matches_finite_differences():
    rng = np.random.default_rng(7)
    L = rng.standard_normal((2, 6, 6)) * 2
    dL = rng.standard_normal((2, 6, 6))
    h = 1e-5
    fd = (np_softmax(L + h * dL) - np_softmax(L - h * dL)) / (2 * h)
    dA = softmax_jacobian_apply(t(np_softmax(L)), t(dL)).numpy()
    np.testing.assert_allclose(dA, fd, atol=1e-9)
    np.testing.assert_allclose(dA.sum(-1), 0.0, atol=1e-15)  # δA 1 = 0 [89]


def test_logit_perturbations_and_pattern_from_qkv():
    rng = np.random.default_rng(8)
    N, dh = 5, 4
    Q, K, dQ, dK = (rng.standard_normal((N, dh)) for _ in range(4))
    s = 1 / math.sqrt(dh)
    dL_intra, dL_inter = logit_perturbations(t(Q), t(K), t(dQ), t(dK))
    # logits are bilinear, so the central difference is exact up to rounding
    h = 1e-3
    fd_intra = ((Q + h * dQ) @ (K + h * dK).T - (Q - h * dQ) @ (K - h * dK).T) * s / (2 * h)
    fd_inter = ((Q + h * dQ) @ (K - h * dK).T - (Q - h * dQ) @ (K + h * dK).T) * s / (2 * h)
    np.testing.assert_allclose(dL_intra.numpy(), fd_intra, atol=1e-12)
    np.testing.assert_allclose(dL_inter.numpy(), fd_inter, atol=1e-12)
    np.testing.assert_allclose(attention_pattern(t(Q), t(K)).numpy(), np_softmax(Q @ K.T * s), atol=1e-14)


@pytest.mark.parametrize("g", [0.0, 0.3, 0.7, 1.0])
def test_routing_plus_modulation_matches_coupled_attention_difference(g):
    """R + M [25] against a finite difference of the blockwise-softmax coupled attention [19]."""
    rng = np.random.default_rng(9)
    N, dm, dh = 6, 5, 4
    h0 = rng.standard_normal((N, dm))
    delta = rng.standard_normal((N, dm))
    WQ, WK, WV = (rng.standard_normal((dm, dh)) for _ in range(3))
    Q, K, V = h0 @ WQ, h0 @ WK, h0 @ WV
    dQ, dK, dV = delta @ WQ, delta @ WK, delta @ WV
    A = np_softmax(Q @ K.T / math.sqrt(dh))
    dL_intra, dL_inter = logit_perturbations(t(Q), t(K), t(dQ), t(dK))
    terms = attention_difference_terms(t(A), dL_intra, dL_inter, t(V), t(dV), g)

    def half_diff(eps, q=True, v=True):
        ea, eb = (eps if q else 0), (eps if v else 0)
        Oa, Ob = np_coupled_attention(Q + ea * dQ, K + ea * dK, V + eb * dV,
                                      Q - ea * dQ, K - ea * dK, V - eb * dV, g)
        return (Oa - Ob) / 2

    eps = 1e-5
    # (O^a − O^b)/2 is odd in ε, so fd/ε = R + M + O(ε²)
    np.testing.assert_allclose(terms["total"].numpy(), half_diff(eps) / eps, atol=1e-8)
    # the probe's one-Jacobian form of R + M against the same finite difference
    lin = linearised_difference(t(A), dL_intra, dL_inter, t(V), t(dV), g)
    np.testing.assert_allclose(lin.numpy(), half_diff(eps) / eps, atol=1e-8)
    # routing = value path only, modulation = Q/K path only (THEORY §3)
    np.testing.assert_allclose(terms["routing"].numpy(), half_diff(eps, q=False) / eps, atol=1e-8)
    np.testing.assert_allclose(terms["modulation"].numpy(), half_diff(eps, v=False) / eps, atol=1e-8)
    np.testing.assert_allclose(routing_term(t(A), t(dV), g).numpy(), terms["routing"].numpy())
    np.testing.assert_allclose(modulation_term(t(A), dL_intra, dL_inter, t(V), g).numpy(), terms["modulation"].numpy())
    if g == 1.0:
        assert np.abs(terms["routing"].numpy()).max() == 0.0  # routing vanishes at g = 1
        # modulation at g=1 is driven by δQ Kᵀ only: 2 δQ Kᵀ/√d_h, halved by ξ(1)
        dA_q = softmax_jacobian_apply(t(A), t(dQ @ K.T / math.sqrt(dh)))
        np.testing.assert_allclose(terms["modulation"].numpy(), (dA_q @ t(V)).numpy(), atol=1e-13)
    if g == 0.0:
        # g = 0 is exactly the uncoupled model for each replica
        Oa, _ = np_coupled_attention(Q, K, V, Q, K + 1.0, V * 3, 0.0)
        np.testing.assert_array_equal(Oa, np_softmax(Q @ K.T / math.sqrt(dh)) @ V)


def test_gates():
    assert routing_gate(0.0) == 1 and routing_gate(1.0) == 0 and modulation_gate(1.0) == 0.5
    np.testing.assert_allclose(routing_gate(0.3), 0.7 / 1.3)
    np.testing.assert_allclose(modulation_gate(0.3), 1 / 1.3)


# ======================================================================================
# Appendix B identities and ingredients (THEORY §5)
# ======================================================================================


def test_appendix_b_identities():
    rng = np.random.default_rng(10)
    N, d = 8, 3
    A = np_softmax(rng.standard_normal((N, N)) * 3)
    dL = rng.standard_normal((N, N))
    V, dV = rng.standard_normal((N, d)), rng.standard_normal((N, d))
    At, dA = t(A), softmax_jacobian_apply(t(A), t(dL))
    one = torch.ones(N, 1, dtype=F64)
    P_par = one @ one.T / N
    torch.testing.assert_close(At @ one, one, atol=1e-14, rtol=0)  # A1 = 1
    torch.testing.assert_close(dA @ one, torch.zeros_like(one), atol=1e-15, rtol=0)  # δA1 = 0
    torch.testing.assert_close(dA @ t(V), dA @ mean_free(t(V)), atol=1e-14, rtol=0)  # [90]
    torch.testing.assert_close(At @ P_par, P_par, atol=1e-15, rtol=0)  # A P∥ = P∥
    torch.testing.assert_close(At @ t(dV), P_par @ t(dV) + At @ mean_free(t(dV)), atol=1e-14, rtol=0)  # [91]
    np.testing.assert_allclose(mean_free(t(V)).numpy(), np_perp(N) @ V, atol=1e-15)
    np.testing.assert_allclose(coherence_fraction(t(V)).numpy(),
                               np.linalg.norm(np_perp(N) @ V) / np.linalg.norm(V))
    assert float(coherence_fraction(torch.ones(N, d, dtype=F64))) < 1e-15
    assert float(coherence_fraction(torch.zeros(N, d, dtype=F64))) == 0.0

    rep = routing_dominance_report(t(A), t(dL), None, t(V), t(dV))
    for key in ("stochasticity_residual", "dA_row_sum_residual", "mean_free_residual",
                "constant_preservation_residual"):
        assert float(rep[key]) < 1e-13, key
    # ingredients against the numpy reference
    ref = np_appendix_b(A, dL, V, dV)
    np.testing.assert_allclose(rep["Delta"].numpy(), ref["delta"], rtol=1e-12)
    np.testing.assert_allclose(rep["N_eff"].numpy(), ref["n_eff"], rtol=1e-12)
    np.testing.assert_allclose(rep["N_min"].numpy(), ref["n_eff"].min(), rtol=1e-12)
    np.testing.assert_allclose(rep["eps_V"].numpy(), ref["eps_V"], rtol=1e-12)
    np.testing.assert_allclose(rep["eps_delta"].numpy(), ref["eps_d"], rtol=1e-12)
    np.testing.assert_allclose(rep["a"].numpy(), ref["a"], rtol=1e-12)
    np.testing.assert_allclose(rep["measured_ratio"].numpy(), ref["measured"], rtol=1e-12)


def test_mean_free_operator_norm_svd_and_brute_force():
    rng = np.random.default_rng(11)
    N = 7
    A = np_softmax(rng.standard_normal((4, N, N)) * 2)
    a = mean_free_operator_norm(t(A)).numpy()
    P = np_perp(N)
    for h in range(4):
        np.testing.assert_allclose(a[h], np.linalg.svd(A[h] @ P, compute_uv=False)[0], rtol=1e-12)
        # brute force: no mean-free unit vector does better ...
        x = rng.standard_normal((N, 5000))
        x -= x.mean(0)
        x /= np.linalg.norm(x, axis=0)
        assert np.linalg.norm(A[h] @ x, axis=0).max() <= a[h] * (1 + 1e-12)
        # ... and projected power iteration on P Aᵀ A P reaches it
        y = P @ rng.standard_normal(N)
        for _ in range(2000):
            y = P @ (A[h].T @ (A[h] @ y))
            y /= np.linalg.norm(y)
        np.testing.assert_allclose(np.linalg.norm(A[h] @ y), a[h], rtol=1e-8)
    # the pitfalls: every row attending the same key
    L = np.zeros((N, N))
    L[:, 0] = 40.0
    A_sink = np_softmax(L)
    a_sink = float(mean_free_operator_norm(t(A_sink)))
    np.testing.assert_allclose(a_sink, math.sqrt(N - 1), rtol=1e-10)  # not ≤ 1
    assert np.linalg.norm(P @ A_sink @ P, 2) < 1e-10  # ‖P⊥AP⊥‖ would miss it entirely
    assert np.linalg.norm(np.full((N, N), 1 / N) @ P, 2) < 1e-12  # uniform: a = 0


# ======================================================================================
# the Appendix-B bound on many instances, including adversarial ones
# ======================================================================================


def _bound_cases():
    """(name, A, dL_intra, dL_inter, V, dV) instances: random, peaked, sink, low rank, coherent."""
    rng = np.random.default_rng(12)
    cases = []
    N, d = 16, 6
    for i in range(60):
        temp = [0.1, 1.0, 3.0, 10.0][i % 4]
        kind = ["random", "peaked", "sink", "uniformish"][(i // 4) % 4]
        L = rng.standard_normal((N, N)) * temp
        if kind == "peaked":
            L[np.arange(N), rng.integers(0, N, N)] += 8.0
        elif kind == "sink":
            L[:, :2] += 8.0
        elif kind == "uniformish":
            L *= 0.01
        A = np_softmax(L)
        vkind = ["coherent", "lowrank", "random"][i % 3]
        const = rng.standard_normal(d) * 3
        if vkind == "coherent":
            V = const + 0.1 * rng.standard_normal((N, d))
        elif vkind == "lowrank":
            V = const + np.outer(rng.standard_normal(N), rng.standard_normal(d))
        else:
            V = rng.standard_normal((N, d))
        dV = rng.standard_normal(d) + [0.02, 0.1, 0.3][i % 3] * rng.standard_normal((N, d))
        dkind = i % 2
        if dkind == 0:
            dL_intra, dL_inter = rng.standard_normal((N, N)), rng.standard_normal((N, N))
        else:  # low rank, from Q/K structure
            u, w = rng.standard_normal((N, 2)), rng.standard_normal((N, 2))
            dL_intra, dL_inter = u @ w.T, w @ u.T
        cases.append((f"{kind}/{vkind}/{temp}", A, dL_intra, dL_inter, V, dV))
    # adversarial, near-tight for [99]: every row splits between keys 0 and 1, the logit
    # perturbation pushes 0 against 1, and V lives on those two tokens.
    for n in (8, 16, 32):
        L = np.zeros((n, n))
        L[:, :2] = 30.0
        A = np_softmax(L)
        s = rng.choice([-1.0, 1.0], n)
        dL = np.zeros((n, n))
        dL[:, 0], dL[:, 1] = s, -s
        V = np.zeros((n, d))
        V[0] = rng.standard_normal(d)
        V[1] = -V[0]
        V += 5.0  # a constant offset changes neither δA V nor P⊥V
        dV = np.ones((n, d)) + 1e-3 * rng.standard_normal((n, d))
        cases.append((f"sink-tight/{n}", A, dL, np.zeros((n, n)), V, dV))
    return cases


BOUND_CASES = _bound_cases()


@pytest.mark.parametrize("g", [0.0, 0.5, 1.0])
def test_appendix_b_bound_holds_on_many_instances(g):
    n_valid = 0
    for name, A, dLi, dLe, V, dV in BOUND_CASES:
        rep = routing_dominance_report(t(A), t(dLi), t(dLe), t(V), t(dV), g)
        for key in ("row_bound_holds", "frobenius_bound_holds", "routing_lower_bound_holds",
                    "bound_holds", "bound_intra_holds"):
            assert bool(rep[key]), f"{key} violated on {name} at g={g}"
        # independent recomputation with δA_g = J_A(δL_intra + g δL_inter)
        ref = np_appendix_b(A, dLi + g * dLe, V, dV)
        np.testing.assert_allclose(rep["measured_ratio"].numpy(), ref["measured"], rtol=1e-10)
        assert ref["measured"] <= ref["bound"] * (1 + 1e-10), name
        if ref["den"] > 0:
            n_valid += 1
            assert bool(rep["bound_valid"])
            np.testing.assert_allclose(rep["bound"].numpy(), ref["bound"], rtol=1e-10)
            tight = float(rep["tightness"])
            assert 0 < tight <= 1 + 1e-10, (name, tight)
        else:
            assert not bool(rep["bound_valid"]) and math.isinf(float(rep["bound"]))
        # the summed per-row bound sits between measured and [99]
        assert float(rep["modulation_norm"]) <= float(rep["summed_row_bound"]) * (1 + 1e-12)
        assert float(rep["summed_row_bound"]) <= float(rep["frobenius_bound"]) * (1 + 1e-12)
        # the gated ratio is the ungated one times ξ/ρ
        if g < 1:
            np.testing.assert_allclose(float(rep["measured_ratio_gated"]),
                                       float(rep["measured_ratio"]) / (1 - g), rtol=1e-12)
            assert float(rep["measured_ratio_gated"]) <= float(rep["bound_gated"]) * (1 + 1e-10)
        else:
            assert float(rep["routing_norm_gated"]) == 0 and math.isinf(float(rep["bound_gated"]))
    assert n_valid >= 30  # the test is not vacuous: most instances have a finite bound


def test_appendix_b_bound_is_tight_and_would_catch_a_wrong_ingredient():
    """A bound inflated or deflated by a wrong ingredient must show up."""
    violated_with_N_not_Nmin = 0
    for name, A, dLi, dLe, V, dV in BOUND_CASES:
        rep = routing_dominance_report(t(A), t(dLi), t(dLe), t(V), t(dV), 0.0)
        # wrong: √(N/N) instead of √(N/N_min)
        wrong = rep["Delta_max"] * rep["norm_perp_V"]
        if float(rep["modulation_norm"]) > float(wrong) * (1 + 1e-6):
            violated_with_N_not_Nmin += 1
        if name.startswith("sink-tight"):
            n = A.shape[0]
            # [99] is essentially attained here (so it cannot be inflated without notice) ...
            assert float(rep["modulation_norm"] / rep["frobenius_bound"]) > 0.99, name
            # ... and the wrong factor underestimates it by √(N/2)
            np.testing.assert_allclose(float(rep["modulation_norm"] / wrong), math.sqrt(n / 2), rtol=1e-3)
    assert violated_with_N_not_Nmin >= 3

    # wrong a: ‖P⊥AP⊥‖ in place of ‖A P⊥‖ makes [104] false when A P⊥ δV cancels P∥ δV
    N, d = 8, 3
    L = np.zeros((N, N))
    L[:, 0] = 40.0
    A = np_softmax(L)
    u = np.random.default_rng(13).standard_normal(d)
    w = np.outer(np.eye(N)[0] - 1 / N, u)  # mean-free, A w ≈ (1 − 1/N) 1 uᵀ
    dV = -(1 - 1 / N) * np.outer(np.ones(N), u) + w  # A δV ≈ 0
    measured = np.linalg.norm(A @ dV)
    eps_d = float(coherence_fraction(t(dV)))
    wrong_a = np.linalg.norm(np_perp(N) @ A @ np_perp(N), 2)
    assert (math.sqrt(1 - eps_d**2) - wrong_a * eps_d) * np.linalg.norm(dV) > measured + 1.0
    assert float(routing_lower_bound(t(A), t(dV))) <= measured + 1e-12  # the right a is fine


def test_bound_functions_agree_with_report_and_handle_edge_cases():
    name, A, dLi, dLe, V, dV = BOUND_CASES[0]
    g = 0.4
    rep = routing_dominance_report(t(A), t(dLi), t(dLe), t(V), t(dV), g)
    dLg = combined_logit_perturbation(t(dLi), t(dLe), g)
    torch.testing.assert_close(modulation_row_bound(t(A), dLg, t(V)), rep["row_bound"])
    torch.testing.assert_close(modulation_frobenius_bound(t(A), dLg, t(V)), rep["frobenius_bound"])
    torch.testing.assert_close(routing_lower_bound(t(A), t(dV)), rep["routing_lower_bound"])
    torch.testing.assert_close(routing_dominance_bound(t(A), dLg, t(V), t(dV)), rep["bound"])
    torch.testing.assert_close(logit_spread(t(A), dLg), rep["Delta"])
    np.testing.assert_allclose(float(rep["routing_dominance_gated"]),
                               float(rep["routing_norm_gated"] / rep["modulation_norm_gated"]))

    # batched heads give the per-head results
    stack = [BOUND_CASES[i] for i in (0, 1, 2)]
    At, dLit, dLet, Vt, dVt = (torch.stack([t(c[j]) for c in stack]) for j in range(1, 6))
    rep_b = routing_dominance_report(At, dLit, dLet, Vt, dVt, g)
    for h, c in enumerate(stack):
        rep_h = routing_dominance_report(*(t(x) for x in c[1:]), g)
        np.testing.assert_allclose(rep_b["bound"][h].numpy(), rep_h["bound"].numpy(), rtol=1e-12)
        np.testing.assert_allclose(rep_b["a"][h].numpy(), rep_h["a"].numpy(), rtol=1e-12)
    np.testing.assert_allclose(combine_head_norms(rep_b["routing_norm"]).numpy(),
                               np.sqrt((rep_b["routing_norm"].numpy() ** 2).sum()))

    # from Q, K, dQ, dK
    rng = np.random.default_rng(14)
    Q, K, dQ, dK = (rng.standard_normal((2, 6, 4)) for _ in range(4))
    Vq, dVq = rng.standard_normal((2, 6, 4)), 1.0 + 0.05 * rng.standard_normal((2, 6, 4))
    rq = routing_dominance_report_from_qkv(t(Q), t(K), t(Vq), t(dQ), t(dK), t(dVq), 0.2)
    Aq = attention_pattern(t(Q), t(K))
    dLi_q, dLe_q = logit_perturbations(t(Q), t(K), t(dQ), t(dK))
    torch.testing.assert_close(rq["bound"], routing_dominance_report(Aq, dLi_q, dLe_q, t(Vq), t(dVq), 0.2)["bound"])
    assert rq["bound_holds"].all()

    # a captured, slightly non-stochastic pattern: residual reported, checks still hold
    A_bad = t(A) * 1.001
    rep_bad = routing_dominance_report(A_bad, t(dLi), t(dLe), t(V), t(dV), g)
    np.testing.assert_allclose(float(rep_bad["stochasticity_residual"]), 1e-3, rtol=1e-6)
    assert bool(rep_bad["bound_holds"]) and float(rep_bad["dA_row_sum_residual"]) < 1e-12

    # masked keys (A = 0, logit perturbation NaN there) do not poison the row
    A_m = A.copy()
    A_m[:, -3:] = 0
    A_m /= A_m.sum(-1, keepdims=True)
    dL_m = dLi.copy()
    dL_m[:, -3:] = np.nan
    rep_m = routing_dominance_report(t(A_m), t(dL_m), None, t(V), t(dV))
    assert torch.isfinite(rep_m["Delta"]).all() and bool(rep_m["bound_holds"])
    assert torch.isfinite(centred_logit_perturbation(t(A_m), t(dL_m))).all()

    # float32 compute works with its own slack
    rep32 = routing_dominance_report(t(A), t(dLi), t(dLe), t(V), t(dV), g, dtype=torch.float32)
    assert rep32["bound"].dtype == torch.float32 and bool(rep32["bound_holds"])
    np.testing.assert_allclose(float(rep32["measured_ratio"]), float(rep["measured_ratio"]), rtol=1e-4)


# ======================================================================================
# modal gains along a direction (THEORY [44–46, 59])
# ======================================================================================


def test_modal_gains_from_responses():
    rng = np.random.default_rng(15)
    D, K = 12, 3
    Rt, Mt, Ft = (rng.standard_normal((D, D)) for _ in range(3))
    v = np.linalg.qr(rng.standard_normal((D, K)))[0].T  # K orthonormal directions
    g = 0.25
    out = modal_gains(t(v), t(v @ Rt.T), t(v @ Mt.T), mlp_response=t(v @ Ft.T), g=g)
    chi = np.einsum("kd,de,ke->k", v, Rt, v)
    pi = np.einsum("kd,de,ke->k", v, Mt, v)
    f = np.einsum("kd,de,ke->k", v, Ft, v)
    np.testing.assert_allclose(out["chi"].numpy(), chi, rtol=1e-12)
    np.testing.assert_allclose(out["pi"].numpy(), pi, rtol=1e-12)
    np.testing.assert_allclose(out["ratio"].numpy(), np.abs(pi) / np.abs(chi), rtol=1e-12)
    rho, xi = (1 - g) / (1 + g), 1 / (1 + g)
    np.testing.assert_allclose(out["kappa"].numpy(), 1 + rho * chi + xi * pi + f, rtol=1e-12)
    # κ is the Rayleigh quotient of the full propagator I + ρR̃ + ξM̃ + F
    Kfull = np.eye(D) + rho * Rt + xi * Mt + Ft
    np.testing.assert_allclose(out["kappa"].numpy(), np.einsum("kd,de,ke->k", v, Kfull, v), rtol=1e-12)
    # a non-unit direction (responses computed along it) gives the same gains
    out2 = modal_gains(t(3 * v), t(3 * v @ Rt.T), t(3 * v @ Mt.T))
    np.testing.assert_allclose(out2["chi"].numpy(), chi, rtol=1e-12)
    # token-map shaped vectors: [K, N, d] with feature_ndim=2
    out3 = modal_gains(t(v.reshape(K, 3, 4)), t((v @ Rt.T).reshape(K, 3, 4)),
                       t((v @ Mt.T).reshape(K, 3, 4)), feature_ndim=2)
    np.testing.assert_allclose(out3["pi"].numpy(), pi, rtol=1e-12)


def test_report_in_place_work_is_passive_and_matches_the_out_of_place_path():
    """The report centres δL and forms δA in the buffers of its own casts (issue #11): the caller's
    tensors are never written, and the result equals the path without casts (fp64 inputs, every
    temporary new) and the numpy reference, masked (zero) pattern entries included."""
    g = 0.3
    name, A, dLi, dLe, V, dV = BOUND_CASES[0]
    masked = A.copy()
    masked[:, -3:] = 0.0  # keys nobody reads (a mask): the bracket is zeroed there
    masked /= masked.sum(-1, keepdims=True)
    for name, A, dLi, dLe, V, dV in BOUND_CASES + [("masked", masked, dLi, dLe, V, dV)]:
        args64 = [t(x) for x in (A, dLi, dLe, V, dV)]
        args32 = [x.float() for x in args64]
        keep64, keep32 = [x.clone() for x in args64], [x.clone() for x in args32]
        rep64 = routing_dominance_report(*args64, g)  # no cast: nothing owned, nothing in place
        rep32 = routing_dominance_report(*args32, g)  # cast copies: worked on in place
        for x, k in zip(args64 + args32, keep64 + keep32):
            assert torch.equal(x, k), name  # inputs untouched
        # same numbers from the fp32-rounded inputs, either path
        rep_ref = routing_dominance_report(*(x.double() for x in args32), g)
        for key in ("Delta_max", "Delta_max_intra", "Delta_max_inter", "modulation_norm", "routing_norm",
                    "measured_ratio", "measured_ratio_intra", "a", "dA_row_sum_residual"):
            np.testing.assert_allclose(rep32[key].numpy(), rep_ref[key].numpy(), rtol=1e-12, atol=1e-15,
                                       err_msg=f"{name} {key}")
        dLg = np.asarray(dLi) + g * np.asarray(dLe)
        ref = np_appendix_b(A, dLg, V, dV)
        c = np.where(A > 0, dLg - (A * dLg).sum(-1, keepdims=True), 0.0)  # the bracket on A's support
        np.testing.assert_allclose(rep64["Delta"].numpy(), np.abs(c).max(-1), rtol=1e-12, atol=1e-15, err_msg=name)
        np.testing.assert_allclose(rep64["measured_ratio"].numpy(), ref["measured"], rtol=1e-10, err_msg=name)


def test_mean_free_operator_norm_upper_bounds_a_and_keeps_the_bound_proven():
    """ā (Schatten-8 of A P_⊥, rounding added) is ≥ the SVD's a on every pattern, ≤ N^{1/8} a,
    equal to a when A P_⊥ has rank one; the report with a_method='upper' only loosens [104]/[105]."""
    rng = np.random.default_rng(21)
    for N in (8, 33, 64):
        for kind in ("random", "peaked", "sink", "uniformish", "identity"):
            L = rng.standard_normal((3, N, N)) * 3
            if kind == "peaked":
                L[:, np.arange(N), rng.integers(0, N, N)] += 8.0
            elif kind == "sink":
                L[:, :, 0] += 40.0  # every row reads key 0: A P_⊥ has rank one
            elif kind == "uniformish":
                L *= 1e-3
            elif kind == "identity":
                L = np.broadcast_to(np.eye(N) * 50.0, L.shape).copy()  # flat spectrum: the loosest case
            A = np_softmax(L)
            P = np_perp(N)
            a_svd = np.array([np.linalg.svd(A[h] @ P, compute_uv=False)[0] for h in range(3)])
            a_up = mean_free_operator_norm_upper(t(A)).numpy()
            assert (a_up >= a_svd * (1 - 1e-15)).all(), (N, kind, a_up, a_svd)
            assert (a_up <= a_svd * N ** 0.125 * (1 + 1e-10)).all(), (N, kind)
            # the products run in float32 with their rounding added: ā exceeds the exact Schatten-8
            # norm by ~γ_N(fp32) ‖A P_⊥‖_F²/a² (relative), ~N·6e-8 for rank one, ~N²·6e-8 when flat
            if kind == "sink":
                np.testing.assert_allclose(a_up, a_svd, rtol=1e-7 * N)
            if kind == "identity":  # σ_i all equal (= 1): ā = (N−1)^{1/8} a
                np.testing.assert_allclose(a_up, a_svd * (N - 1) ** 0.125, rtol=1e-7 * N * N)
            if kind in ("sink", "identity"):  # float32 products not IEEE (TF32/bf16 allowed): float64 ones
                prec = torch.get_float32_matmul_precision()
                try:
                    torch.set_float32_matmul_precision("medium")
                    a_64 = mean_free_operator_norm_upper(t(A)).numpy()
                finally:
                    torch.set_float32_matmul_precision(prec)
                exact = a_svd if kind == "sink" else a_svd * (N - 1) ** 0.125
                np.testing.assert_allclose(a_64, exact, rtol=1e-12)
                assert (a_64 >= a_svd * (1 - 1e-15)).all() and (a_64 <= a_up).all()
    # in the report: only a and what is built on it change, each in the safe direction
    for (name, A, dLi, dLe, V, dV), g in itertools.product(BOUND_CASES[::3], (0.0, 0.3)):
        # fp32 inputs: the report works in its float64 casts' buffers (g = 0: one δA buffer spare)
        ex = routing_dominance_report(*(t(x).float() for x in (A, dLi, dLe, V, dV)), g)
        up = routing_dominance_report(*(t(x).float() for x in (A, dLi, dLe, V, dV)), g, a_method="upper")
        np.testing.assert_allclose(float(up["a"]), float(mean_free_operator_norm_upper(
            (lambda A_: A_ / A_.sum(-1, keepdim=True))(t(A).float().double()))), rtol=1e-14)
        assert bool(ex["a_exact"]) and not bool(up["a_exact"])
        assert float(up["a"]) >= float(ex["a"]) * (1 - 1e-15), name
        assert float(up["routing_lower_bound"]) <= float(ex["routing_lower_bound"]) + 1e-15, name
        assert float(up["bound"]) >= float(ex["bound"]) * (1 - 1e-12), name  # looser (or vacuous)
        for key in CHECK_KEYS:
            assert bool(up[key]), (name, key)
        for key in ("measured_ratio", "Delta_max", "frobenius_bound", "modulation_norm"):
            assert torch.equal(up[key], ex[key]), (name, key)
    with pytest.raises(ValueError, match="a_method"):
        routing_dominance_report(*(t(x) for x in BOUND_CASES[0][1:]), 0.3, a_method="svd")


CHECK_KEYS = ("bound_holds", "bound_intra_holds", "row_bound_holds", "frobenius_bound_holds",
              "routing_lower_bound_holds")
