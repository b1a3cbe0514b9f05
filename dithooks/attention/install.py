"""Install attention processors on chosen blocks and put the originals back: the one home for
swapping processors (the attention extension, the JVP reference, probes and tests use it).

Which modules of block ``i`` take a processor is the adapter's business
(:meth:`~dithooks.adapters.base.ModelAdapter.attention_modules`; DiT: ``attn1``). Processors
are set module by module with ``set_processor`` (DiT has no ``set_attn_processor``, see
DIFFUSERS_NOTES). Every function takes a model (its adapter is looked up) or an adapter.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterable, Iterator

from torch import nn

#: module path -> the processor it had before installation
SavedProcessors = dict[str, Any]


def _adapter(model_or_adapter):
    from ..adapters import ModelAdapter, adapter_for

    if isinstance(model_or_adapter, ModelAdapter):
        return model_or_adapter
    return adapter_for(model_or_adapter)


def _model(model_or_adapter) -> nn.Module:
    from ..adapters import ModelAdapter

    return model_or_adapter.model if isinstance(model_or_adapter, ModelAdapter) else model_or_adapter


def attention_modules(model: nn.Module, layer: int) -> dict[str, nn.Module]:
    """``{module path: Attention}`` for block ``layer``, in module order (``model`` may be an adapter)."""
    adapter = _adapter(model)
    if not adapter.block_lists or not adapter.num_layers:
        raise TypeError(f"{type(_model(model)).__name__} has no transformer blocks")
    if not 0 <= layer < adapter.num_layers:
        raise IndexError(f"layer {layer} out of range: the model has {adapter.num_layers} blocks")
    return adapter.attention_modules(layer)


def install_processors(model: nn.Module, layers: Iterable[int],
                       make_processor: Callable[[int], Any]) -> SavedProcessors:
    """Set ``make_processor(layer)`` on every attention module of each block in ``layers``.

    ``make_processor`` is called once per attention module. Returns the original processors by
    module path, for :func:`restore_processors`. A module already in ``saved`` keeps its first
    original (a layer listed twice is still restored to the model's own processor).
    """
    saved: SavedProcessors = {}
    for layer in layers:
        for path, module in attention_modules(model, int(layer)).items():
            saved.setdefault(path, module.processor)
            module.set_processor(make_processor(int(layer)))
    return saved


def restore_processors(model: nn.Module, saved: SavedProcessors) -> None:
    """Put back the processors recorded by :func:`install_processors`."""
    root = _model(model)
    for path, processor in saved.items():
        root.get_submodule(path).set_processor(processor)


@contextlib.contextmanager
def installed_processors(model: nn.Module, layers: Iterable[int],
                         make_processor: Callable[[int], Any]) -> Iterator[SavedProcessors]:
    """``with`` form of install/restore; restores even when the body raises."""
    saved = install_processors(model, layers, make_processor)
    try:
        yield saved
    finally:
        restore_processors(model, saved)


@contextlib.contextmanager
def temporary_processor(module: nn.Module, processor) -> Iterator[None]:
    """Set ``processor`` on one attention ``module`` for a ``with`` block, then put back its own
    (for code that holds a module rather than a model and a layer: the JVP reference)."""
    saved = module.processor
    module.set_processor(processor)
    try:
        yield
    finally:
        module.set_processor(saved)
