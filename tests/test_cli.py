import json

import pytest
from typer.testing import CliRunner

from dithooks.cli.main import app

runner = CliRunner()


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def store(tmp_path_factory, tiny_model_dir):
    out = tmp_path_factory.mktemp("cli") / "c.zarr"
    r = run("capture", "--model", tiny_model_dir, "--layers", "0,2", "--hooks", "resid_post,final.out",
            "--steps", "4", "--seeds", "0-2", "--class", "5", "-g", "2", "--out", out, "-q")
    assert r.exit_code == 0, r.output
    assert "wrote" in r.output
    return out


def test_ls_shows_arrays_and_completeness(store):
    r = run("ls", store)
    assert r.exit_code == 0, r.output
    assert "blocks.resid_post" in r.output and "status    complete" in r.output
    j = json.loads(run("ls", store, "--json").output)
    assert j["completeness"]["complete"] is True
    arr = {a["name"]: a for a in j["arrays"]}
    assert arr["blocks.resid_post"]["dims"] == ["step", "layer", "cfg", "sample", "token", "channel"]
    assert arr["blocks.resid_post"]["shape"] == [4, 2, 2, 3, 16, 16]


def test_query_reduces_and_slices(store):
    import numpy as np
    from dithooks.store.reader import open_store

    j = json.loads(run("query", store, "blocks.2.resid_post", "--step", "1:3", "--cfg", "cond", "--sample", "0",
                       "--reduce", "rms", "--json").output)
    assert [(r["step"], r["layer"], r["cfg"], r["sample"]) for r in j["records"]] == [(1, 2, "cond", 0), (2, 2, "cond", 0)]
    v = open_store(store).select("blocks.resid_post").values[1, 1, 0, 0].astype(np.float64)
    assert j["records"][0]["rms"] == pytest.approx(float(np.sqrt((v**2).mean())), rel=1e-6)
    csv = run("query", store, "blocks.resid_post", "--step", "-1", "--csv").output.strip().splitlines()
    assert csv[0] == "step,layer,cfg,sample,norm,timestep" and len(csv) == 1 + 2 * 2 * 3
    table = run("query", store, "final.out", "--over", "height,width", "--step", "0", "--sample", "0")
    assert table.exit_code == 0 and "out_channel" in table.output


@pytest.mark.parametrize("args,msg", [
    (("query", "{store}", "blocks.9.resid_post"), "not captured"),
    (("query", "{store}", "blocks.0.resid_pst"), "did you mean"),
    (("query", "{store}", "blocks.0.resid_post", "--step", "99"), "out of range"),
    (("query", "{store}", "blocks.0.resid_post", "--reduce", "median"), "unknown reduction"),
    (("ls", "/nonexistent/store.zarr"), "no store"),
    (("capture", "--model", "{model}", "--layers", "0-27", "--out", "{tmp}/x.zarr"), "blocks 0-3"),
    (("capture", "--model", "{model}", "--hooks", "qkv", "--out", "{tmp}/x.zarr"), "unknown hook point"),
    (("capture", "--model", "{tmp}/missing", "--out", "{tmp}/x.zarr"), "no model directory"),
    (("capture", "--model", "{model}", "--out", "{store}"), "already exists"),
    (("capture", "--model", "{model}", "--seeds", "a-b", "--out", "{tmp}/x.zarr"), "malformed seeds"),
    (("capture", "--model", "{model}", "--resume", "--overwrite", "--out", "{tmp}/x.zarr"), "exclude"),
])
def test_user_errors_are_one_line_without_traceback(args, msg, store, tiny_model_dir, tmp_path):
    fmt = {"store": store, "model": tiny_model_dir, "tmp": tmp_path}
    r = run(*[a.format(**fmt) for a in args])
    assert r.exit_code == 2, r.output
    assert msg in r.output
    assert "Traceback" not in r.output
    lines = [l for l in r.output.splitlines() if l.startswith("dithooks: error:")]
    assert len(lines) == 1


def test_hooks_listing(tiny_model_dir):
    r = run("hooks", "--model", tiny_model_dir, "--layer", "1", "--json")
    names = [p["hook point"] for p in json.loads(r.output)["hook_points"]]
    assert "blocks.1.resid_mid" in names and "final.out" in names and "blocks.0.resid_mid" not in names
