"""Sample grids as PNG: what a capture produced, at a glance."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch


def image_grid(images: torch.Tensor, nrow: int | None = None, pad: int = 1) -> np.ndarray:
    """(B, C, H, W) images in [0, 1] -> one uint8 (H', W', 3) grid, ``nrow`` images per row."""
    b, c, h, w = images.shape
    nrow = nrow or math.ceil(math.sqrt(b))
    rows = math.ceil(b / nrow)
    imgs = images.detach().float().clamp(0, 1).cpu()
    if c == 1:
        imgs = imgs.repeat(1, 3, 1, 1)
    elif c != 3:
        imgs = imgs[:, :3] if c > 3 else torch.cat([imgs, imgs[:, :1].repeat(1, 3 - c, 1, 1)], 1)
    grid = torch.ones(3, rows * (h + pad) + pad, nrow * (w + pad) + pad)
    for i in range(b):
        r, k = divmod(i, nrow)
        grid[:, pad + r * (h + pad): pad + r * (h + pad) + h, pad + k * (w + pad): pad + k * (w + pad) + w] = imgs[i]
    return (grid.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)


def save_image_grid(images: torch.Tensor, path: str | Path, nrow: int | None = None, scale: int = 1) -> Path:
    """Write a PNG grid; ``scale`` enlarges tiny images (8x8 digits) with nearest-neighbour."""
    from PIL import Image

    arr = image_grid(images, nrow)
    img = Image.fromarray(arr)
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path
