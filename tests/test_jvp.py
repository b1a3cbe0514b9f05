"""Per-block JVPs and the routing / modulation split (THEORY §3, paper [20-33], Appendix A)."""

import pytest
import torch

from dithooks.attention.processor import HookedAttnProcessor
from dithooks.jvp import (ALL_PARTS, HEAD_TERMS, AdaLNConditioning, BlockPrimal, adaln1, adaln_conditioning,
                          block_attention_terms, block_jvp, linearise_attention)
from dithooks.gates import rho, xi

from .conftest import TINY_HEAD_DIM, TINY_HEADS, make_tiny_attn_dit

HEADS, HEAD_DIM, N = TINY_HEADS, TINY_HEAD_DIM, 16
D = HEADS * HEAD_DIM

pytestmark = [
    pytest.mark.usefixtures("one_torch_thread"),
    # torch registers its forward-AD decompositions with torch.jit.script on first use
    pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning"),
]


def state(batch=2, dtype=torch.float32, seed=1):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(batch, N, D, generator=g, dtype=torch.float64).to(dtype)
    delta = torch.randn(batch, N, D, generator=g, dtype=torch.float64).to(dtype)
    t = torch.tensor([30.0, 700.0][:batch])
    y = torch.tensor([3, 7][:batch])
    return h, delta, t, y


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def block_out(block, h, t, y):
    with torch.no_grad():
        return block(h, timestep=t, class_labels=y)


