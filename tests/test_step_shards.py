"""Small steps keep a batch of steps in one shard (file) per hook array (capture/recorder.py):
the store must read, verify, refuse incomplete steps and resume exactly as a store with a shard per
step does - with a shard cut by the array's end, a shard half-filled by an interruption, a damaged
shard, and an older store that has a shard per step."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import zarr

from dithooks.capture import CaptureSession, capture
from dithooks.errors import StoreError
from dithooks.sampling import SamplerSpec
from dithooks.store.verify import verify_store
from dithooks.store.zarrio import MISSING, ArrayMeta

from .conftest import shards_per_step
from .test_capture import Interrupt
from .test_store_hardening import assert_bitwise_equal, cli, config

pytestmark = pytest.mark.usefixtures("one_torch_thread")
STEPS = 10
BATCH = 4  # steps per batch, so per shard: shards hold steps 0-3, 4-7 and 8-9 (cut by the end)


@pytest.fixture(autouse=True)
def small_batches(monkeypatch):
    monkeypatch.setattr("dithooks.capture.recorder.BATCH_STEPS", BATCH)


def cfg(out, model_dir, **kw):
    return config(out, model_dir, sampler=SamplerSpec("ddim", STEPS, eta=1.0), **kw)


def hook_files(store: Path, array: str = "blocks.resid_post") -> list[str]:
    return sorted(p.name for p in (store / array).iterdir() if p.name != "zarr.json")


@pytest.fixture(scope="module")
def per_step(tmp_path_factory, tiny_loaded, tiny_model_dir):
    """The reference: the same capture with a shard per step."""
    out = tmp_path_factory.mktemp("shards") / "per-step.zarr"
    mp = pytest.MonkeyPatch()
    mp.setattr("dithooks.capture.recorder.BATCH_STEPS", BATCH)
    try:
        with shards_per_step():
            capture(cfg(out, tiny_model_dir), loaded=tiny_loaded)
    finally:
        mp.undo()
    return out


def test_a_batch_of_steps_is_one_shard_and_the_store_equals_a_shard_per_step(tmp_path, tiny_loaded,
                                                                            tiny_model_dir, per_step):
    out = tmp_path / "s.zarr"
    capture(cfg(out, tiny_model_dir), loaded=tiny_loaded)
    meta = ArrayMeta.load(out, "blocks.resid_post")
    assert meta.sharded and meta.outer[0] == BATCH and meta.inner[0] == 1  # a chunk per step inside
    assert hook_files(out) == ["c.0.0.0.0.0", "c.1.0.0.0.0", "c.2.0.0.0.0"]
    assert len(hook_files(per_step)) == STEPS
    # final.out (no layer dim) is sharded by steps too
    assert ArrayMeta.load(out, "final.out").outer[0] == BATCH
    assert_bitwise_equal(out, per_step)
    # the edge shard holds steps 8 and 9; its other two chunks lie past the end and are not written
    index = _index(out, "blocks.resid_post", 2)
    assert (index[:2] != MISSING).all() and (index[2:] == MISSING).all()
    rep = verify_store(out)
    assert rep.ok, rep.summary()
    assert rep.files_checked and rep.chunks_decoded
    # any reader: xarray (dask) reads the same values
    xr = pytest.importorskip("xarray")
    ds = xr.open_zarr(str(out), consolidated=False)
    ref = zarr.open_group(str(per_step), mode="r")
    np.testing.assert_array_equal(ds["blocks.resid_post"].values, ref["blocks.resid_post"][...])


def _index(store: Path, array: str, shard: int) -> np.ndarray:
    """The (offset, nbytes) entries of a shard's index, one row per inner chunk (step-major)."""
    m = ArrayMeta.load(store, array)
    raw = Path(m.path((shard,) + (0,) * (len(m.shape) - 1))).read_bytes()
    n = int(np.prod(m.per_shard))
    return np.frombuffer(raw[len(raw) - 16 * n - 4:len(raw) - 4], "<u8").reshape(n, 2)


