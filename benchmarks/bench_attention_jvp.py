"""Cost of per-block JVPs and of the explicit-pattern attention path, on one DiT block.

    python benchmarks/bench_attention_jvp.py            # ~1-3 minutes on 2 CPU cores
    python benchmarks/bench_attention_jvp.py --quick    # fewer repeats
    python benchmarks/bench_attention_jvp.py --json out.json

(1) JVP cost relative to the block forward (default SDPA processor, no_grad): the fused
    ``block_jvp`` for the full block only and for every default part, and the autograd reference
    (``torch.func.jvp`` of the diffusers block, math SDPA backend). Target: <= 2.5x at XL width.
(2) A hooked layer on the explicit softmax path (``attn.n_eff`` reduction only, and the full
    ``attn.pattern``) relative to the same processor on SDPA (nothing wanted). Target: <= 1.10x.

(3) ``--whole-run``: the JVP's cost in a whole sampling run. Plain sampling against sampling with
    ``blocks.*.jvp.full`` (and with every part, ``blocks.*.jvp.{full,attn,routing,...}``) read on
    every block, the JVP computed the old way (its own primal at the block's input, beside the
    forward: ``JVPSettings(ride_along=False)``) and riding along the sampling forward (the tangent
    reuses the forward's q/k/v, h_mid and GELU pre-activation). Reported per hooked block in units
    of a block forward: ``(run - plain run) / (plain run / block forwards)``. Models: the embedded
    digits DiT, and random-init DiTs at S width (12 blocks, 384 wide, 256 tokens) and XL width
    (1152 wide, 16 heads, 256 tokens; 4 blocks to keep the run short: the measure is per block).
    Target: <= 2.2 block forwards per hooked block.

    python benchmarks/bench_attention_jvp.py --whole-run --threads 1
    python benchmarks/bench_attention_jvp.py --whole-run --threads 2 --models digits,S

(4) ``--routing``: the ``routing`` probe's per-call report on top of the JVP. For one block (the
    configs of (1)), the per-head terms the probe reads (``jvp.heads.*`` at g = 0.3) are handed to
    ``routing_dominance_report`` as the probe does, at ``precision`` fp64 (default) and fp32, and in fp64
    with the probe's option ``a=upper`` (a rigorous upper bound on ``a``, no eigenvalue solver), and in
    fp64 with ``a`` by the dense eigensolver instead of Lanczos (``a dense``: the same report otherwise);
    reported in units of the block forward, wall and CPU time (the tiny block: 5x the repeats, its
    calls take ~2 ms). Target: <= 1.5 block forwards on top of the JVP. Then (CPU) ``a`` alone, dense
    solver against the default (Lanczos), on the blocks' patterns and on synthetic local-window ones.
    ``--routing-reference old.py`` also times an older ``probes/attention_terms.py`` in the same
    process, interleaved (``git show <commit>:probes/attention_terms.py > old.py``).

    python benchmarks/bench_attention_jvp.py --routing --threads 1
    python benchmarks/bench_attention_jvp.py --routing --device cuda   # unchanged on an accelerator

Cases are timed interleaved (one repeat of each in turn) and medians reported, so background
load on a shared machine biases every case alike.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from dataclasses import dataclass

import torch
from diffusers.models.attention import BasicTransformerBlock

from dithooks.attention.processor import HookedAttnProcessor
from dithooks.jvp import ALL_PARTS, DEFAULT_PARTS, block_jvp


@dataclass(frozen=True)
class Config:
    name: str
    heads: int
    head_dim: int
    tokens: int
    batch: int = 2

    @property
    def width(self) -> int:
        return self.heads * self.head_dim


CONFIGS = (
    Config("tiny", heads=4, head_dim=16, tokens=16),
    Config("S-like", heads=6, head_dim=64, tokens=256),
    Config("XL width", heads=16, head_dim=72, tokens=256),
)


def dit_block(cfg: Config, seed: int = 0) -> BasicTransformerBlock:
    """One block as DiTTransformer2DModel builds it (its default config)."""
    torch.manual_seed(seed)
    return BasicTransformerBlock(cfg.width, cfg.heads, cfg.head_dim, dropout=0.0,
                                 activation_fn="gelu-approximate", num_embeds_ada_norm=1000,
                                 attention_bias=True, upcast_attention=False,
                                 norm_type="ada_norm_zero", norm_elementwise_affine=False,
                                 norm_eps=1e-5).eval()


def block_inputs(cfg: Config, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(cfg.batch, cfg.tokens, cfg.width, generator=g)
    delta = torch.randn(cfg.batch, cfg.tokens, cfg.width, generator=g)
    t = torch.randint(0, 1000, (cfg.batch,), generator=g)
    y = torch.randint(0, 1000, (cfg.batch,), generator=g)
    return h, delta, t, y


def time_interleaved(cases: dict, repeats: int, warmup: int = 2, cpu: dict | None = None,
                     rotate: bool = False) -> dict[str, float]:
    """Median wall time (s) of each zero-argument callable, timed in turn each repeat.

    ``cpu``, if given, receives the median CPU time of this process (s) per case: on a shared,
    loaded machine it is far less disturbed by other processes than wall time. ``rotate``: each
    repeat starts one case later, so no case always runs right after the same one (the first
    report after the JVP measured ~0.1 block forwards more on the tiny block than the same call
    later in the round: caches)."""
    for _ in range(warmup):
        for fn in cases.values():
            fn()
    samples: dict[str, list[float]] = {name: [] for name in cases}
    cpu_samples: dict[str, list[float]] = {name: [] for name in cases}
    items = list(cases.items())
    for r in range(repeats):
        order = items[r % len(items):] + items[:r % len(items)] if rotate else items
        for name, fn in order:
            c0, t0 = time.process_time(), time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - t0)
            cpu_samples[name].append(time.process_time() - c0)
    if cpu is not None:
        cpu.update({name: statistics.median(v) for name, v in cpu_samples.items()})
    return {name: statistics.median(v) for name, v in samples.items()}


def bench_jvp(cfg: Config, repeats: int) -> dict:
    block = dit_block(cfg)
    h, delta, t, y = block_inputs(cfg)
    kw = dict(timestep=t, class_labels=y)

    def forward():
        with torch.no_grad():
            block(h, **kw)

    cases = {
        "forward": forward,
        "jvp full (fused)": lambda: block_jvp(block, h, delta, parts=("full",), **kw),
        "jvp all parts (fused)": lambda: block_jvp(block, h, delta, parts=DEFAULT_PARTS, **kw),
        "jvp full (autograd ref)": lambda: block_jvp(block, h, delta, parts=("full",),
                                                     method="autograd", **kw),
    }
    times = time_interleaved(cases, repeats)
    return {"config": cfg.name, "width": cfg.width, "heads": cfg.heads, "tokens": cfg.tokens,
            "batch": cfg.batch, "ms": {k: 1e3 * v for k, v in times.items()},
            "ratio": {k: v / times["forward"] for k, v in times.items()}}


def bench_explicit(cfg: Config, repeats: int) -> dict:
    block = dit_block(cfg)
    h, _, t, y = block_inputs(cfg)
    kept = []

    def reader(name, value):  # a read hook that keeps a reference, as a store would
        kept.append(value)
        return value

    processors = {
        "SDPA (hooked, nothing wanted)": HookedAttnProcessor(0, reader),
        "explicit, n_eff": HookedAttnProcessor(0, reader, frozenset({"attn.n_eff"})),
        "explicit, full pattern": HookedAttnProcessor(0, reader, frozenset({"attn.pattern"})),
    }
    x_attn = torch.randn(cfg.batch, cfg.tokens, cfg.width, generator=torch.Generator().manual_seed(2))

    def block_with(proc):
        def fn():
            block.attn1.set_processor(proc)
            with torch.no_grad():
                block(h, timestep=t, class_labels=y)
            kept.clear()
        return fn

    def attn_with(proc):
        def fn():
            block.attn1.set_processor(proc)
            with torch.no_grad():
                block.attn1(x_attn)
            kept.clear()
        return fn

    out = {"config": cfg.name, "width": cfg.width, "heads": cfg.heads, "tokens": cfg.tokens,
           "batch": cfg.batch}
    for scope, make in (("block", block_with), ("attention module", attn_with)):
        times = time_interleaved({k: make(p) for k, p in processors.items()}, repeats)
        base = times["SDPA (hooked, nothing wanted)"]
        out[scope] = {"ms": {k: 1e3 * v for k, v in times.items()},
                      "ratio": {k: v / base for k, v in times.items()}}
    return out


# -- (4) the routing probe's report on top of the JVP ----------------------------------------------
def load_reference_report(path: str):
    """``routing_dominance_report`` of another version of ``probes/attention_terms.py`` (a file, e.g.
    ``git show <commit>:probes/attention_terms.py > old.py``), loaded beside today's in this process
    (its relative imports resolve to today's ``dithooks.probes``): before/after timed interleaved."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("dithooks.probes._reference_attention_terms", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.routing_dominance_report


def bench_routing_report(cfg: Config, repeats: int, g: float = 0.3, device: str = "cpu",
                         reference: str | None = None) -> dict:
    from dithooks.jvp import HEAD_TERMS
    from dithooks.probes import attention_terms
    from dithooks.probes.attention_terms import routing_dominance_report
    reference_report = load_reference_report(reference) if reference else None

    block = dit_block(cfg).to(device)
    h, delta, t, y = (x.to(device) for x in block_inputs(cfg))
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    with torch.no_grad():
        terms = block_jvp(block, h, delta, timestep=t, class_labels=y, parts=("full",), heads=HEAD_TERMS, g=g)
    args = [terms[n] for n in ("heads.pattern", "heads.dlogits_intra", "heads.dlogits_inter", "heads.v", "heads.dv")]

    def forward():
        with torch.no_grad():
            block(h, timestep=t, class_labels=y)
        sync()

    def report(dtype, fn_report=routing_dominance_report, dense_a=False, **kw):
        def fn():
            min_n = attention_terms.LANCZOS_MIN_N
            if dense_a:  # a by Gram matrix + eigvalsh at every size
                attention_terms.LANCZOS_MIN_N = 1 << 30
            try:
                rep = fn_report(*args, g, dtype=dtype, **kw)
            finally:
                attention_terms.LANCZOS_MIN_N = min_n
            {k: v.cpu() for k, v in rep.items()}  # what the probe keeps
        return fn

    def jvp():
        block_jvp(block, h, delta, timestep=t, class_labels=y, parts=(), heads=HEAD_TERMS, g=g)
        sync()

    cases = {"forward": forward, "jvp (per-head terms)": jvp,
             "report fp64": report(torch.float64), "report fp32": report(torch.float32),
             "report fp64 a=upper": report(torch.float64, a_method="upper"),
             "report fp64 a dense": report(torch.float64, dense_a=True)}
    if reference_report is not None:
        cases["reference fp64"] = report(torch.float64, reference_report)
        cases["reference fp32"] = report(torch.float32, reference_report)
    cpu: dict[str, float] = {}
    times = time_interleaved(cases, repeats, cpu=cpu, rotate=True)
    return {"config": cfg.name, "width": cfg.width, "heads": cfg.heads, "tokens": cfg.tokens, "batch": cfg.batch,
            "device": device, "ms": {k: 1e3 * v for k, v in times.items()}, "cpu_ms": {k: 1e3 * v for k, v in cpu.items()},
            "ratio": {k: v / times["forward"] for k, v in times.items()},
            "cpu_ratio": {k: v / cpu["forward"] for k, v in cpu.items()}}


def local_window_patterns(widths, side: int = 16, seed: int = 0) -> torch.Tensor:
    """Local attention on a side×side token grid: softmax of −dist²/(2 w²) plus noise (0.3 N(0,1)),
    float64. Narrow windows give A ≈ I + E, a flat top of the spectrum of A P_⊥."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    pos = torch.stack([yy.flatten(), xx.flatten()], -1).double()
    d2 = ((pos[:, None] - pos[None]) ** 2).sum(-1)
    return torch.stack([torch.softmax(-d2 / (2 * w * w) + 0.3 * torch.randn(d2.shape, generator=g, dtype=torch.float64), -1)
                        for w in widths])


def bench_operator_norm(repeats: int) -> list[dict]:
    """``a = ‖A P_⊥‖_op`` alone: the dense solver (Gram + eigvalsh) against the default (Lanczos from 64
    tokens, dense fallback), interleaved, CPU ms; on the S-like and XL-width blocks' patterns (random
    init, g = 0.3) and on synthetic local-window patterns (12 heads, 256 tokens)."""
    from dithooks.jvp import HEAD_TERMS
    from dithooks.probes import attention_terms

    sets = {}
    for cfg in CONFIGS[1:]:
        block = dit_block(cfg)
        h, delta, t, y = block_inputs(cfg)
        with torch.no_grad():
            A = block_jvp(block, h, delta, timestep=t, class_labels=y, parts=(), heads=HEAD_TERMS, g=0.3)["heads.pattern"]
        A = A.double()
        sets[f"{cfg.name} block"] = (A / A.sum(-1, keepdim=True)).reshape(-1, cfg.tokens, cfg.tokens)
    sets["local, width 0.5 (flat top)"] = local_window_patterns([0.5] * 12)
    sets["local, widths 0.5-4"] = local_window_patterns([0.5, 1, 2, 4] * 3)
    rows = []
    for name, A in sets.items():
        M = A - A.mean(-1, keepdim=True)
        dense = attention_terms._mean_free_operator_norm_dense(A)
        auto = attention_terms._mean_free_operator_norm(A)
        _, done = attention_terms._gram_top_eigenvalue_lanczos(M)
        cpu: dict[str, float] = {}
        time_interleaved({"dense": lambda: attention_terms._mean_free_operator_norm_dense(A),
                          "lanczos": lambda: attention_terms._mean_free_operator_norm(A)}, repeats, cpu=cpu,
                         rotate=True)
        rows.append({"set": name, "heads": A.shape[0], "tokens": A.shape[-1], "dense_ms": 1e3 * cpu["dense"],
                     "lanczos_ms": 1e3 * cpu["lanczos"], "converged": int(done.sum()),
                     "max_rel_diff": float(((auto - dense).abs() / dense).max())})
    return rows


def operator_norm_markdown(rows: list[dict]) -> str:
    lines = ["### a = ‖A P_⊥‖_op alone (CPU ms, medians)", "",
             "| patterns | heads × tokens | dense | default (Lanczos) | ratio | heads converged by Lanczos | max rel. diff |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['set']} | {r['heads']} × {r['tokens']} | {r['dense_ms']:.1f} | {r['lanczos_ms']:.1f} | "
                     f"{r['lanczos_ms'] / r['dense_ms']:.2f} | {r['converged']}/{r['heads']} | {r['max_rel_diff']:.1e} |")
    return "\n".join(lines)


def routing_markdown(rows: list[dict]) -> str:
    cases = [c for c in rows[0]["ms"] if c != "forward"]
    lines = ["### (4) routing probe: report per block call, in block forwards (median ms)", "",
             "| config | width | heads | tokens | B | forward ms | " + " | ".join(cases) + " |",
             "|---" * (6 + len(cases)) + "|"]
    for r in rows:
        for kind, ms, ratio in (("wall", "ms", "ratio"), ("CPU", "cpu_ms", "cpu_ratio")):
            cells = [f"{r[ratio][c]:.2f} ({r[ms][c]:.1f})" for c in cases]
            lines.append(f"| {r['config']} ({kind}) | {r['width']} | {r['heads']} | {r['tokens']} | {r['batch']} | "
                         f"{r[ms]['forward']:.1f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# -- (3) the JVP in a whole run ----------------------------------------------------------------
DIT_DEFAULTS = dict(in_channels=4, out_channels=8, sample_size=32, patch_size=2, num_embeds_ada_norm=1000)
WHOLE_RUN_MODELS = {
    # name: (DiT config or None for the embedded digits model, samples, DDIM steps, repeats)
    "digits": (None, 4, 10, 9),
    "S": (dict(num_attention_heads=6, attention_head_dim=64, num_layers=12, **DIT_DEFAULTS), 2, 3, 5),
    "XL": (dict(num_attention_heads=16, attention_head_dim=72, num_layers=4, **DIT_DEFAULTS), 2, 2, 3),
}
WHOLE_RUN_PARTS = {"jvp.full": ("full",), "all parts": ALL_PARTS}


def whole_run_model(name: str, device: str = "cpu"):
    """The embedded digits DiT, or a random-init DiT of one of :data:`WHOLE_RUN_MODELS`' configs."""
    from dithooks.loading import DIT_SCHEDULE, LoadedModel, load_model

    cfg = WHOLE_RUN_MODELS[name][0]
    if cfg is None:
        return load_model(device=device)
    from diffusers import DiTTransformer2DModel

    from dithooks.adapters import adapter_for

    torch.manual_seed(0)
    model = DiTTransformer2DModel(**cfg).to(device).eval().requires_grad_(False)
    return LoadedModel(model, adapter_for(model), f"random {name}", "config", dict(DIT_SCHEDULE))


