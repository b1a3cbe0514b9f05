"""Protocol II (dithooks protocol2): energies, spread, coherence and the store, against numpy."""

import json
import math

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from dithooks.capture import capture
from dithooks.cli.main import app
from dithooks.errors import DithooksError, StoreError
from dithooks.protocols.protocol2 import (Protocol2, Protocol2Request, mode_coherence, random_baseline,
                                          run_protocol2)
from dithooks.store.reader import open_store

pytestmark = pytest.mark.usefixtures("one_torch_thread")

G = (0.0, 0.5)
M, STEPS, AT = 6, 3, 2


def request(model_dir, **kw):
    base = dict(model=str(model_dir), g=G, pairs=M, steps=STEPS, at_step=(AT,), bootstrap=300, labels=(3,))
    return Protocol2Request(**{**base, **kw})


@pytest.fixture(scope="module")
def p2(tmp_path_factory, tiny_model_dir, tiny_loaded):
    out = tmp_path_factory.mktemp("p2") / "p2.zarr"
    summary = run_protocol2(request(tiny_model_dir), out, loaded=tiny_loaded, log=lambda m: None)
    return out, summary


@pytest.fixture(scope="module")
def raw(tmp_path_factory, tiny_model_dir, tiny_loaded, p2):
    """The same replica runs captured with resid_post raw (float32): what the probe saw."""
    out, _ = p2
    job = Protocol2(None, out, mode="resume", loaded=tiny_loaded)
    stores = {}
    for g in G:
        cfg = job.capture_config(g, "create")
        cfg.out = str(tmp_path_factory.mktemp("raw") / f"g{g}.zarr")
        cfg.hooks, cfg.probes, cfg.storage_dtype = ("resid_post",), (), "fp32"
        capture(cfg, loaded=tiny_loaded)
        stores[g] = np.asarray(open_store(cfg.out).select("blocks.resid_post").values, dtype=np.float64)
    return stores  # g -> (step, layer, replica, sample, token, channel)


def dct_ortho(x):
    """Orthonormal 2-D DCT-II over the first two axes, from scipy (independent of the toolkit's)."""
    from scipy.fft import dctn

    return dctn(x, type=2, norm="ortho", axes=(0, 1))


def test_pair_energies_and_coherence_match_numpy(p2, raw):
    out, _ = p2
    for g in G:
        s = open_store(out / "runs" / f"g_{g:g}")
        pe = np.asarray(s.select("probe.difference_modes.pair_energy").values, dtype=np.float64)
        E = np.asarray(s.select("probe.difference_modes.energy").values, dtype=np.float64)
        mf = np.asarray(s.select("probe.difference_modes.mean_free_fraction").values, dtype=np.float64)
        lf = np.asarray(s.select("probe.difference_modes.low_freq_fraction").values, dtype=np.float64)
        h = raw[g]
        for layer in range(4):
            X = (h[:, layer, 0] - h[:, layer, 1]).reshape(STEPS, M, -1)  # δ = h^a − h^b per step and pair
            lam, U = np.linalg.eigh(X[0] @ X[0].T / M)
            lam, U = lam[::-1], U[:, ::-1]
            keep = lam > np.sqrt(np.finfo(float).eps) * lam[0]
            V = (U[:, keep].T @ X[0]) / np.sqrt(M * lam[keep])[:, None]  # Nyström modes (rows)
            K = V.shape[0]
            ref = (X @ V.T) ** 2 / lam[keep]  # (step, pair, K)
            np.testing.assert_allclose(pe[:, layer, :, :K], ref, rtol=2e-4, atol=1e-6)
            np.testing.assert_allclose(E[:, layer, :K], ref.mean(1), rtol=2e-4, atol=1e-6)
            np.testing.assert_allclose(pe[0, layer, :, :K].mean(0), 1.0, rtol=1e-5)  # E_k(0) = 1
            maps = V.reshape(K, 16, -1)
            ref_mf = np.linalg.norm(maps - maps.mean(1, keepdims=True), axis=(1, 2)) / np.linalg.norm(maps, axis=(1, 2))
            np.testing.assert_allclose(mf[layer, :K], ref_mf, rtol=1e-5)
            coef = dct_ortho(np.moveaxis(maps.reshape(K, 4, 4, -1), 0, -1))  # (u, w, channel, K)
            low = np.array([[u * u + w * w <= 1 for w in range(4)] for u in range(4)])  # radius side/4 = 1
            ref_lf = (coef[low] ** 2).sum((0, 1)) / (coef ** 2).sum((0, 1, 2))
            np.testing.assert_allclose(lf[layer, :K], ref_lf, rtol=1e-5)


