"""The built-in ``attention_width`` probe (THEORY §5 [92]) against plain numpy on raw patterns."""

import numpy as np
import pytest
import torch
import typer
import zarr
from typer.testing import CliRunner

from dithooks.capture import CaptureConfig, capture
from dithooks.probes.api import ProbeError, make_probe
from dithooks.probes.width import STATS, AttentionWidth
from dithooks.sampling import ReplicaSpec, SamplerSpec

STEPS = 3
SEEDS = (0, 1, 2)
N = 16  # tokens of the tiny DiT: (sample_size 8 / patch 2)²
HEADS = 2
QUERIES = (0, 5, 15)
P = "probe.attention_width."


def config(out, model_dir, **kw):
    base = dict(out=str(out), model=str(model_dir), layers="0-3", hooks=("attn.pattern",),
                sampler=SamplerSpec("ddim", STEPS, guidance=2.0), labels=(4,), seeds=SEEDS,
                storage_dtype="fp32", probes=(AttentionWidth(queries="0,5,15"),))
    base.update(kw)
    return CaptureConfig(**base)


def arrays(out):
    g = zarr.open_group(str(out), mode="r")
    return {k: np.asarray(g[k][...]) for k in g.array_keys()}


@pytest.fixture(scope="module")
def pooled(tmp_path_factory, tiny_loaded, tiny_model_dir):
    """Guided run: raw attn.pattern (fp32) beside the probe with the default pooling and 3 query rows."""
    out = tmp_path_factory.mktemp("width") / "w.zarr"
    capture(config(out, tiny_model_dir), loaded=tiny_loaded)
    return out, arrays(out)


@pytest.fixture(scope="module")
def per_sample(tmp_path_factory, tiny_loaded, tiny_model_dir):
    out = tmp_path_factory.mktemp("width") / "ws.zarr"
    capture(config(out, tiny_model_dir, probes=(("attention_width", {"per_sample": True, "queries": "5"}),)),
            loaded=tiny_loaded)
    return out, arrays(out)


def numpy_n_eff(pattern):
    """Independent reference [92]: (step, layer, cfg, sample, head, query, key) → N_eff, float64."""
    A = pattern.astype(np.float64)
    return 1.0 / (A ** 2).sum(-1)


def numpy_stats(x, axis):
    """min, q25, median, q75, max, mean over ``axis`` (numpy's linear-interpolation quartiles), last."""
    q = np.percentile(x, [25, 50, 75], axis=axis)
    return np.stack([x.min(axis), q[0], q[1], q[2], x.max(axis), x.mean(axis)], axis=-1)


# -- against numpy ---------------------------------------------------------------------------------

def test_pooled_stats_equal_numpy_on_the_raw_pattern(pooled):
    _, a = pooled
    n_eff = numpy_n_eff(a["blocks.attn.pattern"])  # step, layer, cfg, sample, head, query
    # pool cfg, sample and query: move head before them, then flatten them into one axis
    per_head = n_eff.transpose(0, 1, 4, 2, 3, 5).reshape(STEPS, 4, HEADS, -1)
    stats = a[P + "n_eff_stats"]
    assert stats.shape == (STEPS, 4, HEADS, len(STATS))
    np.testing.assert_allclose(stats, numpy_stats(per_head, -1), rtol=1e-5)
    np.testing.assert_allclose(a[P + "n_eff_headmean"], n_eff.mean((2, 3, 4)), rtol=1e-5)


def test_headmean_map_is_the_head_and_batch_mean_of_the_chosen_rows(pooled):
    _, a = pooled
    A = a["blocks.attn.pattern"].astype(np.float64)
    want = A.mean(4)[..., list(QUERIES), :].mean((2, 3))  # heads, then cfg and sample
    got = a[P + "headmean_map"]
    assert got.shape == (STEPS, 4, len(QUERIES), N)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)


def test_per_sample_keeps_the_batch_dims(per_sample):
    _, a = per_sample
    n_eff = numpy_n_eff(a["blocks.attn.pattern"])  # step, layer, cfg, sample, head, query
    stats = a[P + "n_eff_stats"]
    assert stats.shape == (STEPS, 4, 2, len(SEEDS), HEADS, len(STATS))
    np.testing.assert_allclose(stats, numpy_stats(n_eff, -1), rtol=1e-5)
    np.testing.assert_allclose(a[P + "n_eff_headmean"], n_eff.mean(4), rtol=1e-5)
    A = a["blocks.attn.pattern"].astype(np.float64)
    np.testing.assert_allclose(a[P + "headmean_map"], A.mean(4)[..., [5], :], rtol=1e-5, atol=1e-7)


