"""Tables, notes and figures of a finished (or partial) locality store, written into its metadata.

``summarize(path)`` reads a store of any of the three kinds, computes the tables the CLI prints,
writes the figures under ``STORE/figures/`` and stores ``{"tables", "figures", "notes"}`` as
``attrs["dithooks"]["summary"]`` (the convention ``dithooks report`` renders).

Window definitions used in the notes (stated so they can be checked): the *half-max window* of a
curve over the t grid is the contiguous run of grid points around its maximum where the curve is
at least half that maximum; the *overlap* of two windows is |intersection| / |union| of their
t intervals. The forward-backward threshold ``t_half`` is where the error first reaches half the
chance error (0.45 for 10 classes), linearly interpolated between levels.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ..errors import StoreError
from . import plots
from .store import CellStore, read_meta


def half_max_window(t: np.ndarray, y: np.ndarray) -> tuple[float, float, float]:
    """(t at the maximum, lower t, upper t) of the contiguous ≥ max/2 run around the maximum."""
    order = np.argsort(t)
    t, y = np.asarray(t, float)[order], np.asarray(y, float)[order]
    if not np.isfinite(y).any():
        return (np.nan, np.nan, np.nan)
    k = int(np.nanargmax(y))
    half = y[k] / 2
    lo = k
    while lo > 0 and y[lo - 1] >= half:
        lo -= 1
    hi = k
    while hi < len(y) - 1 and y[hi + 1] >= half:
        hi += 1
    return float(t[k]), float(t[lo]), float(t[hi])


def overlap(a: tuple[float, float], b: tuple[float, float]) -> float:
    """|a ∩ b| / |a ∪ b| of two closed intervals (1 if both are the same single point)."""
    lo, hi = max(a[0], b[0]), min(a[1], b[1])
    inter = max(0.0, hi - lo)
    union = max(a[1], b[1]) - min(a[0], b[0])
    if union <= 0:
        return 1.0 if inter >= 0 and a == b else 0.0
    return inter / union


def threshold_crossing(t: np.ndarray, y: np.ndarray, level: float) -> float:
    """Smallest t where y (ordered by t) first reaches ``level``, interpolated; NaN if never."""
    order = np.argsort(t)
    t, y = np.asarray(t, float)[order], np.asarray(y, float)[order]
    for i in range(len(t)):
        if np.isfinite(y[i]) and y[i] >= level:
            if i == 0 or not np.isfinite(y[i - 1]):
                return float(t[i])
            return float(t[i - 1] + (level - y[i - 1]) * (t[i] - t[i - 1]) / (y[i] - y[i - 1]))
    return float("nan")


def _r(x, nd=4):
    return None if x is None or not np.isfinite(x) else round(float(x), nd)


def _open(path: Path) -> CellStore:
    import zarr

    return CellStore(path, zarr.open_group(str(path), mode="r+", zarr_format=3))


def summarize(path: str | Path, write: bool = True, figures: bool = True) -> dict[str, Any]:
    """Tables and notes of a store (and its figures unless ``figures=False``); ``write`` puts
    them into the store's metadata."""
    path = Path(path)
    kind = read_meta(path).get("kind")
    store = _open(path)
    fn = {"locality-gaps": summarize_gaps, "locality-forward-backward": summarize_forward_backward,
          "locality-windowed": summarize_windowed}.get(kind)
    if fn is None:
        raise StoreError(f"{path} is a {kind!r} store, not a locality measurement")
    summary = fn(store, figures)
    if write:
        store.update_meta(summary=summary)
        store.consolidate()
    return summary


def _title(store: CellStore, what: str) -> str:
    m = store.meta
    return f"{what} — {m.get('model')} ({m.get('num_tokens')} tokens)"


