"""Protocol figures (matplotlib, PNG and SVG), written inside the store under ``figures/``.

- ``commitment``: semantic agreement vs s*, median over pairs (bars: interquartile range) with the
  sigmoid fit, one line per g, the shared-noise control dashed (the paper's Figures 2-5);
- ``coarse_fine``: normalised D_coarse (blue) and D_fine (red) vs s*, one panel per g and the
  control, fits and midpoints marked (Figures 6-8);
- ``tspec_vs_g``: t_spec, s_coarse, s_fine with 95 % CIs vs g, and the gap Δ_out = s_fine - s_coarse.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from .fits import SigmoidFit


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def _save(fig, folder: Path, name: str) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    for ext in ("png", "svg"):
        fig.savefig(folder / f"{name}.{ext}", dpi=130, bbox_inches="tight")
    _plt().close(fig)
    return [f"figures/{name}.svg"]


def _fit_of(entry: dict) -> SigmoidFit | None:
    if entry.get("reason") or entry.get("midpoint") is None or not math.isfinite(entry["midpoint"]):
        return None
    return SigmoidFit(entry["midpoint"], entry["width"], entry["start"], entry["end"], entry["rmse"], True, None)


def _quartiles(values: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(median, q25, q75) over pairs of a ``(s_star, pair)`` array."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        q = np.nanpercentile(values, [50, 25, 75], axis=-1)
    return q[0], q[1], q[2]


def _curves(group, summary: dict) -> dict[str, dict[str, np.ndarray]]:
    req = summary["request"]
    out = {}
    for i, g in enumerate(req["g"]):
        out[f"{g:g}"] = {q: np.asarray(group[q][...])[i] for q in ("agreement", "d_coarse_norm", "d_fine_norm")}
    if req.get("control"):
        out["control"] = {q: np.asarray(group["control_" + q][...]) for q in ("agreement", "d_coarse_norm", "d_fine_norm")}
    return out


def protocol1_figures(store_path, summary: dict, extra_dir: str | Path | None = None) -> list[str]:
    """Write the three Protocol I figures; returns their SVG paths relative to the store."""
    import zarr

    plt = _plt()
    store_path = Path(store_path)
    group = zarr.open_group(str(store_path), mode="r", use_consolidated=False)
    curves = _curves(group, summary)
    fits = summary["fits"]
    x = np.asarray(summary["s_star"], dtype=float)
    xs = np.linspace(x.min(), x.max(), 300)
    steps = summary["request"]["steps"]
    folder = store_path / "figures"
    names = [n for n in curves if n != "control"]
    cmap = plt.get_cmap("viridis")
    colour = {n: cmap(0.1 + 0.8 * k / max(1, len(names) - 1)) for k, n in enumerate(names)}
    colour["control"] = "black"
    out: list[str] = []

    # commitment curves
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for n, c in curves.items():
        med, q1, q3 = _quartiles(c["agreement"])
        label = "control (shared noise, g = 0)" if n == "control" else f"g = {n}"
        style = "--" if n == "control" else "-"
        ax.errorbar(x, med, yerr=[med - q1, q3 - med], fmt="o", ms=3.5, color=colour[n], alpha=0.8, capsize=2)
        f = _fit_of(fits[n]["agreement"])
        if f is not None:
            ax.plot(xs, f(xs), style, color=colour[n], label=f"{label}: t_spec {f.midpoint:.1f}")
            ax.axvline(f.midpoint, color=colour[n], ls=":", lw=0.8)
        else:
            ax.plot(x, med, style, color=colour[n], lw=0.8, alpha=0.6, label=f"{label}: no fit")
    ax.set_xlabel(f"s* (steps coupled, of {steps})")
    ax.set_ylabel("semantic agreement (cosine, median over pairs)")
    ax.set_title("Protocol I: commitment curves")
    ax.legend(fontsize=7, loc="best")
    out += _save(fig, folder, "commitment")

    # coarse / fine
    n_panels = len(curves)
    cols = min(3, n_panels)
    rows = math.ceil(n_panels / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.0 * cols, 3.0 * rows), squeeze=False, sharex=True, sharey=True)
    for k, (n, c) in enumerate(curves.items()):
        ax = axes[k // cols][k % cols]
        for q, col, lab in (("d_coarse", "tab:blue", "coarse"), ("d_fine", "tab:red", "fine")):
            med, q1, q3 = _quartiles(c[q + "_norm"])
            ax.errorbar(x, med, yerr=[med - q1, q3 - med], fmt="o", ms=3, color=col, alpha=0.8, capsize=2)
            f = _fit_of(fits[n][q])
            if f is not None:
                ax.plot(xs, f(xs), color=col, label=f"{lab}: {f.midpoint:.1f}")
                ax.axvline(f.midpoint, color=col, ls=":", lw=0.8)
            else:
                ax.plot(x, med, color=col, lw=0.8, alpha=0.6, label=f"{lab}: no fit")
        gap = fits[n]["gap"]["midpoint"]
        gap_txt = "" if gap is None or not math.isfinite(gap) else f", gap {gap:.1f}"
        ax.set_title(("control" if n == "control" else f"g = {n}") + gap_txt, fontsize=9)
        ax.legend(fontsize=7)
        ax.axhline(1.0, color="grey", lw=0.5)
    for k in range(n_panels, rows * cols):
        axes[k // cols][k % cols].axis("off")
    for ax in axes[-1]:
        ax.set_xlabel("s* (steps)")
    for row in axes:
        row[0].set_ylabel("D / D(s* = 0)")
    fig.suptitle("Protocol I: coarse (blue) and fine (red) discrepancies", fontsize=10)
    out += _save(fig, folder, "coarse_fine")

    # t_spec and gaps vs g
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.6))
    gs = np.asarray([float(n) for n in names])
    for q, col, lab, dx in (("agreement", "black", "t_spec", 0.0), ("d_coarse", "tab:blue", "s_coarse", -0.01),
                            ("d_fine", "tab:red", "s_fine", 0.01)):
        v = np.array([_nan(fits[n][q]["midpoint"]) for n in names])
        lo = np.array([_nan(fits[n][q]["ci_low"]) for n in names])
        hi = np.array([_nan(fits[n][q]["ci_high"]) for n in names])
        ax1.errorbar(gs + dx, v, yerr=[_span(v - lo), _span(hi - v)], fmt="o-", color=col, capsize=3, label=lab)
        if "control" in fits and math.isfinite(_nan(fits["control"][q]["midpoint"])):
            ax1.axhline(fits["control"][q]["midpoint"], color=col, ls="--", lw=0.8)
    ax1.set_xlabel("coupling g")
    ax1.set_ylabel("midpoint (steps)")
    ax1.set_title("t_spec, s_coarse, s_fine (dashed: control)", fontsize=9)
    ax1.legend(fontsize=7)
    v = np.array([_nan(fits[n]["gap"]["midpoint"]) for n in names])
    lo = np.array([_nan(fits[n]["gap"]["ci_low"]) for n in names])
    hi = np.array([_nan(fits[n]["gap"]["ci_high"]) for n in names])
    ax2.errorbar(gs, v, yerr=[_span(v - lo), _span(hi - v)], fmt="o-", color="purple", capsize=3)
    ax2.axhline(0, color="grey", lw=0.5)
    ax2.set_xlabel("coupling g")
    ax2.set_ylabel("gap s_fine - s_coarse (steps)")
    ax2.set_title("output gap with 95% CI", fontsize=9)
    out += _save(fig, folder, "tspec_vs_g")

    if extra_dir is not None:
        import shutil

        extra = Path(extra_dir)
        extra.mkdir(parents=True, exist_ok=True)
        for p in folder.iterdir():
            shutil.copy2(p, extra / p.name)
    return out


def _nan(v) -> float:
    return math.nan if v is None else float(v)


def _span(v: np.ndarray) -> np.ndarray:
    """Error-bar lengths: NaN (no CI) drawn as none."""
    return np.where(np.isfinite(v), np.maximum(v, 0), 0)
