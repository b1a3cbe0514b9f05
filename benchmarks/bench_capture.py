"""Capture overhead, memory against steps, and store write throughput.

Side by side in one process (this machine is noisy; compare ratios, not absolute times); every
contender captures the output (resid_post) of every block at every step, fp16:
  plain          sampling with no hooks
  dithooks       resid_post of every block streamed to a Zarr store (background writer, direct
                 chunk/shard writes)
  dithooks/writer thread  the same with small steps' file writes always on the writer thread
                 (before 2026-12-02 (i); today they are written on the sampling thread when torch's
                 threads take every core: ``StoreWriter.sync_files``)
  dithooks/step shards  the same with the hook arrays' layout before 2026-12-02 (i): a shard
                 (file) per step, not a batch of small steps per shard
  dithooks/step files  the same with the store layout and writer before 2026-12-02: latents,
                 step_complete and hook arrays a file per step, each file write its own
                 writer-thread wake-up
  dithooks/zarr  the same with every store write through zarr-python (the writer before direct
                 writes: ``StoreWriter.direct = False``, nested chunk keys)
  dithooks pattern  attn.pattern of every block (XL width only: the explicit-softmax path + writes)
  np.save/step   raw register_forward_hook on every block; each step's values stacked and written
                 with numpy.save, one .npy file per step, into a temp dir
  nnsight cache  nnsight ``tracer.cache`` of every block, kept in memory (one trace per model
                 call, on a copy of the model); only if nnsight imports (``pip install .[bench]``)
  torch.save     raw register_forward_hook + torch.save of each tensor
  in-memory      register_forward_hook appending clones to a list
  plain again    plain sampling once more (a control): how far two identical runs disagree on
                 this machine, the noise floor of every ratio
Runs go in rounds (plain, dithooks, np.save, ..., plain again; the next round in reverse order,
so neither a drift of the machine's speed nor a position in the round favours a contender).
Each contender is summarised by its median wall time and median process CPU time (all threads:
the writer's work included); by its **paired ratio**, its time over the plain run of the same
round (median, quartiles, and a bootstrap 95 % confidence interval of the median); and by the
ratio of its fastest run to plain's fastest (noise only ever slows a run down). Every contender
writes into a new folder each run; the previous run's output is deleted outside the timed
region. Models: the
embedded digits model (28 blocks, width 64, 16 tokens; 50 steps, 4 samples), a randomly
initialised S/2-like DiT (12 blocks, width 384, 256 tokens; 2 samples) and an XL-width DiT
(4 blocks of width 1152, 16 heads, 256 tokens; 3 steps, 2 samples: the overhead is per block).

    python benchmarks/bench_capture.py [--quick] [--repeat N] [--threads 1|2] [--models digits,s2,xl]
        [--variants a,b] [--only timing] [--device cpu|cuda] [--json]

``--device cuda`` runs everything on the GPU unchanged (dithooks stages values in pinned host
memory with non-blocking copies and one synchronisation per step).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def s2_config():
    return dict(num_attention_heads=6, attention_head_dim=64, in_channels=4, out_channels=8, num_layers=12,
                sample_size=32, patch_size=2, num_embeds_ada_norm=1000)


def xl_config():
    return dict(num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8, num_layers=4,
                sample_size=32, patch_size=2, num_embeds_ada_norm=1000)


def build(cfg, root: Path, name: str) -> Path:
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(0)
    d = root / name
    DiTTransformer2DModel(**cfg).save_pretrained(d)
    return d


VARIANTS = ("plain", "dithooks", "dithooks/writer thread", "dithooks/step shards", "dithooks/step files",
            "dithooks/zarr", "dithooks pattern", "np.save/step",
            "nnsight cache", "torch.save", "in-memory", "plain again")


def nnsight_available() -> str | None:
    """None when nnsight imports, else why not (it is an optional benchmark dependency)."""
    try:
        import nnsight  # noqa: F401
    except Exception as e:  # ImportError, or a broken install
        return f"{type(e).__name__}: {e}"
    return None


class _NNsightCached(torch.nn.Module):
    """Stands in for the transformer: every call is one nnsight trace caching every block's output."""

    def __init__(self, transformer: torch.nn.Module, store: list):
        super().__init__()
        from nnsight import NNsight

        self.inner = transformer
        self.config = transformer.config  # the adapter reads the model's geometry from it
        self.envoy = NNsight(transformer)
        self.blocks = [self.envoy.transformer_blocks[i] for i in range(len(transformer.transformer_blocks))]
        self.store = store

    def forward(self, x, timestep=None, class_labels=None):
        with self.envoy.trace(x, timestep=timestep, class_labels=class_labels) as tracer:
            cache = tracer.cache(modules=self.blocks, dtype=torch.float16)
            out = self.envoy.output.save()
        self.store.append(cache)
        return out


