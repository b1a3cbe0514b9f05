"""Seed 004: local denoisers, conditioning and locality gaps, forward-backward and windowed probes.

Modules: ``local_denoiser`` (ε of the global or radius-r windowed model; which tokens form the
image grid), ``planned`` (DDIM with a per-row, per-step plan of conditioning and radius),
``gaps``, ``forward_backward``, ``windowed`` (the three measurements, each into a resumable
store), ``frechet`` (Fréchet distance), ``store`` (the cell store), ``summary`` and ``plots``
(tables, notes and figures), ``digits`` (data and classifier of the embedded digits models).
See docs/locality.md.
"""

from .local_denoiser import Denoiser, TokenLayout, gap_norm, local_attention, token_layout

__all__ = ["Denoiser", "TokenLayout", "gap_norm", "local_attention", "token_layout"]
