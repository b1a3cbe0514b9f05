"""Many workers capture into one store (dithooks/capture/multi.py): 2 CPU worker processes give
the same values as one process, readers see one dataset, a dead worker's region is named and
``--resume`` completes it to the same bytes."""

import json

import numpy as np
import pytest
import zarr

from dithooks.capture import CaptureConfig, capture
from dithooks.capture.multi import (REGION_COMPLETE, capture_workers, region_report, run_region, split_regions)
from dithooks.errors import DithooksError, StoreError
from dithooks.sampling import SamplerSpec
from dithooks.store.reader import open_store

pytestmark = pytest.mark.usefixtures("one_torch_thread")

HOOKS = ("resid_post", "attn.out", "final.out")


def config(out, model_dir, **kw):
    base = dict(out=str(out), model=str(model_dir), layers="0-1", hooks=HOOKS,
                sampler=SamplerSpec("ddpm", 3, eta=1.0, guidance=2.0), labels=(1, 2, 3, 4),
                seeds=(10, 11, 12, 13), storage_dtype="fp32")
    base.update(kw)
    return CaptureConfig(**base)


def data_arrays(path):
    g = zarr.open_group(str(path), mode="r")
    return {k: np.asarray(a[...]) for k, a in g.arrays()}


def assert_same_values(multi, single):
    a, b = data_arrays(multi), data_arrays(single)
    assert set(a) - set(b) == {REGION_COMPLETE}
    assert set(b) <= set(a)
    for k in b:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert a[k].tobytes() == b[k].tobytes(), k  # bit for bit (NaN patterns included)


def assert_same_as_regions(multi, parts, rtol=0.0):
    """Every array of ``multi`` equals the single-process stores ``parts`` (one per region, in
    order) joined along ``sample``: bit for bit when rtol is 0."""
    a = data_arrays(multi)
    g = zarr.open_group(str(parts[0]), mode="r")
    for k in data_arrays(parts[0]):
        if k in ("sample",):
            continue
        dims = g[k].metadata.dimension_names
        if "sample" not in dims:
            continue
        joined = np.concatenate([data_arrays(p)[k] for p in parts], axis=dims.index("sample"))
        if rtol == 0.0:
            assert a[k].tobytes() == joined.tobytes(), k
        else:
            np.testing.assert_allclose(a[k], joined, rtol=rtol, atol=rtol, err_msg=k)


@pytest.fixture(scope="module")
def single(tmp_path_factory, tiny_model_dir, tiny_loaded):
    out = tmp_path_factory.mktemp("single") / "one.zarr"
    capture(config(out, tiny_model_dir), tiny_loaded)
    return out


def test_split_regions():
    assert split_regions(4, 2) == [(0, 2), (2, 4)]
    assert split_regions(5, 2) == [(0, 3), (3, 5)]
    with pytest.raises(DithooksError):
        split_regions(2, 3)
    with pytest.raises(DithooksError):
        split_regions(4, 3)  # 2+2 leaves the third worker nothing


def test_two_workers_equal_one_process(tmp_path, tiny_model_dir, tiny_loaded, single):
    out = tmp_path / "multi.zarr"
    # the regions one after another in this process (spawned processes: the CLI and torchrun tests)
    summary = capture_workers(config(out, tiny_model_dir), 2, tiny_loaded, spawn=False)
    assert summary["status"] == "complete" and summary["incomplete_regions"] == []
    assert_same_values(out, single)
    # no two workers share a chunk file: every data array is chunked by region along sample
    for name in ("blocks.resid_post", "latents", "rng_state", "final.out"):
        meta = json.loads((out / name / "zarr.json").read_text())
        dims = meta["dimension_names"]
        grid = meta["chunk_grid"]["configuration"]["chunk_shape"]
        assert grid[dims.index("sample")] == 2, name
    m1 = zarr.open_group(str(out), mode="r").attrs["dithooks"]
    m0 = zarr.open_group(str(single), mode="r").attrs["dithooks"]
    assert m1["regions"] == [[0, 2], [2, 4]] and m1["status"] == "complete"
    differ = {k for k in set(m0) | set(m1) if m0.get(k) != m1.get(k)}
    # time stamps, the extra key and the command (both Python here) are all that differ
    assert differ <= {"started", "finished", "runs", "regions"}
    # readers see one dataset
    store = open_store(out)
    x = store.select("blocks.resid_post", step=1, layer=0)
    ref = open_store(single).select("blocks.resid_post", step=1, layer=0)
    assert np.array_equal(np.asarray(x.values), np.asarray(ref.values))
    import xarray as xr

    ds = xr.open_zarr(str(out))
    assert ds["blocks.resid_post"].sizes["sample"] == 4
    assert list(ds["seed"].values) == [10, 11, 12, 13]


