"""Fréchet distance between Gaussians fitted to two feature sets (FID's formula, Heusel et al.).

    FD = ‖μ₁ − μ₂‖² + tr(Σ₁ + Σ₂ − 2 (Σ₁^{1/2} Σ₂ Σ₁^{1/2})^{1/2})

The trace of the matrix square root is computed from the eigenvalues of the symmetric PSD matrix
``Σ₁^{1/2} Σ₂ Σ₁^{1/2}`` (``numpy.linalg.eigh``, tiny negative eigenvalues from round-off set to
0), which stays real and stable for the rank-deficient covariances of small sample sets (n
below the feature dimension). Covariances are unbiased (ddof = 1). The 1σ error is by bootstrap:
both sets resampled with replacement, the standard deviation of the FD over resamples.

Features: the digits classifier's penultimate layer (64-d) for the embedded models. Inception
pool3 features need Inception weights on disk, which this install does not ship
(:func:`feature_extractor` says so).
"""

from __future__ import annotations

import numpy as np

from ..errors import DithooksError

FEATURES = ("classifier", "inception")


def gaussian_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean (d,) and unbiased covariance (d, d) of ``features`` (n, d), n >= 2."""
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise DithooksError(f"Fréchet distance needs at least 2 feature vectors, got shape {f.shape}")
    return f.mean(0), np.cov(f, rowvar=False, ddof=1).reshape(f.shape[1], f.shape[1])


def _psd_sqrt(a: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh((a + a.T) / 2)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def frechet_distance(mu1, cov1, mu2, cov2) -> float:
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    cov1, cov2 = np.asarray(cov1, np.float64), np.asarray(cov2, np.float64)
    if mu1.shape != mu2.shape or cov1.shape != cov2.shape or cov1.shape != mu1.shape * 2:
        raise DithooksError(f"Fréchet distance of mismatched shapes {mu1.shape}/{cov1.shape} and {mu2.shape}/{cov2.shape}")
    s1 = _psd_sqrt(cov1)
    m = s1 @ cov2 @ s1
    ev = np.linalg.eigvalsh((m + m.T) / 2)
    tr_sqrt = float(np.sqrt(np.clip(ev, 0.0, None)).sum())
    d = mu1 - mu2
    return max(0.0, float(d @ d + np.trace(cov1) + np.trace(cov2) - 2.0 * tr_sqrt))


def frechet_features(a: np.ndarray, b: np.ndarray) -> float:
    """FD between Gaussians fitted to feature sets ``a`` (n, d) and ``b`` (m, d)."""
    return frechet_distance(*gaussian_stats(a), *gaussian_stats(b))


def bootstrap_frechet(a: np.ndarray, b: np.ndarray, n_boot: int = 200, seed: int = 0) -> float:
    """1σ of the FD by bootstrap (both sets resampled with replacement, ``n_boot`` times)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if n_boot < 2:
        return float("nan")
    rng = np.random.default_rng(seed)
    vals = [frechet_features(a[rng.integers(0, len(a), len(a))], b[rng.integers(0, len(b), len(b))])
            for _ in range(n_boot)]
    return float(np.std(vals, ddof=1))


def feature_extractor(name: str, classifier=None):
    """``features(x) -> (n, d)`` numpy for a feature space name (``classifier`` or ``inception``)."""
    if name == "classifier":
        if classifier is None:
            raise DithooksError("classifier features need a classifier (the embedded digits models ship one)")
        import torch

        def features(x):
            with torch.no_grad():
                return classifier.features(x.float()).numpy()
        return features
    if name == "inception":
        raise DithooksError("Inception features need the pool3 weights of Inception-v3 on disk, which this "
                            "install does not have (and 8x8 digits are far below its 299x299 input); "
                            "use --features classifier")
    raise DithooksError(f"unknown feature space {name!r}; choose one of {', '.join(FEATURES)}")
