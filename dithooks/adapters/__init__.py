"""Model adapters: per model class, where the blocks are and what each hook point means.

``adapter_for(model)`` picks the adapter registered for the model's class name and falls back
to :class:`GenericAdapter`, which hooks any submodule by its path (``modules.<path>.in|out``).
A family joins with one import line below (its module decorates its adapter with
``@register``); see docs/adapters.md.
"""

from __future__ import annotations

import importlib

from torch import nn

from .base import Geometry, ModelAdapter
from .registry import ADAPTERS, register, registered_families
from .spec import PointSpec, post, pre
from .dit import DiTAdapter  # noqa: F401  (registers itself)

# family modules: one line each; a missing (not yet written) module is skipped
for _family in ("pixart", "sd3", "flux"):
    try:
        importlib.import_module(f"{__name__}.{_family}")
    except ModuleNotFoundError as _e:
        if _e.name != f"{__name__}.{_family}":
            raise


class GenericAdapter(ModelAdapter):
    """Fallback for unknown models: only ``modules.<path>.in|out`` hook points."""

    block_lists = ()


def adapter_for(model: nn.Module) -> ModelAdapter:
    cls = ADAPTERS.get(type(model).__name__, GenericAdapter)
    return cls(model)


__all__ = ["ADAPTERS", "DiTAdapter", "GenericAdapter", "Geometry", "ModelAdapter", "PointSpec", "adapter_for",
           "post", "pre", "register", "registered_families"]
