"""`dithooks capture --scheduler tcp://HOST:PORT` against a Dask scheduler and workers launched on
their own, the way they are on a cluster (`dask scheduler` on one machine, `dask worker ADDRESS`
on each of the others): here separate processes on this machine, sharing nothing with the test
but the address and the file system. The store equals the local launcher's, byte for byte."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import zarr

from dithooks.capture import CaptureConfig
from dithooks.capture.multi import capture_workers
from dithooks.sampling import SamplerSpec

pytest.importorskip("distributed")
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _wait_for(pattern: str, path, proc, timeout=60.0) -> re.Match:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        text = path.read_text() if path.exists() else ""
        m = re.search(pattern, text)
        if m:
            return m
        if proc.poll() is not None:
            raise AssertionError(f"process ended: {text[-2000:]}")
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {pattern!r}: {path.read_text()[-2000:]}")


@pytest.fixture
def scheduler(tmp_path):
    """A scheduler and two single-threaded workers, each its own process group (killed at the end)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", DASK_DISTRIBUTED__WORKER__DAEMON="False")
    procs = []

    def start(args, log):
        f = open(log, "w")
        p = subprocess.Popen(args, stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True,
                             cwd=tmp_path)
        procs.append((p, f))
        return p

    dask = shutil.which("dask", path=os.path.dirname(sys.executable))
    if dask is None:
        pytest.skip("the `dask` command line is not installed")
    log = tmp_path / "scheduler.log"
    p = start([dask, "scheduler", "--host", "127.0.0.1", "--port", "0", "--no-dashboard"], log)
    address = _wait_for(r"Scheduler at:\s+(tcp://[0-9.]+:\d+)", log, p).group(1)
    for i in range(2):
        wlog = tmp_path / f"worker{i}.log"
        w = start([dask, "worker", address, "--nworkers", "1", "--nthreads", "1", "--no-dashboard",
                   "--memory-limit", "0", "--name", f"w{i}"], wlog)
        _wait_for(r"Registered to", wlog, w)
    try:
        yield address
    finally:
        for p, f in procs:
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        for p, f in procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
            f.close()


def test_capture_on_a_separately_launched_scheduler(tmp_path, tiny_model_dir, tiny_loaded, scheduler):
    from typer.testing import CliRunner

    from dithooks.cli.main import app

    local = tmp_path / "local.zarr"
    capture_workers(CaptureConfig(out=str(local), model=str(tiny_model_dir), layers="0-1", hooks=("resid_post",),
                                  sampler=SamplerSpec("ddim", 2), labels=(0,), seeds=(0, 1, 2, 3),
                                  storage_dtype="fp32"), 2, tiny_loaded, spawn=False)
    out = tmp_path / "cluster.zarr"
    res = CliRunner().invoke(app, ["capture", "--out", str(out), "--model", str(tiny_model_dir), "--layers", "0-1",
                                   "--hooks", "resid_post", "--steps", "2", "--seeds", "0-3", "--dtype", "fp32",
                                   "--sampler", "ddim", "--classes", "0", "--workers", "2",
                                   "--scheduler", scheduler, "--json"])
    assert res.exit_code == 0, res.output
    summary = json.loads(res.output[res.output.index("{"):])
    assert summary["status"] == "complete" and summary["workers"] == 2
    a, b = zarr.open_group(str(out), mode="r"), zarr.open_group(str(local), mode="r")
    names = {k for k, _ in b.arrays()}
    assert {k for k, _ in a.arrays()} == names
    for k in names:
        x, y = np.asarray(a[k][...]), np.asarray(b[k][...])
        assert x.dtype == y.dtype and x.tobytes() == y.tobytes(), k
