"""Captures of replica pairs and JVP hook points: layout, equality with the sampler, resume, sizes."""

import numpy as np
import pytest
import torch

from dithooks.capture import CaptureConfig, CaptureSession, capture
from dithooks.errors import DithooksError, StoreError
from dithooks.jvp_hooks import JVPSettings
from dithooks.sampling import ReplicaSpec, Sampler, SamplerSpec
from dithooks.store.reader import open_store
from tests.test_capture import Interrupt

SPEC = SamplerSpec("ddpm", 5, guidance=2.0)  # stochastic: resume must restore both replicas' RNGs
PAIRS = ReplicaSpec(kappa=0.6, g=0.3, couple_until=3)


def config(out, model_dir, **kw):
    base = dict(out=str(out), model=str(model_dir), layers="1-2", hooks=("resid_post", "jvp.routing", "jvp.modulation"),
                sampler=SPEC, labels=(1, 2), seeds=(0, 1), storage_dtype="fp32", replicas=PAIRS)
    base.update(kw)
    return CaptureConfig(**base)


def test_replica_store_layout_and_result(tmp_path, tiny_loaded, tiny_model_dir):
    out = tmp_path / "pairs.zarr"
    capture(config(out, tiny_model_dir), loaded=tiny_loaded)
    s = open_store(out)
    assert s.array_info("blocks.resid_post").dims == ("step", "layer", "replica", "cfg", "sample", "token", "channel")
    assert s.array_info("blocks.jvp.routing").dims == ("step", "layer", "cfg", "sample", "token", "channel")
    assert s.array_info("latents").dims == ("latent_step", "replica", "sample", "latent_channel", "height", "width")
    assert s.array_info("rng_state").dims[:3] == ("latent_step", "replica", "sample")
    assert list(s.coord("replica")) == ["a", "b"]
    assert s.meta["extras"]["replicas"] == {"kappa": 0.6, "g": 0.3, "couple_until": 3, "share_noise_until": None,
                                            "layers": None}
    assert s.meta["extras"]["jvp"]["direction"] == "auto"
    final = np.asarray(s.select("latents", latent_step=5).values)
    ref = Sampler(tiny_loaded, SPEC, replicas=PAIRS).run([1, 2], [0, 1])
    np.testing.assert_array_equal(final.reshape(ref.shape), ref.numpy())


def test_replica_capture_resumes_bit_for_bit(tmp_path, tiny_loaded, tiny_model_dir):
    full = tmp_path / "full.zarr"
    capture(config(full, tiny_model_dir), loaded=tiny_loaded)
    part = tmp_path / "part.zarr"
    session = CaptureSession(config(part, tiny_model_dir), loaded=tiny_loaded)
    session.hooks.add_hook("blocks.2.resid_post", Interrupt(2))
    with pytest.raises(StoreError, match="interrupted"):
        session.run()
    session.hooks.remove_all()
    res = capture(config(part, tiny_model_dir, mode="resume"), loaded=tiny_loaded)
    assert res.resumed_from == 2
    a, b = open_store(full), open_store(part)
    for name in ("latents", "blocks.resid_post", "blocks.jvp.modulation"):
        np.testing.assert_array_equal(np.asarray(a.select(name).values), np.asarray(b.select(name).values))
    with pytest.raises(StoreError, match="extras differs"):
        capture(config(part, tiny_model_dir, mode="resume", replicas=ReplicaSpec(kappa=0.6, g=0.2, couple_until=3)),
                loaded=tiny_loaded)


def test_planned_sizes_match_what_is_written(tmp_path, tiny_loaded, tiny_model_dir):
    cfg = config(tmp_path / "p.zarr", tiny_model_dir,
                 hooks=("resid_post", "attn.pattern", "attn.pattern_query", "attn.topk_idx", "jvp.full", "final.out"),
                 query_tokens=(0, 5), top_k=3, sampler=SamplerSpec("ddim", 2, guidance=2.0))
    session = CaptureSession(cfg, loaded=tiny_loaded)
    plan = {p.name: p for p in session.planned_arrays()}
    session.run()
    s = open_store(cfg.out)
    for name, p in plan.items():
        assert tuple(s.array_info(name).dims) == p.dims, name
        assert tuple(s.array_info(name).shape) == p.shape, name
    assert plan["blocks.attn.pattern"].nbytes == 2 * 2 * 2 * 2 * 2 * 2 * 16 * 16 * 4


