"""Chebyshev attention windows (THEORY §7): the mask, the windowed processor, the global limit."""

import itertools

import pytest
import torch
from diffusers import DiTTransformer2DModel

from dithooks.attention.install import installed_processors
from dithooks.attention.processor import HookedAttnProcessor
from dithooks.attention.window import (additive_window_mask, chebyshev_distance, grid_side,
                                       window_is_global, window_mask)

HEADS, HEAD_DIM = 4, 8


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # tiny models gain nothing from threads; on a busy 2-core machine they only oversubscribe
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_dit(sample_size: int = 8, seed: int = 0) -> DiTTransformer2DModel:
    torch.manual_seed(seed)
    return DiTTransformer2DModel(num_attention_heads=HEADS, attention_head_dim=HEAD_DIM,
                                 in_channels=4, out_channels=4, num_layers=2,
                                 sample_size=sample_size, patch_size=2,
                                 num_embeds_ada_norm=10).eval()


def inputs(batch=2, sample_size=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, 4, sample_size, sample_size, generator=g),
            torch.randint(0, 1000, (batch,), generator=g), torch.randint(0, 10, (batch,), generator=g))


def run(model, x, t, y):
    with torch.no_grad():
        return model(x, timestep=t, class_labels=y).sample


class Recorder:
    def __init__(self):
        self.seen = {}

    def __call__(self, name, value):
        self.seen[name] = value.detach().clone()
        return value


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
    model = tiny_dit()
    x, t, y = inputs()
    reference = run(model, x, t, y)
    with installed_processors(model, range(2), lambda l: HookedAttnProcessor(l, window=radius)):
        out = run(model, x, t, y)
    assert torch.equal(out, reference)


@pytest.mark.parametrize("radius", [0, 1, 2])
def test_windowed_softmax_stays_in_the_window(radius):
    model = tiny_dit()
    attn = model.transformer_blocks[0].attn1
    x = torch.randn(2, 16, HEADS * HEAD_DIM, generator=torch.Generator().manual_seed(2))
    rec = Recorder()
    explicit = _call(attn, HookedAttnProcessor(0, rec, frozenset({"attn.q", "attn.k", "attn.v",
                                                                   "attn.pattern", "attn.n_eff"}),
                                               window=radius, query_tile=3), x)
    fused = _call(attn, HookedAttnProcessor(0, window=radius), x)
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
    attn = tiny_dit().transformer_blocks[1].attn1
    x = torch.randn(4, 16, HEADS * HEAD_DIM, generator=torch.Generator().manual_seed(3))
    rec = Recorder()
    out = _call(attn, HookedAttnProcessor(1, rec, frozenset({"attn.pattern_inter"}), coupling=0.5,
                                          window=1), x)
    fused = _call(attn, HookedAttnProcessor(1, coupling=0.5, window=1), x)
    torch.testing.assert_close(out, fused, atol=1e-6, rtol=0)
    assert (rec.seen["attn.pattern_inter"][..., ~window_mask(16, 1)] == 0).all()


def test_local_model_differs_from_global_below_the_grid():
    model = tiny_dit(sample_size=12)  # 6x6 grid
    x, t, y = inputs(sample_size=12)
    reference = run(model, x, t, y)
    diffs = []
    for r in (1, 3, 5):
        with installed_processors(model, range(2), lambda l: HookedAttnProcessor(l, window=r)):
            diffs.append((run(model, x, t, y) - reference).abs().max().item())
    assert diffs[0] > 1e-4 and diffs[1] > 0 and diffs[2] == 0


def _call(attn, processor, x):
    saved = attn.processor
    attn.set_processor(processor)
    try:
        with torch.no_grad():
            return attn(x)
    finally:
        attn.set_processor(saved)
