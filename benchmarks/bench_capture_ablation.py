"""Where a capture's overhead goes: a ladder of contenders on one model, each
adding one piece of what a dithooks capture of every block's ``resid_post`` does, interleaved in
rounds in one process (every other round reversed), each summarised by its paired ratio to the
same round's plain run (median, quartiles, bootstrap 95 % CI of the median), by its
sampling-thread CPU ratio (``time.thread_time``: the writer thread's work is not in it) and by
its tail: the time from the last model call's return to the contender's return (the last
step's scheduler update, and for a capture what it still writes and finishes), median in ms.

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
  capture, unbound   the same with the recorder called as an ordinary read function
                     (``HookManager.bind_readers = False``: a context per call; the path before
                     2026-12-02 (k), which run (k) measured, and since then one call more:
                     ``StepRecorder.record`` calls the point's bound function)
  capture, step end  the same with large steps written whole at step end (``recorder.EAGER_CHUNKS
                     = False``: the path before 2026-12-02 (k)); on the digits model (small steps,
                     written a batch at a time) it is the capture itself
  pattern            (--model xl) a capture of every layer's ``attn.pattern``, and
  pattern, step end  the same written whole at step end
  np.save/step       raw hooks, each step stacked and written with ``np.save`` (bench_capture.py's contender)
  plain again        the control: its distance from 1 is the noise floor

    OMP_NUM_THREADS=1 python benchmarks/bench_capture_ablation.py [--model digits|s2|xl] [--rounds 40]
        [--threads 1] [--steps N] [--json]

Models as in bench_capture.py: the embedded digits model (50 steps, 4 samples), a random-init
S/2-like DiT (10 steps, 2 samples) and an XL-width DiT (4 blocks, 3 steps, 2 samples), the last
two built from a config and saved to a temporary folder. Each model runs in a process of its own
(no other model, nnsight's copy included, beside it).
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
from bench_capture import build, median_ci, quartiles, s2_config, sample_with_np_save, xl_config  # noqa: E402

MODELS = {"digits": (50, 4), "s2": (10, 2), "xl": (3, 2)}  # default steps, samples


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=40)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--model", choices=tuple(MODELS), default="digits")
    ap.add_argument("--steps", type=int, default=None, help="sampling steps (default: the model's, above)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from dithooks.capture import CaptureConfig, capture
    from dithooks.capture import recorder as recorder_module
    from dithooks.hooks import HookManager
    from dithooks.loading import DEFAULT_MODEL, load_model
    from dithooks.sampling import Sampler, SamplerSpec
    from dithooks.store import writer as writer_module

    root = Path(tempfile.mkdtemp(prefix="dithooks-ablation-"))
    steps, samples = MODELS[args.model]
    steps = args.steps or steps
    model_ref = DEFAULT_MODEL if args.model == "digits" else str(
        build(s2_config() if args.model == "s2" else xl_config(), root, f"model-{args.model}"))
    loaded = load_model(model_ref, device="cpu")
    last_call = [0.0]  # when the model's last call returned (the tail column)
    denoise = loaded.adapter.denoise

    def timed_denoise(*a, **kw):
        out = denoise(*a, **kw)
        last_call[0] = time.perf_counter()
        return out
    loaded.adapter.denoise = timed_denoise
    spec = SamplerSpec("ddim", steps)
    labels, seeds = tuple(range(samples)), tuple(range(samples))
    blocks = list(loaded.transformer.transformer_blocks)
    names = [f"blocks.{i}.resid_post" for i in range(len(blocks))]
    manager = HookManager(loaded.transformer, loaded.adapter)
    g = loaded.adapter.geometry
    slab = torch.empty(len(blocks), samples, g.num_tokens, loaded.transformer.inner_dim, dtype=torch.float16)
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

    def whole(drop: str | None = None, hooks: tuple[str, ...] = ("resid_post",)) -> None:
        count[0] += 1
        HookManager.bind_readers = drop != "binding"
        recorder_module.EAGER_CHUNKS = drop != "step end"
        if drop == "puts":
            writer_module.StoreWriter.put = lambda self, spec, index, value: None
        elif drop == "files":
            writer_module.write_atomic = lambda path, pieces: sum(memoryview(p).nbytes for p in pieces)
        try:
            capture(CaptureConfig(out=str(root / f"out-{count[0]}"), model=model_ref, layers="all",
                                  hooks=hooks, sampler=spec, labels=labels, seeds=seeds,
                                  storage_dtype="fp16", device="cpu", mode="create"), loaded=loaded)
        finally:
            writer_module.write_atomic, writer_module.StoreWriter.put = real_write, real_put
            HookManager.bind_readers, recorder_module.EAGER_CHUNKS = True, True

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
        "capture, unbound": lambda: whole("binding"),
        "capture, step end": lambda: whole("step end"),
        "np.save/step": np_save,
        "plain again": plain,
    }
    if args.model == "xl":
        pattern = {"pattern": lambda: whole(hooks=("attn.pattern",)),
                   "pattern, step end": lambda: whole("step end", hooks=("attn.pattern",))}
        contenders = {**{k: v for k, v in contenders.items() if k != "plain again"}, **pattern,
                      "plain again": plain}
    for fn in contenders.values():  # warm-up: imports, allocator, page cache
        fn()
    wall = {k: [] for k in contenders}
    cpu = {k: [] for k in contenders}
    tail = {k: [] for k in contenders}
    order = list(contenders.items())
    try:
        for r in range(args.rounds):
            for name, fn in (order if r % 2 == 0 else order[::-1]):
                t, c = time.perf_counter(), time.thread_time()
                fn()
                end = time.perf_counter()
                cpu[name].append(time.thread_time() - c)
                wall[name].append(end - t)
                tail[name].append(end - last_call[0])
            for p in root.iterdir():  # outside the timed region
                if not p.name.startswith("model-"):
                    shutil.rmtree(p, ignore_errors=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)

    def paired(xs: dict[str, list[float]], name: str) -> list[float]:
        return [a / b for a, b in zip(xs[name], xs["plain"])]

    result = {"model": args.model, "rounds": args.rounds, "threads": args.threads, "steps": steps, "samples": samples,
              "plain_s": statistics.median(wall["plain"]),
              "paired_wall": {k: quartiles(paired(wall, k)) for k in contenders},
              "paired_wall_ci95": {k: median_ci(paired(wall, k)) for k in contenders},
              "paired_thread_cpu": {k: quartiles(paired(cpu, k)) for k in contenders},
              "fastest_ratio": {k: min(wall[k]) / min(wall["plain"]) for k in contenders},
              "tail_ms": {k: 1000 * statistics.median(tail[k]) for k in contenders}}
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(f"{args.model} model, {steps} steps, {samples} samples, torch threads {args.threads}, {args.rounds} rounds; "
          f"plain {result['plain_s']:.3f} s (median)\n")
    print("| contender | paired wall ratio, median [quartiles] (95% CI) | fastest ratio | sampling-thread CPU ratio "
          "| tail ms |")
    print("|---|---|---|---|---|")
    for k in contenders:
        q1, q2, q3 = result["paired_wall"][k]
        lo, hi = result["paired_wall_ci95"][k]
        print(f"| {k} | {q2:.3f} [{q1:.3f}, {q3:.3f}] ({lo:.3f}-{hi:.3f}) | {result['fastest_ratio'][k]:.3f} "
              f"| {result['paired_thread_cpu'][k][1]:.3f} | {result['tail_ms'][k]:.1f} |")


if __name__ == "__main__":
    main()
