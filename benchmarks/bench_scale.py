"""Analysis at scale: Dask reductions over a store, 1 vs 2 workers, growing store, worker peak memory.

A synthetic store in dithooks' format (format 2: sharded one file per step, one chunk per (step,
layer), CRC32C per chunk, NaN fill, ``step_complete``, the ``dithooks`` group metadata) is written
with zarr-python for each size: ``blocks.resid_post`` with dims (step, layer, replica, sample,
token, channel), fp16, random values; the size grows with the number of steps. On each store,
on one ``LocalCluster(processes=True, threads_per_worker=1)`` per worker count (1 and 2 by
default), all started before any timing, each reduction interleaved across them:

  sumsq   per (step, layer) mean square over everything else, through ``dithooks.scale.dask_array``
          (read + decode + CRC bound)
  modes   ``dithooks.scale.difference_modes`` (replica pairs; two passes: Gram, cross-Grams)
  from_zarr  (1 worker, run last, not in the memory columns) the sumsq reduction through ``dask.array.from_zarr`` (the alternative read path;
          which does not know ``step_complete``), for the read-path choice

Each reduction runs ``--repeat`` times (3) on each cluster, alternating the clusters' order
(1, 2, 2, 1, ...); the fastest run is reported (all runs are in the JSON). Throughput = store bytes /
seconds. Memory: each worker samples its own RSS every 2 ms during a reduction (a thread started
after a warm-up task imported everything); reported: the largest RSS of any worker and the
largest growth over that worker's RSS before the reduction. CPU: each worker's CPU seconds
during the reduction (shows the work dividing between workers even where the wall time cannot).

    python benchmarks/bench_scale.py [--steps 8,16,32] [--samples 32] [--json out.json] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np

ARRAY = "blocks.resid_post"


def write_store(path: Path, steps: int, layers: int, samples: int, tokens: int, channels: int, seed: int = 0) -> int:
    """A complete dithooks-format store of random fp16 ``blocks.resid_post``; returns its bytes."""
    import warnings

    import zarr
    from zarr.codecs import Crc32cCodec

    warnings.simplefilter("ignore")
    if path.exists():
        shutil.rmtree(path)
    meta = {"format_version": 2, "status": "complete", "model_id": "synthetic", "model_class": "synthetic",
            "storage_dtype": "fp16", "layers": list(range(layers)), "seeds": list(range(samples)),
            "hook_arrays": {ARRAY: {"hook": "blocks.{i}.resid_post", "layers": list(range(layers))}},
            "extras": {"replicas": {"kappa": 0.5, "g": 0.0}}}
    root = zarr.open_group(str(path), mode="w", zarr_format=3, attributes={"dithooks": meta})
    dims = ("step", "layer", "replica", "sample", "token", "channel")
    shape = (steps, layers, 2, samples, tokens, channels)
    arr = root.create_array(ARRAY, shape=shape, dtype="float16", chunks=(1, 1) + shape[2:],
                            shards=(1, layers) + shape[2:], fill_value=np.nan, compressors=[Crc32cCodec()],
                            dimension_names=dims)
    rng = np.random.default_rng(seed)
    base = rng.standard_normal((layers, 1, samples, tokens, channels)).astype(np.float32)
    for s in range(steps):  # replica a/b = base ± a shrinking random difference
        diff = rng.standard_normal((layers, samples, tokens, channels)).astype(np.float32) * (1 + s) / steps
        arr[s] = np.stack([base[:, 0] + diff, base[:, 0] - diff], axis=1).astype(np.float16)
    for name, values in (("step", np.arange(steps)), ("layer", np.arange(layers)), ("sample", np.arange(samples))):
        root.create_array(name, data=values.astype(np.int64), dimension_names=(name,))
    rep = root.create_array("replica", shape=(2,), dtype=str, dimension_names=("replica",))
    rep[:] = np.array(["a", "b"])
    done = root.create_array("step_complete", shape=(steps,), dtype=bool, chunks=(1,), fill_value=False,
                             dimension_names=("step",))
    done[:] = True
    return sum(f.stat().st_size for f in (path / ARRAY).rglob("*") if f.is_file())


def _start_sampler(dask_worker=None) -> int:
    """In a worker: sample this process's RSS every 2 ms (a thread) until :func:`_stop_sampler`."""
    import threading

    import psutil

    proc = psutil.Process()
    state = dask_worker._bench_sampler = {}   # kept on the worker (this function is shipped by value)
    state.update(stop=False, base=proc.memory_info().rss, peak=0, cpu=sum(proc.cpu_times()[:2]))

    def loop():
        while not state["stop"]:
            state["peak"] = max(state["peak"], proc.memory_info().rss)
            time.sleep(0.002)

    state["thread"] = threading.Thread(target=loop, daemon=True)
    state["thread"].start()
    return state["base"]


