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
    hm.extension("jvp").configure(direction={0: v}, g=0.0)
    seen, _ = _collect(hm, ["blocks.0.jvp.mlp", "blocks.0.jvp.point"],
                       lambda: Sampler(tiny_loaded, SamplerSpec("ddim", 1), hm).run([4], [0]))
    h = seen["blocks.0.jvp.point"][0][2]
    ref = block_jvp(model.transformer_blocks[0], h, v[None], timestep=torch.tensor([seen_t(tiny_loaded)]),
                    class_labels=torch.tensor([4]), parts=("mlp",))
    torch.testing.assert_close(seen["blocks.0.jvp.mlp"][0][2], ref["mlp"])
    hm.extension("jvp").configure(direction=lambda h, ctx: 2 * torch.ones_like(h))
    seen, _ = _collect(hm, ["blocks.0.jvp.direction"], lambda: Sampler(tiny_loaded, SamplerSpec("ddim", 1), hm).run([4], [0]))
    assert torch.equal(seen["blocks.0.jvp.direction"][0][2], 2 * torch.ones(1, 16, 16))
    hm.extension("jvp").configure(direction={3: v})
    with pytest.raises(DithooksError, match="no JVP direction given for block 0"):
        _collect(hm, ["blocks.0.jvp.mlp"], lambda: Sampler(tiny_loaded, SamplerSpec("ddim", 1), hm).run([4], [0]))
    with pytest.raises(DithooksError, match="unknown JVP direction"):
        hm.extension("jvp").configure(direction="sideways")


def seen_t(loaded):
    return Sampler(loaded, SamplerSpec("ddim", 1)).timesteps[0]


def test_replica_direction_without_pairs_is_a_clear_error(tiny_loaded):
    hm = HookManager(tiny_loaded.transformer, tiny_loaded.adapter)
    hm.extension("jvp").configure(direction="replica")
    with pytest.raises(DithooksError, match="needs replica pairs"):
        _collect(hm, ["blocks.0.jvp.full"], lambda: Sampler(tiny_loaded, SamplerSpec("ddim", 1), hm).run([4], [0]))


def test_jvp_points_are_read_only_and_listed(tiny_loaded):
    hm = HookManager(tiny_loaded.transformer, tiny_loaded.adapter)
    with pytest.raises(DithooksError, match="read-only"):
        hm.add_intervention("blocks.0.jvp.full", lambda v, c: v)
    names = tiny_loaded.adapter.hook_points()
    assert {"blocks.3.jvp.routing", "blocks.3.jvp.heads.dlogits_intra", "blocks.0.jvp.direction"} <= set(names)


# -- the tangent riding along the sampling forward ------------------------------------------------
ALL_JVP_POINTS = ("full", "attn", "routing", "modulation", "modulation_intra", "modulation_inter", "mlp", "cross",
                  "heads.pattern", "heads.v", "heads.dv", "heads.dlogits_intra", "heads.dlogits_inter",
                  "point", "direction")


def _both_paths(loaded, hm, layers, run, replace=None):
    """Every JVP point of ``layers``, once riding along the forward and once with its own primal."""
    names = [f"blocks.{i}.jvp.{p}" for i in layers for p in ALL_JVP_POINTS]
    got, outs, calls = {}, {}, {}
    for ride_along in (True, False):
        hm.extension("jvp").configure(ride_along=ride_along)
        seen = {}

        def keep(v, ctx, seen=seen):
            seen.setdefault(ctx.name, []).append(v.clone())

        with hm.hooks(read={n: keep for n in names}, replace=replace):
            outs[ride_along] = run()
            calls[ride_along] = dict(hm.extension("jvp").calls)
        got[ride_along] = seen
    hm.extension("jvp").configure(ride_along=True)
    return got, outs, calls


def _assert_same_values(got, exact=False):
    assert got[True].keys() == got[False].keys()
    for name, values in got[False].items():
        assert len(got[True][name]) == len(values)
        for a, b in zip(got[True][name], values):
            if exact:
                assert torch.equal(a, b), name
            else:  # float32 rounding: SDPA's A V and h_mid against the explicit ones
                torch.testing.assert_close(a, b, rtol=2e-5, atol=2e-6, msg=name)


