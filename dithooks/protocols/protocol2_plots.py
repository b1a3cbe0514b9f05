"""Figures of a Protocol II store (matplotlib, PNG and SVG under ``STORE/figures/``).

- ``p2_mode_energies``: E_lead and E_trail against block at t_spec(g), one panel per g, shaded
  ± one standard deviation over pairs (the paper's Figures 1, 9, 10);
- ``p2_gap_ratio``: R_ℓ = E_trail/E_lead against block, one line per g, bootstrap 95 % band;
- ``p2_coherence``: mean-free fraction and low-frequency share of the leading (and trailing)
  modes against block, with the 95 % range of the same band mean for Gaussian random vectors;
- ``p2_gap_ratio_steps``: log R over (step, block) per g, with the step used marked.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

FIGURES = ("p2_mode_energies", "p2_gap_ratio", "p2_coherence", "p2_gap_ratio_steps")


def _save(fig, folder: Path, name: str) -> list[str]:
    out = []
    for ext in ("svg", "png"):
        path = folder / f"{name}.{ext}"
        fig.savefig(path, dpi=110, metadata={"Date": None} if ext == "svg" else None)
        out.append(f"figures/{path.name}")
    return out


def write_figures(store_path: str | Path, summary: dict) -> list[str]:
    """Draw every figure; returns their paths relative to the store (SVG first, then PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FormatStrFormatter, MaxNLocator

    folder = Path(store_path) / "figures"
    folder.mkdir(parents=True, exist_ok=True)
    g_list, layers = summary["g"], np.asarray(summary["layers"])
    pl = summary["per_layer"]
    G = len(g_list)
    paths: list[str] = []
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]

    # mode energies vs depth, one panel per g (paper Figures 1, 9, 10)
    cols = min(G, 3)
    rows = (G + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.3 * rows), squeeze=False, sharey=True)
    for gi, g in enumerate(g_list):
        ax = axes[gi // cols][gi % cols]
        for key, color, label in (("E_lead", "tab:blue", "E_lead (leading modes)"),
                                  ("E_trail", "tab:red", "E_trail (trailing modes)")):
            m, sd = pl[key][gi], pl[f"{key}_std"][gi]
            ax.plot(layers, m, marker="o", ms=3, color=color, label=label)
            ax.fill_between(layers, m - sd, m + sd, color=color, alpha=0.18, lw=0)
        step, ts = summary["at_step"][gi], summary["at_timestep"][gi]
        ax.set_title(f"g = {g:g}: step {step} (t = {ts})", fontsize=10)
        ax.set_xlabel("block")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if gi % cols == 0:
            ax.set_ylabel("normalised mode energy")
        ax.axhline(1.0, color="k", lw=0.5, ls=":")
        ax.legend(fontsize=7)
    for k in range(G, rows * cols):
        axes[k // cols][k % cols].axis("off")
    fig.suptitle("Protocol II: difference-mode energies at t_spec(g) (mean ± sd over pairs)", fontsize=11)
    fig.tight_layout()
    paths += _save(fig, folder, "p2_mode_energies")
    plt.close(fig)

    # gap ratio vs depth, one line per g
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    for gi, g in enumerate(g_list):
        c = colors[gi % len(colors)]
        ax.plot(layers, pl["R"][gi], marker="o", ms=3, color=c, label=f"g = {g:g} (step {summary['at_step'][gi]})")
        lo, hi = pl["R_ci_low"][gi], pl["R_ci_high"][gi]
        if np.isfinite(lo).any():
            ax.fill_between(layers, lo, hi, color=c, alpha=0.15, lw=0)
    ax.axhline(1.0, color="k", lw=0.6)
    ax.set_xlabel("block")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("R = E_trail / E_lead")
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(FormatStrFormatter("%.3g"))
    ax.yaxis.set_minor_formatter(FormatStrFormatter("%.2g"))
    ax.set_title("energy gap ratio at t_spec(g) (band: bootstrap 95% over pairs)", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    paths += _save(fig, folder, "p2_gap_ratio")
    plt.close(fig)

    # spatial coherence against random vectors
    base = summary.get("random")
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.6))
    for ax, key, label in ((axes[0], "mean_free", "mean-free fraction ‖P⊥v‖/‖v‖"),
                           (axes[1], "low_freq", "low-frequency energy share")):
        for gi, g in enumerate(g_list):
            c = colors[gi % len(colors)]
            ax.plot(layers, pl[f"lead_{key}"][gi], marker="o", ms=3, color=c, label=f"leading modes, g = {g:g}")
            ax.plot(layers, pl[f"trail_{key}"][gi], ls="--", color=c, alpha=0.7, label=f"trailing modes, g = {g:g}")
        b = (base or {}).get(f"{key}_fraction") if base else None
        if b and np.isfinite(b["mean"]):
            ax.axhspan(b["q025"], b["q975"], color="0.6", alpha=0.3, lw=0, label="random vectors, 95%")
            ax.axhline(b["mean"], color="0.3", lw=0.8)
        ax.set_xlabel("block")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(label)
        ax.legend(fontsize=7)
    axes[0].set_title("lower = more spatially coherent", fontsize=10)
    axes[1].set_title("higher = more low-frequency", fontsize=10)
    fig.suptitle(f"Are the leading difference modes spatially coherent? ({summary['n_lead']} leading modes, "
                 "band means)", fontsize=11)
    fig.tight_layout()
    paths += _save(fig, folder, "p2_coherence")
    plt.close(fig)

    # R over steps and blocks
    ps = summary["per_step"]["R"]
    fig, axes = plt.subplots(1, G, figsize=(4.4 * G + 1.2, 3.8), squeeze=False, layout="constrained")
    with np.errstate(all="ignore"):
        logR = np.log10(ps)
    finite = logR[np.isfinite(logR)]
    lim = max(0.05, float(np.abs(finite).max())) if finite.size else 1.0
    for gi, g in enumerate(g_list):
        ax = axes[0][gi]
        im = ax.imshow(logR[gi].T, aspect="auto", origin="lower", cmap="RdBu_r", vmin=-lim, vmax=lim,
                       extent=(-0.5, ps.shape[1] - 0.5, -0.5, len(layers) - 0.5), interpolation="nearest")
        ax.axvline(summary["at_step"][gi], color="k", lw=0.8, ls="--")
        ax.set_title(f"g = {g:g}", fontsize=10)
        ax.set_xlabel("sampling step")
        if gi == 0:
            ax.set_ylabel("block")
        ticks = list(range(0, len(layers), max(1, len(layers) // 7)))
        ax.set_yticks(ticks)
        ax.set_yticklabels([str(layers[t]) for t in ticks])
    fig.colorbar(im, ax=axes[0].tolist(), label="log10 R")
    fig.suptitle("log10 E_trail/E_lead over steps (dashed: step used)", fontsize=11)
    paths += _save(fig, folder, "p2_gap_ratio_steps")
    plt.close(fig)
    return paths
