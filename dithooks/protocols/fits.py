"""Sigmoid fits to commitment curves and bootstrap confidence intervals over seed pairs.

A commitment curve is a value per intervention step s* (semantic agreement, or a normalised
discrepancy), measured on M seed pairs: an array ``(pair, s_star)``. Protocol I fits

    y(s) = start + (end - start) * sigmoid((s - midpoint) / width),     width > 0

to the median over pairs. ``end > start`` is a rising curve (agreement), ``end < start`` a falling
one (discrepancies); ``midpoint`` is where the curve is half-way between its two plateaus (the
paper's "inflection point" / "50 % threshold"). The 95 % interval resamples the pairs with
replacement, takes the median curve of each resample and refits it.

A fit never invents a number: a flat curve, a fit that does not converge, or a midpoint outside
the sampled range of s* gives ``NaN`` with the reason in :attr:`SigmoidFit.reason`.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass
from typing import Mapping, Sequence

import numpy as np

#: Smallest change of a curve (in its own units: cosine similarity, or discrepancy relative to
#: the independent baseline) that can count as a transition at all. The main test of flatness is
#: statistical (``noise``, see :func:`fit_curves`); this floor only catches numerically flat curves.
MIN_RANGE = 1e-4
#: A curve is flat unless its median changes by more than this many bootstrap standard errors.
NOISE_FACTOR = 2.0


@dataclass(frozen=True)
class SigmoidFit:
    """One fit. ``midpoint`` etc. are NaN when ``ok`` is False; ``reason`` says why."""

    midpoint: float = math.nan
    width: float = math.nan
    start: float = math.nan
    end: float = math.nan
    rmse: float = math.nan
    ok: bool = False
    reason: str | None = None

    def as_dict(self) -> dict:
        return asdict(self)

    def __call__(self, s) -> np.ndarray:
        return sigmoid(np.asarray(s, dtype=float), self.start, self.end, self.midpoint, self.width)


def sigmoid(s, start: float, end: float, midpoint: float, width: float) -> np.ndarray:
    z = (np.asarray(s, dtype=float) - midpoint) / width
    return start + (end - start) * 0.5 * (1.0 + np.tanh(0.5 * z))  # = logistic(z), overflow-free


def failed(reason: str) -> SigmoidFit:
    return SigmoidFit(reason=reason)


def median_curve(values: np.ndarray) -> np.ndarray:
    """Median over pairs (axis 0) of a ``(pair, s_star)`` array, ignoring NaNs."""
    values = np.asarray(values, dtype=float)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # an all-NaN column stays NaN
        return np.nanmedian(values, axis=0)


#: Grid of the fit: midpoints every (s* range)/MID_STEPS over the sampled range widened by half
#: of it on each side, widths log-spaced from 1e-3 to 2 times the range (WIDTHS values); then a
#: finer grid (REFINE x REFINE) around the best point, 10 times finer in both.
MID_STEPS, WIDTHS, REFINE = 200, 40, 21


def _centred(basis: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    bc = basis - basis.mean(-1, keepdims=True)
    sbb = (bc ** 2).sum(-1)
    ok = sbb > 1e-12 * basis.shape[-1]  # a basis constant on the sampled points explains nothing
    return bc, sbb, ok


def _sse(Yc: np.ndarray, centred: tuple) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For rows ``Yc`` (b, S) and centred sigmoid bases (K, S) or (b, K, S) (:func:`_centred`):
    the residual sum of squares of the least-squares ``y ~ start + slope * basis`` (b, K)."""
    bc, sbb, ok = centred
    yc = Yc - Yc.mean(1, keepdims=True)
    syy = (yc ** 2).sum(1)
    sby = yc @ bc.T if bc.ndim == 2 else np.einsum("bs,bks->bk", yc, bc)
    sse = np.where(ok, np.maximum(syy[:, None] - sby ** 2 / np.where(ok, sbb, 1.0), 0.0), np.inf)
    return sse, syy, ok


