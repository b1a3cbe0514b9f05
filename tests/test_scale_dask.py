"""dithooks.scale: stores as Dask arrays and the probes' offline forms, on a 2-worker LocalCluster,
each checked against the reader / the online probe / plain numpy on a store made by a real capture."""

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

pytest.importorskip("dask")
distributed = pytest.importorskip("distributed")

from dithooks.capture import CaptureConfig, capture  # noqa: E402
from dithooks.errors import DithooksError  # noqa: E402
from dithooks.analysis.modes import DifferenceModeBasis  # noqa: E402
from dithooks.sampling import ReplicaSpec, SamplerSpec  # noqa: E402
from dithooks.scale import dask_array, difference_modes, n_eff_summary, routing_summary  # noqa: E402
from dithooks.scale.dask_store import concat_samples  # noqa: E402
from dithooks.store.reader import IncompleteDataWarning, IncompleteStepsError, MissingChunkError, open_store  # noqa: E402

from .conftest import shards_per_step  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def client():
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=False, dashboard_address=None) as cluster, \
            distributed.Client(cluster) as c:
        yield c


@pytest.fixture(scope="module")
def pairs_store(tmp_path_factory, tiny_loaded, tiny_model_dir):
    """A replica run (4 pairs, guided) with N_eff, JVP parts and the online difference_modes probe."""
    out = tmp_path_factory.mktemp("scale") / "pairs.zarr"
    with shards_per_step():  # a test unmarks step 3 and reads its file through dask's from_zarr
        capture(CaptureConfig(out=str(out), model=str(tiny_model_dir), layers="0-1",
                              hooks=("resid_post", "attn.n_eff", "jvp.routing", "jvp.modulation"),
                              sampler=SamplerSpec("ddim", 4, guidance=2.0), labels=(1, 2, 3, 4), seeds=(0, 1, 2, 3),
                              storage_dtype="fp32", replicas=ReplicaSpec(kappa=0.6, g=0.3, couple_until=3),
                              probes=(("difference_modes", {"pairs": "replica"}),)), loaded=tiny_loaded)
    return out


def test_dask_array_reads_what_the_reader_reads(client, pairs_store):
    s = open_store(pairs_store)
    a = dask_array(pairs_store, "blocks.resid_post", split={"sample": 3})
    ref = s.select("blocks.resid_post")
    assert a.dims == ref.dims and a.data.dtype == ref.values.dtype
    assert a.data.chunks[a.axis("sample")] == (3, 1) and a.data.numblocks[0] == 4  # one block per step chunk
    np.testing.assert_array_equal(a.data.compute(), ref.values)
    # out-of-order lists, names, a strided slice: the same values and coordinates as select
    sel = dict(step=[3, 0, 1], layer=[1, 0], cfg="uncond", sample=slice(0, 4, 2))
    b = dask_array(s, "blocks.resid_post", **sel)
    np.testing.assert_array_equal(b.data.compute(), s.select("blocks.resid_post", **sel).values)
    x = b.to_xarray()
    assert list(x["step"].values) == [3, 0, 1] and list(x["layer"].values) == [1, 0] and list(x["cfg"].values) == ["uncond"]
    np.testing.assert_array_equal(dask_array(s, "blocks.1.attn.n_eff").data.compute(),
                                  s.select("blocks.1.attn.n_eff").values)


def test_incomplete_steps_never_read_as_data(client, pairs_store, tmp_path):
    da = pytest.importorskip("dask.array")
    p = tmp_path / "part.zarr"
    shutil.copytree(pairs_store, p)
    s = open_store(p)
    zarr.open_array(str(p / "step_complete"), mode="r+")[3] = False  # step 3 unmarked, its data still on disk
    s = open_store(p)
    with pytest.raises(IncompleteStepsError, match="step 3 is not complete"):
        dask_array(s, "blocks.resid_post")
    got = dask_array(s, "blocks.resid_post", step="complete")
    assert list(got.coords["step"]) == [0, 1, 2]
    np.testing.assert_array_equal(got.data.compute(), s.select("blocks.resid_post", step=slice(0, 3)).values)
    # what dask's own from_zarr does with the same store: step 3 comes back as if it were data
    z = da.from_zarr(str(p), component="blocks.resid_post")
    assert np.isfinite(z[3].compute()).all()
    # a chunk gone from a complete step: refused, or NaN with allow_incomplete
    m = s.array_meta("blocks.resid_post")
    Path(m.path((1,) + (0,) * 6)).unlink()
    s = open_store(p)
    with pytest.raises(MissingChunkError):
        dask_array(s, "blocks.resid_post", step="complete")
    with pytest.warns(IncompleteDataWarning):
        part = dask_array(s, "blocks.resid_post", allow_incomplete=True).data.compute()
    assert np.isnan(part[1]).all() and np.isfinite(part[[0, 2, 3]]).all()


