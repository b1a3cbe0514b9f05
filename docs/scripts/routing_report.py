"""Figures and tables of docs/reproduction.md from `dithooks routing` stores.

    dithooks routing --steps 50 --seeds 0-7 --class 0-7 --coupling 0   --modes 4 --out runs/routing_g0.zarr   --plot docs/img/routing_g0.png
    dithooks routing --steps 50 --seeds 0-7 --class 0-7 --coupling 0.3 --modes 4 --out runs/routing_g0.3.zarr --plot docs/img/routing_g0.3.png
    dithooks routing --steps 50 --seeds 0-7 --class 0-7 --coupling 0 --kappa 0.01 --out runs/routing_k0.01.zarr
    python docs/scripts/routing_report.py runs/routing_g0.zarr runs/routing_g0.3.zarr runs/routing_k0.01.zarr
    python docs/scripts/routing_report.py --png other.png STORE...     # the figure elsewhere

Prints, per store, the markdown table per block (ratios, bound validity and tightness, linearisation
error, modal gains when measured) and a summary line with the counts of valid / vacuous / tight
bounds and the linearisation error; writes docs/img/routing_layers.png (per-layer ratios, modal
gains when measured, linearisation error).
"""

from __future__ import annotations

import sys

import numpy as np

from dithooks.probes.routing_summary import routing_summary, routing_table
from dithooks.store.reader import open_store


def values(store, name):
    return np.asarray(store.select("probe.routing." + name).values, dtype=np.float64)


def has(store, name):
    return "probe.routing." + name in store.array_names()


def med(x):
    x = x[np.isfinite(x)]
    return float(np.median(x)) if x.size else float("nan")


def label(store):
    rep = store.meta["extras"]["replicas"]
    return f"g={rep['g']:g}, κ={rep['kappa']:.3g}"


def main(paths, png="docs/img/routing_layers.png"):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stores = [open_store(p) for p in paths]
    fig, axes = plt.subplots(1, 3, figsize=(16, 3.8))
    for s in stores:
        rows = routing_table(s)
        summ = routing_summary(s)
        layers = [r["layer"] for r in rows]
        axes[0].plot(layers, [r["R/M"] for r in rows], marker="o", ms=3, label=f"‖R‖/‖M‖ gated, {label(s)}")
        axes[0].plot(layers, [r["R/M ungated"] for r in rows], ls="--", label=f"‖AδV‖/‖δA V‖ ungated, {label(s)}")
        modes = has(s, "mode_ratio")
        if modes:
            ratio = values(s, "mode_ratio")  # (step, layer, mode)
            axes[1].plot(layers, np.nanmedian(ratio[:, :, 0], axis=0), marker="o", ms=3, label=f"mode 0, {label(s)}")
            axes[1].plot(layers, np.nanmedian(ratio[:, :, -1], axis=0), ls="--", label=f"last mode, {label(s)}")
        if "lin err" in rows[0]:
            axes[2].plot(layers, [r["lin err"] for r in rows], marker="o", ms=3, label=label(s))
        print(f"\n### {label(s)} ({s.path})\n")
        cols = ["‖R‖/‖M‖", "min", "ungated", "bound valid", "bound tight", "tightness"]
        cols += ["lin. error"] if "lin err" in rows[0] else []
        cols += ["ǀπ₀ǀ/ǀχ₀ǀ"] if modes else []
        print("| block | " + " | ".join(cols) + " |")
        print("|---" * (len(cols) + 1) + "|")
        for r in rows:
            cells = [f"{r['R/M']:.2f}", f"{r['R/M min']:.2f}", f"{r['R/M ungated']:.2f}", f"{r['bound valid']:.1%}",
                     f"{r['bound tight']:.1%}", f"{r['tightness']:.3f}"]
            cells += [f"{r['lin err']:.3g}"] if "lin err" in r else []
            cells += [f"{r['|pi|/|chi| mode 0']:.2f}"] if modes else []
            print(f"| {r['layer']} | " + " | ".join(cells) + " |")
        b = summ["bound"]
        ing = {k: med(values(s, k)) for k in ("a", "eps_delta", "eps_V", "N_min")}
        line = (f"\n{b['measurements']:,} (step, layer, sample, head) measurements: bound [105] non-vacuous on "
                f"{b['valid']:,} ({b['valid'] / b['measurements']:.2%}), vacuous on {b['vacuous']:,}, tight "
                f"(measured/bound > {b['tight_threshold']:g}) on {b['tight']:,}; holds on all {b['holds_valid']:,} "
                f"non-vacuous ones ({b['violations']} violations); median tightness where valid "
                f"{b['median_tightness']:.4f}. Medians: a = {ing['a']:.3f}, eps_delta = {ing['eps_delta']:.3f}, "
                f"eps_V = {ing['eps_V']:.3f}, N_min = {ing['N_min']:.2f}; all-layer median gated R/M "
                f"{med(values(s, 'layer_routing_dominance_gated')):.3f}, ungated {med(values(s, 'layer_routing_dominance')):.3f}")
        lin = summ.get("linearisation")
        if lin:
            h, l_ = lin["per_head"], lin["per_layer"]
            line += (f"; linearisation error per head median {h['median']:.3g} (90% {h['p90']:.3g}, max {h['max']:.3g}), "
                     f"per layer after W_O median {l_['median']:.3g} (max {l_['max']:.3g})")
        if modes:
            ratio = values(s, "mode_ratio")
            line += "; median |pi|/|chi| over modes " + ", ".join(f"{med(ratio[:, :, k]):.2f}" for k in range(ratio.shape[-1]))
        print(line)
    for ax, title in zip(axes, ("routing / modulation (median over steps, pairs)",
                                "|π_k|/|χ_k| along difference modes (median over steps)",
                                "linearisation error ‖(O^a−O^b)/2 − (R+M)‖/‖(O^a−O^b)/2‖ (median)")):
        ax.axhline(1, color="k", lw=0.6)
        ax.set_yscale("log")
        ax.set_xlabel("block")
        ax.set_title(title, fontsize=9)
        if ax.lines[1:]:
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    print(f"\nwrote {png}")


if __name__ == "__main__":
    args = sys.argv[1:]
    png = "docs/img/routing_layers.png"
    if "--png" in args:
        i = args.index("--png")
        png = args[i + 1]
        del args[i:i + 2]
    main(args or ["runs/routing_g0.zarr", "runs/routing_g0.3.zarr"], png)
