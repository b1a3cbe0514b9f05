"""Feature encoders for semantic agreement (paper [70]): cosine similarity of image features.

An encoder maps decoded images ``(N, C, H, W)`` in [0, 1] to features ``(N, F)``. Built in:

- ``digits``: the shipped digits classifier's penultimate features
  (:func:`dithooks.default_model.load_digits_classifier`), for 8x8 one-channel images;
- ``resnet50``: torchvision's ImageNet ResNet-50, global-average-pooled 2048-d features, for
  ImageNet DiTs. Optional: needs ``torchvision`` and the weights on disk (``--encoder-weights
  FILE``, or torchvision's cache ``$TORCH_HOME/hub/checkpoints/resnet50-*.pth``); nothing is
  ever downloaded;
- ``pixels``: the raw pixels (a model-free baseline, and what the tests use on random models);
- ``package.module:factory``: your own, ``factory(device=..., weights=...)`` returning an object
  with ``name`` and ``features(images)``.

``auto`` picks ``digits`` for 8x8 one-channel images and ``resnet50`` otherwise.
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path
from typing import Protocol

import torch

from ..errors import DithooksError

ENCODERS = ("auto", "digits", "resnet50", "pixels")


class Encoder(Protocol):
    name: str

    def features(self, images: torch.Tensor) -> torch.Tensor: ...


def cosine_agreement(fa: torch.Tensor, fb: torch.Tensor) -> torch.Tensor:
    """Per-pair cosine similarity of feature rows; NaN where either feature vector is zero."""
    fa, fb = fa.double().flatten(1), fb.double().flatten(1)
    na, nb = fa.norm(dim=1), fb.norm(dim=1)
    cos = (fa * fb).sum(1) / (na * nb)
    return torch.where((na > 0) & (nb > 0), cos, torch.full_like(cos, float("nan"))).float()


class PixelEncoder:
    name = "pixels"

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return images.float().flatten(1)


class DigitsEncoder:
    """Penultimate features of the shipped digits classifier (input rescaled to [-1, 1])."""

    name = "digits"

    def __init__(self, device="cpu"):
        from ..default_model import load_digits_classifier

        self.model = load_digits_classifier().to(device)
        self.device = device

    def features(self, images: torch.Tensor) -> torch.Tensor:
        if tuple(images.shape[1:]) != (1, 8, 8):
            raise DithooksError(f"the digits encoder takes 8x8 one-channel images; these are "
                                f"{'x'.join(map(str, images.shape[1:]))}: use --encoder resnet50 or pixels")
        with torch.no_grad():
            return self.model.features(images.to(self.device).float() * 2 - 1)


def _resnet50_weights(weights: str | os.PathLike | None) -> Path:
    if weights is not None:
        p = Path(weights).expanduser()
        if not p.is_file():
            raise DithooksError(f"no ResNet-50 weights file at {p}")
        return p
    hub = Path(os.environ.get("TORCH_HOME", Path.home() / ".cache" / "torch")) / "hub" / "checkpoints"
    found = sorted(hub.glob("resnet50-*.pth"))
    if not found:
        raise DithooksError(f"no ResNet-50 weights in {hub} (resnet50-*.pth): put torchvision's "
                            "file there or pass --encoder-weights FILE; dithooks does not download them")
    return found[0]


class ResNet50Encoder:
    """torchvision ResNet-50 features (the 2048-d input of its classifier layer)."""

    name = "resnet50"
    MEAN = (0.485, 0.456, 0.406)
    STD = (0.229, 0.224, 0.225)

    def __init__(self, device="cpu", weights=None):
        try:
            import torchvision
        except ImportError:
            raise DithooksError("the resnet50 encoder needs torchvision (pip install torchvision, the build "
                                "matching your torch) and local weights; or use --encoder pixels") from None
        path = _resnet50_weights(weights)
        model = torchvision.models.resnet50(weights=None)
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
            model.load_state_dict(state)
        except Exception as e:  # a wrong or damaged file: say which
            raise DithooksError(f"cannot load ResNet-50 weights from {path}: {str(e).splitlines()[0][:160]}") from None
        model.fc = torch.nn.Identity()
        self.model = model.eval().to(device)
        self.device = device
        self.weights = str(path)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        import torch.nn.functional as F

        x = images.to(self.device).float()
        if x.shape[1] == 1:
            x = x.repeat(1, 3, 1, 1)
        if x.shape[1] != 3:
            raise DithooksError(f"the resnet50 encoder takes 1- or 3-channel images, not {x.shape[1]}")
        x = F.interpolate(x, size=(224, 224), mode="bilinear", align_corners=False, antialias=True)
        mean = torch.tensor(self.MEAN, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(self.STD, device=x.device).view(1, 3, 1, 1)
        with torch.no_grad():
            return self.model((x - mean) / std)


def resolve_encoder_name(name: str, image_shape: tuple[int, ...]) -> str:
    """``auto`` -> ``digits`` for (1, 8, 8) images, else ``resnet50``; other names unchanged."""
    if name == "auto":
        return "digits" if tuple(image_shape) == (1, 8, 8) else "resnet50"
    if name not in ENCODERS and ":" not in name:
        raise DithooksError(f"unknown encoder {name!r}; choose one of {', '.join(ENCODERS)} "
                            "or give package.module:factory")
    return name


def make_encoder(name: str, *, image_shape: tuple[int, ...], device="cpu", weights=None) -> Encoder:
    """Build the encoder called ``name`` for images of ``image_shape`` (C, H, W)."""
    name = resolve_encoder_name(name, image_shape)
    if name == "digits":
        if tuple(image_shape) != (1, 8, 8):
            raise DithooksError(f"the digits encoder takes 8x8 one-channel images; this model makes "
                                f"{'x'.join(map(str, image_shape))}: use --encoder resnet50 or pixels")
        return DigitsEncoder(device)
    if name == "resnet50":
        return ResNet50Encoder(device, weights)
    if name == "pixels":
        return PixelEncoder()
    mod_name, _, attr = name.partition(":")
    try:
        factory = getattr(importlib.import_module(mod_name), attr)
    except (ImportError, AttributeError) as e:
        raise DithooksError(f"cannot import encoder {name!r}: {e}") from None
    enc = factory(device=device, weights=weights)
    if not hasattr(enc, "features"):
        raise DithooksError(f"encoder {name!r} has no features(images) method")
    return enc
