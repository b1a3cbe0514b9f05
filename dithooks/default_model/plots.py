"""Figures for the model card: the sample grid and the loss curve."""

from __future__ import annotations

import json
import pathlib

import torch

from .data import model_range_to_unit


def save_sample_grid(grid: torch.Tensor, path: pathlib.Path) -> None:
    """Save ``(rows, cols, 1, H, W)`` images in [-1, 1] as a PNG grid (row r = class r)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, cols = grid.shape[:2]
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 0.6, rows * 0.6), squeeze=False)
    for r in range(rows):
        for c in range(cols):
            ax = axes[r][c]
            ax.imshow(model_range_to_unit(grid[r, c, 0]).numpy(), cmap="gray_r", vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(str(r), rotation=0, labelpad=8, va="center")
    fig.tight_layout(pad=0.2)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_loss_curve(log_path, png_path) -> None:
    """Plot the ``train_log.jsonl`` loss (mean over each logging window) against steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [json.loads(line) for line in pathlib.Path(log_path).read_text().splitlines()]
    steps = [r["step"] for r in records]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(steps, [r["loss"] for r in records])
    ax.set_yscale("log")
    ax.set_xlabel("step (batch 128)")
    ax.set_ylabel("epsilon MSE (window mean)")
    ax.set_title("default DiT on sklearn digits")
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    png_path = pathlib.Path(png_path)
    png_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