@pytest.mark.parametrize("g", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("apply_gates", [True, False])
def test_fused_equals_autograd_reference(g, apply_gates):
    block = make_tiny_attn_dit().transformer_blocks[1]
    h, delta, t, y = state()
    kw = dict(timestep=t, class_labels=y, parts=ALL_PARTS, g=g, apply_gates=apply_gates)
    fused = block_jvp(block, h, delta, **kw)
    ref = block_jvp(block, h, delta, method="autograd", **kw)
    for part in ALL_PARTS:
        if part == "routing" and g == 1.0 and apply_gates:
            assert fused[part].abs().max() == 0  # rho(1) = 0: routing switched off
            continue
        assert rel(fused[part], ref[part]) < 2e-6, part


@pytest.mark.parametrize("g", [0.0, 0.5, 1.0])
def test_routing_plus_modulation_is_the_attention_jvp(g):
    block = make_tiny_attn_dit().transformer_blocks[0]
    h, delta, t, y = state()
    fused = block_jvp(block, h, delta, timestep=t, class_labels=y, g=g,
                      parts=("routing", "modulation", "modulation_intra", "modulation_inter"))
    # "attn" of the reference is torch.func.jvp through diffusers' attn1 (coupled processor)
    attn_ref = block_jvp(block, h, delta, timestep=t, class_labels=y, g=g, parts=("attn",),
                         method="autograd")["attn"]
    assert rel(fused["routing"] + fused["modulation"], attn_ref) < 2e-6
    ungated = block_jvp(block, h, delta, timestep=t, class_labels=y, g=g, apply_gates=False,
                        parts=("routing", "modulation"))
    torch.testing.assert_close(fused["routing"], rho(g) * ungated["routing"], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(fused["modulation"], xi(g) * ungated["modulation"], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(ungated["modulation"],
                               fused["modulation_intra"] + g * fused["modulation_inter"],
                               atol=1e-6, rtol=1e-5)


def test_full_is_identity_plus_branches_plus_cross_term():
    block = make_tiny_attn_dit().transformer_blocks[1]
    h, delta, t, y = state()
    parts = block_jvp(block, h, delta, timestep=t, class_labels=y, parts=ALL_PARTS, g=0.4)
    torch.testing.assert_close(parts["full"], delta + parts["attn"] + parts["mlp"] + parts["cross"],
                               atol=1e-6, rtol=1e-6)
    alone = block_jvp(block, h, delta, timestep=t, class_labels=y, parts=("full",), g=0.4)["full"]
    torch.testing.assert_close(alone, parts["full"], atol=1e-5, rtol=1e-5)


def test_jvp_matches_central_differences_to_second_order():
    """(f(h+e d) - f(h-e d))/2e - J d = O(e^2): halving e divides the error by ~4 (float64)."""
    block = make_tiny_attn_dit(dtype=torch.float64).transformer_blocks[1]
    h, delta, t, y = state(dtype=torch.float64)
    jvp = block_jvp(block, h, delta, timestep=t, class_labels=y, parts=("full",))["full"]
    errors = []
    for eps in (2e-2, 1e-2):
        fd = (block_out(block, h + eps * delta, t, y) - block_out(block, h - eps * delta, t, y)) / (2 * eps)
        errors.append(rel(fd, jvp))
    assert errors[0] < 1e-3
    assert 3.0 < errors[0] / errors[1] < 5.0
    # float32, one step size: the reference method agrees with differences too
    block32 = make_tiny_attn_dit().transformer_blocks[1]
    h32, d32 = h.float(), delta.float()
    j32 = block_jvp(block32, h32, d32, timestep=t, class_labels=y, parts=("full",))["full"]
    fd32 = (block_out(block32, h32 + 1e-2 * d32, t, y) - block_out(block32, h32 - 1e-2 * d32, t, y)) / 2e-2
    assert rel(fd32, j32) < 1e-3


def _coupled_pair_outputs(block, h, delta, eps, g, t, y):
    """Run the pair h +- eps delta through the coupled processor for real."""
    captured = {}
    handle = block.attn1.register_forward_hook(lambda m, a, out: captured.update(attn=out))
    saved = block.attn1.processor
    block.attn1.set_processor(HookedAttnProcessor(1, coupling=g))
    try:
        out = block_out(block, torch.cat([h + eps * delta, h - eps * delta]),
                        torch.cat([t, t]), torch.cat([y, y]))
    finally:
        block.attn1.set_processor(saved)
        handle.remove()
    b = h.shape[0]
    gate = adaln_conditioning(block, t, y, h.dtype).gate_msa[:, None]
    attn_half_diff = gate * (captured["attn"][:b] - captured["attn"][b:]) / 2
    return attn_half_diff, (out[:b] - out[b:]) / 2


@pytest.mark.parametrize("g", [0.0, 0.3, 1.0])
def test_real_coupled_pair_matches_the_linearised_difference(g):
    """(O^a - O^b)/2 = eps (rho routing + xi modulation) + O(eps^3) at h^{a,b} = h +- eps delta [25]."""
    block = make_tiny_attn_dit(dtype=torch.float64).transformer_blocks[1]
    h, delta, t, y = state(dtype=torch.float64)
    ungated = block_jvp(block, h, delta, timestep=t, class_labels=y, g=g, apply_gates=False,
                        parts=("routing", "modulation", "full"))
    predicted_attn = rho(g) * ungated["routing"] + xi(g) * ungated["modulation"]
    attn_err, block_err = [], []
    for eps in (2e-2, 1e-2):
        attn_diff, block_diff = _coupled_pair_outputs(block, h, delta, eps, g, t, y)
        attn_err.append(rel(attn_diff / eps, predicted_attn))
        block_err.append(rel(block_diff / eps, ungated["full"]))
    for errs in (attn_err, block_err):
        assert errs[0] < 2e-3
        assert 3.0 < errs[0] / errs[1] < 5.0


def test_mlp_part_is_tokenwise():
    block = make_tiny_attn_dit().transformer_blocks[0]
    h, _, t, y = state()
    delta = torch.zeros_like(h)
    delta[:, 5] = torch.randn(2, D, generator=torch.Generator().manual_seed(9))
    parts = block_jvp(block, h, delta, timestep=t, class_labels=y, parts=("mlp", "routing"))
    others = [i for i in range(N) if i != 5]
    assert (parts["mlp"][:, others] == 0).all()
    assert parts["mlp"][:, 5].abs().max() > 0
    assert parts["routing"][:, others].abs().max() > 0  # attention moves it to other tokens


def test_linearise_attention_identities():
    """A 1 = 1 and dA 1 = 0 (Appendix B [89]); M(g=1) is driven by dQ K^T only; gated sum = attn."""
    block = make_tiny_attn_dit().transformer_blocks[1]
    h, delta, t, y = state()
    cond = adaln_conditioning(block, t, y)
    x, dx = torch.func.jvp(lambda hh: adaln1(block, hh, cond), (h,), (delta,))
    g = 0.6
    terms = linearise_attention(block.attn1, x, dx, g)
    assert terms.A.shape == (2, HEADS, N, N) and terms.R.shape == (2, HEADS, N, HEAD_DIM)
    torch.testing.assert_close(terms.A.sum(-1), torch.ones(2, HEADS, N), atol=1e-6, rtol=0)
    for dA in (terms.dA_intra, terms.dA_inter):
        assert dA.sum(-1).abs().max() < 1e-6
    torch.testing.assert_close(terms.R, terms.A @ terms.dV)
    torch.testing.assert_close(terms.M, terms.M_intra + g * terms.M_inter)
    # g = 1: dL_intra + dL_inter = 2 dQ K^T / sqrt(d_h) (THEORY §3: modulation "never zero")
    dqk = terms.dQ @ terms.K.transpose(-1, -2) / HEAD_DIM ** 0.5
    torch.testing.assert_close(terms.dL_intra + terms.dL_inter, 2 * dqk, atol=1e-6, rtol=1e-6)
    # mapped to the residual stream, the gated difference is the block's attn part
    attn_part = block_jvp(block, h, delta, timestep=t, class_labels=y, g=g, parts=("attn",))["attn"]
    z = terms.difference().transpose(1, 2).reshape(2, N, D)
    mapped = cond.gate_msa[:, None] * (z @ block.attn1.to_out[0].weight.T)
    torch.testing.assert_close(mapped, attn_part, atol=1e-6, rtol=1e-5)


def test_windowed_jvp_matches_reference():
    block = make_tiny_attn_dit().transformer_blocks[0]
    h, delta, t, y = state()
    kw = dict(timestep=t, class_labels=y, parts=("full", "routing", "modulation"), g=0.5, window=1)
    fused = block_jvp(block, h, delta, **kw)
    ref = block_jvp(block, h, delta, method="autograd", **kw)
    for part in kw["parts"]:
        assert rel(fused[part], ref[part]) < 2e-6, part
    glob = block_jvp(block, h, delta, **{**kw, "window": None})
    assert rel(fused["full"], glob["full"]) > 1e-4


def test_fused_jvp_does_not_fire_module_hooks():
    """Hook points read module calls; linearising must not record or intervene a second time."""
    block = make_tiny_attn_dit().transformer_blocks[1]
    h, delta, t, y = state()
    fired = []
    modules = [block, block.norm1, block.norm1.linear, block.attn1, block.norm3, block.ff]
    handles = [m.register_forward_pre_hook(lambda *a, i=i: fired.append(i)) for i, m in enumerate(modules)]
    handles += [m.register_forward_hook(lambda *a, i=i: fired.append(i)) for i, m in enumerate(modules)]
    try:
        block_jvp(block, h, delta, timestep=t, class_labels=y, parts=ALL_PARTS, g=0.5)
    finally:
        for handle in handles:
            handle.remove()
    assert fired == []


def test_bad_arguments():
    block = make_tiny_attn_dit().transformer_blocks[0]
    h, delta, t, y = state()
    with pytest.raises(ValueError, match="unknown"):
        block_jvp(block, h, delta, timestep=t, class_labels=y, parts=("ful",))
    with pytest.raises(ValueError):
        block_jvp(block, h, delta, timestep=t, class_labels=y, g=-1.0)
    with pytest.raises(ValueError, match="method"):
        block_jvp(block, h, delta, timestep=t, class_labels=y, method="magic")


def _forward_primal(block, h, t, y, optional=True):
    """What the block's own forward computes, read by module hooks (as the JVP hook points do)."""
    got = {}
    attn = block.attn1
    hooks = [block.norm1.linear.register_forward_hook(lambda m, a, o: got.setdefault("emb", o)),
             attn.to_q.register_forward_hook(lambda m, a, o: got.setdefault("q", o)),
             attn.to_k.register_forward_hook(lambda m, a, o: got.setdefault("k", o)),
             attn.to_v.register_forward_hook(lambda m, a, o: got.setdefault("v", o)),
             block.norm3.register_forward_pre_hook(lambda m, a: got.setdefault("h_mid", a[0])),
             block.ff.net[0].proj.register_forward_hook(lambda m, a, o: got.setdefault("ff", o)),
             attn.to_out[0].register_forward_pre_hook(lambda m, a: got.setdefault("o", a[0]))]
    try:
        out = block_out(block, h, t, y)
    finally:
        for hook in hooks:
            hook.remove()
    primal = BlockPrimal(AdaLNConditioning(*got["emb"].chunk(6, dim=1)), (got["q"], got["k"], got["v"]),
                         got["h_mid"], got["ff"] if optional else None, got["o"] if optional else None)
    return out, primal


@pytest.mark.parametrize("g", [0.0, 0.3])
@pytest.mark.parametrize("optional", [True, False])
def test_tangent_from_the_forward_equals_the_separate_primal(g, optional):
    block = make_tiny_attn_dit().transformer_blocks[1]
    h, delta, t, y = state()
    _, primal = _forward_primal(block, h, t, y, optional)
    kw = dict(timestep=t, class_labels=y, parts=ALL_PARTS, g=g, heads=HEAD_TERMS)
    riding = block_jvp(block, h, delta, primal=primal, **kw)
    separate = block_jvp(block, h, delta, **kw)
    for name in (*ALL_PARTS, *HEAD_TERMS):
        assert rel(riding[name], separate[name]) < 2e-6, name
    terms = block_attention_terms(block, h, delta, timestep=t, class_labels=y, g=g)
    for name, ref in (("heads.pattern", terms.A), ("heads.dv", terms.dV), ("heads.dlogits_intra", terms.dL_intra),
                      ("heads.dlogits_inter", terms.dL_inter)):
        assert rel(riding[name], ref) < 2e-6, name
    with pytest.raises(ValueError, match="fused"):
        block_jvp(block, h, delta, primal=primal, method="autograd", **{**kw, "heads": ()})
