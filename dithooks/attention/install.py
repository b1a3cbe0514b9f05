"""Install attention processors on chosen blocks and put the originals back.

DiT has no ``set_attn_processor`` (no AttentionMixin, see DIFFUSERS_NOTES), so processors are set
module by module with ``Attention.set_processor``. The attention modules of block ``i`` are found
inside ``model.transformer_blocks[i]`` (for DiT: ``attn1``; ``attn2`` is ``None``).
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterable, Iterator

from diffusers.models.attention_processor import Attention
from torch import nn

#: module path -> the processor it had before installation
SavedProcessors = dict[str, Any]


def attention_modules(model: nn.Module, layer: int) -> dict[str, Attention]:
    """``{module path: Attention}`` for block ``layer``, in module order."""
    blocks = getattr(model, "transformer_blocks", None)
    if blocks is None:
        raise TypeError(f"{type(model).__name__} has no transformer_blocks")
    if not 0 <= layer < len(blocks):
        raise IndexError(f"layer {layer} out of range: the model has {len(blocks)} blocks")
    prefix = f"transformer_blocks.{layer}"
    found = {f"{prefix}.{name}": m for name, m in blocks[layer].named_modules()
             if isinstance(m, Attention)}
    if not found:
        raise ValueError(f"block {layer} has no diffusers Attention module")
    return found


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
    for path, processor in saved.items():
        model.get_submodule(path).set_processor(processor)


@contextlib.contextmanager
def installed_processors(model: nn.Module, layers: Iterable[int],
                         make_processor: Callable[[int], Any]) -> Iterator[SavedProcessors]:
    """``with`` form of install/restore; restores even when the body raises."""
    saved = install_processors(model, layers, make_processor)
    try:
        yield saved
    finally:
        restore_processors(model, saved)
