"""Seed 004 (THEORY §7): the local denoiser, the DDIM plan engine and the gap scan, each checked
against a plain computation written out here (a masked attention processor built by loops, DDIM
in numpy, norms in numpy)."""

from __future__ import annotations

import dataclasses
import itertools
import math

import numpy as np
import pytest
import torch

from dithooks.attention.install import installed_processors
from dithooks.errors import DithooksError, StoreError
from dithooks.locality.gaps import GapsRequest, run_gaps
from dithooks.locality.local_denoiser import Denoiser, gap_norm, local_attention, parse_radii, token_layout
from dithooks.locality.planned import GLOBAL, Plans, run_plans, uniform_plans
from dithooks.sampling import Sampler, SamplerSpec

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# -- independent pieces ------------------------------------------------------------------------
class PlainWindowProcessor:
    """Self-attention written out with a Chebyshev mask built by loops (no dithooks code)."""

    def __init__(self, radius, side):
        n = side * side
        self.allowed = torch.zeros(n, n, dtype=torch.bool)
        for i, j in itertools.product(range(n), range(n)):
            self.allowed[i, j] = radius is None or max(abs(i // side - j // side), abs(i % side - j % side)) <= radius

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kw):
        b, n, _ = hidden_states.shape
        q, k, v = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        h = attn.heads
        d = q.shape[-1] // h
        q, k, v = (z.view(b, n, h, d).transpose(1, 2) for z in (q, k, v))
        logits = (q @ k.transpose(-1, -2)) / math.sqrt(d)
        logits = logits.masked_fill(~self.allowed, float("-inf"))
        o = torch.softmax(logits, -1) @ v
        o = o.transpose(1, 2).reshape(b, n, h * d)
        return attn.to_out[1](attn.to_out[0](o))


def plain_eps(loaded, x, t, labels, radius):
    """ε from the model with the loop-built window on every block (None: plain global)."""
    model = loaded.transformer
    side = loaded.adapter.geometry.grid_side
    C = loaded.adapter.geometry.in_channels
    tt = torch.full((x.shape[0],), int(t), dtype=torch.long)
    with torch.no_grad(), installed_processors(model, range(len(model.transformer_blocks)),
                                               lambda l: PlainWindowProcessor(radius, side)):
        return model(x, timestep=tt, class_labels=torch.as_tensor(labels)).sample[:, :C].float()


def linear_alphas_cumprod():
    betas = np.linspace(1e-4, 0.02, 1000, dtype=np.float64)  # dithooks.loading.DIT_SCHEDULE
    return np.cumprod(1.0 - betas)


def leading_timesteps(steps):
    return [(steps - 1 - i) * (1000 // steps) for i in range(steps)]


def numpy_ddim(loaded, x, start, labels, cond, radius, steps, null, clip, guidance=1.0):
    """DDIM (eta 0) for one row-batch sharing a plan, written out in numpy: ε from plain_eps."""
    ac = linear_alphas_cumprod()
    ts = leading_timesteps(steps)
    x = x.double().numpy()
    for s in range(start, steps):
        t = ts[s]
        r = None if radius[s] == GLOBAL else radius[s]
        xin = torch.from_numpy(x).float()
        if cond[s]:
            eps = plain_eps(loaded, xin, t, labels, r).double().numpy()
            if guidance != 1.0:
                e0 = plain_eps(loaded, xin, t, [null] * len(labels), r).double().numpy()
                eps = e0 + guidance * (eps - e0)
        else:
            eps = plain_eps(loaded, xin, t, [null] * len(labels), r).double().numpy()
        a_t = ac[t]
        a_prev = ac[t - 1000 // steps] if t - 1000 // steps >= 0 else 1.0
        x0 = (x - math.sqrt(1 - a_t) * eps) / math.sqrt(a_t)
        if clip:
            x0 = np.clip(x0, -1, 1)
            eps = (x - math.sqrt(a_t) * x0) / math.sqrt(1 - a_t)
        x = math.sqrt(a_prev) * x0 + math.sqrt(1 - a_prev) * eps
    return x


@pytest.fixture(scope="module")
def den(tiny_loaded):
    return Denoiser(tiny_loaded)


@pytest.fixture(scope="module")
def clipped(tiny_loaded):
    """The tiny model with a clipping schedule (as the digits models have)."""
    return dataclasses.replace(tiny_loaded, scheduler_config={**tiny_loaded.scheduler_config, "clip_sample": True})


def xs(n, seed=3, c=4):
    return torch.randn(n, c, 8, 8, generator=torch.Generator().manual_seed(seed))


# -- the local denoiser ---------------------------------------------------------------------------
@pytest.mark.parametrize("radius", [3, 4, 50])
def test_radius_covering_the_grid_is_the_global_model_bit_for_bit(den, radius):
    x = xs(3)
    labels = torch.tensor([1, 7, 10])
    assert torch.equal(den.eps(x, 500, labels, radius), den.eps(x, 500, labels, None))


def test_embedded_digits_radius_side_minus_one_is_global_bit_for_bit():
    from dithooks.loading import load_model

    loaded = load_model("digits")
    d = Denoiser(loaded)
    assert d.layout.grid_side == 4 and d.layout.max_radius == 3
    x = xs(2, c=1)
    y = torch.tensor([3, 10])
    glob = d.eps(x, 700, y, None)
    assert torch.equal(d.eps(x, 700, y, 3), glob)
    assert not torch.allclose(d.eps(x, 700, y, 2), glob)  # a real window changes the score


@pytest.mark.parametrize("radius", [0, 1, 2])
def test_local_denoiser_equals_a_loop_built_mask(den, tiny_loaded, radius):
    x = xs(2)
    y = torch.tensor([2, 10])
    got = den.eps(x, 300, y, radius)
    want = plain_eps(tiny_loaded, x, 300, y, radius)
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(got, plain_eps(tiny_loaded, x, 300, y, None), atol=1e-4)


def test_window_is_restored_after_the_call(den, tiny_loaded):
    model = tiny_loaded.transformer
    before = [type(b.attn1.processor) for b in model.transformer_blocks]
    den.eps(xs(1), 10, [0], 1)
    assert [type(b.attn1.processor) for b in model.transformer_blocks] == before
    att = den.hooks.extension("attention")
    att.set_window(2, [0])
    with local_attention(den.hooks, 0):
        assert att.layer_settings(3) == (None, 0)
    assert att.window == 2 and att.window_layers == {0}
    att.set_window(None)


def test_bad_radius_and_unsupported_family(den, tiny_loaded):
    from dithooks.adapters import GenericAdapter

    with pytest.raises(DithooksError, match="non-negative"):
        den.eps(xs(1), 10, [0], -1)
    with pytest.raises(DithooksError, match="malformed radii"):
        parse_radii("0-x", den.layout)
    assert parse_radii("all", den.layout) == [0, 1, 2, 3]
    assert parse_radii("2,0", den.layout) == [0, 2]
    other = dataclasses.replace(tiny_loaded, adapter=GenericAdapter(tiny_loaded.transformer))
    with pytest.raises(DithooksError, match="MMDiT joint attention is not supported"):
        token_layout(other)


def test_gap_norm_is_l2_over_the_latent_divided_by_tokens():
    a, b = xs(3), xs(3, seed=4)
    want = np.linalg.norm((a - b).numpy().reshape(3, -1), axis=1) / 16
    assert np.allclose(gap_norm(a, b, 16).numpy(), want, rtol=1e-6)


# -- the plan engine ----------------------------------------------------------------------------
@pytest.mark.parametrize("guidance", [1.0, 3.0])
def test_always_conditioned_global_plan_reproduces_the_sampler(den, tiny_loaded, guidance):
    from dithooks.sampling import initial_state

    labels, seeds = [3, 8], [0, 1]
    ref = Sampler(tiny_loaded, SamplerSpec("ddim", 4, 0.0, guidance)).run(labels, seeds)
    x_T = initial_state(tiny_loaded, seeds).latents
    got = run_plans(den, 4, x_T, uniform_plans(labels, 4), guidance=guidance)
    assert torch.allclose(got, ref, atol=1e-5, rtol=1e-5)


def test_mixed_plans_equal_numpy_ddim_with_clipping(clipped):
    d = Denoiser(clipped)
    S = 4
    x = xs(4)
    plan_a = dict(start=0, cond=[True, False, True, False], radius=[GLOBAL, 1, 0, GLOBAL])
    plan_b = dict(start=2, cond=[False, False, False, True], radius=[0, 0, 2, 1])
    plans = Plans.cat([
        Plans(torch.tensor([1, 5]), torch.tensor([plan_a["start"]] * 2), torch.tensor([plan_a["cond"]] * 2),
              torch.tensor([plan_a["radius"]] * 2)),
        Plans(torch.tensor([2, 9]), torch.tensor([plan_b["start"]] * 2), torch.tensor([plan_b["cond"]] * 2),
              torch.tensor([plan_b["radius"]] * 2))])
    for guidance in (1.0, 2.0):
        got = run_plans(d, S, x, plans, guidance=guidance).double().numpy()
        want_a = numpy_ddim(clipped, x[:2], 0, [1, 5], plan_a["cond"], plan_a["radius"], S, 10, True, guidance)
        want_b = numpy_ddim(clipped, x[2:], 2, [2, 9], plan_b["cond"], plan_b["radius"], S, 10, True, guidance)
        assert np.allclose(got[:2], want_a, atol=2e-4), np.abs(got[:2] - want_a).max()
        assert np.allclose(got[2:], want_b, atol=2e-4), np.abs(got[2:] - want_b).max()
    assert not np.allclose(got[2:], x[2:].numpy())  # rows that start late still moved


def test_plans_check_their_shapes(den):
    with pytest.raises(DithooksError):
        Plans(torch.tensor([1, 2]), torch.tensor([0]), torch.zeros(2, 3, dtype=torch.bool), torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(DithooksError):
        run_plans(den, 5, xs(2), uniform_plans([1, 2], 4))


# -- the gap scan --------------------------------------------------------------------------------
def _gap_request(**kw):
    base = dict(model="tiny", steps=4, every=2, radii=(0, 1, 3), labels=(3, 8), seeds=(0, 1), data="random")
    base.update(kw)
    return GapsRequest(**base)


@pytest.fixture(scope="module")
def gap_data():
    g = torch.Generator().manual_seed(7)
    return torch.rand(2, 4, 8, 8, generator=g) * 2 - 1, torch.tensor([4, 6])


@pytest.fixture(scope="module")
def gap_store(den, gap_data, tmp_path_factory):
    path = tmp_path_factory.mktemp("gaps") / "g.zarr"
    return run_gaps(den, _gap_request(), path, data=gap_data)


def test_gap_store_against_plain_numpy(gap_store, tiny_loaded, gap_data):
    s = gap_store
    assert s.meta["status"] == "complete" and s.complete
    assert list(s.coord("trajectory")) == ["sampling", "training"]
    ts = leading_timesteps(4)
    assert list(s.coord("timestep")) == [ts[0], ts[2]]
    assert np.allclose(s.coord("t"), np.array([ts[0], ts[2]]) / 1000)
    # the sampling states are the ones a Sampler run passes through
    seen = []
    Sampler(tiny_loaded, SamplerSpec("ddim", 4)).run([3, 8], [0, 1], on_step=lambda k, st: seen.append(st.latents))
    assert np.allclose(s.read("xt")[0, 1], seen[1].numpy(), atol=1e-6)
    # the training states are x0 noised forward: sqrt(ac) x0 + sqrt(1 - ac) z, one z per sample
    ac = linear_alphas_cumprod()
    x0, y = gap_data
    z = torch.stack([torch.randn(4, 8, 8, generator=torch.Generator().manual_seed(k)) for k in (0, 1)]).numpy()
    for j, t in enumerate([ts[0], ts[2]]):
        want = math.sqrt(ac[t]) * x0.numpy() + math.sqrt(1 - ac[t]) * z
        assert np.allclose(s.read("xt")[1, j], want, atol=1e-5)
    assert list(s.read("label")[1]) == [4, 6] and list(s.read("label")[0]) == [3, 8]
    # every gap from plain model calls and numpy norms
    radii = [0, 1, 3]
    for k, j in itertools.product(range(2), range(2)):
        x = torch.from_numpy(s.read("xt")[k, j])
        labels = s.read("label")[k]
        t = [ts[0], ts[2]][j]
        e_c = plain_eps(tiny_loaded, x, t, labels, None).numpy()
        e_u = plain_eps(tiny_loaded, x, t, [10, 10], None).numpy()
        norm = lambda d: np.linalg.norm(d.reshape(2, -1), axis=1) / 16  # noqa: E731
        assert np.allclose(s.read("gcond")[k, j], norm(e_c - e_u), rtol=1e-4, atol=1e-6)
        assert np.allclose(s.read("eps_norm")[k, j], norm(e_c), rtol=1e-5)
        for i, r in enumerate(radii):
            l_c = plain_eps(tiny_loaded, x, t, labels, r).numpy()
            l_u = plain_eps(tiny_loaded, x, t, [10, 10], r).numpy()
            assert np.allclose(s.read("gloc")[k, j, i], norm(e_c - l_c), rtol=1e-3, atol=1e-5)
            assert np.allclose(s.read("gloc_uncond")[k, j, i], norm(e_u - l_u), rtol=1e-3, atol=1e-5)
    assert (s.read("gloc")[:, :, 2] == 0).all()  # r = 3 covers the 4x4 grid: exactly global
    assert (s.read("gloc")[:, :, 0] > 0).all()


def test_gap_store_opens_in_xarray_with_named_dims(gap_store):
    xr = pytest.importorskip("xarray")
    ds = xr.open_zarr(str(gap_store.path))
    assert ds["gloc"].dims == ("trajectory", "step", "radius", "sample")
    assert list(ds["radius"].values) == [0, 1, 3]
    assert float(ds["gloc"].sel(trajectory="training", radius=0).isel(step=0, sample=0)) > 0


class _Stop:
    """A progress bar that interrupts the run after ``after`` cells."""

    def __init__(self, after):
        self.after, self.n = after, 0

    def update(self, k):
        self.n += k
        if self.n >= self.after:
            raise KeyboardInterrupt

    def close(self):
        pass


def test_interrupted_gap_scan_resumes_to_the_unbroken_result(den, gap_data, gap_store, tmp_path):
    path = tmp_path / "g.zarr"
    with pytest.raises(KeyboardInterrupt):
        run_gaps(den, _gap_request(), path, data=gap_data, progress=lambda total: _Stop(3))
    from dithooks.locality.store import read_meta
    assert read_meta(path)["status"] == "interrupted"
    with pytest.raises(StoreError, match="already exists"):
        run_gaps(den, _gap_request(), path, data=gap_data)
    with pytest.raises(StoreError, match="every differs"):
        run_gaps(den, _gap_request(every=1), path, mode="resume", data=gap_data)
    s = run_gaps(den, _gap_request(), path, mode="resume", data=gap_data)
    assert s.meta["status"] == "complete" and len(s.meta["runs"]) == 2
    for name in ("gcond", "gloc", "gloc_uncond", "xt"):
        assert np.array_equal(s.read(name), gap_store.read(name)), name


def test_gap_scan_refuses_bad_requests(den, gap_data, tmp_path):
    (tmp_path / "notastore").mkdir()
    (tmp_path / "notastore" / "file.txt").write_text("keep me")
    with pytest.raises(StoreError, match="not a dithooks store"):
        run_gaps(den, _gap_request(), tmp_path / "notastore", mode="overwrite", data=gap_data)
    assert (tmp_path / "notastore" / "file.txt").exists()
    with pytest.raises(StoreError, match="nothing to resume"):
        run_gaps(den, _gap_request(), tmp_path / "none.zarr", mode="resume", data=gap_data)
    with pytest.raises(DithooksError, match="training trajectory needs data"):
        run_gaps(den, _gap_request(), tmp_path / "a.zarr")
    with pytest.raises(DithooksError, match="unknown trajectory"):
        run_gaps(den, _gap_request(trajectories=("sampled",)), tmp_path / "b.zarr")
    with pytest.raises(DithooksError, match="one label per sample"):
        run_gaps(den, _gap_request(labels=(1,)), tmp_path / "c.zarr", data=gap_data)


def test_an_8x8_token_grid_like_digits64():
    """patch 1 on 8x8 images: 64 tokens, radii 0-7; r = 7 is global bit for bit, r = 2 the loop mask."""
    from dithooks.loading import LoadedModel, DIT_SCHEDULE
    from dithooks.adapters import adapter_for

    from .conftest import make_tiny_dit

    model = make_tiny_dit(num_layers=2, in_channels=1, out_channels=1, patch_size=1)
    loaded = LoadedModel(model, adapter_for(model), "tiny64", "test", dict(DIT_SCHEDULE))
    d = Denoiser(loaded)
    assert (d.layout.grid_side, d.num_tokens) == (8, 64)
    assert parse_radii("all", d.layout) == list(range(8))
    x, y = xs(2, c=1), torch.tensor([4, 10])
    assert torch.equal(d.eps(x, 400, y, 7), d.eps(x, 400, y, None))
    assert torch.allclose(d.eps(x, 400, y, 2), plain_eps(loaded, x, 400, y, 2), atol=1e-5, rtol=1e-5)
