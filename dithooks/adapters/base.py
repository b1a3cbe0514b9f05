"""What every model adapter provides: the blocks, their geometry and the named hook points."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..hookpoints import HookPoint, resolve_names, unknown_name_message
from ..errors import HookNameError


def first_tensor_arg(args: tuple, kwargs: dict, output: Any) -> torch.Tensor:
    return args[0] if args else next(iter(kwargs.values()))


def replace_first_arg(args: tuple, kwargs: dict, output: Any, new: torch.Tensor):
    if args:
        return (new,) + tuple(args[1:]), kwargs
    key = next(iter(kwargs))
    return args, {**kwargs, key: new}


def plain_output(args: tuple, kwargs: dict, output: Any) -> torch.Tensor:
    return output


def replace_output(args: tuple, kwargs: dict, output: Any, new: torch.Tensor):
    return new


@dataclass(frozen=True)
class Geometry:
    """Shapes a sampler and the store need to know about a latent-space DiT."""

    num_layers: int
    width: int
    num_heads: int
    head_dim: int
    in_channels: int
    out_channels: int
    sample_size: int
    patch_size: int
    num_classes: int | None

    @property
    def grid_side(self) -> int:
        return self.sample_size // self.patch_size

    @property
    def num_tokens(self) -> int:
        return self.grid_side**2

    @property
    def learned_sigma(self) -> bool:
        """True when the model predicts a variance beside epsilon (DiT-XL: out_channels = 2*in)."""
        return self.out_channels == 2 * self.in_channels

    @property
    def null_class(self) -> int | None:
        """Label of the unconditional branch for classifier-free guidance (the extra table row)."""
        return self.num_classes


class ModelAdapter:
    """Knows, for one model class, where the blocks are and what each hook point means.

    Subclasses fill :meth:`_build_points`. Names under ``modules.<path>.{in,out}`` work on every
    adapter (the generic fallback): they hook any submodule by its path.
    """

    model_classes: tuple[str, ...] = ()

    def __init__(self, model: nn.Module):
        self.model = model
        self._points: dict[str, HookPoint] = self._build_points()

    # -- to be provided by subclasses -------------------------------------------------------
    def _build_points(self) -> dict[str, HookPoint]:
        return {}

    @property
    def geometry(self) -> Geometry:
        raise NotImplementedError(f"{type(self).__name__} does not describe a latent DiT")

    def blocks(self) -> list[nn.Module]:
        return []

    def attention_module(self, layer: int) -> nn.Module:
        raise NotImplementedError(f"{type(self).__name__} does not expose attention modules")

    # -- shared ------------------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return len(self.blocks())

    def hook_points(self) -> dict[str, HookPoint]:
        """Every named hook point of this model (generic ``modules.*`` names are not listed)."""
        return dict(self._points)

    def point(self, name: str) -> HookPoint:
        if name in self._points:
            return self._points[name]
        if name.startswith("modules."):
            return self._generic_point(name)
        raise HookNameError(unknown_name_message(name, list(self._points)))

    def resolve(self, patterns: list[str] | str) -> list[str]:
        """Expand names/globs to hook point names; ``modules.*`` names pass through if valid."""
        if isinstance(patterns, str):
            patterns = [p for p in patterns.split(",") if p.strip()]
        generic = [p for p in patterns if p.strip().startswith("modules.")]
        named = [p for p in patterns if not p.strip().startswith("modules.")]
        out = resolve_names(named, self._points) if named else []
        for g in generic:
            self._generic_point(g.strip())
            out.append(g.strip())
        return out

    def _generic_point(self, name: str) -> HookPoint:
        body, _, which = name[len("modules."):].rpartition(".")
        if which not in ("in", "out"):
            raise HookNameError(f"generic hook point {name!r} must look like modules.<module path>.in|out")
        try:
            self.model.get_submodule(body)
        except AttributeError:
            paths = [p for p, _ in self.model.named_modules() if p]
            raise HookNameError(unknown_name_message(body, paths).replace("hook point", "module path")) from None
        if which == "in":
            return HookPoint(name, name, body, "pre", ("batch", "..."), f"first input of module {body}",
                             read=first_tensor_arg, write=replace_first_arg)
        return HookPoint(name, name, body, "post", ("batch", "..."), f"output of module {body}",
                         read=plain_output, write=replace_output)
