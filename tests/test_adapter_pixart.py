"""PixArt-α adapter: hook points, passivity, adaLN-single chunks, cross-attention, patterns,
coupling and windows on self-attention, save/load round trip (a tiny random-init model)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dithooks.adapters import adapter_for
from dithooks.adapters.pixart import ADALN_CHUNKS, PixArtAdapter
from dithooks.hooks import HookManager

from .conformance.family_pixart import CONFIG, TEXT_TOKENS, make_tiny, make_transformer, prompt_embeds

pytestmark = pytest.mark.usefixtures("one_torch_thread")

B = 3
D, HEADS, HEAD_DIM = 32, 2, 16
N = 16  # 8x8 latents in 2x2 patches


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    return make_tiny(tmp_path_factory.mktemp("pixart"))


@pytest.fixture(scope="module")
def model(loaded):
    return loaded.transformer


def inputs(batch=B, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, 8, 8, generator=g)
    t = torch.tensor([10, 500, 999, 250, 750, 0][:batch])
    emb, mask = prompt_embeds(batch, seed)
    return x, t, emb, mask


def run(model, x, t, emb, mask):
    with torch.no_grad():
        return model(x, encoder_hidden_states=emb, timestep=t, encoder_attention_mask=mask).sample


def record(hm, names, replace=None, inp=None):
    seen = {}
    keep = lambda v, ctx: seen.__setitem__(ctx.name, v.clone())  # noqa: E731
    with hm.hooks(read={n: keep for n in names}, replace=replace or {}):
        out = run(hm.model, *(inp or inputs()))
    return seen, out


def module_names(adapter):
    return [n for n, p in adapter.hook_points().items() if p.kind in ("pre", "post")]


# -- structure ------------------------------------------------------------------------------------
def test_load_round_trip_picks_the_pixart_adapter(loaded, tmp_path):
    assert isinstance(loaded.adapter, PixArtAdapter) and loaded.adapter.family == "pixart"
    assert loaded.source == "local directory"
    fresh = make_transformer()  # the same seed: the weights that were saved
    saved = dict(fresh.named_parameters())
    for name, p in loaded.transformer.named_parameters():
        assert torch.equal(p, saved[name]), name
    assert torch.equal(run(loaded.transformer, *inputs()), run(fresh, *inputs()))
    assert loaded.scheduler_config["beta_schedule"] == "linear"
    geo = loaded.adapter.geometry
    assert (geo.num_layers, geo.width, geo.num_heads, geo.head_dim) == (2, D, HEADS, HEAD_DIM)
    assert (geo.grid_height, geo.grid_width, geo.num_tokens) == (4, 4, N)
    assert geo.learned_sigma and geo.latent_channels == 4 and geo.num_classes is None
    assert geo.text_tokens == TEXT_TOKENS and geo.text_width == CONFIG["caption_channels"]
    assert loaded.adapter.conditioning == "text" and loaded.adapter.prediction == "epsilon"


def test_processor_slots_and_where_points_are_read(loaded):
    ad = loaded.adapter
    assert list(ad.attention_modules(1)) == ["transformer_blocks.1.attn1", "transformer_blocks.1.attn2"]
    pts = ad.hook_points()
    assert pts["blocks.1.attn.pattern"].module_path == "transformer_blocks.1.attn1"
    assert pts["blocks.1.cross_attn.pattern"].module_path == "transformer_blocks.1.attn2"
    assert pts["blocks.1.cross_attn.pattern"].dims == ("batch", "head", "query", "text_key")
    assert pts["blocks.1.cross_attn.out"].module_path == "transformer_blocks.1.attn2.to_out.0"
    assert not pts["blocks.1.cross_attn.n_eff"].writable and pts["blocks.1.cross_attn.v"].writable
    # the DiT-only JVP parts are not offered: the block has a third (cross-attention) branch
    assert not any(n.startswith("blocks.0.jvp.") and n.rsplit(".", 1)[-1] in ("routing", "modulation", "mlp")
                   for n in pts)


def test_every_hook_point_fires_with_its_dims(loaded):
    hm = HookManager(loaded.transformer, loaded.adapter)
    hm.extension("attention").configure(top_k=3, query_tokens=[0, 5])
    hm.extension("attention").set_coupling(0.0)  # a replica-major batch, so that the inter-replica blocks exist too
    names = [n for n, p in loaded.adapter.hook_points().items() if p.kind in ("pre", "post", "processor")]
    try:
        seen, _ = record(hm, names, inp=pair_inputs())
    finally:
        hm.extension("attention").set_coupling(None)
    assert set(seen) == set(names)
    sizes = {**loaded.adapter.dim_sizes(top_k=3), "batch": 4}
    for name in names:
        dims = loaded.adapter.point(name).dims
        if name.endswith("pattern_query"):  # its query axis runs over the 2 query_tokens
            dims = tuple("rows" if d == "query" else d for d in dims)
            sizes["rows"] = 2
        assert tuple(seen[name].shape) == tuple(sizes[d] for d in dims), name
    # the self-attention pattern is image -> image (16 keys), not image -> text (8)
    assert seen["blocks.0.attn.pattern"].shape == (4, HEADS, N, N)
    assert seen["context_embed.out"].shape == (4, TEXT_TOKENS, D)


def test_reading_every_module_point_is_bit_for_bit_passive(loaded):
    model = loaded.transformer
    ref = run(model, *inputs())
    hm = HookManager(model, loaded.adapter)
    names = module_names(loaded.adapter) + [n for n in loaded.adapter.hook_points()
                                            if n.endswith(("attn.q", "attn.k", "attn.v"))]
    seen, out = record(hm, names)
    assert torch.equal(out, ref)
    assert len(seen) == len(names)
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    for blk in model.transformer_blocks:
        assert type(blk.attn1.processor).__name__ == "AttnProcessor2_0"
        assert type(blk.attn2.processor).__name__ == "AttnProcessor2_0"


# -- what each point is, recomputed ----------------------------------------------------------------
def test_block_identities_hold_bit_for_bit(loaded):
    """Each point is the block's own tensor: the block's arithmetic redone on them is exact."""
    model = loaded.transformer
    seen, out = record(HookManager(model, loaded.adapter), module_names(loaded.adapter))
    assert torch.equal(seen["final.out"], out)
    assert torch.equal(seen["embed.out"], seen["blocks.0.resid_pre"])
    shift, scale = seen["final.adaln.shift"][:, None], seen["final.adaln.scale"][:, None]
    assert torch.equal(seen["final.in"], model.norm_out(seen["blocks.1.resid_post"]) * (1 + scale) + shift)
    for j, what in enumerate(("shift", "scale")):  # the model's table plus t_emb, recomputed
        assert torch.equal(seen[f"final.adaln.{what}"], model.scale_shift_table[j] + seen["time_embed.out"])
    for i, blk in enumerate(model.transformer_blocks):
        v = {k.split(".", 2)[2]: val for k, val in seen.items() if k.startswith(f"blocks.{i}.")}
        a = {c: v[f"adaln.{c}"][:, None] for c in ADALN_CHUNKS}
        assert torch.equal(v["attn.in"], blk.norm1(v["resid_pre"]) * (1 + a["scale_msa"]) + a["shift_msa"])
        assert torch.equal(v["resid_mid"], a["gate_msa"] * v["attn.out"] + v["resid_pre"])
        assert torch.equal(v["cross_attn.in"], v["resid_mid"])
        assert torch.equal(v["resid_cross"], v["cross_attn.out"] + v["resid_mid"])
        assert torch.equal(v["mlp.in"], blk.norm2(v["resid_cross"]) * (1 + a["scale_mlp"]) + a["shift_mlp"])
        assert torch.equal(v["resid_post"], a["gate_mlp"] * v["mlp.out"] + v["resid_cross"])
        if i + 1 < len(model.transformer_blocks):
            assert torch.equal(v["resid_post"], seen[f"blocks.{i + 1}.resid_pre"])


def test_adaln_chunks_equal_a_direct_recomputation(loaded):
    model = loaded.transformer
    x, t, emb, mask = inputs()
    seen, _ = record(HookManager(model, loaded.adapter), ["time_embed.out", "blocks.*.adaln.*"])
    with torch.no_grad():
        t6, t_emb = model.adaln_single(t, {"resolution": None, "aspect_ratio": None}, batch_size=B,
                                       hidden_dtype=torch.float32)
        assert torch.equal(seen["time_embed.out"], t_emb)
        torch.testing.assert_close(t6, model.adaln_single.linear(F.silu(t_emb)), rtol=0, atol=0)
    for i, blk in enumerate(model.transformer_blocks):
        for j, c in enumerate(ADALN_CHUNKS):
            expected = blk.scale_shift_table[j][None] + t6[:, j * D:(j + 1) * D]
            assert torch.equal(seen[f"blocks.{i}.adaln.{c}"], expected), (i, c)


def test_cross_attention_output_is_masked_attention_to_the_text(loaded):
    """cross_attn.out = W_O softmax(Q K^T/sqrt(d) + mask) V with K, V from the projected caption."""
    model = loaded.transformer
    x, t, emb, mask = inputs()
    assert (mask == 0).any()
    seen, _ = record(HookManager(model, loaded.adapter),
                     ["context_embed.out", "blocks.1.cross_attn.in", "blocks.1.cross_attn.out"])
    attn2 = model.transformer_blocks[1].attn2
    with torch.no_grad():
        c = model.caption_projection(emb)
        assert torch.equal(seen["context_embed.out"], c)

        def heads(z):
            return z.view(B, -1, HEADS, HEAD_DIM).transpose(1, 2)

        q, k, v = heads(attn2.to_q(seen["blocks.1.cross_attn.in"])), heads(attn2.to_k(c)), heads(attn2.to_v(c))
        logits = q @ k.transpose(-1, -2) / HEAD_DIM ** 0.5 + ((1 - mask) * -10000.0)[:, None, None, :]
        o = (logits.softmax(-1) @ v).transpose(1, 2).reshape(B, N, D)
        expected = attn2.to_out[0](o)
    torch.testing.assert_close(seen["blocks.1.cross_attn.out"], expected, atol=1e-5, rtol=1e-5)
    # and the padding matters: without the mask the result differs
    o_nomask = ((q @ k.transpose(-1, -2) / HEAD_DIM ** 0.5).softmax(-1) @ v).transpose(1, 2).reshape(B, N, D)
    assert (attn2.to_out[0](o_nomask) - expected).abs().max() > 1e-4


def test_cross_attn_out_is_attn2s_output_bit_for_bit(loaded):
    model = loaded.transformer
    raw = []
    h = model.transformer_blocks[0].attn2.register_forward_hook(lambda m, a, o: raw.append(o.clone()))
    try:
        seen, _ = record(HookManager(model, loaded.adapter), ["blocks.0.cross_attn.out"])
    finally:
        h.remove()
    assert torch.equal(seen["blocks.0.cross_attn.out"], raw[0])


# -- interventions ------------------------------------------------------------------------------------
def test_zero_gate_removes_the_self_attention_branch(loaded):
    hm = HookManager(loaded.transformer, loaded.adapter)
    ref = run(loaded.transformer, *inputs())
    seen, out = record(hm, ["blocks.1.resid_pre", "blocks.1.resid_mid"],
                       replace={"blocks.1.adaln.gate_msa": lambda v, c: torch.zeros_like(v)})
    assert torch.equal(seen["blocks.1.resid_mid"], seen["blocks.1.resid_pre"])  # table + (0 - table) = 0
    assert (out - ref).abs().max() > 1e-4
    assert torch.equal(run(loaded.transformer, *inputs()), ref)  # nothing left behind


def test_adaln_replacement_is_what_the_block_uses(loaded):
    hm = HookManager(loaded.transformer, loaded.adapter)
    blk = loaded.transformer.transformer_blocks[0]
    new = torch.linspace(-1, 1, D).expand(B, D)
    seen, _ = record(hm, ["blocks.0.resid_pre", "blocks.0.attn.in", "blocks.0.adaln.shift_msa",
                          "blocks.1.adaln.scale_msa"],
                     replace={"blocks.0.adaln.scale_msa": lambda v, c: new})
    expected = blk.norm1(seen["blocks.0.resid_pre"]) * (1 + new[:, None]) + seen["blocks.0.adaln.shift_msa"][:, None]
    torch.testing.assert_close(seen["blocks.0.attn.in"], expected, atol=1e-6, rtol=0)
    ref, _ = record(hm, ["blocks.1.adaln.scale_msa"])  # the shared t6 was not changed in place
    assert torch.equal(seen["blocks.1.adaln.scale_msa"], ref["blocks.1.adaln.scale_msa"])


def test_resid_mid_replacement_reaches_the_residual_and_cross_attention(loaded):
    model = loaded.transformer
    hm = HookManager(model, loaded.adapter)
    new = torch.randn(B, N, D, generator=torch.Generator().manual_seed(7))
    seen, _ = record(hm, ["blocks.0.cross_attn.in", "blocks.0.cross_attn.out", "blocks.0.resid_cross"],
                     replace={"blocks.0.resid_mid": lambda v, c: new})
    x, t, emb, mask = inputs()
    attn2 = model.transformer_blocks[0].attn2
    with torch.no_grad():
        direct = attn2(new, encoder_hidden_states=model.caption_projection(emb),
                       attention_mask=((1 - mask) * -10000.0)[:, None])
    assert torch.equal(seen["blocks.0.cross_attn.in"], new)
    torch.testing.assert_close(seen["blocks.0.cross_attn.out"], direct, atol=1e-6, rtol=0)  # no carry in it
    torch.testing.assert_close(seen["blocks.0.resid_cross"], new + direct, atol=1e-5, rtol=0)


def test_cross_attn_in_replacement_changes_only_the_queries(loaded):
    hm = HookManager(loaded.transformer, loaded.adapter)
    base, _ = record(hm, ["blocks.0.resid_mid"])
    seen, _ = record(hm, ["blocks.0.resid_mid", "blocks.0.cross_attn.out", "blocks.0.resid_cross"],
                     replace={"blocks.0.cross_attn.in": lambda v, c: torch.zeros_like(v)})
    assert torch.equal(seen["blocks.0.resid_mid"], base["blocks.0.resid_mid"])
    assert torch.equal(seen["blocks.0.resid_cross"], seen["blocks.0.cross_attn.out"] + base["blocks.0.resid_mid"])
    # zero queries: uniform attention over the unmasked text tokens, the same for every image token
    out = seen["blocks.0.cross_attn.out"]
    torch.testing.assert_close(out, out[:, :1].expand_as(out), atol=1e-6, rtol=0)


# -- self-attention processor: patterns, coupling, windows ----------------------------------------
def test_pattern_is_the_softmax_of_the_emitted_q_k(loaded):
    model = loaded.transformer
    ref = run(model, *inputs())
    hm = HookManager(model, loaded.adapter)
    names = [f"blocks.{i}.attn.{k}" for i in range(2) for k in ("q", "k", "pattern", "logits", "n_eff")]
    seen, out = record(hm, names)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    for i in range(2):
        q, k, A = (seen[f"blocks.{i}.attn.{n}"] for n in ("q", "k", "pattern"))
        expected = torch.softmax(q @ k.transpose(-1, -2) / HEAD_DIM ** 0.5, dim=-1)
        torch.testing.assert_close(A, expected, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(seen[f"blocks.{i}.attn.logits"], q @ k.transpose(-1, -2) / HEAD_DIM ** 0.5,
                                   atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(seen[f"blocks.{i}.attn.n_eff"], 1 / (A ** 2).sum(-1), atol=1e-4, rtol=1e-5)
    assert all(type(b.attn1.processor).__name__ == "AttnProcessor2_0" for b in model.transformer_blocks)


def pair_inputs(seed=3):
    """A replica-major batch [a0, a1; b0, b1] sharing timesteps and prompts per pair."""
    x, t, emb, mask = inputs(2, seed)
    xb = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed + 1))
    return torch.cat([x, xb]), torch.cat([t, t]), torch.cat([emb, emb]), torch.cat([mask, mask])


def test_coupling_at_g0_is_two_independent_runs(loaded):
    model = loaded.transformer
    x, t, emb, mask = pair_inputs()
    plain = run(model, x, t, emb, mask)
    hm = HookManager(model, loaded.adapter)
    hm.extension("attention").set_coupling(0.0)
    try:
        # one processor on both attention modules; its cross-attention calls are never coupled
        assert all(type(b.attn1.processor).__name__ == "HookedPixArtAttnProcessor"
                   and b.attn2.processor is b.attn1.processor for b in model.transformer_blocks)
        out = run(model, x, t, emb, mask)
        hm.extension("attention").set_coupling(0.6)
        coupled = run(model, x, t, emb, mask)
    finally:
        hm.extension("attention").set_coupling(None)
    assert torch.equal(out, plain)
    for half in (slice(0, 2), slice(2, 4)):  # each replica alone: equal to batch-size GEMM blocking
        torch.testing.assert_close(out[half], run(model, x[half], t[half], emb[half], mask[half]),
                                   atol=2e-6, rtol=0)
    assert (coupled - plain).abs().max() > 1e-4
    assert all(type(b.attn1.processor).__name__ == "AttnProcessor2_0" for b in model.transformer_blocks)


def test_identical_replicas_are_a_fixed_point_of_coupling(loaded):
    model = loaded.transformer
    x, t, emb, mask = pair_inputs()
    x = torch.cat([x[:2], x[:2]])
    plain = run(model, x, t, emb, mask)
    hm = HookManager(model, loaded.adapter)
    hm.extension("attention").set_coupling(0.8)
    try:
        out = run(model, x, t, emb, mask)
    finally:
        hm.extension("attention").set_coupling(None)
    torch.testing.assert_close(out, plain, atol=1e-5, rtol=0)


def test_window_covering_the_grid_is_global_and_smaller_windows_are_local(loaded):
    model = loaded.transformer
    ref = run(model, *inputs())
    hm = HookManager(model, loaded.adapter)
    try:
        for r in (3, 7):  # side - 1 = 3
            hm.extension("attention").set_window(r)
            assert torch.equal(run(model, *inputs()), ref)
        hm.extension("attention").set_window(1)
        seen, local = record(hm, ["blocks.0.attn.pattern"])
    finally:
        hm.extension("attention").set_window(None)
    assert (local - ref).abs().max() > 1e-5
    A = seen["blocks.0.attn.pattern"]
    rows, cols = torch.arange(N) // 4, torch.arange(N) % 4
    far = torch.maximum((rows[:, None] - rows[None]).abs(), (cols[:, None] - cols[None]).abs()) > 1
    assert torch.all(A[..., far] == 0) and torch.all(A[..., ~far] > 0)
    torch.testing.assert_close(A.sum(-1), torch.ones(B, HEADS, N))


def test_adapter_for_a_model_built_in_memory():
    ad = adapter_for(make_transformer())
    assert isinstance(ad, PixArtAdapter)
    assert ad.geometry.text_tokens == 120  # PixArt-α's T5 length until told otherwise


# -- sampling --------------------------------------------------------------------------------------
def test_three_guided_ddim_steps_through_the_sampler_match_a_hand_written_loop(loaded):
    from diffusers import DDIMScheduler

    from dithooks.conditioning import Conditioning
    from dithooks.sampling import Sampler, SamplerSpec

    emb, mask = prompt_embeds(2, seed=4)
    neg = torch.randn(1, TEXT_TOKENS, CONFIG["caption_channels"], generator=torch.Generator().manual_seed(9))
    cond = Conditioning(prompt_embeds=emb, negative_prompt_embeds=neg, extras={"prompt_attention_mask": mask})
    seeds, w = [11, 12], 4.5
    hm = HookManager(loaded.transformer, loaded.adapter)
    steps_seen = []
    with hm.hooks(read={"blocks.1.cross_attn.out": lambda v, ctx: steps_seen.append((ctx.step, ctx.batch_axes))}):
        x = Sampler(loaded, SamplerSpec("ddim", steps=3, guidance=w), hooks=hm).run(cond, seeds)
    assert [s for s, _ in steps_seen] == [0, 1, 2]
    assert steps_seen[0][1] == (("cfg", 2), ("sample", 2))

    # the same loop by hand: PixArtAlphaPipeline's arithmetic on the model directly
    sched = DDIMScheduler.from_config(loaded.scheduler_config)
    sched.set_timesteps(3)
    lat = torch.stack([torch.randn(4, 8, 8, generator=torch.Generator().manual_seed(s)) for s in seeds])
    model = loaded.transformer
    with torch.no_grad():
        for t in sched.timesteps:
            out = model(torch.cat([lat, lat]), encoder_hidden_states=torch.cat([emb, neg.expand(2, -1, -1)]),
                        encoder_attention_mask=torch.cat([mask, mask]), timestep=t.expand(4)).sample
            eps_c, eps_u = out[:, :4].chunk(2)  # learned sigma: epsilon is the first 4 channels
            lat = sched.step(eps_u + w * (eps_c - eps_u), t, lat).prev_sample
    torch.testing.assert_close(x, lat, atol=1e-5, rtol=1e-5)
    assert torch.isfinite(x).all() and x.shape == (2, 4, 8, 8)


def test_text_conditioning_is_checked_in_one_line(loaded):
    from dithooks.conditioning import Conditioning
    from dithooks.errors import DithooksError
    from dithooks.sampling import Sampler, SamplerSpec

    sampler = Sampler(loaded, SamplerSpec("ddim", steps=2, guidance=2.0))
    try:
        with pytest.raises(DithooksError, match="conditioned on text"):
            sampler.run([1, 2], [0, 1])
        with pytest.raises(DithooksError, match="channels"):
            sampler.run(Conditioning(prompt_embeds=torch.zeros(2, 5, 7)), [0, 1])
        with pytest.raises(DithooksError, match="prompt_attention_mask"):
            sampler.run(Conditioning(prompt_embeds=torch.zeros(2, 5, 32),
                                     extras={"prompt_attention_mask": torch.ones(2, 4)}), [0, 1])
        with pytest.raises(DithooksError, match="pooled"):
            sampler.run(Conditioning(prompt_embeds=torch.zeros(2, 5, 32), pooled_prompt_embeds=torch.zeros(2, 7)), [0, 1])
        with pytest.raises(DithooksError, match="embedded guidance"):
            sampler.run(Conditioning(prompt_embeds=torch.zeros(2, 5, 32), guidance=3.5), [0, 1])
        with pytest.raises(DithooksError, match="same length"):
            sampler.run(Conditioning(prompt_embeds=torch.zeros(2, 5, 32), negative_prompt_embeds=torch.zeros(1, 4, 32)),
                        [0, 1])
    finally:  # the checks set text_tokens from what they saw
        loaded.adapter.text_tokens = TEXT_TOKENS


def test_capture_stores_what_the_hooks_see_and_query_reads_it(loaded, tmp_path):
    import json

    import numpy as np

    from dithooks.capture import CaptureConfig, capture
    from dithooks.sampling import Sampler, SamplerSpec
    from dithooks.store.reader import open_store

    from .conformance.family_pixart import conditioning

    cond, spec = conditioning(2, seed=5), SamplerSpec("ddim", 2, guidance=3.0)
    plain = Sampler(loaded, spec).run(cond, [0, 1])
    hm = HookManager(loaded.transformer, loaded.adapter)
    ref = {}
    keep = lambda v, c: ref.__setitem__((c.name, c.step), v.clone())  # noqa: E731
    # the same hooks as the capture: reading patterns moves attn1 off fused SDPA (float error)
    with hm.hooks(read={"blocks.1.cross_attn.out": keep, "context_embed.out": keep,
                        "blocks.*.attn.pattern": lambda v, c: None}):
        hooked = Sampler(loaded, spec, hm).run(cond, [0, 1])
    torch.testing.assert_close(hooked, plain, atol=1e-5, rtol=1e-5)
    hooks = ("resid_post", "cross_attn.out", "context_embed.out", "attn.pattern", "adaln.gate_msa")
    res = capture(CaptureConfig(out=str(tmp_path / "s.zarr"), hooks=hooks, sampler=spec, seeds=(0, 1),
                                conditioning=cond, storage_dtype="fp32"), loaded)
    assert res.steps_run == 2
    store = open_store(tmp_path / "s.zarr")
    assert store.completeness()["complete"]
    got = store.select("blocks.cross_attn.out")
    assert got.dims == ("step", "layer", "cfg", "sample", "token", "channel")
    ctx = store.select("context_embed.out")
    assert ctx.dims == ("step", "cfg", "sample", "text_token", "channel") and ctx.values.shape[-2] == TEXT_TOKENS
    for s in range(2):  # batch rows are (cond samples, null samples)
        np.testing.assert_array_equal(got.values[s, 1].reshape(4, N, D), ref[("blocks.1.cross_attn.out", s)].numpy())
        np.testing.assert_array_equal(ctx.values[s].reshape(4, TEXT_TOKENS, D), ref[("context_embed.out", s)].numpy())
    pattern = store.select("blocks.attn.pattern").values
    np.testing.assert_allclose(pattern.sum(-1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(store.select("latents").values[-1], hooked.numpy())
    from typer.testing import CliRunner

    from dithooks.cli.main import app

    q = CliRunner().invoke(app, ["query", str(tmp_path / "s.zarr"), "blocks.adaln.gate_msa", "--step", "-1",
                                 "--layer", "1", "--cfg", "cond", "--json"])
    assert q.exit_code == 0, q.output
    records = json.loads(q.output)["records"]
    gate = store.select("blocks.adaln.gate_msa").values[-1, 1, 0]  # (sample, channel)
    assert [r["sample"] for r in records] == [0, 1]
    np.testing.assert_allclose([r["norm"] for r in records], np.linalg.norm(gate, axis=-1), rtol=1e-6)
    listed = CliRunner().invoke(app, ["ls", str(tmp_path / "s.zarr")])
    assert listed.exit_code == 0 and "context_embed.out" in listed.output and "PixArt" in listed.output


# -- JVP ----------------------------------------------------------------------------------------------
def test_full_block_jvp_equals_finite_differences_of_the_block(loaded):
    """jvp.full (generic torch.func.jvp of resid_pre -> resid_post, text and timestep held fixed)
    against a central difference of a float64 copy of the block fed the same call's arguments."""
    import copy

    model = loaded.transformer
    blk = model.transformer_blocks[1]
    delta = torch.randn(B, N, D, generator=torch.Generator().manual_seed(8))
    calls = []
    handle = blk.register_forward_pre_hook(lambda m, a, kw: calls.append((a, dict(kw))), with_kwargs=True)
    hm = HookManager(model, loaded.adapter)
    hm.extension("jvp").configure(direction=delta)
    try:
        seen, out = record(hm, ["blocks.1.jvp.full", "blocks.1.jvp.point", "blocks.1.resid_pre"])
    finally:
        handle.remove()
    assert torch.equal(out, run(model, *inputs()))  # the JVP is computed beside the forward
    assert torch.equal(seen["blocks.1.jvp.point"], seen["blocks.1.resid_pre"])
    (args, kwargs), = calls
    b64 = copy.deepcopy(blk).double()
    kw64 = {k: (v.double() if torch.is_tensor(v) and v.is_floating_point() else v) for k, v in kwargs.items()}
    h, d, eps = args[0].double(), delta.double(), 1e-4
    with torch.no_grad():
        fd = (b64(h + eps * d, *args[1:], **kw64) - b64(h - eps * d, *args[1:], **kw64)) / (2 * eps)
    jvp = seen["blocks.1.jvp.full"]
    assert jvp.shape == (B, N, D)
    torch.testing.assert_close(jvp.double(), fd, atol=2e-5, rtol=1e-4)
    assert (jvp.double() - d).abs().max() > 1e-3  # more than the identity path


