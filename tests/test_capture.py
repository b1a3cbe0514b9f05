import errno
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import zarr

from dithooks.capture import CaptureConfig, CaptureSession, capture
from dithooks.errors import DithooksError, StoreError
from dithooks.hooks import HookManager
from dithooks.sampling import Sampler, SamplerSpec
from dithooks.store.reader import open_store
from dithooks.store.writer import ArraySpec, StoreWriter


def config(out, model_dir, **kw):
    base = dict(out=str(out), model=str(model_dir), layers="0-3", hooks=("resid_post", "attn.out", "adaln.gate_msa", "final.out"),
                sampler=SamplerSpec("ddim", 5, guidance=2.0), labels=(1, 2), seeds=(0, 1), storage_dtype="fp32")
    base.update(kw)
    return CaptureConfig(**base)


def test_capture_stores_exactly_what_the_hooks_see_and_changes_nothing(tmp_path, tiny_loaded, tiny_model_dir):
    spec = SamplerSpec("ddim", 5, guidance=2.0)
    plain = Sampler(tiny_loaded, spec).run([1, 2], [0, 1])
    # reference values straight from the hook manager
    hm = HookManager(tiny_loaded.transformer, tiny_loaded.adapter)
    ref = {}
    with hm.hooks(read={"blocks.2.resid_post": lambda v, c: ref.__setitem__(c.step, v.clone())}):
        Sampler(tiny_loaded, spec, hm).run([1, 2], [0, 1])
    res = capture(config(tmp_path / "s.zarr", tiny_model_dir), loaded=tiny_loaded)
    assert res.steps_run == 5
    store = open_store(tmp_path / "s.zarr")
    assert store.completeness()["complete"] and store.meta["status"] == "complete"
    got = store.select("blocks.2.resid_post")
    assert got.dims == ("step", "layer", "cfg", "sample", "token", "channel")
    for s in range(5):  # batch rows are (cond samples, uncond samples)
        np.testing.assert_array_equal(got.values[s, 0].reshape(4, 16, 16), ref[s].numpy())
    # the sampled result is bit-for-bit the one without capture
    lat = store.select("latents")
    np.testing.assert_array_equal(lat.values[-1], plain.numpy())


def test_store_opens_in_xarray_with_named_dims(tmp_path, tiny_loaded, tiny_model_dir):
    xr = pytest.importorskip("xarray")
    capture(config(tmp_path / "s.zarr", tiny_model_dir, storage_dtype="fp16"), loaded=tiny_loaded)
    ds = xr.open_zarr(tmp_path / "s.zarr")
    da = ds["blocks.resid_post"]
    assert da.dims == ("step", "layer", "cfg", "sample", "token", "channel")
    assert list(ds["cfg"].values) == ["cond", "uncond"]
    assert ds["timestep"].dims == ("step",) and list(ds["label"].values) == [1, 2]
    one = da.sel(step=3, layer=1, cfg="cond").values
    assert one.shape == (2, 16, 16) and np.isfinite(one).all()
    assert ds["final.out"].dims == ("step", "cfg", "sample", "out_channel", "height", "width")
    assert ds.attrs["dithooks"]["sampler"]["steps"] == 5


def test_metadata_says_what_the_store_holds(tmp_path, tiny_loaded, tiny_model_dir):
    capture(config(tmp_path / "s.zarr", tiny_model_dir), loaded=tiny_loaded)
    m = open_store(tmp_path / "s.zarr").meta
    for key in ("model_id", "model_config", "scheduler", "seeds", "labels", "sampler", "hooks", "layers",
                "storage_dtype", "versions", "started", "finished", "status"):
        assert key in m, key
    assert m["hook_arrays"]["blocks.resid_post"] == {"hook": "blocks.{i}.resid_post", "layers": [0, 1, 2, 3]}
    assert m["versions"]["torch"] == torch.__version__