def sample_with_np_save(blocks: list, sample, folder: Path) -> None:
    """The ``np.save/step`` contender: run ``sample()`` with a raw forward hook on every block; at
    each step's last block the step's values are stacked ``[layer, batch, token, channel]`` in fp16
    and written with ``np.save``, one ``.npy`` per step, into ``folder``."""
    buf, step, last = [], [0], len(blocks) - 1

    def make(i):
        def hook(mod, args, out):
            buf.append(out.detach().half())
            if i == last:
                np.save(folder / f"{step[0]:05d}.npy", torch.stack(buf).cpu().numpy())
                buf.clear()
                step[0] += 1
        return hook

    handles = [b.register_forward_hook(make(i)) for i, b in enumerate(blocks)]
    try:
        sample()
    finally:
        for h in handles:
            h.remove()


def time_variants(model_ref: str, steps: int, samples: int, repeats: int, root: Path,
                  variants: tuple[str, ...] = VARIANTS, device: str = "cpu") -> dict:
    from dithooks.capture import CaptureConfig, CaptureSession, StepRecorder, capture
    from dithooks.loading import load_model
    from dithooks.sampling import Sampler, SamplerSpec
    from dithooks.store import layout
    from dithooks.store.writer import StoreWriter

    rows_per_chunk = layout.LATENT_ROWS_PER_CHUNK

    loaded = load_model(model_ref, device=device)
    spec = SamplerSpec("ddim", steps)
    seeds, labels = list(range(samples)), [1] * samples
    blocks = loaded.adapter.blocks()
    nn_cache: list = []
    skipped = {}
    if "nnsight cache" in variants and (why := nnsight_available()) is not None:
        skipped["nnsight cache"] = f"nnsight does not import ({why})"
    # nnsight wraps its own deep copy (same weights), so the other contenders run the bare model;
    # the sampler calls the model through the adapter, so the adapter (a shallow copy) gets the
    # wrapper too (before 2026-12-01 (e) it kept the bare model: that contender ran plain sampling)
    nn_loaded = None
    if "nnsight cache" in variants and "nnsight cache" not in skipped:
        wrapper = _NNsightCached(copy.deepcopy(loaded.transformer), nn_cache)
        nn_adapter = copy.copy(loaded.adapter)
        nn_adapter.model = wrapper
        nn_loaded = dataclasses.replace(loaded, transformer=wrapper, adapter=nn_adapter)
    runs = [0]

    def fresh(name: str) -> Path:
        """A new output path for this run; older runs' outputs are deleted by ``clean`` (untimed)."""
        runs[0] += 1
        return root / f"{name}-{runs[0]}"

    def clean(keep: Path | None = None) -> None:
        for p in root.glob("out-*"):
            if p != keep:
                shutil.rmtree(p, ignore_errors=True)

    def plain():
        Sampler(loaded, spec, device=device).run(labels, seeds)

    def with_dithooks(hooks=("resid_post",), direct=True, step_files=False, step_shards=False, thread=False):
        StoreWriter.direct, StoreWriter.separator = direct, ("." if direct else "/")
        StoreWriter.sync_files = False if (thread or step_files or step_shards) else None
        StoreWriter.hold = not step_files
        layout.LATENT_ROWS_PER_CHUNK = 1 if step_files else rows_per_chunk
        CaptureSession._marks_chunk = 1 if step_files else None
        StepRecorder.shard_steps = not (step_files or step_shards)
        try:
            capture(CaptureConfig(out=str(fresh("out-dithooks")), model=model_ref, layers="all", hooks=hooks,
                                  sampler=spec, labels=tuple(labels), seeds=tuple(seeds), storage_dtype="fp16",
                                  device=device, mode="create"), loaded=loaded)
        finally:
            StoreWriter.direct, StoreWriter.separator, StoreWriter.hold = True, ".", True
            StepRecorder.shard_steps, StoreWriter.sync_files = True, None
            layout.LATENT_ROWS_PER_CHUNK, CaptureSession._marks_chunk = rows_per_chunk, None

    def np_save_step():
        d = fresh("out-npy")
        d.mkdir()
        sample_with_np_save(blocks, plain, d)
        last_npy[0] = d

    def nnsight_cache():
        nn_cache.clear()
        Sampler(nn_loaded, spec, device=device).run(labels, seeds)

    def torch_save():
        d = fresh("out-ts")
        d.mkdir()
        count = [0]

        def hook(mod, args, out):
            torch.save(out.detach().half().cpu(), d / f"{count[0]}.pt")
            count[0] += 1

        hs = [b.register_forward_hook(hook) for b in blocks]
        try:
            Sampler(loaded, spec, device=device).run(labels, seeds)
        finally:
            for h in hs:
                h.remove()

    def in_memory():
        cache = []
        hs = [b.register_forward_hook(lambda m, a, o: cache.append(o.detach().half().clone())) for b in blocks]
        try:
            Sampler(loaded, spec, device=device).run(labels, seeds)
        finally:
            for h in hs:
                h.remove()

    last_npy: list = [None]
    table = {"plain": plain, "dithooks": with_dithooks, "dithooks/writer thread": lambda: with_dithooks(thread=True),
             "dithooks/step shards": lambda: with_dithooks(step_shards=True),
             "dithooks/step files": lambda: with_dithooks(step_files=True),
             "dithooks/zarr": lambda: with_dithooks(direct=False),
             "dithooks pattern": lambda: with_dithooks(hooks=("attn.pattern",)),
             "np.save/step": np_save_step, "nnsight cache": nnsight_cache, "torch.save": torch_save,
             "in-memory": in_memory, "plain again": plain}
    chosen = {k: table[k] for k in VARIANTS if (k == "plain" or k in variants) and k not in skipped}
    times = {k: [] for k in chosen}
    cpu = {k: [] for k in chosen}
    plain()  # warm-up
    order = list(chosen.items())
    for r in range(repeats):
        # every other round in reverse order (plain first, then last): a drift of the machine's
        # speed within a pair of rounds favours no contender, and neither does a position
        for k, fn in (order if r % 2 == 0 else order[::-1]):
            clean(keep=last_npy[0])  # np.save's last output stays for the cross-check
            sync(device)
            t0, c0 = time.perf_counter(), time.process_time()
            fn()
            sync(device)
            times[k].append(time.perf_counter() - t0)
            cpu[k].append(time.process_time() - c0)
    med = {k: statistics.median(v) for k, v in times.items()}
    cmed = {k: statistics.median(v) for k, v in cpu.items()}
    paired = {k: [t / p for t, p in zip(v, times["plain"])] for k, v in times.items()}
    check = cross_check(last_npy[0], nn_cache, steps, len(blocks)) if "np.save/step" in chosen else None
    clean()
    return {"seconds": med, "ratio_to_plain": {k: med[k] / med["plain"] for k in med},
            "cpu_seconds": cmed, "cpu_ratio_to_plain": {k: cmed[k] / cmed["plain"] for k in cmed},
            "paired_ratio": {k: quartiles(v) for k, v in paired.items()},
            "paired_ratio_ci95": {k: median_ci(v) for k, v in paired.items()},
            "fastest_ratio": {k: min(v) / min(times["plain"]) for k, v in times.items()},
            "repeats": repeats, "threads": torch.get_num_threads(), "skipped": skipped, "check": check}


