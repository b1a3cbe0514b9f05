"""What every model adapter provides: the blocks, their geometry, the named hook points and how
to call the model while sampling.

The family protocol (docs/adapters.md, /work/coord/FAMILIES.md): an adapter is mostly
declarative - a table of :class:`~dithooks.adapters.spec.PointSpec` rows per block class, that
:class:`ModelAdapter` expands over the blocks - plus a few methods whose defaults reproduce DiT:
``blocks``/``block_path``, ``attention_modules``/``make_processor``/``processor_names``,
``geometry``, ``jvp_support`` and the sampling side (``conditioning``, ``default_sampler``,
``prediction``, ``model_kwargs``, ``denoise``). The core (hook manager, attention and JVP
extensions, sampler, capture) asks the adapter and never names a module of a family itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import torch
from torch import nn

from ..errors import DithooksError, HookNameError
from ..hookpoints import HookPoint, block_name, block_template, resolve_names, split_name, unknown_name_message
from .spec import (PointSpec, first_tensor_arg, join, model_output, plain_output,  # noqa: F401
                   replace_first_arg, replace_model_output, replace_output)


@dataclass(frozen=True)
class Geometry:
    """Shapes a sampler and the store need to know about a latent-space diffusion transformer.

    The first nine fields are DiT's; the others default to what they mean for DiT:
    ``grid_height``/``grid_width`` the image-token grid (``sample_size // patch_size``),
    ``text_tokens`` the text sequence length (0 for class-conditional models), ``text_width`` the
    width of the text embeddings fed to the model, ``latent_channels``/``latent_size`` the
    latents the sampler draws and steps (``in_channels``/``sample_size``; Flux packs 2x2
    patches: in_channels = 4 * latent_channels).
    """

    num_layers: int
    width: int
    num_heads: int
    head_dim: int
    in_channels: int
    out_channels: int
    sample_size: int
    patch_size: int
    num_classes: int | None
    grid_height: int | None = None
    grid_width: int | None = None
    text_tokens: int = 0
    text_width: int = 0
    latent_channels: int | None = None
    latent_size: int | None = None

    def __post_init__(self):
        side = self.sample_size // self.patch_size if self.patch_size else self.sample_size
        for name, default in (("grid_height", side), ("grid_width", side),
                              ("latent_channels", self.in_channels), ("latent_size", self.sample_size)):
            if getattr(self, name) is None:
                object.__setattr__(self, name, int(default))

    @property
    def grid_side(self) -> int:
        """Side of the (square) image-token grid; a one-line error for a rectangular one."""
        if self.grid_height != self.grid_width:
            raise DithooksError(f"this model's token grid is {self.grid_height}x{self.grid_width}, not square")
        return self.grid_height

    @property
    def num_tokens(self) -> int:
        """Image tokens (the ``token`` axis of residual-stream hook points)."""
        return self.grid_height * self.grid_width

    @property
    def learned_sigma(self) -> bool:
        """True when the model predicts a variance beside epsilon (DiT-XL: out_channels = 2*in)."""
        return self.out_channels == 2 * self.in_channels

    @property
    def null_class(self) -> int | None:
        """Label of the unconditional branch for classifier-free guidance (the extra table row)."""
        return self.num_classes

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one sample's latents, as the sampler draws them."""
        return (self.latent_channels, self.latent_size, self.latent_size)

    def dim_sizes(self, *, top_k: int | None = None) -> dict[str, int]:
        """Size of each named axis of the shared dims vocabulary (``batch`` excluded). The
        ``query`` axis of ``attn.pattern_query`` runs over the processor's query tokens instead."""
        n, t = self.num_tokens, self.text_tokens
        return {"token": n, "query": n, "key": n,
                "channel": self.width, "head": self.num_heads, "head_channel": self.head_dim,
                "rank": top_k or 0, "out_channel": self.out_channels,
                "height": self.latent_size, "width": self.latent_size,
                "latent_channel": self.latent_channels,
                "text_token": t, "text_query": t, "text_key": t,
                "joint_token": n + t, "joint_query": n + t, "joint_key": n + t}


def transformer_geometry(config, **fields) -> Geometry:
    """:class:`Geometry` of a diffusers transformer config: the fields every family shares
    (``num_layers``, width = ``num_attention_heads * attention_head_dim``, heads, head_dim,
    ``in_channels``, ``out_channels`` (default ``in_channels``), ``sample_size``, ``patch_size``,
    ``num_classes=None``); ``fields`` add the family's own or override these."""
    heads, head_dim = config.num_attention_heads, config.attention_head_dim
    shared = dict(num_layers=config.num_layers, width=heads * head_dim, num_heads=heads, head_dim=head_dim,
                  in_channels=config.in_channels, out_channels=config.out_channels or config.in_channels,
                  sample_size=getattr(config, "sample_size", None), patch_size=config.patch_size, num_classes=None)
    return Geometry(**{**shared, **fields})


class ModelAdapter:
    """Knows, for one model class, where the blocks are, what each hook point means and how the
    model is called. Subclasses fill the class attributes; :meth:`_build_points` expands them.

    Names under ``modules.<path>.{in,out}`` work on every adapter (the generic fallback): they
    hook any submodule by its path.
    """

    #: diffusers class names this adapter handles
    model_classes: tuple[str, ...] = ()
    #: short family name ("dit", "pixart", "sd3", "flux")
    family: str = "generic"
    #: attributes of the model holding the blocks, in layer order (Flux: double, then single)
    block_lists: tuple[str, ...] = ("transformer_blocks",)
    #: block class name -> its table of hook points (local names relative to blocks.{i})
    block_tables: Mapping[str, tuple[PointSpec, ...]] = {}
    #: model-level points before the blocks (paths relative to the model)
    model_table: tuple[PointSpec, ...] = ()
    #: model-level points after the blocks
    final_table: tuple[PointSpec, ...] = ()
    #: attention modules (relative to the block) the attention extension replaces; None = every
    #: diffusers Attention module in the block
    attention_paths: tuple[str, ...] | None = None
    #: what a sample is conditioned on: "class" (labels) or "text" (prompt embeddings)
    conditioning: str = "class"
    #: sampler used when none is named: "ddim", "ddpm" or "flow"
    default_sampler: str = "ddim"
    #: what the model predicts: "epsilon" or "flow" (velocity)
    prediction: str = "epsilon"

    def __init__(self, model: nn.Module):
        self.model = model
        self._points: dict[str, HookPoint] = self._build_points()

    # -- blocks -------------------------------------------------------------------------------
    def _block_entries(self) -> list[tuple[str, nn.Module]]:
        out = []
        for attr in self.block_lists:
            for j, block in enumerate(getattr(self.model, attr, None) or ()):
                out.append((f"{attr}.{j}", block))
        return out

    def blocks(self) -> list[nn.Module]:
        """The blocks in layer order: layer index i = position in this list."""
        return [b for _, b in self._block_entries()]

    def block_path(self, layer: int) -> str:
        """Module path of block ``layer`` (``transformer_blocks.3``)."""
        entries = self._block_entries()
        if not 0 <= layer < len(entries):
            raise IndexError(f"layer {layer} out of range: the model has {len(entries)} blocks")
        return entries[layer][0]

    @property
    def num_layers(self) -> int:
        return len(self.blocks())

    def block_table(self, layer: int) -> tuple[PointSpec, ...]:
        """The hook-point table of block ``layer`` (looked up by its class name)."""
        block = self.blocks()[layer]
        return tuple(self.block_tables.get(type(block).__name__, ()))

    # -- attention ------------------------------------------------------------------------------
    def attention_modules(self, layer: int) -> dict[str, nn.Module]:
        """``{module path: Attention}`` of block ``layer`` that the attention extension replaces."""
        from diffusers.models.attention_processor import Attention

        prefix = self.block_path(layer)
        block = self.blocks()[layer]
        if self.attention_paths is not None:
            found = {}
            for rel in self.attention_paths:
                try:
                    found[join(prefix, rel)] = block.get_submodule(rel)
                except AttributeError:
                    continue
        else:
            found = {join(prefix, name): m for name, m in block.named_modules()
                     if isinstance(m, Attention) or hasattr(m, "set_processor") and hasattr(m, "processor")}
        if not found:
            raise ValueError(f"block {layer} has no attention module")
        return found

    def attention_module(self, layer: int) -> nn.Module:
        """The first attention module of block ``layer`` (compatibility)."""
        return next(iter(self.attention_modules(layer).values()))

    def make_processor(self, layer: int, emit, **settings) -> Any:
        """The family's hooked processor for block ``layer``; ``settings`` are the attention
        extension's (coupling, window, query_tile, query_tokens, top_k). It must expose
        ``.wanted``, ``.g``, ``.window`` (validating setters) and call ``emit(local, value)``."""
        from ..attention.processor import HookedAttnProcessor

        return HookedAttnProcessor(layer, emit=emit, wanted=frozenset(), **settings)

    def processor_names(self, layer: int | None = None) -> dict[str, tuple[tuple[str, ...], str, bool]]:
        """Processor hook points of block ``layer``: ``{local: (dims, doc, writable)}``."""
        from ..attention.processor import ALL_NAMES, NAME_DIMS, NAME_DOCS, WRITABLE_NAMES

        return {local: (NAME_DIMS[local], NAME_DOCS[local], local in WRITABLE_NAMES) for local in sorted(ALL_NAMES)}

    # -- JVPs -----------------------------------------------------------------------------------
    @property
    def jvp_support(self) -> frozenset[str]:
        """JVP parts (``full``, ``attn``, ...) offered as ``blocks.{i}.jvp.<part>`` hook points.

        The base offers none; a family that supports the generic ``full`` JVP (torch.func.jvp of
        the block from resid_pre to resid_post, other inputs held fixed) returns ``{"full"}``."""
        return frozenset()

    # -- geometry ---------------------------------------------------------------------------------
    @property
    def geometry(self) -> Geometry:
        raise NotImplementedError(f"{type(self).__name__} does not describe a latent diffusion transformer")

    def dim_sizes(self, **settings) -> dict[str, int]:
        """Size of each named axis of this model's hook points (see :meth:`Geometry.dim_sizes`)."""
        return self.geometry.dim_sizes(**settings)

    # -- sampling -------------------------------------------------------------------------------
    def make_conditioning(self, labels=None, **fields):
        """A :class:`~dithooks.conditioning.Conditioning` from class labels (class families) or
        the fields of one (text families)."""
        from ..conditioning import Conditioning

        if labels is not None:
            if self.conditioning != "class":
                raise DithooksError(f"{self.family} models are conditioned on text, not class labels: "
                                    "give prompt embeddings")
            return Conditioning(labels=torch.as_tensor([int(v) for v in labels], dtype=torch.long),
                                null_label=self.geometry.null_class)
        return Conditioning(**fields)

    def check_conditioning(self, cond, cfg: bool) -> None:
        """Refuse conditioning this model cannot use (one line)."""
        if self.conditioning == "class":
            if cond.labels is None:
                raise DithooksError(f"{self.family} models are class-conditional: give labels")
            n = self.geometry.num_classes
            if n is not None:
                bad = [int(y) for y in cond.labels if not 0 <= int(y) < n]
                if bad:
                    raise DithooksError(f"class label {bad[0]} is out of range: this model has classes 0-{n - 1}")
            if cfg and (cond.null_label is None):
                raise DithooksError("guidance needs a class-conditional model (num_embeds_ada_norm unset)")
        elif cond.prompt_embeds is None:
            raise DithooksError(f"{self.family} models are text-conditional: give prompt embeddings")

    def timestep_input(self, t, batch: int, device) -> torch.Tensor:
        """The model's ``timestep`` argument for scheduler timestep ``t`` (DiT: integer steps)."""
        return torch.full((batch,), int(t), device=device, dtype=torch.long)

    def model_kwargs(self, rows: Mapping[str, Any]) -> dict[str, Any]:
        """Model call keyword arguments for a batch of conditioning rows (``Conditioning.rows``)."""
        return {"class_labels": rows["labels"]}

    def model_dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def denoise(self, x: torch.Tensor, t, rows: Mapping[str, Any]) -> torch.Tensor:
        """One model call on latents ``x`` (B, C, H, W) at scheduler timestep ``t``: the prediction
        (epsilon or velocity) in latent layout, float32, variance channels dropped."""
        out = self.model(x.to(self.model_dtype()), timestep=self.timestep_input(t, x.shape[0], x.device),
                         **self.model_kwargs(rows))
        out = (out.sample if hasattr(out, "sample") else out[0]).float()
        return out[:, :self.geometry.latent_channels]

    def scheduler_kwargs(self, scheduler, steps: int) -> dict[str, Any]:
        """Extra ``set_timesteps`` arguments (flow matching with dynamic shifting: ``mu``)."""
        cfg = getattr(scheduler, "config", {})
        if cfg.get("use_dynamic_shifting", False):
            n = self.geometry.num_tokens
            x1, x2 = cfg.get("base_image_seq_len", 256), cfg.get("max_image_seq_len", 4096)
            y1, y2 = cfg.get("base_shift", 0.5), cfg.get("max_shift", 1.15)
            m = (y2 - y1) / (x2 - x1)
            return {"mu": n * m + (y1 - m * x1)}
        return {}

    # -- hook points ------------------------------------------------------------------------------
    def _expand(self, spec: PointSpec, layer: int | None, prefix: str) -> HookPoint:
        name = block_name(layer, spec.local)
        template = block_template(spec.local) if layer is not None else spec.local
        carry = None if spec.carry_to is None else join(prefix, spec.carry_to)
        return HookPoint(name, template, join(prefix, spec.path), spec.kind, spec.dims, spec.doc, layer,
                         spec.read, spec.write, carry, spec.carry_item if carry is not None else None)

    def _processor_points(self, layer: int, prefix: str) -> dict[str, HookPoint]:
        try:
            path = next(iter(self.attention_modules(layer)))
        except ValueError:
            return {}
        return {block_name(layer, local): HookPoint(
                    block_name(layer, local), block_template(local), path, "processor", tuple(dims), doc, layer,
                    write=_processor_write if writable else None)
                for local, (dims, doc, writable) in self.processor_names(layer).items()}

    def _jvp_points(self, layer: int, prefix: str) -> dict[str, HookPoint]:
        from ..jvp_hooks import jvp_points

        parts = self.jvp_support
        return jvp_points(layer, prefix, parts) if parts else {}

    def _build_points(self) -> dict[str, HookPoint]:
        pts: dict[str, HookPoint] = {}
        for spec in self.model_table:
            pts[spec.local] = self._expand(spec, None, "")
        for i in range(self.num_layers):
            prefix = self.block_path(i)
            table = self.block_table(i)
            proc = self._processor_points(i, prefix) if table else {}
            placed = False
            for spec in table:
                p = self._expand(spec, i, prefix)
                if spec.local.endswith("attn.out") and not placed:  # processor values come before W_O's output
                    pts.update(proc)
                    placed = True
                pts[p.name] = p
            if not placed:
                pts.update(proc)
            if table:
                pts.update(self._jvp_points(i, prefix))
        for spec in self.final_table:
            pts[spec.local] = self._expand(spec, None, "")
        return pts

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
        self.check_offered(named)
        out = resolve_names(named, self._points) if named else []
        for g in generic:
            self._generic_point(g.strip())
            out.append(g.strip())
        return out

    def require_class_conditional(self, what: str) -> None:
        """Refuse, in one line, to run ``what`` (an experiment written for class-conditional DiTs:
        Protocols I and II) on a text-conditioned family."""
        if self.conditioning != "class":
            raise DithooksError(f"{what} runs on class-conditional models (class labels, a null class for "
                                f"guidance); this {self.family} model is {self.conditioning}-conditioned")

    def check_offered(self, patterns):
        """``patterns`` unchanged, after refusing JVP points this family does not offer by name, with
        what it does offer (rather than as unknown hook points): SD3 blocks have ``jvp.full`` only,
        so the routing probe's ``jvp.heads.*`` or ``jvp.routing`` are refused as such."""
        from ..jvp_hooks import LOCAL_NAMES  # every blocks.{i}.jvp.* name any family can have

        have = self.__dict__.get("_block_locals")
        if have is None:  # the points never change after construction: work this out once
            have = self._block_locals = frozenset(
                local for layer, local in map(split_name, self._points) if layer is not None)
        for name in ([patterns] if isinstance(patterns, str) else patterns):
            parts = name.strip().split(".", 2)
            local = parts[2] if len(parts) == 3 and parts[0] == "blocks" else name.strip()
            if local in LOCAL_NAMES and local not in have:
                offered = ", ".join(f"jvp.{q}" for q in sorted(self.jvp_support)) or "no JVP points"
                raise HookNameError(f"{self.family} blocks do not offer {local} (they offer {offered}); the "
                                    "attn/mlp/routing/modulation split and its per-head points need DiT's "
                                    "adaLN-Zero block (docs/adapters.md)")
        return patterns

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


def _processor_write(*_):  # processor points are written by the processor itself (see emit)
    raise AssertionError("processor hook points are replaced inside the processor")
