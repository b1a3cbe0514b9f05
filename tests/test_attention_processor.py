"""HookedAttnProcessor: bit-for-bit default behaviour, emitted names, replacements, install/restore."""

import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor2_0

from dithooks.attention.install import (attention_modules, install_processors, installed_processors,
                                        restore_processors)
from dithooks.attention.processor import (ALL_NAMES, INTER_NAMES, NAME_DIMS, REDUCTION_NAMES,
                                          WRITABLE_NAMES, HookedAttnProcessor)

from .conftest import (TINY_HEAD_DIM, TINY_HEADS, Recorder, call_attn, make_dit_inputs, make_tiny_attn_dit,
                       run_dit)

HEADS, HEAD_DIM, SIDE = TINY_HEADS, TINY_HEAD_DIM, 4  # sample 8, patch 2 -> 4x4 grid, N = 16
N = SIDE * SIDE

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def attn_input(batch=2, seed=3):
    return torch.randn(batch, N, HEADS * HEAD_DIM, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("channels", [4, 1])
def test_no_hooks_is_bit_for_bit_the_default_processor(channels):
    model = make_tiny_attn_dit(channels)
    inputs = make_dit_inputs(3, channels, num_labels=11)  # 10 = the null class
    reference = run_dit(model, *inputs)
    with installed_processors(model, range(2), lambda layer: HookedAttnProcessor(layer)):
        assert isinstance(model.transformer_blocks[0].attn1.processor, HookedAttnProcessor)
        hooked = run_dit(model, *inputs)
    assert torch.equal(hooked, reference)
    # an emit with nothing wanted is never called and keeps the fast path
    rec = Recorder()
    with installed_processors(model, range(2), lambda layer: HookedAttnProcessor(layer, rec)):
        assert torch.equal(run_dit(model, *inputs), reference)
    assert rec.calls == []


def test_install_and_restore_processors():
    model = make_tiny_attn_dit()
    originals = {p: m.processor for p, m in attention_modules(model, 1).items()}
    assert list(originals) == ["transformer_blocks.1.attn1"]
    saved = install_processors(model, [1, 1], lambda layer: HookedAttnProcessor(layer))
    assert isinstance(model.transformer_blocks[1].attn1.processor, HookedAttnProcessor)
    assert isinstance(model.transformer_blocks[0].attn1.processor, AttnProcessor2_0)
    restore_processors(model, saved)
    assert model.transformer_blocks[1].attn1.processor is originals["transformer_blocks.1.attn1"]
    with pytest.raises(IndexError):
        attention_modules(model, 5)


def test_explicit_path_matches_sdpa_and_emits_every_name():
    model = make_tiny_attn_dit()
    attn = model.transformer_blocks[0].attn1
    x = attn_input()
    reference = call_attn(attn, AttnProcessor2_0(), x)
    rec = Recorder()
    names = ALL_NAMES - INTER_NAMES
    proc = HookedAttnProcessor(0, rec, names, query_tile=5, query_tokens=[7, 0, 15], top_k=3)
    out = call_attn(attn, proc, x)
    torch.testing.assert_close(out, reference, atol=1e-6, rtol=0)
    assert set(rec.seen) == names
    b = x.shape[0]
    sizes = {"batch": b, "head": HEADS, "token": N, "head_channel": HEAD_DIM, "query": N,
             "key": N, "rank": 3}
    for name, value in rec.seen.items():
        want = tuple(sizes[d] for d in NAME_DIMS[name])
        if name == "attn.pattern_query":
            want = (b, HEADS, 3, N)
        assert tuple(value.shape) == want, name

    q, k, v = rec.seen["attn.q"], rec.seen["attn.k"], rec.seen["attn.v"]
    logits = q @ k.transpose(-1, -2) / HEAD_DIM ** 0.5
    A = logits.softmax(-1)
    torch.testing.assert_close(rec.seen["attn.logits"], logits, atol=1e-6, rtol=0)
    torch.testing.assert_close(rec.seen["attn.pattern"], A, atol=1e-6, rtol=0)
    torch.testing.assert_close(A.sum(-1), torch.ones(b, HEADS, N), atol=1e-6, rtol=0)
    # the reductions of THEORY §5 (N_eff [92]) and the others, from the tiled pass
    torch.testing.assert_close(rec.seen["attn.n_eff"], 1 / (A ** 2).sum(-1), rtol=1e-5, atol=0)
    assert (rec.seen["attn.n_eff"] >= 1 - 1e-5).all() and (rec.seen["attn.n_eff"] <= N + 1e-4).all()
    torch.testing.assert_close(rec.seen["attn.entropy"], -(A * A.log()).sum(-1), atol=1e-5, rtol=0)
    torch.testing.assert_close(rec.seen["attn.pattern_headmean"], A.mean(1), atol=1e-6, rtol=0)
    torch.testing.assert_close(rec.seen["attn.pattern_query"], A[:, :, [7, 0, 15]], atol=1e-6, rtol=0)
    val, idx = A.topk(3, dim=-1)
    torch.testing.assert_close(rec.seen["attn.topk_val"], val, atol=1e-6, rtol=0)
    assert torch.equal(rec.seen["attn.topk_idx"], idx)


@pytest.mark.parametrize("tile", [1, 3, 16, 1000])
def test_reductions_do_not_depend_on_the_tile(tile):
    model = make_tiny_attn_dit()
    attn = model.transformer_blocks[1].attn1
    x = attn_input()
    ref_rec, rec = Recorder(), Recorder()
    names = REDUCTION_NAMES
    call_attn(attn, HookedAttnProcessor(1, ref_rec, names | {"attn.pattern"}, query_tokens=[2, 9],
                                        top_k=2), x)
    out = call_attn(attn, HookedAttnProcessor(1, rec, names, query_tile=tile, query_tokens=[2, 9],
                                              top_k=2), x)
    torch.testing.assert_close(out, call_attn(attn, AttnProcessor2_0(), x), atol=1e-6, rtol=0)
    for name in names:
        torch.testing.assert_close(rec.seen[name], ref_rec.seen[name], atol=1e-6, rtol=1e-6)


def test_replacing_values_and_patterns_takes_effect():
    model = make_tiny_attn_dit()
    attn = model.transformer_blocks[0].attn1
    x = attn_input()
    bias = attn.to_out[0].bias
    # V = 0: attention output is W_O's bias alone
    out = call_attn(attn, HookedAttnProcessor(0, Recorder({"attn.v": torch.zeros_like}),
                                              frozenset({"attn.v"})), x)
    torch.testing.assert_close(out, bias.expand_as(out), atol=1e-6, rtol=0)
    # uniform pattern: every token receives the mean value
    rec = Recorder({"attn.pattern": lambda p: torch.full_like(p, 1.0 / N)})
    out = call_attn(attn, HookedAttnProcessor(0, rec, frozenset({"attn.pattern", "attn.v"})), x)
    v_mean = rec.seen["attn.v"].mean(2, keepdim=True).expand(-1, -1, N, -1)
    expected = attn.to_out[0](v_mean.transpose(1, 2).reshape(x.shape[0], N, -1))
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=0)
    # logits replaced by 0 gives the same uniform pattern
    out2 = call_attn(attn, HookedAttnProcessor(0, Recorder({"attn.logits": torch.zeros_like}),
                                               frozenset({"attn.logits"})), x)
    torch.testing.assert_close(out2, expected, atol=1e-6, rtol=0)
    # reductions are read-only: whatever emit returns is ignored
    out3 = call_attn(attn, HookedAttnProcessor(0, Recorder({"attn.n_eff": torch.zeros_like}),
                                               frozenset({"attn.n_eff"})), x)
    torch.testing.assert_close(out3, call_attn(attn, AttnProcessor2_0(), x), atol=1e-6, rtol=0)
    assert not REDUCTION_NAMES & WRITABLE_NAMES
    bad = HookedAttnProcessor(0, Recorder({"attn.q": lambda q: q[:, :1]}), frozenset({"attn.q"}))
    with pytest.raises(ValueError, match="shape"):
        call_attn(attn, bad, x)


def test_invalid_settings_are_refused():
    with pytest.raises(ValueError, match="unknown"):
        HookedAttnProcessor(0, wanted=frozenset({"attn.patern"}))
    with pytest.raises(ValueError, match="query_tokens"):
        HookedAttnProcessor(0, wanted=frozenset({"attn.pattern_query"}))
    with pytest.raises(ValueError, match="top_k"):
        HookedAttnProcessor(0, wanted=frozenset({"attn.topk_val"}))
    with pytest.raises(ValueError, match="g"):
        HookedAttnProcessor(0, coupling=-0.1)
    p = HookedAttnProcessor(0)
    with pytest.raises(ValueError):
        p.g = float("nan")
    with pytest.raises(ValueError):
        p.window = -1