# -- gaps ---------------------------------------------------------------------------------------
def summarize_gaps(store: CellStore, figures: bool = True) -> dict[str, Any]:
    done = store.done_mask()
    trajs = [str(s) for s in store.coord("trajectory")]
    t, ts, radii = store.coord("t"), store.coord("timestep"), store.coord("radius")
    mask3 = done[:, :, None]
    gcond = np.where(done, store.read("gcond").mean(-1), np.nan)
    gloc = np.where(mask3, store.read("gloc").mean(-1), np.nan)
    gloc_u = np.where(mask3, store.read("gloc_uncond").mean(-1), np.nan)
    epsn = np.where(done, store.read("eps_norm").mean(-1), np.nan)
    rows, rows_u = [], []
    for k, tr in enumerate(trajs):
        for j in np.argsort(-t):
            if not done[k, j]:
                continue
            rows.append({"trajectory": tr, "t": _r(t[j], 3), "timestep": int(ts[j]), "G_cond": _r(gcond[k, j], 5),
                         **{f"G_loc r={r}": _r(gloc[k, j, i], 5) for i, r in enumerate(radii)},
                         "|eps|/N": _r(epsn[k, j], 4)})
            rows_u.append({"trajectory": tr, "t": _r(t[j], 3),
                           **{f"G_loc,null r={r}": _r(gloc_u[k, j, i], 5) for i, r in enumerate(radii)}})
    side = int(store.meta.get("grid_side", 0))
    notes, windows = [], []
    for k, tr in enumerate(trajs):
        if not done[k].any():
            continue
        pc, lo, hi = half_max_window(t[done[k]], gcond[k][done[k]])
        notes.append(f"{tr}: G_cond peaks at t={pc:.3f}, half-max window t in [{lo:.3f}, {hi:.3f}]")
        windows.append({"trajectory": tr, "curve": "G_cond", "peak t": _r(pc, 3), "window lo": _r(lo, 3),
                        "window hi": _r(hi, 3), "overlap with G_cond": 1.0, "corr with G_cond": 1.0})
        for i, r in enumerate(radii):
            y = gloc[k, :, i][done[k]]
            if side and r >= side - 1:
                notes.append(f"{tr}: r={r} covers the {side}x{side} grid: G_loc max {np.nanmax(y):.3g} "
                             f"({'exactly 0, as it must be' if np.nanmax(y) == 0 else 'NOT 0 - please report'})")
                continue
            p, a, b = half_max_window(t[done[k]], y)
            ov = overlap((lo, hi), (a, b))
            corr = float(np.corrcoef(gcond[k][done[k]], y)[0, 1]) if y.size > 2 else np.nan
            windows.append({"trajectory": tr, "curve": f"G_loc r={r}", "peak t": _r(p, 3), "window lo": _r(a, 3),
                            "window hi": _r(b, 3), "overlap with G_cond": _r(ov, 3),
                            "corr with G_cond": _r(corr, 3)})
            notes.append(f"{tr}: G_loc(r={r}) peaks at t={p:.3f}, half-max window [{a:.3f}, {b:.3f}], "
                         f"overlap with G_cond's {ov:.2f}, correlation over t {corr:.2f}")
    figs = []
    fig_dir = store.path / "figures"
    if figures and done.any():
        title = _title(store, "conditioning and locality gaps")
        plots.gaps_figure(fig_dir / "gaps", trajs, t, radii, gcond, gloc, gloc_u, title)
        plots.gaps_curves_figure(fig_dir / "gaps_curves", trajs, t, radii, gcond, gloc, title)
        figs = ["figures/gaps.svg", "figures/gaps_curves.svg"]
    return {"tables": [{"title": "critical windows (half-max) of the gaps over t", "rows": windows},
                       {"title": "gaps, mean over samples (G = ‖Δε‖₂ / N per sample)", "rows": rows},
                       {"title": "locality gaps of the unconditional score", "rows": rows_u}],
            "figures": figs, "notes": notes}


# -- forward-backward -------------------------------------------------------------------------------
def summarize_forward_backward(store: CellStore, figures: bool = True) -> dict[str, Any]:
    from .forward_backward import binomial_sigma, fb_metrics

    m = fb_metrics(store)
    modes = [str(s) for s in store.coord("mode")]
    t, steps = store.coord("t"), store.coord("denoise_steps")
    label, clean = store.coord("label"), store.coord("clean_pred")
    n = len(label)
    clean_err = float((clean != label).mean())
    rows = []
    for i, mode in enumerate(modes):
        for j in np.argsort(t):
            if np.isfinite(m["error"][i, j]):
                rows.append({"mode": mode, "t": _r(t[j], 3), "denoise steps": int(steps[j]),
                             "error": _r(m["error"][i, j]), "±1σ": _r(m["sigma"][i, j]),
                             "MSE": _r(m["mse"][i, j], 5)})
    notes = [f"classifier error on the {n} clean held-out digits: {clean_err:.4f} "
             f"± {float(binomial_sigma(clean_err, n)):.4f}"]
    thr = []
    for i, mode in enumerate(modes):
        th = threshold_crossing(t, m["error"][i], 0.45)
        thr.append({"mode": mode, "t_half (error reaches 0.45)": _r(th, 3),
                    "error at largest t": _r(m["error"][i][np.argmax(t)])})
        notes.append(f"{mode}: error reaches 0.45 (half of chance) at t={th:.3f}" if np.isfinite(th)
                     else f"{mode}: error never reaches 0.45 on this grid")
    figs = []
    if figures and np.isfinite(m["error"]).any():
        plots.forward_backward_figure(store.path / "figures" / "forward_backward", modes, t, m["error"],
                                      m["sigma"], m["mse"], m["mse_sem"], clean_err,
                                      _title(store, "forward-backward (unconditional denoising)"))
        figs.append("figures/forward_backward.svg")
    return {"tables": [{"title": "forward-backward thresholds", "rows": thr},
                       {"title": "forward-backward: classifier error and per-pixel MSE", "rows": rows}],
            "figures": figs, "notes": notes}