def _stop_sampler(dask_worker=None) -> dict:
    import psutil

    proc = psutil.Process()
    state = dask_worker._bench_sampler
    state["stop"] = True
    state["thread"].join()
    peak = max(state["peak"], proc.memory_info().rss)
    return {"base": state["base"], "peak": peak, "cpu": sum(proc.cpu_times()[:2]) - state["cpu"]}


def _warm(path: str) -> int:
    from dithooks.scale import dask_array  # noqa: F401  (imports what the tasks need)
    from dithooks.store.reader import open_store

    open_store(path).select(ARRAY, step=0, layer=0, sample=0)
    return 0


def _warm_graph(path: str) -> None:
    import dask.array as da
    import torch  # noqa: F401  (difference_modes' band means use dithooks/analysis/modes.py: imported once, not timed)

    from dithooks.scale import dask_array

    a = dask_array(path, ARRAY, step=[0]).data.astype(np.float64)
    x = a[:, :, 0].reshape(a.shape[0], a.shape[1], a.shape[3], -1)
    da.compute((a ** 2).mean(axis=(2, 3, 4, 5)), da.einsum("slmd,slnd->slmn", x, x).sum(),
               da.from_zarr(path, component=ARRAY)[0].sum())


def sumsq(path: str, via: str = "dithooks"):
    import dask.array as da

    if via == "dithooks":
        from dithooks.scale import dask_array

        a = dask_array(path, ARRAY).data
    else:
        a = da.from_zarr(path, component=ARRAY)
    return (a.astype(np.float64) ** 2).mean(axis=(2, 3, 4, 5)).compute()


def modes(path: str):
    from dithooks.scale import difference_modes

    return difference_modes(path, pairs="replica").energy


