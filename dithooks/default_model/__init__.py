"""The embedded default model: a 28-block class-conditional DiT trained on sklearn's 8x8 digits.

It ships inside the package (``weights/``) so that everything in dithooks works offline.
A small CNN digits classifier ships next to it; it judges generated samples and its
penultimate features serve as the encoder for semantic agreement.

Modules: ``config`` (architecture + schedule constants), ``data`` (digits and scaling),
``model`` (building the DiT and schedulers), ``train``, ``classifier``, ``evaluate``
(DDIM sampling + classification), ``plots``, ``weights_io`` (shipped folder).
"""

from __future__ import annotations

from .evaluate import evaluate_default_model
from .train import train_default_model
from .weights_io import default_model_dir, load_scheduler_config_from, load_transformer_from

__all__ = [
    "default_model_dir",
    "evaluate_default_model",
    "load_default_scheduler_config",
    "load_default_transformer",
    "load_digits_classifier",
    "train_default_model",
]


def load_default_transformer():
    """The shipped default ``DiTTransformer2DModel`` (fp32, eval mode)."""
    return load_transformer_from(default_model_dir())


def load_default_scheduler_config() -> dict:
    """The training noise schedule (``DDPMScheduler`` config) of the shipped model."""
    return load_scheduler_config_from(default_model_dir())


def load_digits_classifier():
    """The shipped digits classifier (eval mode); ``.features(x)`` gives penultimate features."""
    from .classifier import load_digits_classifier_from

    return load_digits_classifier_from(default_model_dir())
