"""Reading stores: dithooks' reader vs xarray vs numpy mmap, reductions, peak memory, start-up.

Stores are written by the real capture (``resid_post`` of every block, fp16): the embedded digits
model (28 blocks, width 64, 16 tokens; 50 steps, 4 samples) and an S/2-width random-init DiT from a
config saved locally (12 blocks, width 384, 256 tokens; 10 steps, 4 samples, guidance 2: 189 MB).
The same bytes are also saved as one ``.npy`` file for numpy's mmap.

Side by side in one process, contenders interleaved, each repeated, medians reported:
  slices      dithooks ``CaptureStore.select`` | ``xr.open_zarr(...)[...].isel(...).values`` |
              ``np.load(mmap_mode="r")[...]`` copied out
  reductions  per-layer-per-step norm over (token, channel): ``dithooks query --json`` (subprocess,
              start-up included), dithooks ``reduce_store`` in-process, numpy over the mmap one step
              at a time, xarray (loads the selection)
Each reduction is also run alone in a fresh subprocess for its peak RSS (``getrusage``), next to
the RSS of the same process before the work (imports only). Start-up: ``dithooks query`` of one
small slice, and ``python -c pass`` for the floor.

    python benchmarks/bench_read.py [--quick] [--json] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np

ARRAY = "blocks.resid_post"


def s2_config():  # the S/2-like config of bench_capture.py
    return dict(num_attention_heads=6, attention_head_dim=64, in_channels=4, out_channels=8, num_layers=12,
                sample_size=32, patch_size=2, num_embeds_ada_norm=1000)


def build_stores(root: Path, quick: bool) -> dict[str, Path]:
    """Capture with the real ``dithooks capture`` (in a subprocess: torch stays out of this one)."""
    code = f"""
import torch
torch.manual_seed(0)
torch.set_num_threads(1)
from pathlib import Path
from diffusers import DiTTransformer2DModel
from dithooks.capture import CaptureConfig, capture
from dithooks.sampling import SamplerSpec
root = Path({str(root)!r})
DiTTransformer2DModel(**{s2_config()!r}).save_pretrained(root / "s2")
capture(CaptureConfig(out=str(root / "digits.zarr"), layers="all", hooks=("resid_post",),
        sampler=SamplerSpec("ddim", {20 if quick else 50}), labels=(7,) * 4, seeds=(0, 1, 2, 3)))
capture(CaptureConfig(out=str(root / "s2.zarr"), model=str(root / "s2"), layers="all", hooks=("resid_post",),
        sampler=SamplerSpec("ddim", {4 if quick else 10}, guidance=2.0), labels=(7,) * 4, seeds=(0, 1, 2, 3)))
"""
    subprocess.run([sys.executable, "-c", code], check=True)
    return {"digits": root / "digits.zarr", "S/2": root / "s2.zarr"}


def save_npy(store: Path, out: Path) -> Path:
    """The array's bytes as one .npy (read with the dithooks reader; checked against xarray below)."""
    from dithooks.store.reader import open_store

    np.save(out, open_store(store).select(ARRAY).values)
    return out


