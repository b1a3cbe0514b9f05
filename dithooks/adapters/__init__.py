"""Model adapters: per model class, where the blocks are and what each hook point means.

``adapter_for(model)`` picks the adapter registered for the model's class name and falls back
to :class:`GenericAdapter`, which hooks any submodule by its path (``modules.<path>.in|out``).
A family joins by adding its module name to ``FAMILY_MODULES`` below (its module decorates
its adapter with ``@register``); see docs/adapters.md.
"""

from __future__ import annotations

import importlib

from torch import nn

from .base import Geometry, ModelAdapter
from .registry import ADAPTERS, register, registered_families
from .spec import PointSpec, post, pre
from .dit import DiTAdapter  # noqa: F401  (registers itself)

#: the family modules; each registers its adapter with @register. A new family adds its name
#: here (an import error in a family module surfaces: nothing is skipped)
FAMILY_MODULES = ("dit", "pixart", "sd3", "flux")
for _family in FAMILY_MODULES:
    importlib.import_module(f"{__name__}.{_family}")


class GenericAdapter(ModelAdapter):
    """Fallback for unknown models: only ``modules.<path>.in|out`` hook points."""

    block_lists = ()


def adapter_for(model: nn.Module) -> ModelAdapter:
    cls = ADAPTERS.get(type(model).__name__, GenericAdapter)
    return cls(model)


__all__ = ["ADAPTERS", "FAMILY_MODULES", "DiTAdapter", "GenericAdapter", "Geometry", "ModelAdapter", "PointSpec", "adapter_for",
           "post", "pre", "register", "registered_families"]
