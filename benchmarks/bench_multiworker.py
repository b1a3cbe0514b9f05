"""Capture throughput with 1 and 2 worker processes writing one store (issue #14).

Runs the same ``dithooks capture`` command (embedded digits model by default) with
``--workers 1`` (one process, the ordinary capture) and ``--workers 2`` (two worker processes,
each writing its own region of one store), interleaved ``--repeat`` times (1, 2, 2, 1, ...), each
in a fresh interpreter, as a user would run them. Reported: the wall time of the whole command
and the capture time the command prints (``--json``: ``seconds``, which leaves out importing
torch/diffusers), both as the best of the repeats, and samples per second of capture time.

    OMP_NUM_THREADS=1 python benchmarks/bench_multiworker.py [--seeds 0-63] [--steps 50] [--repeat 3]

Two workers can at best halve the time on a machine with two idle cores; the table says what the
machine's load was (load average before each run).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def run_once(args: list[str], out: Path) -> dict:
    if out.exists():
        shutil.rmtree(out)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    load = os.getloadavg()[0]
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "dithooks.cli.main", "capture", "--out", str(out), "--json", *args],
                          capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        raise SystemExit(f"capture failed: {proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    summary = json.loads(proc.stdout[proc.stdout.index("{"):])
    return {"wall_s": wall, "capture_s": float(summary.get("seconds", wall)), "load": load}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", default="0-63")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--hooks", default="resid_post")
    ap.add_argument("--workers", default="1,2")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--extra", default="", help="more capture options, one string (e.g. '--model DIR')")
    ap.add_argument("--json", help="write all runs here")
    a = ap.parse_args(argv)
    n = len(range(int(a.seeds.split("-")[0]), int(a.seeds.split("-")[-1]) + 1))
    base = ["--steps", str(a.steps), "--seeds", a.seeds, "--hooks", a.hooks, *a.extra.split()]
    counts = [int(w) for w in a.workers.split(",")]
    root = Path(tempfile.mkdtemp(prefix="bench_multiworker_"))
    runs: dict[int, list[dict]] = {w: [] for w in counts}
    try:
        for rep in range(a.repeat):
            for w in (counts if rep % 2 == 0 else counts[::-1]):
                extra = ["--workers", str(w)] if w > 1 else []
                r = run_once(base + extra, root / f"w{w}.zarr")
                runs[w].append(r)
                print(json.dumps({"workers": w, **r}), file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(f"cores: {os.cpu_count()}; {n} samples × {a.steps} steps, hooks {a.hooks}; best of {a.repeat}\n")
    print("| workers | wall s | capture s | samples/s (capture) | speed-up (capture) | load average before runs |")
    print("|---|---|---|---|---|---|")
    one = min(r["capture_s"] for r in runs[counts[0]])
    for w in counts:
        wall = min(r["wall_s"] for r in runs[w])
        cap = min(r["capture_s"] for r in runs[w])
        loads = ", ".join(f"{r['load']:.1f}" for r in runs[w])
        print(f"| {w} | {wall:.1f} | {cap:.1f} | {n / cap:.1f} | {one / cap:.2f}× | {loads} |")
    if a.json:
        Path(a.json).write_text(json.dumps(runs, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
