"""SD3 (MMDiT) adapter: hook points, passivity, joint attention through the hook manager,
coupling/windows, flow sampling with CFG, save/load - each against an independent computation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dithooks.adapters.sd3 import SD3Adapter
from dithooks.conditioning import Conditioning
from dithooks.errors import DithooksError
from dithooks.hooks import HookManager
from dithooks.sampling import Sampler, SamplerSpec

from .conformance import family_sd3 as fam

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    return fam.make_tiny(tmp_path_factory.mktemp("sd3"))


def model_inputs(M=2, seed=0, t=700.0):
    cond = fam.conditioning(M, seed)
    g = torch.Generator().manual_seed(seed + 100)
    return dict(hidden_states=torch.randn(M, 4, 8, 8, generator=g), encoder_hidden_states=cond.prompt_embeds,
                pooled_projections=cond.pooled_prompt_embeds, timestep=torch.full((M,), t))


def forward(model, x):
    with torch.no_grad():
        return model(**x).sample


QUERY_TOKENS, TOP_K = (5, 0), 3


def manager(model, adapter):
    """A hook manager whose attention extension can emit every processor point (top-k, query rows)."""
    hm = HookManager(model, adapter)
    hm.extension("attention").configure(query_tokens=list(QUERY_TOKENS), top_k=TOP_K)
    return hm


def sizes_of(adapter, name):
    """{dim: size} for ``name`` (pattern_query's query axis runs over QUERY_TOKENS)."""
    sizes = {**adapter.dim_sizes(top_k=TOP_K), "batch": 2}
    return {**sizes, "query": len(QUERY_TOKENS)} if name.endswith("pattern_query") else sizes


def read_all(hm, names, x):
    got = {}
    def keep(v, ctx):
        got[ctx.name] = v.detach().clone()
    with hm.hooks(read={n: keep for n in names}):
        out = forward(hm.model, x)
    return got, out


def test_loaded_through_load_model(loaded):
    a = loaded.adapter
    assert isinstance(a, SD3Adapter) and a.family == "sd3" and a.prediction == "flow"
    assert a.default_sampler == "flow" and a.conditioning == "text"
    geo = a.geometry
    assert (geo.num_layers, geo.width, geo.num_heads, geo.head_dim) == (2, 32, 2, 16)
    assert (geo.grid_height, geo.grid_width, geo.num_tokens, geo.text_tokens) == (4, 4, 16, fam.TEXT_TOKENS)
    assert geo.latent_shape == (4, 8, 8) and geo.num_classes is None
    assert loaded.scheduler_config["shift"] == 3.0
    assert list(a.attention_modules(1)) == ["transformer_blocks.1.attn"]


def test_every_point_fires_with_documented_dims(loaded):
    a = loaded.adapter
    hm = manager(loaded.transformer, a)
    names = [n for n in a.hook_points() if not n.endswith("_inter") and ".jvp." not in n]
    got, _ = read_all(hm, names, model_inputs())
    assert sorted(got) == sorted(names) and "blocks.1.attn.topk_idx" in got
    for n in names:
        dims, sizes = a.point(n).dims, sizes_of(a, n)
        assert tuple(got[n].shape) == tuple(sizes[d] for d in dims), (n, dims, got[n].shape)
    # the last block is context_pre_only: its text stream ends at the joint attention
    assert "blocks.1.context.resid_post" not in a.hook_points()
    assert "blocks.1.context.adaln.scale_msa" in a.hook_points() and "blocks.1.context.adaln.gate_msa" not in a.hook_points()
    assert "blocks.0.context.resid_post" in a.hook_points()


def test_reading_is_passive(loaded):
    a, model = loaded.adapter, loaded.transformer
    hm = manager(model, a)
    x = model_inputs()
    ref = forward(model, x)
    module_points = [n for n, p in a.hook_points().items() if p.kind in ("pre", "post")]
    qkv = [n for n in a.hook_points() if n.split(".")[-1] in ("q", "k", "v", "context_q", "context_k", "context_v")]
    _, out = read_all(hm, module_points + qkv, x)
    assert torch.equal(out, ref)  # module hooks and q/k/v (still SDPA): bit for bit
    _, out = read_all(hm, [n for n in a.hook_points() if ".jvp." not in n and not n.endswith("_inter")], x)
    assert torch.allclose(out, ref, atol=1e-5)  # patterns leave SDPA for the written-out softmax
    assert torch.equal(forward(model, x), ref)  # and everything is restored afterwards
    assert all(type(m.processor).__name__ == "JointAttnProcessor2_0" for m in model.modules() if hasattr(m, "processor"))


def _ln(x):
    return F.layer_norm(x, x.shape[-1:], eps=1e-6)


def test_stream_values_match_the_block_formula(loaded):
    """Each read value recomputed from other read values with the MMDiT block's equations."""
    a, model = loaded.adapter, loaded.transformer
    got, _ = read_all(HookManager(model, a), [n for n in a.hook_points() if ".jvp." not in n and "attn." not in n
                                                 or n.endswith(("attn.in", "attn.out"))], model_inputs())
    temb = got["time_embed.out"]
    for i in range(2):
        b, blk = f"blocks.{i}.", model.transformer_blocks[i]
        ad = F.linear(F.silu(temb), blk.norm1.linear.weight, blk.norm1.linear.bias).chunk(6, 1)
        for j, c in enumerate(("shift_msa", "scale_msa", "gate_msa", "shift_mlp", "scale_mlp", "gate_mlp")):
            assert torch.allclose(got[b + "adaln." + c], ad[j], atol=1e-6)
        h = got[b + "resid_pre"]
        g = lambda n: got[b + n][:, None]
        assert torch.allclose(got[b + "attn.in"], _ln(h) * (1 + g("adaln.scale_msa")) + g("adaln.shift_msa"), atol=1e-5)
        assert torch.allclose(got[b + "resid_mid"], h + g("adaln.gate_msa") * got[b + "attn.out"], atol=1e-6)
        mid = got[b + "resid_mid"]
        assert torch.allclose(got[b + "mlp.in"], _ln(mid) * (1 + g("adaln.scale_mlp")) + g("adaln.shift_mlp"), atol=1e-5)
        assert torch.allclose(got[b + "resid_post"], mid + g("adaln.gate_mlp") * got[b + "mlp.out"], atol=1e-6)
        c = got[b + "context.resid_pre"]
        if i == 0:
            assert torch.equal(c, got["context_embed.out"])
            assert torch.equal(got["blocks.1.context.resid_pre"], got[b + "context.resid_post"])
            cm = c + g("context.adaln.gate_msa") * got[b + "context.attn.out"]
            assert torch.allclose(got[b + "context.resid_mid"], cm, atol=1e-6)
            assert torch.allclose(got[b + "context.resid_post"],
                                  cm + g("context.adaln.gate_mlp") * got[b + "context.mlp.out"], atol=1e-6)
        else:  # AdaLayerNormContinuous: (scale, shift)
            sc = F.linear(F.silu(temb), blk.norm1_context.linear.weight, blk.norm1_context.linear.bias).chunk(2, 1)
            assert torch.allclose(got[b + "context.adaln.scale_msa"], sc[0], atol=1e-6)
            assert torch.allclose(got[b + "context.attn.in"],
                                  _ln(c) * (1 + g("context.adaln.scale_msa")) + g("context.adaln.shift_msa"), atol=1e-5)
    assert torch.equal(got["blocks.0.resid_pre"], got["embed.out"])
    assert torch.equal(got["blocks.1.resid_pre"], got["blocks.0.resid_post"])


def test_patterns_equal_softmax_of_emitted_qk(loaded):
    a, model = loaded.adapter, loaded.transformer
    names = [f"blocks.1.attn.{n}" for n in ("q", "k", "context_q", "context_k", "pattern", "pattern_joint",
                                            "pattern_image_text", "pattern_text_image", "n_eff")]
    got, _ = read_all(HookManager(model, a), names, model_inputs())
    b = "blocks.1.attn."
    Q = torch.cat([got[b + "q"], got[b + "context_q"]], 2).double()
    K = torch.cat([got[b + "k"], got[b + "context_k"]], 2).double()
    P = torch.softmax(Q @ K.transpose(-1, -2) / 16 ** 0.5, -1)
    assert torch.allclose(got[b + "pattern_joint"].double(), P, atol=1e-6)
    assert torch.allclose(got[b + "pattern"].double(), P[:, :, :16, :16], atol=1e-6)
    assert torch.allclose(got[b + "pattern_image_text"].double(), P[:, :, :16, 16:], atol=1e-6)
    assert torch.allclose(got[b + "pattern_text_image"].double(), P[:, :, 16:, :16], atol=1e-6)
    assert torch.allclose(got[b + "n_eff"].double(), 1 / (P[:, :, :16] ** 2).sum(-1), rtol=1e-5)


def test_interventions(loaded):
    a, model = loaded.adapter, loaded.transformer
    hm = HookManager(model, a)
    x = model_inputs()
    got = {}
    with hm.hooks(read={"blocks.0.resid_*": lambda v, ctx: got.__setitem__(ctx.name, v.clone())},
                  replace={"blocks.0.attn.out": lambda v, ctx: torch.zeros_like(v)}):
        forward(model, x)
    assert torch.equal(got["blocks.0.resid_mid"], got["blocks.0.resid_pre"])
    # replacing the text stream leaving block 0 changes the image output downstream
    ref = forward(model, x)
    with hm.hooks(replace={"blocks.0.context.resid_post": lambda v, ctx: torch.zeros_like(v)}):
        out = forward(model, x)
    assert not torch.allclose(out, ref)
    # a replaced resid_mid is carried into the block's output tuple (image: item 1, text: item 0)
    for stream in ("", "context."):
        got = {}
        keep = lambda v, ctx: got.__setitem__(ctx.name, v.clone())
        with hm.hooks(replace={f"blocks.0.{stream}resid_mid": lambda v, ctx: 0.5 * v},
                      read={f"blocks.0.{stream}{n}": keep for n in ("resid_pre", "attn.out", "mlp.out", "resid_post")}):
            forward(model, x)
        gate = lambda c: got_ad[f"blocks.0.{stream}adaln.{c}"][:, None]
        got_ad, _ = read_all(hm, [f"blocks.0.{stream}adaln.gate_msa", f"blocks.0.{stream}adaln.gate_mlp"], x)
        b = f"blocks.0.{stream}"
        mid = 0.5 * (got[b + "resid_pre"] + gate("gate_msa") * got[b + "attn.out"])
        assert torch.allclose(got[b + "resid_post"], mid + gate("gate_mlp") * got[b + "mlp.out"], atol=1e-5)
    # a replaced image->image pattern block is used: zero pattern -> attention sees text only
    with hm.hooks(replace={"blocks.1.attn.pattern": lambda v, ctx: torch.zeros_like(v)},
                  read={"blocks.1.attn.pattern_joint": lambda v, ctx: got.__setitem__("pj", v.clone())}):
        forward(model, x)
    assert got["pj"][:, :, :16, :16].abs().sum() > 0  # the joint pattern is emitted before the block replacement


def test_coupling_and_windows_through_the_manager(loaded):
    a, model = loaded.adapter, loaded.transformer
    hm = HookManager(model, a)
    att = hm.extension("attention")
    xa, xb = model_inputs(2, seed=0), model_inputs(2, seed=1)
    both = {k: torch.cat([xa[k], xb[k]]) for k in xa}
    ref = forward(model, both)
    for g, r in ((0.0, None), (None, 3), (0.0, 7)):
        att.set_coupling(g)
        att.set_window(r)
        assert type(model.transformer_blocks[0].attn.processor).__name__ == "HookedJointAttnProcessor"
        assert torch.equal(forward(model, both), ref)  # g = 0 / r >= side - 1: exactly the plain model
    att.set_coupling(None)
    att.set_window(None)
    # g = 0 is two independent runs
    assert torch.allclose(ref[:2], forward(model, xa), atol=1e-6) and torch.allclose(ref[2:], forward(model, xb), atol=1e-6)
    # g > 0 couples the halves symmetrically: swapping the replicas swaps the outputs
    att.set_coupling(0.5)
    coupled = forward(model, both)
    swapped = forward(model, {k: torch.cat([v[2:], v[:2]]) for k, v in both.items()})
    att.set_coupling(None)
    assert not torch.allclose(coupled, ref, atol=1e-4)
    assert torch.allclose(coupled, torch.cat([swapped[2:], swapped[:2]]), atol=1e-6)
    # a small window changes the output; both put the model's own processors back
    att.set_window(0)
    assert not torch.allclose(forward(model, xa), ref[:2], atol=1e-4)
    att.set_window(None)
    assert type(model.transformer_blocks[0].attn.processor).__name__ == "JointAttnProcessor2_0"


def test_flow_sampling_with_cfg_matches_a_hand_written_loop(loaded):
    from diffusers import FlowMatchEulerDiscreteScheduler

    cond = fam.conditioning(2, seed=3)
    cond = Conditioning(prompt_embeds=cond.prompt_embeds, pooled_prompt_embeds=cond.pooled_prompt_embeds,
                        negative_prompt_embeds=-cond.prompt_embeds[:1])
    spec = SamplerSpec("flow", steps=3, guidance=4.0)
    seeds = [5, 6]
    x = Sampler(loaded, spec).run(cond, seeds)

    # independent: sigmas of SD3's shifted schedule, x <- x + (sigma_next - sigma) v, by hand
    model = loaded.transformer
    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    sched.set_timesteps(3)
    sig = sched.sigmas.double()
    shift = lambda s: 3 * s / (1 + 2 * s)  # SD3's time shift, applied to diffusers' linear grid
    s_lin = torch.linspace(1.0, shift(torch.tensor(1e-3, dtype=torch.float64)).item(), 3, dtype=torch.float64)
    assert torch.allclose(sig[:3], shift(s_lin), atol=1e-6) and sig[3] == 0
    assert torch.allclose(sched.timesteps.double(), 1000 * sig[:3], atol=1e-3)  # t = sigma * 1000
    z = torch.stack([torch.randn(4, 8, 8, generator=torch.Generator().manual_seed(s)) for s in seeds])
    neg = (-cond.prompt_embeds[:1]).expand(2, -1, -1)
    with torch.no_grad():
        for i in range(3):
            t = torch.full((4,), float(sched.timesteps[i]))
            v = model(torch.cat([z, z]), torch.cat([cond.prompt_embeds, neg]),
                      torch.cat([cond.pooled_prompt_embeds, torch.zeros_like(cond.pooled_prompt_embeds)]), t).sample
            v = v[2:] + 4.0 * (v[:2] - v[2:])
            z = z + (sig[i + 1] - sig[i]).float() * v
    assert torch.allclose(x, z, atol=1e-5)
    assert x.shape == (2, 4, 8, 8) and torch.isfinite(x).all()


def test_sampling_with_hooks_sees_steps_and_sigma_timesteps(loaded):
    hm = HookManager(loaded.transformer, loaded.adapter)
    seen = []
    with hm.hooks(read={"blocks.0.attn.pattern": lambda v, ctx: seen.append((ctx.step, ctx.timestep, tuple(v.shape)))}):
        Sampler(loaded, SamplerSpec("flow", steps=2, guidance=2.0), hm).run(fam.conditioning(1), [0])
    assert [s for s, _, _ in seen] == [0, 1] and seen[0][1] == pytest.approx(1000.0) and seen[0][2] == (2, 2, 16, 16)
    assert 0 < seen[1][1] < 1000


def test_bad_conditioning_is_one_line(loaded):
    s = Sampler(loaded, SamplerSpec("flow", steps=1))
    with pytest.raises(DithooksError, match="text"):
        s.run([1], [0])
    with pytest.raises(DithooksError, match="joint_attention_dim"):
        s.run(Conditioning(prompt_embeds=torch.zeros(1, 6, 7), pooled_prompt_embeds=torch.zeros(1, 16)), [0])
    with pytest.raises(DithooksError, match="pooled"):
        s.run(Conditioning(prompt_embeds=torch.zeros(1, 6, 32)), [0])
    with pytest.raises(DithooksError, match="pooled_projection_dim"):
        s.run(Conditioning(prompt_embeds=torch.zeros(1, 6, 32), pooled_prompt_embeds=torch.zeros(1, 3)), [0])
    with pytest.raises(DithooksError):
        Sampler(loaded, SamplerSpec("ddim", steps=2))


def test_save_load_round_trip(tmp_path, loaded):
    """A saved tiny SD3 loads back with the same weights and outputs, bit for bit."""
    from dithooks.loading import load_model

    original = fam.make_transformer(seed=0)
    again = load_model(str(fam.save_tiny(tmp_path / "again")))
    x = model_inputs()
    assert torch.equal(forward(original, x), forward(again.transformer, x))
    assert torch.equal(forward(loaded.transformer, x), forward(again.transformer, x))
    assert again.adapter.geometry.text_tokens == 333  # the SD3 pipeline's default until told otherwise


def test_sd35_dual_attention_and_qk_norm():
    """SD3.5 blocks: SD35AdaLayerNormZeroX (9 chunks), the image-only attn2, RMS q/k norms."""
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(1)
    model = SD3Transformer2DModel(**{**fam.CONFIG, "dual_attention_layers": (0,), "qk_norm": "rms_norm"}).eval()
    a = SD3Adapter(model, text_tokens=fam.TEXT_TOKENS)
    hm = manager(model, a)
    x = model_inputs()
    ref = forward(model, x)
    names = [n for n in a.hook_points() if ".jvp." not in n and not n.endswith("_inter")]
    assert "blocks.0.attn2.out" in names and "blocks.0.adaln.gate_msa2" in names and "blocks.1.attn2.in" not in names
    got, out = read_all(hm, names, x)
    assert sorted(got) == sorted(names) and torch.allclose(out, ref, atol=1e-5)
    for n in names:
        assert tuple(got[n].shape) == tuple(sizes_of(a, n)[d] for d in a.point(n).dims), n
    blk = model.transformer_blocks[0]
    ad = F.linear(F.silu(got["time_embed.out"]), blk.norm1.linear.weight, blk.norm1.linear.bias).chunk(9, 1)
    assert torch.allclose(got["blocks.0.adaln.gate_msa2"], ad[8], atol=1e-6)
    g = lambda n: got["blocks.0." + n][:, None]
    mid = got["blocks.0.resid_pre"] + g("adaln.gate_msa") * got["blocks.0.attn.out"] + g("adaln.gate_msa2") * got["blocks.0.attn2.out"]
    assert torch.allclose(got["blocks.0.resid_mid"], mid, atol=1e-6)
    # q/k are emitted after the RMS norms: the pattern is their softmax
    b = "blocks.0.attn."
    Q = torch.cat([got[b + "q"], got[b + "context_q"]], 2)
    K = torch.cat([got[b + "k"], got[b + "context_k"]], 2)
    q_raw = blk.attn.to_q(got["blocks.0.attn.in"]).view(2, -1, 2, 16).transpose(1, 2)
    assert torch.allclose(got[b + "q"], blk.attn.norm_q(q_raw), atol=1e-6) and not torch.allclose(got[b + "q"], q_raw)
    assert torch.allclose(torch.softmax(Q @ K.transpose(-1, -2) / 4.0, -1), got[b + "pattern_joint"], atol=1e-6)
    att = hm.extension("attention")
    att.set_coupling(0.0)
    att.set_window(3)
    assert torch.equal(forward(model, x), ref)
    att.set_coupling(None)
    att.set_window(None)


@pytest.mark.parametrize("layer", [0, 1])
def test_jvp_full_matches_finite_differences(loaded, layer):
    """blocks.{i}.jvp.full (image stream, text stream held fixed) against a float64 central difference."""
    import copy

    a, model = loaded.adapter, loaded.transformer
    assert f"blocks.{layer}.jvp.full" in a.hook_points() and f"blocks.{layer}.jvp.routing" not in a.hook_points()
    hm = HookManager(model, a)
    x = model_inputs()
    d = torch.randn(2, 16, 32, generator=torch.Generator().manual_seed(9))
    hm.extension("jvp").configure(direction=d)
    b = f"blocks.{layer}."
    got, out = read_all(hm, [b + "jvp.full", b + "resid_pre", b + "context.resid_pre", "time_embed.out"], x)
    assert torch.equal(out, forward(model, x))  # the JVP leaves the forward alone
    blk = copy.deepcopy(model.transformer_blocks[layer]).double()
    kw = dict(encoder_hidden_states=got[b + "context.resid_pre"].double(), temb=got["time_embed.out"].double())
    eps, h = 1e-5, got[b + "resid_pre"].double()
    with torch.no_grad():
        fd = (blk(hidden_states=h + eps * d, **kw)[1] - blk(hidden_states=h - eps * d, **kw)[1]) / (2 * eps)
    assert torch.allclose(got[b + "jvp.full"].double(), fd, rtol=1e-4, atol=1e-5)
    assert fd.abs().max() > 0.1


def test_jvp_full_replica_difference_under_coupling(loaded):
    """Direction 'replica' at g = 0.4: half the difference of the coupled pair's tangents,
    against a float64 central difference of the coupled block run on the pair."""
    import copy

    from dithooks.attention.joint_processor import HookedJointAttnProcessor

    a, model = loaded.adapter, loaded.transformer
    hm = HookManager(model, a)
    hm.state.batch_axes = (("replica", 2), ("sample", 1))
    hm.extension("attention").set_coupling(0.4)
    hm.extension("jvp").configure(direction="replica")
    x = {k: torch.cat([v[:1], v[:1]]) if k != "hidden_states" else v for k, v in model_inputs().items()}
    try:
        got, _ = read_all(hm, ["blocks.0.jvp.full", "blocks.0.resid_pre", "blocks.0.context.resid_pre", "time_embed.out"], x)
    finally:
        hm.extension("attention").set_coupling(None)
    blk = copy.deepcopy(model.transformer_blocks[0]).double()
    blk.attn.set_processor(HookedJointAttnProcessor(0, coupling=0.4))
    h = got["blocks.0.resid_pre"].double()
    p, d = (h[:1] + h[1:]) / 2, (h[:1] - h[1:]) / 2
    kw = dict(encoder_hidden_states=got["blocks.0.context.resid_pre"].double(), temb=got["time_embed.out"].double())
    eps = 1e-5
    with torch.no_grad():
        plus = blk(hidden_states=torch.cat([p + eps * d, p - eps * d]), **kw)[1]
        minus = blk(hidden_states=torch.cat([p - eps * d, p + eps * d]), **kw)[1]
    T = (plus - minus) / (2 * eps)
    expect = (T[:1] - T[1:]) / 2
    assert got["blocks.0.jvp.full"].shape == (1, 16, 32)
    assert torch.allclose(got["blocks.0.jvp.full"].double(), expect, rtol=1e-4, atol=1e-5)
    blk.attn.set_processor(HookedJointAttnProcessor(0))  # uncoupled: a different answer
    with torch.no_grad():
        T0 = (blk(hidden_states=torch.cat([p + eps * d, p - eps * d]), **kw)[1]
              - blk(hidden_states=torch.cat([p - eps * d, p + eps * d]), **kw)[1]) / (2 * eps)
    assert (expect - (T0[:1] - T0[1:]) / 2).abs().max() > 1e-3


def test_every_module_point_is_writable_in_place(loaded):
    """An identity replacement keeps the output bit for bit; a perturbed one changes it (every point
    feeds the image output, the last block's text-stream ones through the joint keys/values).
    The perturbation is not affine per token: LayerNorm would undo 1.5 v + 0.1 exactly."""
    a, model = loaded.adapter, loaded.transformer
    hm = HookManager(model, a)
    x = model_inputs()
    ref = forward(model, x)
    names = [n for n, p in a.hook_points().items() if p.kind in ("pre", "post")]
    assert all(a.point(n).writable for n in names)
    for n in names:
        with hm.hooks(replace={n: lambda v, ctx: v.clone()}):
            assert torch.equal(forward(model, x), ref), n
        with hm.hooks(replace={n: lambda v, ctx: v + 0.3 * torch.cos(torch.arange(v.numel()).reshape(v.shape))}):
            assert not torch.allclose(forward(model, x), ref, atol=1e-4), n


def test_capture_stores_what_the_hooks_see(loaded, tmp_path):
    """A 2-step flow capture with CFG: stored values equal the hooks' (fp32 storage, the same hooks
    attached), text axes sized by the adapter, joint-pattern blocks, the final latents; `dithooks ls`
    reads the store."""
    import numpy as np
    from typer.testing import CliRunner

    from dithooks.capture import CaptureConfig, capture
    from dithooks.cli.main import app
    from dithooks.store.reader import open_store

    cond, spec = fam.conditioning(2, seed=4), SamplerSpec("flow", 2, guidance=3.0)
    hooks = ("context.attn.in", "attn.pattern_image_text", "attn.n_eff", "resid_post")
    hm = HookManager(loaded.transformer, loaded.adapter)
    ref = {}
    keep = lambda v, c: ref.__setitem__((c.name, c.step), v.clone())  # noqa: E731
    with hm.hooks(read={f"blocks.*.{h}": keep for h in hooks}):
        hooked = Sampler(loaded, spec, hm).run(cond, [0, 1])
    res = capture(CaptureConfig(out=str(tmp_path / "s.zarr"), hooks=hooks, sampler=spec, seeds=(0, 1),
                                conditioning=cond, storage_dtype="fp32"), loaded)
    assert res.steps_run == 2
    store = open_store(tmp_path / "s.zarr")
    assert store.completeness()["complete"]
    ctx = store.select("blocks.context.attn.in")
    assert ctx.dims == ("step", "layer", "cfg", "sample", "text_token", "channel")
    pit = store.select("blocks.attn.pattern_image_text")
    assert pit.dims[-3:] == ("head", "query", "text_key") and pit.values.shape[-1] == fam.TEXT_TOKENS
    for s in range(2):  # batch rows are (cond samples, null samples)
        for layer in range(2):
            np.testing.assert_array_equal(ctx.values[s, layer].reshape(4, fam.TEXT_TOKENS, 32),
                                          ref[(f"blocks.{layer}.context.attn.in", s)].numpy())
            np.testing.assert_array_equal(pit.values[s, layer].reshape(4, 2, 16, fam.TEXT_TOKENS),
                                          ref[(f"blocks.{layer}.attn.pattern_image_text", s)].numpy())
            np.testing.assert_array_equal(store.select("blocks.attn.n_eff").values[s, layer].reshape(4, 2, 16),
                                          ref[(f"blocks.{layer}.attn.n_eff", s)].numpy())
    np.testing.assert_array_equal(store.select("latents").values[-1], hooked.numpy())
    out = CliRunner().invoke(app, ["ls", str(tmp_path / "s.zarr")])
    assert out.exit_code == 0 and "blocks.context.attn.in" in out.output and "text_token" in out.output


def test_encode_prompts_through_loaded_model_uses_the_pipelines_encode_prompt(loaded):
    """LoadedModel.encode_prompts -> SD3Adapter.encode_prompts(pipeline, prompts, negatives): the
    plumbing only (a stand-in pipeline with StableDiffusion3Pipeline.encode_prompt's signature and
    return order); real encoders need `transformers` and weights."""
    import dataclasses

    calls = []

    class FakePipeline:
        tokenizer_max_length = 2  # SD3's CLIP length is 77; here 2 CLIP + 4 T5 tokens = TEXT_TOKENS

        def encode_prompt(self, prompt, prompt_2, prompt_3, device=None, num_images_per_prompt=1,
                          do_classifier_free_guidance=True, negative_prompt=None, max_sequence_length=256, **kw):
            calls.append((list(prompt), prompt_2, prompt_3, negative_prompt, max_sequence_length,
                          do_classifier_free_guidance))
            n, L = len(prompt), self.tokenizer_max_length + max_sequence_length
            full = lambda v, *shape: torch.full((n, *shape), v, dtype=torch.float16)  # noqa: E731
            return full(1.0, L, fam.JOINT_DIM), full(2.0, L, fam.JOINT_DIM), full(3.0, fam.POOLED_DIM), \
                full(4.0, fam.POOLED_DIM)

    with_encoders = dataclasses.replace(loaded, components=("transformer", "text_encoder"), _pipeline=FakePipeline())
    cond = with_encoders.encode_prompts(["a cat", "a dog"])
    assert calls == [(["a cat", "a dog"], None, None, "", fam.TEXT_TOKENS - 2, True)]  # SD3's null prompt is ""
    assert cond.prompt_embeds.dtype == torch.float32 and cond.prompt_embeds.shape == (2, fam.TEXT_TOKENS, fam.JOINT_DIM)
    assert cond.prompt_embeds.eq(1).all() and cond.negative_prompt_embeds.eq(2).all()
    assert cond.pooled_prompt_embeds.eq(3).all() and cond.negative_pooled_prompt_embeds.eq(4).all()
    x = Sampler(loaded, SamplerSpec("flow", 1, guidance=2.0)).run(cond, [0, 1])  # and it samples
    assert torch.isfinite(x).all()
    with_encoders.encode_prompts(["a cat", "a dog"], ["blurry"])
    assert calls[-1][3] == ["blurry", "blurry"]
    with pytest.raises(DithooksError, match="3 negative prompts for 2 prompts"):
        with_encoders.encode_prompts(["a cat", "a dog"], ["a", "b", "c"])
    FakePipeline.tokenizer_max_length = 77
    with pytest.raises(DithooksError) as e:
        with_encoders.encode_prompts(["a cat"])
    assert "\n" not in str(e.value) and "no T5 tokens" in str(e.value)


def test_replica_pairs_through_the_sampler(loaded):
    """Replica pairs with CFG: g = 0 is two independent flow samples (to float error: the pair runs
    in one batch of 4 rows, each alone in 2), g > 0 couples them."""
    from dithooks.sampling import ReplicaSpec, TrajectoryState, initial_replica_state

    cond, spec = fam.conditioning(1, seed=2), SamplerSpec("flow", 2, guidance=2.0)
    st = initial_replica_state(loaded, [3], ReplicaSpec(g=0.0))
    pair = Sampler(loaded, spec, replicas=ReplicaSpec(g=0.0)).run(cond, [3], state=st)
    alone = [Sampler(loaded, spec).run(cond, [3], state=TrajectoryState(0, st.latents[i:i + 1], st.rng_states[i:i + 1]))
             for i in range(2)]
    assert torch.allclose(pair, torch.cat(alone), atol=1e-6)
    coupled = Sampler(loaded, spec, replicas=ReplicaSpec(g=0.5)).run(cond, [3], state=st)
    assert not torch.allclose(coupled, pair, atol=1e-4) and torch.isfinite(coupled).all()