@pytest.mark.parametrize("direction", ["random", "stored", "callable"])
def test_ride_along_equals_separate_primal_and_is_passive(tiny_loaded, direction):
    model = tiny_loaded.transformer
    hm = HookManager(model, tiny_loaded.adapter)
    stored = torch.randn(16, 16, generator=torch.Generator().manual_seed(3))
    hm.extension("jvp").configure(direction={"random": "random", "stored": {0: stored, 2: 2 * stored},
                                "callable": lambda h, ctx: torch.flip(h, dims=[1])}[direction])
    spec = SamplerSpec("ddim", 3, guidance=1.5)
    plain = Sampler(tiny_loaded, spec).run([1, 2], [0, 1])
    got, outs, calls = _both_paths(tiny_loaded, hm, (0, 2), lambda: Sampler(tiny_loaded, spec, hm).run([1, 2], [0, 1]))
    assert calls[True] == {"ride_along": 6, "separate": 0} and calls[False] == {"ride_along": 0, "separate": 6}
    assert torch.equal(outs[True], plain) and torch.equal(outs[False], plain)  # bit for bit
    _assert_same_values(got)
    # nothing stays behind on any module once the hooks are gone
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def test_ride_along_matches_the_autograd_reference(tiny_loaded):
    """Independent of the fused code: torch.func.jvp through diffusers' own block at the read state."""
    model = tiny_loaded.transformer
    hm = HookManager(model, tiny_loaded.adapter)
    parts = ("full", "attn", "routing", "modulation", "mlp", "cross", "modulation_intra", "modulation_inter")
    seen, _ = _collect(hm, [f"blocks.1.jvp.{p}" for p in parts] + ["blocks.1.jvp.point", "blocks.1.jvp.direction"],
                       lambda: Sampler(tiny_loaded, SamplerSpec("ddim", 2), hm).run([3, 5], [0, 1]))
    assert hm.extension("jvp").calls == {"ride_along": 0, "separate": 0}  # reset when the hooks went
    t = torch.full((2,), Sampler(tiny_loaded, SamplerSpec("ddim", 2)).timesteps[1])
    ref = block_jvp(model.transformer_blocks[1], seen["blocks.1.jvp.point"][1][2],
                    seen["blocks.1.jvp.direction"][1][2], timestep=t, class_labels=torch.tensor([3, 5]),
                    parts=parts, method="autograd")
    for p in parts:
        got = seen[f"blocks.1.jvp.{p}"][1][2]
        assert ((got - ref[p]).norm() / ref[p].norm()).item() < 2e-6, p


def test_ride_along_under_a_window_and_with_uncoupled_replicas(tiny_loaded):
    hm = HookManager(tiny_loaded.transformer, tiny_loaded.adapter)
    hm.extension("attention").set_window(1, layers=[1])
    hm.extension("jvp").configure(direction="random", g=0.4)  # g of the linearisation only; the run is uncoupled
    try:
        got, _, calls = _both_paths(tiny_loaded, hm, (1,),
                                    lambda: Sampler(tiny_loaded, SamplerSpec("ddim", 2), hm).run([1], [0]))
    finally:
        hm.extension("attention").set_window(None)
    assert calls[True]["ride_along"] == 2
    _assert_same_values(got)
    # replica pairs at g = 0 run exactly uncoupled: a random direction still rides along
    rep = ReplicaSpec(kappa=0.5, g=0.0)
    got, _, calls = _both_paths(tiny_loaded, hm, (2,),
                                lambda: Sampler(tiny_loaded, SamplerSpec("ddim", 2), hm, replicas=rep).run([1], [0]))
    assert calls[True] == {"ride_along": 2, "separate": 0}
    _assert_same_values(got)


def test_what_cannot_ride_along_takes_the_separate_path(tiny_loaded):
    hm = HookManager(tiny_loaded.transformer, tiny_loaded.adapter)
    spec = SamplerSpec("ddim", 2)
    # replica direction: linearised at the symmetric state, which the forward never computes
    rep = ReplicaSpec(kappa=0.5, g=0.3)
    got, _, calls = _both_paths(tiny_loaded, hm, (1,), lambda: Sampler(tiny_loaded, spec, hm, replicas=rep).run([1], [0]))
    assert calls[True] == {"ride_along": 0, "separate": 2}
    _assert_same_values(got, exact=True)
    # a random direction in a coupled layer: the forward's h_mid is the coupled one
    hm.extension("jvp").configure(direction="random")
    got, _, calls = _both_paths(tiny_loaded, hm, (1,), lambda: Sampler(tiny_loaded, spec, hm, replicas=rep).run([1], [0]))
    assert calls[True] == {"ride_along": 0, "separate": 2}
    _assert_same_values(got, exact=True)
    # an intervention inside the block: the JVP ignores it (as before), so it cannot reuse the forward
    hm.extension("jvp").configure(direction="auto")
    got, outs, calls = _both_paths(tiny_loaded, hm, (1, 2), lambda: Sampler(tiny_loaded, spec, hm).run([1], [0]),
                                   replace={"blocks.1.attn.v": lambda v, ctx: 0.5 * v})
    assert calls[True] == {"ride_along": 2, "separate": 2}  # block 2 still rides along
    assert torch.equal(outs[True], outs[False])
    _assert_same_values(got)