def _pick(sse: np.ndarray, syy: np.ndarray, m: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Best (midpoint, width) per row; among equally good midpoints, their median."""
    best = sse.min(1, keepdims=True)
    ties = sse <= best * (1 + 1e-9) + 1e-12 * np.maximum(syy[:, None], 1e-300)
    k = sse.argmin(1)
    mm = np.broadcast_to(m, sse.shape)
    mid = np.array([np.median(mm[i][t]) for i, t in enumerate(ties)])
    return mid, np.broadcast_to(w, sse.shape)[np.arange(len(k)), k]


def _grid_fit(x: np.ndarray, Y: np.ndarray) -> np.ndarray:
    """Least-squares sigmoids through each row of ``Y`` ``(B, S)`` (finite values), by variable
    projection: for every (midpoint, width) on a grid the plateaus are a linear least-squares
    problem with a closed form; the best grid point wins, then a finer grid around it. Among
    equally good midpoints (a step between two samples fits anywhere between them) the median
    is taken. Returns ``(B, 5)``: start, end, midpoint, width, sse."""
    xr = float(x[-1] - x[0])
    dm = xr / MID_STEPS
    mids = np.linspace(x[0] - xr / 2, x[-1] + xr / 2, 2 * MID_STEPS + 1)
    widths = np.geomspace(xr * 1e-3, 2 * xr, WIDTHS)
    dlogw = math.log(widths[1] / widths[0])
    m, w = (a.ravel() for a in np.meshgrid(mids, widths, indexing="ij"))
    centred = _centred(sigmoid(x[None, :], 0.0, 1.0, m[:, None], w[:, None]))
    out = np.empty((len(Y), 5))
    off = np.linspace(-1, 1, REFINE)
    for lo in range(0, len(Y), 16):
        Yc = Y[lo:lo + 16]
        sse, syy, _ = _sse(Yc, centred)
        mid, width = _pick(sse, syy, m, w)
        # the finer grid around each row's best point
        m2 = (mid[:, None, None] + dm * off[None, :, None]).repeat(REFINE, 2).reshape(len(Yc), -1)
        w2 = (width[:, None, None] * np.exp(dlogw * off[None, None, :])).repeat(REFINE, 1).reshape(len(Yc), -1)
        b2 = sigmoid(x[None, None, :], 0.0, 1.0, m2[..., None], w2[..., None])
        sse2, syy2, _ = _sse(Yc, _centred(b2))
        mid, width = _pick(sse2, syy2, m2, w2)
        bm = sigmoid(x[None, :], 0.0, 1.0, mid[:, None], width[:, None])
        bmc = bm - bm.mean(1, keepdims=True)
        sbb = (bmc ** 2).sum(1)
        ym = Yc.mean(1, keepdims=True)
        slope = np.where(sbb > 0, ((Yc - ym) * bmc).sum(1) / np.where(sbb > 0, sbb, 1.0), 0.0)  # end - start
        start = ym[:, 0] - slope * bm.mean(1)
        resid = Yc - (start[:, None] + slope[:, None] * bm)
        out[lo:lo + 16] = np.stack([start, start + slope, mid, width, (resid ** 2).sum(1)], 1)
    return out


def _judge(x: np.ndarray, p: np.ndarray, min_range: float, noise: float) -> SigmoidFit:
    """A fitted row ``p`` (start, end, midpoint, width, sse) as a SigmoidFit, or NaN and why."""
    start, end, mid, width, sse = (float(v) for v in p)
    if not all(math.isfinite(v) for v in (start, end, mid, width)):
        return failed("the sigmoid fit did not converge")
    floor = max(min_range, NOISE_FACTOR * noise)
    if abs(end - start) < floor:
        return failed(f"flat fit: the fitted plateaus differ by only {abs(end - start):.3g} (< {floor:.3g})")
    if not x[0] <= mid <= x[-1]:
        return failed(f"the fitted midpoint {mid:.3g} lies outside the sampled s* range "
                      f"{x[0]:g}-{x[-1]:g}: the transition is not resolved")
    return SigmoidFit(mid, width, start, end, math.sqrt(sse / len(x)), True, None)


def _precheck(x: np.ndarray, y: np.ndarray, min_range: float, noise: float) -> str | None:
    if len(x) < 4:
        return f"only {len(x)} finite points; a 4-parameter sigmoid needs at least 4"
    if x[-1] <= x[0]:
        return "all points at the same s*"
    yr = float(y.max() - y.min())
    if yr < min_range:
        return f"flat curve: the median changes by only {yr:.3g} over s* {x[0]:g}-{x[-1]:g} (< {min_range:g})"
    if yr < NOISE_FACTOR * noise:
        return (f"flat within noise: the median changes by {yr:.3g} over s* {x[0]:g}-{x[-1]:g}, "
                f"less than {NOISE_FACTOR:g} bootstrap standard errors ({noise:.3g} each)")
    return None


def _sorted_finite(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    keep = np.isfinite(x) & np.isfinite(y)
    x, y = x[keep], y[keep]
    order = np.argsort(x, kind="stable")
    return x[order], y[order]


def fit_sigmoid(x: Sequence[float], y: Sequence[float], *, min_range: float = MIN_RANGE,
                noise: float = 0.0) -> SigmoidFit:
    """Least-squares 4-parameter sigmoid through the finite points ``(x, y)``.

    Degenerate cases come back as NaN with a reason (see the module docstring): fewer than 4
    points, a flat curve (values, or fitted plateaus, differing by less than ``min_range`` or less
    than ``NOISE_FACTOR * noise``, ``noise`` being the standard error of one point of the curve),
    or a midpoint outside the sampled range.
    """
    x, y = _sorted_finite(np.asarray(x, dtype=float), np.asarray(y, dtype=float))
    why = _precheck(x, y, min_range, noise)
    if why:
        return failed(why)
    return _judge(x, _grid_fit(x, y[None, :])[0], min_range, noise)


def fit_many(x: Sequence[float], Y: np.ndarray, *, min_range: float = MIN_RANGE,
             noise: float = 0.0) -> list[SigmoidFit]:
    """:func:`fit_sigmoid` on every row of ``Y`` ``(B, S)``, vectorised over the rows without NaNs."""
    x = np.asarray(x, dtype=float)
    Y = np.asarray(Y, dtype=float)
    out: list[SigmoidFit | None] = [None] * len(Y)
    if np.isfinite(x).all():
        order = np.argsort(x, kind="stable")
        xs, Ys = x[order], Y[:, order]
        full = [b for b in range(len(Y)) if np.isfinite(Ys[b]).all() and not _precheck(xs, Ys[b], min_range, noise)]
        if full:
            for b, p in zip(full, _grid_fit(xs, Ys[full])):
                out[b] = _judge(xs, p, min_range, noise)
    return [f if f is not None else fit_sigmoid(x, Y[b], min_range=min_range, noise=noise) for b, f in enumerate(out)]


@dataclass(frozen=True)
class BootstrapCI:
    """A 95 % (by default) percentile interval from refits on resampled pairs."""

    low: float = math.nan
    high: float = math.nan
    n_ok: int = 0
    n_boot: int = 0
    reason: str | None = None

    def as_dict(self) -> dict:
        return asdict(self)


def percentile_ci(samples: np.ndarray, n_boot: int, level: float = 0.95, min_ok: float = 0.5) -> BootstrapCI:
    """Percentile interval of the finite ``samples``; NaN with a reason when under ``min_ok`` succeed."""
    samples = np.asarray(samples, dtype=float)
    good = samples[np.isfinite(samples)]
    if n_boot == 0:
        return BootstrapCI(n_boot=0, reason="no bootstrap resamples requested")
    if len(good) < max(2, min_ok * n_boot):
        return BootstrapCI(n_ok=len(good), n_boot=n_boot,
                           reason=f"only {len(good)} of {n_boot} bootstrap refits gave a midpoint")
    a = (1 - level) / 2
    lo, hi = np.percentile(good, [100 * a, 100 * (1 - a)])
    return BootstrapCI(float(lo), float(hi), len(good), n_boot, None)


def resample_indices(n_pairs: int, n_boot: int, seed: int = 0) -> np.ndarray:
    """``(n_boot, n_pairs)`` pair indices drawn with replacement from a fixed-seed RNG."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, n_pairs, size=(n_boot, n_pairs))


def curve_noise(boot_medians: np.ndarray | None) -> float:
    """Typical standard error of one point of a median curve: the median over s* of the standard
    deviation of the bootstrap medians (0 without resamples)."""
    if boot_medians is None or len(boot_medians) < 2:
        return 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        v = float(np.nanmedian(np.nanstd(boot_medians, axis=0)))
    return v if math.isfinite(v) else 0.0


def fit_curves(x: Sequence[float], curves: Mapping[str, np.ndarray], *, n_boot: int = 1000, seed: int = 0,
               level: float = 0.95, min_range: float = MIN_RANGE,
               differences: Mapping[str, tuple[str, str]] | None = None) -> dict[str, dict]:
    """Point fit of each curve's median and a bootstrap CI of its midpoint.

    ``curves``: name -> ``(pair, s_star)`` values, all on the same pairs. Every resample draws one
    set of pair indices used for *all* curves, so ``differences`` (name -> (a, b): midpoint of a
    minus midpoint of b, e.g. the output gap s_fine - s_coarse) get a paired interval.
    A curve is flat (no fit) when its median changes by less than ``NOISE_FACTOR`` times its
    bootstrap standard error (:func:`curve_noise`) or less than ``min_range``.
    Returns name -> {"fit": SigmoidFit | None, "value": float, "reason": str | None, "ci": BootstrapCI,
    "median": median curve, "noise": that standard error}.
    """
    x = np.asarray(x, dtype=float)
    names = list(curves)
    arrays = {k: np.asarray(v, dtype=float) for k, v in curves.items()}
    n_pairs = {v.shape[0] for v in arrays.values()}
    if len(n_pairs) != 1:
        raise ValueError("all curves must be measured on the same pairs")
    (m,) = n_pairs
    idx = resample_indices(m, n_boot, seed)
    medians = {k: np.stack([median_curve(arrays[k][i]) for i in idx]) if n_boot else None for k in names}
    noise = {k: curve_noise(medians[k]) for k in names}
    point = {k: fit_sigmoid(x, median_curve(arrays[k]), min_range=min_range, noise=noise[k]) for k in names}
    boot = {k: np.full(n_boot, np.nan) for k in names}
    for k in names:
        if point[k].ok and n_boot:
            boot[k] = np.array([f.midpoint for f in fit_many(x, medians[k], min_range=min_range, noise=noise[k])])
    out: dict[str, dict] = {}
    for k in names:
        f = point[k]
        ci = percentile_ci(boot[k], n_boot, level) if f.ok else BootstrapCI(n_boot=n_boot, reason=f.reason)
        out[k] = {"fit": f, "value": f.midpoint, "reason": f.reason, "ci": ci, "median": median_curve(arrays[k]),
                  "noise": noise[k]}
    for name, (a, b) in (differences or {}).items():
        fa, fb = point[a], point[b]
        if not (fa.ok and fb.ok):
            why = f"{a}: {fa.reason}" if not fa.ok else f"{b}: {fb.reason}"
            out[name] = {"fit": None, "value": math.nan, "reason": why,
                         "ci": BootstrapCI(n_boot=n_boot, reason=why), "median": None, "noise": None}
            continue
        out[name] = {"fit": None, "value": fa.midpoint - fb.midpoint, "reason": None,
                     "ci": percentile_ci(boot[a] - boot[b], n_boot, level), "median": None, "noise": None}
    return out
