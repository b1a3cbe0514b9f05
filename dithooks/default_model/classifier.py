"""A tiny CNN digits classifier, trained on the real digits, used to judge generated samples.

Its penultimate activations (:meth:`DigitsClassifier.features`) double as the feature
encoder for "semantic agreement" (cosine similarity of the features of two images).
"""

from __future__ import annotations

import json
import pathlib

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from .config import NUM_CLASSES
from .data import digits_split

CLASSIFIER_WEIGHTS = "digits_classifier.safetensors"
CLASSIFIER_CONFIG = "digits_classifier.json"


class DigitsClassifier(nn.Module):
    """conv3x3(16) -> conv3x3(32) -> maxpool -> linear(feature_dim) -> linear(10).

    Input: ``(N, 1, 8, 8)`` images in the model's [-1, 1] range.
    """

    def __init__(self, channels: tuple[int, int] = (16, 32), feature_dim: int = 64, dropout: float = 0.3):
        super().__init__()
        self.config = dict(channels=list(channels), feature_dim=feature_dim, dropout=dropout)
        c1, c2 = channels
        self.conv1 = nn.Conv2d(1, c1, 3, padding=1)
        self.conv2 = nn.Conv2d(c1, c2, 3, padding=1)
        self.fc = nn.Linear(c2 * 4 * 4, feature_dim)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(feature_dim, NUM_CLASSES)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate-layer features ``(N, feature_dim)`` (post-ReLU, so non-negative)."""
        h = F.relu(self.conv1(x))
        h = F.max_pool2d(F.relu(self.conv2(h)), 2)
        return F.relu(self.fc(h.flatten(1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits ``(N, 10)``."""
        return self.head(self.dropout(self.features(x)))


def classifier_accuracy(model: DigitsClassifier, x: torch.Tensor, y: torch.Tensor) -> float:
    """Fraction of ``x`` classified as ``y``."""
    model.eval()
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


def train_digits_classifier(
    *, seed: int = 0, epochs: int = 60, batch_size: int = 64, lr: float = 2e-3
) -> tuple[DigitsClassifier, dict]:
    """Train on the fixed stratified split; return the model and its train/held-out accuracy."""
    torch.manual_seed(seed)
    x_tr, y_tr, x_ho, y_ho = digits_split()
    model = DigitsClassifier()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        model.train()
        for idx in torch.randperm(len(y_tr), generator=gen).split(batch_size):
            loss = F.cross_entropy(model(x_tr[idx]), y_tr[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        sched.step()
    model.eval()
    metrics = dict(
        train_accuracy=classifier_accuracy(model, x_tr, y_tr),
        heldout_accuracy=classifier_accuracy(model, x_ho, y_ho),
        n_train=len(y_tr),
        n_heldout=len(y_ho),
        seed=seed,
        epochs=epochs,
    )
    return model, metrics


def save_digits_classifier(model: DigitsClassifier, directory, metrics: dict | None = None) -> None:
    """Write the weights (safetensors) and architecture (+ training metrics) json."""
    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, directory / CLASSIFIER_WEIGHTS)
    meta = dict(architecture=model.config, metrics=metrics or {})
    (directory / CLASSIFIER_CONFIG).write_text(json.dumps(meta, indent=2) + "\n")


def load_digits_classifier_from(directory) -> DigitsClassifier:
    """Load a classifier written by :func:`save_digits_classifier` (in eval mode)."""
    directory = pathlib.Path(directory)
    meta = json.loads((directory / CLASSIFIER_CONFIG).read_text())
    arch = meta["architecture"]
    model = DigitsClassifier(tuple(arch["channels"]), arch["feature_dim"], arch["dropout"])
    model.load_state_dict(load_file(directory / CLASSIFIER_WEIGHTS))
    return model.eval()


def train_and_save_digits_classifier(directory=None, *, seed: int = 0) -> dict:
    """Train the classifier and save it (default: the shipped weights folder)."""
    from .weights_io import default_model_dir

    model, metrics = train_digits_classifier(seed=seed)
    save_digits_classifier(model, directory or default_model_dir(), metrics)
    return metrics