def _svd_energies(X0, Xs, rel_tol=np.sqrt(np.finfo(np.float64).eps)):
    """Independent reference: right singular vectors of X_0 (M x D) are the modes, λ = σ²/M."""
    M = X0.shape[0]
    _, sv, Vt = np.linalg.svd(X0, full_matrices=False)
    lam = sv ** 2 / M
    k = int((lam > rel_tol * lam[0]).sum())
    return np.stack([((X @ Vt[:k].T) ** 2).mean(axis=0) / lam[:k] for X in Xs]), lam[:k]


def test_difference_modes_equal_the_online_probe_and_an_svd(client, pairs_store):
    s = open_store(pairs_store)
    r = difference_modes(pairs_store, pairs="replica", split={"sample": 2})
    # the probe measured online, from the same activations (its outputs are stored as float32)
    for key in ("energy", "eigenvalues", "R", "E_lead", "E_trail"):
        want = s.select(f"probe.difference_modes.{key}").values.astype(np.float64)
        np.testing.assert_allclose(getattr(r, key), want, rtol=2e-6, atol=1e-9, err_msg=key)
    np.testing.assert_array_equal(r.n_modes, s.select("probe.difference_modes.n_modes").values)
    # numpy SVD of the stored differences
    h = s.select("blocks.resid_post", cfg="cond").values.astype(np.float64)[:, :, :, 0]  # step layer replica sample ...
    for li in range(2):
        X = (h[:, li, 0] - h[:, li, 1]).reshape(4, 4, -1)
        E, lam = _svd_energies(X[0], X)
        np.testing.assert_allclose(r.energy[:, li, : len(lam)], E, rtol=1e-8)
        np.testing.assert_allclose(r.eigenvalues[li, : len(lam)], lam, rtol=1e-10)
    np.testing.assert_allclose(r.energy[0][np.isfinite(r.energy[0])], 1.0, rtol=1e-10)  # E_k(0) = 1
    # centred (own mean per step) against the torch basis of dithooks/analysis/modes.py
    c = difference_modes(s, centre=True, cfg="uncond")
    hu = s.select("blocks.resid_post", cfg="uncond").values.astype(np.float64)[:, :, :, 0]
    for li in range(2):
        X = torch.from_numpy(hu[:, li, 0] - hu[:, li, 1])
        basis = DifferenceModeBasis.fit(X[0], centre=True)
        assert c.n_modes[li] == basis.n_modes == 3  # centring drops the null mode
        np.testing.assert_allclose(c.energy[:, li, :3], basis.normalised_energy(X).numpy(), rtol=1e-7)
    with pytest.raises(DithooksError, match="replica run"):
        difference_modes(s, pairs="halves")


def test_difference_modes_halves_equal_the_online_probe(client, tmp_path, tiny_loaded, tiny_model_dir):
    out = tmp_path / "halves.zarr"
    capture(CaptureConfig(out=str(out), model=str(tiny_model_dir), layers="1", hooks=("attn.out",),
                          sampler=SamplerSpec("ddim", 3), labels=(1, 2, 3, 1, 2, 3), seeds=tuple(range(6)),
                          storage_dtype="fp32", probes=(("difference_modes", {"pairs": "halves", "hook": "attn.out"}),)),
            loaded=tiny_loaded)
    s = open_store(out)
    r = difference_modes(out, "attn.out", pairs="halves")
    np.testing.assert_allclose(r.energy, s.select("probe.difference_modes.energy").values, rtol=2e-6)
    np.testing.assert_allclose(r.R, s.select("probe.difference_modes.R").values, rtol=2e-6)


