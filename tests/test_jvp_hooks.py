"""``blocks.{i}.jvp.*`` hook points: what they compute, that they are passive, their layouts."""

import pytest
import torch

from dithooks.errors import DithooksError
from dithooks.hooks import HookManager
from dithooks.jvp import block_attention_terms, block_jvp
from dithooks.sampling import ReplicaSpec, Sampler, SamplerSpec


def _collect(hm, names, run):
    seen = {}

    def keep(v, ctx):
        seen.setdefault(ctx.name, []).append((ctx.step, ctx.batch_axes, v.clone()))

    with hm.hooks(read={n: keep for n in names}):
        out = run()
    return seen, out


def test_replica_jvp_points_match_block_jvp_at_the_symmetric_state(tiny_loaded):
    model = tiny_loaded.transformer
    hm = HookManager(model, tiny_loaded.adapter)
    rep = ReplicaSpec(kappa=0.6, g=0.3, layers=(1, 2))
    names = ["blocks.1.jvp.full", "blocks.1.jvp.routing", "blocks.1.jvp.modulation", "blocks.1.jvp.mlp",
             "blocks.1.resid_pre", "blocks.1.jvp.heads.dv", "blocks.1.jvp.heads.pattern", "blocks.1.adaln.gate_msa"]
    sampler = Sampler(tiny_loaded, SamplerSpec("ddim", 3, guidance=2.0), hm, replicas=rep)
    seen, _ = _collect(hm, names, lambda: sampler.run([1, 2], [0, 1]))
    assert len(seen["blocks.1.jvp.full"]) == 3
    step, axes, full = seen["blocks.1.jvp.full"][1]
    assert axes == (("cfg", 2), ("sample", 2)) and full.shape[0] == 4
    h = seen["blocks.1.resid_pre"][1][2]
    hbar, delta = (h[:4] + h[4:]) / 2, (h[:4] - h[4:]) / 2
    t = torch.full((4,), sampler.timesteps[1])
    y = torch.tensor([1, 2, 10, 10])  # (cfg, sample): cond rows then the null class
    ref = block_jvp(model.transformer_blocks[1], hbar, delta, timestep=t, class_labels=y,
                    parts=("full", "routing", "modulation", "mlp"), g=0.3)
    for part in ("full", "routing", "modulation", "mlp"):
        torch.testing.assert_close(seen[f"blocks.1.jvp.{part}"][1][2], ref[part], rtol=1e-5, atol=1e-6)
    terms = block_attention_terms(model.transformer_blocks[1], hbar, delta, timestep=t, class_labels=y, g=0.3)
    torch.testing.assert_close(seen["blocks.1.jvp.heads.dv"][1][2], terms.dV)
    torch.testing.assert_close(seen["blocks.1.jvp.heads.pattern"][1][2].sum(-1), torch.ones(4, 2, 16))


def test_replica_jvp_tracks_the_actual_coupled_difference(tiny_loaded):
    """At small separation the block's (out^a - out^b)/2 is the JVP along (h^a - h^b)/2."""
    model = tiny_loaded.transformer
    hm = HookManager(model, tiny_loaded.adapter)
    rep = ReplicaSpec(kappa=1e-3, g=0.5)
    names = ["blocks.2.jvp.full", "blocks.2.resid_pre", "blocks.2.resid_post"]
    with torch.no_grad():
        model.double()
        try:
            seen, _ = _collect(hm, names, lambda: Sampler(tiny_loaded, SamplerSpec("ddim", 2), hm, replicas=rep).run([3], [5]))
        finally:
            model.float()
    post = seen["blocks.2.resid_post"][0][2]
    actual = (post[:1] - post[1:]) / 2
    jvp = seen["blocks.2.jvp.full"][0][2]
    pre = seen["blocks.2.resid_pre"][0][2]
    eps = ((pre[:1] - pre[1:]) / 2).norm()
    err = (actual - jvp).norm() / jvp.norm()
    assert err < 50 * eps.item()  # second order in the separation
    assert err < 1e-2


