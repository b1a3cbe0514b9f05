"""The store reader: selections and reductions against numpy, missing and damaged data never read
as zeros, one-line errors, bounded memory, and no torch/zarr on the query path.

Most stores here are written directly with zarr-python (an independent writer) so that every layout
the reader must handle - sharded with one or several inner chunks, unsharded, compressed, bf16 bits,
fill value 0 (format 1) or NaN - is exercised whatever the capture writes today; one test reads a
real interrupted capture.
"""

import json
import subprocess
import sys
import tracemalloc
import warnings

import numpy as np
import pytest
import zarr

from dithooks import query as Q
from dithooks.query import reduce_selection, reduce_store
from dithooks.store.reader import (CorruptStoreError, IncompleteDataWarning, IncompleteStepsError, MissingChunkError,
                                   SelectionError, ValueRange, open_store, parse_index)
from dithooks.store.zarrio import MISSING

DIMS = ("step", "layer", "cfg", "sample", "token", "channel")
LAYERS = (0, 2, 5)


def make_store(path, *, steps=6, layers=LAYERS, samples=3, tokens=5, channels=8, dtype="float16", inner_layers=1,
               sharded=True, compressors=None, fill=0.0, written=None, marked=None, fmt=1, seed=0, bf16=False):
    """A dithooks-shaped store written with zarr-python; returns the array as written (bf16: float32)."""
    rng = np.random.default_rng(seed)
    shape = (steps, len(layers), 2, samples, tokens, channels)
    values = rng.standard_normal(shape).astype(np.float32)
    if bf16:
        import torch

        t = torch.from_numpy(values).to(torch.bfloat16)
        stored, values = t.view(torch.int16).numpy().view(np.uint16), t.float().numpy()
        dtype = "uint16"
    else:
        stored = values = values.astype(dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        g = zarr.open_group(str(path), mode="w")
        g.attrs["dithooks"] = {"format_version": fmt, "status": "complete"}

        def coord(name, data, dt=None):
            a = g.create_array(name, shape=(len(data),), dtype=dt or np.asarray(data).dtype, dimension_names=(name,))
            a[:] = np.asarray(data)

        coord("step", np.arange(steps))
        coord("timestep", 1000 - 100 * np.arange(steps))
        coord("layer", np.array(layers))
        coord("sample", np.arange(samples))
        coord("cfg", np.array(["cond", "uncond"]), str)
        done = g.create_array("step_complete", shape=(steps,), chunks=(1,), dtype=bool, fill_value=False,
                              dimension_names=("step",))
        chunks = (1, inner_layers) + shape[2:]
        a = g.create_array("blocks.resid_post", shape=shape, chunks=chunks,
                           shards=(1, len(layers)) + shape[2:] if sharded else None, dtype=dtype, fill_value=fill,
                           dimension_names=DIMS, compressors=compressors,
                           attributes={"hook": "blocks.{i}.resid_post", **({"dithooks_dtype": "bfloat16"} if bf16 else {})})
        for s in (range(steps) if written is None else written):
            a[s] = stored[s]
        for s in (range(steps) if written is None and marked is None else marked if marked is not None else written):
            done[s] = True
    return values


LAYOUTS = {
    "sharded-1-layer-chunks": dict(),
    "sharded-3-layer-chunks": dict(inner_layers=3),
    "unsharded": dict(sharded=False),
    "sharded-zstd": dict(compressors=zarr.codecs.ZstdCodec(level=1)),
    "unsharded-blosc-f32": dict(sharded=False, dtype="float32",
                                compressors=zarr.codecs.BloscCodec(cname="lz4", clevel=5, shuffle="bitshuffle")),
}


def reference(values, sel):
    """Independent: numpy on the written array with per-dim position lists (orthogonal indexing)."""
    pos = []
    for d, n in zip(DIMS, values.shape):
        w = sel.get(d)
        if w is None:
            p = np.arange(n)
        elif isinstance(w, slice):
            p = np.arange(n)[w]
        elif d == "layer":
            ws = w if isinstance(w, list) else [w]
            p = np.array([LAYERS.index(x) if x >= 0 else len(LAYERS) + x for x in ws])
        elif d == "cfg":
            p = np.array([["cond", "uncond"].index(x) for x in (w if isinstance(w, list) else [w])])
        else:
            p = np.array(w if isinstance(w, list) else [w]) % n
        pos.append(p)
    return values[np.ix_(*pos)], pos


def random_selection(rng):
    def pick(options):
        return options[int(rng.integers(len(options)))]

    sel = {}
    if rng.random() < 0.7:
        sel["step"] = pick([slice(None), slice(1, 5), slice(0, 6, 2), slice(None, None, -2), 3, -1, [4, 0, 2]])
    if rng.random() < 0.7:
        sel["layer"] = pick([0, 5, -1, [5, 0], [0, 2]])
    if rng.random() < 0.5:
        sel["cfg"] = pick(["cond", "uncond", ["uncond", "cond"]])
    if rng.random() < 0.5:
        sel["token"] = pick([slice(1, 4), slice(0, 5, 3), [4, 1]])
    if rng.random() < 0.3:
        sel["channel"] = pick([slice(2, 7, 2), 7])
    return sel


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_selections_match_numpy_in_every_layout(tmp_path, layout):
    values = make_store(tmp_path / "s.zarr", **LAYOUTS[layout])
    s = open_store(tmp_path / "s.zarr")
    rng = np.random.default_rng(1)
    for _ in range(25):
        sel = random_selection(rng)
        got = s.select("blocks.resid_post", **sel)
        want, pos = reference(values, sel)
        assert got.values.dtype == values.dtype, sel  # the stored dtype is kept
        np.testing.assert_array_equal(got.values, want, err_msg=str(sel))
        assert got.coords["layer"].tolist() == [LAYERS[i] for i in pos[1]]
        assert got.coords["cfg"].tolist() == [["cond", "uncond"][i] for i in pos[2]]
    # a layer-specific hook name selects that layer; every dim is kept
    got = s.select("blocks.2.resid_post", step=0)
    np.testing.assert_array_equal(got.values, values[0:1, 1:2])


def test_bf16_bits_read_back_as_float32_exactly(tmp_path):
    values = make_store(tmp_path / "b.zarr", bf16=True, inner_layers=3)
    got = open_store(tmp_path / "b.zarr").select("blocks.resid_post", step=[1, 4], token=slice(0, 5, 2))
    assert got.values.dtype == np.float32
    np.testing.assert_array_equal(got.values, values[[1, 4]][:, :, :, :, 0:5:2])


REDUCERS = {
    "norm": lambda x, ax: np.sqrt((x**2).sum(axis=ax)),
    "mean": lambda x, ax: x.mean(axis=ax),
    "std": lambda x, ax: x.std(axis=ax),
    "rms": lambda x, ax: np.sqrt((x**2).mean(axis=ax)),
    "absmax": lambda x, ax: np.abs(x).max(axis=ax),
}


@pytest.mark.parametrize("how", list(REDUCERS))
@pytest.mark.parametrize("slab", [1 << 20, 7])
def test_streamed_reductions_match_numpy(tmp_path, monkeypatch, how, slab):
    monkeypatch.setattr(Q, "SLAB_ELEMENTS", slab)  # 7: every chunk is cut into many slabs
    values = make_store(tmp_path / "s.zarr", inner_layers=3, dtype="float32")
    s = open_store(tmp_path / "s.zarr")
    x = values.astype(np.float64)
    for sel, over, axes in [({}, None, (4, 5)),
                            ({"step": [5, 1, 3], "layer": [5, 0]}, None, (4, 5)),
                            ({"step": slice(0, 6, 2)}, ["step", "token"], (0, 4)),
                            ({"cfg": "uncond", "token": slice(1, 4)}, ["layer", "sample", "channel"], (1, 3, 5))]:
        got = reduce_store(s, "blocks.resid_post", how, over, **sel)
        want = REDUCERS[how](reference(x, sel)[0], axes)
        np.testing.assert_allclose(got.values, want, rtol=1e-9, atol=1e-12, err_msg=f"{how} {sel} {over}")
        assert got.dims == tuple(d for i, d in enumerate(DIMS) if i not in axes)
        # the in-memory path gives the same
        mem = reduce_selection(s.select("blocks.resid_post", **sel), how, over)
        np.testing.assert_allclose(mem.values, want, rtol=1e-9, atol=1e-12)


def test_reductions_and_slices_keep_memory_bounded(tmp_path):
    """Peak traced allocations while reducing 16 MiB of fp16 stay around one chunk (128 KiB of
    fp16 -> 512 KiB in float64); one layer's slice allocates little beyond its own size."""
    shape = dict(steps=8, samples=4, tokens=256, channels=32)
    make_store(tmp_path / "m.zarr", layers=tuple(range(8)), **shape)
    s = open_store(tmp_path / "m.zarr")
    chunk = 2 * 4 * 256 * 32 * 2  # bytes of one (step, layer) chunk
    selection = 8 * 8 * chunk
    tracemalloc.start()
    try:
        red = reduce_store(s, "blocks.resid_post", "std")
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        one = s.select("blocks.resid_post", layer=3)
        _, peak_slice = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert red.values.shape == (8, 8, 2, 4)
    assert peak < 12 * chunk < selection / 5, (peak, chunk)
    assert peak_slice < one.values.nbytes + 6 * chunk, (peak_slice, one.values.nbytes)


# -- incomplete, missing, damaged ----------------------------------------------------------
@pytest.mark.parametrize("fill", [0.0, float("nan")])
def test_incomplete_steps_are_refused_or_read_as_nan(tmp_path, fill):
    values = make_store(tmp_path / "p.zarr", written=range(3), marked=range(3), fill=fill, fmt=1 if fill == 0 else 2)
    s = open_store(tmp_path / "p.zarr")
    with pytest.raises(IncompleteStepsError, match=r"steps 3-5 are not complete .*complete steps: 0-2"):
        s.select("blocks.resid_post")
    with pytest.raises(IncompleteStepsError, match=r"step 4 is not complete"):
        reduce_store(s, "blocks.resid_post", "norm", step=4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # complete steps: no warning even when allowed
        np.testing.assert_array_equal(s.select("blocks.resid_post", step=slice(0, 3), allow_incomplete=True).values,
                                      values[:3])
    with pytest.warns(IncompleteDataWarning, match=r"steps 3-5 are not marked complete; 3 of 5 chunks"):
        got = s.select("blocks.resid_post", step=slice(1, 6), layer=2, allow_incomplete=True)
    np.testing.assert_array_equal(got.values[:2], values[1:3, 1:2])
    assert np.isnan(got.values[2:]).all() and got.missing == 3 and got.incomplete_steps == [3, 4, 5]
    with pytest.warns(IncompleteDataWarning):
        red = reduce_store(s, "blocks.resid_post", "absmax", allow_incomplete=True)
    assert np.isnan(red.values[3:]).all() and np.isfinite(red.values[:3]).all()


def test_written_but_unmarked_step_reads_its_data_when_allowed(tmp_path):
    values = make_store(tmp_path / "p.zarr", written=range(4), marked=range(3))
    s = open_store(tmp_path / "p.zarr")
    with pytest.raises(IncompleteStepsError):
        s.select("blocks.resid_post", step=3)
    with pytest.warns(IncompleteDataWarning, match="step"):
        got = s.select("blocks.resid_post", step=3, allow_incomplete=True)
    np.testing.assert_array_equal(got.values, values[3:4])


@pytest.mark.parametrize("layout", ["sharded-1-layer-chunks", "unsharded"])
def test_a_deleted_chunk_file_is_damage_not_zeros(tmp_path, layout):
    values = make_store(tmp_path / "d.zarr", **LAYOUTS[layout])
    victim = tmp_path / "d.zarr" / "blocks.resid_post" / "c" / "2" / "1" / "0" / "0" / "0" / "0"
    if layout.startswith("sharded"):
        victim = victim.parent.parent.parent.parent.parent / "0" / "0" / "0" / "0" / "0"  # the step-2 shard
    victim.unlink()
    s = open_store(tmp_path / "d.zarr")
    np.testing.assert_array_equal(s.select("blocks.resid_post", step=[0, 1, 3]).values, values[[0, 1, 3]])
    with pytest.raises(MissingChunkError, match=r"c/2/.* is missing although its step is marked complete"):
        s.select("blocks.resid_post", step=2)
    with pytest.raises(MissingChunkError):
        reduce_store(s, "blocks.resid_post", "norm")
    with pytest.warns(IncompleteDataWarning, match="read as NaN"):
        got = s.select("blocks.resid_post", allow_incomplete=True)
    lost = np.zeros(values.shape, bool)
    lost[2] = True if layout.startswith("sharded") else False
    if not layout.startswith("sharded"):
        lost[2, 1] = True
    assert np.isnan(got.values[lost]).all()
    np.testing.assert_array_equal(got.values[~lost], values[~lost])


def _rewrite_shard_index(path, edit):
    """Apply ``edit`` to a shard's (offset, nbytes) index and rewrite it with a valid CRC32C."""
    import google_crc32c

    raw = bytearray(path.read_bytes())
    n = 16 * 3  # three inner chunks (one per layer)
    index = np.frombuffer(bytes(raw[-n - 4:-4]), "<u8").reshape(3, 2).copy()
    edit(index)
    body = index.astype("<u8").tobytes()
    raw[-n - 4:] = body + np.array([google_crc32c.value(body)], "<u4").tobytes()
    path.write_bytes(bytes(raw))


def test_a_chunk_missing_inside_a_shard(tmp_path):
    values = make_store(tmp_path / "d.zarr")
    shard = tmp_path / "d.zarr" / "blocks.resid_post" / "c" / "4" / "0" / "0" / "0" / "0" / "0"

    def drop_layer_1(index):
        index[1] = [int(MISSING), int(MISSING)]

    _rewrite_shard_index(shard, drop_layer_1)
    s = open_store(tmp_path / "d.zarr")
    np.testing.assert_array_equal(s.select("blocks.resid_post", step=4, layer=[0, 5]).values, values[4:5, [0, 2]])
    with pytest.raises(MissingChunkError, match=r"inner chunk 0,1,0,0,0,0\) is missing"):
        s.select("blocks.resid_post", step=4)
    # what zarr-python (and xarray) would return here: the fill value, 0 - the bug this prevents
    assert (zarr.open_array(str(tmp_path / "d.zarr" / "blocks.resid_post"), mode="r")[4, 1] == 0).all()
    with pytest.warns(IncompleteDataWarning):
        got = s.select("blocks.resid_post", step=4, allow_incomplete=True)
    assert np.isnan(got.values[0, 1]).all()


def test_format1_integer_chunks_equal_to_the_fill_value_read_as_zero(tmp_path):
    """Format-1 stores did not write chunks equal to the fill value: an all-0 int chunk is data."""
    for fmt, ok in ((1, True), (2, False)):
        path = tmp_path / f"i{fmt}.zarr"
        make_store(path, fmt=fmt)
        g = zarr.open_group(str(path), mode="r+")
        a = g.create_array("probe.x.count", shape=(6, 2), chunks=(1, 2), dtype="int32", fill_value=0,
                           dimension_names=("step", "k"))
        a[:] = np.arange(12).reshape(6, 2) * (np.arange(6)[:, None] != 3)  # step 3 is all zero: not written
        assert not (path / "probe.x.count" / "c" / "3" / "0").exists()
        s = open_store(path)
        if ok:
            np.testing.assert_array_equal(s.select("probe.x.count").values[3], [0, 0])
        else:
            with pytest.raises(MissingChunkError):
                s.select("probe.x.count")


@pytest.mark.parametrize("damage", ["truncate", "index-bytes", "zstd-garbage", "unsharded-short"])
def test_corrupt_chunks_are_one_line_errors(tmp_path, damage):
    layout = {"zstd-garbage": LAYOUTS["sharded-zstd"], "unsharded-short": LAYOUTS["unsharded"]}.get(damage, {})
    values = make_store(tmp_path / "c.zarr", **layout)
    arr = tmp_path / "c.zarr" / "blocks.resid_post"
    shard = arr / "c" / "1" / "0" / "0" / "0" / "0" / "0"
    if damage == "truncate":
        shard.write_bytes(shard.read_bytes()[:100])
    elif damage == "index-bytes":
        raw = bytearray(shard.read_bytes())
        raw[-10] ^= 0xFF
        shard.write_bytes(bytes(raw))
    elif damage == "zstd-garbage":
        def garble(index):
            pass
        raw = bytearray(shard.read_bytes())
        index = np.frombuffer(bytes(raw[-52:-4]), "<u8").reshape(3, 2)
        off, n = int(index[0, 0]), int(index[0, 1])
        raw[off:off + n] = bytes(n)  # zeros are not a zstd frame
        shard.write_bytes(bytes(raw))
    else:
        f = arr / "c" / "1" / "2" / "0" / "0" / "0" / "0"
        f.write_bytes(f.read_bytes()[:-8])
    s = open_store(tmp_path / "c.zarr")
    np.testing.assert_array_equal(s.select("blocks.resid_post", step=0).values, values[:1])
    with pytest.raises(CorruptStoreError, match=r"blocks.resid_post/c/1/.* damaged") as e:
        s.select("blocks.resid_post", step=1)
    assert "\n" not in str(e.value)
    with pytest.warns(IncompleteDataWarning):
        got = s.select("blocks.resid_post", step=slice(0, 3), allow_incomplete=True)
    np.testing.assert_array_equal(got.values[[0, 2]], values[[0, 2]])
    assert np.isnan(got.values[1]).any()


def test_damaged_metadata_is_one_line(tmp_path):
    make_store(tmp_path / "j.zarr")
    meta = tmp_path / "j.zarr" / "blocks.resid_post" / "zarr.json"
    meta.write_text(meta.read_text()[:80])
    s = open_store(tmp_path / "j.zarr")
    assert "blocks.resid_post" in s.array_names()  # still listed
    with pytest.raises(CorruptStoreError, match=r"blocks.resid_post/zarr.json is damaged \(not valid JSON"):
        s.select("blocks.resid_post")
    (tmp_path / "j.zarr" / "step_complete" / "zarr.json").unlink()
    (tmp_path / "j.zarr" / "step_complete" / "c").rename(tmp_path / "j.zarr" / "gone")
    with pytest.raises(CorruptStoreError, match="step_complete array is missing"):
        open_store(tmp_path / "j.zarr").completeness()
    root = tmp_path / "j.zarr" / "zarr.json"
    root.write_text(root.read_text()[:30])
    with pytest.raises(CorruptStoreError, match=r"j.zarr/zarr.json is damaged"):
        open_store(tmp_path / "j.zarr")


# -- selections ------------------------------------------------------------------------------
@pytest.mark.parametrize("text,want", [
    ("5", 5), ("-1", -1), ("0:10", slice(0, 10)), ("::2", slice(None, None, 2)), ("-3:", slice(-3, None)),
    ("0,5,9", [0, 5, 9]), ("3-7", ValueRange(3, 7)), ("20-", ValueRange(20, None)), (" 2 , 4-5 ", [2, ValueRange(4, 5)]),
    ("all", None), (None, None),
])
def test_parse_index(text, want):
    assert parse_index(text) == want


@pytest.mark.parametrize("text,msg", [
    ("abc", "'abc' is not an index"), ("0:50:0", "step cannot be 0"), ("1.5", "'1.5' is not an index"),
    ("", "empty --step"), ("5-3", "empty range"), ("1:2:3:4", "start:stop"), ("1,,2", "empty item"), ("a:b", "start:stop"),
])
def test_parse_index_refuses_with_one_line(text, msg):
    with pytest.raises(SelectionError, match=msg) as e:
        parse_index(text, "--step")
    assert "\n" not in str(e.value)
    assert parse_index("cond", "--cfg", names=True) == "cond"


def test_value_selections_and_their_errors(tmp_path):
    values = make_store(tmp_path / "s.zarr")
    s = open_store(tmp_path / "s.zarr")
    # layer ranges select the captured blocks in them; open ranges run to the last captured block
    assert s.select("blocks.resid_post", layer=ValueRange(1)).coords["layer"].tolist() == [2, 5]
    assert s.select("blocks.resid_post", layer=ValueRange(0, 3)).coords["layer"].tolist() == [0, 2]
    assert s.select("blocks.resid_post", layer=-1).coords["layer"].tolist() == [5]
    np.testing.assert_array_equal(s.select("blocks.resid_post", step=ValueRange(4)).values, values[4:])
    for sel, err, msg in [
        (dict(layer=ValueRange(6)), SelectionError, r"no captured layer in 6- \(captured: 0,2,5\)"),
        (dict(layer=3), SelectionError, r"layer 3 is not in the store \(captured: 0,2,5\)"),
        (dict(step=6), SelectionError, "step 6 is out of range: the store has step 0-5"),
        (dict(step=ValueRange(2, 9)), SelectionError, "out of range"),
        (dict(step=1.5), SelectionError, "not an index"),
        (dict(step=slice(0, 5, 0)), SelectionError, "slice step cannot be zero"),
        (dict(cfg="both"), SelectionError, "cfg 'both' is not in the store"),
        (dict(head=0), SelectionError, "has no dimension 'head'"),
    ]:
        with pytest.raises(err, match=msg):
            s.select("blocks.resid_post", **sel)
    with pytest.raises(SelectionError, match="give the layer once"):
        s.select("blocks.2.resid_post", layer=0)
    with pytest.raises(Exception, match=r"no array or hook point 'blocks.resid_pst'; did you mean blocks.resid_post"):
        s.select("blocks.resid_pst")
    with pytest.raises(Exception, match="layer 3 was not captured"):
        s.select("blocks.3.resid_post")


def test_a_real_interrupted_capture(tmp_path, tiny_loaded, tiny_model_dir):
    """End to end on what the capture writes: complete steps read as xarray reads them; steps never
    computed are refused, or NaN when allowed - never zeros."""
    from dithooks.capture import CaptureConfig, CaptureSession
    from dithooks.sampling import SamplerSpec

    out = tmp_path / "part.zarr"
    cfg = CaptureConfig(out=str(out), model=str(tiny_model_dir), layers="0,2", hooks=("resid_post", "final.out"),
                        sampler=SamplerSpec("ddim", 5, guidance=2.0), labels=(1, 2), seeds=(0, 1))
    session = CaptureSession(cfg, loaded=tiny_loaded)

    def interrupt(v, ctx):
        if ctx.step == 3:
            raise KeyboardInterrupt

    session.hooks.add_hook("blocks.2.resid_post", interrupt)
    with pytest.raises(Exception, match="interrupted"):
        session.run()
    session.hooks.remove_all()
    s = open_store(out)
    done = np.flatnonzero(s.step_complete()).tolist()
    assert done == [0, 1, 2]
    xr = pytest.importorskip("xarray")
    ds = xr.open_zarr(str(out), consolidated=False)
    for name in ("blocks.resid_post", "final.out"):
        np.testing.assert_array_equal(s.select(name, step=slice(0, 3)).values, ds[name].isel(step=slice(0, 3)).values)
        with pytest.raises(IncompleteStepsError, match="complete steps: 0-2"):
            s.select(name, step=3)
        with pytest.warns(IncompleteDataWarning):
            got = s.select(name, step=slice(3, 5), allow_incomplete=True)
        assert np.isnan(got.values).all()
    with pytest.warns(IncompleteDataWarning):
        lat = s.select("latents", allow_incomplete=True).values  # latent_step k > 0 follows step k - 1
    assert np.isfinite(lat[:4]).all() and np.isnan(lat[4:]).all()


def test_query_path_imports_neither_torch_nor_zarr(tmp_path):
    make_store(tmp_path / "s.zarr")
    code = f"""
import sys
from dithooks.cli.main import app
try:
    app(["query", {str(tmp_path / 's.zarr')!r}, "blocks.2.resid_post", "--step", "0", "--json"])
except SystemExit as e:
    assert not e.code, e.code
heavy = [m for m in ("torch", "diffusers", "zarr", "xarray") if m in sys.modules]
print("HEAVY", heavy, file=sys.stderr)
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "HEAVY []" in r.stderr, r.stderr
    assert len(json.loads(r.stdout)["records"]) == 2 * 3