def test_cli_ls_query_verify_read_it(tmp_path, tiny_model_dir, tiny_loaded):
    from typer.testing import CliRunner

    from dithooks.cli.main import app

    out = tmp_path / "m.zarr"
    capture_workers(config(out, tiny_model_dir, sampler=SamplerSpec("ddim", 2)), 2, tiny_loaded, spawn=False)
    r = CliRunner()
    res = r.invoke(app, ["verify", str(out)])
    assert res.exit_code == 0, res.output
    res = r.invoke(app, ["ls", str(out)])
    assert res.exit_code == 0 and "complete" in res.output, res.output
    res = r.invoke(app, ["query", str(out), "blocks.resid_post", "--step", "1", "--layer", "0"])
    assert res.exit_code == 0, res.output


def test_dead_worker_is_named_and_resume_completes_it(tmp_path, tiny_model_dir, tiny_loaded, single):
    out = tmp_path / "multi.zarr"
    cfg = config(out, tiny_model_dir)
    with pytest.raises(StoreError, match=r"region 1 \(samples 2-3\) holds steps 0-0 of 0-2"):
        capture_workers(cfg, 2, tiny_loaded, fail={1: 1}, spawn=False)
    rep = region_report(out)
    assert rep["regions"][0]["steps"] == [0, 1, 2] and rep["regions"][1]["steps"] == [0]
    assert rep["regions"][1]["status"] == "failed"
    assert rep["complete_steps"] == [0]
    sc = np.asarray(zarr.open_array(str(out / "step_complete"), mode="r")[...])
    assert sc.tolist() == [True, False, False]
    meta = zarr.open_group(str(out), mode="r").attrs["dithooks"]
    assert meta["status"] == "failed" and "region 1" in meta["error"]
    from typer.testing import CliRunner

    from dithooks.cli.main import app

    res = CliRunner().invoke(app, ["ls", str(out)])
    assert "failed" in res.output and "region 1 (samples 2-3) holds steps 0-0 of 0-2" in res.output, res.output
    # a region being written is refused to a second writer of it, with one line
    from dithooks.store.lock import StoreLock, StoreLocked

    with StoreLock(out / ".dithooks-regions" / "1"):
        with pytest.raises(StoreLocked, match="is being written by"):
            run_region(config(out, tiny_model_dir, mode="resume"), 1, tiny_loaded)
    # a worker interrupted (Ctrl-C / the launcher's SIGTERM) says what its region holds
    from dithooks.capture.multi import RegionSession

    def interrupt_at_once(steps):
        raise KeyboardInterrupt
        yield from steps

    with pytest.raises(StoreError, match=r"capture interrupted: region 1 \(samples 2-3\) holds steps 0-0 of 0-2"):
        RegionSession(config(out, tiny_model_dir), 1, tiny_loaded).run(progress=interrupt_at_once)
    # the killed worker alone, restarted: redoes its region's steps 1-2 only
    res = run_region(config(out, tiny_model_dir, mode="resume"), 1, tiny_loaded)
    assert res.resumed_from == 1 and res.steps_run == 2
    # ... and the launcher's resume merges (worker 0 has nothing left to do)
    summary = capture_workers(config(out, tiny_model_dir, mode="resume"), 2, tiny_loaded, spawn=False)
    assert summary["status"] == "complete" and summary["worker_seconds"][0] is not None
    assert_same_values(out, single)


def _cli_args(out, model_dir, *extra):
    return ["capture", "--out", str(out), "--model", str(model_dir), "--layers", "0-1", "--hooks", "resid_post",
            "--steps", "2", "--seeds", "0-3", "--dtype", "fp32", *extra]


def test_cli_workers_equals_one_process(tmp_path, tiny_model_dir):
    from typer.testing import CliRunner

    from dithooks.cli.main import app

    r = CliRunner()
    res = r.invoke(app, _cli_args(tmp_path / "two.zarr", tiny_model_dir, "--workers", "2", "--json"))
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["status"] == "complete"
    # guidance 1: the model's batch is 2 rows per worker, 4 in one process, and this CPU's matmuls
    # round differently at those batch sizes (~1e-6; the same happens without dithooks: a sampler
    # run of seeds 0-1 differs from the first rows of a run of 0-3). Each region is bit for bit
    # the single-process capture of its own seeds; the whole agrees to float rounding.
    for i, seeds in enumerate(("0-1", "2-3")):
        args = _cli_args(tmp_path / f"r{i}.zarr", tiny_model_dir, "--quiet")
        args[args.index("--seeds") + 1] = seeds
        res = r.invoke(app, args)
        assert res.exit_code == 0, res.output
    assert_same_as_regions(tmp_path / "two.zarr", [tmp_path / "r0.zarr", tmp_path / "r1.zarr"])
    res = r.invoke(app, _cli_args(tmp_path / "one.zarr", tiny_model_dir, "--quiet"))
    assert res.exit_code == 0, res.output
    assert_same_as_regions(tmp_path / "two.zarr", [tmp_path / "one.zarr"], rtol=1e-4)
    res = r.invoke(app, _cli_args(tmp_path / "two.zarr", tiny_model_dir, "--workers", "2"))
    assert res.exit_code != 0 and "already exists" in res.output
    res = r.invoke(app, _cli_args(tmp_path / "x.zarr", tiny_model_dir, "--workers", "5"))
    assert res.exit_code != 0 and "more than the 4 seeds" in res.output and "Traceback" not in res.output