def test_query_tiles_give_the_same_widths(pooled, tmp_path, tiny_loaded, tiny_model_dir):
    """Without a raw pattern the processor reduces in query tiles (here 5, 5, 5, 1 rows): same outputs."""
    out = tmp_path / "tiled.zarr"
    capture(config(out, tiny_model_dir, hooks=(), query_tile=5), loaded=tiny_loaded)
    a, ref = arrays(out), pooled[1]
    for name in ("n_eff_stats", "n_eff_headmean", "headmean_map"):
        np.testing.assert_allclose(a[P + name], ref[P + name], rtol=1e-5, atol=1e-7, err_msg=name)


def test_replica_runs_pool_or_keep_the_replica_axis(tmp_path, tiny_loaded, tiny_model_dir):
    out = tmp_path / "rep.zarr"
    capture(config(out, tiny_model_dir, seeds=(0, 1), replicas=ReplicaSpec(g=0.5),
                   probes=(AttentionWidth(per_sample=True, queries="2"),)), loaded=tiny_loaded)
    a = arrays(out)
    n_eff = numpy_n_eff(a["blocks.attn.pattern"])  # step, layer, replica, cfg, sample, head, query
    assert a[P + "n_eff_stats"].shape == (STEPS, 4, 2, 2, 2, HEADS, len(STATS))
    np.testing.assert_allclose(a[P + "n_eff_stats"], numpy_stats(n_eff, -1), rtol=1e-5)
    assert a[P + "headmean_map"].shape == (STEPS, 4, 2, 2, 2, 1, N)


# -- identities --------------------------------------------------------------------------------------

def test_widths_lie_in_1_to_N_and_map_rows_sum_to_1(pooled, per_sample):
    for _, a in (pooled, per_sample):
        for name in ("n_eff_stats", "n_eff_headmean"):
            x = a[P + name]
            assert np.isfinite(x).all()
            assert x.min() >= 1 - 1e-5 and x.max() <= N * (1 + 1e-5), name
        s = a[P + "n_eff_stats"]  # min ≤ q25 ≤ median ≤ q75 ≤ max, and min ≤ mean ≤ max
        assert (np.diff(s[..., :5], axis=-1) >= -1e-5).all()
        assert ((s[..., 0] <= s[..., 5] + 1e-5) & (s[..., 5] <= s[..., 4] + 1e-5)).all()
        np.testing.assert_allclose(a[P + "headmean_map"].sum(-1), 1.0, rtol=1e-5)


def test_a_uniform_pattern_has_width_N(tmp_path, tiny_model_dir):
    """Zero queries in block 0 make every logit 0, so every row is uniform: N_eff = N exactly."""
    from dithooks.loading import load_model

    loaded = load_model(str(tiny_model_dir))  # a private copy: its weights are changed below
    q = loaded.transformer.transformer_blocks[0].attn1.to_q
    with torch.no_grad():
        q.weight.zero_()
        q.bias.zero_()
    out = tmp_path / "u.zarr"
    capture(config(out, tiny_model_dir, layers="0", hooks=()), loaded=loaded)
    a = arrays(out)
    assert a[P + "n_eff_stats"].shape == (STEPS, 1, HEADS, len(STATS))
    np.testing.assert_allclose(a[P + "n_eff_stats"], N, rtol=1e-6)
    np.testing.assert_allclose(a[P + "n_eff_headmean"], N, rtol=1e-6)
    np.testing.assert_allclose(a[P + "headmean_map"], 1 / N, rtol=1e-6)


# -- the store -------------------------------------------------------------------------------------

def test_outputs_open_in_xarray_with_named_dims(pooled, per_sample):
    xr = pytest.importorskip("xarray")
    ds = xr.open_zarr(pooled[0])
    assert ds[P + "n_eff_stats"].dims == ("step", "layer", "head", "stat")
    assert ds[P + "n_eff_headmean"].dims == ("step", "layer", "query")
    assert ds[P + "headmean_map"].dims == ("step", "layer", "query_token", "key")
    assert list(ds[P + "n_eff_stats"]["layer"].values) == [0, 1, 2, 3]
    assert "stat: " + ", ".join(STATS) in ds[P + "n_eff_stats"].attrs["description"]
    meta = ds.attrs["dithooks"]["probes"][0]
    assert meta["stats"] == list(STATS) and meta["resumable"] is True
    assert meta["options"]["queries"] == list(QUERIES) and meta["hooks"][-1] == "blocks.3.attn.pattern_headmean"
    ds = xr.open_zarr(per_sample[0])
    assert ds[P + "n_eff_stats"].dims == ("step", "layer", "cfg", "sample", "head", "stat")
    assert ds[P + "headmean_map"].dims == ("step", "layer", "cfg", "sample", "query_token", "key")
    assert list(ds[P + "headmean_map"]["cfg"].values) == ["cond", "uncond"]


