"""The probe API: custom probes, built-in probes checked against raw captures, resume, CLI."""

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import typer
import zarr
from typer.testing import CliRunner

from dithooks.capture import CaptureConfig, CaptureSession, capture

from .test_capture import Interrupt
from dithooks.errors import DithooksError, StoreError
from dithooks.hooks import HookContext
from dithooks.probes.api import Option, Output, Probe, ProbeError, RunInfo, make_probe, register_probe
from dithooks.probes.builtin import DifferenceModes
from dithooks.probes.examples import BlockUpdateRatio
from dithooks.sampling import SamplerSpec
from dithooks.store.reader import open_store

REPO = Path(__file__).resolve().parents[1]
M = 3  # pairs: seeds 0-5, sample m paired with m + 3
STEPS = 4


def config(out, model_dir, **kw):
    base = dict(out=str(out), model=str(model_dir), layers="0-3", hooks=("resid_pre", "resid_post"),
                sampler=SamplerSpec("ddim", STEPS, guidance=2.0), labels=(4,), seeds=tuple(range(2 * M)),
                storage_dtype="fp32",
                probes=("residual_norms", DifferenceModes(lead=1, trail=1), "dithooks.probes.examples:BlockUpdateRatio"))
    base.update(kw)
    return CaptureConfig(**base)


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_loaded, tiny_model_dir):
    """One guided run with raw resid_pre/resid_post and all three probes (the reference for most tests)."""
    out = tmp_path_factory.mktemp("probes") / "p.zarr"
    capture(config(out, tiny_model_dir), loaded=tiny_loaded)
    g = zarr.open_group(str(out), mode="r")
    return out, {k: np.asarray(g[k][...]) for k in g.array_keys()}


def cond(raw):
    """Raw hook values (step, layer, cfg, sample, token, channel) → the cond branch, float64."""
    return raw[:, :, 0].astype(np.float64)


# -- the documented custom probe -----------------------------------------------------------------

def test_the_doc_shows_the_tested_example_verbatim():
    doc = (REPO / "docs" / "writing-probes.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", doc, re.S)
    example = next(b for b in blocks if "class BlockUpdateRatio" in b)
    assert example in (REPO / "probes" / "examples.py").read_text()


def test_custom_probe_outputs_open_in_xarray_and_match_the_raw_capture(run):
    xr = pytest.importorskip("xarray")
    out, arrays = run
    ds = xr.open_zarr(out)
    ratio = ds["probe.block_update_ratio.ratio"]
    assert ratio.dims == ("step", "layer", "cfg", "sample")
    assert ratio.shape == (STEPS, 4, 2, 2 * M)
    assert list(ratio["layer"].values) == [0, 1, 2, 3] and list(ratio["cfg"].values) == ["cond", "uncond"]
    assert ds["probe.block_update_ratio.peak"].dims == ("layer",)
    pre, post = arrays["blocks.resid_pre"].astype(np.float64), arrays["blocks.resid_post"].astype(np.float64)
    want = np.sqrt(((post - pre) ** 2).sum((-2, -1))) / (np.sqrt((pre ** 2).sum((-2, -1))) + 1e-12)
    np.testing.assert_allclose(ratio.values, want, rtol=1e-5)
    np.testing.assert_allclose(ds["probe.block_update_ratio.peak"].values,
                               want.mean((2, 3)).max(0), rtol=1e-5)
    meta = ds.attrs["dithooks"]["probes"]
    assert [p["name"] for p in meta] == ["residual_norms", "difference_modes", "block_update_ratio"]
    assert meta[1]["options"]["lead"] == 1 and meta[1]["hooks"][0] == "blocks.0.resid_post"


