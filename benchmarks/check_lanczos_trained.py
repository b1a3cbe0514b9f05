"""The routing report's Lanczos `a` on a trained model's attention patterns (not random init).

Captures `attn.pattern` of every block of the embedded `digits64` model (64 tokens: the size from
which the report uses the Lanczos solver) and, over every (step, layer, sample, head), compares
``a² = λ_max((A P_⊥)(A P_⊥)ᵀ)`` by the Lanczos solver with ``torch.linalg.svdvals``: how many
heads converged (the rest fall back to the dense solver), the largest relative difference, and
the CPU time of the report's `a` path (Lanczos from 64 tokens) against the dense solver.

    OMP_NUM_THREADS=1 python benchmarks/check_lanczos_trained.py [--steps 10] [--seeds 0-3] [--class 7]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="digits64")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--seeds", default="0-3")
    ap.add_argument("--class", dest="label", default="7")
    ap.add_argument("--repeat", type=int, default=5)
    a = ap.parse_args(argv)

    import numpy as np
    import torch

    import dithooks.probes.attention_terms as at
    from dithooks.store.reader import open_store

    torch.set_num_threads(1)
    root = Path(tempfile.mkdtemp(prefix="lanczos_trained_"))
    try:
        out = root / "patterns.zarr"
        subprocess.run([sys.executable, "-m", "dithooks.cli.main", "capture", "--model", a.model, "--layers", "all",
                        "--hooks", "attn.pattern", "--steps", str(a.steps), "--seeds", a.seeds, "--class", a.label,
                        "--out", str(out), "-q"], check=True)
        sel = open_store(out).select("blocks.attn.pattern")
        x = np.asarray(sel.values, dtype=np.float64)
        A = torch.from_numpy(x).reshape(-1, x.shape[-2], x.shape[-1])
    finally:
        shutil.rmtree(root, ignore_errors=True)
    M = A - A.mean(-1, keepdim=True)               # A P_⊥
    lam, converged = at._gram_top_eigenvalue_lanczos(M)
    ref = torch.linalg.svdvals(M)[:, 0] ** 2
    rel = ((lam - ref).abs() / ref.clamp_min(torch.finfo(ref.dtype).tiny))[converged]

    def cpu(fn):
        fn()
        t = time.process_time()
        for _ in range(a.repeat):
            fn()
        return (time.process_time() - t) / a.repeat

    t_auto = cpu(lambda: at._mean_free_operator_norm(A))
    t_dense = cpu(lambda: at._mean_free_operator_norm_dense(A))
    print(f"model {a.model}: patterns {tuple(x.shape)} {sel.dims}, {A.shape[0]} heads of {A.shape[-1]} tokens")
    print(f"converged by Lanczos: {int(converged.sum())}/{A.shape[0]}; "
          f"largest relative difference from svdvals (converged heads): {rel.max().item() if len(rel) else float('nan'):.2e}")
    print(f"a for all heads, CPU s (mean of {a.repeat}): report's path {t_auto:.3f}, dense solver {t_dense:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