def test_existing_store_is_refused_unless_asked(tmp_path, tiny_loaded, tiny_model_dir):
    out = tmp_path / "s.zarr"
    capture(config(out, tiny_model_dir), loaded=tiny_loaded)
    with pytest.raises(StoreError, match="--overwrite"):
        capture(config(out, tiny_model_dir), loaded=tiny_loaded)
    capture(config(out, tiny_model_dir, mode="overwrite", seeds=(5, 6)), loaded=tiny_loaded)
    assert open_store(out).meta["seeds"] == [5, 6]
    precious = tmp_path / "notes"
    precious.mkdir()
    (precious / "thesis.tex").write_text("do not delete")
    with pytest.raises(StoreError, match="not a dithooks store"):
        capture(config(precious, tiny_model_dir, mode="overwrite"), loaded=tiny_loaded)
    assert (precious / "thesis.tex").exists()


def test_resume_refuses_a_different_request(tmp_path, tiny_loaded, tiny_model_dir):
    out = tmp_path / "s.zarr"
    capture(config(out, tiny_model_dir), loaded=tiny_loaded)
    with pytest.raises(StoreError, match="seeds differs"):
        capture(config(out, tiny_model_dir, mode="resume", seeds=(3, 4)), loaded=tiny_loaded)
    assert capture(config(out, tiny_model_dir, mode="resume"), loaded=tiny_loaded).steps_run == 0


def read_all(path):
    g = zarr.open_group(str(path), mode="r")
    return {k: np.asarray(g[k][...]) for k in g.array_keys()}


def assert_stores_equal(a, b):
    A, B = read_all(a), read_all(b)
    assert set(A) == set(B)
    for k in A:
        np.testing.assert_array_equal(A[k], B[k], err_msg=k)


class Interrupt:
    """A read hook that presses Ctrl-C at a given step (as a user would)."""

    def __init__(self, step):
        self.step = step

    def __call__(self, v, ctx):
        if ctx.step == self.step:
            raise KeyboardInterrupt


def test_interrupted_capture_resumes_to_the_same_store(tmp_path, tiny_loaded, tiny_model_dir):
    full = tmp_path / "full.zarr"
    capture(config(full, tiny_model_dir, sampler=SamplerSpec("ddim", 6, eta=1.0, guidance=2.0)), loaded=tiny_loaded)
    part = tmp_path / "part.zarr"
    session = CaptureSession(config(part, tiny_model_dir, sampler=SamplerSpec("ddim", 6, eta=1.0, guidance=2.0)),
                             loaded=tiny_loaded)
    session.hooks.add_hook("blocks.3.resid_post", Interrupt(3))
    with pytest.raises(StoreError, match=r"interrupted.*holds steps 0-2 .*--resume"):
        session.run()
    session.hooks.remove_all()
    s = open_store(part)
    assert s.meta["status"] == "interrupted" and s.completeness()["resume_from_step"] == 3
    res = capture(config(part, tiny_model_dir, mode="resume", sampler=SamplerSpec("ddim", 6, eta=1.0, guidance=2.0)),
                  loaded=tiny_loaded)
    assert (res.resumed_from, res.steps_run) == (3, 3)
    assert open_store(part).meta["status"] == "complete"
    assert_stores_equal(full, part)


