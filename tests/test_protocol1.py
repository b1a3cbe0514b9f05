"""Protocol I: fits, bootstrap, coarse/fine discrepancies, agreement, the sampling shortcuts,
resume, the store and the command line."""

import json
import math

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from dithooks.errors import DithooksError
from dithooks.protocols.encoders import PixelEncoder, cosine_agreement, make_encoder
from dithooks.protocols.fits import fit_curves, fit_sigmoid, sigmoid
from dithooks.protocols.pixels import coarse_fine
from dithooks.protocols.protocol1 import (Protocol1, Protocol1Interrupted, Protocol1Request, parse_s_star,
                                          read_t_spec)
from dithooks.sampling import ReplicaSpec, Sampler, SamplerSpec

pytestmark = pytest.mark.usefixtures("one_torch_thread")
X = np.arange(0, 101, 10, dtype=float)


# -- fits ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("start,end,mid,width", [(0.3, 0.9, 37.3, 6.0), (1.0, 0.1, 62.0, 3.0), (0.8, 0.95, 51.7, 12.0)])
def test_sigmoid_fit_recovers_known_parameters(start, end, mid, width):
    f = fit_sigmoid(X, sigmoid(X, start, end, mid, width))
    assert f.ok, f.reason
    assert f.midpoint == pytest.approx(mid, abs=0.06)  # grid resolution: range / 2000
    assert f.start == pytest.approx(start, abs=2e-3) and f.end == pytest.approx(end, abs=2e-3)
    assert f.width == pytest.approx(width, rel=0.03)


def test_sigmoid_fit_agrees_with_scipy_on_noisy_data():
    from scipy.optimize import curve_fit

    rng = np.random.default_rng(3)
    for _ in range(3):
        y = sigmoid(X, 0.2, 0.9, 44.0, 7.0) + 0.03 * rng.standard_normal(len(X))
        p, _ = curve_fit(sigmoid, X, y, p0=[0.2, 0.9, 40, 5])
        f = fit_sigmoid(X, y)
        assert f.midpoint == pytest.approx(p[2], abs=0.1)
        assert f.rmse == pytest.approx(np.sqrt(np.mean((sigmoid(X, *p) - y) ** 2)), rel=0.02)


def test_step_between_samples_fits_the_middle():
    f = fit_sigmoid(X, np.where(X > 45, 1.0, 0.0))
    assert f.ok and f.midpoint == pytest.approx(45.0, abs=0.06)


@pytest.mark.parametrize("y,why", [
    (np.full(11, 0.7), "flat curve"),
    (sigmoid(X, 0.0, 1.0, 160.0, 10.0), "outside the sampled"),  # the rise starts after the last s*
    (np.array([0.0, 0.1, 0.9] + [np.nan] * 8), "only 3 finite points"),
])
def test_degenerate_curves_are_nan_with_a_reason(y, why):
    f = fit_sigmoid(X, y)
    assert not f.ok and math.isnan(f.midpoint) and why in f.reason


def test_flat_within_noise():
    f = fit_sigmoid(X, sigmoid(X, 0.5, 0.51, 50, 5), noise=0.01)
    assert not f.ok and "noise" in f.reason


def test_bootstrap_ci_contains_the_truth_and_is_reproducible():
    """Six synthetic data sets (16 pairs, noise 0.06): a 95% interval must hold the true midpoint
    (and the true gap) in at least 5 of them (P(<= 4 of 6) = 0.2% for an exact 95% interval)."""
    truth = {"a": 38.0, "b": 57.0, "gap": 19.0}
    hits = {k: 0 for k in truth}
    for seed in range(6):
        rng = np.random.default_rng(seed)
        a = sigmoid(X, 0.2, 0.9, truth["a"], 8.0)[None] + 0.06 * rng.standard_normal((16, len(X)))
        b = sigmoid(X, 1.0, 0.2, truth["b"], 8.0)[None] + 0.06 * rng.standard_normal((16, len(X)))
        r = fit_curves(X, {"a": a, "b": b}, n_boot=80, seed=5, differences={"gap": ("b", "a")})
        for k in truth:
            ci = r[k]["ci"]
            assert ci.reason is None and ci.n_ok >= 76 and ci.high - ci.low < 15
            hits[k] += ci.low < truth[k] < ci.high
    assert all(h >= 5 for h in hits.values()), hits
    again = fit_curves(X, {"a": a, "b": b}, n_boot=80, seed=5, differences={"gap": ("b", "a")})
    assert again["gap"]["ci"] == r["gap"]["ci"]  # a fixed RNG seed


