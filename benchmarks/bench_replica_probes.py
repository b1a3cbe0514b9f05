"""What replica pairs, JVP hook points and the routing probe cost in a whole sampling run.

Side by side in one process on the embedded digits DiT (28 blocks; this machine is noisy:
compare ratios, not absolute times). Variants, all on M replica pairs, DDIM, every block:

  pairs          replica pairs sampled with coupling g (no hooks, no store)
  capture        + resid_post of every block streamed to a store
  jvp            + blocks.{i}.jvp.{routing,modulation} streamed (one fused block JVP per block)
  routing        the routing probe (Appendix-B report per layer/head/step, nothing raw stored)
  routing+modes  the routing probe with modes=4 (4 more block JVPs per pair, layer and step)

Runs alternate (pairs, capture, jvp, ...) and each is summarised by its median.

    python benchmarks/bench_replica_probes.py [--quick] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="fewer steps and repeats")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from dithooks.capture import CaptureConfig, capture
    from dithooks.loading import load_model
    from dithooks.sampling import ReplicaSpec, Sampler, SamplerSpec

    steps, pairs, repeats = (10, 4, 3) if args.quick else (20, 8, 5)
    loaded = load_model()
    spec = SamplerSpec("ddim", steps)
    rep = ReplicaSpec(g=0.3)
    seeds, labels = tuple(range(pairs)), tuple(range(pairs))
    root = Path(tempfile.mkdtemp(prefix="bench_probes_"))

    def run_capture(name, hooks=(), probes=()):
        def go():
            out = root / f"{name}.zarr"
            shutil.rmtree(out, ignore_errors=True)
            capture(CaptureConfig(out=str(out), hooks=hooks, sampler=spec, labels=labels, seeds=seeds,
                                  replicas=rep, probes=probes), loaded=loaded)
        return go

    variants = {
        "pairs": lambda: Sampler(loaded, spec, replicas=rep).run(labels, seeds),
        "capture": run_capture("capture", ("resid_post",)),
        "jvp": run_capture("jvp", ("resid_post", "jvp.routing", "jvp.modulation")),
        "routing": run_capture("routing", (), ("routing",)),
        "routing+modes": run_capture("modes", (), (("routing", {"modes": 4}),)),
    }
    times: dict[str, list[float]] = {k: [] for k in variants}
    for fn in variants.values():  # warm-up
        fn()
    for _ in range(repeats):
        for name, fn in variants.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    shutil.rmtree(root, ignore_errors=True)
    base = statistics.median(times["pairs"])
    rows = [{"variant": k, "seconds": statistics.median(v), "ratio": statistics.median(v) / base}
            for k, v in times.items()]
    print(f"embedded DiT, {pairs} pairs, {steps} DDIM steps, g = 0.3, all 28 blocks, "
          f"{torch.get_num_threads()} threads, median of {repeats}")
    print("| variant | seconds | ratio to pairs |\n|---|---|---|")
    for r in rows:
        print(f"| {r['variant']} | {r['seconds']:.3f} | {r['ratio']:.2f} |")
    if args.json:
        args.json.write_text(json.dumps({"steps": steps, "pairs": pairs, "repeats": repeats, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
