"""Replica pairs: antisymmetric, variance-preserving initial noise (THEORY §2, paper [67-69]).

    x_T^a = sqrt(1-kappa^2) z + kappa eta,     x_T^b = sqrt(1-kappa^2) z - kappa eta

with ``z, eta ~ N(0, I)`` independent. Each replica has unit variance, the pair difference is
``2 kappa eta`` and ``corr(x^a, x^b) = 1 - 2 kappa^2``: kappa = 0 gives identical replicas,
kappa = 1/sqrt(2) independent ones. The coupling gates ``rho``/``xi`` live in
:mod:`dithooks.gates` and are re-exported here.

Batches of pairs are laid out replica-major, ``[a-half; b-half]``: row ``m`` of the a-half pairs
with row ``m`` of the b-half (the layout :class:`~dithooks.attention.processor.HookedAttnProcessor`
expects).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from .gates import mixture_weights, rho, xi  # noqa: F401  (re-exported)

__all__ = ["antisymmetric_pair", "replica_batch", "validate_kappa", "rho", "xi",
           "mixture_weights"]


def validate_kappa(kappa: float) -> float:
    """Return ``kappa`` as a float; ``ValueError`` unless ``0 <= kappa <= 1``.

    Above 1 the common-mode weight ``sqrt(1 - kappa^2)`` is not real, so eq [67] is undefined.
    """
    k = float(kappa)
    if not math.isfinite(k) or not 0.0 <= k <= 1.0:
        raise ValueError(
            f"kappa must satisfy 0 <= kappa <= 1 (0: identical replicas, 1/sqrt(2): independent, "
            f"1: x^b = -x^a), got {kappa!r}")
    return k


def antisymmetric_pair(
    shape: Sequence[int],
    kappa: float,
    generator: torch.Generator | Sequence[torch.Generator] | None = None,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw ``M = shape[0]`` antisymmetric replica pairs; returns ``(x_a, x_b)``, each ``shape``.

    ``generator`` is one ``torch.Generator`` (draws ``z`` for the whole batch, then ``eta``), or a
    list of ``M`` generators, one per pair: pair ``m`` then draws its own ``z_m`` and then
    ``eta_m`` of shape ``shape[1:]`` from ``generator[m]``, so it does not depend on ``M`` or on
    the other pairs (re-running pair 7 alone with the same seed gives the same pair 7).
    Noise is drawn in float32 and cast to ``dtype`` so that seeds mean the same at any precision.
    """
    k = validate_kappa(kappa)
    shape = tuple(int(s) for s in shape)
    if len(shape) < 1:
        raise ValueError("shape must start with the number of pairs M")
    gens = list(generator) if isinstance(generator, (list, tuple)) else None
    if gens is not None:
        if len(gens) != shape[0]:
            raise ValueError(f"got {len(gens)} generators for {shape[0]} pairs")
        # each generator serves only its own pair, which draws z_m and then eta_m from it
        draws = [(torch.randn(shape[1:], generator=gm, device=device),
                  torch.randn(shape[1:], generator=gm, device=device)) for gm in gens]
        z = torch.stack([d[0] for d in draws])
        eta = torch.stack([d[1] for d in draws])
    else:
        z = torch.randn(shape, generator=generator, device=device)
        eta = torch.randn(shape, generator=generator, device=device)
    common = math.sqrt(1.0 - k * k) * z
    x_a = common + k * eta
    x_b = common - k * eta
    return x_a.to(dtype), x_b.to(dtype)


def replica_batch(x_a: torch.Tensor, x_b: torch.Tensor) -> torch.Tensor:
    """Concatenate two replica batches replica-major: ``[x_a; x_b]`` along dim 0."""
    if x_a.shape != x_b.shape:
        raise ValueError(f"replica shapes differ: {tuple(x_a.shape)} vs {tuple(x_b.shape)}")
    return torch.cat([x_a, x_b], dim=0)
