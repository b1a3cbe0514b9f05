"""The store writer's direct chunk/shard writes (zarrio.ChunkEncoder) against zarr-python, and
host staging (store/staging.py). Independent references: zarr-python writing the same values
(metadata and files compared), zarr-python and xarray reading what the writer wrote."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from dithooks.store.staging import HostStaging
from dithooks.store.writer import ArraySpec, DirectTarget, StoreWriter, region_of
from dithooks.store.zarrio import ArrayMeta, ArrayReader, blocks, out_shape, write_atomic


def _write(path: Path, specs_values, *, direct: bool, separator: str = "/", compression: str = "none"):
    g = zarr.open_group(str(path), mode="w", zarr_format=3)
    w = StoreWriter(g, compression=compression)
    w.direct, w.separator = direct, separator
    for spec, index, value in specs_values:
        w.put(spec, index, value)
    w.flush()
    w.close()
    return w


def _cases():
    torch.manual_seed(0)
    shard = ArraySpec("blocks.x", ("step", "layer", "sample", "token"), (3, 4, 2, 5), (1, 2, 2, 5), torch.float16,
                      (("hook", "blocks.{i}.x"),), (1, 4, 2, 5))
    plain = ArraySpec("latents", ("latent_step", "sample", "c"), (4, 2, 3), (1, 2, 3), torch.float32)
    bf = ArraySpec("b", ("bstep", "k"), (2, 6), (1, 6), torch.bfloat16)
    u8 = ArraySpec("rng", ("rstep", "byte"), (3, 7), (1, 7), torch.uint8)
    return [(shard, (slice(0, 3),), torch.randn(3, 4, 2, 5).half()),
            (plain, (slice(1, 3),), torch.randn(2, 2, 3)),
            (plain, (0,), torch.randn(2, 3)),
            (bf, (slice(0, 2),), torch.randn(2, 6).bfloat16()),
            (u8, (1,), torch.randint(0, 255, (7,), dtype=torch.uint8))]


@pytest.mark.parametrize("compression", ["none", "zstd", "lz4"])
def test_direct_writes_equal_zarr_python_files_and_metadata(tmp_path, compression):
    cases = _cases()
    _write(tmp_path / "z.zarr", cases, direct=False, compression=compression)
    w = _write(tmp_path / "d.zarr", cases, direct=True, compression=compression)
    assert all(isinstance(t, DirectTarget) and t.encoder is not None and t.zarr_writes == 0
               for t in w._arrays.values())
    names = sorted(p.relative_to(tmp_path / "z.zarr") for p in (tmp_path / "z.zarr").rglob("*") if p.is_file())
    assert names == sorted(p.relative_to(tmp_path / "d.zarr") for p in (tmp_path / "d.zarr").rglob("*") if p.is_file())
    for rel in names:
        a, b = (tmp_path / "z.zarr" / rel).read_bytes(), (tmp_path / "d.zarr" / rel).read_bytes()
        if rel.name == "zarr.json":
            assert json.loads(a) == json.loads(b), rel
        else:  # chunk and shard files: the same bytes (order of inner chunks, index, CRC32C)
            assert a == b, rel


def test_flat_keys_read_back_through_zarr_xarray_and_dithooks(tmp_path):
    cases = _cases()
    _write(tmp_path / "d.zarr", cases, direct=True, separator=".")
    assert sorted(os.listdir(tmp_path / "d.zarr" / "blocks.x")) == ["c.0.0.0.0", "c.1.0.0.0", "c.2.0.0.0", "zarr.json"]
    g = zarr.open_group(str(tmp_path / "d.zarr"), mode="r")
    shard, v = cases[0][0], cases[0][2]
    np.testing.assert_array_equal(np.asarray(g["blocks.x"][...]), v.numpy())
    lat = np.asarray(g["latents"][...])
    np.testing.assert_array_equal(lat[1:3], cases[1][2].numpy())
    np.testing.assert_array_equal(lat[0], cases[2][2].numpy())
    assert np.isnan(lat[3]).all()  # never written: the fill value NaN
    np.testing.assert_array_equal(np.asarray(g["b"][...]), cases[3][2].view(torch.int16).numpy().view(np.uint16))
    np.testing.assert_array_equal(np.asarray(g["rng"][1]), cases[4][2].numpy())
    xr = pytest.importorskip("xarray")
    ds = xr.open_zarr(str(tmp_path / "d.zarr"), consolidated=False)
    assert ds["blocks.x"].dims == shard.dims
    np.testing.assert_array_equal(ds["blocks.x"].values, v.numpy())
    # dithooks' own chunk reader: one inner chunk, by key c.1.0.0.0
    meta = ArrayMeta.load(tmp_path / "d.zarr", "blocks.x")
    reader = ArrayReader(meta)
    sel = (slice(1, 2, 1), slice(2, 4, 1), slice(0, 2, 1), slice(0, 5, 1))
    out = np.empty(out_shape(sel), dtype=np.float16)
    for b in blocks(meta, sel):
        out[b.out] = reader.read_block(b)
    np.testing.assert_array_equal(out, v.numpy()[1:2, 2:4])


@pytest.mark.parametrize("compression", ["none", "zstd"])
def test_writes_that_cover_part_of_a_chunk_update_it_like_zarr(tmp_path, compression):
    spec = ArraySpec("a", ("step", "x"), (8, 6), (4, 6), torch.float32)
    sharded = ArraySpec("s", ("step", "x"), (4, 6), (1, 6), torch.float32, (), (2, 6))
    writes = [(spec, (slice(0, 4),), torch.ones(4, 6)),        # one whole chunk: direct
              (spec, (5,), torch.full((6,), 5.0)),             # part of a chunk never written: fill + row
              (spec, (slice(1, 3),), torch.full((2, 6), 2.0)),  # part of a written chunk: read, update
              (sharded, (1,), torch.full((6,), 7.0))]          # part of a shard: zarr-python
    out = {}
    for direct in (True, False):
        g = zarr.open_group(str(tmp_path / f"{direct}.zarr"), mode="w", zarr_format=3)
        w = StoreWriter(g, compression=compression)
        w.direct = direct
        for s, i, v in writes:
            w.put(s, i, v)
        w.flush()
        w.close()
        out[direct] = {n: np.asarray(zarr.open_array(str(tmp_path / f"{direct}.zarr" / n), mode="r")[...])
                       for n in ("a", "s")}
        if direct:
            assert (w._arrays["a"].direct_writes, w._arrays["a"].zarr_writes) == (3, 0)
            assert (w._arrays["s"].direct_writes, w._arrays["s"].zarr_writes) == (0, 1)
    for n in ("a", "s"):
        np.testing.assert_array_equal(out[True][n], out[False][n])
    a = out[True]["a"]
    assert (a[0] == 1).all() and (a[1:3] == 2).all() and (a[3] == 1).all() and np.isnan(a[4]).all()
    assert (a[5] == 5).all() and np.isnan(a[6:]).all()


def test_set_marks_an_existing_array(tmp_path):
    g = zarr.open_group(str(tmp_path / "s.zarr"), mode="w", zarr_format=3)
    g.create_array(name="step_complete", shape=(5,), chunks=(1,), dtype="bool", fill_value=False, compressors=None)
    w = StoreWriter(g)
    w.set("step_complete", slice(1, 3), True)
    w.set("step_complete", 4, True)
    w.flush()
    w.close()
    assert w._arrays["step_complete"].direct_writes == 2
    got = np.asarray(zarr.open_array(str(tmp_path / "s.zarr" / "step_complete"), mode="r")[...])
    assert got.tolist() == [False, True, True, False, True]


def test_region_of():
    assert region_of((slice(1, 3),), (5, 4)) == (((1, 3), (0, 4)), (2, 4))
    assert region_of((-1, slice(None)), (5, 4)) == (((4, 5), (0, 4)), (1, 4))
    assert region_of(..., (2,)) == (((0, 2),), (2,))
    assert region_of((slice(0, 4, 2),), (5,)) is None
    assert region_of((np.array([1, 2]),), (5,)) is None


def test_atomic_write_leaves_old_file_or_new_never_a_mix(tmp_path, monkeypatch):
    f = tmp_path / "c.0"
    write_atomic(str(f), [b"old"])

    def boom(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError):
        write_atomic(str(f), [np.arange(10, dtype=np.float32), b"crc!"])
    monkeypatch.undo()
    assert f.read_bytes() == b"old" and sorted(os.listdir(tmp_path)) == ["c.0"]  # temp file removed
    assert write_atomic(str(f), [np.arange(3, dtype=np.int64), b"ab"]) == 26
    assert f.read_bytes() == np.arange(3, dtype=np.int64).tobytes() + b"ab"


def test_write_error_is_raised_on_the_sampling_thread(tmp_path, monkeypatch):
    import errno

    from dithooks.store import zarrio
    from dithooks.store.writer import WriterFailed

    def full(path, pieces):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(zarrio, "write_atomic", full)
    g = zarr.open_group(str(tmp_path / "s.zarr"), mode="w", zarr_format=3)
    w = StoreWriter(g)
    w.put(ArraySpec("a", ("step", "x"), (2, 3), (1, 3), torch.float32), (0,), torch.ones(3))
    with pytest.raises(WriterFailed, match="disk is full"):
        w.flush()
    w.close()


def test_staging_copies_convert_like_to_and_reuse_slabs():
    st = HostStaging()
    x = torch.randn(3, 4, 5)
    slab = st.take((2, 3, 4, 5), torch.float16)
    st.copy(slab[1], x)
    st.copy(slab[0], x * 2)
    st.end_step()
    assert torch.equal(slab[1], x.to(torch.float16)) and torch.equal(slab[0], (x * 2).to(torch.float16))
    assert st.syncs == 0 and not slab.is_pinned()  # CPU values: nothing to wait for, nothing pinned
    st.recycle([slab])
    assert st.take((2, 3, 4, 5), torch.float16) is slab and st.allocated == 1
    bf = st.take((3, 4, 5), torch.bfloat16)
    st.copy(bf, x.reshape(3, 20))  # reshaped into the slab's shape
    assert torch.equal(bf, x.to(torch.bfloat16))
    st.recycle([st.take((1,), torch.float32) for _ in range(6)])
    assert len(st._free[((1,), torch.float32)]) == st.keep  # bounded free list


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_staging_from_cuda_is_pinned_and_synchronised_once_per_step():
    st = HostStaging()
    xs = [torch.randn(2, 8, 16, device="cuda") for _ in range(4)]
    slab = st.take((4, 2, 8, 16), torch.float16, source=xs[0])
    assert slab.is_pinned()
    for i, x in enumerate(xs):
        st.copy(slab[i], x)
    st.end_step()
    assert st.syncs == 1
    for i, x in enumerate(xs):
        assert torch.equal(slab[i], x.half().cpu())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_nonfinite_counts_per_row_match_isfinite(dtype):
    from dithooks.store.codecs import to_numpy
    from dithooks.store.writer import count_nonfinite

    x = torch.randn(4, 50) * 100
    x[1, 3], x[1, 7], x[3, 0] = float("nan"), float("inf"), -float("inf")
    if dtype != torch.float32:
        x[2, 5] = 1e6 if dtype == torch.float16 else 3.4e38  # finite in fp32, inf once stored
    t = x.to(dtype)
    want = (~np.isfinite(t.float().numpy())).sum(axis=1)
    got = count_nonfinite(to_numpy(t), dtype, (slice(5, 9),))
    assert got == {5 + i: int(c) for i, c in enumerate(want) if c}
    assert count_nonfinite(to_numpy(t[0]), dtype, (0,)) == {}
    assert count_nonfinite(to_numpy(t), dtype, (7,)) == {7: int(want.sum())}


def test_a_chunk_deleted_after_its_index_was_read_is_missing_not_a_traceback(tmp_path):
    from dithooks.store.zarrio import ChunkMissing, CorruptStoreError

    cases = _cases()
    _write(tmp_path / "d.zarr", cases, direct=True, separator=".")
    meta = ArrayMeta.load(tmp_path / "d.zarr", "blocks.x")
    reader = ArrayReader(meta)
    sel = (slice(1, 2, 1), slice(0, 2, 1), slice(0, 2, 1), slice(0, 5, 1))
    block = next(blocks(meta, sel))
    assert reader.exists(block.chunk)  # shard index read and cached
    os.unlink(meta.path((1, 0, 0, 0)))
    with pytest.raises(ChunkMissing):
        reader.read_block(block)
    raw = json.loads((tmp_path / "d.zarr" / "blocks.x" / "zarr.json").read_text())
    assert ArrayMeta.from_json(meta.dir, "blocks.x", raw).inner == meta.inner
    with pytest.raises(CorruptStoreError):
        ArrayMeta.from_json(meta.dir, "blocks.x", {**raw, "shape": None})


def test_an_array_folder_cut_short_before_its_metadata_is_not_foreign(tmp_path):
    """A capture killed (or stopped) between creating an array's folder and writing its zarr.json
    leaves an empty folder: --overwrite may delete it (and must still refuse a user's file)."""
    from dithooks.store.files import foreign_entries

    cases = _cases()
    _write(tmp_path / "d.zarr", cases, direct=True, separator=".")
    (tmp_path / "d.zarr" / "latents2").mkdir()
    assert foreign_entries(tmp_path / "d.zarr") == []
    (tmp_path / "d.zarr" / "latents2" / "notes.txt").write_text("mine")
    assert foreign_entries(tmp_path / "d.zarr") == ["latents2/"]


def _inline_writes(tmp_path: Path, name: str, inline: bool, writes) -> StoreWriter:
    g = zarr.open_group(str(tmp_path / name), mode="w", zarr_format=3)
    g.create_array(name="step_complete", shape=(3,), chunks=(1,), dtype="bool", fill_value=False, compressors=None)
    w = StoreWriter(g)
    w.separator = "."
    w.inline = inline
    for s, i, v in writes:
        w.put(s, i, v)
    w.set("step_complete", slice(0, 3), True)
    w.flush()
    w.close()
    return w


def test_inline_mode_writes_the_same_files_as_the_writer_thread(tmp_path):
    """Inline (encode on the caller's thread, file writes queued) against the writer thread doing
    everything: the same files, byte for byte, including a read-modify-write of a chunk that a
    queued write has not reached yet (the queue is drained before the read)."""
    part = ArraySpec("p", ("step", "x"), (8, 6), (4, 6), torch.float32)
    writes = _cases() + [(part, (slice(0, 4),), torch.ones(4, 6)),       # queued whole chunk
                         (part, (slice(1, 3),), torch.full((2, 6), 2.0))]  # then part of it: read back
    _inline_writes(tmp_path, "t.zarr", False, writes)
    w = _inline_writes(tmp_path, "i.zarr", True, writes)
    assert w.inline and all(t.zarr_writes == 0 for t in w._arrays.values())
    files = sorted(p.relative_to(tmp_path / "t.zarr") for p in (tmp_path / "t.zarr").rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(tmp_path / "i.zarr") for p in (tmp_path / "i.zarr").rglob("*") if p.is_file())
    for rel in files:
        assert (tmp_path / "t.zarr" / rel).read_bytes() == (tmp_path / "i.zarr" / rel).read_bytes(), rel
    p = np.asarray(zarr.open_array(str(tmp_path / "i.zarr" / "p"), mode="r")[...])
    assert (p[0] == 1).all() and (p[1:3] == 2).all() and (p[3] == 1).all() and np.isnan(p[4:]).all()


def test_inline_mode_keeps_the_order_of_files_and_raises_write_errors(tmp_path, monkeypatch):
    import errno

    from dithooks.store import writer as writer_mod
    from dithooks.store.writer import WriterFailed

    done = []
    real = writer_mod.write_atomic

    def record(path, pieces):
        done.append(os.path.relpath(path, tmp_path / "o.zarr"))
        return real(path, pieces)

    monkeypatch.setattr(writer_mod, "write_atomic", record)
    spec = ArraySpec("a", ("step", "x"), (3, 4), (1, 4), torch.float32)
    _inline_writes(tmp_path, "o.zarr", True, [(spec, (slice(0, 3),), torch.ones(3, 4))])
    assert done == [f"a/c.{i}.0" for i in range(3)] + [f"step_complete/c/{i}" for i in range(3)]

    def full(path, pieces):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(writer_mod, "write_atomic", full)
    g = zarr.open_group(str(tmp_path / "f.zarr"), mode="w", zarr_format=3)
    w = StoreWriter(g)
    w.inline = True
    w.put(spec, (0,), torch.ones(4))  # encoded here; the failing file write is on the writer thread
    with pytest.raises(WriterFailed, match="disk is full"):
        w.flush()
    with pytest.raises(WriterFailed, match="disk is full"):
        w.put(spec, (1,), torch.ones(4))
    w.close()


@pytest.mark.parametrize("here", [False, True], ids=["writer-thread", "sampling-thread"])
def test_a_failed_held_file_write_is_raised_once_and_close_still_stops_the_thread(tmp_path, monkeypatch, here):
    """Inline mode, the held file writes done by the writer thread or (``sync_files``) at submit on
    the caller's thread: a write error is raised at the next wait, every later call raises it too,
    and ``close`` stops the writer thread without raising (the error stays in ``error``)."""
    import errno

    from dithooks.store import writer as writer_mod
    from dithooks.store.writer import WriterFailed

    def full(path, pieces):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(writer_mod.StoreWriter, "sync_files", here)
    monkeypatch.setattr(writer_mod, "write_atomic", full)
    spec = ArraySpec("a", ("step", "x"), (3, 4), (1, 4), torch.float32)
    w = StoreWriter(zarr.open_group(str(tmp_path / "f.zarr"), mode="w", zarr_format=3))
    w.inline = True
    w.put(spec, (0,), torch.ones(4))
    w.put(spec, (1,), torch.ones(4))  # after the failed one: never written
    with pytest.raises(WriterFailed, match="disk is full"):
        w.flush()
    with pytest.raises(WriterFailed, match="disk is full"):
        w.put(spec, (2,), torch.ones(4))
    w._held.append(("file", str(tmp_path / "x"), [b"x"], None, 0))  # something still held at close
    w.close()
    assert not w._thread.is_alive() and isinstance(w.error, OSError)
    assert not (tmp_path / "x").exists()


def test_an_edge_chunk_is_written_directly_and_padded_with_the_fill_value(tmp_path):
    """A write that ends at the array's end covers a chunk cut by that end: the encoder writes it
    whole (padded with NaN, as Zarr stores edge chunks), not through zarr-python."""
    g = zarr.open_group(str(tmp_path / "w.zarr"), mode="w", zarr_format=3)
    w = StoreWriter(g)
    spec = ArraySpec("a", ("step", "sample", "x"), (2, 5, 4), (1, 3, 4), torch.float32)
    w.put(spec, (slice(0, 1), slice(3, 5)), torch.ones(1, 2, 4))
    w.put(spec, (slice(0, 1), slice(0, 3)), torch.zeros(1, 3, 4))
    w.flush()
    w.close()
    got = zarr.open_array(str(tmp_path / "w.zarr" / "a"), mode="r")[...]
    want = np.full((2, 5, 4), np.nan, dtype=np.float32)
    want[0, :3], want[0, 3:] = 0, 1
    np.testing.assert_array_equal(got, want)
    target = w._arrays["a"]
    assert (target.direct_writes, target.zarr_writes) == (2, 0)
    # the edge chunk's file holds a whole chunk (3 samples), its last sample the fill value
    assert sorted(p.name for p in (tmp_path / "w.zarr" / "a").iterdir()) == ["c.0.0.0", "c.0.1.0", "zarr.json"]
    assert (tmp_path / "w.zarr" / "a" / "c.0.1.0").stat().st_size == 3 * 4 * 4 + 4