def quartiles(xs: list[float]) -> list[float]:
    """[first quartile, median, third quartile] of ``xs`` (the median alone below 4 values)."""
    if len(xs) < 4:
        m = statistics.median(xs)
        return [m, m, m]
    q1, q2, q3 = statistics.quantiles(xs, n=4, method="inclusive")
    return [q1, q2, q3]


def median_ci(xs: list[float], level: float = 0.95, resamples: int = 4000) -> list[float]:
    """A bootstrap confidence interval of the median of ``xs`` (percentile method, fixed seed)."""
    x = np.asarray(xs, dtype=float)
    if len(x) < 4:
        return [float(np.median(x))] * 2
    meds = np.median(np.random.default_rng(0).choice(x, size=(resamples, len(x))), axis=1)
    return [float(np.quantile(meds, (1 - level) / 2)), float(np.quantile(meds, (1 + level) / 2))]


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def cross_check(npy_dir: Path, nn_cache: list, steps: int, nblocks: int) -> str:
    """The contenders stored the same thing: step count, and (if nnsight ran) equal last-step values."""
    files = sorted(npy_dir.glob("*.npy"))
    if len(files) != steps:
        raise RuntimeError(f"np.save/step wrote {len(files)} files for {steps} steps")
    last = np.load(files[-1])
    if last.shape[0] != nblocks:
        raise RuntimeError(f"np.save/step stacked {last.shape[0]} blocks, expected {nblocks}")
    msg = f"np.save/step: {steps} files of {last.shape}"
    if nn_cache:
        if len(nn_cache) != steps:
            raise RuntimeError(f"nnsight traced {len(nn_cache)} calls for {steps} steps")
        c = nn_cache[-1]
        nn_last = np.stack([c[k].output.cpu().numpy() for k in c.keys()])
        diff = float(np.abs(nn_last.astype(np.float32) - last.astype(np.float32)).max())
        msg += f"; nnsight last step max |diff| vs np.save = {diff:.3g}"
    return msg


