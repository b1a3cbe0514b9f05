"""Model adapters: per model class, where the blocks are and what each hook point means.

``adapter_for(model)`` picks the adapter registered for the model's class name and falls back
to :class:`GenericAdapter`, which hooks any submodule by its path (``modules.<path>.in|out``).
PixArt (``ada_norm_single`` blocks), SD3 (joint blocks with two streams) and Flux slot in by
registering an adapter class here with their own ``_build_points``.
"""

from __future__ import annotations

from torch import nn

from .base import Geometry, ModelAdapter
from .dit import DiTAdapter


class GenericAdapter(ModelAdapter):
    """Fallback for unknown models: only ``modules.<path>.in|out`` hook points."""


ADAPTERS: dict[str, type[ModelAdapter]] = {name: cls for cls in (DiTAdapter,) for name in cls.model_classes}


def adapter_for(model: nn.Module) -> ModelAdapter:
    cls = ADAPTERS.get(type(model).__name__, GenericAdapter)
    return cls(model)


__all__ = ["ADAPTERS", "DiTAdapter", "GenericAdapter", "Geometry", "ModelAdapter", "adapter_for"]
