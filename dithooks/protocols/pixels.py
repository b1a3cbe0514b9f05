"""Coarse and fine pixel discrepancies of two images (THEORY §6, paper [71-72]).

``P`` = adaptive average pooling to ``size x size``, ``U`` = bilinear upsampling back to the
image size (``align_corners=False``). For a pair of images ``x^a, x^b``:

    D_coarse = || U P x^a - U P x^b ||
    D_fine   = || (x^a - U P x^a) - (x^b - U P x^b) ||

(Frobenius norms over channels and pixels). ``U P`` is linear, so with ``d = x^a - x^b`` these
are ``||U P d||`` and ``||d - U P d||``: the coarse and fine parts of the difference add up to
``d`` exactly.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import DithooksError


def default_coarse_size(side: int) -> int:
    """The pooled side length used unless ``--coarse-size`` says otherwise: an eighth of the
    image side, at least 2 (8x8 digits -> 2x2 blocks of 4x4 pixels; 256 px -> 32x32)."""
    return max(2, int(side) // 8)


def check_coarse_size(size: int, height: int, width: int) -> int:
    size = int(size)
    if not 1 <= size < min(height, width):
        raise DithooksError(f"coarse size {size} must lie in 1-{min(height, width) - 1} for "
                            f"{height}x{width} images (the pooled image must be smaller than the image)")
    return size


def lowpass(x: torch.Tensor, size: int) -> torch.Tensor:
    """``U P x`` for ``(N, C, H, W)`` images."""
    h, w = x.shape[-2:]
    pooled = F.adaptive_avg_pool2d(x.float(), (size, size))
    return F.interpolate(pooled, size=(h, w), mode="bilinear", align_corners=False)


def coarse_fine(xa: torch.Tensor, xb: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-pair ``(D_coarse, D_fine)``, each of shape ``(N,)``, for ``(N, C, H, W)`` image pairs."""
    if xa.shape != xb.shape or xa.dim() != 4:
        raise ValueError(f"need two (N, C, H, W) batches of the same shape, got {tuple(xa.shape)}, {tuple(xb.shape)}")
    check_coarse_size(size, *xa.shape[-2:])
    d = xa.float() - xb.float()
    coarse = lowpass(d, size)  # = U P x^a - U P x^b (U P is linear)
    fine = d - coarse
    return coarse.flatten(1).norm(dim=1), fine.flatten(1).norm(dim=1)
