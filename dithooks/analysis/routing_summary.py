"""Tables and heatmaps from a store written by the ``routing`` probe (``dithooks routing``).

Everything here reads the routing probe's arrays (``probe.routing.*``, named by
:func:`dithooks.probe_runner.probe_array_name`) back from a store through the store reader's
public API, so a summary can be redone (or a heatmap redrawn) without sampling again:
``dithooks routing --from STORE``. Part of the core (the report uses it);
``dithooks.probes.routing_summary`` re-exports it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ..errors import StoreError
from ..probe_runner import probe_array_name

__all__ = ["PREFIX", "TIGHT", "routing_table", "routing_summary", "summary_lines", "routing_heatmap"]

#: the routing probe's registered name (probes/routing.py) and the prefix of its arrays
PROBE = "routing"
PREFIX = probe_array_name(PROBE, "")

#: a non-vacuous bound is called tight when measured/bound exceeds this (the bound is then within 2x)
TIGHT = 0.5


def _load(store, name: str) -> tuple[np.ndarray, tuple[str, ...]]:
    full = probe_array_name(PROBE, name)
    if full not in store.array_names():
        raise StoreError(f"{store.path} has no {full}: was it written by `dithooks routing` "
                         "(or `dithooks probe routing`)?")
    sel = store.select(full)
    return np.asarray(sel.values, dtype=np.float64 if sel.values.dtype != bool else bool), sel.dims


def _complete_steps(store) -> np.ndarray:
    done = np.asarray(store.step_complete(), dtype=bool)
    if not done.any():
        raise StoreError(f"{store.path} holds no complete step yet")
    return np.flatnonzero(done)


def _fraction(x: np.ndarray) -> float:
    return float(x.mean()) if x.size else float("nan")


def _nanmedian(x: np.ndarray) -> float:
    x = x[np.isfinite(x)]
    return float(np.median(x)) if x.size else float("nan")


def _has(store, name: str) -> bool:
    return probe_array_name(PROBE, name) in store.array_names()


def routing_table(store, per_head: bool = False) -> list[dict[str, Any]]:
    """One row per layer (or per layer and head): medians over steps and samples, check rates.

    Columns: ``R/M`` (gated ‖R‖/‖M‖, heads combined: what the coupled dynamics sees), its minimum,
    ``R/M ungated``, ``bound holds`` (fraction of (step, sample, head) where [105] holds; a vacuous
    bound holds trivially), ``bound valid`` (fraction where it is not vacuous: denominator > 0),
    ``bound tight`` (fraction where it is valid and measured/bound > :data:`TIGHT`), median
    ``tightness`` where valid, the largest identity residual, with modes the median ``|pi|/|chi|``
    of the leading mode, and on replica runs ``lin err``: the median linearisation error
    ‖(O^a−O^b)/2 − (R+M)‖/‖(O^a−O^b)/2‖ (per-layer rows: every head, after W_O; per-head rows:
    that head, before W_O).
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
    mode_ratio = _load(store, "mode_ratio")[0] if _has(store, "mode_ratio") else None
    lin = None
    if _has(store, "linearisation_error"):
        lin = _load(store, "linearisation_error" if per_head else "layer_linearisation_error")[0]
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
                "bound tight": _fraction(take(valid) & (np.nan_to_num(take(tight)) > TIGHT)),
                "tightness": _nanmedian(take(tight)[take(valid)]),
                "max identity residual": float(np.nanmax(take(resid))),
            })
            if mode_ratio is not None:
                row["|pi|/|chi| mode 0"] = _nanmedian(mode_ratio[steps][:, li, 0])
            if lin is not None:
                row["lin err"] = _nanmedian(take(lin))
            rows.append(row)
    return rows


def _quantiles(x: np.ndarray) -> dict[str, float]:
    x = x[np.isfinite(x)]
    if not x.size:
        return {"median": float("nan"), "p90": float("nan"), "max": float("nan"), "n": 0}
    return {"median": float(np.median(x)), "p90": float(np.quantile(x, 0.9)), "max": float(x.max()),
            "n": int(x.size)}


