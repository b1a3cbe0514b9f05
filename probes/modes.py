"""Replica difference modes and their bands: re-exported from :mod:`dithooks.analysis.modes`.

The implementation lives in the core (Protocol II and the store analysis need it without
importing ``probes/``); this module keeps the old import path working.
"""

from dithooks.analysis.modes import (  # noqa: F401
    BandSpec,
    DifferenceModeBasis,
    band_energies,
    band_indices,
    band_mean,
    default_mode_tolerance,
    energy_gap_ratio,
    fit_difference_modes_per_layer,
)

__all__ = [
    "DifferenceModeBasis",
    "fit_difference_modes_per_layer",
    "default_mode_tolerance",
    "band_indices",
    "band_mean",
    "band_energies",
    "energy_gap_ratio",
]
