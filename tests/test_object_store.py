"""Stores on S3-compatible object storage (``s3://bucket/run.zarr``), against a local S3 server
(moto in server mode) started here: capture, ls/query/verify, the Python reader, Dask, xarray,
resume, the lock, refusals. Every store written to S3 is compared with the same capture written
to a local folder, object by object (bytes) and array by array (values)."""

import json
import logging
import socket
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("s3fs")
moto_server = pytest.importorskip("moto.server")

from typer.testing import CliRunner  # noqa: E402

from dithooks.capture import CaptureConfig, CaptureSession  # noqa: E402
from dithooks.errors import StoreError  # noqa: E402
from dithooks.sampling import SamplerSpec  # noqa: E402
from dithooks.store.lock import LOCK_NAME, StoreLock  # noqa: E402
from dithooks.store.reader import open_store  # noqa: E402
from dithooks.store.storage import ObjectPath, as_path, create_exclusive, is_url  # noqa: E402

from .conftest import shards_per_step  # noqa: E402

BUCKET = "dithooks-test"
runner = CliRunner()
TIMES = ("started", "finished", "runs", "command")  # what differs between two runs of one capture


def run(*args, env=None):
    return runner.invoke(_app(), [str(a) for a in args], env=env)


def _app():
    from dithooks.cli.main import app

    return app


