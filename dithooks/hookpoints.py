"""Hook points: named places in a model where a value can be read or replaced.

A hook point does not own a module of its own (diffusers models are not ours to rewrite);
it names a value that flows through an existing module call - an argument going in (``pre``)
or the output coming out (``post``) - and knows how to pull that value out of the call and how
to put a replacement back. Adapters (``dithooks.adapters``) build them per model class, under
one naming scheme for every model::

    embed.out                        token embeddings (input of block 0)
    blocks.{i}.resid_pre             residual stream entering block i
    blocks.{i}.adaln.{shift,scale,gate}_{msa,mlp}
    blocks.{i}.attn.in               adaLN1(resid_pre): what attention reads
    blocks.{i}.attn.{q,k,v,logits,pattern,...}   attention internals (processor)
    blocks.{i}.attn.out              attention branch output, before the gate
    blocks.{i}.resid_mid             residual stream between attention and MLP
    blocks.{i}.mlp.in / mlp.out      MLP input (adaLN2(resid_mid)) and output, before the gate
    blocks.{i}.resid_post            residual stream leaving block i
    blocks.{i}.jvp.{...}             linearised block responses (JVPs)
    final.out                        the model's output (epsilon [, variance])

Families add their own local names (text stream ``context.*``, cross-attention ``cross_attn.*``,
joint patterns); each adapter's table (``dithooks/adapters``) is where a name gets its module,
dims and doc. :func:`split_name` / :func:`block_name` take names apart and build them.
"""

from __future__ import annotations

import difflib
import fnmatch
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

from .errors import HookNameError

# (args, kwargs, output) -> tensor ; output is None for pre hooks
Reader = Callable[[tuple, dict, Any], Any]
# (args, kwargs, output, new) -> (args, kwargs) for pre hooks, new output for post hooks
Writer = Callable[[tuple, dict, Any, Any], Any]


@dataclass(frozen=True)
class HookPoint:
    """One named value in a model's forward pass.

    ``dims`` names the axes of the value as hook functions see it; the leading ``batch`` axis
    is split by the sampler into (cfg, replica, sample) in stores. ``kind`` is ``pre`` (an
    argument of ``module_path``'s call), ``post`` (its output), ``processor`` (computed inside an
    attention processor) or ``jvp`` (computed on demand by linearising a block).
    """

    name: str
    template: str
    module_path: str
    kind: str
    dims: tuple[str, ...]
    doc: str
    layer: int | None = None
    read: Reader | None = field(default=None, compare=False, repr=False)
    write: Writer | None = field(default=None, compare=False, repr=False)
    # Module whose output must absorb (new - old) when this value is replaced, for values that
    # are re-used after the hooked call (the residual stream between attention and MLP).
    carry_to: str | None = None
    # element of carry_to's tuple output that absorbs the change (SD3/Flux blocks return tuples)
    carry_item: int | None = None

    @property
    def writable(self) -> bool:
        return self.write is not None


def layer_template(name: str) -> tuple[str, int | None]:
    """``blocks.3.resid_post`` -> (``blocks.{i}.resid_post``, 3); other names map to themselves."""
    parts = name.split(".")
    if len(parts) > 2 and parts[0] == "blocks" and parts[1].isdigit():
        return "blocks.{i}." + ".".join(parts[2:]), int(parts[1])
    return name, None


def split_name(name: str) -> tuple[int | None, str]:
    """``blocks.3.attn.q`` -> (3, ``attn.q``); model-level ``final.out`` -> (None, ``final.out``).

    The one place that knows how a hook point name is built; use it instead of slicing names
    with ``split(".", k)``. :func:`block_name` is its inverse.
    """
    parts = name.split(".", 2)
    if len(parts) == 3 and parts[0] == "blocks" and parts[1].isdigit():
        return int(parts[1]), parts[2]
    return None, name


def block_name(layer: int | None, local: str) -> str:
    """Inverse of :func:`split_name`: ``(3, "attn.q")`` -> ``blocks.3.attn.q``."""
    return local if layer is None else f"blocks.{int(layer)}.{local}"


def block_template(local: str) -> str:
    """The template of a per-block local name: ``attn.q`` -> ``blocks.{i}.attn.q``."""
    return "blocks.{i}." + local


def store_array_name(name: str) -> str:
    """Name of the Zarr array holding a hook point: the layer index becomes a ``layer`` dimension.

    ``blocks.3.resid_post`` -> ``blocks.resid_post``; ``final.out`` -> ``final.out``.
    """
    template, layer = layer_template(name)
    return template.replace("{i}.", "") if layer is not None else name


def resolve_names(patterns: Iterable[str], available: Iterable[str]) -> list[str]:
    """Expand exact names and glob patterns (``blocks.*.resid_post``) against ``available``.

    Keeps the order of first appearance. An unknown name raises :class:`HookNameError` listing the
    closest valid names.
    """
    if isinstance(available, (dict, set, frozenset)):  # a mapping's keys: looked up as they are
        avail, members = available, available
    else:  # (an adapter passes its point table: copying 1000+ names per call was most of the cost)
        avail = list(available)
        members = set(avail)
    out: list[str] = []
    seen: set[str] = set()
    for pat in patterns:
        pat = pat.strip()
        if any(c in pat for c in "*?["):
            hits = [n for n in avail if fnmatch.fnmatchcase(n, pat)]
        else:
            hits = [pat] if pat in members else []
        if not hits:
            raise HookNameError(unknown_name_message(pat, list(avail)))
        for h in hits:
            if h not in seen:
                seen.add(h)
                out.append(h)
    return out


def unknown_name_message(name: str, available: list[str]) -> str:
    close = difflib.get_close_matches(name, available, n=4, cutoff=0.5)
    if not close:  # suggest by suffix: "resid_pst" has no close full name but a close template
        templates = sorted({layer_template(a)[0] for a in available})
        close = difflib.get_close_matches(layer_template(name)[0], templates, n=4, cutoff=0.4)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    return f"unknown hook point {name!r}{hint} (`dithooks hooks` lists them all)"
