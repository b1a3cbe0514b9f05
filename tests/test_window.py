"""Chebyshev attention windows (THEORY §7): the mask, the windowed processor, the global limit."""

import itertools

import pytest
import torch

from dithooks.attention.install import installed_processors
from dithooks.attention.processor import HookedAttnProcessor
from dithooks.attention.window import (additive_window_mask, chebyshev_distance, grid_side,
                                       window_is_global, window_mask)

from .conftest import (TINY_HEAD_DIM, TINY_HEADS, Recorder, call_attn, make_dit_inputs, make_tiny_attn_dit,
                       run_dit)

HEADS, HEAD_DIM = TINY_HEADS, TINY_HEAD_DIM

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.parametrize("side,radius", [(5, 0), (5, 1), (5, 2), (4, 1), (6, 3)])
def test_mask_matches_brute_force(side, radius):
    n = side * side
    mask = window_mask(n, radius)
    for i, j in itertools.product(range(n), range(n)):
        ri, ci, rj, cj = i // side, i % side, j // side, j % side
        assert bool(mask[i, j]) == (max(abs(ri - rj), abs(ci - cj)) <= radius)
    assert mask.diagonal().all()
    assert torch.equal(mask, mask.T)
    add = additive_window_mask(n, radius)
    assert torch.equal(add == 0, mask) and torch.isinf(add[~mask]).all()


def test_global_radius_builds_no_mask():
    assert window_is_global(16, None)
    assert window_is_global(16, 3) and window_is_global(16, 10)
    assert not window_is_global(16, 2)
    assert window_mask(16, 3) is None and additive_window_mask(16, 7) is None
    assert chebyshev_distance(16).max() == 3
    with pytest.raises(ValueError, match="square"):
        grid_side(15)
    with pytest.raises(ValueError):
        window_mask(16, -1)


@pytest.mark.parametrize("radius", [3, 4, 100])
def test_radius_covering_the_grid_is_the_global_model_exactly(radius):
    model = make_tiny_attn_dit()
    x, t, y = make_dit_inputs(2)
    reference = run_dit(model, x, t, y)
    with installed_processors(model, range(2), lambda l: HookedAttnProcessor(l, window=radius)):
        out = run_dit(model, x, t, y)
    assert torch.equal(out, reference)


@pytest.mark.parametrize("radius", [0, 1, 2])
def test_windowed_softmax_stays_in_the_window(radius):
    model = make_tiny_attn_dit()
    attn = model.transformer_blocks[0].attn1
    x = torch.randn(2, 16, HEADS * HEAD_DIM, generator=torch.Generator().manual_seed(2))
    rec = Recorder()
    explicit = call_attn(attn, HookedAttnProcessor(0, rec, frozenset({"attn.q", "attn.k", "attn.v",
                                                                       "attn.pattern", "attn.n_eff"}),
                                                   window=radius, query_tile=3), x)
    fused = call_attn(attn, HookedAttnProcessor(0, window=radius), x)
    torch.testing.assert_close(explicit, fused, atol=1e-6, rtol=0)
    mask = window_mask(16, radius)
    A = rec.seen["attn.pattern"]
    assert (A[..., ~mask] == 0).all()
    torch.testing.assert_close(A.sum(-1), torch.ones(2, HEADS, 16), atol=1e-6, rtol=0)
    # brute force: softmax over the window's keys only, same weights
    q, k, v = rec.seen["attn.q"], rec.seen["attn.k"], rec.seen["attn.v"]
    logits = (q @ k.transpose(-1, -2) / HEAD_DIM ** 0.5).masked_fill(~mask, float("-inf"))
    torch.testing.assert_close(A, logits.softmax(-1), atol=1e-6, rtol=0)
    expected = attn.to_out[0]((logits.softmax(-1) @ v).transpose(1, 2).reshape(2, 16, -1))
    torch.testing.assert_close(fused, expected, atol=1e-6, rtol=0)
    if radius == 0:  # each token sees only itself: output is W_O V_i
        torch.testing.assert_close(fused, attn.to_out[0](v.transpose(1, 2).reshape(2, 16, -1)),
                                   atol=1e-6, rtol=0)
        torch.testing.assert_close(rec.seen["attn.n_eff"], torch.ones(2, HEADS, 16), atol=1e-6, rtol=0)


def test_window_applies_to_inter_replica_blocks_too():
    attn = make_tiny_attn_dit().transformer_blocks[1].attn1
    x = torch.randn(4, 16, HEADS * HEAD_DIM, generator=torch.Generator().manual_seed(3))
    rec = Recorder()
    out = call_attn(attn, HookedAttnProcessor(1, rec, frozenset({"attn.pattern_inter"}), coupling=0.5,
                                              window=1), x)
    fused = call_attn(attn, HookedAttnProcessor(1, coupling=0.5, window=1), x)
    torch.testing.assert_close(out, fused, atol=1e-6, rtol=0)
    assert (rec.seen["attn.pattern_inter"][..., ~window_mask(16, 1)] == 0).all()


def test_local_model_differs_from_global_below_the_grid():
    model = make_tiny_attn_dit(sample_size=12)  # 6x6 grid
    x, t, y = make_dit_inputs(2, sample_size=12)
    reference = run_dit(model, x, t, y)
    diffs = []
    for r in (1, 3, 5):
        with installed_processors(model, range(2), lambda l: HookedAttnProcessor(l, window=r)):
            diffs.append((run_dit(model, x, t, y) - reference).abs().max().item())
    assert diffs[0] > 1e-4 and diffs[1] > 0 and diffs[2] == 0
