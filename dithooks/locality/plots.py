"""Figures of the locality measurements, each written as PNG and SVG (paper Figures 3–6)."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def save(fig, path_stem: Path) -> list[Path]:
    """Write ``<stem>.png`` and ``<stem>.svg``; returns both paths."""
    path_stem.parent.mkdir(parents=True, exist_ok=True)
    out = []
    for ext in ("png", "svg"):
        p = path_stem.with_suffix("." + ext)
        fig.savefig(p, dpi=120, bbox_inches="tight")
        out.append(p)
    _plt().close(fig)
    return out


def _edges(v: np.ndarray) -> np.ndarray:
    v = np.asarray(v, dtype=np.float64)
    if v.size == 1:
        return np.array([v[0] - 0.5, v[0] + 0.5])
    mid = (v[1:] + v[:-1]) / 2
    return np.concatenate([[v[0] - (mid[0] - v[0])], mid, [v[-1] + (v[-1] - mid[-1])]])


def gaps_figure(stem: Path, trajectories: Sequence[str], t: np.ndarray, radii: np.ndarray,
                gcond: np.ndarray, gloc: np.ndarray, gloc_u: np.ndarray, title: str) -> list[Path]:
    """Rows: G_cond(t); G_loc(t, r) heatmap (conditional score); the same for the null class.
    Columns: trajectories. ``gcond`` (traj, step), ``gloc``/``gloc_u`` (traj, step, radius): means."""
    plt = _plt()
    k = len(trajectories)
    order = np.argsort(t)
    fig, axes = plt.subplots(3, k, figsize=(4.8 * k + 0.8, 8.4), squeeze=False, sharex=True, layout="constrained")
    vmax = np.nanmax(np.concatenate([gloc.ravel(), gloc_u.ravel(), [0.0]])) or 1.0
    for j, name in enumerate(trajectories):
        ax = axes[0, j]
        ax.plot(t[order], gcond[j][order], "o-", ms=3, color="C3")
        ax.set_title(f"{name} trajectory")
        if j == 0:
            ax.set_ylabel("G_cond = ‖ε_c − ε_∅‖ / N")
        ax.grid(alpha=0.3)
        for row, data, lab in ((1, gloc, "G_loc(t, r), class c"), (2, gloc_u, "G_loc(t, r), null class ∅")):
            ax = axes[row, j]
            mesh = ax.pcolormesh(_edges(t[order]), _edges(radii), data[j][order].T, cmap="viridis",
                                 vmin=0.0, vmax=vmax, shading="flat")
            if j == 0:
                ax.set_ylabel(f"radius r\n{lab}")
            ax.set_yticks(radii)
            fig.colorbar(mesh, ax=ax, fraction=0.05)
        axes[2, j].set_xlabel("t (timestep / T; 1 = noise)")
    fig.suptitle(title, fontsize=10)
    return save(fig, stem)


def gaps_curves_figure(stem: Path, trajectories: Sequence[str], t: np.ndarray, radii: np.ndarray,
                       gcond: np.ndarray, gloc: np.ndarray, title: str) -> list[Path]:
    """G_cond and G_loc(r) against t, each divided by its own maximum (where is each large?)."""
    plt = _plt()
    k = len(trajectories)
    order = np.argsort(t)
    fig, axes = plt.subplots(1, k, figsize=(4.8 * k, 3.4), squeeze=False, layout="constrained")
    for j, name in enumerate(trajectories):
        ax = axes[0, j]
        g = gcond[j][order]
        ax.plot(t[order], g / (np.nanmax(g) or 1.0), "k-", lw=2.2, label="G_cond")
        for i, r in enumerate(radii):
            y = gloc[j][order, i]
            m = np.nanmax(y)
            if not m:  # the global radius: exactly zero
                continue
            ax.plot(t[order], y / m, "-", lw=1.2, label=f"G_loc r={r}")
        ax.set_title(f"{name} trajectory")
        ax.set_xlabel("t (1 = noise)")
        ax.set_ylabel("gap / its max")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    return save(fig, stem)


def forward_backward_figure(stem: Path, modes: Sequence[str], t: np.ndarray, error: np.ndarray,
                            sigma: np.ndarray, mse: np.ndarray, mse_sem: np.ndarray, clean_error: float,
                            title: str) -> list[Path]:
    plt = _plt()
    order = np.argsort(t)
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.8))
    for i, m in enumerate(modes):
        style = dict(lw=2.2, color="k") if m == "global" else dict(lw=1.2)
        a1.errorbar(t[order], error[i][order], yerr=sigma[i][order], marker="o", ms=3, capsize=2, label=m, **style)
        a2.errorbar(t[order], mse[i][order], yerr=mse_sem[i][order], marker="o", ms=3, capsize=2, label=m, **style)
    a1.axhline(clean_error, color="grey", ls=":", lw=1, label="clean digits")
    a1.axhline(0.9, color="grey", ls="--", lw=1, label="chance (0.9)")
    a1.set_xlabel("noise level t (1 = noise)")
    a1.set_ylabel("classifier error (±1σ binomial)")
    a2.set_xlabel("noise level t (1 = noise)")
    a2.set_ylabel("per-pixel MSE (±1 s.e.)")
    for a in (a1, a2):
        a.grid(alpha=0.3)
        a.legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    return save(fig, stem)


def windowed_figure(stem: Path, centers: np.ndarray, error: np.ndarray, sigma: np.ndarray, fd: np.ndarray,
                    fd_sigma: np.ndarray, refs: dict[str, tuple[float, float]], title: str) -> list[Path]:
    """Error and FD (to always_on) against the window centre; reference runs as lines.
    ``refs``: name -> (error, fd)."""
    plt = _plt()
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.8))
    a1.errorbar(centers, error, yerr=sigma, marker="o", ms=4, capsize=2, color="C0", label="window")
    a2.errorbar(centers, fd, yerr=fd_sigma, marker="o", ms=4, capsize=2, color="C1", label="window")
    for i, (name, (e, f)) in enumerate(refs.items()):
        a1.axhline(e, color=f"C{i + 2}", ls="--", lw=1, label=name)
        if name != "always_on":
            a2.axhline(f, color=f"C{i + 2}", ls="--", lw=1, label=name)
    a1.set_ylabel("classifier error (±1σ binomial)")
    a2.set_ylabel("Fréchet distance to always_on (±1σ bootstrap)")
    for a in (a1, a2):
        a.set_xlabel("window centre t (1 = noise)")
        a.grid(alpha=0.3)
        a.legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    return save(fig, stem)


def sample_grid(path: Path, images: np.ndarray, row_labels: Sequence[str]) -> Path:
    """(rows, cols, C, H, W) images in [-1, 1] as one PNG with a label per row."""
    plt = _plt()
    rows, cols = images.shape[:2]
    fig, axes = plt.subplots(rows, cols, figsize=(0.55 * cols + 1.2, 0.55 * rows + 0.3), squeeze=False)
    for i in range(rows):
        for j in range(cols):
            ax = axes[i, j]
            img = (np.clip(images[i, j], -1, 1) + 1) / 2
            ax.imshow(img[0] if img.shape[0] == 1 else np.moveaxis(img[:3], 0, -1), cmap="gray", vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
        axes[i, 0].set_ylabel(row_labels[i], rotation=0, ha="right", va="center", fontsize=7)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path
