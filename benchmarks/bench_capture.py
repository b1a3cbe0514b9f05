"""Capture overhead, memory against steps, and store write throughput.

Side by side in one process (this machine is noisy; compare ratios, not absolute times):
  plain      sampling with no hooks
  dithooks   resid_post of every block streamed to a Zarr store (background writer)
  torch.save raw register_forward_hook + torch.save of each tensor (a baseline)
  in-memory  register_forward_hook appending clones to a list (a cache-everything baseline)
Runs alternate (plain, dithooks, save, memory, plain, ...) and each is summarised by its median.

    python benchmarks/bench_capture.py [--quick] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def tiny_config():
    return dict(num_attention_heads=4, attention_head_dim=16, in_channels=1, out_channels=1, num_layers=28,
                sample_size=8, patch_size=2, num_embeds_ada_norm=10)


def s2_config():
    return dict(num_attention_heads=6, attention_head_dim=64, in_channels=4, out_channels=8, num_layers=12,
                sample_size=32, patch_size=2, num_embeds_ada_norm=1000)


def build(cfg, root: Path, name: str) -> Path:
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(0)
    d = root / name
    DiTTransformer2DModel(**cfg).save_pretrained(d)
    return d


def time_variants(model_dir: Path, steps: int, samples: int, repeats: int, root: Path) -> dict:
    from dithooks.capture import CaptureConfig, capture
    from dithooks.loading import load_model
    from dithooks.sampling import Sampler, SamplerSpec

    loaded = load_model(str(model_dir))
    spec = SamplerSpec("ddim", steps)
    seeds, labels = list(range(samples)), [1] * samples
    blocks = loaded.adapter.blocks()

    def plain():
        Sampler(loaded, spec).run(labels, seeds)

    def with_dithooks():
        out = root / "bench.zarr"
        capture(CaptureConfig(out=str(out), model=str(model_dir), layers="all", hooks=("resid_post",), sampler=spec,
                              labels=tuple(labels), seeds=tuple(seeds), storage_dtype="fp16", mode="overwrite"),
                loaded=loaded)

    def torch_save():
        d = root / "ts"
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir()
        count = [0]

        def hook(mod, args, out):
            torch.save(out.detach().half(), d / f"{count[0]}.pt")
            count[0] += 1

        hs = [b.register_forward_hook(hook) for b in blocks]
        try:
            Sampler(loaded, spec).run(labels, seeds)
        finally:
            for h in hs:
                h.remove()

    def in_memory():
        cache = []
        hs = [b.register_forward_hook(lambda m, a, o: cache.append(o.detach().half().clone())) for b in blocks]
        try:
            Sampler(loaded, spec).run(labels, seeds)
        finally:
            for h in hs:
                h.remove()

    variants = {"plain": plain, "dithooks": with_dithooks, "torch.save": torch_save, "in-memory": in_memory}
    times = {k: [] for k in variants}
    plain()  # warm-up
    for _ in range(repeats):
        for k, fn in variants.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"seconds": med, "ratio_to_plain": {k: med[k] / med["plain"] for k in med}, "repeats": repeats}


def peak_rss_child(model_dir: Path, steps: int, out: Path) -> float:
    """Peak resident memory (MiB) of a fresh process capturing ``steps`` steps."""
    code = f"""
import resource
from dithooks.capture import CaptureConfig, capture
from dithooks.sampling import SamplerSpec
capture(CaptureConfig(out={str(out)!r}, model={str(model_dir)!r}, layers='all', hooks=('resid_post','attn.out','mlp.out'),
        sampler=SamplerSpec('ddim', {steps}), labels=(1,1,1,1), seeds=(0,1,2,3), storage_dtype='fp32', mode='overwrite'))
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return int(r.stdout.strip().splitlines()[-1]) / 1024


def write_throughput(root: Path, steps: int = 40) -> dict:
    """MB/s of the store writer vs numpy.save of the same bytes (fp16, XL-sized resid slabs)."""
    import zarr

    from dithooks.store.writer import ArraySpec, StoreWriter

    slab = torch.randn(2, 256, 1152).half()
    nbytes = slab.numel() * 2 * steps
    out = {}
    for comp in ("none", "zstd"):
        p = root / f"w_{comp}.zarr"
        shutil.rmtree(p, ignore_errors=True)
        g = zarr.open_group(str(p), mode="w", zarr_format=3)
        w = StoreWriter(g, compression=comp)
        spec = ArraySpec("x", ("step", "sample", "token", "channel"), (steps, 2, 256, 1152), (1, 2, 256, 1152),
                         torch.float16)
        t0 = time.perf_counter()
        for s in range(steps):
            w.put(spec, (s,), slab.clone())
        w.flush()
        os.sync()
        out[f"dithooks ({comp})"] = nbytes / (time.perf_counter() - t0) / 1e6
        w.close()
    t0 = time.perf_counter()
    for s in range(steps):
        np.save(root / f"np_{s}.npy", slab.numpy())
    os.sync()
    out["numpy.save"] = nbytes / (time.perf_counter() - t0) / 1e6
    return out


def report(title: str, value, as_json: bool) -> None:
    """Print one section as soon as it is measured (long runs stay readable if stopped)."""
    if as_json:
        print(json.dumps({title: value}), flush=True)
        return
    if isinstance(value, dict) and "seconds" in value:
        print(f"\n### {title} (median of {value['repeats']})\n\n| variant | seconds | ratio to plain |\n|---|---|---|")
        for name, sec in value["seconds"].items():
            print(f"| {name} | {sec:.3f} | {value['ratio_to_plain'][name]:.3f} |")
    else:
        print(f"\n### {title}\n\n" + "\n".join(f"- {a}: {b}" for a, b in value.items()))
    sys.stdout.flush()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer steps and repeats")
    ap.add_argument("--json", action="store_true", help="one JSON object per line, per section")
    args = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    root = Path(tempfile.mkdtemp(prefix="dithooks-bench-"))
    if not args.json:
        print(f"torch threads: {torch.get_num_threads()}, torch {torch.__version__}")
    try:
        tiny = build(tiny_config(), root, "tiny")
        s2 = build(s2_config(), root, "s2")
        reps = 3 if args.quick else 5
        report("tiny (28 blocks, width 64, 16 tokens), 50 steps, 4 samples",
               time_variants(tiny, 50, 4, reps, root), args.json)
        n = 10 if args.quick else 20
        report(f"S/2-like (12 blocks, width 384, 256 tokens), {n} steps, 2 samples",
               time_variants(s2, n, 2, reps, root), args.json)
        report("peak RSS MiB vs steps (tiny, 3 hooks x 28 blocks, 4 samples, fp32 store)",
               {f"{k} steps": round(peak_rss_child(tiny, k, root / f"rss{k}.zarr"), 1) for k in (10, 50, 200)},
               args.json)
        report("write MB/s (fp16 2x256x1152 slabs, 40 steps, fsync'd)",
               {k: round(v, 1) for k, v in write_throughput(root).items()}, args.json)
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
