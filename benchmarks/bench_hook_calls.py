"""Per-call cost of a read hook as a capture pays it: right after a block's forward (which pushes
the interpreter's code and data out of the caches; the same code costs 5-10x its hot-loop time
there), on the embedded digits model, one torch thread.

    python benchmarks/bench_hook_calls.py [--calls 200] [--repeats 7]

Variants, each called with block 3's real output right after a forward of block 3:
  empty            a Python function that does nothing (the floor of any hook)
  raw copy_        ``row.copy_(output)`` into an fp16 slab row (what any capture must do)
  dithooks noop    the hook manager's dispatcher with a read function that does nothing
  dithooks record  the dispatcher with the capture's ``StepRecorder.record``
Medians and minima in microseconds per call. A capture of every block's ``resid_post`` over 50
steps makes 1400 such calls (28 blocks x 50 steps), so 1 us per call is 1.4 ms per capture.
``PYTHONPATH=<other checkout> python benchmarks/bench_hook_calls.py`` measures another version.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calls", type=int, default=200, help="calls per variant and repeat")
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    torch.set_num_threads(1)

    import dithooks
    from dithooks.capture.recorder import StepRecorder
    from dithooks.hooks import HookManager
    from dithooks.loading import DEFAULT_MODEL, load_model
    from dithooks.sampling import Sampler, SamplerSpec

    loaded = load_model(DEFAULT_MODEL, device="cpu")
    model = loaded.transformer
    block = model.transformer_blocks[3]
    grabbed = {}
    h = block.register_forward_pre_hook(lambda m, a, k: grabbed.update(a=a, k=k), with_kwargs=True)
    Sampler(loaded, SamplerSpec("ddim", 1)).run([1] * 4, list(range(4)))  # block 3's real inputs
    h.remove()
    a, k = grabbed["a"], grabbed["k"]

    class _Log:
        writer = None

    def dispatcher(fn_of_recorder):
        """The dispatcher the manager registers on block 3, taken off the module so that the
        block's forward runs without it and the call is timed alone."""
        hm = HookManager(model, loaded.adapter)
        hm.state.step, hm.state.timestep, hm.state.batch_axes = 0, 10.0, (("sample", 4),)
        rec = StepRecorder(_Log(), steps=50, layers=list(range(len(model.transformer_blocks))),
                           store_dtype=torch.float16, sample_coords=("sample",))
        before = set(block._forward_hooks)
        hm.add_hook("blocks.3.resid_post", fn_of_recorder(rec))
        (key,) = set(block._forward_hooks) - before
        fn = block._forward_hooks.pop(key)
        block._forward_hooks_with_kwargs.pop(key, None)
        return fn, (hm, rec)  # keep the manager alive

    slab = torch.empty(len(model.transformer_blocks), 4, 16, 64, dtype=torch.float16)
    rows = slab.unbind(0)
    noop, keep1 = dispatcher(lambda rec: (lambda v, ctx: None))
    record, keep2 = dispatcher(lambda rec: rec.record)
    variants = {
        "empty": lambda m, a_, k_, o: None,
        "raw copy_": lambda m, a_, k_, o: rows[3].copy_(o),
        "dithooks noop": noop,
        "dithooks record": record,
    }
    pc = time.perf_counter
    per_call = {name: [] for name in variants}
    with torch.no_grad():
        for _ in range(args.repeats):
            for name, fn in variants.items():
                total = 0.0
                for _ in range(args.calls):
                    out = block(*a, **k)
                    t0 = pc()
                    fn(block, a, k, out)
                    total += pc() - t0
                per_call[name].append(total / args.calls * 1e6)
    print(f"dithooks from {dithooks.__file__}; torch {torch.__version__}, 1 thread; "
          f"{args.calls} calls x {args.repeats} repeats, each right after block 3's forward\n")
    print("| variant | median us/call | min us/call |\n|---|---|---|")
    for name, v in per_call.items():
        print(f"| {name} | {statistics.median(v):.2f} | {min(v):.2f} |")


if __name__ == "__main__":
    main()