def test_a_probe_can_store_only_its_outputs(tmp_path, tiny_loaded, tiny_model_dir):
    """hooks=() stores probe outputs and latents, no raw hook points; a probe's hook is only observed."""
    out = tmp_path / "only.zarr"
    capture(config(out, tiny_model_dir, hooks=(), probes=(BlockUpdateRatio(),)), loaded=tiny_loaded)
    s = open_store(out)
    assert not [n for n in s.array_names() if n.startswith("blocks.")]
    assert "probe.block_update_ratio.ratio" in s.array_names() and "latents" in s.array_names()
    assert s.meta["hooks"] == [] and s.completeness()["complete"]


# -- built-in probes against raw captures -----------------------------------------------------------

def test_residual_norms_is_the_rms_of_the_raw_capture(run):
    _, arrays = run
    raw = arrays["blocks.resid_post"].astype(np.float64)
    np.testing.assert_allclose(arrays["probe.residual_norms.rms"], np.sqrt((raw ** 2).mean((-2, -1))), rtol=1e-6)


def numpy_difference_modes(raw, lead=1, trail=1):
    """Independent reference: form the D×D covariance at step 0 and project later differences on it."""
    X = cond(raw)
    delta = (X[:, :, :M] - X[:, :, M:]).reshape(X.shape[0], X.shape[1], M, -1)  # step, layer, pair, D
    E = np.zeros((X.shape[0], X.shape[1], M))
    lams = []
    for l in range(X.shape[1]):
        C = delta[0, l].T @ delta[0, l] / M
        lam, W = np.linalg.eigh(C)
        lam, W = lam[::-1][:M], W[:, ::-1][:, :M]  # rank ≤ M: the rest is numerically zero
        lams.append(lam)
        E[:, l] = ((delta[:, l] @ W) ** 2).mean(axis=1) / lam
    R = E[..., -trail:].mean(-1) / E[..., :lead].mean(-1)
    return E, np.array(lams), R


def test_difference_modes_equal_a_plain_numpy_computation(run):
    _, arrays = run
    E_ref, lam_ref, R_ref = numpy_difference_modes(arrays["blocks.resid_post"])
    E = arrays["probe.difference_modes.energy"]
    assert E.shape == (STEPS, 4, M)
    assert (arrays["probe.difference_modes.n_modes"] == M).all()
    np.testing.assert_allclose(E[0], 1.0, rtol=1e-6)  # E_k(0, l) = 1 [75-76]
    assert not np.allclose(E[-1], 1.0)  # later steps moved: the comparison below is not trivial
    np.testing.assert_allclose(E, E_ref, rtol=1e-5)
    np.testing.assert_allclose(arrays["probe.difference_modes.eigenvalues"], lam_ref, rtol=1e-6)
    np.testing.assert_allclose(arrays["probe.difference_modes.R"], R_ref, rtol=1e-5)
    np.testing.assert_allclose(arrays["probe.difference_modes.E_lead"], E_ref[..., 0], rtol=1e-5)


def test_difference_modes_pair_replicas_like_halves(tiny_loaded):
    """pairs=replica on a (replica, sample) batch gives what pairs=halves gives on (sample) = [a; b]."""
    point = tiny_loaded.adapter.point("blocks.1.resid_post")
    g = torch.Generator().manual_seed(0)
    values = [torch.randn(2 * M, 16, 16, generator=g) for _ in range(3)]
    results = {}
    for pairs, axes in (("replica", (("replica", 2), ("sample", M))), ("halves", (("sample", 2 * M),))):
        p = DifferenceModes(pairs=pairs)
        p.start(RunInfo(steps=3, layers=(1,), batch_axes=axes, labels=(0,) * (2 * M if pairs == "halves" else M),
                        seeds=tuple(range(M)), timesteps=(3, 2, 1), hook_names=("blocks.1.resid_post",)))
        for s, v in enumerate(values):
            p.observe(point.name, v, HookContext(point.name, 1, s, None, axes, point))
            results.setdefault(pairs, []).append(p.end_step(s)["energy"].values.clone())
    for a, b in zip(results["replica"], results["halves"]):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(results["halves"][0], torch.ones(1, M, dtype=torch.float64))