def run(path: Path, worker_counts: list[int], what: list[str], repeat: int) -> dict[int, dict]:
    """Time each reduction on one LocalCluster per worker count, all open at once and interleaved.

    Every cluster is started and warmed first; then each reduction runs ``repeat`` times on each
    cluster in turn (1, 2, 2, 1, 1, 2, ...), so the 1- and 2-worker timings share the machine's
    state (load from other processes, page cache) instead of following each other. The best time
    is reported; memory and CPU are the largest over the repeats."""
    from contextlib import ExitStack

    from distributed import Client, LocalCluster

    out: dict[int, dict] = {w: {} for w in worker_counts}
    with ExitStack() as stack:
        clients = {}
        for w in worker_counts:
            cluster = stack.enter_context(LocalCluster(n_workers=w, threads_per_worker=1, processes=True,
                                                       dashboard_address=None, memory_limit=0))
            clients[w] = stack.enter_context(Client(cluster, set_as_default=False))
        for w, client in clients.items():
            with client.as_current():
                client.run(_warm, str(path))
                _warm_graph(str(path))  # one small reduction of each kind first: imports and code paths warm
        for name in what:
            fn = {"sumsq": lambda: sumsq(str(path)), "from_zarr": lambda: sumsq(str(path), "zarr"),
                  "modes": lambda: modes(str(path))}[name]
            order = [w for w in worker_counts if name != "from_zarr" or w == 1]
            for rep in range(repeat):
                for w in (order if rep % 2 == 0 else order[::-1]):
                    client, r = clients[w], out[w]
                    with client.as_current():
                        client.run(_start_sampler)
                        t = time.perf_counter()
                        fn()
                        dt = time.perf_counter() - t
                        mem = client.run(_stop_sampler)
                    r[name] = min(r.get(name, dt), dt)
                    r.setdefault(f"{name}_times", []).append(round(dt, 3))
                    r[f"{name}_rss_mb"] = max(r.get(f"{name}_rss_mb", 0), max(m["peak"] for m in mem.values()) / 2**20)
                    r[f"{name}_growth_mb"] = max(r.get(f"{name}_growth_mb", 0),
                                                 max(m["peak"] - m["base"] for m in mem.values()) / 2**20)
                    cpu = [round(m["cpu"], 2) for m in mem.values()]
                    if f"{name}_cpu_s" not in r or sum(cpu) < sum(r[f"{name}_cpu_s"]):
                        r[f"{name}_cpu_s"] = cpu
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", default="8,16,32", help="store sizes, as numbers of steps")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--samples", type=int, default=32, help="replica pairs per step")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--channels", type=int, default=128)
    ap.add_argument("--workers", default="1,2")
    ap.add_argument("--what", default="sumsq,modes,from_zarr")
    ap.add_argument("--repeat", type=int, default=3, help="timed runs of each reduction per cluster, interleaved")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--keep", help="write the stores here and keep them")
    a = ap.parse_args(argv)
    root = Path(a.keep) if a.keep else Path(tempfile.mkdtemp(prefix="bench_scale_"))
    root.mkdir(parents=True, exist_ok=True)
    what = a.what.split(",")
    rows = []
    try:
        for steps in [int(s) for s in a.steps.split(",")]:
            path = root / f"s{steps}.zarr"
            nbytes = write_store(path, steps, a.layers, a.samples, a.tokens, a.channels)
            chunk = 2 * a.samples * a.tokens * a.channels * 2
            results = run(path, [int(x) for x in a.workers.split(",")], what, a.repeat)
            for w, r in results.items():
                r.update(steps=steps, workers=w, store_mb=nbytes / 2**20, chunk_mb=chunk / 2**20)
                rows.append(r)
                print(json.dumps(r), file=sys.stderr, flush=True)
    finally:
        if not a.keep:
            shutil.rmtree(root, ignore_errors=True)
    print(f"cores: {os.cpu_count()}; chunk = one (step, layer) = {rows[0]['chunk_mb']:.2f} MiB fp16\n")
    print("| store MiB | workers | sumsq s | sumsq MiB/s | sumsq speed-up | sumsq CPU s per worker | "
          "sumsq worker RSS / growth MiB | modes s | modes speed-up | modes worker RSS / growth MiB | from_zarr sumsq s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    one = {(r["steps"], k): r[k] for r in rows if r["workers"] == 1 for k in ("sumsq", "modes") if k in r}
    for r in rows:
        def cell(k):
            if k not in r:
                return ["", "", ""]
            return [f"{r[k]:.2f}", f"{r['store_mb'] / r[k]:.0f}", f"{r[k + '_rss_mb']:.0f} / {r[k + '_growth_mb']:.0f}"]
        s, m = cell("sumsq"), cell("modes")
        cpu = ", ".join(f"{c:.1f}" for c in r.get("sumsq_cpu_s", []))
        def speedup(k):
            base = one.get((r["steps"], k))
            return f"{base / r[k]:.2f}×" if base and k in r else ""
        print(f"| {r['store_mb']:.0f} | {r['workers']} | {s[0]} | {s[1]} | {speedup('sumsq')} | {cpu} | {s[2]} | "
              f"{m[0]} | {speedup('modes')} | {m[2]} | {cell('from_zarr')[0]} |")
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
