"""Coupling gates of the linearised attention difference (THEORY §3, paper eq [25], [27]).

At coupling strength ``g`` the coupled output [19] mixes intra- and inter-replica attention with
weights ``1/(1+g)`` and ``g/(1+g)``. Linearising around the symmetric state gives

    O^a - O^b = 2 [ rho(g) * A dV  +  xi(g) * (dA_intra + g dA_inter) V ]

with the spatial-routing gate ``rho`` and the pattern-modulation gate ``xi`` below.
"""

from __future__ import annotations

import math


def validate_coupling(g: float) -> float:
    """Return ``g`` as a float, or raise ``ValueError`` when it is not a usable strength.

    The paper keeps ``g`` in [0, 1]; any finite ``g >= 0`` still gives a convex mixture [19]
    (weights 1/(1+g), g/(1+g) are non-negative and sum to 1), so only ``g < 0`` is refused.
    """
    g = float(g)
    if not math.isfinite(g) or g < 0.0:
        raise ValueError(f"coupling strength g must be a finite number >= 0 (paper: 0 <= g <= 1), got {g}")
    return g


def mixture_weights(g: float) -> tuple[float, float]:
    """``(1/(1+g), g/(1+g))``: weights of intra- and inter-replica attention in eq [19]."""
    g = validate_coupling(g)
    return 1.0 / (1.0 + g), g / (1.0 + g)


def rho(g: float) -> float:
    """Spatial routing gate ``rho(g) = (1-g)/(1+g)`` [27]; 1 at g=0, 0 at g=1."""
    g = validate_coupling(g)
    return (1.0 - g) / (1.0 + g)


def xi(g: float) -> float:
    """Pattern modulation gate ``xi(g) = 1/(1+g)`` [27]; 1 at g=0, 1/2 at g=1 (never 0)."""
    g = validate_coupling(g)
    return 1.0 / (1.0 + g)
