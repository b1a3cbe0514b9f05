"""Cost of per-block JVPs and of the explicit-pattern attention path, on one DiT block.

    python benchmarks/bench_attention_jvp.py            # ~1-3 minutes on 2 CPU cores
    python benchmarks/bench_attention_jvp.py --quick    # fewer repeats
    python benchmarks/bench_attention_jvp.py --json out.json

(1) JVP cost relative to the block forward (default SDPA processor, no_grad): the fused
    ``block_jvp`` for the full block only and for every default part, and the autograd reference
    (``torch.func.jvp`` of the diffusers block, math SDPA backend). Target: <= 2.5x at XL width.
(2) A hooked layer on the explicit softmax path (``attn.n_eff`` reduction only, and the full
    ``attn.pattern``) relative to the same processor on SDPA (nothing wanted). Target: <= 1.10x.

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
from dithooks.jvp import DEFAULT_PARTS, block_jvp


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


def time_interleaved(cases: dict, repeats: int, warmup: int = 2) -> dict[str, float]:
    """Median wall time (s) of each zero-argument callable, timed in turn each repeat."""
    for _ in range(warmup):
        for fn in cases.values():
            fn()
    samples: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(repeats):
        for name, fn in cases.items():
            t0 = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - t0)
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
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    repeats = args.repeats or (5 if args.quick else 15)
    t0 = time.perf_counter()
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
