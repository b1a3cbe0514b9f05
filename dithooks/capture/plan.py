"""Planning a capture before anything runs: which hook points (:func:`expand_hooks`), which
arrays and how big (:func:`planned_arrays`, sized from the model's geometry), and the request
as stored metadata (:func:`request_metadata`)."""

from __future__ import annotations

import dataclasses
import difflib
import functools
import fnmatch
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from ..errors import HookNameError
from ..hookpoints import layer_template, store_array_name
from ..jvp_hooks import jvp_batch_axes
from ..store.layout import layer_dim
from ..store.metadata import jsonable

# value dims whose size grows with N^2: the arrays worth a warning before a capture starts
PATTERN_DIMS = ("query", "key")


@dataclass(frozen=True)
class PlannedArray:
    """An array a capture will write: its name, dims, shape and size (before compression)."""

    name: str
    dims: tuple[str, ...]
    shape: tuple[int, ...]
    nbytes: int
    hook: str


def _short_name(template: str) -> str:
    return template[len("blocks.{i}."):] if template.startswith("blocks.{i}.") else template


@functools.lru_cache(maxsize=8)
def _name_tables(available: tuple[str, ...]) -> tuple[frozenset, list[str], frozenset]:
    """``available``'s templates, short per-block names and names as a set: the same model's
    table serves every capture (and the probes' names) of a process, worked out once."""
    templates = frozenset(layer_template(n)[0] for n in available)
    short = sorted(_short_name(t) for t in templates if t.startswith("blocks.{i}."))
    return templates, short, frozenset(available)


def expand_hooks(patterns: tuple[str, ...] | list[str], layers: list[int], available: list[str]) -> list[str]:
    """Turn short names (``resid_post``, ``attn.out``) into per-layer names for ``layers``.

    Globs (``blocks.2*.mlp.out``, ``*.resid_post``) expand against ``available`` and keep only
    points of the selected ``layers`` (and points outside blocks); a glob that selects nothing
    there, or a full per-block name (``blocks.3.resid_post``) of a block outside ``layers``, is
    refused with :class:`HookNameError`. ``modules.*`` names pass through unchanged.

    A short name that only some blocks have (Flux: ``context.resid_post`` exists in double
    blocks only) expands to the selected blocks that have it.
    """
    from ..layers import format_layers

    out: list[str] = []
    templates, short, known = _name_tables(tuple(available))
    chosen = set(layers)
    for p in patterns:
        p = p.strip()
        if not p:
            continue
        if "blocks.{i}." + p in templates:
            names = [f"blocks.{i}.{p}" for i in layers]
            have = [n for n in names if n in known]
            if not have:
                raise HookNameError(f"hook point {p!r} exists in no block selected by --layers "
                                    f"({format_layers(sorted(chosen))})")
            out += have
        elif p.startswith("modules."):
            out.append(p)
        elif any(c in p for c in "*?["):
            hits = [n for n in available if fnmatch.fnmatchcase(n, p)]
            kept = [n for n in hits if layer_template(n)[1] is None or layer_template(n)[1] in chosen]
            if not kept:
                where = (f" among the selected blocks {format_layers(sorted(chosen))} (--layers)" if hits
                         else "")
                raise HookNameError(f"hook pattern {p!r} matches no hook point{where} "
                                    "(`dithooks hooks` lists them all)")
            out += kept
        elif p in known:
            template, layer = layer_template(p)
            if layer is not None and layer not in chosen:
                raise HookNameError(f"hook point {p!r} is in block {layer}, which --layers "
                                    f"({format_layers(sorted(chosen))}) does not select: add it to --layers, "
                                    f"or use the short name {_short_name(template)!r}")
            out.append(p)
        elif "." not in p or not p.startswith(("blocks.", "final.", "embed.")):
            close = difflib.get_close_matches(p, short + sorted(n for n in known if not n.startswith("blocks.")), 4, 0.5)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise HookNameError(f"unknown hook point {p!r}{hint} (`dithooks hooks` lists them all)")
        else:
            out.append(p)
    return out


def dim_sizes(adapter: Any, top_k: int | None, text_tokens: int | None = None) -> dict[str, int]:
    """Size of every named value dim of ``adapter``'s hook points (image tokens, text tokens,
    joint sequence, channels, latent grid), from the model's geometry (``Geometry.dim_sizes``,
    plus the adapter's own dims). ``text_tokens``: the prompt embeddings' length L, which sizes
    the text and joint dims of this capture (the geometry's default length otherwise)."""
    sizes = dict(adapter.dim_sizes(top_k=top_k))
    if text_tokens is not None:
        geo = dataclasses.replace(adapter.geometry, text_tokens=int(text_tokens))
        sizes.update(geo.dim_sizes(top_k=top_k))
    return sizes


def array_layers(hook_names: Sequence[str], captured: Sequence[int]) -> dict[str, list[int]]:
    """Arrays whose point only some captured blocks have -> those blocks (sorted); arrays over
    every captured block are left out (their layer dim is ``layer``)."""
    out = {}
    for arr, entry in hook_array_table(hook_names).items():
        layers = sorted(set(entry["layers"]))
        if layers and layers != sorted(int(i) for i in captured):
            out[arr] = layers
    return out