def test_without_queries_no_head_mean_pattern_is_requested(tmp_path, tiny_loaded, tiny_model_dir):
    out = tmp_path / "n.zarr"
    capture(config(out, tiny_model_dir, hooks=(), probes=("attention_width",)), loaded=tiny_loaded)
    a = arrays(out)
    assert P + "headmean_map" not in a and P + "n_eff_stats" in a
    assert make_probe("attention_width").hook_points() == ("attn.n_eff",)


# -- hooks are passive ---------------------------------------------------------------------------------

def test_the_probe_leaves_the_latents_unchanged(pooled, tmp_path, tiny_loaded, tiny_model_dir):
    """The probe only reads: latents equal a run that asks the processor for the same values raw.

    Asking for any attention statistic moves a hooked layer from fused SDPA to the processor's
    explicit softmax, equal to SDPA only to float error; so against a run with no attention
    hooks at all the latents agree closely, not bit-for-bit (a processor property, not the probe's).
    """
    runs = {}
    for key, kw in {"probe": dict(hooks=()),
                    "raw": dict(hooks=("attn.n_eff", "attn.pattern_headmean"), probes=()),
                    "plain": dict(hooks=(), probes=())}.items():
        out = tmp_path / f"{key}.zarr"
        capture(config(out, tiny_model_dir, **kw), loaded=tiny_loaded)
        runs[key] = arrays(out)["latents"]
    np.testing.assert_array_equal(runs["probe"], runs["raw"])
    np.testing.assert_array_equal(runs["probe"], pooled[1]["latents"])  # raw attn.pattern beside it too
    np.testing.assert_allclose(runs["probe"], runs["plain"], rtol=1e-4, atol=1e-5)


# -- refusals ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("options, msg", [
    ({"queries": "-1"}, "≥ 0"),
    ({"queries": [3, -2]}, "≥ 0"),
    ({"queries": "a,b"}, "bad value 'a,b' for option 'queries'"),
    ({"queries": 2.5}, "token indices like"),
    ({"per_sample": "maybe"}, "not a boolean"),
    ({"per_sampel": True}, "did you mean per_sample"),
])
def test_bad_options_are_one_line_probe_errors(options, msg):
    with pytest.raises(ProbeError, match=msg) as e:
        make_probe("attention_width", options)
    assert "\n" not in str(e.value)


def test_query_beyond_the_token_count_is_refused(tmp_path, tiny_loaded, tiny_model_dir):
    with pytest.raises(ProbeError, match=r"queries \[16\] out of range: this model has 16 tokens") as e:
        capture(config(tmp_path / "q.zarr", tiny_model_dir, hooks=(), probes=(AttentionWidth(queries="3,16"),)),
                loaded=tiny_loaded)
    assert "\n" not in str(e.value)
    assert not (tmp_path / "q.zarr").exists()  # refused before the store is created


def test_cli_runs_the_probe_and_reports_bad_queries_in_one_line(tmp_path, tiny_model_dir):
    from dithooks.cli.probe_cmd import register

    app = typer.Typer()
    register(app)

    def invoke(*args):
        return CliRunner().invoke(app, [str(x) for x in args])

    common = ("--model", tiny_model_dir, "--layers", "0-3", "--steps", "2", "--seeds", "0-1")
    r = invoke("probe", "attention_width", "-O", "per_sample=true", "-O", "queries=1,2", *common,
               "--out", tmp_path / "ok.zarr", "--json")
    assert r.exit_code == 0, r.output
    assert '"probe.attention_width.n_eff_stats"' in r.output and '"probe.attention_width.headmean_map"' in r.output
    r = invoke("probe", "attention_width", "-O", "queries=99", *common, "--out", tmp_path / "bad.zarr")
    assert r.exit_code == 2, r.output
    assert "queries [99] out of range" in r.output and "Traceback" not in r.output
    assert not (tmp_path / "bad.zarr").exists()
    r = invoke("probes", "--json")
    assert '"attention_width"' in r.output
