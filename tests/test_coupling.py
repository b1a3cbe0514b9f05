"""Replica coupling [19], gates [27] and antisymmetric initialisation [67] (THEORY §2)."""

import math

import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor2_0

from dithooks.attention.install import installed_processors
from dithooks.attention.processor import HookedAttnProcessor
from dithooks.gates import mixture_weights, rho, xi
from dithooks.replicas import antisymmetric_pair, replica_batch

from .conftest import TINY_HEAD_DIM, TINY_HEADS, Recorder, call_attn, make_tiny_attn_dit, run_dit

HEADS, HEAD_DIM, N = TINY_HEADS, TINY_HEAD_DIM, 16

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def pair_inputs(pairs: int = 3, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    xa, xb = antisymmetric_pair((pairs, 4, 8, 8), 0.5, g)
    t = torch.randint(0, 1000, (pairs,), generator=g)
    y = torch.randint(0, 10, (pairs,), generator=g)
    return replica_batch(xa, xb), torch.cat([t, t]), torch.cat([y, y])


def coupled(g):
    return lambda layer: HookedAttnProcessor(layer, coupling=g)


def halves(x):
    """The a-half and the b-half of a replica-major batch ``[x_a; x_b]``."""
    assert x.shape[0] % 2 == 0
    return x[: x.shape[0] // 2], x[x.shape[0] // 2:]


def swap(x):  # written out, independent of the processor's swap_replica_halves
    a, b = halves(x)
    return torch.cat([b, a])


def test_g0_is_bit_for_bit_two_plain_forwards():
    model = make_tiny_attn_dit()
    x, t, y = pair_inputs()
    plain = run_dit(model, x, t, y)  # the same replica-major batch through the default processor
    with installed_processors(model, range(2), coupled(0.0)):
        out = run_dit(model, x, t, y)
    assert torch.equal(out, plain)
    # each replica on its own: equal up to batch-size-dependent GEMM blocking on CPU
    a, b = halves(x)
    half = len(a)
    torch.testing.assert_close(out[:half], run_dit(model, a, t[:half], y[:half]), atol=2e-6, rtol=0)
    torch.testing.assert_close(out[half:], run_dit(model, b, t[half:], y[half:]), atol=2e-6, rtol=0)


def test_g_is_mutable_and_back_to_zero_is_exact():
    model = make_tiny_attn_dit()
    x, t, y = pair_inputs()
    plain = run_dit(model, x, t, y)
    with installed_processors(model, range(2), coupled(0.0)):
        procs = [blk.attn1.processor for blk in model.transformer_blocks]
        for p in procs:
            p.g = 0.7
        moved = run_dit(model, x, t, y)
        for p in procs:
            p.g = 0.0
        back = run_dit(model, x, t, y)
    assert (moved - plain).abs().max() > 1e-3
    assert torch.equal(back, plain)


@pytest.mark.parametrize("g", [0.0, 0.4, 1.0])
def test_swapping_replicas_swaps_outputs(g):
    model = make_tiny_attn_dit()
    x, t, y = pair_inputs()
    with installed_processors(model, range(2), coupled(g)):
        out = run_dit(model, x, t, y)
        out_swapped = run_dit(model, swap(x), swap(t), swap(y))
    torch.testing.assert_close(out_swapped, swap(out), atol=1e-6, rtol=0)


@pytest.mark.parametrize("g", [0.3, 1.0])
def test_coupled_attention_is_eq19(g):
    attn = make_tiny_attn_dit().transformer_blocks[0].attn1
    x = torch.randn(4, N, HEADS * HEAD_DIM, generator=torch.Generator().manual_seed(5))
    rec = Recorder()
    names = frozenset({"attn.q", "attn.k", "attn.v", "attn.logits", "attn.pattern",
                       "attn.logits_inter", "attn.pattern_inter", "attn.n_eff"})
    explicit = call_attn(attn, HookedAttnProcessor(0, rec, names, coupling=g), x)
    fused = call_attn(attn, HookedAttnProcessor(0, coupling=g), x)
    torch.testing.assert_close(explicit, fused, atol=1e-6, rtol=0)

    q, k, v = rec.seen["attn.q"], rec.seen["attn.k"], rec.seen["attn.v"]
    qa, qb = halves(q)
    ka, kb = halves(k)
    va, vb = halves(v)

    def block(qq, kk, vv):  # its own row softmax per block [18]
        return (qq @ kk.transpose(-1, -2) / HEAD_DIM ** 0.5).softmax(-1) @ vv

    w1, w2 = mixture_weights(g)
    assert w1 + w2 == pytest.approx(1.0)
    oa = w1 * block(qa, ka, va) + w2 * block(qa, kb, vb)
    ob = w1 * block(qb, kb, vb) + w2 * block(qb, ka, va)
    heads = torch.cat([oa, ob]).transpose(1, 2).reshape(4, N, -1)
    torch.testing.assert_close(fused, attn.to_out[0](heads), atol=1e-6, rtol=0)
    # the inter blocks: a-half rows are L^ab, b-half rows L^ba
    inter = rec.seen["attn.logits_inter"]
    torch.testing.assert_close(inter[:2], qa @ kb.transpose(-1, -2) / HEAD_DIM ** 0.5, atol=1e-6, rtol=0)
    torch.testing.assert_close(inter[2:], qb @ ka.transpose(-1, -2) / HEAD_DIM ** 0.5, atol=1e-6, rtol=0)
    torch.testing.assert_close(rec.seen["attn.pattern_inter"].sum(-1), torch.ones(4, HEADS, N),
                               atol=1e-6, rtol=0)


@pytest.mark.parametrize("g", [0.3, 1.0])
def test_identical_replicas_are_a_fixed_point(g):
    """Weights sum to 1: at the symmetric state coupling changes nothing."""
    model = make_tiny_attn_dit()
    x, t, y = pair_inputs()
    a, _ = halves(x)
    x_sym = replica_batch(a, a)
    plain = run_dit(model, x_sym, t, y)
    with installed_processors(model, range(2), coupled(g)):
        out = run_dit(model, x_sym, t, y)
    torch.testing.assert_close(out, plain, atol=1e-5, rtol=0)


def test_joint_2n_softmax_is_not_the_g0_model():
    """A softmax over the joint 2N sequence couples replicas through the partition function."""
    attn = make_tiny_attn_dit().transformer_blocks[0].attn1
    x = torch.randn(4, N, HEADS * HEAD_DIM, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        separate = call_attn(attn, HookedAttnProcessor(0, coupling=0.0), x)
        a, b = halves(x)
        joint = call_attn(attn, AttnProcessor2_0(), torch.cat([a, b], dim=1))  # (2, 2N, D)
    joint_as_batch = torch.cat([joint[:, :N], joint[:, N:]])
    assert (joint_as_batch - separate).abs().max() > 1e-2
    torch.testing.assert_close(separate, call_attn(attn, AttnProcessor2_0(), x), atol=0, rtol=0)


def test_odd_batch_is_refused():
    attn = make_tiny_attn_dit().transformer_blocks[0].attn1
    with pytest.raises(ValueError, match="even"):
        call_attn(attn, HookedAttnProcessor(0, coupling=0.5), torch.randn(3, N, HEADS * HEAD_DIM))


def test_gates():
    assert rho(0) == 1 and xi(0) == 1
    assert rho(1) == 0 and xi(1) == 0.5
    for g in (0.1, 0.5, 0.9):
        assert rho(g) == pytest.approx((1 - g) / (1 + g))
        assert xi(g) == pytest.approx(1 / (1 + g))
        w1, w2 = mixture_weights(g)
        assert rho(g) == pytest.approx(w1 - w2) and xi(g) == pytest.approx(w1)
    with pytest.raises(ValueError):
        rho(-0.5)


# -- antisymmetric initialisation [67] ---------------------------------------------------------
def test_kappa_zero_gives_identical_replicas():
    xa, xb = antisymmetric_pair((5, 4, 8, 8), 0.0, torch.Generator().manual_seed(0))
    assert torch.equal(xa, xb)


@pytest.mark.parametrize("kappa", [1 / math.sqrt(2), 0.3, 0.9])
def test_kappa_sets_the_correlation(kappa):
    n_pairs, shape = 64, (4, 8, 8)
    xa, xb = antisymmetric_pair((n_pairs,) + shape, kappa, torch.Generator().manual_seed(1))
    a, b = xa.flatten().double(), xb.flatten().double()
    n = a.numel()
    corr = ((a - a.mean()) * (b - b.mean())).mean() / (a.std() * b.std())
    # standard error of a sample correlation is (1 - r^2)/sqrt(n) <= 1/sqrt(n): 4 sigma
    assert abs(corr.item() - (1 - 2 * kappa ** 2)) < 4 / math.sqrt(n)
    for x in (a, b):  # variance preserving; sd of a sample variance of N(0,1) is sqrt(2/n)
        assert abs(x.var().item() - 1) < 4 * math.sqrt(2 / n)
    diff_var = (a - b).var().item()  # x^a - x^b = 2 kappa eta
    assert abs(diff_var - 4 * kappa ** 2) < 4 * 4 * kappa ** 2 * math.sqrt(2 / n)
    assert xa.shape == (n_pairs,) + shape


def test_per_pair_generators_do_not_depend_on_m():
    def gens(m):
        return [torch.Generator().manual_seed(100 + i) for i in range(m)]
    a3, b3 = antisymmetric_pair((3, 4, 8, 8), 0.4, gens(3))
    a7, b7 = antisymmetric_pair((7, 4, 8, 8), 0.4, gens(7))
    assert torch.equal(a3, a7[:3]) and torch.equal(b3, b7[:3])
    with pytest.raises(ValueError, match="generators"):
        antisymmetric_pair((3, 4), 0.4, gens(2))


@pytest.mark.parametrize("kappa", [-0.1, 1.01, float("nan")])
def test_invalid_kappa(kappa):
    with pytest.raises(ValueError, match="kappa"):
        antisymmetric_pair((2, 3), kappa)
