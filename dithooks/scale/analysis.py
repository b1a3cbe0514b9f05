"""The built-in probes' offline forms as Dask graphs over a store, chunk by chunk.

* :func:`difference_modes` - the ``difference_modes`` probe (THEORY §4) from stored activations:
  the step-0 basis of the replica (or halves) differences of every layer and the normalised
  energies ``E_k(s, ℓ)`` of every step, band means and ``R``. Computed in the dual (M×M) form,
  so neither the D×D covariance nor the K×D basis is ever formed: with ``X_0`` the step-0
  differences (M×D), ``G = X_0 X_0ᵀ / M = U Λ Uᵀ``, the Nyström modes are
  ``v_k = X_0ᵀ u_k / √(M λ_k)``, hence ``v_kᵀ δ_s^{(m)} = (X_s X_0ᵀ u_k)_m / √(M λ_k)`` - one
  M×M cross-Gram ``X_s X_0ᵀ`` per (step, layer), contracted over D block by block.
* :func:`routing_summary` - from the stored JVP parts ``blocks.jvp.routing`` and
  ``blocks.jvp.modulation`` (residual units, after W_O and the adaLN gate): the ratio of their
  Frobenius norms per (step, layer, [cfg,] sample), and its median/quantiles over samples.
* :func:`n_eff_summary` - stored ``blocks.attn.n_eff``: mean, min, max and quantiles per
  (step, layer, head) over every other dim (samples, queries, branches).

Every function takes a store or a list of stores (e.g. one per GPU, disjoint seeds), analysed as
one store whose samples are concatenated (:func:`~dithooks.scale.dask_store.concat_samples`).

Memory: every task holds one block (one store chunk, or a ``split`` piece of one) plus small
per-block results; what is gathered on the client is the per-(step, layer) output and, for the
modes, the M×M Gram of each layer. Quantiles of N_eff come from log-spaced histograms (a second
pass over the data), so they are exact to one bin: relative error ≤ ``resolution / 2``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np

from ..errors import DithooksError, StoreError
from ..store.reader import CaptureStore, open_store
from .dask_store import StoreArray, concat_samples, dask_array

__all__ = ["ModesResult", "difference_modes", "n_eff_summary", "routing_summary", "histogram_quantiles"]


def _open(store: Any) -> Any:
    """A store, or a list of stores (analysed as one, concatenated along ``sample``)."""
    if isinstance(store, (list, tuple)):
        if not store:
            raise StoreError("no stores given")
        return [s if isinstance(s, CaptureStore) else open_store(s) for s in store]
    return store if isinstance(store, CaptureStore) else open_store(store)


def _first(s: Any) -> CaptureStore:
    return s[0] if isinstance(s, list) else s


def _array(s: Any, name: str, **kw: Any) -> StoreArray:
    return concat_samples(s, name, **kw) if isinstance(s, list) else dask_array(s, name, **kw)


def _block_name(hook: str) -> str:
    return hook if hook.startswith("blocks.") else "blocks." + hook


def _compute(*arrays: Any) -> tuple:
    import dask

    return dask.compute(*arrays)


# -- difference modes ---------------------------------------------------------------------------
@dataclass
class ModesResult:
    """Offline difference modes (the ``difference_modes`` probe's outputs, same names and dims)."""

    steps: np.ndarray                # (step,) step indices
    layers: np.ndarray               # (layer,) block indices
    energy: np.ndarray               # (step, layer, mode) E_k(s, ℓ); NaN where a mode is not kept
    eigenvalues: np.ndarray          # (layer, mode) kept λ_k, descending; NaN beyond n_modes
    gram_eigenvalues: np.ndarray     # (layer, pair) every eigenvalue of X_0 X_0ᵀ / M, descending
    n_modes: np.ndarray              # (layer,)
    E_lead: np.ndarray               # (step, layer)
    E_trail: np.ndarray
    R: np.ndarray
    info: dict = field(default_factory=dict)


def difference_modes(store: Any, hook: str = "resid_post", *, pairs: str = "replica",
                     cfg: str = "cond", steps: Any = "complete", centre: bool = False, centre_using: str = "own",
                     rel_tol: float | None = None, max_modes: int | None = None, lead: Any = 0.25,
                     trail: Any = 0.25, split: Mapping[str, int] | None = None) -> ModesResult:
    """The ``difference_modes`` probe computed from a store (its options, same meaning).

    ``pairs``: ``replica`` (replica a − b of a replica run) or ``halves`` (sample m − sample m+M).
    ``steps``: the steps to evaluate (default: every complete step). The basis is fitted on the
    first selected step: step 0, as in the probe, unless the selection starts later (then
    ``info["fit_step"]`` says which). Two passes over the data: the fit step's Gram, then the
    cross-Grams of every step. Float64 throughout.
    """
    import dask.array as da

    if pairs not in ("replica", "halves"):
        raise DithooksError(f"difference_modes: pairs must be replica or halves, not {pairs!r}")
    if centre_using not in ("own", "fit"):
        raise DithooksError(f"difference_modes: centre_using must be own or fit, not {centre_using!r}")
    s = _open(store)
    name = _block_name(hook)
    sel: dict[str, Any] = {"step": steps}
    dims = _first(s).array_meta(_first(s).resolve(name)[0]).dims
    if "cfg" in dims:
        sel["cfg"] = cfg
    if pairs == "replica" and "replica" not in dims:
        raise DithooksError(f"difference_modes: {name} has no replica dim (not a replica run); use pairs='halves'")
    if pairs == "halves" and "replica" in dims:
        raise DithooksError("difference_modes: this is a replica run; use pairs='replica'")
    x = _array(s, name, split=split, **sel)
    a = x.data.astype(np.float64)
    if "cfg" in x.dims:
        a = a[(slice(None),) * x.axis("cfg") + (0,)]
    kept_dims = [d for d in x.dims if d != "cfg"]
    samp = kept_dims.index("sample")
    if pairs == "replica":
        r = kept_dims.index("replica")
        d = a[(slice(None),) * r + (0,)] - a[(slice(None),) * r + (1,)]
        kept_dims.pop(r)
        samp = kept_dims.index("sample")
    else:
        n = a.shape[samp]
        if n < 2 or n % 2:
            raise DithooksError(f"difference_modes: pairs=halves needs an even number of samples, not {n}")
        h = n // 2
        d = a[(slice(None),) * samp + (slice(0, h),)] - a[(slice(None),) * samp + (slice(h, n),)]
    if kept_dims[:3] != ["step", "layer", "sample"]:
        raise DithooksError(f"difference_modes: {name} has dims {x.dims}; expected (step, layer, ..., sample, values)")
    S, L, M = d.shape[:3]
    D = int(np.prod(d.shape[3:]))
    X = d.reshape(S, L, M, D)
    X0 = X[0]
    if centre:
        X0 = X0 - X0.mean(axis=1, keepdims=True)
        X = X - (X.mean(axis=2, keepdims=True) if centre_using == "own" else X[0].mean(axis=1)[None, :, None, :])
    # pass 1: the step-0 dual Gram of every layer (L, M, M)
    (G,) = _compute(da.einsum("lmd,lnd->lmn", X0, X0) / M)
    tol = math.sqrt(np.finfo(np.float64).eps) if rel_tol is None else float(rel_tol)
    K = M if not max_modes else min(M, int(max_modes))
    W = np.zeros((L, M, K))
    lam_k = np.full((L, K), np.nan)
    gram = np.empty((L, M))
    kept = np.zeros(L, dtype=np.int64)
    layers = x.coords["layer"]
    for li in range(L):
        g = 0.5 * (G[li] + G[li].T)
        lam, U = np.linalg.eigh(g)
        lam, U = lam[::-1], U[:, ::-1]
        gram[li] = lam
        if not np.isfinite(lam[0]) or lam[0] <= 0:
            raise DithooksError(f"difference_modes, layer {layers[li]}: replica differences are all zero "
                                "(identical replicas, e.g. kappa = 0): no modes to fit")
        k = min(int((lam > tol * lam[0]).sum()), K)
        kept[li] = k
        lam_k[li, :k] = lam[:k]
        W[li, :, :k] = U[:, :k] / np.sqrt(M * lam[:k])
    # pass 2: P_s = X_s X_0ᵀ W (the modal coordinates v_kᵀ δ_s), E = mean_m P² / λ
    C = da.einsum("slmd,lnd->slmn", X, X0)
    P = da.einsum("slmn,lnk->slmk", C, da.from_array(W, chunks=W.shape))
    (E,) = _compute((P * P).mean(axis=2))
    with np.errstate(invalid="ignore", divide="ignore"):
        E = E / lam_k[None]
    bands = _bands(E, kept, lead, trail, layers)
    info = {"store": [str(p.path) for p in s] if isinstance(s, list) else str(s.path), "hook": name, "pairs": pairs, "centre": centre, "centre_using": centre_using,
            "rel_tol": tol, "M": M, "D": D, "fit_step": int(x.coords["step"][0])}
    return ModesResult(np.asarray(x.coords["step"]), np.asarray(layers), E, lam_k, gram, kept, *bands, info=info)


def _bands(E: np.ndarray, kept: np.ndarray, lead: Any, trail: Any, layers: np.ndarray) -> tuple[np.ndarray, ...]:
    """E_lead, E_trail, R per (step, layer) with the probe's own band rules (dithooks/analysis/modes.py)."""
    import torch

    from ..analysis.modes import band_energies

    S, L = E.shape[:2]
    out = {k: np.full((S, L), np.nan) for k in ("E_lead", "E_trail", "R")}
    for li in range(L):
        if kept[li] == 0:
            continue
        try:
            b = band_energies(torch.from_numpy(np.ascontiguousarray(E[:, li, : kept[li]])), lead, trail)
        except ValueError as e:
            raise DithooksError(f"difference_modes, layer {layers[li]}: {e}") from None
        for k in out:
            out[k][:, li] = b[k].numpy()
    return out["E_lead"], out["E_trail"], out["R"]


# -- routing summary ----------------------------------------------------------------------------
def routing_summary(store: Any, *, steps: Any = "complete", quantiles: Sequence[float] = (0.1, 0.5, 0.9),
                    numerator: str = "jvp.routing", denominator: str = "jvp.modulation",
                    split: Mapping[str, int] | None = None) -> dict[str, Any]:
    """‖routing‖/‖modulation‖ from the stored JVP parts, per (step, layer, [cfg,] sample).

    Returns ``ratio`` (that array), ``dims`` (its dims), ``coords``, ``quantiles`` (the ``q``
    values) and per (step, layer[, cfg]) over samples: ``median``, ``q`` (dims ... × quantile,
    exact: the ratio array is small), ``dominates`` (fraction with ratio > 1) and ``numerator_norm``
    / ``denominator_norm`` (root mean square over samples of the Frobenius norms).

    The parts are in residual units (after W_O and the adaLN gate when the capture applied gates),
    so heads are mixed by W_O: this is not the per-head ``probe.routing.*`` ratio (which needs the
    ``jvp.heads.*`` points) but its layer-level, residual-stream counterpart.
    """
    s = _open(store)
    num = _array(s, _block_name(numerator), step=steps, split=split)
    den = _array(s, _block_name(denominator), step=steps, split=split)
    if num.dims != den.dims or num.data.shape != den.data.shape:
        raise StoreError(f"{num.name} and {den.name} differ in shape ({num.data.shape} vs {den.data.shape})")
    batch = [d for d in num.dims if d in ("step", "layer", "replica", "cfg", "sample")]
    value_axes = tuple(i for i, d in enumerate(num.dims) if d not in batch)
    norm = lambda a: (a.astype(np.float64) ** 2).sum(axis=value_axes) ** 0.5  # noqa: E731
    rn, dn = _compute(norm(num.data), norm(den.data))
    with np.errstate(invalid="ignore", divide="ignore"):
        ratio = rn / dn
    samp = batch.index("sample")
    q = np.asarray(quantiles, dtype=np.float64)
    return {
        "ratio": ratio, "dims": tuple(batch), "coords": {d: num.coords[d] for d in batch},
        "quantiles": q,
        "median": np.nanmedian(ratio, axis=samp),
        "q": np.moveaxis(np.nanquantile(ratio, q, axis=samp), 0, -1),
        "dominates": np.mean(ratio > 1, axis=samp),
        "numerator_norm": np.sqrt(np.nanmean(rn ** 2, axis=samp)),
        "denominator_norm": np.sqrt(np.nanmean(dn ** 2, axis=samp)),
        "summary_dims": tuple(d for d in batch if d != "sample"),
    }


# -- N_eff summary ------------------------------------------------------------------------------
def n_eff_summary(store: Any, hook: str = "attn.n_eff", *, steps: Any = "complete",
                  keep: Sequence[str] = ("step", "layer", "head"), quantiles: Sequence[float] = (0.1, 0.5, 0.9),
                  resolution: float = 2 ** -7, split: Mapping[str, int] | None = None) -> dict[str, Any]:
    """Mean, min, max and quantiles of stored N_eff per ``keep`` dims (default step, layer, head)
    over all other dims (samples, queries, cfg, replica).

    Quantiles are the inverted-CDF quantiles (the smallest stored value v with F(v) ≥ q), located
    in a histogram of log-spaced bins of relative width ``resolution`` over [min, max], and
    reported as the bin's geometric centre clipped to the group's [min, max]: relative error at
    most ``resolution / 2`` (about 0.27% by default; fp16 storage itself rounds to 0.05%).
    """
    import dask.array as da

    s = _open(store)
    x = _array(s, _block_name(hook), step=steps, split=split)
    missing = [d for d in keep if d not in x.dims]
    if missing:
        raise StoreError(f"{x.name} has no dim {missing[0]!r} (its dims: {', '.join(x.dims)})")
    a = x.data.astype(np.float64)
    red = tuple(i for i, d in enumerate(x.dims) if d not in keep)
    order = [x.dims.index(d) for d in keep]
    # pass 1: exact moments and range
    mean, lo, hi, count = _compute(da.nanmean(a, axis=red), da.nanmin(a, axis=red), da.nanmax(a, axis=red),
                                   (~da.isnan(a)).sum(axis=red))
    kept_dims = [d for d in x.dims if d in keep]
    perm = [kept_dims.index(d) for d in keep]
    mean, lo, hi, count = (np.transpose(v, perm) for v in (mean, lo, hi, count))
    vmin, vmax = float(np.nanmin(lo)), float(np.nanmax(hi))
    if not vmin > 0:
        raise StoreError(f"{x.name}: N_eff values must be positive (min {vmin})")
    # pass 2: per-block histograms, summed over blocks
    step = math.log1p(resolution)
    nbins = max(1, int(math.ceil(math.log(vmax / vmin) / step)) + 1)
    keep_axes = sorted(order)
    hist = da.map_blocks(_log_hist, a, red=red, vmin=vmin, step=step, nbins=nbins, dtype=np.int64,
                         chunks=tuple((1,) * len(c) if i in red else c for i, c in enumerate(a.chunks)) + ((nbins,),),
                         new_axis=a.ndim)
    (counts,) = _compute(hist.sum(axis=red))
    counts = np.transpose(counts, [kept_dims.index(d) for d in keep] + [len(keep_axes)])
    q = np.asarray(quantiles, dtype=np.float64)
    qv = histogram_quantiles(counts, q, vmin, step)
    qv = np.clip(qv, lo[..., None], hi[..., None])
    return {"dims": tuple(keep), "coords": {d: x.coords[d] for d in keep}, "mean": mean, "min": lo, "max": hi,
            "count": count, "quantiles": q, "q": qv, "resolution": resolution, "bins": nbins}


def _log_hist(block: np.ndarray, red: tuple[int, ...], vmin: float, step: float, nbins: int) -> np.ndarray:
    """Counts of one block's values in log bins, per kept position (reduced axes kept as size 1)."""
    keep = [i for i in range(block.ndim) if i not in red]
    v = np.transpose(block, keep + list(red)).reshape(int(np.prod([block.shape[i] for i in keep])), -1)
    ok = np.isfinite(v)
    b = np.clip(np.floor(np.log(np.where(ok, v, vmin) / vmin) / step), 0, nbins - 1).astype(np.int64)
    rows = np.broadcast_to(np.arange(v.shape[0])[:, None], v.shape)
    flat = (rows * nbins + b)[ok]
    counts = np.bincount(flat, minlength=v.shape[0] * nbins).reshape([block.shape[i] for i in keep] + [nbins])
    shape = [1 if i in red else block.shape[i] for i in range(block.ndim)] + [nbins]
    return counts.reshape(shape)


def histogram_quantiles(counts: np.ndarray, q: np.ndarray, vmin: float, step: float) -> np.ndarray:
    """Inverted-CDF quantiles from log-bin ``counts`` (``[..., bins]``, bin b = [vmin·e^{b·step},
    vmin·e^{(b+1)·step})): the geometric centre of the bin holding the ⌈q·n⌉-th value. ``[..., len(q)]``."""
    cum = np.cumsum(counts, axis=-1)
    n = cum[..., -1:]
    rank = np.maximum(1, np.ceil(q * n))                     # [..., len(q)]
    b = np.stack([(cum < rank[..., j:j + 1]).sum(axis=-1) for j in range(len(q))], axis=-1)
    out = vmin * np.exp((b + 0.5) * step)
    return np.where(n > 0, out, np.nan)