def bench_whole_run(name: str, repeats: int | None = None, device: str = "cpu") -> dict:
    from dithooks.hooks import HookManager
    from dithooks.sampling import Sampler, SamplerSpec

    _, samples, steps, default_repeats = WHOLE_RUN_MODELS[name]
    repeats = repeats or default_repeats
    loaded = whole_run_model(name, device)
    geo = loaded.adapter.geometry
    hm = HookManager(loaded.transformer, loaded.adapter)
    spec = SamplerSpec("ddim", steps)
    labels, seeds = [i % (geo.num_classes or 1) for i in range(samples)], list(range(samples))
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    outputs, paths = {}, {}

    def noop(v, ctx):
        return None

    # the code before the ride-along (an older checkout on PYTHONPATH) has only the separate path
    has_ride_along = hasattr(hm.extension("jvp").settings, "ride_along")

    def run(key=None, parts=(), ride_along=True):
        def fn():
            if has_ride_along:
                hm.extension("jvp").configure(ride_along=ride_along)
            with hm.hooks(read={f"blocks.*.jvp.{p}": noop for p in parts}):
                out = Sampler(loaded, spec, hm, device=device).run(labels, seeds)
                sync()
                if key is not None:
                    paths[key] = dict(getattr(hm.extension("jvp"), "calls", {"separate": "?"}))
            outputs[key] = out
        return fn

    cases = {"plain": run()}
    for label, parts in WHOLE_RUN_PARTS.items():
        cases[f"{label}, separate primal (before)"] = run(f"{label} before", parts, ride_along=False)
        if has_ride_along:
            cases[f"{label}, ride-along (after)"] = run(f"{label} after", parts, ride_along=True)
    cpu: dict[str, float] = {}
    times = time_interleaved(cases, repeats, warmup=1, cpu=cpu)
    block_forwards = steps * geo.num_layers  # one model call per step (no guidance)
    per_block = times["plain"] / block_forwards
    identical = all(torch.equal(o, outputs[None]) for o in outputs.values())

    def cost(t):  # every block is hooked: the extra time per hooked block call, in block forwards
        return {k: (v - t["plain"]) / block_forwards / (t["plain"] / block_forwards)
                for k, v in t.items() if k != "plain"}

    return {"model": name, "width": geo.width, "heads": geo.num_heads, "blocks": geo.num_layers,
            "tokens": geo.num_tokens, "batch": samples, "steps": steps, "repeats": repeats,
            "block_forwards": block_forwards, "threads": torch.get_num_threads(), "device": device,
            "s": times, "cpu_s": cpu, "plain_per_block_ms": 1e3 * per_block,
            "cost_in_block_forwards": cost(times), "cpu_cost_in_block_forwards": cost(cpu),
            "paths": paths, "outputs_bit_identical": identical}


