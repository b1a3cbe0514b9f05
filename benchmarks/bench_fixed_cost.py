"""The fixed cost of a capture: what dithooks adds to sampling once per capture, whatever the
number of steps (store set-up, hooks, array creation, finishing), on the sampling thread.

One-step captures of the embedded digits model (every block's ``resid_post``, fp16, 4 samples)
and one-step plain sampling, interleaved; sampling-thread CPU time (``time.thread_time``: the
writer thread's work is not in it), minimum and median over the runs. The difference of the
minima is the fixed cost; the phases are timed inside the capture (thread CPU around
``CaptureSession.__init__``, ``open_store`` and ``_finish``).

    OMP_NUM_THREADS=1 python benchmarks/bench_fixed_cost.py [--runs 40] [--json]
"""

from __future__ import annotations

import argparse
import functools
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=40)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    import torch

    torch.set_num_threads(1)
    from dithooks.capture import CaptureConfig, CaptureSession, capture
    from dithooks.loading import DEFAULT_MODEL, load_model
    from dithooks.sampling import Sampler, SamplerSpec

    loaded = load_model(DEFAULT_MODEL, device="cpu")
    one = SamplerSpec("ddim", 1)
    phases: dict[str, float] = {}

    def timed(name: str, label: str) -> None:
        real = getattr(CaptureSession, name)

        @functools.wraps(real)
        def wrapper(*a, **k):
            t = time.thread_time()
            try:
                return real(*a, **k)
            finally:
                phases[label] = phases.get(label, 0.0) + time.thread_time() - t
        setattr(CaptureSession, name, wrapper)

    timed("__init__", "session set-up")
    timed("open_store", "opening the store")
    timed("_finish", "finishing")
    root = Path(tempfile.mkdtemp(prefix="dithooks-fixed-"))
    results: dict[str, list[float]] = {}

    def plain() -> None:
        Sampler(loaded, one, device="cpu").run([1] * 4, [0, 1, 2, 3])

    def one_capture(i: int) -> None:
        capture(CaptureConfig(out=str(root / f"{i}.zarr"), model=DEFAULT_MODEL, layers="all", hooks=("resid_post",),
                              sampler=one, labels=(1, 1, 1, 1), seeds=(0, 1, 2, 3), storage_dtype="fp16",
                              mode="create"), loaded=loaded)

    plain()
    one_capture(-1)
    for i in range(args.runs):
        phases.clear()
        t = time.thread_time()
        one_capture(i)
        took = {"capture, 1 step": time.thread_time() - t, **phases}
        t = time.thread_time()
        plain()
        took["plain sampling, 1 step"] = time.thread_time() - t
        for k, v in took.items():
            results.setdefault(k, []).append(1e3 * v)
        shutil.rmtree(root / f"{i}.zarr", ignore_errors=True)
    shutil.rmtree(root, ignore_errors=True)
    summary = {k: {"min_ms": min(v), "median_ms": statistics.median(v)} for k, v in results.items()}
    fixed = summary["capture, 1 step"]["min_ms"] - summary["plain sampling, 1 step"]["min_ms"]
    if args.json:
        print(json.dumps({"runs": args.runs, "fixed_cost_ms": fixed, "summary": summary}, indent=2))
        return
    print(f"digits, 1 step, 4 samples, resid_post of every block, fp16; 1 torch thread; {args.runs} runs each, "
          "interleaved; sampling-thread CPU ms\n")
    print("| | min | median |\n|---|---|---|")
    for k, s in summary.items():
        print(f"| {k} | {s['min_ms']:.2f} | {s['median_ms']:.2f} |")
    print(f"\nfixed cost per capture (difference of the minima): {fixed:.1f} ms")


if __name__ == "__main__":
    main()