def test_routing_summary_equals_numpy(client, pairs_store):
    s = open_store(pairs_store)
    rs = routing_summary(pairs_store, split={"sample": 1})
    a = s.select("blocks.jvp.routing").values.astype(np.float64)
    b = s.select("blocks.jvp.modulation").values.astype(np.float64)
    ratio = np.sqrt((a ** 2).sum(axis=(-2, -1)) / (b ** 2).sum(axis=(-2, -1)))
    assert rs["dims"] == ("step", "layer", "cfg", "sample")
    np.testing.assert_allclose(rs["ratio"], ratio, rtol=1e-12)
    np.testing.assert_allclose(rs["median"], np.median(ratio, axis=-1), rtol=1e-12)
    np.testing.assert_allclose(rs["q"][..., 2], np.quantile(ratio, 0.9, axis=-1), rtol=1e-12)
    np.testing.assert_array_equal(rs["dominates"], (ratio > 1).mean(axis=-1))
    assert 0 < np.median(ratio) < np.inf


def test_n_eff_summary_equals_numpy(client, pairs_store):
    s = open_store(pairs_store)
    res = 2 ** -9
    ns = n_eff_summary(pairs_store, resolution=res, quantiles=(0.05, 0.5, 0.95), split={"sample": 3})
    v = s.select("blocks.attn.n_eff").values.astype(np.float64)   # step layer replica cfg sample head query
    assert 1 <= v.min() and v.max() <= 16
    per = np.moveaxis(v, 5, 2).reshape(4, 2, 2, -1)                 # step layer head, everything else
    np.testing.assert_allclose(ns["mean"], per.mean(-1), rtol=1e-12)
    np.testing.assert_array_equal(ns["min"], per.min(-1))
    np.testing.assert_array_equal(ns["max"], per.max(-1))
    assert (ns["count"] == per.shape[-1]).all()
    want = np.moveaxis(np.quantile(per, [0.05, 0.5, 0.95], axis=-1, method="inverted_cdf"), 0, -1)
    assert np.abs(ns["q"] / want - 1).max() <= res / 2 + 1e-12
    # keeping other dims: per (layer, cfg)
    by = n_eff_summary(s, keep=("layer", "cfg"))
    np.testing.assert_allclose(by["mean"], np.moveaxis(v, (1, 3), (0, 1)).reshape(2, 2, -1).mean(-1), rtol=1e-12)


def test_stores_of_disjoint_seeds_are_analysed_as_one(client, tmp_path, tiny_loaded, tiny_model_dir, pairs_store):
    """Independent captures (one per GPU, disjoint seeds) concatenated along sample."""
    parts = []
    for i, seeds in enumerate(((0, 1, 2), (3, 4))):
        out = tmp_path / f"part{i}.zarr"
        capture(CaptureConfig(out=str(out), model=str(tiny_model_dir), layers="0", hooks=("resid_post",),
                              sampler=SamplerSpec("ddim", 3), labels=tuple(s % 3 for s in seeds), seeds=seeds,
                              storage_dtype="fp32", replicas=ReplicaSpec(kappa=0.6, g=0.0)), loaded=tiny_loaded)
        parts.append(out)
    both = concat_samples(parts, "blocks.resid_post")
    vals = [open_store(p).select("blocks.resid_post").values for p in parts]
    ax = both.axis("sample")
    np.testing.assert_array_equal(both.data.compute(), np.concatenate(vals, axis=ax))
    assert list(both.coords["store"]) == [0, 0, 0, 1, 1] and list(both.coords["sample"]) == [0, 1, 2, 3, 4]
    r = difference_modes(parts)
    h = np.concatenate(vals, axis=ax).astype(np.float64)[:, 0]          # step replica sample token channel
    X = (h[:, 0] - h[:, 1]).reshape(3, 5, -1)
    E, lam = _svd_energies(X[0], X)
    np.testing.assert_allclose(r.energy[:, 0, : len(lam)], E, rtol=1e-8)
    with pytest.raises(DithooksError, match="has dims"):   # a guided store: another layout
        concat_samples([parts[0], pairs_store], "blocks.resid_post")