def test_summary_numbers_from_the_pair_energies(p2):
    out, summary = p2
    rng = np.random.default_rng(0)
    boot = rng.integers(0, M, size=(300, M))
    for gi, g in enumerate(G):
        pe = np.asarray(open_store(out / "runs" / f"g_{g:g}").select("probe.difference_modes.pair_energy").values,
                        dtype=np.float64)
        for layer in range(4):
            K = int(summary["n_modes"][gi, layer])
            n = max(1, int(math.floor(0.25 * K + 0.5)))
            e = pe[AT, layer, :, :K]
            el, et = e[:, :n].mean(1), e[:, K - n:].mean(1)
            pl = summary["per_layer"]
            np.testing.assert_allclose(pl["E_lead"][gi, layer], el.mean(), rtol=1e-9)
            np.testing.assert_allclose(pl["E_trail_std"][gi, layer], et.std(ddof=1), rtol=1e-9)
            np.testing.assert_allclose(pl["R"][gi, layer], et.mean() / el.mean(), rtol=1e-9)
            Rb = et[boot].mean(1) / el[boot].mean(1)
            np.testing.assert_allclose([pl["R_ci_low"][gi, layer], pl["R_ci_high"][gi, layer]],
                                       np.quantile(Rb, [0.025, 0.975]), rtol=1e-9)
            assert pl["R_ci_low"][gi, layer] <= pl["R"][gi, layer] * 1.5  # a sane interval around R


def test_store_is_an_xarray_dataset_with_figures_and_summary(p2):
    xr = pytest.importorskip("xarray")
    out, summary = p2
    ds = xr.open_zarr(out)
    assert ds["R"].dims == ("g", "layer") and ds["E_lead_by_step"].dims == ("g", "step", "layer")
    np.testing.assert_allclose(ds["R"].values, summary["per_layer"]["R"])
    assert list(ds["at_step"].values) == [AT, AT]
    meta = dict(__import__("zarr").open_group(str(out), mode="r").attrs["dithooks"])
    assert meta["kind"] == "protocol2" and meta["status"] == "complete"
    tables = meta["summary"]["tables"]
    assert len(tables[0]["rows"]) == len(G) * 4 and {"g", "block", "E_lead", "R"} <= set(tables[0]["rows"][0])
    for f in meta["summary"]["figures"]:
        assert (out / f).stat().st_size > 1000, f
    assert {f.rsplit(".", 1)[1] for f in meta["summary"]["figures"]} == {"svg", "png"}
    assert set(meta["timings"]) >= {"g_0", "g_0.5", "summary"}


def test_mode_coherence_on_known_fields():
    const = torch.ones(1, 16, 3)  # constant over tokens: perfectly coherent
    c = mode_coherence(const)
    assert float(c["mean_free_fraction"][0]) == pytest.approx(0.0, abs=1e-12)
    assert float(c["low_freq_fraction"][0]) == pytest.approx(1.0)
    rows, cols = torch.meshgrid(torch.arange(4), torch.arange(4), indexing="ij")
    checker = ((-1.0) ** (rows + cols)).reshape(1, 16, 1)  # highest frequency: mean-free, no low-frequency energy
    c = mode_coherence(checker)
    assert float(c["mean_free_fraction"][0]) == pytest.approx(1.0)
    assert float(c["low_freq_fraction"][0]) < 0.01
    assert torch.isnan(mode_coherence(torch.randn(2, 12, 3))["low_freq_fraction"]).all()  # 12 tokens: no grid


