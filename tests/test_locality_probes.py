"""Seed 004's integrated probes (forward-backward, windowed), the Fréchet distance, the window
summaries and the ``dithooks locality`` commands, against plain computations."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from dithooks.errors import DithooksError
from dithooks.locality.forward_backward import (ForwardBackwardRequest, binomial_sigma, fb_metrics, level_steps,
                                                run_forward_backward)
from dithooks.locality.frechet import (bootstrap_frechet, feature_extractor, frechet_distance, frechet_features,
                                       gaussian_stats)
from dithooks.locality.local_denoiser import Denoiser
from dithooks.locality.planned import GLOBAL
from dithooks.locality.summary import half_max_window, overlap, summarize, threshold_crossing
from dithooks.locality.windowed import (WindowedRequest, inside_mask, run_windowed, window_plans, window_starts,
                                        windowed_metrics)

from .test_locality import leading_timesteps, linear_alphas_cumprod, numpy_ddim

pytestmark = pytest.mark.usefixtures("one_torch_thread")


class FakeClassifier(torch.nn.Module):
    """A fixed random linear judge of (n, 4, 8, 8) images: logits and 'features'."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(11)
        self.w = torch.randn(256, 6, generator=g)
        self.h = torch.randn(6, 10, generator=g)

    def features(self, x):
        return torch.relu(x.flatten(1) @ self.w)

    def forward(self, x):
        return self.features(x) @ self.h


@pytest.fixture(scope="module")
def den(tiny_loaded):
    return Denoiser(tiny_loaded)


# -- forward-backward ------------------------------------------------------------------------------
def test_level_steps_and_binomial_sigma():
    assert level_steps(20, 10) == list(range(0, 20, 2))
    assert level_steps(4, 4) == [0, 1, 2, 3] and level_steps(10, 1) == [0]
    with pytest.raises(DithooksError):
        level_steps(10, 11)
    assert np.isclose(binomial_sigma(0.3, 50), math.sqrt(0.3 * 0.7 / 50))
    assert binomial_sigma(0.0, 10) == 0 and binomial_sigma(1.0, 10) == 0


def test_forward_backward_against_numpy_ddim(den, tiny_loaded, tmp_path):
    g = torch.Generator().manual_seed(5)
    x0, y = torch.rand(3, 4, 8, 8, generator=g) * 2 - 1, torch.tensor([1, 2, 3])
    clf = FakeClassifier()
    req = ForwardBackwardRequest("tiny", steps=4, levels=(1, 3), radii=(GLOBAL, 0), seeds=(0, 1, 2))
    store = run_forward_backward(den, clf, req, x0, y, tmp_path / "fb.zarr", batch_rows=6)
    assert store.complete
    ac, ts = linear_alphas_cumprod(), leading_timesteps(4)
    z = torch.stack([torch.randn(4, 8, 8, generator=torch.Generator().manual_seed(s + 1_000_003)) for s in (0, 1, 2)])
    res, pred, mse = store.read("result"), store.read("pred"), store.read("mse")
    for m, radius in enumerate((GLOBAL, 0)):
        for l, s in enumerate((1, 3)):
            t = ts[s]
            xt = math.sqrt(ac[t]) * x0.double() + math.sqrt(1 - ac[t]) * z.double()
            want = numpy_ddim(tiny_loaded, xt.float(), s, [0, 0, 0], [False] * 4, [radius] * 4, 4, 10, False)
            want = np.clip(want, -1, 1)
            assert np.allclose(res[m, l], want, atol=2e-4), (m, l, np.abs(res[m, l] - want).max())
            assert np.array_equal(pred[m, l], clf(torch.from_numpy(res[m, l])).argmax(1).numpy())
            assert np.allclose(mse[m, l], ((res[m, l] - x0.numpy()) ** 2).reshape(3, -1).mean(1), rtol=1e-5)
    met = fb_metrics(store)
    p = (pred != y.numpy()).mean(-1)
    assert np.allclose(met["error"], p) and np.allclose(met["sigma"], np.sqrt(p * (1 - p) / 3))
    assert list(store.coord("denoise_steps")) == [3, 1]
    assert list(store.coord("mode")) == ["global", "r0"]
    summary = summarize(store.path)
    assert summary["figures"] == ["figures/forward_backward.svg"]
    assert (store.path / "figures" / "forward_backward.png").exists()
    assert len(summary["tables"][1]["rows"]) == 4


# -- windowed -----------------------------------------------------------------------------------------
def test_window_starts_and_inside_mask():
    assert window_starts(0.2, 0.1) == [round(0.1 * i, 10) for i in range(10)]
    assert window_starts(0.5, 0.5) == [0.0, 0.5]
    t = np.array([0.999, 0.749, 0.499, 0.249])
    for t0, t1 in ((0.0, 0.3), (0.2, 0.5), (0.7, 1.0), (0.9, 1.0)):
        assert list(inside_mask(t, t0, t1)) == [t0 <= v <= t1 for v in t]
    with pytest.raises(DithooksError):
        window_starts(0.0, 0.1)