def test_bootstrap_of_a_flat_curve_gives_no_interval():
    r = fit_curves(X, {"a": np.full((5, len(X)), 0.4)}, n_boot=20)
    assert math.isnan(r["a"]["value"]) and math.isnan(r["a"]["ci"].low) and "flat" in r["a"]["ci"].reason


# -- coarse / fine, agreement ------------------------------------------------------------------------
def _np_adaptive_pool(x, s):
    """PyTorch's adaptive average pooling bins: [floor(i H / s), ceil((i + 1) H / s))."""
    n, c, h, w = x.shape
    out = np.zeros((n, c, s, s))
    for i in range(s):
        for j in range(s):
            r0, r1 = (i * h) // s, -((-(i + 1) * h) // s)
            c0, c1 = (j * w) // s, -((-(j + 1) * w) // s)
            out[:, :, i, j] = x[:, :, r0:r1, c0:c1].mean((2, 3))
    return out


def _np_bilinear(p, h, w):
    """Bilinear upsampling, align_corners=False (half-pixel centres, edges clamped)."""
    s_h, s_w = p.shape[-2:]

    def axis(n_out, n_in):
        src = np.clip((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0, None)
        i0 = np.minimum(np.floor(src).astype(int), n_in - 1)
        i1 = np.minimum(i0 + 1, n_in - 1)
        return i0, i1, src - i0

    r0, r1, fr = axis(h, s_h)
    c0, c1, fc = axis(w, s_w)
    top = p[..., r0, :] * (1 - fr)[:, None] + p[..., r1, :] * fr[:, None]
    return top[..., c0] * (1 - fc) + top[..., c1] * fc


@pytest.mark.parametrize("shape,size", [((3, 1, 8, 8), 2), ((2, 3, 6, 6), 4), ((2, 1, 8, 8), 3)])
def test_coarse_fine_against_numpy(shape, size):
    g = torch.Generator().manual_seed(0)
    xa, xb = torch.rand(shape, generator=g), torch.rand(shape, generator=g)
    dc, df = coarse_fine(xa, xb, size)
    a, b = xa.double().numpy(), xb.double().numpy()
    up = lambda x: _np_bilinear(_np_adaptive_pool(x, size), *x.shape[-2:])  # noqa: E731
    coarse = up(a) - up(b)
    fine = (a - up(a)) - (b - up(b))
    np.testing.assert_allclose(dc.numpy(), np.sqrt((coarse ** 2).sum((1, 2, 3))), rtol=1e-5)
    np.testing.assert_allclose(df.numpy(), np.sqrt((fine ** 2).sum((1, 2, 3))), rtol=1e-5)
    # the two parts add up to the difference: |d|^2 = Dc^2 + Df^2 + 2 <coarse, fine>
    d2 = ((a - b) ** 2).sum((1, 2, 3))
    cross = (coarse * fine).sum((1, 2, 3))
    np.testing.assert_allclose(d2, dc.double().numpy() ** 2 + df.double().numpy() ** 2 + 2 * cross, rtol=1e-5)
    zc, zf = coarse_fine(xa, xa.clone(), size)
    assert torch.all(zc == 0) and torch.all(zf == 0)


def test_coarse_size_must_be_smaller_than_the_image():
    x = torch.rand(1, 1, 8, 8)
    with pytest.raises(DithooksError, match="coarse size"):
        coarse_fine(x, x, 8)


def test_agreement_of_identical_samples_is_one():
    imgs = torch.rand(4, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    enc = make_encoder("digits", image_shape=(1, 8, 8))
    f = enc.features(imgs)
    np.testing.assert_allclose(cosine_agreement(f, f.clone()).numpy(), 1.0, atol=1e-6)
    p = PixelEncoder().features(imgs)
    np.testing.assert_allclose(cosine_agreement(p, p).numpy(), 1.0, atol=1e-6)
    other = torch.rand(4, 64, generator=torch.Generator().manual_seed(2))
    expect = (p * other).sum(1) / (p.norm(dim=1) * other.norm(dim=1))
    np.testing.assert_allclose(cosine_agreement(p, other).numpy(), expect.numpy(), rtol=1e-5)
    assert math.isnan(cosine_agreement(torch.zeros(1, 3), torch.ones(1, 3)).item())


# -- sampling ---------------------------------------------------------------------------------------
def test_g0_coupled_runs_equal_independent_runs(tiny_loaded):
    spec = SamplerSpec("ddim", 6, eta=1.0)
    free = Sampler(tiny_loaded, spec, replicas=ReplicaSpec(g=0.0)).run([1, 2], [0, 1])
    for s in (0, 3, 6):
        x = Sampler(tiny_loaded, spec, replicas=ReplicaSpec(g=0.0, couple_until=s)).run([1, 2], [0, 1])
        assert torch.equal(x, free)


def test_replica_noise_streams_are_independent(tiny_loaded, tmp_path):
    """b's sampler noise must not replay a's generator (the one that drew the start z, eta)."""
    p = Protocol1(_tiny_request(), tmp_path / "s.zarr", loaded=tiny_loaded)
    gens = p.start.generators()
    M = p.request.pairs
    for m, seed in enumerate(p.request.seeds):
        replay = torch.randn(4 * 8 * 8 * 6, generator=torch.Generator().manual_seed(seed))  # start + 4 steps
        b = torch.randn(4 * 8 * 8, generator=gens[M + m])
        a = torch.randn(4 * 8 * 8, generator=gens[m])
        assert not torch.equal(a, b)
        assert not any(torch.equal(b, replay[k:k + 256]) for k in range(0, len(replay) - 255, 256))


def _tiny_request(**kw):
    base = dict(model="tiny", g=(0.0, 0.6), s_star=(0, 2, 4, 6), pairs=3, steps=6, labels=(1,), encoder="pixels",
                bootstrap=40, kappa=0.5)
    base.update(kw)
    return Protocol1Request(**base)


@pytest.fixture(scope="module")
def tiny_run(tiny_loaded, tmp_path_factory):
    out = tmp_path_factory.mktemp("p1") / "p1.zarr"
    summary = Protocol1(_tiny_request(), out, loaded=tiny_loaded).run(estimate=False)
    return out, summary


def test_snapshot_shortcut_equals_direct_runs(tiny_run, tiny_loaded):
    """Cells continue from snapshots of one coupled prefix; a run coupled until s* from the start
    (and, for the control, sharing noise until s*) gives the same numbers."""
    import zarr

    out, _ = tiny_run
    grp = zarr.open_group(str(out), mode="r")
    req = _tiny_request()
    p = Protocol1.__new__(Protocol1)  # only for measure() and initial_state(): as in the run
    p.loaded, p.request, p.encoder = tiny_loaded, Protocol1Request(**{**req.__dict__, "coarse_size": 2}), PixelEncoder()
    p.hm, p.device = None, torch.device("cpu")
    start, _ = p.initial_state()
    spec = SamplerSpec("ddim", req.steps, req.eta)
    for s_idx, s in enumerate(req.s_star):
        for prefix, rep in (("", ReplicaSpec(req.kappa, 0.6, couple_until=s)),
                            ("control_", ReplicaSpec(req.kappa, 0.0, share_noise_until=s))):
            x = Sampler(tiny_loaded, spec, replicas=rep).run(list(req.pair_labels), req.seeds, state=start)
            m = p.measure(x)
            stored = grp[prefix + "agreement"][...]
            stored = stored[1, s_idx] if not prefix else stored[s_idx]
            np.testing.assert_array_equal(stored, m["agreement"].numpy())
            dfs = grp[prefix + "d_fine"][...]
            np.testing.assert_array_equal(dfs[1, s_idx] if not prefix else dfs[s_idx], m["d_fine"].numpy())


def test_store_layout_summary_and_t_spec(tiny_run):
    import xarray as xr

    out, summary = tiny_run
    ds = xr.open_zarr(out)
    assert ds["agreement"].dims == ("g", "s_star", "pair") and ds["control_d_coarse"].dims == ("s_star", "pair")
    assert ds["fit_midpoint"].dims == ("g", "quantity") and list(ds["quantity"].values) == ["agreement", "d_coarse", "d_fine", "gap"]
    assert ds["images"].dims == ("g", "s_star", "replica", "pair", "channel", "y", "x")
    assert bool(ds["cell_done"].all()) and bool(ds["control_done"].all())
    # g = 0 is the independent baseline at every s*; s* = 0 is the same run for every g
    a = ds["agreement"].values
    assert np.array_equal(a[0], np.repeat(a[0, :1], 4, 0)) and np.array_equal(a[1, 0], a[0, 0])
    np.testing.assert_allclose(ds["d_fine_norm"].values, ds["d_fine"].values / ds["d_fine"].values[:, :1], rtol=1e-6)
    meta = ds.attrs["dithooks"]
    assert meta["kind"] == "protocol1" and meta["status"] == "complete"
    assert meta["cells"]["done"] == meta["cells"]["total"] == 12
    s = meta["summary"]
    assert s["tables"][0]["rows"][0]["g"] == "0" and "flat" in s["tables"][0]["rows"][0]["note"]
    assert all((out / f).is_file() and (out / f).with_suffix(".png").is_file() for f in s["figures"])
    t = read_t_spec(out)
    assert set(t) == {0.0, 0.6} and math.isnan(t[0.0])
    assert (t[0.6] == summary["fits"]["0.6"]["agreement"]["midpoint"]) or (math.isnan(t[0.6]))


def test_resume_after_interruption_gives_the_same_numbers(tiny_run, tiny_loaded, tmp_path):
    import zarr

    ref, _ = tiny_run
    out = tmp_path / "broken.zarr"

    class StopAt:
        def __init__(self, n):
            self.n = n

        def update(self, k):
            self.n -= k
            if self.n <= 0:
                raise KeyboardInterrupt

    with pytest.raises(Protocol1Interrupted, match="holds 8 of 12 cells"):
        Protocol1(_tiny_request(), out, loaded=tiny_loaded).run(bar=StopAt(15), estimate=False, plots=False)
    meta = zarr.open_group(str(out), mode="r").attrs["dithooks"]
    assert meta["status"] == "interrupted" and meta["cells"]["done"] == 8
    with pytest.raises(DithooksError, match="already exists .*8 of 12 cells.*--resume"):
        Protocol1(_tiny_request(), out, loaded=tiny_loaded)
    Protocol1(None, out, mode="resume", loaded=tiny_loaded).run(estimate=False, plots=False)
    a, b = zarr.open_group(str(ref), mode="r"), zarr.open_group(str(out), mode="r")
    for name in ("agreement", "d_coarse", "d_fine", "control_d_fine", "images", "fit_midpoint", "fit_ci_low",
                 "control_fit_midpoint"):
        np.testing.assert_array_equal(a[name][...], b[name][...], err_msg=name)


# -- the embedded model ------------------------------------------------------------------------------
def test_full_coupling_raises_agreement_on_the_embedded_model(tmp_path):
    req = Protocol1Request(g=(1.0,), s_star=(0, 8), pairs=6, steps=8, control=False, bootstrap=0, images=False)
    Protocol1(req, tmp_path / "e.zarr").run(estimate=False, plots=False)
    import zarr

    grp = zarr.open_group(str(tmp_path / "e.zarr"), mode="r")
    agree, dfine = grp["agreement"][0], grp["d_fine_norm"][0]
    assert np.median(agree[1]) > np.median(agree[0])
    assert np.median(dfine[1]) < 1.0


# -- parsing and the command line ---------------------------------------------------------------------
def test_s_star_grids():
    assert parse_s_star("0,5,10", 100) == (0, 5, 10)
    assert parse_s_star("5,10", 100) == (0, 5, 10)  # the baseline is always there
    assert parse_s_star("0:100:25", 100) == (0, 25, 50, 75, 100)
    assert parse_s_star("6", 100) == (0, 20, 40, 60, 80, 100)


runner = CliRunner()


def cli(*args):
    from dithooks.cli.main import app

    return runner.invoke(app, [str(a) for a in args])


def test_cli_prints_table_and_json(tiny_model_dir, tmp_path):
    out = tmp_path / "c.zarr"
    r = cli("protocol1", "--model", tiny_model_dir, "--encoder", "pixels", "--g", "0.5", "--s-star", "0,3,6",
            "--pairs", "2", "--steps", "6", "--bootstrap", "10", "--no-control", "--no-images", "--no-plots", "--out", out, "-q")
    assert r.exit_code == 0, r.output
    assert "t_spec [95% CI]" in r.output and "figures:" not in r.output
    j = json.loads(cli("protocol1", "--from", out, "--json").output)
    assert [row["g"] for row in j["table"]] == [0.5] and j["request"]["steps"] == 6
    assert set(j["table"][0]) >= {"t_spec", "t_spec_ci", "s_coarse", "s_fine", "gap", "gap_ci", "note"}


@pytest.mark.parametrize("args,msg", [
    (("--g", "0,1.5"), "coupling g must lie in [0, 1]"),
    (("--g", "a"), "malformed coupling grid"),
    (("--s-star", "0,20"), "outside 0-6"),
    (("--s-star", "1:x"), "malformed s* grid"),
    (("--pairs", "0"), "at least 1 pair"),
    (("--encoder", "clip"), "unknown encoder"),
    (("--encoder", "digits"), "8x8 one-channel"),
    (("--encoder", "resnet50", "--encoder-weights", "/nonexistent.pth"), "resnet50"),
    (("--coarse-size", "8"), "coarse size 8"),
    (("--class", "12"), "out of range"),
    (("--eta", "2"), "eta"),
    (("--resume", "--overwrite"), "exclude"),
])
def test_cli_bad_inputs_are_one_line(args, msg, tiny_model_dir, tmp_path):
    r = cli("protocol1", "--model", tiny_model_dir, "--encoder", "pixels", "--steps", "6", "--out", tmp_path / "x.zarr",
            *args)
    assert r.exit_code == 2, r.output
    assert msg in r.output and "Traceback" not in r.output
    assert len([ln for ln in r.output.splitlines() if ln.startswith("dithooks: error:")]) == 1
    assert not (tmp_path / "x.zarr").exists()


def test_cli_store_errors(tiny_run, tiny_model_dir, tmp_path):
    out, _ = tiny_run
    for args, msg in ((("--out", out), "already exists"),
                      (("--out", tmp_path / "none.zarr", "--resume"), "no store"),
                      (("--out", out, "--resume", "--g", "0.3"), "cannot resume"),
                      (("--from", tmp_path / "none.zarr"), "no store")):
        r = cli("protocol1", "--model", tiny_model_dir, *args)
        assert r.exit_code == 2 and msg in r.output and "Traceback" not in r.output, r.output
