"""Replica difference modes and their normalised energies (THEORY §4, Protocol II [42–44, 74–80]).

At the initial step s = 0 the M replica-pair differences of one layer are stacked as rows of
``X ∈ R^{M×D}`` (``D = N·d``: 294,912 for DiT-XL/2). The modes are the eigenvectors of the
difference covariance ``C = Xᵀ X / M``, which is D×D and is therefore **never formed**.
Instead we diagonalise the M×M dual Gram ``G = X Xᵀ / M`` and lift its eigenvectors with the
Nyström formula ``v_k = Xᵀ u_k / √(M λ_k)``: since ``C (Xᵀ u) = Xᵀ G u = λ Xᵀ u`` and
``‖Xᵀ u_k‖² = M λ_k``, the ``v_k`` are orthonormal eigenvectors of C with the same nonzero
eigenvalues. Cost: O(M² D) time, O(K D) memory for the basis.

The basis is fitted once (step 0) and then applied to the differences of any later step s:

    E_k(s) = (1/M) Σ_m (v_kᵀ δ_s^{(m)})² / λ_k                       [75–76]

so ``E_k(0) = 1`` for every kept mode (up to float error). Band means and the energy gap ratio
``R = E_trail / E_lead`` [78–80] summarise a step.

Mode tolerance (why ``sqrt(eps)``): keep modes with ``λ_k > rel_tol · λ_1``. An eigenvector
of G is only determined to about ``eps · λ_1 / gap``; the Nyström lift divides by
``√λ_k``, so the orthonormality error of ``v_k`` grows like ``eps · λ_1 / λ_k``. Requiring
``λ_k / λ_1 > sqrt(eps)`` keeps that error below ``sqrt(eps)`` (~1.5e-8 in float64,
~3.5e-4 in float32) and discards the numerically-zero directions of a rank-deficient X
(duplicated replicas, centred data, M > D).

Centring: ``centre=True`` subtracts the replica mean before fitting; the centred rows sum to
zero, so at most ``M − 1`` modes are meaningful (the tolerance drops the null one). By default
(``centre=False``) the second moment is used, as in THEORY: with an antisymmetric start the
difference δ → −δ under a↔b, so its mean is zero in expectation and centring only removes
sampling noise at the cost of one mode.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

__all__ = [
    "DifferenceModeBasis",
    "fit_difference_modes_per_layer",
    "default_mode_tolerance",
    "band_indices",
    "band_mean",
    "band_energies",
    "energy_gap_ratio",
]

BandSpec = float | int | Sequence[int] | torch.Tensor | None


def default_mode_tolerance(dtype: torch.dtype) -> float:
    """Relative eigenvalue tolerance ``sqrt(eps(dtype))`` (see module docstring for why)."""
    return math.sqrt(torch.finfo(dtype).eps)


# --------------------------------------------------------------------------------------
# Bands [78–79]
# --------------------------------------------------------------------------------------


def band_indices(spec: BandSpec, n_modes: int, which: str) -> torch.Tensor:
    """Indices (into the kept, descending-λ modes) of the leading or trailing band.

    ``spec`` may be
      - ``None`` → the default quarter (0.25);
      - a float in (0, 1] → that fraction of the ``n_modes`` kept modes, rounded half up,
        at least one mode;
      - an int ≥ 1 → that many modes;
      - a sequence / 1-D tensor of ints → those exact mode indices (negative ones count from
        the end, like Python).
    ``which`` is ``"lead"`` (take from the front) or ``"trail"`` (take from the back); it is
    ignored for explicit index lists.
    """
    if which not in ("lead", "trail"):
        raise ValueError(f"which must be 'lead' or 'trail', got {which!r}")
    if n_modes < 1:
        raise ValueError("no modes to take a band from")
    if spec is None:
        spec = 0.25
    if isinstance(spec, bool):
        raise TypeError("band spec must be a fraction, a count or a list of indices, not a bool")
    if isinstance(spec, float):
        if not 0.0 < spec <= 1.0:
            raise ValueError(f"band fraction must be in (0, 1], got {spec}")
        count = max(1, int(math.floor(spec * n_modes + 0.5)))
    elif isinstance(spec, int):
        if spec < 1:
            raise ValueError(f"band count must be ≥ 1, got {spec}")
        count = min(spec, n_modes)
    else:
        idx = torch.as_tensor(spec, dtype=torch.long).reshape(-1)
        if idx.numel() == 0:
            raise ValueError("explicit band index list is empty")
        if (idx >= n_modes).any() or (idx < -n_modes).any():
            raise ValueError(f"band indices {idx.tolist()} out of range for {n_modes} modes")
        idx = torch.remainder(idx, n_modes)
        if torch.unique(idx).numel() != idx.numel():
            raise ValueError(f"band indices {idx.tolist()} repeat a mode")
        return idx
    if which == "lead":
        return torch.arange(count)
    return torch.arange(n_modes - count, n_modes)


def band_mean(E: torch.Tensor, spec: BandSpec, which: str) -> torch.Tensor:
    """Mean of per-mode energies ``E`` (``[..., K]``) over a band [78–79]; returns ``[...]``."""
    idx = band_indices(spec, E.shape[-1], which).to(E.device)
    return E.index_select(-1, idx).mean(dim=-1)


def band_energies(E: torch.Tensor, lead: BandSpec = None, trail: BandSpec = None) -> dict[str, torch.Tensor]:
    """``E_lead``, ``E_trail`` [78–79] and their ratio ``R = E_trail / E_lead`` [80].

    ``E``: ``[..., K]`` normalised energies (K kept modes, descending λ). Leading dims (layer,
    step, g, ...) are preserved. ``R > 1``: the trailing band keeps more energy.
    """
    e_lead = band_mean(E, lead, "lead")
    e_trail = band_mean(E, trail, "trail")
    return {"E_lead": e_lead, "E_trail": e_trail, "R": e_trail / e_lead}


def energy_gap_ratio(E: torch.Tensor, lead: BandSpec = None, trail: BandSpec = None) -> torch.Tensor:
    """Energy gap ratio ``R = E_trail / E_lead`` [80] from per-mode energies ``E`` ``[..., K]``."""
    return band_energies(E, lead, trail)["R"]


# --------------------------------------------------------------------------------------
# The basis [42–44, 74–76]
# --------------------------------------------------------------------------------------


@dataclass
class DifferenceModeBasis:
    """Fixed difference-mode basis of one layer, fitted at step 0 (THEORY §4).

    Attributes
    ----------
    modes : ``[K, D]`` orthonormal Nyström modes ``v_k`` (rows), descending λ.
    eigenvalues : ``[K]`` kept eigenvalues ``λ_k`` of ``C = Xᵀ X / M`` (= those of ``G``).
    gram_eigenvalues : ``[M]`` all eigenvalues of the dual Gram, descending (diagnostic:
        shows what the tolerance dropped).
    n_samples : M used at fit time.
    feature_shape : shape of one difference vector before flattening (e.g. ``(N, d)``).
    centre : whether the replica mean was removed at fit time.
    centre_using : for ``centre=True``, which mean :meth:`project` removes from later steps:
        ``"own"`` (the replica mean of that step: E_k is then the variance along v_k;
        needs all M rows in one call) or ``"fit"`` (the step-0 mean, fixed: rows can be
        streamed in chunks). Both give ``E_k(0) = 1``.
    mean : ``[D]`` step-0 replica mean (zeros when ``centre=False``).
    rel_tol : the relative eigenvalue tolerance that was applied.
    """

    modes: torch.Tensor
    eigenvalues: torch.Tensor
    gram_eigenvalues: torch.Tensor
    n_samples: int
    feature_shape: tuple[int, ...]
    centre: bool = False
    centre_using: str = "own"
    mean: torch.Tensor | None = None
    rel_tol: float = field(default=0.0)

    # ---- construction ---------------------------------------------------------------

    @classmethod
    def fit(
        cls,
        X: torch.Tensor,
        *,
        centre: bool = False,
        centre_using: str = "own",
        rel_tol: float | None = None,
        max_modes: int | None = None,
        dtype: torch.dtype | None = torch.float64,
    ) -> "DifferenceModeBasis":
        """Fit the basis from step-0 differences ``X`` of shape ``[M, *feature_shape]``.

        ``dtype`` (default float64) is the compute and storage dtype of the basis; ``None``
        keeps ``X``'s floating dtype. ``rel_tol`` defaults to :func:`default_mode_tolerance`.
        ``max_modes`` optionally truncates to the K largest kept modes.
        """
        if centre_using not in ("own", "fit"):
            raise ValueError(f"centre_using must be 'own' or 'fit', got {centre_using!r}")
        if X.ndim < 2:
            raise ValueError(f"X must be [M, *features] with M replica pairs, got shape {tuple(X.shape)}")
        M = X.shape[0]
        feature_shape = tuple(X.shape[1:])
        Xf = X.reshape(M, -1)
        if dtype is not None:
            Xf = Xf.to(dtype)
        elif not Xf.is_floating_point():
            Xf = Xf.to(torch.get_default_dtype())
        if rel_tol is None:
            rel_tol = default_mode_tolerance(Xf.dtype)

        mean = Xf.mean(dim=0) if centre else torch.zeros(Xf.shape[1], dtype=Xf.dtype, device=Xf.device)
        if centre:
            Xf = Xf - mean

        # Dual Gram: M x M, the only quadratic object we form.
        G = (Xf @ Xf.T) / M
        G = 0.5 * (G + G.T)  # exact symmetry for eigh
        lam, U = torch.linalg.eigh(G)  # ascending
        lam, U = lam.flip(0), U.flip(1)  # descending
        lam_max = lam[0]
        if not torch.isfinite(lam_max) or lam_max <= 0:
            raise ValueError(
                "replica differences are all zero (identical replicas, e.g. kappa = 0): no modes to fit"
            )
        keep = lam > rel_tol * lam_max
        K = int(keep.sum())
        if max_modes is not None:
            K = min(K, int(max_modes))
        lam_k, U_k = lam[:K], U[:, :K]
        # Nyström lift v_k = Xᵀ u_k / √(M λ_k); stored as rows [K, D].
        V = (U_k.T @ Xf) / torch.sqrt(M * lam_k)[:, None]
        return cls(
            modes=V,
            eigenvalues=lam_k,
            gram_eigenvalues=lam,
            n_samples=M,
            feature_shape=feature_shape,
            centre=centre,
            centre_using=centre_using,
            mean=mean,
            rel_tol=float(rel_tol),
        )

    # ---- basic properties -----------------------------------------------------------

    @property
    def n_modes(self) -> int:
        """Number K of kept modes."""
        return int(self.eigenvalues.shape[0])

    @property
    def dim(self) -> int:
        """Dimension D of one flattened difference vector."""
        return int(self.modes.shape[1])

    def orthonormality_error(self) -> float:
        """``max |V Vᵀ − I|``: how far the Nyström modes are from orthonormal (diagnostic)."""
        eye = torch.eye(self.n_modes, dtype=self.modes.dtype, device=self.modes.device)
        return float((self.modes @ self.modes.T - eye).abs().max()) if self.n_modes else 0.0

    def explained_variance_ratio(self) -> torch.Tensor:
        """``λ_k / Σ_j λ_j`` over all Gram eigenvalues (trace of C), ``[K]``."""
        total = self.gram_eigenvalues.clamp_min(0).sum()
        return self.eigenvalues / total

    def mode_maps(self) -> torch.Tensor:
        """Modes reshaped to ``[K, *feature_shape]`` (e.g. ``[K, N, d]`` token maps)."""
        return self.modes.reshape(self.n_modes, *self.feature_shape)

    # ---- applying the basis at step s -----------------------------------------------

    def _flatten(self, X_s: torch.Tensor) -> torch.Tensor:
        nf = len(self.feature_shape)
        if tuple(X_s.shape[X_s.ndim - nf:]) != self.feature_shape or X_s.ndim < nf + 1:
            raise ValueError(
                f"expected differences of shape [..., M, {', '.join(map(str, self.feature_shape))}], "
                f"got {tuple(X_s.shape)}"
            )
        Xf = X_s.reshape(*X_s.shape[: X_s.ndim - nf], self.dim).to(self.modes.dtype)
        if self.centre:
            if self.centre_using == "own":
                Xf = Xf - Xf.mean(dim=-2, keepdim=True)
            else:
                Xf = Xf - self.mean
        return Xf

    def project(self, X_s: torch.Tensor) -> torch.Tensor:
        """Modal coordinates ``v_kᵀ δ_s^{(m)}``: ``[..., M, *feature_shape] → [..., M, K]``.

        Leading dims (e.g. steps) are allowed. Computed in the basis dtype.
        """
        return self._flatten(X_s) @ self.modes.T

    def normalised_energy(self, X_s: torch.Tensor) -> torch.Tensor:
        """``E_k(s) = (1/M) Σ_m (v_kᵀ δ_s^{(m)})² / λ_k`` [75–76]: ``[..., M, *feat] → [..., K]``.

        ``E_k(0) = 1`` for the step-0 differences the basis was fitted on.
        """
        P = self.project(X_s)
        return (P * P).mean(dim=-2) / self.eigenvalues

    def band_energies(self, X_s: torch.Tensor, lead: BandSpec = None, trail: BandSpec = None) -> dict[str, torch.Tensor]:
        """Per-mode ``E``, band means ``E_lead``/``E_trail`` and ``R`` [75–80] at one step."""
        E = self.normalised_energy(X_s)
        out = band_energies(E, lead, trail)
        out["E"] = E
        return out

    def energy_gap_ratio(self, X_s: torch.Tensor, lead: BandSpec = None, trail: BandSpec = None) -> torch.Tensor:
        """``R = E_trail / E_lead`` [80] of the differences ``X_s``."""
        return energy_gap_ratio(self.normalised_energy(X_s), lead, trail)

    # ---- persistence ----------------------------------------------------------------

    def state_dict(self) -> dict:
        """Plain dict of tensors and scalars (for torch.save / a store)."""
        return {
            "modes": self.modes,
            "eigenvalues": self.eigenvalues,
            "gram_eigenvalues": self.gram_eigenvalues,
            "n_samples": self.n_samples,
            "feature_shape": list(self.feature_shape),
            "centre": self.centre,
            "centre_using": self.centre_using,
            "mean": self.mean,
            "rel_tol": self.rel_tol,
        }

    @classmethod
    def from_state_dict(cls, state: Mapping) -> "DifferenceModeBasis":
        kw = dict(state)
        kw["feature_shape"] = tuple(int(s) for s in kw["feature_shape"])
        return cls(**kw)


def fit_difference_modes_per_layer(X_by_layer: Mapping, **kwargs) -> dict:
    """One basis per layer: ``{layer: X[M, *feat]} → {layer: DifferenceModeBasis}``."""
    return {layer: DifferenceModeBasis.fit(X, **kwargs) for layer, X in X_by_layer.items()}