def whole_run_markdown(rows: list[dict]) -> str:
    cases = list(rows[0]["cost_in_block_forwards"])
    lines = ["### (3) JVP in a whole run: cost per hooked block, in block forwards "
             "((run - plain) / block forwards / (plain / block forwards)); medians", "",
             "| model | width | blocks x steps | tokens | B | threads | plain (s) | "
             + " | ".join(cases) + " |", "|---" * (7 + len(cases)) + "|"]
    for r in rows:
        cells = [f"{r['cost_in_block_forwards'][c]:.2f} ({r['s'][c]:.2f} s)" for c in cases]
        lines.append(f"| {r['model']} | {r['width']} | {r['blocks']} x {r['steps']} | {r['tokens']} | "
                     f"{r['batch']} | {r['threads']} | {r['s']['plain']:.2f} | " + " | ".join(cells) + " |")
        cells = [f"{r['cpu_cost_in_block_forwards'][c]:.2f} ({r['cpu_s'][c]:.2f} s)" for c in cases]
        lines.append(f"| {r['model']}, CPU time | | | | | | {r['cpu_s']['plain']:.2f} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append("outputs bit-for-bit equal to plain sampling in every variant: "
                 + ", ".join(f"{r['model']} {r['outputs_bit_identical']}" for r in rows))
    lines.append("block calls per path (last repeat): " + "; ".join(
        f"{r['model']}: " + ", ".join(f"{k} {v}" for k, v in r["paths"].items()) for r in rows))
    return "\n".join(lines)


