"""Data and judge for the embedded digits models (``digits``: 4x4 tokens, ``digits64``: 8x8).

Both models draw 8x8 one-channel digits in [-1, 1] without a VAE, so the shipped digits
classifier judges their outputs directly and the real digits serve as the training-trajectory
and forward-backward data. Other models have no classifier here: the integrated probes
(forward-backward, windowed) refuse them with a one-line error; the gaps run on them along
sampling trajectories.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch

from ..errors import DithooksError
from ..loading import EMBEDDED_MODELS, LoadedModel

_DIGITS_NAMES = {None, "", "default", *EMBEDDED_MODELS, *EMBEDDED_MODELS.values()}


def is_digits_model(model: LoadedModel | str | None) -> bool:
    """The embedded digits models (by name), or any model drawing 8x8 one-channel images of 10
    classes without a VAE (e.g. a retrained copy loaded from a directory)."""
    if model is None or isinstance(model, str):
        return model in _DIGITS_NAMES
    geo = model.adapter.geometry
    return (model.vae is None and geo.in_channels == 1 and geo.sample_size == 8 and geo.num_classes == 10)


class Judge:
    """The shipped digits classifier: ``judge(x)`` logits, ``judge.features(x)`` numpy features."""

    def __init__(self, classifier):
        self.classifier = classifier

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(x.float())

    @torch.no_grad()
    def features(self, x: torch.Tensor) -> np.ndarray:
        return self.classifier.features(torch.as_tensor(x).float()).numpy()


@lru_cache(maxsize=1)
def _classifier():
    from ..default_model import load_digits_classifier

    return load_digits_classifier()


def digits_judge(model: LoadedModel | str | None, what: str = "this measurement") -> Judge:
    if not is_digits_model(model):
        name = model.model_id if isinstance(model, LoadedModel) else model
        raise DithooksError(f"{what} needs a classifier for the model's images; only the embedded digits "
                            f"models (8x8 digits) have one, not {name!r}")
    return Judge(_classifier())


def heldout_digits(n: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``n`` digits held out from the classifier (the DiT trained on all digits), as
    (n, 1, 8, 8) in [-1, 1] and labels. The split is stratified and shuffled, so classes mix."""
    from ..default_model.data import digits_split

    _, _, x, y = digits_split()
    if n is not None:
        if not 1 <= n <= len(y):
            raise DithooksError(f"--samples must lie in 1..{len(y)} (the held-out digits), got {n}")
        x, y = x[:n], y[:n]
    return x, y
