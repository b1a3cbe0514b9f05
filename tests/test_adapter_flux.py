"""Flux (FluxTransformer2DModel): hook points, the hooked joint processor, packing and sampling.

A tiny random-init model (tests/conformance/family_flux.py: 1 double + 1 single block, 2 heads x
16, 8x8 latents of 4 channels packed into a 4x4 token grid, 5 text tokens). Every computed value
is compared with an independent recomputation (numpy or direct torch on the block's modules).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from dithooks.adapters import adapter_for
from dithooks.adapters.flux import FluxAdapter, image_ids, pack_latents, text_ids, unpack_latents
from dithooks.errors import DithooksError
from dithooks.hooks import HookManager

from tests.conformance import family_flux as fam

L, N, SIDE, H, D = fam.TEXT_TOKENS, 16, 4, 2, 16


def _ids(h, w):
    """FluxPipeline's image ids written out: (0, row, col) of each 2x2 patch, row-major."""
    return torch.tensor([[0.0, r, c] for r in range(h // 2) for c in range(w // 2)])


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    torch.set_num_threads(1)
    return fam.make_tiny(tmp_path_factory.mktemp("flux"))


def _inputs(B=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, 4, 8, 8, generator=g)
    cond = fam.conditioning(B, seed)
    return x, {"prompt_embeds": cond.prompt_embeds, "pooled_prompt_embeds": cond.pooled_prompt_embeds}


QUERY_TOKENS, TOP_K = (5, 0), 3


def _run(loaded, read=(), g=None, r=None, B=2, seed=1, x=None, rows=None):
    """denoise() once with ``read`` names hooked; returns (output, {name: value})."""
    a = loaded.adapter
    hm = HookManager(loaded.transformer, a)
    hm.extension("attention").configure(query_tokens=list(QUERY_TOKENS), top_k=TOP_K)  # every point can fire
    seen = {}
    if x is None:
        x, rows = _inputs(B, seed)
    with torch.no_grad():
        if read:
            hm.add_hook(list(read), lambda v, ctx: seen.__setitem__(ctx.name, v.detach().clone()))
        if g is not None:
            hm.extension("attention").set_coupling(g)
        if r is not None:
            hm.extension("attention").set_window(r)
        try:
            out = a.denoise(x, 500.0, rows)
        finally:
            hm.remove_all()
            hm.extension("attention").set_coupling(None)
            hm.extension("attention").set_window(None)
    return out, seen


# -- structure -----------------------------------------------------------------------------------
def test_adapter_blocks_geometry_and_registration(loaded):
    a = loaded.adapter
    assert isinstance(a, FluxAdapter) and type(adapter_for(loaded.transformer)) is FluxAdapter
    assert a.family == "flux" and a.num_layers == 2
    assert [a.block_path(i) for i in range(2)] == ["transformer_blocks.0", "single_transformer_blocks.0"]
    assert list(a.attention_modules(1)) == ["single_transformer_blocks.0.attn"]
    geo = a.geometry
    assert (geo.latent_channels, geo.latent_size, geo.grid_height, geo.grid_width) == (4, 8, 4, 4)
    assert (geo.num_tokens, geo.text_tokens, geo.width, geo.in_channels) == (N, L, 32, 16)
    assert a.dim_sizes()["mlp_channel"] == 128
    # single blocks have no resid_mid (parallel attention + MLP); double blocks do
    pts = a.hook_points()
    assert "blocks.0.resid_mid" in pts and "blocks.1.resid_mid" not in pts
    assert "blocks.1.parallel.out" in pts and "blocks.0.parallel.out" not in pts
    assert "blocks.1.attn.out" not in pts and "blocks.1.mlp.out" not in pts and "blocks.1.attn.z" in pts
    assert pts["blocks.0.resid_mid"].writable and pts["blocks.0.context.resid_mid"].writable


def test_every_point_fires_with_its_dims(loaded):
    a = loaded.adapter
    names = [n for n, p in a.hook_points().items() if p.kind in ("pre", "post", "processor")
             and not n.endswith("_inter")]
    _, seen = _run(loaded, names)
    assert set(seen) == set(names)
    sizes = a.dim_sizes(top_k=TOP_K)
    for n in names:
        p = a.point(n)
        sz = {**sizes, "query": len(QUERY_TOKENS)} if n.endswith("pattern_query") else sizes
        want = tuple(2 if d == "batch" else sz[d] for d in p.dims)
        assert tuple(seen[n].shape) == want, n


def test_reading_is_passive_bit_for_bit(loaded):
    ref, _ = _run(loaded)
    a = loaded.adapter
    module_points = [n for n, p in a.hook_points().items() if p.kind in ("pre", "post")]
    qkv = [f"blocks.*.attn.{x}" for x in ("q", "k", "v", "context_q", "context_k", "context_v")]
    for names in (module_points, qkv):
        out, seen = _run(loaded, names)
        assert seen and torch.equal(out, ref)
    # patterns leave SDPA for the explicit softmax: equal to float error, not bitwise
    out, _ = _run(loaded, ["blocks.*.attn.pattern_joint", "blocks.*.attn.n_eff"])
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


# -- values against independent recomputation --------------------------------------------------------
def _rope_np(x, pos, axes=(4, 6, 6), theta=10000.0):
    """Rotary embedding written out: pairs (2k, 2k+1) of each axis' slice rotated by pos*theta^(-2k/d)."""
    out = np.empty_like(x)
    start = 0
    for ax, d in enumerate(axes):
        for k in range(d // 2):
            ang = pos[:, ax] * theta ** (-2.0 * k / d)  # (S,)
            c, s = np.cos(ang)[None, :, None], np.sin(ang)[None, :, None]
            i, j = start + 2 * k, start + 2 * k + 1
            out[..., i] = x[..., i] * c[..., 0] - x[..., j] * s[..., 0]
            out[..., j] = x[..., j] * c[..., 0] + x[..., i] * s[..., 0]
        start += d
    return out


def test_q_k_are_rotated_and_patterns_are_the_joint_softmax(loaded):
    names = ["blocks.*.attn.in", "blocks.*.context.attn.in", "blocks.*.attn.q", "blocks.*.attn.k",
             "blocks.*.attn.v", "blocks.*.attn.context_q", "blocks.*.attn.context_k", "blocks.*.attn.context_v",
             "blocks.*.attn.pattern", "blocks.*.attn.pattern_joint", "blocks.*.attn.pattern_image_text",
             "blocks.*.attn.pattern_text_image", "blocks.*.attn.logits", "blocks.*.attn.n_eff",
             "blocks.*.attn.entropy", "blocks.*.attn.out", "blocks.*.context.attn.out", "blocks.*.attn.z",
             "blocks.*.context.attn.z"]
    _, s = _run(loaded, names)
    model = loaded.transformer
    pos = np.concatenate([np.zeros((L, 3)), _ids(8, 8).numpy()]).astype(np.float64)
    for i, attn in ((0, model.transformer_blocks[0].attn), (1, model.single_transformer_blocks[0].attn)):
        # q of the image tokens from attn.in: linear, heads, RMSNorm, rotary at (0, row, col)
        x = s[f"blocks.{i}.attn.in"].double().numpy()
        W, b = attn.to_q.weight.double().numpy(), attn.to_q.bias.double().numpy()
        q = (x @ W.T + b).reshape(2, N, H, D)
        q = q / np.sqrt((q ** 2).mean(-1, keepdims=True) + attn.norm_q.eps) * attn.norm_q.weight.double().numpy()
        q = _rope_np(q.transpose(0, 2, 1, 3).reshape(2 * H, N, D), pos[L:]).reshape(2, H, N, D)
        np.testing.assert_allclose(s[f"blocks.{i}.attn.q"].numpy(), q, rtol=1e-4, atol=1e-5)
        # the joint pattern [text; image] from the emitted q, k
        Q = torch.cat([s[f"blocks.{i}.attn.context_q"], s[f"blocks.{i}.attn.q"]], 2).double().numpy()
        K = torch.cat([s[f"blocks.{i}.attn.context_k"], s[f"blocks.{i}.attn.k"]], 2).double().numpy()
        V = torch.cat([s[f"blocks.{i}.attn.context_v"], s[f"blocks.{i}.attn.v"]], 2).double().numpy()
        logits = Q @ K.transpose(0, 1, 3, 2) / math.sqrt(D)
        P = np.exp(logits - logits.max(-1, keepdims=True))
        P /= P.sum(-1, keepdims=True)
        for name, block in (("pattern_joint", P), ("pattern", P[:, :, L:, L:]),
                            ("pattern_image_text", P[:, :, L:, :L]), ("pattern_text_image", P[:, :, :L, L:]),
                            ("logits", logits[:, :, L:, L:])):
            np.testing.assert_allclose(s[f"blocks.{i}.attn.{name}"].numpy(), block, rtol=1e-4, atol=1e-6)
        rows = P[:, :, L:]
        np.testing.assert_allclose(s[f"blocks.{i}.attn.n_eff"].numpy(), 1 / (rows ** 2).sum(-1), rtol=1e-4)
        np.testing.assert_allclose(s[f"blocks.{i}.attn.entropy"].numpy(),
                                   -(rows * np.log(rows)).sum(-1), rtol=1e-4, atol=1e-6)
        assert (s[f"blocks.{i}.attn.pattern"].sum(-1) < 1).all()  # the rest of each row goes to text
        # the attention output from the pattern: double blocks project it, single blocks do not
        O = (P @ V).transpose(0, 2, 1, 3)  # (B, S, H, D)
        if i == 0:
            O = O.reshape(2, L + N, H * D)
            Wo, bo = attn.to_out[0].weight.double().numpy(), attn.to_out[0].bias.double().numpy()
            Wc, bc = attn.to_add_out.weight.double().numpy(), attn.to_add_out.bias.double().numpy()
            img, txt, out = O[:, L:] @ Wo.T + bo, O[:, :L] @ Wc.T + bc, "out"
        else:
            img, txt, out = O[:, L:], O[:, :L], "z"  # single blocks: per head, no W_O
        np.testing.assert_allclose(s[f"blocks.{i}.attn.{out}"].numpy(), img, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(s[f"blocks.{i}.context.attn.{out}"].numpy(), txt, rtol=1e-4, atol=1e-5)


def test_block_arithmetic_from_the_hook_points(loaded):
    """The residual updates of both block kinds, recomputed from their hook points and modules."""
    _, s = _run(loaded, ["*"])
    model = loaded.transformer
    blk = model.transformer_blocks[0]
    temb = s["time_embed.out"]
    chunks = blk.norm1.linear(torch.nn.functional.silu(temb)).chunk(6, dim=1)
    for j, c in enumerate(("shift_msa", "scale_msa", "gate_msa", "shift_mlp", "scale_mlp", "gate_mlp")):
        torch.testing.assert_close(s[f"blocks.0.adaln.{c}"], chunks[j], rtol=0, atol=0)
    ad = {c: s[f"blocks.0.adaln.{c}"][:, None] for c in ("gate_msa", "gate_mlp", "shift_mlp", "scale_mlp")}
    mid = s["blocks.0.resid_pre"] + ad["gate_msa"] * s["blocks.0.attn.out"]
    torch.testing.assert_close(s["blocks.0.resid_mid"], mid)
    torch.testing.assert_close(s["blocks.0.mlp.in"], blk.norm2(mid) * (1 + ad["scale_mlp"]) + ad["shift_mlp"])
    torch.testing.assert_close(s["blocks.0.resid_post"], mid + ad["gate_mlp"] * s["blocks.0.mlp.out"])
    cg = s["blocks.0.context.adaln.gate_msa"][:, None]
    cmid = s["blocks.0.context.resid_pre"] + cg * s["blocks.0.context.attn.out"]
    torch.testing.assert_close(s["blocks.0.context.resid_mid"], cmid)
    torch.testing.assert_close(s["blocks.0.context.resid_post"],
                               cmid + s["blocks.0.context.adaln.gate_mlp"][:, None] * s["blocks.0.context.mlp.out"])
    torch.testing.assert_close(s["blocks.1.resid_pre"], s["blocks.0.resid_post"], rtol=0, atol=0)
    torch.testing.assert_close(s["blocks.1.context.resid_pre"], s["blocks.0.context.resid_post"], rtol=0, atol=0)
    # single block: one joint sequence [text; image], parallel branches, one gate
    sb = model.single_transformer_blocks[0]
    joint = torch.cat([s["blocks.1.context.resid_pre"], s["blocks.1.resid_pre"]], 1)
    xn, gate = sb.norm(joint, emb=temb)
    for name, full in (("attn.in", xn), ("mlp.in", xn), ("mlp.act", sb.act_mlp(sb.proj_mlp(xn)))):
        torch.testing.assert_close(s[f"blocks.1.{name}"], full[:, L:])
        torch.testing.assert_close(s[f"blocks.1.context.{name}"], full[:, :L])
    z = torch.cat([s["blocks.1.context.attn.z"], s["blocks.1.attn.z"]], 1).flatten(2)
    par = sb.proj_out(torch.cat([z, torch.cat([s["blocks.1.context.mlp.act"], s["blocks.1.mlp.act"]], 1)], 2))
    torch.testing.assert_close(s["blocks.1.parallel.out"], par[:, L:])
    torch.testing.assert_close(s["blocks.1.adaln.gate_msa"], gate)
    torch.testing.assert_close(s["blocks.1.resid_post"], (joint + gate[:, None] * par)[:, L:])
    torch.testing.assert_close(s["blocks.1.context.resid_post"], (joint + gate[:, None] * par)[:, :L])
    out = model.proj_out(model.norm_out(s["blocks.1.resid_post"], temb))
    torch.testing.assert_close(s["final.out"], out)


def test_interventions_on_single_block_slices_change_only_their_part(loaded):
    """Replacing the image slice of a single block's attention input keeps the text slice."""
    a = loaded.adapter
    hm = HookManager(loaded.transformer, a)
    x, rows = _inputs()
    seen = {}
    with torch.no_grad():
        hm.add_intervention("blocks.1.attn.in", lambda v, ctx: torch.zeros_like(v))
        hm.add_hook(["blocks.1.attn.q", "blocks.1.attn.context_q"], lambda v, ctx: seen.__setitem__(ctx.name, v.clone()))
        a.denoise(x, 500.0, rows)
        hm.remove_all()
    _, ref = _run(loaded, ["blocks.1.attn.q", "blocks.1.attn.context_q"])
    torch.testing.assert_close(seen["blocks.1.attn.context_q"], ref["blocks.1.attn.context_q"], rtol=0, atol=0)
    assert not torch.allclose(seen["blocks.1.attn.q"], ref["blocks.1.attn.q"])


# -- coupling and windows ----------------------------------------------------------------------------
def test_coupling_g0_is_two_independent_runs_and_g_mixes_image_rows(loaded):
    x, rows = _inputs(B=2)
    ref, _ = _run(loaded, x=x, rows=rows)
    out, _ = _run(loaded, g=0.0, x=x, rows=rows)
    assert torch.equal(out, ref)
    for k in range(2):  # each replica alone (batch of one)
        alone, _ = _run(loaded, x=x[k:k + 1], rows={n: v[k:k + 1] for n, v in rows.items()})
        torch.testing.assert_close(ref[k:k + 1], alone, rtol=1e-5, atol=1e-5)
    g = 0.5
    names = ["blocks.0.attn.q", "blocks.0.attn.k", "blocks.0.attn.v", "blocks.0.attn.context_k",
             "blocks.0.attn.context_v", "blocks.0.attn.out", "blocks.0.context.attn.out"]
    _, s = _run(loaded, names, g=g, x=x, rows=rows)
    _, s0 = _run(loaded, ["blocks.0.context.attn.out"], x=x, rows=rows)
    # text rows are uncoupled: block 0's text output is the uncoupled one
    torch.testing.assert_close(s["blocks.0.context.attn.out"], s0["blocks.0.context.attn.out"], rtol=1e-5, atol=1e-6)
    q, k, v = (s[f"blocks.0.attn.{n}"].double() for n in "qkv")
    Kj = torch.cat([s["blocks.0.attn.context_k"].double(), k], 2)
    Vj = torch.cat([s["blocks.0.attn.context_v"].double(), v], 2)
    intra = torch.softmax(q @ Kj.transpose(-1, -2) / math.sqrt(D), -1) @ Vj
    kp, vp = k.flip(0), v.flip(0)  # partner replica: [a; b] -> [b; a]
    inter = torch.softmax(q @ kp.transpose(-1, -2) / math.sqrt(D), -1) @ vp
    o = (intra / (1 + g) + inter * g / (1 + g)).transpose(1, 2).reshape(2, N, H * D)
    to_out = loaded.transformer.transformer_blocks[0].attn.to_out[0].double()
    try:
        torch.testing.assert_close(s["blocks.0.attn.out"].double(), to_out(o), rtol=1e-4, atol=1e-5)
    finally:
        to_out.float()


def test_windows(loaded):
    ref, _ = _run(loaded)
    out, _ = _run(loaded, r=SIDE - 1)
    assert torch.equal(out, ref)  # r >= side-1 builds no mask: the global model bit for bit
    out, s = _run(loaded, ["blocks.*.attn.pattern_joint"], r=1)
    assert not torch.allclose(out, ref)
    ids = _ids(8, 8)
    dist = torch.maximum((ids[:, None, 1] - ids[None, :, 1]).abs(), (ids[:, None, 2] - ids[None, :, 2]).abs())
    for i in (0, 1):
        P = s[f"blocks.{i}.attn.pattern_joint"]
        torch.testing.assert_close(P.sum(-1), torch.ones_like(P.sum(-1)))
        img = P[:, :, L:, L:]
        assert (img[..., dist > 1] == 0).all() and (img[..., dist <= 1] > 0).all()
        assert (P[:, :, :, :L] > 0).all() and (P[:, :, :L, :] > 0).all()  # text pairs stay open


# -- packing and sampling ------------------------------------------------------------------------------
def test_packing_matches_a_written_out_layout():
    x = torch.randn(2, 4, 8, 6)
    p = pack_latents(x)
    ref = np.zeros((2, 4 * 3, 16), dtype=np.float32)
    xn = x.numpy()
    for r in range(4):
        for c in range(3):
            for ch in range(4):
                for dy in range(2):
                    for dx in range(2):
                        ref[:, r * 3 + c, ch * 4 + dy * 2 + dx] = xn[:, ch, 2 * r + dy, 2 * c + dx]
    np.testing.assert_array_equal(p.numpy(), ref)
    assert torch.equal(unpack_latents(p, 8, 6), x)
    assert torch.equal(image_ids(8, 6), _ids(8, 6)) and image_ids(8, 6)[4].tolist() == [0.0, 1.0, 1.0]
    assert torch.equal(text_ids(3), torch.zeros(3, 3))
    with pytest.raises(DithooksError):
        pack_latents(torch.zeros(1, 4, 7, 8))


def _reference_flow_sample(loaded, cond, seeds, steps, guidance=None):
    """Flow matching written the FluxPipeline way: packed latents, linspace sigmas, mu, t/1000."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    model = loaded.transformer
    sched = FlowMatchEulerDiscreteScheduler.from_config(fam.SCHEDULE)
    m = (1.15 - 0.5) / (4096 - 256)
    mu = N * m + (0.5 - m * 256)
    sched.set_timesteps(steps, sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
    x = torch.stack([torch.randn(4, 8, 8, generator=torch.Generator().manual_seed(s)) for s in seeds])
    lat = pack_latents(x)
    B = len(seeds)
    for t in sched.timesteps:
        kw = {}
        if guidance is not None:
            kw["guidance"] = torch.full((B,), guidance)
        v = model(hidden_states=lat, encoder_hidden_states=cond.prompt_embeds,
                  pooled_projections=cond.pooled_prompt_embeds, timestep=t.expand(B) / 1000,
                  img_ids=_ids(8, 8), txt_ids=torch.zeros(L, 3), return_dict=False, **kw)[0]
        lat = sched.step(v, t, lat).prev_sample
    return unpack_latents(lat, 8, 8)


def test_flow_sample_through_the_sampler_equals_the_pipeline_loop(loaded):
    from dithooks.sampling import Sampler, SamplerSpec

    cond = fam.conditioning(2, seed=3)
    sampler = Sampler(loaded, SamplerSpec(name="flow", steps=3, guidance=1.0))
    out = sampler.run(cond, [11, 12])
    assert out.shape == (2, 4, 8, 8) and torch.isfinite(out).all()
    with torch.no_grad():
        ref = _reference_flow_sample(loaded, cond, [11, 12], 3)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert sampler.timesteps[0] == pytest.approx(1000.0)  # sigma 1 first, shifted by mu below it
    with pytest.raises(DithooksError):
        Sampler(loaded, SamplerSpec(name="ddim", steps=3))  # a velocity model needs the flow sampler


def test_embedded_guidance_dev_variant(tmp_path):
    from dithooks.conditioning import Conditioning
    from dithooks.sampling import Sampler, SamplerSpec

    dev = fam.make_tiny(tmp_path, guidance_embeds=True)
    assert dev.adapter.embedded_guidance
    c = fam.conditioning(2, seed=4)
    cond = Conditioning(prompt_embeds=c.prompt_embeds, pooled_prompt_embeds=c.pooled_prompt_embeds, guidance=2.5)
    out = Sampler(dev, SamplerSpec(name="flow", steps=3)).run(cond, [5, 6])
    with torch.no_grad():
        ref = _reference_flow_sample(dev, cond, [5, 6], 3, guidance=2.5)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    # CFG on a guidance-distilled model without negative prompts is refused (embedded guidance instead)
    with pytest.raises(DithooksError, match="guidance"):
        Sampler(dev, SamplerSpec(name="flow", steps=3, guidance=3.0)).run(cond, [5, 6])


def test_schnell_refuses_embedded_guidance_and_needs_pooled(loaded):
    from dithooks.conditioning import Conditioning
    from dithooks.sampling import Sampler, SamplerSpec

    c = fam.conditioning(1)
    sampler = Sampler(loaded, SamplerSpec(name="flow", steps=2))
    with pytest.raises(DithooksError, match="guidance"):
        sampler.run(Conditioning(prompt_embeds=c.prompt_embeds, pooled_prompt_embeds=c.pooled_prompt_embeds,
                                 guidance=3.5), [1])
    with pytest.raises(DithooksError, match="pooled"):
        sampler.run(Conditioning(prompt_embeds=c.prompt_embeds), [1])


def test_cfg_with_negative_prompts(loaded):
    """True CFG (schnell-like model): uncond + w (cond - uncond), the null rows from negative_*."""
    from dithooks.conditioning import Conditioning
    from dithooks.sampling import Sampler, SamplerSpec

    c = fam.conditioning(1, seed=7)
    neg = fam.conditioning(1, seed=8)
    cond = Conditioning(prompt_embeds=c.prompt_embeds, pooled_prompt_embeds=c.pooled_prompt_embeds,
                        negative_prompt_embeds=neg.prompt_embeds, negative_pooled_prompt_embeds=neg.pooled_prompt_embeds)
    sampler = Sampler(loaded, SamplerSpec(name="flow", steps=1, guidance=2.0))
    x0 = torch.randn(4, 8, 8, generator=torch.Generator().manual_seed(9))[None]
    out = sampler.run(cond, [9])
    a = loaded.adapter
    t = sampler.timesteps[0]
    with torch.no_grad():
        vc = a.denoise(x0, t, {"prompt_embeds": c.prompt_embeds, "pooled_prompt_embeds": c.pooled_prompt_embeds})
        vu = a.denoise(x0, t, {"prompt_embeds": neg.prompt_embeds, "pooled_prompt_embeds": neg.pooled_prompt_embeds})
    sigmas = sampler.scheduler.sigmas
    ref = x0 + (sigmas[1] - sigmas[0]) * (vu + 2.0 * (vc - vu))
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_save_load_round_trip(tmp_path):
    from diffusers import FluxTransformer2DModel

    from dithooks.loading import load_model

    path = fam.save_tiny(tmp_path / "rt", seed=0)
    loaded = load_model(str(path))
    assert loaded.adapter.geometry.latent_size == fam.LATENT_SIZE
    assert loaded.scheduler_config["use_dynamic_shifting"] and loaded.scheduler_config["shift"] == 3.0
    mem = fam.make_transformer(seed=0)
    for (n, p), (_, q) in zip(loaded.transformer.state_dict().items(), mem.state_dict().items()):
        assert torch.equal(p, q), n
    plain = FluxTransformer2DModel.from_pretrained(str(path)).eval()
    x, rows = _inputs(B=1)
    with torch.no_grad():
        out = loaded.adapter.denoise(x, 700.0, rows)
        kw = dict(hidden_states=pack_latents(x), encoder_hidden_states=rows["prompt_embeds"],
                  pooled_projections=rows["pooled_prompt_embeds"], timestep=torch.full((1,), 0.7),
                  img_ids=_ids(8, 8), txt_ids=torch.zeros(L, 3), return_dict=False)
        ref = unpack_latents(plain(**kw)[0], 8, 8)
        ref_mem = unpack_latents(mem(**kw)[0], 8, 8)
    assert torch.equal(out, ref)  # load_model + adapter.denoise == diffusers' own load and call
    # the in-memory twin agrees to float rounding (freshly allocated weights take other BLAS paths)
    torch.testing.assert_close(out, ref_mem, rtol=1e-6, atol=1e-6)


def test_single_block_points_outside_a_model_call_are_refused(loaded):
    from dithooks.adapters.flux import FluxCall

    call = FluxCall()
    with pytest.raises(DithooksError, match="outside a model call"):
        call.split(21)


# -- JVP ---------------------------------------------------------------------------------------------
def _block_fn(loaded, i, seen, coupling=None):
    """h -> image resid_post of block i in float64, other inputs as recorded: a deep copy of the
    block, differentiated directly (independent of the JVP extension). Finite differences would
    not do: diffusers' apply_rotary_emb computes in float32 even for float64 inputs."""
    import copy

    from dithooks.attention.flux_processor import HookedFluxAttnProcessor

    model = loaded.transformer
    blk = copy.deepcopy(model.transformer_blocks[0] if i == 0 else model.single_transformer_blocks[0]).double()
    if coupling is not None:
        blk.attn.set_processor(HookedFluxAttnProcessor(i, coupling=coupling, call=loaded.adapter.call))
    ids = torch.cat([torch.zeros(L, 3), _ids(8, 8)]).double()
    rot = tuple(r.double() for r in model.pos_embed(ids))
    c, temb = seen[f"blocks.{i}.context.resid_pre"].double(), seen["time_embed.out"].double()

    def f(h):
        return blk(hidden_states=h, encoder_hidden_states=c, temb=temb, image_rotary_emb=rot)[1]
    return f


def test_jvp_full_matches_a_direct_jvp_of_the_block(loaded):
    a = loaded.adapter
    assert {n for n in a.hook_points() if ".jvp." in n} >= {"blocks.0.jvp.full", "blocks.1.jvp.full"}
    names = ["blocks.*.jvp.full", "blocks.*.jvp.direction", "blocks.*.resid_pre", "blocks.*.context.resid_pre",
             "time_embed.out"]
    ref, _ = _run(loaded)
    out, s = _run(loaded, names)
    assert torch.equal(out, ref)  # the JVP is computed beside the forward: passive
    for i in (0, 1):
        f = _block_fn(loaded, i, s)
        h, d = s[f"blocks.{i}.resid_pre"].double(), s[f"blocks.{i}.jvp.direction"].double()
        with torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
            _, ref_t = torch.func.jvp(f, (h,), (d,))
        assert ref_t.abs().max() > 1e-2
        torch.testing.assert_close(s[f"blocks.{i}.jvp.full"].double(), ref_t, rtol=1e-4, atol=1e-6)


def test_jvp_full_replica_difference_at_coupling(loaded):
    """Replica direction at g = 0.5: half the difference of the tangent of the coupled pair
    ([p; p] along [d; -d]), the single block's processor splitting text/image from the call record."""
    a = loaded.adapter
    hm = HookManager(loaded.transformer, a)
    x, rows = _inputs(B=2, seed=5)
    s = {}
    with torch.no_grad():
        hm.add_hook(["blocks.*.jvp.full", "blocks.*.jvp.point", "blocks.*.jvp.direction", "blocks.*.context.resid_pre",
                     "time_embed.out"], lambda v, ctx: s.__setitem__(ctx.name, v.clone()))
        hm.state.batch_axes = (("replica", 2), ("sample", 1))
        hm.extension("jvp").configure(direction="replica", g=0.5)
        try:
            a.denoise(x, 500.0, rows)
        finally:
            hm.remove_all()
            hm.extension("jvp").configure(direction="auto", g=None)
            hm.state.batch_axes = ()
    for i in (0, 1):
        f = _block_fn(loaded, i, s, coupling=0.5)
        p, d = s[f"blocks.{i}.jvp.point"].double(), s[f"blocks.{i}.jvp.direction"].double()
        with torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
            _, tan = torch.func.jvp(f, (torch.cat([p, p]),), (torch.cat([d, -d]),))
            _, tan0 = torch.func.jvp(_block_fn(loaded, i, s), (torch.cat([p, p]),), (torch.cat([d, -d]),))
        ref_t = (tan[:1] - tan[1:]) / 2
        assert (ref_t - (tan0[:1] - tan0[1:]) / 2).abs().max() > 1e-4  # the coupling matters here
        torch.testing.assert_close(s[f"blocks.{i}.jvp.full"].double(), ref_t, rtol=1e-4, atol=1e-6)


def test_replacing_resid_mid_carries_into_the_block_output(loaded):
    """h_mid is re-used after norm2: a replacement must reach resid_post (image and text)."""
    a = loaded.adapter
    hm = HookManager(loaded.transformer, a)
    x, rows = _inputs()
    s = {}
    g = torch.Generator().manual_seed(3)
    shifts = {n: torch.randn(2, n_tok, 32, generator=g) for n, n_tok in (("", N), ("context.", L))}
    names = [f"blocks.0.{p}{n}" for p in ("", "context.") for n in ("resid_post", "mlp.out")]
    names += [f"blocks.0.{p}adaln.{c}" for p in ("", "context.") for c in ("gate_mlp", "shift_mlp", "scale_mlp")]
    with torch.no_grad():
        for p in ("", "context."):
            hm.add_intervention(f"blocks.0.{p}resid_mid",
                                lambda v, ctx, p=p: (s.__setitem__(f"{p}old", v.clone()), v + shifts[p])[1])
        hm.add_hook(names, lambda v, ctx: s.__setitem__(ctx.name, v.clone()))
        a.denoise(x, 500.0, rows)
        hm.remove_all()
    blk = loaded.transformer.transformer_blocks[0]
    for p, norm in (("", blk.norm2), ("context.", blk.norm2_context)):
        mid = s[f"{p}old"] + shifts[p]
        ad = {c: s[f"blocks.0.{p}adaln.{c}"][:, None] for c in ("gate_mlp", "shift_mlp", "scale_mlp")}
        ff = blk.ff if not p else blk.ff_context
        mlp = ff(norm(mid) * (1 + ad["scale_mlp"]) + ad["shift_mlp"])
        torch.testing.assert_close(s[f"blocks.0.{p}mlp.out"], mlp)
        torch.testing.assert_close(s[f"blocks.0.{p}resid_post"], mid + ad["gate_mlp"] * mlp)


def test_encode_prompts_uses_the_pipelines_encode_prompt(loaded):
    """The plumbing only (a stand-in pipeline): real encoders need `transformers` and weights."""
    calls = []

    class FakePipeline:
        def encode_prompt(self, prompt, prompt_2=None, max_sequence_length=512, **kw):
            calls.append((list(prompt), max_sequence_length))
            n = len(prompt)
            return (torch.full((n, max_sequence_length, 32), float(len(calls))), torch.ones(n, 16), torch.zeros(1, 3))

    cond = loaded.adapter.encode_prompts(FakePipeline(), ["a cat", "a dog"], ["", ""])
    assert calls == [(["a cat", "a dog"], L), (["", ""], L)]
    assert cond.prompt_embeds.shape == (2, L, 32) and cond.prompt_embeds.eq(1).all()
    assert cond.negative_prompt_embeds.eq(2).all() and cond.pooled_prompt_embeds.shape == (2, 16)


def test_flow_sampling_resumes_bit_for_bit(loaded):
    from dithooks.sampling import Sampler, SamplerSpec

    cond = fam.conditioning(2, seed=3)
    spec = SamplerSpec(name="flow", steps=3)
    states = {}
    full = Sampler(loaded, spec).run(cond, [1, 2], on_step=lambda s, st: states.__setitem__(s, st))
    resumed = Sampler(loaded, spec).run(cond, [1, 2], state=states[0])
    assert torch.equal(full, resumed)
