import json

import pytest
from typer.testing import CliRunner

from dithooks.cli.main import app

from .conftest import shards_per_step

runner = CliRunner()


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def store(tmp_path_factory, tiny_model_dir):
    out = tmp_path_factory.mktemp("cli") / "c.zarr"
    with shards_per_step():  # a test deletes one step's files
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


# -- query: selections, incomplete and damaged stores (the read side) ---------------------------
@pytest.mark.parametrize("args,msg", [
    (("--step", "abc"), "malformed --step 'abc'"),
    (("--step", "0:50:0"), "a slice step cannot be 0"),
    (("--step", "1.5"), "'1.5' is not an index"),
    (("--step", ""), "empty --step"),
    (("--layer", "20-"), "no captured layer in 20- (captured: 0,2)"),
    (("--layer", "1"), "layer 1 is not in the store (captured: 0,2)"),
    (("--limit", "-1"), "--limit -1"),
    (("--json", "--csv"), "--json and --csv exclude each other"),
    (("--cfg", "both"), "cfg 'both' is not in the store"),
    (("--over", "head"), "cannot reduce over 'head'"),
])
def test_query_refuses_bad_selections_with_one_line(store, args, msg):
    r = run("query", store, "blocks.resid_post", *args)
    assert r.exit_code == 2, r.output
    assert msg in r.stderr and "Traceback" not in r.output
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("dithooks: error:")


def test_query_layer_ranges_and_limit(store):
    j = json.loads(run("query", store, "blocks.resid_post", "--layer", "1-", "--step", "0", "--json").stdout)
    assert {r["layer"] for r in j["records"]} == {2}
    j = json.loads(run("query", store, "blocks.resid_post", "--layer", "-1", "--step", "-1", "--json").stdout)
    assert {(r["layer"], r["step"]) for r in j["records"]} == {(2, 3)}
    r = run("query", store, "blocks.resid_post", "--limit", "3")
    assert r.exit_code == 0 and "... 45 more rows" in r.output  # 4 steps x 2 layers x 2 cfg x 3 samples = 48


def step_chunks(array_dir, step):
    """The chunk files of one step (first chunk index) under either key separator ("c/3/0" or "c.3.0")."""
    files = sorted(p for p in array_dir.rglob("*") if p.is_file() and p.name != "zarr.json")
    found = [p for p in files if p.relative_to(array_dir).as_posix().replace("/", ".").startswith(f"c.{step}.")]
    assert found, f"no chunk files of step {step} in {array_dir}"
    return found


def test_query_refuses_incomplete_steps_and_missing_chunks(store, tmp_path):
    import shutil

    import numpy as np
    import zarr

    part = tmp_path / "part.zarr"
    shutil.copytree(store, part)
    zarr.open_array(str(part / "step_complete"), mode="r+")[3] = False  # as if killed before step 3
    for chunk in step_chunks(part / "blocks.resid_post", 3):
        chunk.unlink()
    r = run("query", part, "blocks.resid_post", "--step", "2:4")
    assert r.exit_code == 2 and "step 3 is not complete" in r.stderr and "complete steps: 0-2" in r.stderr
    assert run("query", part, "blocks.resid_post", "--step", "0:3").exit_code == 0
    r = run("query", part, "blocks.resid_post", "--step", "2:4", "--allow-incomplete", "--json")
    assert r.exit_code == 0 and r.stderr.startswith("dithooks: warning:") and "step" in r.stderr
    j = json.loads(r.stdout)
    assert j["incomplete_steps"] == [3] and j["nan_chunks"] > 0
    assert all(rec["norm"] is None for rec in j["records"] if rec["step"] == 3)  # NaN, never 0
    assert all(rec["norm"] > 0 for rec in j["records"] if rec["step"] == 2)
    # a chunk file deleted from a complete step is damage, not zeros
    victim = step_chunks(part / "final.out", 1)[0]
    victim.unlink()
    r = run("query", part, "final.out", "--step", "1")
    assert r.exit_code == 2 and "is missing although its step is marked complete" in r.stderr
    r = run("query", part, "final.out", "--step", "0:2", "--allow-incomplete", "--csv")
    assert r.exit_code == 0 and "nan" in r.stdout
    assert np.isfinite([float(line.split(",")[-2]) for line in r.stdout.splitlines()[1:] if line.startswith("0,")]).all()


def test_a_closed_pipe_ends_quietly(store):
    """`dithooks query ... | head -1`: no error line when the reader goes away (output > a pipe's buffer)."""
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-m", "dithooks.cli.main", "query", str(store), "blocks.resid_post",
                             "--reduce", "none", "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, bufsize=0)
    proc.stdout.read(1)  # the reader takes one byte and leaves
    proc.stdout.close()
    stderr = proc.stderr.read().decode()
    rc = proc.wait(timeout=60)
    assert "error" not in stderr.lower() and "Traceback" not in stderr, stderr
    assert rc == 0  # ~150 KB of JSON: the writes found the pipe closed and stopped quietly