@pytest.fixture(scope="module")
def s3():
    """A moto S3 server on a free port, reached through the environment (AWS_ENDPOINT_URL), with
    one bucket; yields the endpoint."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    with pytest.MonkeyPatch.context() as mp:
        for k, v in dict(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1",
                         AWS_ENDPOINT_URL=endpoint).items():
            mp.setenv(k, v)
        mp.delenv("DITHOOKS_STORAGE_OPTIONS", raising=False)
        import boto3

        boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=BUCKET)
        yield endpoint
    server.stop()


@pytest.fixture(scope="module", autouse=True)
def _shard_per_step():
    """These tests damage or look for one step's object: a shard per step (a batch of steps per
    shard, the small-step layout, is tested on folders: tests/test_step_shards.py)."""
    with shards_per_step():
        yield


@pytest.fixture(scope="module")
def digits():
    from dithooks.loading import load_model

    return load_model(None)


def cfg(out, **kw):
    base = dict(out=str(out), model=None, layers="0-1", hooks=("resid_post", "final.out"),
                sampler=SamplerSpec("ddim", 4, guidance=2.0), labels=(3, 5), seeds=(0, 1))
    base.update(kw)
    return CaptureConfig(**base)


@pytest.fixture(scope="module")
def local(tmp_path_factory, digits):
    """The reference: the same capture into a local folder."""
    out = tmp_path_factory.mktemp("obj") / "ref.zarr"
    CaptureSession(cfg(out), digits).run()
    return out


def objects(url):
    """key -> bytes of every object of a store (the lock aside)."""
    p = as_path(url)
    base = p.key + "/"
    return {o.url.split("://", 1)[1][len(base):]: o.read_bytes() for o in p.rglob("*") if o.name != LOCK_NAME}


def files(folder):
    return {str(f.relative_to(folder)): f.read_bytes() for f in folder.rglob("*") if f.is_file()
            and f.name != LOCK_NAME}


def root_meta(raw: bytes) -> dict:
    g = json.loads(raw)
    meta = g["attributes"]["dithooks"]
    for k in TIMES:
        meta.pop(k, None)
    return g


def assert_same_store(url, folder):
    """Every object equals the local file of the same name, byte for byte (the root metadata up
    to its time stamps), and every array reads the same values."""
    got, want = objects(url), files(folder)
    assert sorted(got) == sorted(want)
    for k in want:
        if k == "zarr.json":
            assert root_meta(got[k]) == root_meta(want[k])
        else:
            assert got[k] == want[k], k
    a, b = open_store(url), open_store(folder)
    assert a.array_names() == b.array_names()
    for name in a.array_names() + ["step", "timestep", "layer", "seed", "label", "cfg"]:
        x, y = a.select(name).values, b.select(name).values
        assert x.dtype == y.dtype and np.array_equal(x, y, equal_nan=x.dtype.kind == "f"), name


# -- locations -------------------------------------------------------------------------------------
def test_locations_urls_and_paths():
    from pathlib import Path

    assert isinstance(as_path("s3://b/run.zarr"), ObjectPath)
    # typer's Path options turn s3://b/k into s3:/b/k: taken back as the URL
    assert as_path(Path("s3://b/run.zarr")).url == "s3://b/run.zarr"
    assert as_path("file:///tmp/x.zarr") == Path("/tmp/x.zarr")
    assert as_path("run.zarr") == Path("run.zarr") and as_path(Path("/a/s3:/b")) == Path("/a/s3:/b")
    p = as_path("s3://b/run.zarr/")
    assert (p / "blocks.resid_post" / "zarr.json").url == "s3://b/run.zarr/blocks.resid_post/zarr.json"
    assert p.name == "run.zarr" and p.parent.url == "s3://b" and str(p) == "s3://b/run.zarr"
    assert is_url("s3://b/x") and not is_url("/tmp/x") and not is_url("file:///tmp/x")


def test_exclusive_create_and_object_ops(s3):
    p = as_path(f"s3://{BUCKET}/ops/.lockish")
    assert create_exclusive(p, b"one") is True
    assert create_exclusive(p, b"two") is False  # If-None-Match: * refused by the server
    assert p.read_bytes() == b"one" and p.stat().st_size == 3 and p.is_file() and not p.is_dir()
    assert p.parent.is_dir() and [c.name for c in p.parent.iterdir()] == [".lockish"]
    p.unlink()
    assert not p.exists() and not p.parent.exists()


# -- capture, read, compare ------------------------------------------------------------------------
def test_capture_to_s3_equals_local_capture(s3, digits, local):
    url = f"s3://{BUCKET}/api.zarr"
    res = CaptureSession(cfg(url), digits).run()
    assert res.steps_run == 4 and str(res.path) == url
    assert_same_store(url, local)
    s = open_store(url)
    assert s.completeness()["complete"] and s.meta["status"] == "complete"
    assert not (as_path(url) / LOCK_NAME).exists()  # released


def test_cli_capture_ls_query_verify(s3, local):
    url = f"s3://{BUCKET}/cli.zarr"
    r = run("capture", "--layers", "0-1", "--hooks", "resid_post,final.out", "--steps", "4", "--seeds", "0-1",
            "--class", "3,5", "-g", "2", "--out", url, "-q")
    assert r.exit_code == 0, r.output
    assert f"wrote {url}" in r.output
    assert_same_store(url, local)
    r = run("ls", url)
    assert r.exit_code == 0, r.output
    assert f"store     {url}" in r.output and "status    complete" in r.output and "blocks.resid_post" in r.output
    r = run("verify", url)
    assert r.exit_code == 0 and "ok" in r.output, r.output
    q_s3 = run("query", url, "blocks.1.resid_post", "--step", "1-3", "--json")
    q_local = run("query", local, "blocks.1.resid_post", "--step", "1-3", "--json")
    assert q_s3.exit_code == 0, q_s3.output
    a, b = json.loads(q_s3.output), json.loads(q_local.output)
    assert a.pop("store") == url and a == {k: v for k, v in b.items() if k != "store"}
    # a damaged object: verify names it, ls says damaged
    p = as_path(url) / "blocks.resid_post" / "c.2.0.0.0.0.0"
    good = p.read_bytes()
    p.write_bytes(good[:-8])
    r = run("verify", url)
    assert r.exit_code == 1 and "blocks.resid_post step 2" in r.output, r.output
    assert "damaged" in run("ls", url).output
    bad = bytearray(good)
    bad[100] ^= 0xFF  # same size: only decoding (its CRC32C) finds it
    p.write_bytes(bytes(bad))
    assert run("verify", url, "--quick").exit_code == 0
    r = run("verify", url)
    assert r.exit_code == 1 and "blocks.resid_post step 2: does not decode" in r.output, r.output
    p.write_bytes(good)
    assert run("verify", url).exit_code == 0


def test_dask_and_xarray_read_the_s3_store(s3, digits, local):
    url = f"s3://{BUCKET}/api.zarr"
    if not as_path(url).exists():
        CaptureSession(cfg(url), digits).run()
    pytest.importorskip("dask")
    from dithooks.scale import dask_array

    a = dask_array(url, "blocks.resid_post", step=slice(1, 4)).data.compute(scheduler="threads")
    b = dask_array(local, "blocks.resid_post", step=slice(1, 4)).data.compute(scheduler="threads")
    np.testing.assert_array_equal(a, b)
    xr = pytest.importorskip("xarray")
    ds = xr.open_zarr(url, storage_options={"endpoint_url": s3})
    ref = xr.open_zarr(local)
    assert set(ds.data_vars) == set(ref.data_vars) and dict(ds.sizes) == dict(ref.sizes)
    for v in ref.data_vars:
        np.testing.assert_array_equal(ds[v].values, ref[v].values)
    assert list(ds["cfg"].values) == ["cond", "uncond"]
    assert ds["blocks.resid_post"].dims == ref["blocks.resid_post"].dims
    import zarr

    g = zarr.open_group(url, mode="r", storage_options={"endpoint_url": s3})
    np.testing.assert_array_equal(g["final.out"][...], zarr.open_group(str(local), mode="r")["final.out"][...])


def test_storage_options_given_in_python(s3, monkeypatch, digits, local):
    """Without the environment: the endpoint as storage_options of the reader, and registered
    for a prefix before a capture."""
    from dithooks.store.storage import set_storage_options

    url = f"s3://{BUCKET}/cli.zarr"
    for k in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(k)
    opts = {"endpoint_url": s3, "key": "testing", "secret": "testing"}
    s = open_store(url, storage_options=opts)
    np.testing.assert_array_equal(s.select("final.out").values, open_store(local).select("final.out").values)
    set_storage_options(f"s3://{BUCKET}/opts", opts)
    CaptureSession(cfg(f"s3://{BUCKET}/opts/run.zarr", sampler=SamplerSpec("ddim", 2)), digits).run()
    assert open_store(f"s3://{BUCKET}/opts/run.zarr").completeness()["complete"]


# -- resume, lock, refusals --------------------------------------------------------------------------
def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_failed_capture_resumes_to_the_unbroken_store(s3, digits, local):
    from dithooks.capture.multi import _fail_after

    url = f"s3://{BUCKET}/resume.zarr"
    with pytest.raises(Exception, match="stopped after 2 steps"):
        CaptureSession(cfg(url), digits).run(progress=_fail_after(2))
    s = open_store(url)
    assert s.meta["status"] == "failed" and s.step_complete().tolist() == [True, True, False, False]
    r = run("ls", url)
    assert "failed" in r.output and "--resume" in r.output, r.output
    assert run("verify", url, "--quick").exit_code == 0  # every marked step's objects are there
    # as a process killed outright leaves it: a lock whose owner (on this host) is dead
    from dithooks.store.lock import hostname

    dead = {"pid": _dead_pid(), "host": hostname(), "pid_start": None, "command": "dithooks capture (killed)",
            "since": "2026-12-01T00:00:00", "token": "0" * 32}
    assert create_exclusive(as_path(url) / LOCK_NAME, json.dumps(dead).encode())
    assert "failed" in run("ls", url).output
    res = CaptureSession(cfg(url, mode="resume"), digits).run()
    assert res.resumed_from == 2 and res.steps_run == 2
    assert_same_store(url, local)
    m = open_store(url).meta
    assert m["status"] == "complete" and len(m["runs"]) == 2


def test_a_failed_put_is_one_line_and_its_step_is_never_marked(s3, digits, local, monkeypatch):
    """PUTs run several at a time; a step is marked only after all of its PUTs succeeded."""
    import dithooks.store.storage as storage

    url = f"s3://{BUCKET}/putfail.zarr"
    real = storage.put

    def put(u, pieces):
        if "/blocks.resid_post/c.2." in u:
            raise OSError(5, "Input/output error (test)")
        return real(u, pieces)

    monkeypatch.setattr(storage, "put", put)
    with pytest.raises(StoreError, match=r"capture failed \(OSError: \[Errno 5\] Input/output error \(test\)\)"):
        CaptureSession(cfg(url), digits).run()
    monkeypatch.setattr(storage, "put", real)
    done = open_store(url).step_complete()
    assert not done[2:].any()
    assert run("verify", url, "--quick").exit_code == 0
    CaptureSession(cfg(url, mode="resume"), digits).run()
    assert_same_store(url, local)


def test_resume_redoes_a_step_whose_object_is_gone(s3, digits, local):
    url = f"s3://{BUCKET}/gone.zarr"
    CaptureSession(cfg(url), digits).run()
    (as_path(url) / "blocks.resid_post" / "c.3.0.0.0.0.0").unlink()
    r = run("verify", url, "--quick")
    assert r.exit_code == 1 and "blocks.resid_post step 3: missing shard file" in r.output, r.output
    res = CaptureSession(cfg(url, mode="resume"), digits).run()
    assert res.resumed_from == 3
    assert_same_store(url, local)


def test_second_writer_and_existing_store_are_refused(s3, digits):
    url = f"s3://{BUCKET}/locked.zarr"
    two = SamplerSpec("ddim", 2)
    CaptureSession(cfg(url, sampler=two), digits).run()
    r = run("capture", "--layers", "0-1", "--steps", "2", "--out", url, "-q")
    assert r.exit_code != 0 and "already exists: use --overwrite" in r.output
    assert r.output.count("\n") <= 2 and "Traceback" not in r.output
    with StoreLock(as_path(url), command="dithooks capture (test)"):  # a live writer
        for mode in ("resume", "overwrite"):
            with pytest.raises(StoreError, match=r"is being written by pid \d+ on .*dithooks capture \(test\)"):
                CaptureSession(cfg(url, mode=mode, sampler=two), digits).run()
        assert "running" in run("ls", url).output
    assert open_store(url).completeness()["complete"]  # untouched
    # --overwrite replaces it (only what dithooks wrote is there)
    CaptureSession(cfg(url, mode="overwrite", layers="0", sampler=SamplerSpec("ddim", 3)), digits).run()
    assert open_store(url).step_complete().size == 3 and open_store(url).coord("layer").tolist() == [0]
    # a foreign object makes --overwrite refuse and touch nothing
    (as_path(url) / "notes.txt").write_bytes(b"mine")
    with pytest.raises(StoreError, match=r"holds files dithooks did not write \(notes.txt\)"):
        CaptureSession(cfg(url, mode="overwrite", sampler=two), digits).run()
    assert (as_path(url) / "notes.txt").read_bytes() == b"mine" and open_store(url).step_complete().size == 3


def test_half_made_store_is_reported(s3, digits, monkeypatch):
    """A creation killed while it writes the skeleton (here: interrupted at its fourth array)
    leaves a half-made store in place (a prefix cannot be renamed into place)."""
    import dithooks.store.zarrio as zarrio

    url = f"s3://{BUCKET}/half.zarr"
    real, calls = zarrio.write_array, []

    def dies(*a, **kw):
        calls.append(a[1])
        if len(calls) == 4:
            raise KeyboardInterrupt
        return real(*a, **kw)

    monkeypatch.setattr(zarrio, "write_array", dies)
    with pytest.raises(KeyboardInterrupt):
        CaptureSession(cfg(url, sampler=SamplerSpec("ddim", 2)), digits).run()
    monkeypatch.setattr(zarrio, "write_array", real)
    assert (as_path(url) / "step" / "zarr.json").exists() and not (as_path(url) / LOCK_NAME).exists()
    r = run("ls", url)
    assert r.exit_code != 0 and "half-made store" in r.output and "--overwrite" in r.output, r.output
    with pytest.raises(StoreError, match="half-made"):
        CaptureSession(cfg(url, mode="resume", sampler=SamplerSpec("ddim", 2)), digits).run()
    CaptureSession(cfg(url, mode="overwrite", sampler=SamplerSpec("ddim", 2)), digits).run()
    assert open_store(url).completeness()["complete"]


def test_unreachable_or_missing_bucket_is_one_line(s3, tmp_path):
    r = run("capture", "--layers", "0", "--steps", "2", "--out", "s3://no-such-bucket/run.zarr", "-q")
    assert r.exit_code != 0 and "Traceback" not in r.output and r.output.count("\n") <= 2, r.output
    assert "no-such-bucket" in r.output and "does not exist" in r.output
    r = run("ls", "s3://no-such-bucket/run.zarr")
    assert r.exit_code != 0 and "no store at s3://no-such-bucket/run.zarr" in r.output
    env = {"DITHOOKS_STORAGE_OPTIONS": json.dumps({"endpoint_url": "http://127.0.0.1:9",
                                                   "config_kwargs": {"retries": {"max_attempts": 1}}})}
    for args in (("ls", f"s3://{BUCKET}/api.zarr"), ("capture", "--layers", "0", "--steps", "2", "--out",
                                                     f"s3://{BUCKET}/x.zarr", "-q")):
        r = run(*args, env=env)
        assert r.exit_code != 0 and "Traceback" not in r.output and r.output.count("\n") <= 2, r.output
        assert "Could not connect to the endpoint URL" in r.output
    r = run("ls", "s3://x/y", env={"DITHOOKS_STORAGE_OPTIONS": "{not json"})
    assert r.exit_code != 0 and "DITHOOKS_STORAGE_OPTIONS is not valid JSON" in r.output


def test_multi_worker_capture_to_s3_equals_local_and_resumes(s3, digits, tmp_path):
    """Region writes map onto objects directly (no two workers write one key): the 2-region store
    on S3 equals the same 2-region capture into a folder, object by object; a region that fails
    is completed by --resume. (Regions run in this process, one after the other; spawned worker
    processes were checked by hand, docs/scaling.md §5b.)"""
    from dithooks.capture.multi import capture_workers, region_report

    c = dict(seeds=(0, 1, 2, 3), labels=(3, 5, 7, 9), sampler=SamplerSpec("ddim", 3), hooks=("resid_post",))
    ref = tmp_path / "multi.zarr"
    capture_workers(cfg(ref, **c), 2, digits, spawn=False)
    url = f"s3://{BUCKET}/multi.zarr"
    with pytest.raises(StoreError, match="region 1 .* holds steps 0-0 of 0-2"):
        capture_workers(cfg(url, **c), 2, digits, fail={1: 1}, spawn=False)
    assert [r["status"] for r in region_report(url)["regions"]] == ["complete", "failed"]
    assert "--resume" in run("ls", url).output
    summary = capture_workers(cfg(url, mode="resume", **c), 2, digits, spawn=False)
    assert summary["status"] == "complete"
    got, want = objects(url), files(ref)
    assert sorted(got) == sorted(want)
    for k in want:
        if k == "zarr.json":
            assert root_meta(got[k]) == root_meta(want[k])
        elif not k.endswith("status.json"):  # times and pids
            assert got[k] == want[k], k
    assert run("verify", url).exit_code == 0


def test_a_batch_of_steps_per_shard_on_an_object_store_resumes_from_a_partial_shard(s3, digits, tmp_path,
                                                                                  monkeypatch):
    """Small steps' layout (a batch of steps per shard, unpinned here): an interrupted run PUTs a
    shard that holds only its finished steps; --resume completes it and the store reads as an
    unbroken local run of the same layout."""
    from .test_capture import Interrupt

    monkeypatch.setattr("dithooks.capture.recorder.StepRecorder.shard_steps", True)
    ref = tmp_path / "ref.zarr"
    CaptureSession(cfg(ref), digits).run()
    assert [p.name for p in (ref / "blocks.resid_post").iterdir() if p.name != "zarr.json"] == ["c.0.0.0.0.0.0"]
    url = f"s3://{BUCKET}/step-shards.zarr"
    session = CaptureSession(cfg(url), digits)
    session.hooks.add_hook("blocks.1.resid_post", Interrupt(2))
    with pytest.raises(StoreError, match="interrupted"):
        session.run()
    session.hooks.remove_all()
    assert open_store(url).step_complete().tolist() == [True, True, False, False]
    assert run("verify", url).exit_code == 0
    res = CaptureSession(cfg(url, mode="resume"), digits).run()
    assert res.resumed_from == 2
    assert run("verify", url).exit_code == 0
    a, b = open_store(url), open_store(ref)
    for name in a.array_names():
        x, y = a.select(name).values, b.select(name).values
        assert np.array_equal(x, y, equal_nan=x.dtype.kind == "f"), name