# -- probes change nothing else ----------------------------------------------------------------------

def test_probes_leave_the_capture_unchanged(run, tmp_path, tiny_loaded, tiny_model_dir):
    _, with_probes = run
    out = tmp_path / "plain.zarr"
    capture(config(out, tiny_model_dir, probes=()), loaded=tiny_loaded)
    g = zarr.open_group(str(out), mode="r")
    plain = {k: np.asarray(g[k][...]) for k in g.array_keys()}
    assert set(with_probes) - set(plain) == {k for k in with_probes if k.startswith("probe.")}
    for k in plain:  # latents bit-for-bit, raw captures too
        np.testing.assert_array_equal(plain[k], with_probes[k], err_msg=k)


# -- resume ----------------------------------------------------------------------------------------

def interrupted(out, model_dir, loaded, **kw):
    session = CaptureSession(config(out, model_dir, **kw), loaded=loaded)
    session.hooks.add_hook("blocks.3.resid_post", Interrupt(2))
    with pytest.raises(StoreError, match="interrupted"):
        session.run()
    session.hooks.remove_all()


def test_resumable_probe_resumes_to_the_unbroken_run(tmp_path, tiny_loaded, tiny_model_dir):
    kw = dict(sampler=SamplerSpec("ddim", STEPS, eta=1.0, guidance=2.0), probes=("residual_norms",))
    capture(config(tmp_path / "full.zarr", tiny_model_dir, **kw), loaded=tiny_loaded)
    part = tmp_path / "part.zarr"
    interrupted(part, tiny_model_dir, tiny_loaded, **kw)
    res = capture(config(part, tiny_model_dir, mode="resume", **kw), loaded=tiny_loaded)
    assert (res.resumed_from, res.steps_run) == (2, STEPS - 2)
    A, B = (zarr.open_group(str(p), mode="r") for p in (tmp_path / "full.zarr", part))
    assert set(A.array_keys()) == set(B.array_keys())
    for k in A.array_keys():
        np.testing.assert_array_equal(np.asarray(A[k][...]), np.asarray(B[k][...]), err_msg=k)


def test_stateful_probe_refuses_to_resume_mid_way(tmp_path, tiny_loaded, tiny_model_dir):
    part = tmp_path / "part.zarr"
    interrupted(part, tiny_model_dir, tiny_loaded)
    with pytest.raises(StoreError, match="difference_modes carries state.*--overwrite"):
        capture(config(part, tiny_model_dir, mode="resume"), loaded=tiny_loaded)
    assert open_store(part).completeness()["resume_from_step"] == 2  # the store is left as it was


def test_resume_compares_probes(run, tmp_path, tiny_loaded, tiny_model_dir):
    out, _ = run
    with pytest.raises(StoreError, match="probes differs"):
        capture(config(out, tiny_model_dir, mode="resume", probes=("residual_norms",)), loaded=tiny_loaded)
    # a complete store "resumes" to nothing, stateful probes included
    assert capture(config(out, tiny_model_dir, mode="resume"), loaded=tiny_loaded).steps_run == 0


# -- refusals --------------------------------------------------------------------------------------

def test_bad_probes_are_refused_before_touching_disk(tmp_path, tiny_loaded, tiny_model_dir):
    out = tmp_path / "s.zarr"
    for probes, msg in [(("nosuch",), "unknown probe 'nosuch'"),
                        ((("difference_modes", {"leed": 2}),), "did you mean lead"),
                        ((("difference_modes", {"pairs": "triples"}),), "halves or replica"),
                        ((("difference_modes", {"lead": "many"}),), "bad value"),
                        ((("residual_norms", {"hook": "resid_pst"}),), "probe residual_norms: unknown hook point"),
                        (("residual_norms", "residual_norms"), "given twice"),
                        (("dithooks.probes.nomodule:X",), "cannot import")]:
        with pytest.raises(DithooksError, match=msg):
            CaptureSession(config(out, tiny_model_dir, probes=probes), loaded=tiny_loaded)
    with pytest.raises(ProbeError, match="even number"):
        CaptureSession(config(out, tiny_model_dir, seeds=(0, 1, 2), labels=(4,)), loaded=tiny_loaded)
    with pytest.raises(ProbeError, match="share a label"):
        CaptureSession(config(out, tiny_model_dir, seeds=(0, 1), labels=(1, 2)), loaded=tiny_loaded)
    assert not out.exists()


