"""Capture for text-conditioned families (PixArt-α, SD3): prompt embeddings from a file, the
``prompt`` coordinate, the embeddings' sha256 in the metadata, text/joint dims sized from the
geometry, resume. Tiny random-init models from tests/conformance (built from configs)."""

import hashlib

import numpy as np
import pytest
import torch

from dithooks.capture import CaptureConfig, CaptureSession, capture
from dithooks.conditioning import Conditioning
from dithooks.errors import DithooksError, StoreError
from dithooks.sampling import Sampler, SamplerSpec
from dithooks.store.reader import open_store
from dithooks.store.verify import verify_store

from .conformance import family_pixart, family_sd3
from .test_capture import Interrupt, assert_stores_equal


@pytest.fixture(scope="module")
def pixart(tmp_path_factory):
    return family_pixart.make_tiny(tmp_path_factory.mktemp("pixart"))


@pytest.fixture(scope="module")
def sd3(tmp_path_factory):
    return family_sd3.make_tiny(tmp_path_factory.mktemp("sd3"))


def save_embeds(path, cond: Conditioning):
    data = {k: getattr(cond, k) for k in ("prompt_embeds", "pooled_prompt_embeds") if getattr(cond, k) is not None}
    torch.save(data, str(path))
    return path


def sha256(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def pixart_config(out, emb, **kw):
    base = dict(out=str(out), layers="all", hooks=("resid_post", "cross_attn.out", "final.out"),
                sampler=SamplerSpec("ddim", 4, eta=1.0, guidance=2.0), seeds=(0, 1),
                storage_dtype="fp32", conditioning=str(emb))
    base.update(kw)
    return CaptureConfig(**base)


def test_pixart_capture_stores_what_the_blocks_compute(tmp_path, pixart):
    emb = save_embeds(tmp_path / "emb.pt", family_pixart.conditioning(3))
    spec = SamplerSpec("ddim", 4, eta=1.0, guidance=2.0)
    # independent reference: plain torch forward hooks on the blocks during a run without dithooks hooks
    cond = Conditioning(prompt_embeds=torch.load(emb)["prompt_embeds"][[2, 0]])
    ref: dict[int, list[torch.Tensor]] = {0: [], 1: []}
    handles = [pixart.transformer.transformer_blocks[i].register_forward_hook(
        lambda m, a, out, i=i: ref[i].append(out.detach().clone())) for i in (0, 1)]
    try:
        plain = Sampler(pixart, spec).run(cond, [0, 1])
    finally:
        for h in handles:
            h.remove()
    res = capture(pixart_config(tmp_path / "s.zarr", emb, prompts=(2, 0)), loaded=pixart)
    assert res.steps_run == 4
    s = open_store(tmp_path / "s.zarr")
    assert s.meta["status"] == "complete"
    # the prompt coordinate replaces label; the embeddings are named by their sha256
    assert s.meta["labels"] is None and s.meta["prompts"] == [2, 0]
    assert s.meta["prompt_embeds"]["sha256"] == sha256(emb)
    assert s.meta["prompt_embeds"]["rows"] == 3 and s.meta["prompt_embeds"]["shape"] == [3, 8, 32]
    assert s.meta["prompt_embeds_file"] == str(emb)
    assert list(s.coord("prompt")) == [2, 0] and list(s.coord("seed")) == [0, 1]
    assert not (tmp_path / "s.zarr" / "label").exists()
    got = s.select("blocks.resid_post")
    assert got.dims == ("step", "layer", "cfg", "sample", "token", "channel")
    N, D = pixart.adapter.geometry.num_tokens, pixart.adapter.geometry.width
    assert got.values.shape == (4, 2, 2, 2, N, D)
    for step in range(4):
        for layer in (0, 1):
            np.testing.assert_array_equal(got.values[step, layer].reshape(4, N, D), ref[layer][step].numpy())
    np.testing.assert_array_equal(s.select("latents").values[-1], plain.numpy())
    # the arrays' coordinates name the prompt (xarray attaches them)
    assert "prompt" in s.array_meta("blocks.resid_post").attrs["coordinates"].split()
    assert verify_store(tmp_path / "s.zarr").ok


def test_pixart_capture_resumes_to_the_same_store(tmp_path, pixart):
    emb = save_embeds(tmp_path / "emb.pt", family_pixart.conditioning(2))
    full, part = tmp_path / "full.zarr", tmp_path / "part.zarr"
    capture(pixart_config(full, emb), loaded=pixart)
    session = CaptureSession(pixart_config(part, emb), loaded=pixart)
    session.hooks.add_hook("blocks.1.resid_post", Interrupt(2))
    with pytest.raises(StoreError, match=r"interrupted.*holds steps 0-1 .*resume"):
        session.run()
    session.hooks.remove_all()
    res = capture(pixart_config(part, emb, mode="resume"), loaded=pixart)
    assert (res.resumed_from, res.steps_run) == (2, 2)
    assert_stores_equal(full, part)


def test_resume_refuses_other_embeddings_or_prompts(tmp_path, pixart):
    emb = save_embeds(tmp_path / "emb.pt", family_pixart.conditioning(2))
    other = save_embeds(tmp_path / "other.pt", family_pixart.conditioning(2, seed=5))
    part = tmp_path / "part.zarr"
    session = CaptureSession(pixart_config(part, emb), loaded=pixart)
    session.hooks.add_hook("blocks.1.resid_post", Interrupt(1))
    with pytest.raises(StoreError):
        session.run()
    session.hooks.remove_all()
    with pytest.raises(StoreError, match="its prompt_embeds differs"):
        capture(pixart_config(part, other, mode="resume"), loaded=pixart)
    with pytest.raises(StoreError, match="its prompts differs"):
        capture(pixart_config(part, emb, mode="resume", prompts=(1, 0)), loaded=pixart)
    # the same embeddings under another name resume fine (only the sha256 is compared)
    copy = tmp_path / "copy.pt"
    copy.write_bytes(emb.read_bytes())
    assert capture(pixart_config(part, copy, mode="resume"), loaded=pixart).resumed_from == 1


def test_sd3_text_and_joint_dims_are_sized_from_the_geometry(tmp_path, sd3):
    cond = family_sd3.conditioning(2)
    hooks = ("resid_post", "context.resid_post", "attn.context_q", "attn.pattern_joint", "attn.pattern_image_text")
    cfg = CaptureConfig(out=str(tmp_path / "s.zarr"), layers="0", hooks=hooks, sampler=SamplerSpec("flow", 3),
                        seeds=(0, 1), storage_dtype="fp32", conditioning=cond)
    session = CaptureSession(cfg, loaded=sd3)
    plan = {p.name: p for p in session.planned_arrays()}
    session.run()
    s = open_store(tmp_path / "s.zarr")
    geo = sd3.adapter.geometry
    N, L = geo.num_tokens, family_sd3.TEXT_TOKENS
    for name, p in plan.items():  # the plan (from the geometry) is what was written
        assert s.array_meta(name).shape == p.shape and s.array_meta(name).dims == p.dims, name
    assert plan["blocks.attn.context_q"].dims[-2] == "text_token"
    assert plan["blocks.attn.context_q"].shape[-2] == L
    assert plan["blocks.attn.pattern_joint"].shape[-2:] == (N + L, N + L)
    assert plan["blocks.attn.pattern_image_text"].shape[-2:] == (N, L)
    # joint rows sum to 1 (an independent check of what was stored)
    joint = s.select("blocks.attn.pattern_joint").values
    np.testing.assert_allclose(joint.sum(-1), 1.0, atol=1e-5)
    # flow matching's float timesteps are kept as floats; a Conditioning passed in is hashed
    ts = s.coord("timestep")
    assert ts.dtype == np.float64
    np.testing.assert_array_equal(ts, np.asarray(Sampler(sd3, SamplerSpec("flow", 3)).timesteps))
    assert len(s.meta["prompt_embeds"]["sha256"]) == 64 and s.meta["prompt_embeds_file"] is None
    assert s.meta["prompt_embeds"]["fields"] == ["pooled_prompt_embeds"]


def test_conditioning_that_does_not_fit_is_refused_in_one_line(tmp_path, pixart, tiny_loaded):
    emb = save_embeds(tmp_path / "emb.pt", family_pixart.conditioning(3))
    out = tmp_path / "x.zarr"
    cases = [
        (dict(loaded=pixart, conditioning=None), "text-conditioned: give prompt embeddings"),
        (dict(loaded=pixart, conditioning=str(emb)), "3 prompts for 2 seeds"),
        (dict(loaded=pixart, conditioning=str(emb), prompts=(0, 3)), "prompt row 3 is out of range"),
        (dict(loaded=pixart, conditioning=str(emb), prompts=(0, 1, 2)), "3 prompt rows for 2 seeds"),
        (dict(loaded=pixart, conditioning=str(tmp_path / "none.pt")), "no prompt-embeddings file"),
        (dict(loaded=pixart, conditioning=str(emb), prompts=(0, 1), labels=(3, 4)), r"class labels \(--class\) do not apply"),
        (dict(loaded=tiny_loaded, conditioning=str(emb), prompts=(0, 1)), "class-conditional"),
    ]
    for kw, msg in cases:
        loaded = kw.pop("loaded")
        cfg = CaptureConfig(out=str(out), layers="all", sampler=SamplerSpec("ddim", 2), seeds=(0, 1), **kw)
        with pytest.raises(DithooksError, match=msg) as e:
            CaptureSession(cfg, loaded=loaded)
        assert "\n" not in str(e.value)
        assert not out.exists()


def test_a_point_only_some_blocks_have_is_stored_over_those_blocks_only(tmp_path, sd3):
    """SD3's last block (context_pre_only) has no context.resid_post: that array's layer dim runs
    over block 0 only (``layer_0``, with its own coordinate), never over uninitialised rows."""
    cond = family_sd3.conditioning(2)
    ref: dict[int, list[torch.Tensor]] = {0: [], 1: []}
    # independent reference: the blocks' own outputs, (encoder_hidden_states, hidden_states)
    handles = [sd3.transformer.transformer_blocks[i].register_forward_hook(
        lambda m, a, out, i=i: ref[i].append((out[0].detach().clone() if out[0] is not None else None,
                                              out[1].detach().clone()))) for i in (0, 1)]
    try:
        Sampler(sd3, SamplerSpec("flow", 3)).run(cond, [0, 1])
    finally:
        for h in handles:
            h.remove()
    cfg = CaptureConfig(out=str(tmp_path / "s.zarr"), layers="all", hooks=("resid_post", "context.resid_post"),
                        sampler=SamplerSpec("flow", 3), seeds=(0, 1), storage_dtype="fp32", conditioning=cond)
    session = CaptureSession(cfg, loaded=sd3)
    plan = {p.name: p for p in session.planned_arrays()}
    assert plan["blocks.context.resid_post"].dims[:2] == ("step", "layer_0")
    session.run()
    s = open_store(tmp_path / "s.zarr")
    for name, p in plan.items():
        assert s.array_meta(name).shape == p.shape and s.array_meta(name).dims == p.dims, name
    assert list(s.coord("layer")) == [0, 1] and list(s.coord("layer_0")) == [0]
    ctx = s.select("blocks.context.resid_post")
    assert ctx.dims[:2] == ("step", "layer_0") and ctx.values.shape[1] == 1
    img = s.select("blocks.resid_post")
    for step in range(3):
        np.testing.assert_array_equal(ctx.values[step, 0], ref[0][step][0].numpy())
        for layer in (0, 1):
            np.testing.assert_array_equal(img.values[step, layer], ref[layer][step][1].numpy())
    # selecting by block index works on the partial dim; a block without the point is refused
    np.testing.assert_array_equal(s.select("blocks.context.resid_post", layer=0).values, ctx.values)
    np.testing.assert_array_equal(s.select("blocks.0.context.resid_post").values, ctx.values)
    with pytest.raises(StoreError, match="layer 1 was not captured.*only in some blocks"):
        s.select("blocks.1.context.resid_post")
    assert verify_store(tmp_path / "s.zarr").ok
    xr = pytest.importorskip("xarray")
    ds = xr.open_zarr(tmp_path / "s.zarr")
    assert list(ds["blocks.context.resid_post"]["layer_0"].values) == [0]


def test_sd3_flow_capture_with_a_partial_layer_array_resumes_to_the_same_store(tmp_path, sd3):
    emb = save_embeds(tmp_path / "emb.pt", family_sd3.conditioning(2))

    def cfg(out, **kw):
        return CaptureConfig(out=str(out), layers="all", hooks=("resid_post", "context.resid_post", "attn.pattern"),
                             sampler=SamplerSpec("flow", 4, guidance=3.0), seeds=(0, 1), storage_dtype="fp32",
                             conditioning=str(emb), **kw)

    full, part = tmp_path / "full.zarr", tmp_path / "part.zarr"
    capture(cfg(full), loaded=sd3)
    session = CaptureSession(cfg(part), loaded=sd3)
    session.hooks.add_hook("blocks.1.resid_post", Interrupt(2))
    with pytest.raises(StoreError, match=r"interrupted.*holds steps 0-1 "):
        session.run()
    session.hooks.remove_all()
    res = capture(cfg(part, mode="resume"), loaded=sd3)
    assert (res.resumed_from, res.steps_run) == (2, 2)
    assert_stores_equal(full, part)
    s = open_store(part)
    assert s.array_meta("blocks.context.resid_post").dims[:4] == ("step", "layer_0", "cfg", "sample")
    assert np.isfinite(s.select("blocks.context.resid_post").values).all()


def test_probe_outputs_of_a_text_model_name_the_prompt_coordinate(tmp_path, pixart):
    emb = save_embeds(tmp_path / "emb.pt", family_pixart.conditioning(2))
    capture(pixart_config(tmp_path / "s.zarr", emb, hooks=("resid_post",), probes=("residual_norms",)), loaded=pixart)
    s = open_store(tmp_path / "s.zarr")
    probe_arrays = [n for n in s.array_names() if n.startswith("probe.residual_norms.")]
    assert probe_arrays
    for name in probe_arrays:
        m = s.array_meta(name)
        coords = m.attrs.get("coordinates", "").split()
        if "sample" in m.dims:
            assert "prompt" in coords and "label" not in coords, (name, coords)
    # residual_norms' rms equals the RMS over (token, channel) of what the store holds (fp32, recomputed)
    resid = s.select("blocks.resid_post").values.astype(np.float64)
    rms = s.select("probe.residual_norms.rms").values
    assert s.array_meta("probe.residual_norms.rms").dims == ("step", "layer", "cfg", "sample")
    np.testing.assert_allclose(rms, np.sqrt((resid ** 2).mean(axis=(-2, -1))), rtol=1e-6)