@pytest.mark.parametrize("stop", [5, 8])  # inside a shard, and on a shard's first step
def test_an_interrupted_capture_leaves_a_partial_shard_that_verifies_and_resumes(tmp_path, tiny_loaded,
                                                                               tiny_model_dir, per_step, stop):
    out = tmp_path / "part.zarr"
    session = CaptureSession(cfg(out, tiny_model_dir), loaded=tiny_loaded)
    session.hooks.add_hook("blocks.3.resid_post", Interrupt(stop))
    with pytest.raises(StoreError, match="interrupted"):
        session.run()
    session.hooks.remove_all()
    marks = zarr.open_array(str(out / "step_complete"), mode="r")[...]
    assert marks.tolist() == [s < stop for s in range(STEPS)]
    # the steps not done read as NaN (never as numbers) and verify does not count them as missing
    values = zarr.open_group(str(out), mode="r")["blocks.resid_post"][...]
    assert np.isnan(values[stop:]).all() and not np.isnan(values[:stop]).any()
    rep = verify_store(out)
    assert rep.ok, rep.summary()
    r = cli("query", out, "blocks.resid_post", "--step", f"{stop}")
    assert r.exit_code == 2 and f"step {stop} is not complete" in r.output
    # resume: the half-filled shard is completed, keeping the steps it holds
    capture(cfg(out, tiny_model_dir, mode="resume"), loaded=tiny_loaded)
    assert hook_files(out) == ["c.0.0.0.0.0", "c.1.0.0.0.0", "c.2.0.0.0.0"]
    assert verify_store(out).ok
    assert_bitwise_equal(out, per_step)


def test_a_damaged_shard_is_reported_for_its_steps_and_resume_rewrites_it(tmp_path, tiny_loaded,
                                                                        tiny_model_dir, per_step):
    out = tmp_path / "s.zarr"
    capture(cfg(out, tiny_model_dir), loaded=tiny_loaded)
    shard = Path(ArrayMeta.load(out, "blocks.resid_post").path((1, 0, 0, 0, 0)))  # steps 4-7
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    rep = verify_store(out)
    assert sorted({p.step for p in rep.problems}) == [4, 5, 6, 7]
    assert all(p.array == "blocks.resid_post" for p in rep.problems)
    assert rep.first_bad_step == 4
    r = cli("capture", "--model", tiny_model_dir, "--layers", "0-3", "--hooks", "resid_post,final.out",
            "--steps", str(STEPS), "--eta", "1", "--class", "1,2", "--seeds", "0,1", "--dtype", "fp32",
            "--out", out, "--resume", "-q")
    assert r.exit_code == 0, r.output
    assert verify_store(out).ok
    assert_bitwise_equal(out, per_step)


def test_a_step_missing_from_a_shard_is_reported_alone(tmp_path, tiny_loaded, tiny_model_dir):
    """A shard whose index lacks one marked step's chunk (its checksum right): that step only."""
    import google_crc32c

    out = tmp_path / "s.zarr"
    capture(cfg(out, tiny_model_dir), loaded=tiny_loaded)
    m = ArrayMeta.load(out, "blocks.resid_post")
    path = Path(m.path((1, 0, 0, 0, 0)))
    raw = bytearray(path.read_bytes())
    n = int(np.prod(m.per_shard))
    lo = len(raw) - 16 * n - 4
    index = np.frombuffer(bytes(raw[lo:lo + 16 * n]), "<u8").reshape(n, 2).copy()
    index[1] = MISSING  # step 5 (the second step of shard 1; one chunk per step: all layers)
    raw[lo:lo + 16 * n] = index.tobytes()
    raw[-4:] = np.uint32(google_crc32c.value(bytes(raw[lo:lo + 16 * n]))).astype("<u4").tobytes()
    path.write_bytes(bytes(raw))
    rep = verify_store(out, decode=False)
    assert [(p.array, p.step) for p in rep.problems] == [("blocks.resid_post", 5)], rep.summary()
    assert "missing from the shard" in rep.problems[0].what


def test_a_store_with_a_shard_per_step_resumes_in_its_own_layout(tmp_path, tiny_loaded, tiny_model_dir, per_step):
    out = tmp_path / "old.zarr"
    with shards_per_step():
        session = CaptureSession(cfg(out, tiny_model_dir), loaded=tiny_loaded)
        session.hooks.add_hook("blocks.3.resid_post", Interrupt(6))
        with pytest.raises(StoreError, match="interrupted"):
            session.run()
        session.hooks.remove_all()
    capture(cfg(out, tiny_model_dir, mode="resume"), loaded=tiny_loaded)  # today's default: step shards
    assert ArrayMeta.load(out, "blocks.resid_post").outer[0] == 1
    assert len(hook_files(out)) == STEPS
    assert verify_store(out).ok
    assert_bitwise_equal(out, per_step)


def test_large_steps_keep_a_shard_per_step(tmp_path, tiny_loaded, tiny_model_dir, monkeypatch):
    """Steps at or above INLINE_STEP_BYTES go through the writer thread a step per file."""
    monkeypatch.setattr("dithooks.capture.recorder.INLINE_STEP_BYTES", 1)
    out = tmp_path / "s.zarr"
    capture(cfg(out, tiny_model_dir), loaded=tiny_loaded)
    assert ArrayMeta.load(out, "blocks.resid_post").outer[0] == 1
    assert verify_store(out).ok