def test_outputs_must_name_their_dims_consistently(tmp_path, tiny_loaded, tiny_model_dir):
    class BadDims(Probe):
        needs = ("resid_post",)
        options = {"size": Option(3)}

        def start(self, run):
            self.run = run

        def observe(self, name, value, ctx):
            pass

        def end_step(self, step):  # "sample" exists in the store with another size
            return {"x": Output(torch.zeros(len(self.run.layers), self.opts["size"]), ("layer", "sample"))}

    with pytest.raises(ProbeError, match="dim 'sample' has size 3"):
        capture(config(tmp_path / "s.zarr", tiny_model_dir, probes=(BadDims(),)), loaded=tiny_loaded)
    assert BadDims(size="7").opts["size"] == 7  # CLI text is parsed by the default's type


def test_registry_finds_names_and_import_paths():
    assert type(make_probe("block_update_ratio")) is BlockUpdateRatio  # registered by importing examples
    assert type(make_probe("dithooks.probes.examples:BlockUpdateRatio", {"eps": "1e-3"})).__name__ == "BlockUpdateRatio"
    with pytest.raises(ProbeError, match="taken"):
        @register_probe("residual_norms")
        class Impostor(Probe):
            pass


# -- CLI -------------------------------------------------------------------------------------------

def cli():
    from dithooks.cli.probe_cmd import register

    app = typer.Typer()
    register(app)
    return lambda *args: CliRunner().invoke(app, [str(a) for a in args])


def test_cli_probe_difference_modes_json(tmp_path, tiny_model_dir):
    invoke = cli()
    out = tmp_path / "m.zarr"
    r = invoke("probe", "difference_modes", "--model", tiny_model_dir, "--layers", "0-3", "--steps", "3",
               "--seeds", "0-3", "--class", "1", "--option", "lead=1", "-O", "trail=1", "--out", out, "--json")
    assert r.exit_code == 0, r.output
    j = json.loads(r.output)
    arrays = {a["name"]: a for a in j["arrays"]}
    assert arrays["probe.difference_modes.energy"]["dims"] == ["step", "layer", "mode"]
    assert arrays["probe.difference_modes.energy"]["shape"] == [3, 4, 2]
    assert j["probe"]["options"]["lead"] == 1 and j["steps_run"] == 3
    assert not [n for n in open_store(out).array_names() if n.startswith("blocks.")]
    listing = json.loads(invoke("probes", "--json").output)
    names = {p["probe"]: p for p in listing["probes"]}
    assert "lead" in names["difference_modes"]["options"] and names["residual_norms"]["resumable"] is True


@pytest.mark.parametrize("args, msg", [
    (("probe", "nosuch"), "unknown probe"),
    (("probe", "difference_modes", "--option", "leed=1"), "did you mean lead"),
    (("probe", "difference_modes", "--option", "lead"), "key=value"),
    (("probe", "difference_modes", "--option", "centre=maybe"), "not a boolean"),
    (("probe", "difference_modes", "--seeds", "0-2"), "even number"),
])
def test_cli_probe_errors_are_one_line(args, msg, tmp_path, tiny_model_dir):
    r = cli()(*args, "--model", tiny_model_dir, "--steps", "2", "--out", tmp_path / "x.zarr")
    assert r.exit_code == 2, r.output
    assert msg in r.output and "Traceback" not in r.output
    assert len([l for l in r.output.splitlines() if l.startswith("dithooks: error:")]) == 1
    assert not (tmp_path / "x.zarr").exists()