def test_window_and_attention_options_reach_the_processor(tmp_path, tiny_loaded, tiny_model_dir):
    out = tmp_path / "w.zarr"
    cfg = config(out, tiny_model_dir, replicas=None, hooks=("attn.pattern",), window=0, window_layers="2",
                 sampler=SamplerSpec("ddim", 1))
    capture(cfg, loaded=tiny_loaded)
    A = np.asarray(open_store(out).select("blocks.attn.pattern").values)  # (step, layer, sample, head, q, k)
    eye = np.broadcast_to(np.eye(16, dtype=A.dtype), A[0, 1].shape)
    np.testing.assert_array_equal(A[0, 1], eye)  # radius 0: each token attends itself only
    assert not np.allclose(A[0, 0], eye[..., :, :])
    assert open_store(out).meta["extras"]["attention"] == {"window": 0, "window_layers": "2"}
    assert all(type(b.attn1.processor).__name__ == "AttnProcessor2_0" for b in tiny_loaded.transformer.transformer_blocks)


@pytest.mark.parametrize("kw, msg", [
    (dict(query_tokens=(99,)), "query token 99 is out of range"),
    (dict(top_k=0), "top-k must lie in 1-16"),
    (dict(window=-1), "radius"),
    (dict(replicas=ReplicaSpec(layers=(7,))), "coupled layer 7 is out of range"),
    (dict(replicas=None, jvp=JVPSettings(direction="replica")), "needs replica pairs"),
    (dict(jvp=JVPSettings(direction="sideways")), "unknown JVP direction"),
])
def test_bad_replica_and_attention_requests_are_refused_before_touching_disk(tmp_path, tiny_loaded, tiny_model_dir,
                                                                                kw, msg):
    out = tmp_path / "bad.zarr"
    with pytest.raises(DithooksError, match=msg):
        CaptureSession(config(out, tiny_model_dir, **kw), loaded=tiny_loaded).run()
    assert not out.exists()


def test_difference_modes_on_the_replica_axis_match_numpy(tmp_path, tiny_loaded, tiny_model_dir):
    """Protocol II on a real coupled run: E_k(s) from the probe equals numpy on the stored differences."""
    out = tmp_path / "modes.zarr"
    cfg = config(out, tiny_model_dir, hooks=("resid_post",), seeds=(0, 1, 2, 3), labels=(5,),
                 sampler=SamplerSpec("ddim", 4), probes=(("difference_modes", {"pairs": "replica"}),))
    capture(cfg, loaded=tiny_loaded)
    s = open_store(out)
    h = np.asarray(s.select("blocks.resid_post").values, dtype=np.float64)  # (step, layer, replica, sample, N, D)
    E = np.asarray(s.select("probe.difference_modes.energy").values)
    for li in range(2):
        X0 = (h[0, li, 0] - h[0, li, 1]).reshape(4, -1)
        lam, U = np.linalg.eigh(X0 @ X0.T / 4)
        lam, U = lam[::-1], U[:, ::-1]
        keep = lam > np.sqrt(np.finfo(np.float64).eps) * lam[0]
        modes = (U[:, keep].T @ X0) / np.sqrt(4 * lam[keep])[:, None]
        for step in range(4):
            X = (h[step, li, 0] - h[step, li, 1]).reshape(4, -1)
            ref = ((X @ modes.T) ** 2).mean(0) / lam[keep]
            np.testing.assert_allclose(E[step, li, : keep.sum()], ref, rtol=1e-4)
    np.testing.assert_allclose(E[0, :, :4][np.isfinite(E[0, :, :4])], 1.0, rtol=1e-5)


def test_stored_direction_of_the_wrong_shape_is_refused_before_touching_disk(tmp_path, tiny_loaded, tiny_model_dir):
    out = tmp_path / "d.zarr"
    with pytest.raises(DithooksError, match=r"direction of shape \(3, 3\) does not fit"):
        CaptureSession(config(out, tiny_model_dir, replicas=None, jvp=JVPSettings(direction=torch.zeros(3, 3))),
                       loaded=tiny_loaded)
    assert not out.exists()
    ok = config(out, tiny_model_dir, replicas=None, jvp=JVPSettings(direction={1: torch.ones(16, 16), 2: torch.ones(16, 16)}))
    capture(ok, loaded=tiny_loaded)
    d = np.asarray(open_store(out).select("blocks.resid_post").values)
    assert d.shape[:2] == (5, 2)
