"""The adapter registry: diffusers class name -> adapter class.

A family file joins with the ``@register`` decorator on its adapter class and one import line in
``dithooks/adapters/__init__.py``; :func:`adapter_for` then picks it for models of its
``model_classes``.
"""

from __future__ import annotations

ADAPTERS: dict[str, type] = {}


def register(cls: type) -> type:
    """Class decorator: make ``cls`` the adapter of every class name in ``cls.model_classes``."""
    names = tuple(getattr(cls, "model_classes", ()))
    if not names:
        raise ValueError(f"{cls.__name__} names no model_classes")
    for name in names:
        other = ADAPTERS.get(name)
        if other is not None and other is not cls and other.__qualname__ != cls.__qualname__:
            raise ValueError(f"{name} already has the adapter {other.__name__}")
        ADAPTERS[name] = cls
    return cls


def registered_families() -> dict[str, type]:
    """``{family: adapter class}`` of every registered adapter."""
    return {cls.family: cls for cls in ADAPTERS.values()}