# -- windowed -------------------------------------------------------------------------------------
def summarize_windowed(store: CellStore, figures: bool = True) -> dict[str, Any]:
    from .windowed import windowed_metrics

    real = None
    try:
        real = _real_features(store)
    except Exception:  # no classifier or data for this model: FD to real data is left out
        real = None
    mt = windowed_metrics(store, real)
    names = mt["names"]
    t0, t1, ins = store.coord("t0"), store.coord("t1"), store.coord("steps_inside")
    rows = []
    for w, name in enumerate(names):
        if not np.isfinite(mt["error"][w]):
            continue
        rows.append({"window": name, "t0": _r(t0[w], 3), "t1": _r(t1[w], 3), "steps inside": int(ins[w]),
                     "error": _r(mt["error"][w]), "±1σ": _r(mt["sigma"][w]),
                     "FD to always_on": _r(mt["fd"][w], 3), "FD ±1σ": _r(mt["fd_sigma"][w], 3),
                     "FD to real": _r(mt["fd_real"][w], 3)})
    scan = [w for w, nm in enumerate(names) if nm.startswith("t0=")]
    notes = []
    inside = store.meta.get("inside")
    what = ("conditioning inside the window, null class outside" if inside == "conditioning" else
            f"global attention + conditioning inside, radius {store.meta.get('radius')} "
            f"{'conditional' if store.meta.get('outside_cond') else 'unconditional'} outside")
    notes.append(f"{what}; window width {store.meta.get('width')} in t, {store.meta.get('steps')} DDIM steps")
    centers = np.array([(t0[w] + t1[w]) / 2 for w in scan])
    ok = [i for i, w in enumerate(scan) if np.isfinite(mt["error"][w])]
    if ok:
        e = np.array([mt["error"][scan[i]] for i in ok])
        f = np.array([mt["fd"][scan[i]] for i in ok])
        be, bf = ok[int(np.argmin(e))], ok[int(np.nanargmin(f))] if np.isfinite(f).any() else None
        notes.append(f"lowest error {e.min():.3f} for window {names[scan[be]]} (t in [{t0[scan[be]]:.2f}, {t1[scan[be]]:.2f}])")
        if bf is not None:
            notes.append(f"lowest FD to always_on {np.nanmin(f):.3f} for window {names[scan[bf]]} "
                         f"(t in [{t0[scan[bf]]:.2f}, {t1[scan[bf]]:.2f}])")
    figs = []
    if figures and ok:
        refs = {nm: (float(mt["error"][w]), float(mt["fd"][w])) for w, nm in enumerate(names)
                if not nm.startswith("t0=") and np.isfinite(mt["error"][w])}
        sel = [scan[i] for i in ok]
        plots.windowed_figure(store.path / "figures" / "windowed", centers[ok], mt["error"][sel], mt["sigma"][sel],
                              mt["fd"][sel], mt["fd_sigma"][sel], refs,
                              _title(store, f"windowed {inside}"))
        figs.append("figures/windowed.svg")
        done = [w for w in range(len(names)) if np.isfinite(mt["error"][w])]
        res = store.read("result")[done][:, :10]
        plots.sample_grid(store.path / "figures" / "windowed_samples.png", res, [names[w] for w in done])
        figs.append("figures/windowed_samples.png")
    return {"tables": [{"title": f"windowed {inside}: error and Fréchet distance (classifier features)",
                        "rows": rows}], "figures": figs, "notes": notes}


def _real_features(store: CellStore) -> np.ndarray | None:
    from .digits import digits_judge, heldout_digits

    if store.meta.get("features") != "classifier":
        return None
    judge = digits_judge(store.meta.get("model"))
    x, _ = heldout_digits()
    return judge.features(x)