def test_torchrun_two_ranks_on_cpu(tmp_path, tiny_model_dir):
    import os

    import subprocess
    import sys
    from pathlib import Path

    torchrun = Path(sys.executable).parent / "torchrun"
    exe = Path(sys.executable).parent / "dithooks"
    if not torchrun.exists() or not exe.exists():
        pytest.skip("torchrun or the dithooks script is not installed")
    from typer.testing import CliRunner

    from dithooks.cli.main import app

    g2 = ("--guidance", "2")  # batch-invariant on this CPU (see test_cli_workers_equals_one_process)
    res = CliRunner().invoke(app, _cli_args(tmp_path / "one.zarr", tiny_model_dir, "--quiet", *g2))
    assert res.exit_code == 0, res.output
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.run([str(torchrun), "--standalone", "--nproc-per-node", "2", "--no-python", str(exe),
                        *_cli_args(tmp_path / "tr.zarr", tiny_model_dir, "--quiet", *g2)],
                       capture_output=True, text=True, env=env, timeout=240)
    assert p.returncode == 0, p.stdout + p.stderr
    assert_same_values(tmp_path / "tr.zarr", tmp_path / "one.zarr")
    assert zarr.open_group(str(tmp_path / "tr.zarr"), mode="r").attrs["dithooks"]["regions"] == [[0, 2], [2, 4]]



def test_uneven_regions_and_replica_pairs(tmp_path, tiny_model_dir, tiny_loaded):
    """5 seeds on 2 workers (regions of 3 and 2: the last shard is an edge shard) and replica
    pairs (sample is not the first batch dim): each region equals its own single-process capture."""
    from dithooks.sampling import ReplicaSpec

    for kw, seeds in (({}, (10, 11, 12, 13, 14)), ({"replicas": ReplicaSpec(kappa=0.5)}, (10, 11, 12))):
        name = "pairs" if kw else "uneven"
        base = dict(sampler=SamplerSpec("ddim", 2), labels=(1,), seeds=seeds, **kw)
        out = tmp_path / f"{name}.zarr"
        capture_workers(config(out, tiny_model_dir, **base), 2, tiny_loaded, spawn=False)
        regions = split_regions(len(seeds), 2)
        parts = []
        for i, (lo, hi) in enumerate(regions):
            p = tmp_path / f"{name}{i}.zarr"
            capture(config(p, tiny_model_dir, **{**base, "seeds": seeds[lo:hi]}), tiny_loaded)
            parts.append(p)
        assert_same_as_regions(out, parts)
        assert open_store(out).meta["status"] == "complete"


def test_refused_before_anything_is_written(tmp_path, tiny_model_dir, tiny_loaded):
    from dithooks.capture.multi import MultiStore

    with pytest.raises(DithooksError, match="probes cannot run in a multi-worker capture"):
        MultiStore(config(tmp_path / "p.zarr", tiny_model_dir, probes=("residual_norms",)), 2, tiny_loaded)
    single_store = tmp_path / "s.zarr"
    capture(config(single_store, tiny_model_dir, sampler=SamplerSpec("ddim", 1)), tiny_loaded)
    with pytest.raises(StoreError, match="single-process store"):
        run_region(config(single_store, tiny_model_dir, sampler=SamplerSpec("ddim", 1)), 0, tiny_loaded)
    multi = tmp_path / "m.zarr"
    capture_workers(config(multi, tiny_model_dir, sampler=SamplerSpec("ddim", 1)), 2, tiny_loaded, spawn=False)
    with pytest.raises(StoreError, match="other labels"):
        run_region(config(multi, tiny_model_dir, sampler=SamplerSpec("ddim", 1), labels=(1, 2, 3, 5)), 1, tiny_loaded)
    with pytest.raises(StoreError, match="other seeds"):
        run_region(config(multi, tiny_model_dir, sampler=SamplerSpec("ddim", 1), seeds=(1, 2, 3, 4)), 1, tiny_loaded)
    with pytest.raises(StoreError, match="hooks differs"):
        run_region(config(multi, tiny_model_dir, sampler=SamplerSpec("ddim", 1), hooks=("resid_post",)), 1, tiny_loaded)
    with pytest.raises(StoreError, match="single-process store"):
        capture_workers(config(single_store, tiny_model_dir, sampler=SamplerSpec("ddim", 1), mode="resume"), 2,
                        tiny_loaded, spawn=False)
    assert not (tmp_path / "p.zarr").exists()