def test_micro_conditions_of_1024px_checkpoints():
    """use_additional_conditions models get the pipeline's resolution / aspect-ratio rows."""
    from dithooks.conditioning import Conditioning

    torch.manual_seed(0)
    from diffusers import PixArtTransformer2DModel

    # the size embeddings take a third of the width each: width 48 (1152 in PixArt-α)
    model = PixArtTransformer2DModel(**{**CONFIG, "attention_head_dim": 24, "cross_attention_dim": 48,
                                        "use_additional_conditions": True}).eval()
    ad = adapter_for(model)
    emb, mask = prompt_embeds(2)
    cond = Conditioning(prompt_embeds=emb, extras={"prompt_attention_mask": mask})
    ad.check_conditioning(cond, cfg=False)
    rows = cond.rows(cfg=False)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        got = ad.denoise(x, torch.tensor(300), rows)
        ref = model(x, encoder_hidden_states=emb, encoder_attention_mask=mask, timestep=torch.tensor([300, 300]),
                    added_cond_kwargs={"resolution": torch.tensor([[64.0, 64.0]] * 2),
                                       "aspect_ratio": torch.tensor([[1.0]] * 2)}).sample[:, :4]
        other = model(x, encoder_hidden_states=emb, encoder_attention_mask=mask, timestep=torch.tensor([300, 300]),
                      added_cond_kwargs={"resolution": torch.tensor([[32.0, 64.0]] * 2),
                                         "aspect_ratio": torch.tensor([[2.0]] * 2)}).sample[:, :4]
    assert torch.equal(got, ref)
    assert (other - ref).abs().max() > 1e-6