def interleaved(contenders: dict, repeats: int) -> dict[str, float]:
    for fn in contenders.values():  # warm-up: page cache, imports, first-call costs
        fn()
    times = {k: [] for k in contenders}
    for _ in range(repeats):
        for k, fn in contenders.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def slices(store: Path, npy: Path, repeats: int) -> list[dict]:
    import xarray as xr

    from dithooks.store.reader import open_store

    s = open_store(store)
    shape = s.array_meta(ARRAY).shape  # step, layer, [cfg,] sample, token, channel
    dims = s.array_meta(ARRAY).dims
    mm = np.load(npy, mmap_mode="r")
    L = shape[1]
    cases = {
        "one layer, all steps": {"layer": L // 2},
        "one step, all layers": {"step": shape[0] // 2},
        "one (step, layer)": {"step": shape[0] - 1, "layer": L - 1},
        "sample 0, every 4th token": {"sample": 0, "token": slice(None, None, 4)},
    }
    rows = []
    for name, sel in cases.items():
        pos = {d: sel[d] for d in sel}
        np_index = tuple(slice(v, v + 1) if isinstance(v, int) else v for v in
                         (pos.get(d, slice(None)) for d in dims))
        xr_sel = {d: (slice(v, v + 1) if isinstance(v, int) else v) for d, v in pos.items()}
        ds = xr.open_zarr(str(store), consolidated=False)

        def d_read():
            return s.select(ARRAY, **{d: (s.coord("layer")[v] if d == "layer" else v) for d, v in sel.items()}).values

        def x_read():
            return ds[ARRAY].isel(**xr_sel).values

        def n_read():
            return np.array(mm[np_index])

        a, b, c = d_read(), x_read(), n_read()
        assert np.array_equal(a, b) and np.array_equal(a, c), name
        med = interleaved({"dithooks": d_read, "xarray": x_read, "numpy mmap": n_read}, repeats)
        rows.append({"slice": name, "MB": round(a.nbytes / 1e6, 2), **{k: v * 1e3 for k, v in med.items()},
                     "dithooks / xarray": med["dithooks"] / med["xarray"]})
    return rows


RSS_CODE = {
    "dithooks query (CLI)": """
from dithooks.cli.main import app
base()
try:
    app(["query", STORE, ARRAY, "--json"])
except SystemExit as e:
    assert not e.code
""",
    "dithooks reduce_store": """
from dithooks.store.reader import open_store
from dithooks.query import reduce_store
base()
r = reduce_store(open_store(STORE), ARRAY, "norm").values
""",
    "numpy mmap, step by step": """
import numpy as np
base()
mm = np.load(NPY, mmap_mode="r")
r = np.stack([np.sqrt(np.einsum("...ij,...ij->...", x, x)) for x in (mm[s].astype(np.float32) for s in range(mm.shape[0]))])
""",
    "xarray": """
import numpy as np, xarray as xr
base()
v = xr.open_zarr(STORE, consolidated=False)[ARRAY].astype("float32")
r = np.sqrt((v ** 2).sum(("token", "channel"))).values
""",
}

# Peak RSS: /proc/self/status VmHWM (this process's own peak). getrusage's ru_maxrss would do on a
# fresh interpreter, but Linux carries the parent's peak across fork+exec into it (the parent here
# holds the benchmark's arrays), so it is only the fallback where /proc is missing.
RSS_PRELUDE = """
import os, resource, sys, time
STORE, NPY, ARRAY = sys.argv[1], sys.argv[2], sys.argv[3]
_t = {}
def peak_mib():
    try:
        with open("/proc/self/status") as f:
            return next(int(l.split()[1]) for l in f if l.startswith("VmHWM:")) / 1024
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
def base():
    _t["rss0"] = peak_mib()
    _t["t0"] = time.perf_counter()
"""
RSS_EPILOGUE = """
sys.stdout.flush()
print("RSS", _t["rss0"], peak_mib(), time.perf_counter() - _t["t0"], file=sys.stderr)
"""


def reductions(store: Path, npy: Path, repeats: int) -> list[dict]:
    import xarray as xr

    from dithooks.query import reduce_store
    from dithooks.store.reader import open_store

    s = open_store(store)
    mm = np.load(npy, mmap_mode="r")

    def cli():
        r = subprocess.run([sys.executable, "-m", "dithooks.cli.main", "query", str(store), ARRAY, "--json"],
                           capture_output=True, text=True, check=True)
        return r.stdout

    def ours():
        return reduce_store(s, ARRAY, "norm").values

    def numpy_mmap():
        return np.stack([np.sqrt(np.einsum("...ij,...ij->...", x, x))
                         for x in (mm[k].astype(np.float32) for k in range(mm.shape[0]))])

    def xarray_():
        v = xr.open_zarr(str(store), consolidated=False)[ARRAY].astype("float32")
        return np.sqrt((v ** 2).sum(("token", "channel"))).values

    want = numpy_mmap()
    np.testing.assert_allclose(ours(), want, rtol=1e-4)
    rec = json.loads(cli())["records"]
    assert len(rec) == want.size and abs(rec[-1]["norm"] - float(want.reshape(-1)[-1])) < 1e-3 * abs(rec[-1]["norm"])
    med = interleaved({"dithooks query (CLI)": cli, "dithooks reduce_store": ours, "numpy mmap, step by step": numpy_mmap,
                       "xarray": xarray_}, repeats)
    rows = []
    for name, code in RSS_CODE.items():
        r = subprocess.run([sys.executable, "-c", RSS_PRELUDE + code + RSS_EPILOGUE, str(store), str(npy), ARRAY],
                           capture_output=True, text=True, check=True)
        _, rss0, rss1, _ = r.stderr.strip().splitlines()[-1].split()
        rows.append({"contender": name, "ms": med[name] * 1e3, "RSS before MiB": float(rss0), "peak RSS MiB": float(rss1)})
    return rows


def startup(store: Path, repeats: int) -> dict[str, float]:
    def run(args):
        t0 = time.perf_counter()
        subprocess.run(args, capture_output=True, check=True)
        return time.perf_counter() - t0

    q = [sys.executable, "-m", "dithooks.cli.main", "query", str(store), "blocks.0.resid_post", "--step", "0",
         "--sample", "0"]
    med = interleaved({"python -c pass": lambda: run([sys.executable, "-c", "pass"]),
                       "dithooks query (one small slice)": lambda: run(q)}, repeats)
    r = subprocess.run([sys.executable, "-c",
                        "import sys, resource\nfrom dithooks.cli.main import app\nsys.argv[1:] = " + repr(q[3:]) +
                        "\ntry: app()\nexcept SystemExit: pass\n"
                        "u = resource.getrusage(resource.RUSAGE_SELF)\n"
                        "print('CPU', u.ru_utime + u.ru_stime, [m for m in ('torch', 'diffusers', 'zarr') if m in sys.modules], file=sys.stderr)"],
                       capture_output=True, text=True, check=True)
    line = [l for l in r.stderr.splitlines() if l.startswith("CPU")][-1]
    out = {k: round(v, 3) for k, v in med.items()}
    out["dithooks query CPU seconds (user+sys)"] = round(float(line.split()[1]), 3)
    out["heavy modules imported"] = line.split(" ", 2)[2]
    return out


def table(rows: list[dict]) -> str:
    keys = list(rows[0])
    fmt = lambda v: f"{v:.3g}" if isinstance(v, float) else str(v)  # noqa: E731
    return "\n".join(["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)] +
                     ["| " + " | ".join(fmt(r[k]) for k in keys) + " |" for r in rows])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smaller stores, fewer repeats")
    ap.add_argument("--json", action="store_true", help="one JSON object per section")
    ap.add_argument("--keep", type=Path, default=None, help="build the stores here and keep them (reused if present)")
    args = ap.parse_args()
    root = args.keep or Path(tempfile.mkdtemp(prefix="dithooks-bench-read-"))
    root.mkdir(parents=True, exist_ok=True)
    reps = 5 if args.quick else 9
    try:
        stores = {"digits": root / "digits.zarr", "S/2": root / "s2.zarr"}
        if not all(p.exists() for p in stores.values()):
            stores = build_stores(root, args.quick)
        for label, store in stores.items():
            npy = save_npy(store, root / f"{store.stem}.npy")
            size = npy.stat().st_size / 1e6
            for title, result in ((f"{label}: slices, ms (store {size:.0f} MB)", slices(store, npy, reps)),
                                  (f"{label}: per-layer-per-step norm", reductions(store, npy, max(3, reps // 3)))):
                if args.json:
                    print(json.dumps({title: result}), flush=True)
                else:
                    print(f"\n### {title}\n\n{table(result)}", flush=True)
        result = startup(stores["digits"], reps)
        if args.json:
            print(json.dumps({"start-up, seconds": result}), flush=True)
        else:
            print("\n### start-up, seconds (median)\n\n" + "\n".join(f"- {k}: {v}" for k, v in result.items()))
    finally:
        if args.keep is None:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