# -- Dask distributed launcher (--scheduler) ------------------------------------------------------
def test_dask_local_cluster_equals_local_workers(tmp_path, tiny_model_dir, tiny_loaded):
    """`--workers 2 --scheduler local` (a LocalCluster of 2 worker processes, each loading the model
    from its path) writes the same bytes as the local launcher's 2 regions (same regions, so the
    same batch sizes)."""
    pytest.importorskip("distributed")
    from typer.testing import CliRunner

    from dithooks.cli.main import app

    local = tmp_path / "local.zarr"
    capture_workers(config(local, tiny_model_dir, sampler=SamplerSpec("ddim", 2), hooks=("resid_post",),
                           labels=(0,), seeds=(0, 1, 2, 3)), 2, tiny_loaded, spawn=False)
    out = tmp_path / "dask.zarr"
    res = CliRunner().invoke(app, _cli_args(out, tiny_model_dir, "--workers", "2", "--scheduler", "local",
                                            "--sampler", "ddim", "--classes", "0", "--json"))
    assert res.exit_code == 0, res.output
    summary = json.loads(res.output[res.output.index("{"):])
    assert summary["status"] == "complete" and summary["workers"] == 2
    a, b = data_arrays(out), data_arrays(local)
    assert set(a) == set(b)
    for k in b:
        assert a[k].dtype == b[k].dtype and a[k].tobytes() == b[k].tobytes(), k
    assert zarr.open_group(str(out), mode="r").attrs["dithooks"]["regions"] == [[0, 2], [2, 4]]


def test_dask_failed_task_is_named_and_dask_resume_completes_it(tmp_path, tiny_model_dir, tiny_loaded, single):
    pytest.importorskip("distributed")
    from typer.testing import CliRunner

    from dithooks.capture.multi import capture_dask
    from dithooks.cli.main import app

    out = tmp_path / "d.zarr"
    # the task raises (a simulated crash after 1 step): reported, per region, in one line
    with pytest.raises(StoreError, match=r"incomplete: region 1 \(samples 2-3\) holds steps 0-0 of 0-2 "
                                         r"\(failed: WorkerKilled: worker stopped after 1 steps \(test\)\); continue with --resume "
                                         r"\(same options and --workers 2 --scheduler local\)"):
        capture_dask(config(out, tiny_model_dir), 2, "local", fail={1: 1})
    rep = region_report(out)
    assert rep["regions"][0]["steps"] == [0, 1, 2] and rep["regions"][1]["steps"] == [0]
    res = CliRunner().invoke(app, ["ls", str(out)])
    assert "failed" in res.output and "region 1 (samples 2-3) holds steps 0-0 of 0-2" in res.output, res.output
    summary = capture_dask(config(out, tiny_model_dir, mode="resume"), 2, "local")
    assert summary["status"] == "complete"
    assert_same_values(out, single)


def test_dask_scheduler_errors_are_one_line(tmp_path, tiny_model_dir, monkeypatch):
    pytest.importorskip("distributed")
    from typer.testing import CliRunner

    import dithooks.capture.multi as multi
    from dithooks.cli.main import app

    r = CliRunner()
    res = r.invoke(app, _cli_args(tmp_path / "a.zarr", tiny_model_dir, "--scheduler", "local"))
    assert res.exit_code != 0 and "give --workers N" in res.output and "Traceback" not in res.output
    res = r.invoke(app, _cli_args(tmp_path / "b.zarr", tiny_model_dir, "--workers", "2", "--scheduler", "nowhere"))
    assert res.exit_code != 0 and "must be 'local' or a scheduler address" in res.output
    assert "Traceback" not in res.output
    monkeypatch.setattr(multi, "CONNECT_TIMEOUT", 1.0)
    res = r.invoke(app, _cli_args(tmp_path / "c.zarr", tiny_model_dir, "--workers", "2",
                                  "--scheduler", "tcp://127.0.0.1:9"))
    assert res.exit_code != 0 and "cannot reach the Dask scheduler tcp://127.0.0.1:9" in res.output, res.output
    assert "Traceback" not in res.output and len(res.output.strip().splitlines()) == 1
    assert not (tmp_path / "b.zarr").exists() and not (tmp_path / "c.zarr").exists()