def test_pipeline_folder_with_pixarts_dpm_solver_config(tmp_path):
    """A PixArtAlphaPipeline-style folder (model_index.json, transformer/, scheduler/ with the
    DPM-Solver++ config PixArt ships): the schedule is read from it and DDIM steps on it."""
    import json

    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

    from dithooks.loading import load_model
    from dithooks.sampling import Sampler, SamplerSpec

    from .conformance.family_pixart import conditioning

    make_transformer().save_pretrained(str(tmp_path / "transformer"))
    DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", timestep_spacing="linspace",
                                beta_start=0.0001, beta_end=0.02).save_pretrained(str(tmp_path / "scheduler"))
    (tmp_path / "model_index.json").write_text(json.dumps({
        "_class_name": "PixArtAlphaPipeline", "transformer": ["diffusers", "PixArtTransformer2DModel"],
        "scheduler": ["diffusers", "DPMSolverMultistepScheduler"]}))
    loaded = load_model(str(tmp_path))
    assert isinstance(loaded.adapter, PixArtAdapter)
    assert loaded.scheduler_config["timestep_spacing"] == "linspace"
    sampler = Sampler(loaded, SamplerSpec("ddim", steps=2, guidance=2.0))
    expected = DDIMScheduler(beta_start=0.0001, beta_end=0.02, timestep_spacing="linspace", clip_sample=False)
    expected.set_timesteps(2)
    assert sampler.timesteps == [int(t) for t in expected.timesteps]
    x = sampler.run(conditioning(2), [0, 1])
    assert x.shape == (2, 4, 8, 8) and torch.isfinite(x).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_reading_is_passive_and_adaln_is_the_blocks_own(tmp_path, dtype):
    from dithooks.loading import load_model

    from .conformance.family_pixart import save_tiny

    low = load_model(str(save_tiny(tmp_path / "m")), dtype=dtype)
    x, t, emb, mask = inputs()
    inp = (x.to(dtype), t, emb.to(dtype), mask)
    ref = run(low.transformer, *inp)
    seen, out = record(HookManager(low.transformer, low.adapter), module_names(low.adapter), inp=inp)
    assert torch.equal(out, ref) and out.dtype == dtype
    blk = low.transformer.transformer_blocks[1]
    v = {k.split(".", 2)[2]: val for k, val in seen.items() if k.startswith("blocks.1.")}
    a = {c: v[f"adaln.{c}"][:, None] for c in ADALN_CHUNKS}
    assert v["adaln.gate_msa"].dtype == dtype
    assert torch.equal(v["attn.in"], blk.norm1(v["resid_pre"]) * (1 + a["scale_msa"]) + a["shift_msa"])
    assert torch.equal(v["resid_post"], a["gate_mlp"] * v["mlp.out"] + v["resid_cross"])


