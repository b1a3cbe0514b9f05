"""Chebyshev attention windows on the token grid (THEORY §7, local denoiser of radius r).

Tokens sit row-major on a ``side x side`` grid (``N = side**2``, THEORY §1). Query ``i`` at
``(r_i, c_i)`` may attend key ``j`` iff ``max(|r_i - r_j|, |c_i - c_j|) <= radius``; the softmax
is taken within the window (masked logits are -inf), with the model's own weights.

A radius ``>= side - 1`` covers the whole grid, and then **no mask is built at all**
(:func:`window_mask` returns ``None``) so the local model is the global model bit-for-bit, not
merely within float error (an all-True mask could route SDPA to a different kernel).
"""

from __future__ import annotations

import math

import torch


def grid_side(num_tokens: int) -> int:
    """Side of the square token grid; ``ValueError`` when ``num_tokens`` is not a square."""
    side = math.isqrt(int(num_tokens))
    if side * side != num_tokens:
        raise ValueError(f"a Chebyshev window needs a square token grid, got N={num_tokens} tokens")
    return side


def validate_radius(radius: int | None) -> int | None:
    if radius is None:
        return None
    if int(radius) != radius or radius < 0:
        raise ValueError(f"window radius must be a non-negative integer or None, got {radius!r}")
    return int(radius)


def window_is_global(num_tokens: int, radius: int | None) -> bool:
    """True when the window covers the whole grid (``radius >= side - 1``) or is ``None``."""
    radius = validate_radius(radius)
    return radius is None or radius >= grid_side(num_tokens) - 1


def chebyshev_distance(num_tokens: int, device: torch.device | str | None = None) -> torch.Tensor:
    """(N, N) integer matrix of ``max(|drow|, |dcol|)`` between row-major grid tokens."""
    side = grid_side(num_tokens)
    idx = torch.arange(num_tokens, device=device)
    row, col = idx // side, idx % side
    return torch.maximum((row[:, None] - row[None, :]).abs(), (col[:, None] - col[None, :]).abs())


def window_mask(num_tokens: int, radius: int | None,
                device: torch.device | str | None = None) -> torch.Tensor | None:
    """Boolean (N, N) mask, True where query i may attend key j; ``None`` when global.

    Every row contains its diagonal, so no softmax row is ever empty.
    """
    if window_is_global(num_tokens, radius):
        return None
    return chebyshev_distance(num_tokens, device) <= radius


def additive_window_mask(num_tokens: int, radius: int | None, dtype: torch.dtype = torch.float32,
                         device: torch.device | str | None = None) -> torch.Tensor | None:
    """Float (N, N) mask, 0 inside the window and -inf outside (add to logits); ``None`` if global."""
    mask = window_mask(num_tokens, radius, device)
    if mask is None:
        return None
    return torch.zeros(mask.shape, dtype=dtype, device=device).masked_fill(~mask, float("-inf"))


def joint_window_mask(num_image: int, radius: int | None, num_text: int = 0, *, text_first: bool = False,
                      device: torch.device | str | None = None) -> torch.Tensor | None:
    """Boolean (L, L) mask of a joint sequence, ``L = num_text + num_image``: the Chebyshev window
    on image->image pairs, every pair involving a text token allowed; ``None`` when global.

    Order as in diffusers: SD3 ``[image; text]`` (``text_first=False``), Flux ``[text; image]``
    (``text_first=True``). With ``num_text = 0`` it is :func:`window_mask`.
    """
    image = window_mask(num_image, radius, device)
    if image is None or num_text == 0:
        return image
    total = num_text + num_image
    mask = torch.ones(total, total, dtype=torch.bool, device=device)
    lo = num_text if text_first else 0
    mask[lo:lo + num_image, lo:lo + num_image] = image
    return mask
