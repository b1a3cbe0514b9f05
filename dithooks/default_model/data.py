"""The real digits: loading, scaling to the model's [-1, 1] range, and a fixed split."""

from __future__ import annotations

import numpy as np
import torch

#: Pixel values of ``load_digits`` are integers 0..16.
DIGITS_MAX_VALUE = 16.0
#: Fraction of the real digits held out from the classifier (stratified, fixed seed).
HELDOUT_FRACTION = 0.25
SPLIT_SEED = 0


def digits_to_model_range(pixels: np.ndarray | torch.Tensor) -> torch.Tensor:
    """Map raw 0..16 pixel values to [-1, 1] floats."""
    x = torch.as_tensor(pixels, dtype=torch.float32)
    return x / DIGITS_MAX_VALUE * 2.0 - 1.0


def model_range_to_unit(x: torch.Tensor) -> torch.Tensor:
    """Map [-1, 1] images to [0, 1] for display."""
    return ((x + 1.0) / 2.0).clamp(0.0, 1.0)


def load_digit_images() -> tuple[torch.Tensor, torch.Tensor]:
    """All 1797 digits as ``(N, 1, 8, 8)`` float images in [-1, 1] and ``(N,)`` int64 labels."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = digits_to_model_range(bunch.images).unsqueeze(1)
    labels = torch.as_tensor(bunch.target, dtype=torch.int64)
    return images, labels


def digits_split() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fixed stratified split of the real digits: ``(x_train, y_train, x_heldout, y_heldout)``."""
    from sklearn.model_selection import train_test_split

    images, labels = load_digit_images()
    idx = np.arange(len(labels))
    train_idx, held_idx = train_test_split(
        idx, test_size=HELDOUT_FRACTION, stratify=labels.numpy(), random_state=SPLIT_SEED
    )
    train_idx, held_idx = torch.as_tensor(train_idx), torch.as_tensor(held_idx)
    return images[train_idx], labels[train_idx], images[held_idx], labels[held_idx]