def test_cli_capture_with_a_prompt_embeddings_file(loaded, tmp_path):
    import numpy as np
    from typer.testing import CliRunner

    from dithooks.cli.main import app
    from dithooks.conditioning import Conditioning
    from dithooks.sampling import Sampler, SamplerSpec
    from dithooks.store.reader import open_store

    from .conformance.family_pixart import save_tiny

    model_dir = save_tiny(tmp_path / "m")
    emb, mask = prompt_embeds(2, seed=6)  # sample 1's last token is padding
    torch.save({"prompt_embeds": emb, "prompt_attention_mask": mask}, tmp_path / "prompts.pt")
    res = CliRunner().invoke(app, ["capture", "--model", str(model_dir), "--prompt-embeds", str(tmp_path / "prompts.pt"),
                                   "--seeds", "0-1", "--steps", "2", "--guidance", "2", "--hooks", "resid_post",
                                   "--dtype", "fp32", "--out", str(tmp_path / "s.zarr")])
    assert res.exit_code == 0, res.output
    hm = HookManager(loaded.transformer, loaded.adapter)  # the same weights (seed 0)
    ref, unmasked = {}, {}
    with hm.hooks(read={"blocks.1.resid_post": lambda v, c: ref.__setitem__(c.step, v.clone())}):
        Sampler(loaded, SamplerSpec("ddim", 2, guidance=2.0), hm).run(
            Conditioning(prompt_embeds=emb, extras={"prompt_attention_mask": mask}), [0, 1])
    with hm.hooks(read={"blocks.1.resid_post": lambda v, c: unmasked.__setitem__(c.step, v.clone())}):
        Sampler(loaded, SamplerSpec("ddim", 2, guidance=2.0), hm).run(Conditioning(prompt_embeds=emb), [0, 1])
    got = open_store(tmp_path / "s.zarr").select("blocks.resid_post").values
    for s in range(2):  # the file's mask was used: equal to the masked run, not to the unmasked one
        np.testing.assert_array_equal(got[s, 1].reshape(4, N, D), ref[s].numpy())
    assert np.abs(got[0, 1, 0, 1] - unmasked[0][1].numpy()).max() > 1e-6
    refused = CliRunner().invoke(app, ["capture", "--model", str(model_dir), "--class", "3", "--steps", "2",
                                       "--out", str(tmp_path / "t.zarr")])
    assert refused.exit_code != 0 and "Traceback" not in refused.output
    assert "prompt" in refused.output


