"""dithooks.attention.functional (the attention math every processor, the JVP and the probes share)
against plain numpy written independently, float64 and small."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from dithooks.attention import functional as AF

F64 = torch.float64


def np_softmax(L):
    L = L - L.max(axis=-1, keepdims=True)
    e = np.exp(L)
    return e / e.sum(axis=-1, keepdims=True)


def qkv(b=2, h=3, n=9, d=4, seed=0):
    rng = np.random.default_rng(seed)
    return tuple(rng.standard_normal((b, h, n, d)) for _ in range(3))


def t(x):
    return torch.as_tensor(np.asarray(x), dtype=F64)


def test_logits_and_pattern_match_numpy_with_each_mask_form():
    q, k, _ = qkv()
    L = q @ k.swapaxes(-1, -2) / math.sqrt(q.shape[-1])
    np.testing.assert_allclose(AF.scaled_logits(t(q), t(k)).numpy(), L, rtol=1e-13, atol=1e-13)
    allowed = np.random.default_rng(1).random((9, 9)) < 0.6
    np.fill_diagonal(allowed, True)
    L_masked = np.where(allowed, L, -np.inf)
    got_bool = AF.scaled_logits(t(q), t(k), torch.as_tensor(allowed)).numpy()
    np.testing.assert_allclose(got_bool, L_masked, rtol=1e-13, atol=1e-13)
    additive = np.where(allowed, 0.0, -np.inf)
    np.testing.assert_array_equal(AF.scaled_logits(t(q), t(k), t(additive)).numpy(), got_bool)
    A = AF.attention_pattern(t(q), t(k), torch.as_tensor(allowed)).numpy()
    np.testing.assert_allclose(A, np_softmax(L_masked), rtol=1e-12, atol=1e-15)
    assert (A[..., ~allowed] == 0).all()
    # a mask with a query axis is cut to a tile's rows
    tile = AF.scaled_logits(t(q)[..., 2:5, :], t(k), torch.as_tensor(allowed), rows=(2, 5)).numpy()
    np.testing.assert_array_equal(tile, got_bool[..., 2:5, :])


def test_half_precision_logits_are_normalised_in_float32():
    L = torch.randn(2, 7, 11, generator=torch.Generator().manual_seed(0)) * 4
    got = AF.softmax_rows(L.half())
    assert got.dtype == torch.float16
    assert torch.equal(got, torch.softmax(L.half().float(), dim=-1).half())
    assert AF.softmax_rows(L, torch.float64).dtype == F64


@pytest.mark.parametrize("tile", [1, 4, 9, 100])
def test_tiled_attention_is_numpy_attention_and_the_same_for_every_tiling(tile):
    q, k, v = qkv()
    allowed = torch.as_tensor(np.random.default_rng(2).random((9, 9)) < 0.5) | torch.eye(9, dtype=torch.bool)
    ref = np_softmax(np.where(allowed.numpy(), q @ k.swapaxes(-1, -2) / 2.0, -np.inf)) @ v
    seen = {}
    out = AF.attend(t(q), t(k), t(v), allowed, tile=tile, on_tile=lambda i0, p: seen.__setitem__(i0, p))
    np.testing.assert_allclose(out.numpy(), ref, rtol=1e-12, atol=1e-14)
    assert torch.equal(out, AF.attend(t(q), t(k), t(v), allowed))  # bit for bit across tilings
    assert sorted(seen) == list(range(0, 9, tile))
    pattern = AF.attention_pattern(t(q), t(k), allowed)
    assert torch.equal(torch.cat([seen[i] for i in sorted(seen)], dim=-2), pattern)
    with pytest.raises(ValueError):
        list(AF.query_tiles(9, 0))


def test_attend_equals_sdpa_to_float_error():
    q, k, v = (torch.randn(2, 3, 16, 8, generator=torch.Generator().manual_seed(s)) for s in range(3))
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    torch.testing.assert_close(AF.attend(q, k, v, tile=5), ref, rtol=1e-5, atol=1e-6)


def test_combine_masks():
    allowed = torch.tensor([[True, False], [True, True]])
    bias = torch.tensor([[0.5, 1.0], [2.0, 3.0]])
    got = AF.combine_masks(bias, allowed)
    assert torch.equal(got, torch.tensor([[0.5, -math.inf], [2.0, 3.0]]))
    assert AF.combine_masks(None, allowed) is allowed and AF.combine_masks(bias, None) is bias


def test_logit_perturbations_and_softmax_jacobian_against_finite_differences():
    q, k, v = qkv(seed=3)
    dq, dk, _ = qkv(seed=4)
    s = 1 / math.sqrt(q.shape[-1])
    intra, inter = AF.logit_perturbations(t(q), t(k), t(dq), t(dk))
    np.testing.assert_allclose(intra.numpy(), (dq @ k.swapaxes(-1, -2) + q @ dk.swapaxes(-1, -2)) * s, atol=1e-13)
    np.testing.assert_allclose(inter.numpy(), (dq @ k.swapaxes(-1, -2) - q @ dk.swapaxes(-1, -2)) * s, atol=1e-13)
    L = q @ k.swapaxes(-1, -2) * s
    dL = intra.numpy()
    eps = 1e-6
    fd = (np_softmax(L + eps * dL) - np_softmax(L - eps * dL)) / (2 * eps)
    A = t(np_softmax(L))
    dA = AF.softmax_jvp(A, t(dL))
    np.testing.assert_allclose(dA.numpy(), fd, atol=1e-9)
    np.testing.assert_allclose(dA.sum(-1).numpy(), 0.0, atol=1e-14)  # rows sum to 0
    np.testing.assert_allclose(AF.softmax_jvp_matmul(A, t(dL), t(v)).numpy(), fd @ v, atol=1e-8)
    O = A @ t(v)
    np.testing.assert_allclose(AF.softmax_jvp_matmul(A, t(dL), t(v), O).numpy(), (dA @ t(v)).numpy(), atol=1e-13)


def test_softmax_jacobian_outside_the_support():
    """Masked keys (A = 0) carry no first-order change, and a non-finite dL there stays out."""
    L = np.random.default_rng(5).standard_normal((4, 6))
    allowed = np.ones((4, 6), bool)
    allowed[:, 4:] = False
    A = np_softmax(np.where(allowed, L, -np.inf))
    dL = np.random.default_rng(6).standard_normal((4, 6))
    ref_c = dL[:, :4] - (A[:, :4] * dL[:, :4]).sum(-1, keepdims=True)
    assert not AF.full_support(t(A)) and AF.full_support(t(np_softmax(L)))
    # told the support is full, the same bracket on an unmasked pattern
    A_full = t(np_softmax(L))
    assert torch.equal(AF.centred_logit_perturbation(A_full, t(dL), full=True),
                       AF.centred_logit_perturbation(A_full, t(dL)))
    dL_bad = dL.copy()
    dL_bad[:, 5] = np.nan
    c = AF.centred_logit_perturbation(t(A), t(dL_bad)).numpy()
    np.testing.assert_allclose(c[:, :4], ref_c, atol=1e-14)
    assert (c[:, 4:] == 0).all()
    dA = AF.softmax_jvp(t(A), t(dL_bad)).numpy()
    np.testing.assert_allclose(dA[:, :4], A[:, :4] * ref_c, atol=1e-14)
    assert (dA[:, 4:] == 0).all()


def test_replica_halves_and_coupling():
    x = torch.arange(6.0).reshape(6, 1)
    assert AF.swap_replica_halves(x).flatten().tolist() == [3, 4, 5, 0, 1, 2]
    intra, inter = torch.randn(4, 3), torch.randn(4, 3)
    assert AF.couple(intra, inter, 0.0) is intra  # exactly the uncoupled model, not weighted by 1
    assert AF.couple(intra, None, 0.0) is intra
    torch.testing.assert_close(AF.couple(intra, inter, 0.25), intra / 1.25 + 0.25 * inter / 1.25)
    with pytest.raises(ValueError):
        AF.couple(intra, inter, -0.1)


def test_row_reductions_match_numpy():
    A = np_softmax(np.random.default_rng(7).standard_normal((2, 5, 8)) * 3)
    A[0, 0] = 0.0
    A[0, 0, 3] = 1.0  # a one-hot row: width 1, entropy 0
    np.testing.assert_allclose(AF.effective_width(t(A)).numpy(), 1 / (A ** 2).sum(-1), rtol=1e-13)
    with np.errstate(divide="ignore", invalid="ignore"):
        ent = -np.where(A > 0, A * np.log(A), 0.0).sum(-1)
    np.testing.assert_allclose(AF.row_entropy(t(A)).numpy(), ent, rtol=1e-13, atol=1e-15)
    assert AF.effective_width(t(A))[0, 0] == 1 and AF.row_entropy(t(A))[0, 0] == 0
    val, idx = AF.top_k_rows(t(A), 3)
    ref_idx = np.argsort(-A, axis=-1, kind="stable")[..., :3]
    np.testing.assert_array_equal(val.numpy(), np.take_along_axis(A, ref_idx, -1))
    with pytest.raises(ValueError, match="exceeds"):
        AF.top_k_rows(t(A), 9)


@pytest.mark.parametrize("text_first", [False, True])
@pytest.mark.parametrize("side,radius,n_text", [(4, 1, 3), (3, 0, 2), (4, 2, 0)])
def test_joint_window_mask_matches_brute_force(side, radius, n_text, text_first):
    n = side * side
    mask = AF.joint_window_mask(n, radius, n_text, text_first=text_first)
    total = n + n_text
    assert mask.shape == (total, total)
    offset = n_text if text_first else 0
    for i, j in itertools.product(range(total), range(total)):
        ii, jj = i - offset, j - offset
        if 0 <= ii < n and 0 <= jj < n:
            want = max(abs(ii // side - jj // side), abs(ii % side - jj % side)) <= radius
        else:
            want = True  # any pair with a text token
        assert bool(mask[i, j]) == want, (i, j)
    assert AF.joint_window_mask(n, side - 1, n_text, text_first=text_first) is None  # global: no mask
    assert AF.joint_window_mask(n, None, n_text) is None
