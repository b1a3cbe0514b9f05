"""Large steps hand each chunk of layers to the writer as soon as its last layer is recorded
(capture/recorder.py ``StepRecorder._eager``): a file per (step, chunk of layers), written while
the model computes the next blocks. The store must hold exactly what a shard per step holds,
verify, refuse and resume the same - also after an interruption in the middle of a step, whose
chunks already written belong to a step that is not marked."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import zarr

from dithooks.capture import CaptureSession, capture
from dithooks.capture import recorder as recorder_mod
from dithooks.capture.recorder import StepRecorder
from dithooks.errors import StoreError
from dithooks.hookpoints import HookPoint
from dithooks.hooks import HookContext
from dithooks.sampling import SamplerSpec
from dithooks.store.reader import open_store
from dithooks.store.verify import verify_store
from dithooks.store.writer import StoreWriter
from dithooks.store.zarrio import ArrayMeta

from .test_capture import Interrupt
from .test_store_hardening import assert_bitwise_equal, config

pytestmark = pytest.mark.usefixtures("one_torch_thread")
STEPS = 6
LAYERS_PER_CHUNK = 2  # the tiny model's 4 blocks: two chunks of layers per step


@pytest.fixture(autouse=True)
def large_steps(monkeypatch):
    """The tiny model's steps made 'large' (not inline, a step per write) and its layers as big as
    a chunk of two."""
    monkeypatch.setattr(recorder_mod, "INLINE_STEP_BYTES", 1)
    monkeypatch.setattr(recorder_mod, "BATCH_STEPS", 1)
    monkeypatch.setattr(recorder_mod, "EAGER_CHUNK_BYTES", 1)
    monkeypatch.setattr("dithooks.store.layout.layers_per_chunk", lambda n, b, target=0: LAYERS_PER_CHUNK)


def cfg(out, model_dir, **kw):
    return config(out, model_dir, sampler=SamplerSpec("ddim", STEPS, eta=1.0), **kw)


@pytest.fixture
def reference(tmp_path, tiny_loaded, tiny_model_dir, monkeypatch):
    """The same capture written a step at a time at step end (a shard per step)."""
    out = tmp_path / "ref.zarr"
    with monkeypatch.context() as mp:
        mp.setattr(recorder_mod, "EAGER_CHUNKS", False)
        capture(cfg(out, tiny_model_dir), loaded=tiny_loaded)
    m = ArrayMeta.load(out, "blocks.resid_post")
    assert m.sharded and tuple(m.outer[:2]) == (1, 4)
    return out


def hook_files(store: Path, array: str = "blocks.resid_post") -> list[str]:
    return sorted(p.name for p in (store / array).iterdir() if p.name != "zarr.json")


def test_a_file_per_chunk_of_layers_and_the_store_equals_a_shard_per_step(tmp_path, tiny_loaded, tiny_model_dir,
                                                                         reference):
    out = tmp_path / "s.zarr"
    capture(cfg(out, tiny_model_dir), loaded=tiny_loaded)
    m = ArrayMeta.load(out, "blocks.resid_post")
    assert not m.sharded and tuple(m.outer[:2]) == (1, LAYERS_PER_CHUNK)
    assert len(hook_files(out)) == STEPS * 4 // LAYERS_PER_CHUNK
    assert ArrayMeta.load(out, "final.out").outer[0] == 1  # no layer dim: a file per step, as before
    assert_bitwise_equal(out, reference)
    rep = verify_store(out)
    assert rep.ok, rep.summary()
    ref = zarr.open_group(str(reference), mode="r")["blocks.resid_post"][...]
    # dithooks' reader: one (step, layer), a layer across steps, everything
    store = open_store(out)
    np.testing.assert_array_equal(store.select("blocks.resid_post", step=3, layer=1).values, ref[3:4, 1:2])
    np.testing.assert_array_equal(store.select("blocks.resid_post", layer=2).values, ref[:, 2:3])
    np.testing.assert_array_equal(store.select("blocks.resid_post").values, ref)
    xr = pytest.importorskip("xarray")
    ds = xr.open_zarr(str(out), consolidated=False)
    np.testing.assert_array_equal(ds["blocks.resid_post"].values,
                                  zarr.open_group(str(reference), mode="r")["blocks.resid_post"][...])


def test_chunks_under_the_size_bound_keep_a_shard_per_step(tmp_path, tiny_loaded, tiny_model_dir, reference,
                                                           monkeypatch):
    monkeypatch.setattr(recorder_mod, "EAGER_CHUNK_BYTES", 2**20)  # the tiny model's chunks: a few KiB
    out = tmp_path / "s.zarr"
    capture(cfg(out, tiny_model_dir), loaded=tiny_loaded)
    m = ArrayMeta.load(out, "blocks.resid_post")
    assert m.sharded and tuple(m.outer[:2]) == (1, 4)
    assert_bitwise_equal(out, reference)


def test_a_chunk_is_handed_over_before_the_later_blocks_run(tmp_path, tiny_loaded, tiny_model_dir, monkeypatch):
    events = []
    real_put = StoreWriter.put

    def put(self, spec, index, value):
        if spec.name == "blocks.resid_post":
            events.append(("put", index))
        return real_put(self, spec, index, value)
    monkeypatch.setattr(StoreWriter, "put", put)
    session = CaptureSession(cfg(tmp_path / "s.zarr", tiny_model_dir), loaded=tiny_loaded)
    session.hooks.add_hook("blocks.3.resid_pre", lambda v, ctx: events.append(("block 3", ctx.step)))
    try:
        session.run()
    finally:
        session.hooks.remove_all()  # the model is shared by the module's tests
    # step 0 decides the layout (written whole at its end); every later step's first chunk
    # (layers 0-1) goes to the writer before block 3 runs, its second once block 3 has
    assert events[:2] == [("block 3", 0), ("put", (slice(0, 1),))]
    for s in range(1, STEPS):
        i = events.index(("block 3", s))
        assert events[i - 1] == ("put", (s, slice(0, 2))) and events[i + 1] == ("put", (s, slice(2, 4)))


def test_an_interruption_inside_a_step_verifies_and_resumes_to_the_same_store(tmp_path, tiny_loaded,
                                                                             tiny_model_dir, reference):
    out = tmp_path / "part.zarr"
    session = CaptureSession(cfg(out, tiny_model_dir), loaded=tiny_loaded)
    session.hooks.add_hook("blocks.3.resid_pre", Interrupt(4))  # layers 0-1 of step 4 handed over
    try:
        with pytest.raises(StoreError, match="interrupted"):
            session.run()
    finally:
        session.hooks.remove_all()
    marks = zarr.open_array(str(out / "step_complete"), mode="r")[...]
    assert marks.tolist() == [s < 4 for s in range(STEPS)]
    rep = verify_store(out)
    assert rep.ok, rep.summary()
    capture(cfg(out, tiny_model_dir, mode="resume"), loaded=tiny_loaded)
    assert not ArrayMeta.load(out, "blocks.resid_post").sharded  # resumed in its own layout
    assert verify_store(out).ok
    assert_bitwise_equal(out, reference)


# -- the recorder alone: a layer recorded twice in a step, a layer not recorded ---------------------
class Writer:
    inline = False

    def __init__(self):
        self.puts: list[tuple] = []

    def put(self, spec, index, value):
        self.puts.append((spec.name, index, value.clone()))

    def call(self, fn):
        fn()

    def submit(self):
        pass

    def file_shape(self, name):
        return None


class Log:
    eager_chunks = True

    def __init__(self, writer):
        self.writer = writer

    def write_states(self, states):
        pass

    def mark_complete(self, rows):
        pass


def test_a_layer_recorded_twice_or_not_at_all_is_written_at_step_end():
    writer = Writer()
    rec = StepRecorder(Log(writer), steps=3, layers=[0, 1, 2, 3], store_dtype=torch.float32, sample_coords=("seed",))
    axes = (("sample", 2),)
    state = SimpleNamespace(latents=torch.zeros(2, 1, 2, 2))

    def point(layer):
        return HookPoint(f"blocks.{layer}.resid_post", "x", "m", "post", ("batch", "token", "channel"), "doc", layer)

    def record(step, layer, value):
        rec.record(value, HookContext(point(layer).name, layer, step, 0.0, axes, point(layer)))
    for layer in range(4):
        record(0, layer, torch.full((2, 3, 5), float(layer)))
    rec.end_step(0, state)
    assert [p[1] for p in writer.puts] == [(slice(0, 1),)]  # step 0: whole, at its end
    assert rec._specs["blocks.resid_post"].shards is None
    writer.puts.clear()
    # step 1: layer 1 recorded twice (after its chunk was handed over), layer 3 never
    for layer, v in [(0, 10.0), (1, 11.0), (1, 21.0), (2, 12.0)]:
        record(1, layer, torch.full((2, 3, 5), v))
    assert [p[1] for p in writer.puts] == [(1, slice(0, 2))]
    rec.end_step(1, state)
    assert [p[1] for p in writer.puts] == [(1, slice(0, 2)), (1, slice(0, 2)), (1, slice(2, 4))]
    last = writer.puts[1][2]  # the chunk written again at step end holds the later value
    assert last[0].unique().tolist() == [10.0] and last[1].unique().tolist() == [21.0]