def test_encode_prompts_uses_the_pipelines_encode_prompt_and_masks(loaded):
    """The plumbing only (a stand-in pipeline): real encoders need `transformers` and T5 weights."""
    from dithooks.sampling import Sampler, SamplerSpec

    calls = []

    class FakePipeline:  # PixArtAlphaPipeline.encode_prompt's signature and return order
        def encode_prompt(self, prompt, do_classifier_free_guidance=True, negative_prompt="",
                          num_images_per_prompt=1, clean_caption=False, max_sequence_length=120, **kw):
            calls.append((list(prompt), negative_prompt, max_sequence_length, do_classifier_free_guidance))
            n, L = len(prompt), max_sequence_length
            mask = torch.ones(n, L, dtype=torch.long)
            mask[:, 3:] = 0
            neg_mask = torch.zeros(n, L, dtype=torch.long)
            neg_mask[:, 0] = 1
            return (torch.full((n, L, 32), 1.0, dtype=torch.float16), mask,
                    torch.full((n, L, 32), 2.0, dtype=torch.float16), neg_mask)

    cond = loaded.adapter.encode_prompts(FakePipeline(), ["a cat", "a dog"])
    assert calls == [(["a cat", "a dog"], "", TEXT_TOKENS, True)]  # PixArt's null prompt is ""
    assert cond.prompt_embeds.dtype == torch.float32 and cond.prompt_embeds.eq(1).all()
    assert cond.negative_prompt_embeds.eq(2).all()
    assert cond.extras["prompt_attention_mask"][:, :3].eq(1).all() and cond.extras["prompt_attention_mask"][:, 3:].eq(0).all()
    assert cond.negative_extras["prompt_attention_mask"].sum() == 2
    x = Sampler(loaded, SamplerSpec("ddim", 1, guidance=2.0)).run(cond, [0, 1])  # and it samples
    assert torch.isfinite(x).all()
    loaded.adapter.encode_prompts(FakePipeline(), ["a cat", "a dog"], ["blurry"])
    assert calls[-1][1] == ["blurry", "blurry"]