def test_random_baseline_matches_monte_carlo():
    N, d, K = 16, 8, 3
    base = random_baseline(N, d, n_low=3, band_size=K, draws=20000, seed=1)
    v = torch.randn(6000, K, N, d, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    c = mode_coherence(v.reshape(-1, N, d))
    mf = c["mean_free_fraction"].reshape(6000, K).mean(1).numpy()
    lf = c["low_freq_fraction"].reshape(6000, K).mean(1).numpy()
    assert base["mean_free_fraction"]["mean"] == pytest.approx(mf.mean(), abs=2e-3)
    assert base["low_freq_fraction"]["mean"] == pytest.approx(3 / 16, abs=2e-3)
    assert base["low_freq_fraction"]["mean"] == pytest.approx(lf.mean(), abs=3e-3)
    for key, x in (("mean_free_fraction", mf), ("low_freq_fraction", lf)):
        assert base[key]["q025"] == pytest.approx(np.quantile(x, 0.025), abs=5e-3)
        assert base[key]["q975"] == pytest.approx(np.quantile(x, 0.975), abs=5e-3)


def test_resume_refuse_and_resummarise(tmp_path, tiny_model_dir, tiny_loaded):
    out = tmp_path / "p2.zarr"
    req = request(tiny_model_dir, g=(0.3,), pairs=4, steps=2, at_step=(1,), layers="0-1", bootstrap=50)
    job = Protocol2(req, out, loaded=tiny_loaded, figures=False)
    job.run()
    with pytest.raises(StoreError, match="already exists"):
        Protocol2(req, out, loaded=tiny_loaded)
    with pytest.raises(StoreError, match="pairs"):
        Protocol2(None, out, mode="resume", given={"pairs": 5}, loaded=tiny_loaded)
    before = job.store.meta["timings"]["g_0.3"]
    # a new summary step: nothing is sampled again
    s2 = Protocol2(None, out, mode="resume", given={"at_step": (0,)}, loaded=tiny_loaded, figures=False).run()
    assert s2["at_step"] == [0] and Protocol2(None, out, mode="resume", loaded=tiny_loaded).store.meta["timings"]["g_0.3"] == before
    np.testing.assert_allclose(s2["per_layer"]["E_lead"], 1.0, rtol=1e-5)  # E_k(0) = 1
    # an unfinished g is run again from its start
    job = Protocol2(None, out, mode="resume", loaded=tiny_loaded, figures=False)
    job.store.write("g_done", 0, False)
    r = job.run()
    assert np.isfinite(r["per_layer"]["R"]).all()


def test_t_spec_from_protocol1_maps_to_the_nearest_timestep(tmp_path, tiny_model_dir, tiny_loaded, monkeypatch):
    import dithooks.protocols.protocol1 as p1

    timesteps = {"step": {0.0: 1.2, 0.5: 0.4}, "timestep": {0.0: 380.0, 0.5: 760.0}}
    monkeypatch.setattr(p1, "read_t_spec", lambda path, unit="step": timesteps[unit])
    out = tmp_path / "p2.zarr"
    s = run_protocol2(request(tiny_model_dir, at_step=None, from_protocol1="p1.zarr", bootstrap=0), out,
                      loaded=tiny_loaded, log=lambda m: None, figures=False)
    ts = s["timesteps"]  # DDIM, 3 steps: 666, 333, 0 (train steps 1000)
    assert s["at_step"] == [int(np.argmin(np.abs(np.array(ts) - 380))), int(np.argmin(np.abs(np.array(ts) - 760)))]
    assert s["t_spec"] == [1.2, 0.4]
    monkeypatch.setattr(p1, "read_t_spec", lambda path, unit="step": {0.0: 1.0})
    with pytest.raises(DithooksError, match="no t_spec for g = 0.5"):
        Protocol2(request(tiny_model_dir, at_step=None, from_protocol1="p1.zarr"), tmp_path / "x.zarr", loaded=tiny_loaded)
    assert not (tmp_path / "x.zarr").exists()  # refused before anything was created
    # g = 0 has a flat Protocol I curve (no fit): --at-step serves it, t_spec serves the rest
    monkeypatch.setattr(p1, "read_t_spec", lambda path, unit="step": {0.0: math.nan, 0.5: timesteps[unit][0.5]})
    s = Protocol2(None, out, mode="resume", given={"from_protocol1": "p1.zarr", "at_step": (2,)}, loaded=tiny_loaded,
                  figures=False).run()
    assert s["at_step"][0] == 2 and s["at_step"][1] == int(np.argmin(np.abs(np.array(ts) - 760)))
    assert math.isnan(s["t_spec"][0]) and s["t_spec"][1] == 0.4 and "--at-step (no Protocol I t_spec)" in s["source"]


def test_protocol2_command(tmp_path, tiny_model_dir):
    runner = CliRunner()
    out = tmp_path / "p.zarr"
    base = ["protocol2", "--model", str(tiny_model_dir), "--g", "0,0.3", "--pairs", "4", "--steps", "2",
            "--layers", "0-1", "--bootstrap", "20", "--out", str(out), "--quiet", "--no-figures"]
    r = runner.invoke(app, base)
    assert r.exit_code == 2 and "--at-step" in r.output and not out.exists()
    r = runner.invoke(app, base + ["--at-step", "1", "--json"])
    assert r.exit_code == 0, r.output
    data = json.loads(r.output)
    assert data["g"] == [0.0, 0.3] and len(data["per_layer"]["R"]) == 2 and data["at_step"] == [1, 1]
    r = runner.invoke(app, ["protocol2", "--out", str(out), "--resume", "--at-step", "0", "--quiet", "--no-figures"])
    assert r.exit_code == 0, r.output
    assert "Protocol II" in r.output and "spatial coherence" in r.output and "E_lead g=0.3" in r.output
    r = runner.invoke(app, base + ["--at-step", "5"])
    assert r.exit_code == 2 and "outside 0-1" in r.output


def test_interrupted_run_says_how_to_resume(tmp_path, tiny_model_dir, tiny_loaded, monkeypatch):
    from dithooks.capture import CaptureSession

    calls = []
    real_run = CaptureSession.run

    def run(self, progress=None):  # the second coupling is interrupted (Ctrl-C inside the capture)
        calls.append(self.cfg.out)
        if len(calls) == 2:
            raise StoreError(f"capture interrupted: {self.cfg.out} holds steps none of 0-1; continue with --resume")
        return real_run(self, progress=progress)

    monkeypatch.setattr(CaptureSession, "run", run)
    out = tmp_path / "p2.zarr"
    job = Protocol2(request(tiny_model_dir, pairs=4, steps=2, at_step=(1,), layers="0-1"), out, loaded=tiny_loaded,
                    figures=False)
    with pytest.raises(StoreError, match="protocol2 interrupted: .* holds 1 of 2 couplings"):
        job.run()
    assert job.store.meta["status"] == "interrupted" and list(job.done()) == [True, False]
    s = Protocol2(None, out, mode="resume", loaded=tiny_loaded, figures=False).run()
    assert len(calls) == 3 and np.isfinite(s["per_layer"]["R"]).all()  # only the missing g ran again


@pytest.mark.parametrize("bad", [dict(low_freq_radius=float("nan")), dict(low_freq_radius=-1.0), dict(pairs=1),
                                 dict(g=(0.3, 0.3)), dict(at_step=(1, 2, 3)), dict(kappa=0.0), dict(lead="0,x")])
def test_bad_requests_are_refused(bad):
    with pytest.raises(DithooksError):
        Protocol2Request(**{**dict(g=(0.0, 0.3), at_step=(1,)), **bad})


def test_coupling_lists_share_one_parser():
    """protocol2's g list keeps order and refuses repeats and negatives; protocol1's grid is a sorted set in [0, 1]."""
    from dithooks.protocols.protocol1 import parse_g_grid
    from dithooks.protocols.protocol2 import parse_g_list

    assert parse_g_list([0.3, 0.0, 2.5]) == (0.3, 0.0, 2.5)
    assert parse_g_grid("1, 0, 1") == (0.0, 1.0)
    for fn, bad, needle in ((parse_g_list, "0,-1", "must be a finite number >= 0, got -1"),
                            (parse_g_list, [0.0, float("nan")], "finite number"),
                            (parse_g_list, [], "empty g list"), (parse_g_grid, "0,1.5", r"in \[0, 1\], got 1.5")):
        with pytest.raises(DithooksError, match=needle):
            fn(bad)
