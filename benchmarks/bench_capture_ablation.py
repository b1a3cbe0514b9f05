"""Where a capture's overhead goes: a ladder of contenders on the embedded digits model, each
adding one piece of what a dithooks capture of every block's ``resid_post`` does, interleaved in
rounds in one process (every other round reversed), each summarised by its paired ratio to the
same round's plain run (median, quartiles, bootstrap 95 % CI of the median) and by its
sampling-thread CPU ratio (``time.thread_time``: the writer thread's work is not in it).

  plain              sampling, no hooks
  torch hook no-op   ``register_forward_hook`` (with kwargs) on every block, doing nothing
  torch hook copy    the same, ``copy_`` of the block's output into an fp16 row (any capture's floor)
  dithooks no-op     dithooks' HookManager, a read hook on every ``blocks.{i}.resid_post`` doing nothing
  dithooks copy      the same hook copying into an fp16 row
  capture, no puts   a whole capture (store created and finished, recorder, step log) whose
                     ``StoreWriter.put`` drops the data: no encoding, no array files
  capture, no files  a whole capture whose file writes are dropped (``write_atomic``): encoding,
                     checksums and queueing included
  capture            a whole capture (what users run)
  np.save/step       raw hooks, each step stacked and written with ``np.save`` (bench_capture.py's contender)
  plain again        the control: its distance from 1 is the noise floor

    OMP_NUM_THREADS=1 python benchmarks/bench_capture_ablation.py [--rounds 40] [--threads 1] [--json]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_capture import median_ci, quartiles, sample_with_np_save  # noqa: E402  (bench_capture.py's statistics and contender)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=40)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from dithooks.capture import CaptureConfig, capture
    from dithooks.hooks import HookManager
    from dithooks.loading import DEFAULT_MODEL, load_model
    from dithooks.sampling import Sampler, SamplerSpec
    from dithooks.store import writer as writer_module

    loaded = load_model(DEFAULT_MODEL, device="cpu")
    spec = SamplerSpec("ddim", args.steps)
    labels, seeds = (0, 1, 2, 3), (0, 1, 2, 3)
    blocks = list(loaded.transformer.transformer_blocks)
    names = [f"blocks.{i}.resid_post" for i in range(len(blocks))]
    manager = HookManager(loaded.transformer, loaded.adapter)
    root = Path(tempfile.mkdtemp(prefix="dithooks-ablation-"))
    slab = torch.empty(len(blocks), len(seeds), 16, 64, dtype=torch.float16)
    rows = list(slab.unbind(0))
    count = [0]
    real_write, real_put = writer_module.write_atomic, writer_module.StoreWriter.put

    def plain() -> None:
        Sampler(loaded, spec, device="cpu").run(labels, seeds)

    def torch_hooks(copy: bool) -> None:
        def make(i):
            row = rows[i]

            def hook(module, a, k, out):
                if copy:
                    row.copy_(out)
            return hook
        handles = [b.register_forward_hook(make(i), with_kwargs=True) for i, b in enumerate(blocks)]
        try:
            plain()
        finally:
            for h in handles:
                h.remove()

    def dithooks_hooks(copy: bool) -> None:
        def read(value, ctx):
            if copy:
                rows[ctx.layer].copy_(value)
        with manager.hooks(read={n: read for n in names}):
            Sampler(loaded, spec, manager, device="cpu").run(labels, seeds)

    def whole(drop: str | None = None) -> None:
        count[0] += 1
        if drop == "puts":
            writer_module.StoreWriter.put = lambda self, spec, index, value: None
        elif drop == "files":
            writer_module.write_atomic = lambda path, pieces: sum(memoryview(p).nbytes for p in pieces)
        try:
            capture(CaptureConfig(out=str(root / f"out-{count[0]}"), model=DEFAULT_MODEL, layers="all",
                                  hooks=("resid_post",), sampler=spec, labels=labels, seeds=seeds,
                                  storage_dtype="fp16", device="cpu", mode="create"), loaded=loaded)
        finally:
            writer_module.write_atomic, writer_module.StoreWriter.put = real_write, real_put

    def np_save() -> None:
        count[0] += 1
        d = root / f"npy-{count[0]}"
        d.mkdir()
        sample_with_np_save(blocks, plain, d)

    contenders = {
        "plain": plain,
        "torch hook no-op": lambda: torch_hooks(False),
        "torch hook copy": lambda: torch_hooks(True),
        "dithooks no-op": lambda: dithooks_hooks(False),
        "dithooks copy": lambda: dithooks_hooks(True),
        "capture, no puts": lambda: whole("puts"),
        "capture, no files": lambda: whole("files"),
        "capture": whole,
        "np.save/step": np_save,
        "plain again": plain,
    }
    for fn in contenders.values():  # warm-up: imports, allocator, page cache
        fn()
    wall = {k: [] for k in contenders}
    cpu = {k: [] for k in contenders}
    order = list(contenders.items())
    try:
        for r in range(args.rounds):
            for name, fn in (order if r % 2 == 0 else order[::-1]):
                t, c = time.perf_counter(), time.thread_time()
                fn()
                cpu[name].append(time.thread_time() - c)
                wall[name].append(time.perf_counter() - t)
            for p in root.iterdir():  # outside the timed region
                shutil.rmtree(p, ignore_errors=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)

    def paired(xs: dict[str, list[float]], name: str) -> list[float]:
        return [a / b for a, b in zip(xs[name], xs["plain"])]

    result = {"rounds": args.rounds, "threads": args.threads, "steps": args.steps,
              "plain_s": statistics.median(wall["plain"]),
              "paired_wall": {k: quartiles(paired(wall, k)) for k in contenders},
              "paired_wall_ci95": {k: median_ci(paired(wall, k)) for k in contenders},
              "paired_thread_cpu": {k: quartiles(paired(cpu, k)) for k in contenders},
              "fastest_ratio": {k: min(wall[k]) / min(wall["plain"]) for k in contenders}}
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(f"digits model, {args.steps} steps, 4 samples, torch threads {args.threads}, {args.rounds} rounds; "
          f"plain {result['plain_s']:.3f} s (median)\n")
    print("| contender | paired wall ratio, median [quartiles] (95% CI) | fastest ratio | sampling-thread CPU ratio |")
    print("|---|---|---|---|")
    for k in contenders:
        q1, q2, q3 = result["paired_wall"][k]
        lo, hi = result["paired_wall_ci95"][k]
        print(f"| {k} | {q2:.3f} [{q1:.3f}, {q3:.3f}] ({lo:.3f}-{hi:.3f}) | {result['fastest_ratio'][k]:.3f} "
              f"| {result['paired_thread_cpu'][k][1]:.3f} |")


if __name__ == "__main__":
    main()
