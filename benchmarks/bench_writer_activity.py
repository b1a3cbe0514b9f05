"""What a capture's store writes cost the sampling thread, counted rather than timed.

Wall-time ratios on a noisy 2-core machine cannot resolve a 1-2 % change; these counts can.
Side by side, interleaved, in one process (digits model, 50 steps, 4 samples, every block's
``resid_post`` in fp16, as bench_capture.py), for each contender:

- files the store holds afterwards;
- the sampling thread's **voluntary context switches** (``getrusage(RUSAGE_THREAD)``): each is a
  wait, almost always for the interpreter lock held by the writer thread;
- its **wall minus CPU time** (ms): how long it was off the CPU while sampling (those waits);
- the **other threads' CPU time** (ms): the writer thread's work (process CPU minus the sampling
  thread's), which at two torch threads competes with torch's second thread for the cores;
- the sampling thread's time in ``StepRecorder.end_step`` (ms: buffering, encoding, queueing).

Contenders: ``dithooks`` (today's store layout and writer), ``dithooks/writer thread`` (small
steps' file writes always on the writer thread: at two torch threads on two cores today's writes
them on the sampling thread, ``StoreWriter.sync_files``), ``dithooks/step shards`` (hook
arrays a shard per step, as before 2026-12-02 (i), not a batch of small steps per shard) and
``dithooks/step files`` (the layout and writer before 2026-12-02: ``latents``, ``step_complete``
and hook arrays a file per step, each file write its own writer-thread wake-up). Medians (and minimums) over the runs. At two torch
threads on two cores "other threads' CPU" includes torch's second thread.

    OMP_NUM_THREADS=1 python benchmarks/bench_writer_activity.py [--runs 15] [--threads 1] [--json]
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import statistics
import tempfile
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=15)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from dithooks.capture import CaptureConfig, CaptureSession, capture
    from dithooks.capture import recorder
    from dithooks.loading import DEFAULT_MODEL, load_model
    from dithooks.sampling import SamplerSpec
    from dithooks.store import layout
    from dithooks.store.writer import StoreWriter

    loaded = load_model(DEFAULT_MODEL, device="cpu")
    spec = SamplerSpec("ddim", 50)
    root = Path(tempfile.mkdtemp(prefix="dithooks-activity-"))
    rows_per_chunk = layout.LATENT_ROWS_PER_CHUNK
    end_step_time = [0.0]
    real_end_step = recorder.StepRecorder.end_step

    def timed_end_step(self, step, state):
        t = time.thread_time()
        try:
            return real_end_step(self, step, state)
        finally:
            end_step_time[0] += time.thread_time() - t

    recorder.StepRecorder.end_step = timed_end_step

    def run(name: str, old: str | None, i: int) -> dict:
        step_files = old == "files"
        StoreWriter.hold = not step_files
        layout.LATENT_ROWS_PER_CHUNK = 1 if step_files else rows_per_chunk
        CaptureSession._marks_chunk = 1 if step_files else None
        recorder.StepRecorder.shard_steps = old in (None, "thread")
        StoreWriter.sync_files = None if old is None else False
        out = root / f"{name.replace('/', '-')}-{i}.zarr"
        end_step_time[0] = 0.0
        try:
            r0, c0, p0, w0 = resource.getrusage(resource.RUSAGE_THREAD), time.thread_time(), time.process_time(), \
                time.perf_counter()
            capture(CaptureConfig(out=str(out), model=DEFAULT_MODEL, layers="all", hooks=("resid_post",),
                                  sampler=spec, labels=(1, 1, 1, 1), seeds=(0, 1, 2, 3), storage_dtype="fp16",
                                  mode="create"), loaded=loaded)
            w1, p1, c1, r1 = time.perf_counter(), time.process_time(), time.thread_time(), \
                resource.getrusage(resource.RUSAGE_THREAD)
        finally:
            StoreWriter.hold, layout.LATENT_ROWS_PER_CHUNK, CaptureSession._marks_chunk = True, rows_per_chunk, None
            recorder.StepRecorder.shard_steps, StoreWriter.sync_files = True, None
        files = sum(1 for p in out.rglob("*") if p.is_file())
        shutil.rmtree(out)
        return {"files": files, "waits": r1.ru_nvcsw - r0.ru_nvcsw, "off_cpu_ms": 1e3 * ((w1 - w0) - (c1 - c0)),
                "writer_cpu_ms": 1e3 * ((p1 - p0) - (c1 - c0)), "end_step_ms": 1e3 * end_step_time[0],
                "wall_s": w1 - w0}

    # contender -> which older writer: None (today's), "thread" (small steps' files always written
    # by the writer thread), "shards" (and a shard per step), "files" (the writer before 2026-12-02)
    contenders = {"dithooks": None, "dithooks/writer thread": "thread", "dithooks/step shards": "shards",
                  "dithooks/step files": "files"}
    results: dict[str, list[dict]] = {k: [] for k in contenders}
    for name, old in contenders.items():  # warm-up, untimed
        run(name, old, -1)
    for i in range(args.runs):
        order = list(contenders.items()) if i % 2 == 0 else list(contenders.items())[::-1]
        for name, old in order:
            results[name].append(run(name, old, i))
    shutil.rmtree(root, ignore_errors=True)
    keys = ("files", "waits", "off_cpu_ms", "writer_cpu_ms", "end_step_ms", "wall_s")
    summary = {name: {k: {"median": statistics.median(r[k] for r in rs), "min": min(r[k] for r in rs)} for k in keys}
               for name, rs in results.items()}
    if args.json:
        print(json.dumps({"runs": args.runs, "threads": args.threads, "summary": summary}, indent=2))
        return
    print(f"digits, 50 steps, 4 samples, resid_post of every block, fp16; torch threads {args.threads}; "
          f"{args.runs} runs each, interleaved; median (min)\n")
    print("| contender | files | sampling-thread waits | off-CPU ms | writer CPU ms | end_step ms | wall s |")
    print("|---|---|---|---|---|---|---|")
    for name, s in summary.items():
        cells = [f"{s[k]['median']:.0f} ({s[k]['min']:.0f})" if k in ("files", "waits") else
                 f"{s[k]['median']:.3f} ({s[k]['min']:.3f})" if k == "wall_s" else
                 f"{s[k]['median']:.1f} ({s[k]['min']:.1f})" for k in keys]
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