def test_jvp_points_are_passive_bit_for_bit(tiny_loaded):
    hm = HookManager(tiny_loaded.transformer, tiny_loaded.adapter)
    rep = ReplicaSpec(kappa=0.5, g=0.2)
    spec = SamplerSpec("ddim", 3, guidance=1.5)
    plain = Sampler(tiny_loaded, spec, replicas=rep).run([1, 2], [0, 1])
    names = [f"blocks.{i}.jvp.{p}" for i in range(4) for p in ("full", "routing", "modulation", "heads.dlogits_inter")]
    seen, hooked = _collect(hm, names, lambda: Sampler(tiny_loaded, spec, hm, replicas=rep).run([1, 2], [0, 1]))
    assert torch.equal(plain, hooked)
    assert len(seen) == len(names)
    assert not hm.attached()
    assert not any(b._forward_pre_hooks for b in tiny_loaded.transformer.transformer_blocks)


def test_random_direction_is_reproducible_and_unit_norm(tiny_loaded):
    hm = HookManager(tiny_loaded.transformer, tiny_loaded.adapter)
    spec = SamplerSpec("ddim", 2)
    runs = []
    for _ in range(2):
        seen, _ = _collect(hm, ["blocks.0.jvp.direction", "blocks.0.jvp.attn"],
                           lambda: Sampler(tiny_loaded, spec, hm).run([1, 2], [0, 1]))
        runs.append(seen)
    d0, d1 = runs[0]["blocks.0.jvp.direction"], runs[1]["blocks.0.jvp.direction"]
    assert torch.equal(d0[0][2], d1[0][2]) and not torch.equal(d0[0][2], d0[1][2])  # per step
    torch.testing.assert_close(d0[0][2].flatten(1).norm(dim=1), torch.ones(2))
    assert d0[0][1] == (("sample", 2),)


def test_stored_and_callable_directions(tiny_loaded):
    model = tiny_loaded.transformer
    hm = HookManager(model, tiny_loaded.adapter)
    v = torch.randn(16, 16, generator=torch.Generator().manual_seed(0))
    hm.jvp.configure(direction={0: v}, g=0.0)
    seen, _ = _collect(hm, ["blocks.0.jvp.mlp", "blocks.0.jvp.point"],
                       lambda: Sampler(tiny_loaded, SamplerSpec("ddim", 1), hm).run([4], [0]))
    h = seen["blocks.0.jvp.point"][0][2]
    ref = block_jvp(model.transformer_blocks[0], h, v[None], timestep=torch.tensor([seen_t(tiny_loaded)]),
                    class_labels=torch.tensor([4]), parts=("mlp",))
    torch.testing.assert_close(seen["blocks.0.jvp.mlp"][0][2], ref["mlp"])
    hm.jvp.configure(direction=lambda h, ctx: 2 * torch.ones_like(h))
    seen, _ = _collect(hm, ["blocks.0.jvp.direction"], lambda: Sampler(tiny_loaded, SamplerSpec("ddim", 1), hm).run([4], [0]))
    assert torch.equal(seen["blocks.0.jvp.direction"][0][2], 2 * torch.ones(1, 16, 16))
    hm.jvp.configure(direction={3: v})
    with pytest.raises(DithooksError, match="no JVP direction given for block 0"):
        _collect(hm, ["blocks.0.jvp.mlp"], lambda: Sampler(tiny_loaded, SamplerSpec("ddim", 1), hm).run([4], [0]))
    with pytest.raises(DithooksError, match="unknown JVP direction"):
        hm.jvp.configure(direction="sideways")


def seen_t(loaded):
    return Sampler(loaded, SamplerSpec("ddim", 1)).timesteps[0]


def test_replica_direction_without_pairs_is_a_clear_error(tiny_loaded):
    hm = HookManager(tiny_loaded.transformer, tiny_loaded.adapter)
    hm.jvp.configure(direction="replica")
    with pytest.raises(DithooksError, match="needs replica pairs"):
        _collect(hm, ["blocks.0.jvp.full"], lambda: Sampler(tiny_loaded, SamplerSpec("ddim", 1), hm).run([4], [0]))


def test_jvp_points_are_read_only_and_listed(tiny_loaded):
    hm = HookManager(tiny_loaded.transformer, tiny_loaded.adapter)
    with pytest.raises(DithooksError, match="read-only"):
        hm.add_intervention("blocks.0.jvp.full", lambda v, c: v)
    names = tiny_loaded.adapter.hook_points()
    assert {"blocks.3.jvp.routing", "blocks.3.jvp.heads.dlogits_intra", "blocks.0.jvp.direction"} <= set(names)