def test_killed_capture_resumes_to_the_same_store(tmp_path, tiny_model_dir):
    """SIGKILL a real `dithooks capture` process mid-way, resume it, compare with an unbroken run."""
    args = ["--model", str(tiny_model_dir), "--layers", "all", "--hooks", "resid_post,attn.out", "--steps", "60",
            "--eta", "1", "--seeds", "0-3", "--class", "3", "-g", "2", "--dtype", "fp32", "-q"]
    cli = [sys.executable, "-m", "dithooks.cli.main", "capture"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(cli + args + ["--out", str(tmp_path / "full.zarr")], check=True, env=env, capture_output=True)
    steps = 60
    for attempt in range(3):  # a stalled machine can let the run finish before the kill lands: again
        part = tmp_path / f"part{attempt}.zarr"
        proc = subprocess.Popen(cli + args + ["--out", str(part)], env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None:
            try:
                done = int(np.asarray(zarr.open_group(str(part), mode="r")["step_complete"][...]).sum())
            except Exception:
                done = 0
            if 3 <= done < steps:  # mid-way (steps are marked in batches: the first mark may be 16)
                proc.send_signal(signal.SIGKILL)
                break
            time.sleep(0.01)
        proc.wait()
        if proc.returncode != 0 and not open_store(part).completeness()["complete"]:
            break
    else:
        pytest.skip("each capture finished before it could be killed mid-way (machine too fast or too stalled)")
    info = open_store(part).completeness()
    assert not info["complete"] and info["status"] == "incomplete"
    r = subprocess.run(cli + args + ["--out", str(part), "--resume"], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert_stores_equal(tmp_path / "full.zarr", part)


def test_full_disk_fails_cleanly_and_resumes(tmp_path, tiny_loaded, tiny_model_dir, monkeypatch):
    out = tmp_path / "s.zarr"
    real = StoreWriter.array
    calls = {"n": 0}

    def failing_array(self, spec):
        if spec.name == "blocks.attn.out":
            calls["n"] += 1
            if calls["n"] > 2:  # after a couple of steps (one write per step) the disk fills up
                raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, spec)

    monkeypatch.setattr(StoreWriter, "array", failing_array)
    monkeypatch.setattr("dithooks.capture.recorder.BATCH_STEPS", 1)  # one write per step, as a large model does
    with pytest.raises(StoreError, match=r"disk is full.*--resume"):
        capture(config(out, tiny_model_dir), loaded=tiny_loaded)
    s = open_store(out)
    assert s.meta["status"] == "failed" and "disk is full" in s.meta["error"]
    assert 0 < s.completeness()["resume_from_step"] < 5
    monkeypatch.setattr(StoreWriter, "array", real)
    capture(config(out, tiny_model_dir, mode="resume"), loaded=tiny_loaded)
    capture(config(tmp_path / "ref.zarr", tiny_model_dir), loaded=tiny_loaded)
    assert_stores_equal(tmp_path / "ref.zarr", out)


def test_writer_queue_is_bounded(tmp_path):
    """A slow disk makes sampling wait; pending bytes never exceed the bound (plus one item)."""
    g = zarr.open_group(str(tmp_path / "w.zarr"), mode="w", zarr_format=3)
    w = StoreWriter(g, max_pending_bytes=10_000)
    spec = ArraySpec("a", ("step", "x"), (50, 1000), (1, 1000), torch.float32)
    slow = w.array

    def slow_array(s):
        time.sleep(0.002)
        return slow(s)

    w.array = slow_array
    for s in range(50):
        w.put(spec, (s,), torch.full((1000,), float(s)))
    w.flush()
    w.close()
    assert w.peak_pending_bytes <= 10_000 + 4000
    np.testing.assert_array_equal(np.asarray(g["a"][:, 0]), np.arange(50))


def test_bad_capture_requests_are_refused_before_touching_disk(tmp_path, tiny_loaded, tiny_model_dir):
    out = tmp_path / "s.zarr"
    for kw, msg in [({"layers": "0-9"}, "0-3"), ({"hooks": ("resid_pst",)}, "resid_post"),
                    ({"labels": (11,)}, "classes 0-9"), ({"storage_dtype": "fp8"}, "fp16"),
                    ({"labels": (1, 2, 3)}, "labels")]:
        with pytest.raises(DithooksError, match=msg):
            CaptureSession(config(out, tiny_model_dir, **kw), loaded=tiny_loaded)
    assert not out.exists()


def test_deterministic_sampler_writes_rng_state_once_and_still_resumes(tmp_path, tiny_loaded, tiny_model_dir):
    spec = SamplerSpec("ddim", 5, eta=0.0)
    full = tmp_path / "full.zarr"
    capture(config(full, tiny_model_dir, sampler=spec), loaded=tiny_loaded)
    rows = np.asarray(zarr.open_group(str(full), mode="r")["rng_state"][...])
    assert rows[0].any() and not rows[1:].any()  # DDIM with eta = 0 never draws: one row suffices
    part = tmp_path / "part.zarr"
    session = CaptureSession(config(part, tiny_model_dir, sampler=spec), loaded=tiny_loaded)
    session.hooks.add_hook("blocks.3.resid_post", Interrupt(3))
    with pytest.raises(StoreError, match="interrupted"):
        session.run()
    session.hooks.remove_all()
    assert capture(config(part, tiny_model_dir, sampler=spec, mode="resume"), loaded=tiny_loaded).resumed_from == 3
    a, b = open_store(full), open_store(part)
    for name in ("latents", "blocks.resid_post"):
        np.testing.assert_array_equal(np.asarray(a.select(name).values), np.asarray(b.select(name).values))


@pytest.mark.parametrize("budget, writes", [(8 * 2**20, 1), (1, 5)])
def test_small_steps_are_written_in_batches_within_a_memory_budget(tmp_path, tiny_loaded, tiny_model_dir,
                                                                   monkeypatch, budget, writes):
    monkeypatch.setattr("dithooks.capture.recorder.BATCH_BYTES", budget)
    seen = []
    real = StoreWriter.put

    def counting_put(self, spec, index, value):
        seen.append((spec.name, index))
        return real(self, spec, index, value)

    monkeypatch.setattr(StoreWriter, "put", counting_put)
    out = tmp_path / "b.zarr"
    capture(config(out, tiny_model_dir), loaded=tiny_loaded)
    assert sum(name == "blocks.resid_post" for name, _ in seen) == writes
    ref = tmp_path / "ref.zarr"
    monkeypatch.setattr("dithooks.capture.recorder.BATCH_STEPS", 1)
    capture(config(ref, tiny_model_dir), loaded=tiny_loaded)
    assert_stores_equal(ref, out)


def test_the_core_does_not_import_the_probes_package():
    """Data flows one way: the capture (and everything it uses) never imports dithooks.probes;
    probes use the core's public API (dithooks.probe_api) only."""
    code = ("import sys, dithooks.capture, dithooks.probe_runner, dithooks.store.reader, dithooks.query\n"
            "bad = sorted(m for m in sys.modules if m == 'dithooks.probes' or m.startswith('dithooks.probes.'))\n"
            "print(','.join(bad))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == ""
    # ... while the probes' API is one object, seen from either side
    from dithooks import probe_api
    from dithooks.probes import api
    assert api.Probe is probe_api.Probe and api.register_probe is probe_api.register_probe


def test_the_source_tree_runs_built_in_probes_without_installing(tmp_path):
    """From a checkout without the editable install, the core imports and finds the built-in
    probes in probes/ (mounted as dithooks.probes, as pyproject's package-dir does on install)."""
    import pathlib

    repo = pathlib.Path(__file__).resolve().parent.parent
    code = ("import sys\n"
            "sys.meta_path[:] = [f for f in sys.meta_path if 'editable' not in getattr(f, '__module__', '')]\n"
            f"sys.path.insert(0, {str(repo)!r})\n"
            "import dithooks.capture\n"
            "from dithooks.probe_api import make_probe, registered_probes\n"
            "assert 'residual_norms' in registered_probes()\n"
            "p = make_probe('residual_norms')\n"
            "print(type(p).__module__, dithooks.__file__)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    module, where = out.stdout.split()
    assert module == "dithooks.probes.builtin" and where.startswith(str(repo / "dithooks"))


def test_small_latents_and_the_marks_take_a_few_files_and_read_back_the_same(tmp_path, tiny_loaded, tiny_model_dir,
                                                                             monkeypatch):
    """latents rows in chunks of up to 16 (each rewritten whole after a batch of steps, its rows
    not known yet NaN), step_complete in one checksummed chunk: the values equal a store written a
    file per row, and the NaN padding is never counted as non-finite data."""
    spec = SamplerSpec("ddim", 20, eta=1.0)
    few, many = tmp_path / "few.zarr", tmp_path / "many.zarr"
    capture(config(few, tiny_model_dir, sampler=spec), loaded=tiny_loaded)
    monkeypatch.setattr("dithooks.store.layout.LATENT_ROWS_PER_CHUNK", 1)
    capture(config(many, tiny_model_dir, sampler=spec), loaded=tiny_loaded)
    files = lambda store, name: sorted(p.name for p in (store / name).iterdir() if p.name != "zarr.json")  # noqa: E731
    assert len(files(few, "latents")) == 2 and len(files(many, "latents")) == 21  # 21 rows: 16 + an edge chunk
    assert files(few, "step_complete") == ["c"]
    assert zarr.open_array(str(few / "latents"), mode="r").chunks[0] == 16
    a, b = open_store(few), open_store(many)
    np.testing.assert_array_equal(zarr.open_array(str(few / "latents"), mode="r")[...],
                                  zarr.open_array(str(many / "latents"), mode="r")[...])
    assert not np.isnan(zarr.open_array(str(few / "latents"), mode="r")[...]).any()
    assert a.completeness()["complete"] and a.step_complete().all()
    assert a.meta["nonfinite"] == {} == b.meta["nonfinite"]
    # a resume that starts inside a latents chunk keeps that chunk's earlier rows
    part = tmp_path / "part.zarr"
    monkeypatch.setattr("dithooks.store.layout.LATENT_ROWS_PER_CHUNK", 16)
    session = CaptureSession(config(part, tiny_model_dir, sampler=spec), loaded=tiny_loaded)
    session.hooks.add_hook("blocks.3.resid_post", Interrupt(7))
    with pytest.raises(StoreError, match="interrupted"):
        session.run()
    session.hooks.remove_all()
    s = open_store(part)
    assert s.completeness()["resume_from_step"] == 7 and s.meta["nonfinite"] == {}
    capture(config(part, tiny_model_dir, mode="resume", sampler=spec), loaded=tiny_loaded)
    assert_stores_equal(few, part)


@pytest.mark.parametrize("here", [False, True], ids=["writer-thread", "sampling-thread"])
def test_a_full_disk_during_the_held_file_writes_fails_cleanly_and_resumes(tmp_path, tiny_loaded, tiny_model_dir,
                                                                           monkeypatch, here):
    """Small steps' files are held and handed to the writer thread once per batch of steps
    (StoreWriter.submit), or written there on the sampling thread when torch's threads take
    every core: a file write that finds the disk full fails the run cleanly, keeps the batches
    marked before it, and --resume completes the store."""
    import dithooks.store.writer as writer_module

    monkeypatch.setattr(writer_module.StoreWriter, "sync_files", here)

    spec = SamplerSpec("ddim", 40, eta=1.0)
    ref, out = tmp_path / "ref.zarr", tmp_path / "full.zarr"
    capture(config(ref, tiny_model_dir, sampler=spec), loaded=tiny_loaded)
    real, marked = writer_module.write_atomic, {"batches": 0}

    def filling_disk(path, pieces):
        if marked["batches"] >= 1:  # the disk fills up once the first batch of steps is marked
            raise OSError(errno.ENOSPC, "No space left on device")
        if "step_complete" in path:
            marked["batches"] += 1
        return real(path, pieces)

    monkeypatch.setattr(writer_module, "write_atomic", filling_disk)
    with pytest.raises(StoreError, match=r"disk is full.*--resume"):
        capture(config(out, tiny_model_dir, sampler=spec), loaded=tiny_loaded)
    s = open_store(out)
    assert s.meta["status"] == "failed" and 0 < s.completeness()["resume_from_step"] < 40
    monkeypatch.setattr(writer_module, "write_atomic", real)
    capture(config(out, tiny_model_dir, mode="resume", sampler=spec), loaded=tiny_loaded)
    assert_stores_equal(ref, out)


def test_a_store_with_the_older_file_per_step_layout_resumes_to_the_same_store(tmp_path, tiny_loaded,
                                                                                tiny_model_dir, monkeypatch):
    """Stores written before 2026-12-02 (latents a chunk per row, step_complete a chunk per step)
    resume with today's code: it writes into the layout on disk."""
    from dithooks.store import layout

    spec = SamplerSpec("ddim", 20, eta=1.0)
    ref, old = tmp_path / "ref.zarr", tmp_path / "old.zarr"
    capture(config(ref, tiny_model_dir, sampler=spec), loaded=tiny_loaded)
    with monkeypatch.context() as m:  # the older layout
        m.setattr(layout, "LATENT_ROWS_PER_CHUNK", 1)
        m.setattr(CaptureSession, "_marks_chunk", 1)
        session = CaptureSession(config(old, tiny_model_dir, sampler=spec), loaded=tiny_loaded)
        session.hooks.add_hook("blocks.3.resid_post", Interrupt(7))
        with pytest.raises(StoreError, match="interrupted"):
            session.run()
        session.hooks.remove_all()
    assert zarr.open_array(str(old / "latents"), mode="r").chunks[0] == 1
    assert zarr.open_array(str(old / "step_complete"), mode="r").chunks == (1,)
    res = capture(config(old, tiny_model_dir, mode="resume", sampler=spec), loaded=tiny_loaded)
    assert res.resumed_from == 7
    assert zarr.open_array(str(old / "latents"), mode="r").chunks[0] == 1  # the layout on disk is kept
    assert zarr.open_array(str(old / "step_complete"), mode="r").chunks == (1,)
    assert open_store(old).meta["nonfinite"] == {}
    from dithooks.store.verify import verify_store

    assert verify_store(old).ok
    assert_stores_equal(ref, old)


def test_small_steps_files_written_on_the_sampling_thread_make_the_same_store(tmp_path, tiny_loaded, tiny_model_dir,
                                                                              monkeypatch):
    """StoreWriter.sync_files: a batch's held file writes done at submit on the sampling thread
    (torch's threads take every core) or by the writer thread give the same store, bit for bit."""
    import threading

    import dithooks.store.writer as writer_module

    spec = SamplerSpec("ddim", 20, eta=1.0)
    real, where = writer_module.write_atomic, {}

    def recording(path, pieces):
        if "blocks.resid_post" in path:
            where.setdefault(threading.current_thread().name, 0)
            where[threading.current_thread().name] += 1
        return real(path, pieces)

    monkeypatch.setattr(writer_module, "write_atomic", recording)
    stores = {}
    for here in (False, True):
        monkeypatch.setattr(writer_module.StoreWriter, "sync_files", here)
        where.clear()
        stores[here] = tmp_path / f"{here}.zarr"
        capture(config(stores[here], tiny_model_dir, sampler=spec), loaded=tiny_loaded)
        assert list(where) == [threading.current_thread().name if here else "dithooks-store-writer"], where
    assert_stores_equal(stores[False], stores[True])


def test_the_sampling_thread_writes_small_steps_when_torch_takes_every_core(monkeypatch):
    import dithooks.store.writer as writer_module

    w = writer_module.StoreWriter.__new__(writer_module.StoreWriter)  # no thread: only the decision
    threads = torch.get_num_threads()
    monkeypatch.setattr(writer_module, "usable_cores", lambda: threads)
    assert w._writes_here()
    monkeypatch.setattr(writer_module, "usable_cores", lambda: threads + 1)
    assert not w._writes_here()
    monkeypatch.setattr(writer_module.StoreWriter, "sync_files", True)
    assert w._writes_here()