def markdown(jvp_rows: list[dict], explicit_rows: list[dict]) -> str:
    lines = ["### (1) JVP cost vs block forward (median ms, ratio to forward)", ""]
    cases = list(jvp_rows[0]["ms"])
    lines.append("| config | width | heads | tokens | B | " + " | ".join(cases) + " |")
    lines.append("|---" * (5 + len(cases)) + "|")
    for r in jvp_rows:
        cells = [f"{r['ms'][c]:.1f} ({r['ratio'][c]:.2f}x)" for c in cases]
        lines.append(f"| {r['config']} | {r['width']} | {r['heads']} | {r['tokens']} | {r['batch']} | "
                     + " | ".join(cells) + " |")
    lines += ["", "### (2) explicit-pattern path vs SDPA on a hooked layer (median ms, ratio)", ""]
    cases = list(explicit_rows[0]["block"]["ms"])
    lines.append("| config | scope | " + " | ".join(cases) + " |")
    lines.append("|---" * (2 + len(cases)) + "|")
    for r in explicit_rows:
        for scope in ("block", "attention module"):
            cells = [f"{r[scope]['ms'][c]:.2f} ({r[scope]['ratio'][c]:.2f}x)" for c in cases]
            lines.append(f"| {r['config']} | {scope} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer repeats")
    ap.add_argument("--repeats", type=int, default=None, help="repeats per case (default 15/5)")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    ap.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    ap.add_argument("--whole-run", action="store_true", help="only (3): the JVP in a whole sampling run")
    ap.add_argument("--models", default="digits,S,XL", help="(3): models, comma-separated (digits,S,XL)")
    ap.add_argument("--device", default="cpu", help="(3), (4): cpu or cuda")
    ap.add_argument("--routing", action="store_true", help="only (4): the routing probe's report per block call")
    ap.add_argument("--routing-reference", metavar="FILE", default=None,
                    help="(4): also time routing_dominance_report of this older probes/attention_terms.py")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    if args.routing:
        repeats = args.repeats or (3 if args.quick else 7)
        rows = [bench_routing_report(c, repeats * (5 if c.name == "tiny" else 1), device=args.device,
                                     reference=args.routing_reference) for c in CONFIGS]
        print(routing_markdown(rows))
        a_rows = bench_operator_norm(repeats) if args.device == "cpu" else []
        if a_rows:
            print("\n" + operator_norm_markdown(a_rows))
        meta = {"torch": torch.__version__, "threads": torch.get_num_threads(), "repeats": repeats,
                "machine": platform.processor() or platform.machine(), "seconds": round(time.perf_counter() - t0, 1)}
        print(f"\n{meta}")
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"meta": meta, "routing": rows, "operator_norm": a_rows}, f, indent=2)
        return
    if args.whole_run:
        names = [m.strip() for m in args.models.split(",") if m.strip()]
        unknown = set(names) - set(WHOLE_RUN_MODELS)
        if unknown:
            ap.error(f"unknown models {sorted(unknown)}; choose from {', '.join(WHOLE_RUN_MODELS)}")
        rows = []
        for name in names:
            rows.append(bench_whole_run(name, args.repeats or (3 if args.quick else None), args.device))
            print(whole_run_markdown(rows[-1:]), flush=True)
        print("\n" + whole_run_markdown(rows))
        meta = {"torch": torch.__version__, "threads": torch.get_num_threads(),
                "machine": platform.processor() or platform.machine(), "device": args.device,
                "seconds": round(time.perf_counter() - t0, 1)}
        print(f"\n{meta}")
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"meta": meta, "whole_run": rows}, f, indent=2)
        return
    repeats = args.repeats or (5 if args.quick else 15)
    jvp_rows = [bench_jvp(c, repeats if c.name != "XL width" else max(3, repeats // 2))
                for c in CONFIGS]
    explicit_rows = [bench_explicit(c, repeats) for c in CONFIGS[1:]]
    print(markdown(jvp_rows, explicit_rows))
    meta = {"torch": torch.__version__, "threads": torch.get_num_threads(),
            "machine": platform.processor() or platform.machine(), "repeats": repeats,
            "seconds": round(time.perf_counter() - t0, 1)}
    print(f"\n{meta}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "jvp": jvp_rows, "explicit": explicit_rows}, f, indent=2)


if __name__ == "__main__":
    main()