def partial_layer_dims(hook_names: Sequence[str], captured: Sequence[int]) -> dict[str, list[int]]:
    """Partial layer dims (store/layout.py layer_dim) -> their blocks: coordinates to write."""
    return {layer_dim(ls, captured): ls for ls in array_layers(hook_names, captured).values()}


def planned_arrays(adapter: Any, hook_names: Sequence[str], *, steps: int, layers: Sequence[int],
                   batch_axes: Sequence[tuple[str, int]], jvp_direction: Any, store_dtype: torch.dtype,
                   top_k: int | None, query_tokens: Sequence[int] | None,
                   text_tokens: int | None = None) -> list[PlannedArray]:
    """What the raw hooks will write, sized from the model geometry before anything runs
    (``modules.*`` points, whose size is known only once they run, are left out)."""
    sizes = dim_sizes(adapter, top_k, text_tokens)
    partial = array_layers(hook_names, layers)
    itemsize = torch.empty((), dtype=store_dtype).element_size()
    plan: dict[str, PlannedArray] = {}
    for name in hook_names:
        point = adapter.point(name)
        arr = store_array_name(name)
        b_axes = jvp_batch_axes(batch_axes, jvp_direction) if point.kind == "jvp" else batch_axes
        value_dims = tuple(point.dims[1:])
        if "..." in value_dims:  # generic module hooks: size unknown until the first call
            continue
        value = [sizes.get(d, 0) for d in value_dims]
        if layer_template(name)[0].endswith("attn.pattern_query") and query_tokens:
            value[value_dims.index("query")] = len(query_tokens)
        own = partial.get(arr, list(layers))
        lead = (steps,) + ((len(own),) if point.layer is not None else ())
        shape = lead + tuple(k for _, k in b_axes) + tuple(value)
        ldim = (layer_dim(own, layers),) if point.layer is not None else ()
        dims = ("step",) + ldim + tuple(a for a, _ in b_axes) + value_dims
        plan[arr] = PlannedArray(arr, dims, shape, int(np.prod(shape)) * itemsize, layer_template(name)[0])
    return list(plan.values())


def hook_array_table(hook_names: Sequence[str]) -> dict[str, Any]:
    """Metadata ``hook_arrays``: array -> {hook template, captured layers}."""
    table: dict[str, Any] = {}
    for name in hook_names:
        template, layer = layer_template(name)
        entry = table.setdefault(store_array_name(name), {"hook": template, "layers": []})
        if layer is not None:
            entry["layers"].append(layer)
    return table


def extras(cfg: Any, wants_jvp: bool) -> dict[str, Any]:
    """Settings that change what is computed: replicas, attention processor options, JVPs."""
    c, out = cfg, {}
    if c.replicas is not None:
        r = c.replicas
        out["replicas"] = {"kappa": r.kappa, "g": r.g, "couple_until": r.couple_until,
                           "share_noise_until": r.share_noise_until,
                           "layers": None if r.layers is None else list(r.layers)}
    att = {k: v for k, v in (("window", c.window), ("window_layers", c.window_layers), ("top_k", c.top_k),
                             ("query_tokens", list(c.query_tokens) if c.query_tokens else None))
           if v is not None}
    if att:
        out["attention"] = att
    if wants_jvp:
        out["jvp"] = c.jvp.describe()
    return out


def request_metadata(cfg: Any, loaded: Any, sampler: Any, conditioning: Any, hook_names: Sequence[str],
                     layers: Sequence[int], wants_jvp: bool, probes: list) -> dict[str, Any]:
    """The request as stored in ``attrs['dithooks']`` (its RESUME_KEYS must match to resume).

    Class-conditional stores hold ``labels``; text-conditioned ones ``labels`` None, ``prompts``
    (each sample's row of the embeddings) and ``prompt_embeds`` (sha256, rows, shape, ...) and ``prompt_embeds_file``.
    """
    s = cfg.sampler
    req = {
        "model_id": loaded.model_id,
        "model_class": type(loaded.transformer).__name__,
        "model_config": dict(loaded.transformer.config),
        "sampler": {"name": s.name, "steps": s.steps, "eta": s.eta, "guidance": s.guidance},
        "scheduler": {"class": type(sampler.scheduler).__name__, "config": dict(sampler.scheduler.config)},
        "seeds": list(cfg.seeds),
        "labels": list(conditioning.labels) if conditioning.kind == "class" else None,
        "hooks": list(hook_names), "layers": list(layers),
        "storage_dtype": cfg.storage_dtype, "compute_dtype": cfg.compute_dtype,
        "compression": cfg.compression, "device": cfg.device,
        "batch_axes": [list(a) for a in sampler.batch_axes(len(cfg.seeds))],
        "extras": extras(cfg, wants_jvp),
        "probes": probes,
    }
    if conditioning.kind == "text":
        req["conditioning"] = "text"
        req["prompts"] = list(conditioning.prompts)
        source = dict(conditioning.source)
        req["prompt_embeds_file"] = source.pop("file", None)  # where it was read (not compared on resume)
        req["prompt_embeds"] = source
    return jsonable(req)