def routing_summary(store) -> dict[str, Any]:
    """Counts and error statistics over every (step, sample, head) measurement of a routing store.

    ``bound``: ``measurements`` (all), ``valid`` (denominator of [105] > 0: the bound says something),
    ``vacuous`` (the rest: bound = inf, holds trivially), ``tight`` (valid and measured/bound >
    :data:`TIGHT`), ``holds_valid`` (valid ones where measured ≤ bound) and ``violations`` (any
    measurement where it fails: a bug), ``median_tightness`` over the valid ones.
    ``linearisation`` (replica runs; None otherwise): median, 90th percentile and max of the
    per-head error (before W_O) and of the per-layer error (every head, after W_O), and
    ``kappa``/``g`` of the run. Complete steps only.
    """
    steps = _complete_steps(store)
    valid = _load(store, "bound_valid")[0][steps].astype(bool)
    holds = _load(store, "bound_holds")[0][steps].astype(bool)
    tight = _load(store, "tightness")[0][steps]
    n = int(valid.size)
    n_valid = int(valid.sum())
    out: dict[str, Any] = {"bound": {
        "measurements": n, "valid": n_valid, "vacuous": n - n_valid,
        "tight": int((valid & (np.nan_to_num(tight) > TIGHT)).sum()), "tight_threshold": TIGHT,
        "holds_valid": int((holds & valid).sum()), "violations": int((~holds).sum()),
        "median_tightness": _nanmedian(tight[valid]),
    }}
    rep = store.meta.get("extras", {}).get("replicas") or {}
    out["kappa"], out["g"] = rep.get("kappa"), rep.get("g")
    if _has(store, "linearisation_error"):
        out["linearisation"] = {"per_head": _quantiles(_load(store, "linearisation_error")[0][steps]),
                                "per_layer": _quantiles(_load(store, "layer_linearisation_error")[0][steps])}
    else:
        out["linearisation"] = None
    return out


def summary_lines(summary: dict[str, Any]) -> list[str]:
    """The summary of :func:`routing_summary` in words (what `dithooks routing` prints)."""
    b = summary["bound"]
    n = max(1, b["measurements"])
    lines = [
        f"Appendix-B bound [105] over {b['measurements']:,} (step, sample, head) measurements: "
        f"non-vacuous (denominator > 0) on {b['valid']:,} ({b['valid'] / n:.1%}), vacuous on {b['vacuous']:,} "
        f"({b['vacuous'] / n:.1%}); tight (measured/bound > {b['tight_threshold']:g}) on {b['tight']:,} "
        f"({b['tight'] / n:.1%}); median measured/bound where valid {b['median_tightness']:.3g}.",
    ]
    if b["violations"] == 0:
        what = (f"holds on every one of the {b['valid']:,} non-vacuous measurements" if b["valid"]
                else "is vacuous everywhere: it says nothing about this run")
        lines.append(f"The bound {what} (a vacuous bound holds trivially).")
    else:
        lines.append(f"The bound FAILS on {b['violations']:,} measurements - please report this (it is a bug).")
    lin = summary.get("linearisation")
    if lin:
        h, l_ = lin["per_head"], lin["per_layer"]
        lines.append(
            f"Linearisation error ‖(O^a−O^b)/2 − (R+M)‖/‖(O^a−O^b)/2‖ at kappa={summary['kappa']:.4g}: "
            f"per head median {h['median']:.3g} (90% {h['p90']:.3g}, max {h['max']:.3g}); "
            f"per layer after W_O median {l_['median']:.3g} (max {l_['max']:.3g}).")
        if h["median"] > 0.05:
            lines.append("The split R+M is a first-order description and misses the actual coupled difference by "
                         "this much; rerun with a small --kappa (e.g. 0.01) for the linear regime.")
    return lines


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