# -- cross-attention values ---------------------------------------------------------------------------
def test_cross_pattern_is_the_masked_softmax_of_the_emitted_q_k(loaded):
    model = loaded.transformer
    x, t, emb, mask = inputs()
    ref = run(model, x, t, emb, mask)
    names = [f"blocks.1.cross_attn.{k}" for k in ("q", "k", "v", "logits", "pattern", "n_eff", "entropy",
                                                  "pattern_headmean")] + ["context_embed.out", "blocks.1.cross_attn.in"]
    seen, out = record(HookManager(model, loaded.adapter), names)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    v = {k.rsplit(".", 1)[-1]: val for k, val in seen.items() if ".cross_attn." in k}
    attn2 = model.transformer_blocks[1].attn2
    with torch.no_grad():  # q from the image tokens, k and v from the projected text
        heads = lambda z: z.view(B, -1, HEADS, HEAD_DIM).transpose(1, 2)  # noqa: E731
        torch.testing.assert_close(v["q"], heads(attn2.to_q(seen["blocks.1.cross_attn.in"])), atol=1e-6, rtol=0)
        torch.testing.assert_close(v["k"], heads(attn2.to_k(seen["context_embed.out"])), atol=1e-6, rtol=0)
    assert v["q"].shape == (B, HEADS, N, HEAD_DIM) and v["k"].shape == (B, HEADS, TEXT_TOKENS, HEAD_DIM)
    bias = ((1 - mask) * -10000.0)[:, None, None, :]
    logits = v["q"] @ v["k"].transpose(-1, -2) / HEAD_DIM ** 0.5 + bias
    torch.testing.assert_close(v["logits"], logits, atol=1e-4, rtol=1e-5)
    A = v["pattern"]
    torch.testing.assert_close(A, logits.softmax(-1), atol=1e-6, rtol=1e-5)
    assert A.shape == (B, HEADS, N, TEXT_TOKENS)
    assert torch.all(A[mask[:, None, None, :].expand_as(A) == 0] == 0)  # padding gets nothing
    torch.testing.assert_close(A.sum(-1), torch.ones(B, HEADS, N))
    torch.testing.assert_close(v["n_eff"], 1 / (A ** 2).sum(-1), atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(v["pattern_headmean"], A.mean(1), atol=1e-6, rtol=1e-5)
    assert all(type(b.attn2.processor).__name__ == "AttnProcessor2_0" for b in model.transformer_blocks)


def test_cross_values_intervention_and_the_uncoupled_cross_path(loaded):
    """Zero text values leave only W_O's bias; the cross path ignores g and windows, bit for bit."""
    from diffusers.models.attention_processor import AttnProcessor2_0

    from dithooks.attention.pixart_processor import HookedPixArtAttnProcessor

    model = loaded.transformer
    hm = HookManager(model, loaded.adapter)
    seen, _ = record(hm, ["blocks.0.cross_attn.out"],
                     replace={"blocks.0.cross_attn.v": lambda val, c: torch.zeros_like(val)})
    b_o = model.transformer_blocks[0].attn2.to_out[0].bias
    assert torch.equal(seen["blocks.0.cross_attn.out"], b_o.expand(B, N, D))
    attn2 = model.transformer_blocks[0].attn2
    h = torch.randn(4, N, D, generator=torch.Generator().manual_seed(3))
    text = torch.randn(4, TEXT_TOKENS, D, generator=torch.Generator().manual_seed(4))  # halves differ
    bias = ((1 - torch.cat([prompt_embeds(2)[1]] * 2)) * -10000.0)[:, None]
    own = attn2.processor
    assert isinstance(own, AttnProcessor2_0)
    try:
        with torch.no_grad():
            plain = attn2(h, encoder_hidden_states=text, attention_mask=bias)
            attn2.set_processor(HookedPixArtAttnProcessor(0, coupling=0.7, window=0))
            hooked = attn2(h, encoder_hidden_states=text, attention_mask=bias)
    finally:
        attn2.set_processor(own)
    assert torch.equal(hooked, plain)


def test_replica_jvp_of_a_coupled_block_equals_finite_differences_of_the_pair(loaded):
    """jvp.full along the replica difference at g = 0.4: half the difference of the coupled pair's
    outputs, differentiated (cross-attention uncoupled), against a float64 central difference."""
    import copy

    from dithooks.attention.pixart_processor import HookedPixArtAttnProcessor
    from dithooks.conditioning import Conditioning
    from dithooks.sampling import ReplicaSpec, Sampler, SamplerSpec

    model, g = loaded.transformer, 0.4
    blk = model.transformer_blocks[1]
    calls = []
    handle = blk.register_forward_pre_hook(lambda m, a, kw: calls.append((a, dict(kw))), with_kwargs=True)
    hm = HookManager(model, loaded.adapter)
    hm.extension("jvp").configure(direction="replica")
    emb, mask = prompt_embeds(1, seed=2)
    seen = {}
    keep = lambda v, c: None if c.name in seen else seen.__setitem__(c.name, v.clone())  # noqa: E731
    try:
        with hm.hooks(read={"blocks.1.jvp.full": keep, "blocks.1.jvp.point": keep, "blocks.1.jvp.direction": keep}):
            Sampler(loaded, SamplerSpec("ddim", 1), hm, replicas=ReplicaSpec(kappa=0.3, g=g)).run(
                Conditioning(prompt_embeds=emb, extras={"prompt_attention_mask": mask}), [5])
    finally:
        handle.remove()
    (args, kwargs) = calls[0]
    p, d = seen["blocks.1.jvp.point"].double(), seen["blocks.1.jvp.direction"].double()
    assert p.shape == (1, N, D) and d.abs().max() > 0
    b64 = copy.deepcopy(blk).double()
    proc = HookedPixArtAttnProcessor(1, coupling=g)
    b64.attn1.set_processor(proc)
    b64.attn2.set_processor(proc)
    kw64 = {k: (v.double() if torch.is_tensor(v) and v.is_floating_point() else v) for k, v in kwargs.items()}

    def half_difference(eps):
        with torch.no_grad():
            out = b64(torch.cat([p + eps * d, p - eps * d]), *args[1:], **kw64)
        return (out[:1] - out[1:]) / 2

    eps = 1e-4
    fd = (half_difference(eps) - half_difference(-eps)) / (2 * eps)
    torch.testing.assert_close(seen["blocks.1.jvp.full"].double(), fd, atol=2e-5, rtol=1e-4)