def test_window_plans():
    labels = torch.tensor([4, 5])
    ins = np.array([False, True, True, False])
    p = window_plans(labels, ins, "conditioning", None, False)
    assert p.cond.tolist() == [[False, True, True, False]] * 2 and (p.radius == GLOBAL).all()
    p = window_plans(labels, ins, "global", 1, False)
    assert p.cond.tolist() == [[False, True, True, False]] * 2
    assert p.radius.tolist() == [[1, GLOBAL, GLOBAL, 1]] * 2
    p = window_plans(labels, ins, "global", 0, True)
    assert p.cond.all() and p.radius.tolist() == [[0, GLOBAL, GLOBAL, 0]] * 2
    with pytest.raises(DithooksError, match="radius"):
        window_plans(labels, ins, "global", None, False)


@pytest.mark.parametrize("inside", ["conditioning", "global"])
def test_windowed_against_numpy_ddim(den, tiny_loaded, tmp_path, inside):
    from dithooks.sampling import initial_state

    clf = FakeClassifier()
    req = WindowedRequest("tiny", inside=inside, steps=4, width=0.3, stride=0.5, radius=0 if inside == "global" else None,
                          labels=(3, 7), seeds=(0, 1))
    store = run_windowed(den, clf, lambda x: clf.features(x).numpy(), req, tmp_path / "w.zarr", batch_rows=4)
    names = [str(s) for s in store.coord("window_name")]
    assert names == ["t0=0", "t0=0.5", "always_on", "always_off"]
    t = np.array(leading_timesteps(4)) / 1000  # 0.75, 0.5, 0.25, 0
    inside_steps = {"t0=0": t <= 0.3, "t0=0.5": (t >= 0.5) & (t <= 0.8), "always_on": t >= 0, "always_off": t < 0}
    x_T = initial_state(tiny_loaded, [0, 1]).latents
    res = store.read("result")
    for w, name in enumerate(names):
        ins = inside_steps[name]
        assert list(store.read("inside")[w]) == list(ins)
        cond = list(ins)  # conditioned inside the window only (outside: unconditional) in both kinds
        radius = [GLOBAL] * 4 if inside == "conditioning" else [GLOBAL if i else 0 for i in ins]
        want = np.clip(numpy_ddim(tiny_loaded, x_T, 0, [3, 7], cond, radius, 4, 10, False), -1, 1)
        assert np.allclose(res[w], want, atol=2e-4), (name, np.abs(res[w] - want).max())
    met = windowed_metrics(store, n_boot=5)
    feats = store.read("features")
    assert abs(met["fd"][2]) < 1e-9  # always_on against itself
    assert np.isclose(met["fd"][1], frechet_features(feats[1], feats[2]))
    pred = store.read("pred")
    assert np.allclose(met["error"], (pred != np.array([3, 7])).mean(1))
    summary = summarize(store.path)
    assert "figures/windowed.svg" in summary["figures"] and (store.path / "figures" / "windowed_samples.png").exists()


def test_windowed_refuses_bad_requests(den, tmp_path):
    clf = FakeClassifier()
    f = lambda x: clf.features(x).numpy()  # noqa: E731
    with pytest.raises(DithooksError, match="needs --radius"):
        run_windowed(den, clf, f, WindowedRequest("tiny", inside="global", labels=(1, 2), seeds=(0, 1)), tmp_path / "a")
    with pytest.raises(DithooksError, match="unknown --inside"):
        run_windowed(den, clf, f, WindowedRequest("tiny", inside="local", labels=(1, 2), seeds=(0, 1)), tmp_path / "b")
    with pytest.raises(DithooksError, match="Inception"):
        feature_extractor("inception")


# -- Fréchet distance -----------------------------------------------------------------------------------
def test_frechet_closed_forms():
    rng = np.random.default_rng(0)
    d = 5
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    a, b = rng.uniform(0.1, 3, d), rng.uniform(0.1, 3, d)
    want = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert np.isclose(frechet_distance(mu1, np.diag(a), mu2, np.diag(b)), want)
    q, _ = np.linalg.qr(rng.normal(size=(d, d)))  # a shared eigenbasis: the same closed form
    assert np.isclose(frechet_distance(mu1, q @ np.diag(a) @ q.T, mu2, q @ np.diag(b) @ q.T), want)
    assert np.isclose(frechet_distance([1.0], [[4.0]], [3.0], [[9.0]]), 4.0 + 1.0)  # 1-D: (Δμ)² + (σ1 − σ2)²
    # general covariances: FID's textbook formula with scipy's sqrtm
    from scipy.linalg import sqrtm

    A, B = rng.normal(size=(d, d)), rng.normal(size=(d, d))
    s1, s2 = A @ A.T + 0.1 * np.eye(d), B @ B.T + 0.1 * np.eye(d)
    ref = np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * np.real(sqrtm(s1 @ s2)))
    assert np.isclose(frechet_distance(mu1, s1, mu2, s2), ref, rtol=1e-8)
    assert np.isclose(frechet_distance(mu1, s1, mu2, s2), frechet_distance(mu2, s2, mu1, s1))


