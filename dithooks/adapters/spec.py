"""The declarative part of a model adapter: one table row per hook point.

An adapter describes each block class with a table of :class:`PointSpec` rows (canonical local
name -> module path relative to the block, kind, reader/writer, dims, doc); the base adapter
(:class:`~dithooks.adapters.base.ModelAdapter`) expands the table over the blocks into named
:class:`~dithooks.hookpoints.HookPoint` objects ``blocks.{i}.<local>``. Model-level rows
(``embed.out``, ``final.out``, ``context_embed.out``, ...) use paths relative to the model.

Readers and writers are small functions of the hooked module call (see
:mod:`dithooks.hookpoints`); the constructors below cover what the four families need:

* :func:`pre` / :func:`post` - the first positional argument (or first keyword) going in, or
  the output coming out;
* ``arg="name"`` on :func:`pre` - a keyword argument (``encoder_hidden_states``, ``temb``);
* ``item=k`` on :func:`post` - element ``k`` of a tuple output (SD3/Flux blocks return
  ``(encoder_hidden_states, hidden_states)``);
* ``chunk=(j, n)`` on :func:`post` - chunk ``j`` of ``n`` along dim 1 (adaLN modulation vectors).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from ..hookpoints import Reader, Writer

RESID = ("batch", "token", "channel")
TEXT_RESID = ("batch", "text_token", "channel")
VECTOR = ("batch", "channel")

KINDS = ("pre", "post")


@dataclass(frozen=True)
class PointSpec:
    """One row of an adapter's table.

    ``local``: canonical local name (``resid_pre``, ``attn.out``, ``adaln.gate_msa``, ...).
    ``path``: module path relative to the block (``""`` = the block itself) or, for model-level
    rows, relative to the model. ``kind``: ``pre`` (an argument of that module's call) or
    ``post`` (its output). ``carry_to``: relative path of the module whose output absorbs
    ``new - old`` when this value is replaced (values re-used after the hooked call);
    ``carry_item``: which element of that module's tuple output absorbs it (None: the output).
    """

    local: str
    path: str
    kind: str
    dims: tuple[str, ...]
    doc: str
    read: Reader = field(compare=False, repr=False)
    write: Writer | None = field(default=None, compare=False, repr=False)
    carry_to: str | None = None
    carry_item: int | None = None

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"point {self.local!r}: kind must be one of {KINDS}, got {self.kind!r}")


# -- readers and writers -----------------------------------------------------------------------
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


def kwarg_reader(name: str, position: int | None = None) -> Reader:
    """Read keyword ``name`` (or positional ``position`` when the caller passed it that way)."""
    def read(args, kwargs, output):
        if name in kwargs:
            return kwargs[name]
        if position is not None and len(args) > position:
            return args[position]
        raise KeyError(f"the hooked call has no argument {name!r}")
    return read


def kwarg_writer(name: str, position: int | None = None) -> Writer:
    def write(args, kwargs, output, new):
        if name in kwargs or position is None or len(args) <= position:
            return args, {**kwargs, name: new}
        args = tuple(args)
        return args[:position] + (new,) + args[position + 1:], kwargs
    return write


def item_reader(k: int) -> Reader:
    def read(args, kwargs, output):
        return output[k]
    return read


def item_writer(k: int) -> Writer:
    def write(args, kwargs, output, new):
        out = list(output)
        out[k] = new
        return tuple(out)
    return write


def chunk_reader(j: int, n: int, dim: int = 1) -> Reader:
    def read(args, kwargs, output):
        return output.chunk(n, dim=dim)[j]
    return read


def chunk_writer(j: int, n: int, dim: int = 1) -> Writer:
    def write(args, kwargs, output, new):
        parts = list(output.chunk(n, dim=dim))
        parts[j] = new
        return torch.cat(parts, dim=dim)
    return write


def model_output(args, kwargs, output: Any) -> torch.Tensor:
    """The prediction of a diffusers model call (``.sample`` or the first tuple element)."""
    return output.sample if hasattr(output, "sample") else output[0]


def replace_model_output(args, kwargs, output: Any, new: torch.Tensor):
    if hasattr(output, "sample"):
        output.sample = new
        return output
    return (new,) + tuple(output[1:])


# -- row constructors ----------------------------------------------------------------------------
def pre(local: str, path: str, dims: tuple[str, ...], doc: str, *, arg: str | None = None,
        position: int | None = None, writable: bool = True, carry_to: str | None = None,
        carry_item: int | None = None) -> PointSpec:
    """An argument going into ``path``: the first one, or keyword ``arg``."""
    if arg is None:
        read, write = first_tensor_arg, replace_first_arg
    else:
        read, write = kwarg_reader(arg, position), kwarg_writer(arg, position)
    return PointSpec(local, path, "pre", tuple(dims), doc, read, write if writable else None, carry_to, carry_item)


def post(local: str, path: str, dims: tuple[str, ...], doc: str, *, item: int | None = None,
         chunk: tuple[int, int] | None = None, writable: bool = True) -> PointSpec:
    """The output of ``path``: whole, element ``item`` of a tuple, or ``chunk=(j, n)`` of dim 1."""
    if item is not None and chunk is not None:
        raise ValueError("give item or chunk, not both")
    if item is not None:
        read, write = item_reader(item), item_writer(item)
    elif chunk is not None:
        read, write = chunk_reader(*chunk), chunk_writer(*chunk)
    else:
        read, write = plain_output, replace_output
    return PointSpec(local, path, "post", tuple(dims), doc, read, write if writable else None)


LATENT_OUT = ("batch", "out_channel", "height", "width")


def final_out(doc: str, dims: tuple[str, ...] = LATENT_OUT) -> PointSpec:
    """The model-level ``final.out`` row: the model call's prediction (``.sample``), writable."""
    return PointSpec("final.out", "", "post", tuple(dims), doc, model_output, replace_model_output)


def join(prefix: str, rel: str) -> str:
    """Module path ``rel`` (relative, ``""`` = the block) under ``prefix``."""
    if not rel:
        return prefix
    return f"{prefix}.{rel}" if prefix else rel
