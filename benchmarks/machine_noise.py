"""How steady is this machine's speed? The noise floor under every ratio in docs/benchmarks.md.

Times one fixed piece of work (a chain of small matmuls and tanh, one torch thread, ~0.2 s)
many times in a row and prints the spread and the sequence, each run as a percentage of the
fastest. On a quiet dedicated machine the sequence stays within a few percent of 100; on a
shared virtual machine it drifts in regimes lasting seconds, and no ratio of two runs of a few
seconds each can be trusted to better than that drift.

    OMP_NUM_THREADS=1 python benchmarks/machine_noise.py --runs 120
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch


def fixed_work(a: torch.Tensor, iterations: int) -> torch.Tensor:
    x = a
    for _ in range(iterations):
        x = torch.tanh(x @ a)
    return x


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=120)
    p.add_argument("--iterations", type=int, default=300, help="matmuls per run (256 x 256)")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(1)
    a = torch.randn(256, 256, generator=torch.Generator().manual_seed(0)) / 16
    fixed_work(a, args.iterations)  # warm-up
    times = []
    for _ in range(args.runs):
        t0 = time.perf_counter()
        fixed_work(a, args.iterations)
        times.append(time.perf_counter() - t0)
    t = np.array(times)
    q1, med, q3 = np.quantile(t, [0.25, 0.5, 0.75])
    # adjacent runs: what a paired ratio of two back-to-back runs of identical work can show
    adjacent = t[1:] / t[:-1]
    summary = {"runs": len(t), "seconds_min": float(t.min()), "seconds_median": float(med),
               "median_over_min": float(med / t.min()), "quartiles_over_min": [float(q1 / t.min()), float(q3 / t.min())],
               "max_over_min": float(t.max() / t.min()),
               "adjacent_ratio_quartiles": [float(x) for x in np.quantile(adjacent, [0.25, 0.5, 0.75])],
               "percent_of_fastest": [round(float(100 * x / t.min())) for x in t]}
    if args.json:
        print(json.dumps(summary))
        return
    print(f"{len(t)} runs of identical work: fastest {t.min():.4f} s, median {med / t.min():.3f}x the fastest "
          f"[quartiles {q1 / t.min():.3f}, {q3 / t.min():.3f}], slowest {t.max() / t.min():.3f}x")
    aq = summary["adjacent_ratio_quartiles"]
    print(f"ratio of back-to-back runs: median {aq[1]:.3f} [quartiles {aq[0]:.3f}, {aq[2]:.3f}]")
    print("each run, % of the fastest:", " ".join(str(x) for x in summary["percent_of_fastest"]))


if __name__ == "__main__":
    main()
