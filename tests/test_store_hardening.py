"""The store's write side under faults: missing data reads NaN, non-finite values are counted,
`verify` finds every missing or damaged chunk, half-made and damaged stores get one line, the
writer's lock, `--overwrite` deletes only what dithooks wrote, messages name the right command."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from typer.testing import CliRunner

from dithooks.capture import CaptureConfig, CaptureSession, capture
from dithooks.cli.main import app
from dithooks.errors import DithooksError, StoreError
from dithooks.sampling import SamplerSpec
from dithooks.store.lock import LOCK_NAME, StoreLock, hostname, read_lock
from dithooks.store.metadata import how_to_continue
from dithooks.store.verify import verify_store

from .test_capture import Interrupt


def _chunk(store: Path, array: str, index: tuple[int, ...]) -> Path:
    """The file of one chunk (shard) of ``array``, whatever its chunk key encoding."""
    from dithooks.store.zarrio import ArrayMeta

    return Path(ArrayMeta.load(Path(store), array).path(index))

pytestmark = pytest.mark.usefixtures("one_torch_thread")
runner = CliRunner()


def cli(*args):
    return runner.invoke(app, [str(a) for a in args])


def config(out, model_dir, **kw):
    base = dict(out=str(out), model=str(model_dir), layers="0-3", hooks=("resid_post", "final.out"),
                sampler=SamplerSpec("ddim", 5, eta=1.0), labels=(1, 2), seeds=(0, 1), storage_dtype="fp32")
    base.update(kw)
    return CaptureConfig(**base)



def interrupted(out, model_dir, loaded, step=3, **kw):
    session = CaptureSession(config(out, model_dir, **kw), loaded=loaded)
    session.hooks.add_hook("blocks.3.resid_post", Interrupt(step))
    with pytest.raises(StoreError, match="interrupted"):
        session.run()
    session.hooks.remove_all()


def arrays(path):
    g = zarr.open_group(str(path), mode="r", use_consolidated=False)
    return {k: np.asarray(g[k][...]) for k in g.array_keys()}


def assert_bitwise_equal(a, b):
    A, B = arrays(a), arrays(b)
    assert sorted(A) == sorted(B)
    for k in A:
        assert A[k].dtype == B[k].dtype and A[k].shape == B[k].shape, k
        assert (A[k].tobytes() == B[k].tobytes()) if A[k].dtype.kind in "fiub" else A[k].tolist() == B[k].tolist(), k


def one_line_error(r, *needles):
    assert r.exit_code != 0, r.output
    assert "Traceback" not in r.output and r.exception is None or isinstance(r.exception, SystemExit), r.output
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("dithooks: error:"), r.output
    for n in needles:
        assert n in lines[0], r.output
    return lines[0]


def snapshot(folder):
    return sorted((str(p.relative_to(folder)), p.stat().st_mtime_ns, p.stat().st_size if p.is_file() else 0)
                  for p in [Path(folder), *Path(folder).rglob("*")])


# -- 1. missing data is NaN, never zeros --------------------------------------------------------
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_steps_never_computed_read_as_nan(tmp_path, tiny_loaded, tiny_model_dir, dtype):
    out = tmp_path / "part.zarr"
    interrupted(out, tiny_model_dir, tiny_loaded, step=3, storage_dtype=dtype)
    g = zarr.open_group(str(out), mode="r")
    from dithooks.store.codecs import decode

    resid = decode(np.asarray(g["blocks.resid_post"][...]), dict(g["blocks.resid_post"].attrs))
    assert np.isfinite(resid[:3]).all() and np.isnan(resid[3:]).all()
    lat = np.asarray(g["latents"][...])
    assert np.isfinite(lat[:4]).all() and np.isnan(lat[4:]).all()  # x before steps 0-3; step 3 never ran
    rng = np.asarray(g["rng_state"][...])
    assert rng[:4].any(axis=(1, 2)).all() and not rng[4:].any()  # 0 rows: the resume logic's "not written"
    import xarray as xr

    ds = xr.open_zarr(str(out), consolidated=False)
    assert np.isnan(ds["latents"].values[4:]).all()


# -- 2. non-finite values are counted, not hidden ---------------------------------------------------
def poison(step, sample=0):
    def fn(v, ctx):
        if ctx.step != step:
            return None
        v = v.clone()
        v[sample, 0, 0] = float("nan")
        v[sample, 1, 0] = float("inf")
        return v
    return fn


def numpy_counts(path):
    """Non-finite values per array and first-dim row, counted from the stored data."""
    out = {}
    for name, x in arrays(path).items():
        if x.dtype.kind != "f" or x.ndim == 0:
            continue
        rows = (~np.isfinite(x)).reshape(x.shape[0], -1).sum(axis=1)
        if rows.any():
            out[name] = {str(i): int(c) for i, c in enumerate(rows) if c}
    return out


def test_nonfinite_values_are_counted_per_array_and_step(tmp_path, tiny_loaded, tiny_model_dir):
    full = tmp_path / "full.zarr"
    s = CaptureSession(config(full, tiny_model_dir), loaded=tiny_loaded)
    s.hooks.add_intervention("blocks.1.attn.out", poison(step=2))
    res = s.run()
    s.hooks.remove_all()
    meta = dict(zarr.open_group(str(full), mode="r").attrs["dithooks"])
    expected = numpy_counts(full)
    assert expected and set(expected) >= {"blocks.resid_post", "latents"}  # the NaN reached the result
    assert meta["nonfinite"] == expected
    assert res.nonfinite == {k: sum(v.values()) for k, v in expected.items()}
    assert meta["status"] == "complete"
    # an interrupted run continued by --resume records the same counts
    part = tmp_path / "part.zarr"
    s = CaptureSession(config(part, tiny_model_dir), loaded=tiny_loaded)
    s.hooks.add_intervention("blocks.1.attn.out", poison(step=2))
    s.hooks.add_hook("blocks.3.resid_post", Interrupt(4))
    with pytest.raises(StoreError, match="interrupted"):
        s.run()
    s.hooks.remove_all()
    s = CaptureSession(config(part, tiny_model_dir, mode="resume"), loaded=tiny_loaded)
    s.hooks.add_intervention("blocks.1.attn.out", poison(step=2))
    try:
        s.run()
    finally:
        s.hooks.remove_all()  # the model is shared by the session's tests: leave no hook behind
    assert dict(zarr.open_group(str(part), mode="r").attrs["dithooks"])["nonfinite"] == expected
    r = cli("ls", full)
    assert r.exit_code == 0, r.output
    line = next(ln for ln in r.output.splitlines() if ln.startswith("NaN/inf"))
    total = sum(expected["latents"].values())
    assert f"latents {total} (latent_step 3-5)" in line
    assert json.loads(cli("ls", full, "--json").output)["nonfinite"]["latents"]["values"] == total


# -- 3. verify -----------------------------------------------------------------------------------------
@pytest.mark.usefixtures("shard_per_step")  # damages or looks for one step's file
def test_verify_finds_missing_truncated_and_corrupt_chunks_and_resume_redoes_them(tmp_path, tiny_loaded,
                                                                                  tiny_model_dir, monkeypatch):
    # latents in chunks of 2 rows: chunk 1 holds latent_steps 2-3, the x after steps 1 and 2
    monkeypatch.setattr("dithooks.store.layout.LATENT_ROWS_PER_CHUNK", 2)
    ref, out = tmp_path / "ref.zarr", tmp_path / "s.zarr"
    capture(config(ref, tiny_model_dir), loaded=tiny_loaded)
    shutil.copytree(ref, out)
    assert cli("verify", out).exit_code == 0
    _chunk(out, "blocks.resid_post", (3, 0, 0, 0, 0)).unlink()              # step 3: shard gone
    lat = _chunk(out, "latents", (1, 0, 0, 0, 0))                           # latent_steps 2-3 = steps 1-2
    lat.write_bytes(lat.read_bytes()[:-9])
    fo = _chunk(out, "final.out", (4, 0, 0, 0, 0))                          # step 4: one byte flipped
    data = bytearray(fo.read_bytes())
    data[10] ^= 0x40
    fo.write_bytes(bytes(data))
    r = cli("verify", out, "--json")
    assert r.exit_code == 1
    rep = json.loads(r.output)
    assert {(p["array"], p["step"]) for p in rep["problems"]} == {("blocks.resid_post", 3), ("latents", 1),
                                                                  ("latents", 2), ("final.out", 4)}
    assert rep["first_bad_step"] == 1 and not rep["ok"]
    quick = json.loads(cli("verify", out, "--quick", "--json").output)  # no decoding: the flip passes
    assert {(p["array"], p["step"]) for p in quick["problems"]} == {("blocks.resid_post", 3), ("latents", 1),
                                                                    ("latents", 2)}
    text = cli("verify", out).output
    assert "blocks.resid_post step 3: missing shard file" in text and "final.out step 4: does not decode" in text
    r = cli("ls", out)
    assert r.exit_code == 0
    status = next(ln for ln in r.output.splitlines() if ln.startswith("status"))
    assert "damaged" in status and "complete" not in status.split(";")[0] and "from step 1" in status
    assert cli("ls", out, "--verify").exit_code == 1
    assert json.loads(cli("ls", out, "--json").output)["completeness"]["complete"] is False
    # --resume recomputes from the first damaged step: the result equals the unbroken run
    res = capture(config(out, tiny_model_dir, mode="resume"), loaded=tiny_loaded)
    assert res.resumed_from == 1
    assert verify_store(out).ok
    assert_bitwise_equal(ref, out)


# -- 4. half-made and damaged stores ---------------------------------------------------------------------
def _damage(kind, store):
    if kind == "empty folder":
        shutil.rmtree(store)
        store.mkdir()
    elif kind == "group without metadata":  # an old version killed right as the folder appeared
        shutil.rmtree(store)
        store.mkdir()
        (store / "zarr.json").write_text('{"zarr_format": 3, "node_type": "group", "attributes": {}}')
    elif kind == "no step_complete":
        shutil.rmtree(store / "step_complete")
    elif kind == "truncated array zarr.json":
        f = store / "latents/zarr.json"
        f.write_text(f.read_text()[:40])
    elif kind == "truncated root zarr.json":
        f = store / "zarr.json"
        f.write_text(f.read_text()[:100])
    elif kind == "corrupt step_complete chunk":
        (store / "step_complete/c/0").write_bytes(b"\x01\x02\x03")


@pytest.fixture(scope="module")
def small_store(tmp_path_factory, tiny_loaded, tiny_model_dir):
    out = tmp_path_factory.mktemp("small") / "s.zarr"
    capture(config(out, tiny_model_dir, sampler=SamplerSpec("ddim", 3)), loaded=tiny_loaded)
    return out


@pytest.mark.parametrize("kind", ["empty folder", "group without metadata", "no step_complete",
                                  "truncated array zarr.json", "truncated root zarr.json",
                                  "corrupt step_complete chunk"])
def test_half_made_and_damaged_stores_get_one_line_and_overwrite_replaces_them(tmp_path, tiny_loaded,
                                                                                 tiny_model_dir, small_store, kind):
    out = tmp_path / "s.zarr"
    shutil.copytree(small_store, out)
    _damage(kind, out)
    one_line_error(cli("ls", out), str(out))
    one_line_error(cli("verify", out), str(out))
    with pytest.raises(DithooksError) as e:
        capture(config(out, tiny_model_dir, sampler=SamplerSpec("ddim", 3), mode="resume"), loaded=tiny_loaded)
    assert "\n" not in str(e.value) and "--overwrite" in str(e.value)
    capture(config(out, tiny_model_dir, sampler=SamplerSpec("ddim", 3), mode="overwrite"), loaded=tiny_loaded)
    assert verify_store(out).ok


def test_a_failed_creation_leaves_nothing_behind(tmp_path, tiny_loaded, tiny_model_dir, monkeypatch):
    out = tmp_path / "s.zarr"
    real = CaptureSession._build

    def failing(self, folder):
        real(self, folder)
        raise OverflowError("Python int too large to convert to C long")

    monkeypatch.setattr(CaptureSession, "_build", failing)
    with pytest.raises(StoreError, match=r"cannot create .*OverflowError") as e:
        capture(config(out, tiny_model_dir), loaded=tiny_loaded)
    assert "\n" not in str(e.value)
    assert list(tmp_path.iterdir()) == []  # neither the store nor its temporary folder
    monkeypatch.setattr(CaptureSession, "_build", real)
    r = cli("capture", "--model", tiny_model_dir, "--seeds", "99999999999999999999", "--steps", "2",
            "--out", out, "-q")
    one_line_error(r)
    assert list(tmp_path.iterdir()) == []


# -- 5. the writer's lock ----------------------------------------------------------------------------------
HOLD = """
import sys, time
from dithooks.store.lock import StoreLock
StoreLock(sys.argv[1], command="holder").acquire()
print("locked", flush=True)
time.sleep(120)
"""


def test_a_second_writer_is_refused_while_a_live_process_holds_the_lock(tmp_path, tiny_loaded, tiny_model_dir):
    out = tmp_path / "s.zarr"
    interrupted(out, tiny_model_dir, tiny_loaded, step=2)
    before = snapshot(out)
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        for mode in ("resume", "overwrite"):
            with pytest.raises(StoreError, match=rf"being written by pid {holder.pid} on {hostname()}") as e:
                capture(config(out, tiny_model_dir, mode=mode), loaded=tiny_loaded)
            assert "\n" not in str(e.value)
        status = next(ln for ln in cli("ls", out).output.splitlines() if ln.startswith("status"))
        assert status.startswith("status    running") and f"pid {holder.pid}" in status
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    files = lambda snap: [x for x in snap if x[0] not in (".", LOCK_NAME)]  # noqa: E731 (the lock came and went)
    assert files(snapshot(out)) == files(before)  # the refused writers changed nothing
    status = next(ln for ln in cli("ls", out).output.splitlines() if ln.startswith("status"))
    assert status.startswith("status    interrupted")  # the holder is dead: nothing writes it
    res = capture(config(out, tiny_model_dir, mode="resume"), loaded=tiny_loaded)  # stale lock reclaimed
    assert res.resumed_from == 2 and not (out / LOCK_NAME).exists()


def _dead_pid():
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


@pytest.mark.parametrize("owner, refused", [
    (lambda: {"pid": _dead_pid(), "host": hostname()}, False),                      # dead: reclaimed
    (lambda: {"pid": os.getppid(), "host": hostname(), "pid_start": 1}, False),     # pid reused: reclaimed
    (lambda: {"pid": os.getppid(), "host": hostname()}, True),                      # alive: refused
    (lambda: {"pid": 1, "host": "elsewhere.example"}, True),                        # other host: refused
])
def test_stale_locks_are_reclaimed_and_live_or_foreign_ones_refused(tmp_path, owner, refused):
    d = tmp_path / "s.zarr"
    d.mkdir()
    (d / LOCK_NAME).write_text(json.dumps(owner()))
    if refused:
        with pytest.raises(StoreError, match="being written by") as e:
            StoreLock(d).acquire()
        if "elsewhere" in str(e.value):
            assert str(d / LOCK_NAME) in str(e.value)  # says which file to delete
        return
    (d / f"{LOCK_NAME}.{'a' * 32}.tmp").write_text("{}")  # a locker killed before it linked its lock
    with StoreLock(d) as lock:
        assert read_lock(d)["token"] == lock.token and read_lock(d)["pid"] == os.getpid()
        assert os.listdir(d) == [LOCK_NAME]  # the holder swept the leftover
    assert not os.listdir(d)


def test_two_processes_racing_for_one_lock_never_both_win(tmp_path):
    d = tmp_path / "s.zarr"
    d.mkdir()
    race = ("import sys, time\nfrom dithooks.store.lock import StoreLock\nfrom dithooks.errors import StoreError\n"
            "t = float(sys.argv[2])\nwhile time.time() < t: pass\n"
            "try:\n    StoreLock(sys.argv[1]).acquire(); print('won', flush=True); time.sleep(1)\n"
            "except StoreError: print('lost', flush=True)\n")
    start = time.time() + 1.0  # all three started (and imported) by then
    procs = [subprocess.Popen([sys.executable, "-c", race, str(d), str(start)], stdout=subprocess.PIPE, text=True)
             for _ in range(3)]
    outs = sorted(p.communicate(timeout=60)[0].strip() for p in procs)
    assert outs == ["lost", "lost", "won"]


# -- 6. --overwrite deletes only what dithooks wrote ----------------------------------------------------------
def test_overwrite_refuses_a_folder_with_user_files_and_touches_nothing(tmp_path, tiny_loaded, tiny_model_dir,
                                                                       small_store):
    out = tmp_path / "s.zarr"
    shutil.copytree(small_store, out)
    for extra in ("notes.txt", "blocks.resid_post/README", "mine/data.npy"):
        f = out / extra
        f.parent.mkdir(exist_ok=True)
        f.write_text("precious")
        before = snapshot(out)
        r = cli("capture", "--model", tiny_model_dir, "--layers", "0-3", "--hooks", "resid_post,final.out",
                "--steps", "3", "--seeds", "0-1", "--class", "1,2", "--dtype", "fp32", "--out", out, "--overwrite", "-q")
        one_line_error(r, "refusing to overwrite", extra.split("/")[0])
        assert snapshot(out) == before and f.read_text() == "precious"
        if f.parent != out:
            shutil.rmtree(f.parent) if f.parent.name == "mine" else f.unlink()
        else:
            f.unlink()
    # what dithooks and its experiment commands write may go: figures/, a stale lock, partial writes
    (out / "figures").mkdir()
    (out / "figures/routing.svg").write_text("<svg/>")
    (out / LOCK_NAME).write_text(json.dumps({"pid": _dead_pid(), "host": hostname()}))
    c0 = _chunk(out, "latents", (0, 0, 0, 0, 0))
    (c0.parent / f"{c0.name}.0123456789abcdef0123456789abcdef.partial").write_bytes(b"half")
    capture(config(out, tiny_model_dir, sampler=SamplerSpec("ddim", 3), mode="overwrite", seeds=(4, 5)),
            loaded=tiny_loaded)
    assert not (out / "figures").exists() and not (out / LOCK_NAME).exists()
    assert zarr.open_group(str(out), mode="r").attrs["dithooks"]["seeds"] == [4, 5]
    assert [p.name for p in tmp_path.iterdir()] == ["s.zarr"]  # no temporary folders left


# -- 7. messages name the command that made the store ---------------------------------------------------------
def _unfinish(store, from_step):
    g = zarr.open_group(str(store), mode="r+")
    g["step_complete"][from_step:] = False
    meta = dict(g.attrs["dithooks"])
    meta["status"] = "interrupted"
    g.attrs["dithooks"] = meta


def test_ls_suggests_the_command_that_made_the_store(tmp_path, tiny_model_dir):
    probe = tmp_path / "p.zarr"
    r = cli("probe", "residual_norms", "--model", tiny_model_dir, "--layers", "0-1", "--steps", "3",
            "--seeds", "0-1", "--out", probe, "-q")
    assert r.exit_code == 0, r.output
    assert zarr.open_group(str(probe), mode="r").attrs["dithooks"]["command"]["name"] == "probe"
    _unfinish(probe, 1)
    status = next(ln for ln in cli("ls", probe).output.splitlines() if ln.startswith("status"))
    assert "`dithooks probe residual_norms --resume --out" in status and "dithooks capture" not in status
    cap = tmp_path / "c.zarr"
    assert cli("capture", "--model", tiny_model_dir, "--layers", "0", "--steps", "3", "--out", cap, "-q").exit_code == 0
    _unfinish(cap, 2)
    status = next(ln for ln in cli("ls", cap).output.splitlines() if ln.startswith("status"))
    assert "`dithooks capture --resume --out" in status
    # a command without --resume is told to start again; the exact command line when known
    routing = {"command": {"name": "routing", "argv": None, "resume_option": False}}
    assert "cannot resume" in how_to_continue(routing, "r.zarr") and "--overwrite" in how_to_continue(routing, "r.zarr")
    argv = {"command": {"name": "capture", "argv": ["capture", "--steps", "9", "--out", "x y.zarr", "--overwrite"],
                        "resume_option": True}}
    assert how_to_continue(argv, "x y.zarr") == "continue with `dithooks capture --steps 9 --out 'x y.zarr' --resume`"


# -- 8. failures inside a run ---------------------------------------------------------------------------------
from dithooks.probes.api import Output, Probe  # noqa: E402


class Failing(Probe):
    """Counts steps; raises in observe at step ``at`` or in finish (for the tests below)."""

    needs = ("resid_post",)
    resumable = True
    at: int | None = None

    def start(self, run):
        self.run, self.n = run, 0

    def observe(self, name, value, ctx):
        if ctx.step == self.at:
            raise RuntimeError("probe bug")

    def end_step(self, step):
        self.n += 1
        return {"n": Output(torch.tensor([float(step)]), ("one",), "step")}

    def finish(self):
        if self.at is None:
            raise RuntimeError("finish bug")
        return {"total": Output(torch.tensor([float(self.n)]), ("one",), "steps seen")}


def test_a_failing_probe_keeps_finished_steps_and_never_marks_the_store_complete(tmp_path, tiny_loaded,
                                                                                 tiny_model_dir, monkeypatch):
    monkeypatch.setattr("dithooks.capture.recorder.BATCH_STEPS", 16)  # every step buffered until the end
    out = tmp_path / "s.zarr"
    with pytest.raises(Exception, match="probe bug"):  # a ProbeError (one line) or the raw error
        capture(config(out, tiny_model_dir, probes=(type("AtThree", (Failing,), {"at": 3})(),)), loaded=tiny_loaded)
    done = np.asarray(zarr.open_group(str(out), mode="r")["step_complete"][...])
    assert done.tolist() == [True, True, True, False, False]  # the buffered steps 0-2 were written
    out2 = tmp_path / "f.zarr"
    with pytest.raises(Exception, match="finish bug"):
        capture(config(out2, tiny_model_dir, probes=(Failing(),)), loaded=tiny_loaded)
    done = np.asarray(zarr.open_group(str(out2), mode="r")["step_complete"][...])
    assert not done[-1]  # the once-only outputs are missing: the last step is not complete
    assert "complete" not in next(ln for ln in cli("ls", out2).output.splitlines() if ln.startswith("status"))


def test_count_nonfinite_matches_numpy_for_every_storage_dtype():
    from dithooks.store.codecs import to_numpy
    from dithooks.store.writer import count_nonfinite

    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 50, generator=g)
    x[torch.rand(6, 50, generator=g) < 0.1] = float("nan")
    x[torch.rand(6, 50, generator=g) < 0.05] = float("inf")
    x[torch.rand(6, 50, generator=g) < 0.05] = -float("inf")
    want = (~np.isfinite(x.numpy())).sum(axis=1)
    for dt in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        got = count_nonfinite(to_numpy(x.to(dt)), dt, (slice(10, 16),))
        assert got == {10 + i: int(c) for i, c in enumerate(want) if c}, dt
    assert count_nonfinite(to_numpy(x), torch.float32, Ellipsis) == {"all": int(want.sum())}
    assert count_nonfinite(np.zeros(3, np.uint8), torch.uint8, (0,)) == {}


def test_a_store_behind_a_symlink_resumes_and_is_not_overwritten_through_it(tmp_path, tiny_loaded, tiny_model_dir,
                                                                            small_store):
    real = tmp_path / "disk" / "s.zarr"
    real.parent.mkdir()
    shutil.copytree(small_store, real)
    link = tmp_path / "s.zarr"
    link.symlink_to(real)
    cfg = dict(sampler=SamplerSpec("ddim", 3))
    assert capture(config(link, tiny_model_dir, mode="resume", **cfg), loaded=tiny_loaded).steps_run == 0
    with pytest.raises(StoreError, match="symbolic link") as e:
        capture(config(link, tiny_model_dir, mode="overwrite", **cfg), loaded=tiny_loaded)
    assert "\n" not in str(e.value) and link.is_symlink() and verify_store(real).ok
