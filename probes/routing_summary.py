"""Tables and heatmaps from a store written by the ``routing`` probe (``dithooks routing``).

Everything here reads ``probe.routing.*`` arrays back from a store, so a summary can be redone
(or a heatmap redrawn) without sampling again: ``dithooks routing --from STORE``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from dithooks.errors import StoreError

PREFIX = "probe.routing."


def _load(store, name: str) -> tuple[np.ndarray, tuple[str, ...]]:
    full = PREFIX + name
    if full not in store.array_names():
        raise StoreError(f"{store.path} has no {full}: was it written by `dithooks routing` "
                         "(or `dithooks probe routing`)?")
    sel = store.select(full)
    return np.asarray(sel.values, dtype=np.float64 if sel.values.dtype != bool else bool), sel.dims


def _complete_steps(store) -> np.ndarray:
    done = np.asarray(store.group["step_complete"][...])
    if not done.any():
        raise StoreError(f"{store.path} holds no complete step yet")
    return np.flatnonzero(done)


def _fraction(x: np.ndarray) -> float:
    return float(x.mean()) if x.size else float("nan")


def _nanmedian(x: np.ndarray) -> float:
    x = x[np.isfinite(x)]
    return float(np.median(x)) if x.size else float("nan")


def routing_table(store, per_head: bool = False) -> list[dict[str, Any]]:
    """One row per layer (or per layer and head): medians over steps and samples, check rates.

    Columns: ``R/M`` (gated ‖R‖/‖M‖, heads combined: what the coupled dynamics sees), its minimum,
    ``R/M ungated``, ``bound holds`` (fraction of (step, sample, head) where [105] holds),
    ``bound valid`` (fraction where it is not vacuous), median ``tightness`` where valid, the
    largest identity residual, and with modes the median ``|pi|/|chi|`` of the leading mode.
    """
    steps = _complete_steps(store)
    layers = store.coord("layer").tolist()
    if per_head:
        dom, dims = _load(store, "routing_dominance_gated")
        ung, _ = _load(store, "routing_dominance")
    else:
        dom, dims = _load(store, "layer_routing_dominance_gated")
        ung, _ = _load(store, "layer_routing_dominance")
    holds, hdims = _load(store, "bound_holds")
    valid, _ = _load(store, "bound_valid")
    tight, _ = _load(store, "tightness")
    resid = np.maximum.reduce([_load(store, k)[0] for k in ("stochasticity_residual", "dA_row_sum_residual",
                                                            "constant_preservation_residual")])
    mode_ratio = _load(store, "mode_ratio")[0] if PREFIX + "mode_ratio" in store.array_names() else None
    g, _ = _load(store, "g")
    heads = holds.shape[-1]
    rows = []
    for li, layer in enumerate(layers):
        for h in range(heads) if per_head else [None]:
            def take(x, per_head_array=True):
                x = x[steps][:, li]
                return x[..., h] if (h is not None and per_head_array) else x
            row: dict[str, Any] = {"layer": int(layer)}
            if h is not None:
                row["head"] = h
            d = take(dom)
            row.update({
                "g": _nanmedian(g[steps][:, li]),
                "R/M": _nanmedian(d), "R/M min": float(np.nanmin(d)) if np.isfinite(d).any() else float("nan"),
                "R/M ungated": _nanmedian(take(ung)),
                "bound holds": _fraction(take(holds)), "bound valid": _fraction(take(valid)),
                "tightness": _nanmedian(take(tight)[take(valid)]),
                "max identity residual": float(np.nanmax(take(resid))),
            })
            if mode_ratio is not None:
                row["|pi|/|chi| mode 0"] = _nanmedian(mode_ratio[steps][:, li, 0])
            rows.append(row)
    return rows


def routing_heatmap(store, path: str | Path, gated: bool = True) -> Path:
    """PNG/SVG heatmap of log10 ‖R‖/‖M‖ (heads combined, median over samples): layer × step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import TwoSlopeNorm

    dom, dims = _load(store, "layer_routing_dominance_gated" if gated else "layer_routing_dominance")
    steps = _complete_steps(store)
    batch_axes = tuple(range(2, dom.ndim))
    with np.errstate(all="ignore"):
        grid = np.log10(np.nanmedian(dom[steps], axis=batch_axes)) if batch_axes else np.log10(dom[steps])
    layers = store.coord("layer").tolist()
    g = store.meta.get("extras", {}).get("replicas", {}).get("g", 0.0)
    lim = max(0.1, float(np.nanmax(np.abs(grid[np.isfinite(grid)]))) if np.isfinite(grid).any() else 1.0)
    fig, ax = plt.subplots(figsize=(max(5.0, 0.12 * len(steps) + 3), max(3.5, 0.16 * len(layers) + 1.5)))
    im = ax.imshow(grid.T, aspect="auto", origin="lower", cmap="RdBu_r", norm=TwoSlopeNorm(0.0, -lim, lim),
                   extent=(steps[0] - 0.5, steps[-1] + 0.5, -0.5, len(layers) - 0.5), interpolation="nearest")
    ax.set_yticks(range(len(layers)))
    ax.set_yticklabels([str(v) for v in layers], fontsize=6 if len(layers) > 16 else 8)
    ax.set_xlabel("sampling step")
    ax.set_ylabel("block")
    which = "‖R‖/‖M‖ (gated)" if gated else "‖AδV‖/‖δA V‖ (ungated)"
    ax.set_title(f"routing dominance log10 {which}, g = {g}")
    fig.colorbar(im, ax=ax, label="log10 ratio  (> 0: routing dominates)")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