def peak_rss_child(model_dir: Path | str, steps: int, out: Path) -> float:
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


def write_throughput(root: Path, steps: int = 40, repeats: int = 3) -> dict:
    """MB/s of the store writer vs numpy.save of the same bytes (fp16, XL-sized resid slabs),
    each including ``os.sync()``; writers interleaved, medians of ``repeats``."""
    import zarr

    from dithooks.store.writer import ArraySpec, StoreWriter

    slab = torch.randn(2, 256, 1152).half()
    nbytes = slab.numel() * 2 * steps
    spec = ArraySpec("x", ("step", "sample", "token", "channel"), (steps, 2, 256, 1152), (1, 2, 256, 1152),
                     torch.float16)

    def dithooks(comp: str, direct: bool = True):
        def run(p: Path) -> None:
            values = [slab.clone() for _ in range(steps)]  # the sampling thread's copies, made before timing
            g = zarr.open_group(str(p), mode="w", zarr_format=3)
            w = StoreWriter(g, compression=comp)
            w.direct, w.separator = direct, ("." if direct else "/")
            t0 = time.perf_counter()
            for s, v in enumerate(values):
                w.put(spec, (s,), v)
            w.flush()
            os.sync()
            w.close()
            return time.perf_counter() - t0
        return run

    def numpy_save(p: Path) -> float:
        p.mkdir()
        t0 = time.perf_counter()
        for s in range(steps):
            np.save(p / f"np_{s}.npy", slab.numpy())
        os.sync()
        return time.perf_counter() - t0

    writers = {"dithooks (no compression)": dithooks("none"), "dithooks (zstd level 1)": dithooks("zstd"),
               "dithooks, zarr-python writes (no compression)": dithooks("none", direct=False),
               "numpy.save": numpy_save}
    secs = {k: [] for k in writers}
    for r in range(repeats):
        for i, (k, fn) in enumerate(writers.items()):
            p = root / f"w{r}-{i}"
            secs[k].append(fn(p))
            shutil.rmtree(p, ignore_errors=True)
    return {k: nbytes / statistics.median(v) / 1e6 for k, v in secs.items()}