@pytest.mark.parametrize("replica", [False, True])
def test_generic_jvp_full_matches_the_dit_path(tiny_loaded, monkeypatch, replica):
    """The family-generic ``jvp.full`` (torch.func.jvp of h -> resid_post through the block's own
    modules) agrees with the DiT fused path, random directions and coupled replica pairs alike,
    and stays passive."""
    import dithooks.jvp_hooks as jh

    rep = ReplicaSpec(kappa=0.5, g=0.3, layers=(1,)) if replica else None
    spec = SamplerSpec("ddim", 2, guidance=1.5)
    names = ["blocks.1.jvp.full", "blocks.1.jvp.point", "blocks.1.jvp.direction"]

    def run():
        hm = HookManager(tiny_loaded.transformer, tiny_loaded.adapter)
        return _collect(hm, names, lambda: Sampler(tiny_loaded, spec, hm, replicas=rep).run([1, 2], [0, 1]))

    dit, out_dit = run()
    monkeypatch.setattr(jh, "_is_adaln_zero_block", lambda block: False)
    gen, out_gen = run()
    assert torch.equal(out_dit, out_gen)  # passive either way
    for s in range(2):
        assert gen["blocks.1.jvp.full"][s][1] == dit["blocks.1.jvp.full"][s][1]  # same batch layout
        torch.testing.assert_close(gen["blocks.1.jvp.point"][s][2], dit["blocks.1.jvp.point"][s][2], rtol=0, atol=0)
        torch.testing.assert_close(gen["blocks.1.jvp.full"][s][2], dit["blocks.1.jvp.full"][s][2],
                                   rtol=1e-4, atol=1e-5)


def test_jvp_context_offers_linearise_and_out_proj(tiny_loaded):
    """ctx.info["linearise"] is block_jvp with the call's conditioning (K copies stacked), and
    ctx.info["out_proj"] is W_O without bias; probes need no module access."""
    model = tiny_loaded.transformer
    hm = HookManager(model, tiny_loaded.adapter)
    got = {}

    def keep(v, ctx):
        got["info"] = ctx.info

    pre = {}
    with hm.hooks(read={"blocks.1.jvp.full": keep,
                        "blocks.1.resid_pre": lambda v, c: pre.__setitem__(c.step, v.clone())}):
        Sampler(tiny_loaded, SamplerSpec("ddim", 1, guidance=2.0), hm).run([1, 2], [0, 1])
    info = got["info"]
    assert info["attention"] == {"g": 0.0, "window": None}
    h = pre[0]
    d = torch.randn((2,) + tuple(h.shape), generator=torch.Generator().manual_seed(0)).flatten(0, 1)
    out = info["linearise"](h.repeat(2, 1, 1), d, ("full", "mlp"))
    t = info["timestep"].repeat(2)
    y = info["class_labels"].repeat(2)
    ref = block_jvp(model.transformer_blocks[1], h.repeat(2, 1, 1), d, timestep=t, class_labels=y,
                    parts=("full", "mlp"))
    torch.testing.assert_close(out["full"], ref["full"], rtol=0, atol=0)
    attn = model.transformer_blocks[1].attn1
    w = attn.to_out[0].weight
    width = w.shape[1]
    z = torch.randn(4, attn.heads, 16, width // attn.heads)
    torch.testing.assert_close(info["out_proj"](z), z.transpose(1, 2).reshape(4, 16, width) @ w.T)


def test_jvp_point_sees_a_resid_pre_replacement_attached_later(tiny_loaded):
    """Attaching a resid_pre intervention after the JVP point (a new dispatcher on the block) must
    still linearise at the replaced state; attaching many points one by one rebuilds only the
    layers that changed."""
    model = tiny_loaded.transformer
    hm = HookManager(model, tiny_loaded.adapter)
    got = {}
    hm.add_hook("blocks.1.jvp.point", lambda v, c: got.__setitem__("point", v.clone()))
    hm.add_hook("blocks.2.jvp.full", lambda v, c: None)
    jvp = hm.extension("jvp")
    handles2 = list(jvp._handles[2])
    hm.add_intervention("blocks.1.resid_pre", lambda v, c: v * 2.0)
    hm.add_hook("blocks.1.resid_pre", lambda v, c: got.__setitem__("pre", v.clone()))
    assert jvp._handles[2] == handles2  # block 2 untouched by changes on block 1
    try:
        Sampler(tiny_loaded, SamplerSpec("ddim", 1), hm).run([1], [0])
    finally:
        hm.remove_all()
    assert torch.equal(got["point"], got["pre"])
    assert not jvp._handles and not any(b._forward_pre_hooks for b in model.transformer_blocks)