def test_frechet_of_features():
    rng = np.random.default_rng(1)
    f = rng.normal(size=(30, 8))  # fewer samples than ... fine; and rank-deficient below:
    assert abs(frechet_features(f, f)) < 1e-8
    g = rng.normal(size=(5, 8)) + 2.0  # n < d: singular covariance stays finite
    fd = frechet_features(f, g)
    mu, cov = gaussian_stats(g)
    assert np.allclose(cov, np.cov(g.T)) and np.isfinite(fd) and fd > 8 * 4 * 0.5
    assert bootstrap_frechet(np.ones((6, 3)), np.ones((4, 3)), n_boot=10) == 0.0
    assert bootstrap_frechet(f, g, n_boot=20, seed=3) == bootstrap_frechet(f, g, n_boot=20, seed=3) > 0
    with pytest.raises(DithooksError):
        gaussian_stats(np.ones((1, 3)))


# -- summaries -----------------------------------------------------------------------------------------
def test_window_helpers():
    t = np.array([0.9, 0.1, 0.5, 0.3, 0.7])
    y = np.array([0.1, 0.2, 1.0, 0.6, 0.4])  # by t: 0.1:0.2 0.3:0.6 0.5:1.0 0.7:0.4 0.9:0.1
    assert half_max_window(t, y) == (0.5, 0.3, 0.5)
    assert overlap((0.3, 0.5), (0.4, 0.7)) == pytest.approx(0.1 / 0.4)
    assert overlap((0.0, 0.1), (0.2, 0.3)) == 0.0
    e = np.array([0.1, 0.3, 0.6, 0.9])
    assert threshold_crossing(np.array([0.2, 0.4, 0.6, 0.8]), e, 0.45) == pytest.approx(0.5)
    assert math.isnan(threshold_crossing(np.array([0.2, 0.4]), np.array([0.1, 0.2]), 0.45))


# -- the CLI ------------------------------------------------------------------------------------------
def test_cli_gaps_resume_and_errors(tiny_model_dir, tmp_path):
    from dithooks.cli.main import app

    runner = CliRunner()
    out = tmp_path / "g.zarr"
    args = ["locality", "gaps", "--model", str(tiny_model_dir), "--out", str(out), "-n", "2", "--steps", "4",
            "--trajectories", "sampling", "--radii", "0,3", "--quiet"]
    r = runner.invoke(app, args + ["--json"])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.output)
    assert doc["kind"] == "locality-gaps" and doc["status"] == "complete"
    assert (out / "figures" / "gaps.svg").exists() and (out / "figures" / "gaps.png").exists()
    r = runner.invoke(app, args)
    assert r.exit_code == 2 and "already exists" in r.output and "Traceback" not in r.output
    r = runner.invoke(app, args + ["--resume", "--no-figures"])
    assert r.exit_code == 0 and "critical windows" in r.output
    r = runner.invoke(app, args + ["--resume", "--overwrite"])
    assert r.exit_code == 2 and "exclude" in r.output
    r = runner.invoke(app, ["locality", "gaps", "--model", str(tiny_model_dir), "--out", str(tmp_path / "h.zarr"),
                            "-n", "2", "--steps", "4"])
    assert r.exit_code == 2 and "training trajectory needs data" in r.output
    r = runner.invoke(app, ["locality", "forward-backward", "--model", str(tiny_model_dir), "--out", str(tmp_path / "f")])
    assert r.exit_code == 2 and "needs a classifier" in r.output
    r = runner.invoke(app, ["locality", "show", str(tmp_path)])
    assert r.exit_code == 2 and "not a dithooks store" in r.output


def test_cli_on_the_embedded_digits_model(tmp_path):
    from dithooks.cli.main import app

    runner = CliRunner()
    r = runner.invoke(app, ["locality", "forward-backward", "--out", str(tmp_path / "fb.zarr"), "-n", "4",
                            "--steps", "4", "--levels", "2", "--radii", "0", "--quiet", "--json", "--no-figures"])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.output)
    rows = doc["summary"]["tables"][1]["rows"]
    assert {row["mode"] for row in rows} == {"global", "r0"} and len(rows) == 4
    r = runner.invoke(app, ["locality", "windowed", "--out", str(tmp_path / "w.zarr"), "-n", "2", "--steps", "4",
                            "--width", "0.5", "--stride", "0.5", "--inside", "global", "--radius", "1", "--quiet",
                            "--no-figures"])
    assert r.exit_code == 0, r.output
    assert "always_off" in r.output and "FD to real" in r.output