def report(title: str, value, as_json: bool) -> None:
    """Print one section as soon as it is measured (long runs stay readable if stopped)."""
    if as_json:
        print(json.dumps({title: value}), flush=True)
        return
    if isinstance(value, dict) and "seconds" in value:
        print(f"\n### {title} (median of {value['repeats']}, torch threads {value.get('threads')})\n\n"
              "| variant | seconds | ratio to plain | paired ratio, median [quartiles] (95% CI of the median) "
              "| fastest ratio | CPU seconds | CPU ratio |\n|---|---|---|---|---|---|---|")
        for name, sec in value["seconds"].items():
            q1, q2, q3 = value["paired_ratio"][name]
            lo, hi = value["paired_ratio_ci95"][name]
            print(f"| {name} | {sec:.3f} | {value['ratio_to_plain'][name]:.3f} | {q2:.3f} [{q1:.3f}, {q3:.3f}] "
                  f"({lo:.3f}-{hi:.3f}) "
                  f"| {value['fastest_ratio'][name]:.3f} | {value['cpu_seconds'][name]:.3f} "
                  f"| {value['cpu_ratio_to_plain'][name]:.3f} |")
        for name, why in value.get("skipped", {}).items():
            print(f"\nskipped {name}: {why}")
        if value.get("check"):
            print(f"\ncheck: {value['check']}")
    else:
        print(f"\n### {title}\n\n" + "\n".join(f"- {a}: {b}" for a, b in value.items()))
    sys.stdout.flush()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer steps and repeats")
    ap.add_argument("--repeat", type=int, default=None, help="timed runs per variant (default 5, --quick 3)")
    ap.add_argument("--json", action="store_true", help="one JSON object per line, per section")
    ap.add_argument("--threads", type=int, choices=(1, 2), default=None,
                    help="torch threads (default: $BENCH_THREADS, else 2)")
    ap.add_argument("--variants", default=",".join(VARIANTS),
                    help=f"comma-separated contenders to time besides plain (default: all of {', '.join(VARIANTS)})")
    ap.add_argument("--only", choices=("timing", "all"), default="all",
                    help="timing: only the overhead tables (skip peak RSS and write throughput)")
    ap.add_argument("--models", default="digits,s2,xl", help="comma-separated: digits, s2, xl (default: all)")
    ap.add_argument("--device", default="cpu", help="cpu (default) or cuda: the same benchmark on a GPU")
    args = ap.parse_args()
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    if any(m not in ("digits", "s2", "xl") for m in models):
        ap.error(f"unknown model in {args.models!r}: choose from digits, s2, xl")
    variants = tuple(v.strip() for v in args.variants.split(",") if v.strip())
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        ap.error(f"unknown variant {unknown[0]!r}: choose from {', '.join(VARIANTS)}")
    from dithooks.loading import DEFAULT_MODEL

    torch.set_num_threads(args.threads or int(os.environ.get("BENCH_THREADS", "2")))
    root = Path(tempfile.mkdtemp(prefix="dithooks-bench-"))
    if not args.json:
        print(f"torch threads: {torch.get_num_threads()}, torch {torch.__version__}, "
              f"nnsight: {nnsight_available() or 'available'}")
    try:
        reps = args.repeat or (3 if args.quick else 5)
        dev = args.device
        plain_variants = tuple(v for v in variants if v != "dithooks pattern")
        if "digits" in models:
            report(f"embedded digits model (28 blocks, width 64, 16 tokens), 50 steps, 4 samples, {dev}",
                   time_variants(DEFAULT_MODEL, 50, 4, reps, root, plain_variants, dev), args.json)
        if "s2" in models:
            s2 = build(s2_config(), root, "s2")
            n = 10 if args.quick else 20
            report(f"S/2-like (12 blocks, width 384, 256 tokens), {n} steps, 2 samples, {dev}",
                   time_variants(str(s2), n, 2, reps, root, plain_variants, dev), args.json)
        if "xl" in models:
            xl = build(xl_config(), root, "xl")
            report(f"XL width (4 blocks of width 1152, 16 heads, 256 tokens), 3 steps, 2 samples, {dev}",
                   time_variants(str(xl), 3, 2, reps, root, variants, dev), args.json)
        if args.only == "timing":
            return
        report("peak RSS MiB vs steps (digits, 3 hooks x 28 blocks, 4 samples, fp32 store)",
               {f"{k} steps": round(peak_rss_child(DEFAULT_MODEL, k, root / f"rss{k}.zarr"), 1)
                for k in (10, 50, 200)},
               args.json)
        report("write MB/s (fp16 2x256x1152 slabs, 40 steps, fsync'd)",
               {k: round(v, 1) for k, v in write_throughput(root).items()}, args.json)
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
