"""Figures and tables of docs/reproduction.md from two `dithooks routing` stores (g = 0, g = 0.3).

    dithooks routing --steps 50 --seeds 0-7 --class 0-7 --coupling 0   --modes 4 --out runs/routing_g0.zarr   --plot docs/img/routing_g0.png
    dithooks routing --steps 50 --seeds 0-7 --class 0-7 --coupling 0.3 --modes 4 --out runs/routing_g0.3.zarr --plot docs/img/routing_g0.3.png
    python docs/scripts/routing_report.py runs/routing_g0.zarr runs/routing_g0.3.zarr

Prints the markdown tables; writes docs/img/routing_layers.png (per-layer ratios and modal gains).
"""

from __future__ import annotations

import sys

import numpy as np

from dithooks.probes.routing_summary import routing_table
from dithooks.store.reader import open_store


def values(store, name):
    return np.asarray(store.select("probe.routing." + name).values, dtype=np.float64)


def med(x):
    x = x[np.isfinite(x)]
    return float(np.median(x)) if x.size else float("nan")


def main(paths):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stores = [open_store(p) for p in paths]
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    for s in stores:
        g = s.meta["extras"]["replicas"]["g"]
        rows = routing_table(s)
        layers = [r["layer"] for r in rows]
        axes[0].plot(layers, [r["R/M"] for r in rows], marker="o", ms=3, label=f"‖R‖/‖M‖ gated, g={g}")
        axes[0].plot(layers, [r["R/M ungated"] for r in rows], ls="--", label=f"‖AδV‖/‖δA V‖ ungated, g={g}")
        ratio = values(s, "mode_ratio")  # (step, layer, mode)
        axes[1].plot(layers, np.nanmedian(ratio[:, :, 0], axis=0), marker="o", ms=3, label=f"mode 0, g={g}")
        axes[1].plot(layers, np.nanmedian(ratio[:, :, -1], axis=0), ls="--", label=f"mode 3, g={g}")
        print(f"\n### g = {g}\n")
        print("| block | ‖R‖/‖M‖ | min | ungated | bound holds | bound valid | tightness | ǀπ₀ǀ/ǀχ₀ǀ |")
        print("|---|---|---|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['layer']} | {r['R/M']:.2f} | {r['R/M min']:.2f} | {r['R/M ungated']:.2f} | "
                  f"{r['bound holds']:.0%} | {r['bound valid']:.1%} | {r['tightness']:.3f} | {r['|pi|/|chi| mode 0']:.2f} |")
        ing = {k: med(values(s, k)) for k in ("a", "eps_delta", "eps_V", "N_min", "tightness")}
        valid = np.asarray(s.select("probe.routing.bound_valid").values)
        lower_ok = float(np.mean(np.sqrt(1 - values(s, "eps_delta") ** 2) > values(s, "a") * values(s, "eps_delta")))
        print(f"\nmedians over (step, layer, sample, head): a = {ing['a']:.3f}, eps_delta = {ing['eps_delta']:.3f}, "
              f"eps_V = {ing['eps_V']:.3f}, N_min = {ing['N_min']:.2f} of N = 16; bound valid on {valid.mean():.2%} "
              f"({lower_ok:.2%} with sqrt(1-eps_d^2) > a eps_d); median tightness where valid {med(values(s, 'tightness')[valid]):.4f}; "
              f"all-layer median gated R/M {med(values(s, 'layer_routing_dominance_gated')):.3f}, "
              f"ungated {med(values(s, 'layer_routing_dominance')):.3f}; median |pi|/|chi| over modes "
              + ", ".join(f"{med(values(s, 'mode_ratio')[:, :, k]):.2f}" for k in range(values(s, "mode_ratio").shape[-1])))
    axes[0].axhline(1, color="k", lw=0.6)
    axes[0].set_yscale("log")
    axes[0].set_xlabel("block")
    axes[0].set_title("routing / modulation (median over steps, pairs)")
    axes[0].legend(fontsize=7)
    axes[1].axhline(1, color="k", lw=0.6)
    axes[1].set_yscale("log")
    axes[1].set_xlabel("block")
    axes[1].set_title("|π_k|/|χ_k| along difference modes (median over steps)")
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig("docs/img/routing_layers.png", dpi=110)
    print("\nwrote docs/img/routing_layers.png")


if __name__ == "__main__":
    main(sys.argv[1:] or ["runs/routing_g0.zarr", "runs/routing_g0.3.zarr"])
