"""Adapter for diffusers' ``FluxTransformer2DModel`` (Flux.1: double- then single-stream blocks).

Layer index ``i`` runs over the ``num_layers`` double-stream blocks first, then the
``num_single_layers`` single-stream blocks: ``blocks.{i}`` is ``transformer_blocks.{i}`` for
``i < num_layers`` and ``single_transformer_blocks.{i - num_layers}`` after that.

Double-stream block (``FluxTransformerBlock``), image stream ``h`` and text stream ``c``::

    x, gate_msa, shift_mlp, scale_mlp, gate_mlp = norm1(h, temb)       # norm1.linear: 6 chunks
    xc, c_gate_msa, ...                        = norm1_context(c, temb)
    a, ac  = attn(x, xc, rotary)               # joint softmax over [text; image]
    h_mid  = h + gate_msa * a ;  h_post = h_mid + gate_mlp * ff(LN(h_mid)(1+scale_mlp)+shift_mlp)
    c_mid  = c + c_gate_msa*ac;  c_post = c_mid + c_gate_mlp * ff_context(...)

Single-stream block (``FluxSingleTransformerBlock``): one sequence ``s = [c; h]``::

    x, gate = norm(s, temb)                    # norm.linear: 3 chunks shift, scale, gate
    s_post  = s + gate * proj_out(cat[attn(x, rotary), gelu(proj_mlp(x))])

Attention and MLP run in parallel on the same ``x``, so there is no ``resid_mid``; single blocks
have no ``W_O`` of their own either (``proj_out`` mixes the attention heads and the MLP).

Hook points live on the image tokens under the shared names and on the text tokens under
``context.*``. Inside a single block the image/text split of the joint sequence is the one of
the current model call: the adapter records the call's text and image token counts (and
``img_ids``, for windows) with a passive forward pre-hook on the model (:class:`FluxCall`).
Every point is read with a PyTorch hook on the module that computes it: reading is passive.
"""

from __future__ import annotations

import weakref
from typing import Any, Mapping

import torch
from torch import nn

from ..errors import DithooksError
from .base import Geometry, ModelAdapter, transformer_geometry
from .registry import register
from .spec import RESID, TEXT_RESID, VECTOR, PointSpec, final_out, post, pre

ADALN_CHUNKS = ("shift_msa", "scale_msa", "gate_msa", "shift_mlp", "scale_mlp", "gate_mlp")
SINGLE_ADALN_CHUNKS = ("shift_msa", "scale_msa", "gate_msa")
MLP_RESID = ("batch", "token", "mlp_channel")
HEADS = ("batch", "token", "head", "head_channel")
TEXT_MLP_RESID = ("batch", "text_token", "mlp_channel")

#: latent side (VAE latents, before 2x2 packing) assumed when nothing else is known: 1024 px / 8
DEFAULT_SAMPLE_SIZE = 128
#: prompt tokens assumed when nothing else is known (T5's max_sequence_length in FluxPipeline)
DEFAULT_TEXT_TOKENS = 512


# -- the current call: text/image split inside single blocks --------------------------------------
class FluxCall:
    """Token counts (and image ids) of the model call in progress, recorded by pre-hooks.

    Single-stream blocks see one ``[text; image]`` sequence; readers of image/text slices and
    the hooked processor ask this record where the image tokens start. The record is made by
    forward pre-hooks on the model and its two embedders that only look at their arguments (passive).
    """

    def __init__(self) -> None:
        self.img_ids: torch.Tensor | None = None
        # token counts the blocks see, recorded by pre-hooks on x_embedder/context_embedder (the
        # model's inputs; under context parallelism a rank's shard: they run after diffusers' split)
        self.local_text: int | None = None
        self.local_image: int | None = None

    def record_local(self, part: str, args) -> None:
        setattr(self, f"local_{part}", int(args[0].shape[1]) if args and args[0].ndim == 3 else None)

    def record(self, module, args, kwargs) -> None:
        ids = kwargs.get("img_ids", args[4] if len(args) > 4 else None)
        self.img_ids = None if ids is None else (ids[0] if ids.ndim == 3 else ids)
        self.local_text = self.local_image = None  # until this call's embedders have run
        return None

    def split(self, joint_len: int) -> int:
        """Text token count of a joint sequence of ``joint_len`` tokens in this call."""
        if self.local_text is None or self.local_image is None:
            raise DithooksError("a Flux single-stream hook point was read outside a model call "
                                "(the text/image split is not known)")
        if self.local_text + self.local_image != joint_len:
            raise DithooksError(f"Flux single block sees {joint_len} tokens, but the model call has "
                                f"{self.local_text} text + {self.local_image} image tokens")
        return self.local_text


_CALLS: "weakref.WeakKeyDictionary[nn.Module, FluxCall]" = weakref.WeakKeyDictionary()


def flux_call(model: nn.Module) -> FluxCall:
    """The (one per model) call record, installing its passive pre-hook on first use."""
    call = _CALLS.get(model)
    if call is None:
        call = FluxCall()
        model.register_forward_pre_hook(call.record, with_kwargs=True)
        for part, path in (("image", "x_embedder"), ("text", "context_embedder")):
            sub = getattr(model, path, None)
            if isinstance(sub, nn.Module):
                sub.register_forward_pre_hook(lambda m, args, part=part: call.record_local(part, args))
        _CALLS[model] = call
    return call


def _sliced(spec: PointSpec, call: FluxCall, part: str, dims: tuple[str, ...], local: str,
            doc: str) -> PointSpec:
    """``spec``'s value cut to the image (``part="image"``) or text tokens of the joint sequence."""
    base_read, base_write = spec.read, spec.write

    def read(args, kwargs, output):
        x = base_read(args, kwargs, output)
        n_text = call.split(x.shape[1])
        return x[:, n_text:] if part == "image" else x[:, :n_text]

    def write(args, kwargs, output, new):
        x = base_read(args, kwargs, output)
        n_text = call.split(x.shape[1])
        full = torch.cat([x[:, :n_text], new] if part == "image" else [new, x[:, n_text:]], dim=1)
        return base_write(args, kwargs, output, full)

    return PointSpec(local, spec.path, spec.kind, dims, doc, read,
                     write if base_write is not None else None)


def _per_head(spec: PointSpec, dims: str, doc: str, head_dim: int) -> PointSpec:
    """``spec``'s (batch, tokens, heads*head_dim) value viewed as (batch, tokens, head, head_dim)."""
    base_read, base_write = spec.read, spec.write

    def read(args, kwargs, output):
        x = base_read(args, kwargs, output)
        return x.unflatten(-1, (-1, head_dim))

    def write(args, kwargs, output, new):
        return base_write(args, kwargs, output, new.flatten(-2))

    return PointSpec(spec.local, spec.path, spec.kind, tuple(dims.split()), doc, read,
                     write if base_write is not None else None)


# -- latent packing (FluxPipeline._pack_latents / _unpack_latents / _prepare_latent_image_ids) --
def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, H/2 * W/2, 4C): 2x2 patches as tokens, row-major, channels (c, dy, dx)."""
    b, c, h, w = latents.shape
    if h % 2 or w % 2:
        raise DithooksError(f"Flux packs 2x2 latent patches: latent height and width must be even, got {h}x{w}")
    x = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Inverse of :func:`pack_latents`: (B, H/2 * W/2, 4C) -> (B, C, H, W)."""
    b, n, ch = tokens.shape
    x = tokens.view(b, height // 2, width // 2, ch // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, ch // 4, height, width)


def image_ids(height: int, width: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """(H/2 * W/2, 3) position ids ``(0, row, col)`` of the packed tokens (latent H x W)."""
    ids = torch.zeros(height // 2, width // 2, 3)
    ids[..., 1] = ids[..., 1] + torch.arange(height // 2)[:, None]
    ids[..., 2] = ids[..., 2] + torch.arange(width // 2)[None, :]
    return ids.reshape(-1, 3).to(device=device, dtype=dtype)


def text_ids(n_text: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """(L, 3) zeros: FluxPipeline gives every text token position (0, 0, 0)."""
    return torch.zeros(n_text, 3, device=device, dtype=dtype)


def calculate_shift(image_seq_len: int, base_seq_len: int = 256, max_seq_len: int = 4096,
                    base_shift: float = 0.5, max_shift: float = 1.15) -> float:
    """FluxPipeline's ``mu``: the time shift grows linearly with the image token count."""
    m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return image_seq_len * m + (base_shift - m * base_seq_len)


# -- the tables -----------------------------------------------------------------------------------
def _adaln_doc(chunk: str, stream: str) -> str:
    what, branch = chunk.split("_")
    return f"adaLN-Zero {what} for the {stream} {branch.upper()} branch, from temb (timestep, guidance, pooled text)"


def double_block_table() -> tuple[PointSpec, ...]:
    """``FluxTransformerBlock``: image stream under the shared names, text stream as ``context.*``."""
    rows = [
        pre("resid_pre", "", RESID, "image stream entering the block (h)", arg="hidden_states", position=0),
        pre("context.resid_pre", "", TEXT_RESID, "text stream entering the block (c)",
            arg="encoder_hidden_states", position=1),
    ]
    rows += [post(f"adaln.{c}", "norm1.linear", VECTOR, _adaln_doc(c, "image"), chunk=(j, 6))
             for j, c in enumerate(ADALN_CHUNKS)]
    rows += [post(f"context.adaln.{c}", "norm1_context.linear", VECTOR, _adaln_doc(c, "text"), chunk=(j, 6))
             for j, c in enumerate(ADALN_CHUNKS)]
    rows += [
        pre("attn.in", "attn", RESID, "LayerNorm(h)*(1+scale_msa)+shift_msa: the image input of joint attention",
            arg="hidden_states", position=0),
        pre("context.attn.in", "attn", TEXT_RESID,
            "LayerNorm(c)*(1+c_scale_msa)+c_shift_msa: the text input of joint attention",
            arg="encoder_hidden_states", position=1),
        post("attn.out", "attn", RESID, "joint attention output of the image tokens after to_out (W_O), "
             "before the gate_msa multiplication", item=0),
        post("context.attn.out", "attn", TEXT_RESID, "joint attention output of the text tokens after "
             "to_add_out, before the c_gate_msa multiplication", item=1),
        # h_mid is re-used after norm2 inside the block: a replacement is carried into the
        # block's output (element 1 image, 0 text)
        pre("resid_mid", "norm2", RESID, "image stream after attention, before the MLP (h + gate_msa*attn.out)",
            carry_to="", carry_item=1),
        pre("context.resid_mid", "norm2_context", TEXT_RESID,
            "text stream after attention, before its MLP (c + c_gate_msa*context.attn.out)",
            carry_to="", carry_item=0),
        pre("mlp.in", "ff", RESID, "LayerNorm(h_mid)*(1+scale_mlp)+shift_mlp: the input of the image MLP"),
        post("mlp.out", "ff", RESID, "image MLP output before the gate_mlp multiplication"),
        pre("context.mlp.in", "ff_context", TEXT_RESID, "LayerNorm(c_mid)*(1+c_scale_mlp)+c_shift_mlp: "
            "the input of the text MLP"),
        post("context.mlp.out", "ff_context", TEXT_RESID, "text MLP output before the c_gate_mlp multiplication"),
        post("resid_post", "", RESID, "image stream leaving the block", item=1),
        post("context.resid_post", "", TEXT_RESID, "text stream leaving the block", item=0),
    ]
    return tuple(rows)


def single_block_table(call: FluxCall, head_dim: int) -> tuple[PointSpec, ...]:
    """``FluxSingleTransformerBlock``: slices of the joint ``[text; image]`` sequence.

    There is no ``resid_mid`` (attention and MLP read the same normalised input in parallel), no
    ``W_O`` and no MLP output projection of their own, so no ``attn.out``/``mlp.out``: what is
    there is ``attn.z`` (per-head attention output), ``mlp.act`` (the MLP's hidden activation)
    and ``parallel.out`` (``proj_out`` of both branches, before the gate). Names shared with
    double blocks keep their dims, so stores can stack them over layers.
    """
    def image(spec, dims, doc):
        return _sliced(spec, call, "image", dims, spec.local, doc)

    def text(spec, dims, doc):
        return _sliced(spec, call, "text", dims, "context." + spec.local, doc)

    x_attn = pre("attn.in", "attn", RESID, "", arg="hidden_states", position=0)
    x_mlp = pre("mlp.in", "proj_mlp", RESID, "")
    z = post("attn.z", "attn", HEADS, "")
    act = post("mlp.act", "act_mlp", MLP_RESID, "")
    p_out = post("parallel.out", "proj_out", RESID, "")
    rows = [
        pre("resid_pre", "", RESID, "image tokens entering the block", arg="hidden_states", position=0),
        pre("context.resid_pre", "", TEXT_RESID, "text tokens entering the block",
            arg="encoder_hidden_states", position=1),
        *(post(f"adaln.{c}", "norm.linear", VECTOR,
               f"adaLN-Zero {c.split('_')[0]} shared by the parallel attention and MLP branches "
               "(gate multiplies proj_out of both), from temb", chunk=(j, 3))
          for j, c in enumerate(SINGLE_ADALN_CHUNKS)),
        image(x_attn, RESID, "LayerNorm(s)*(1+scale_msa)+shift_msa at the image tokens: the input of "
              "attention (the same tensor feeds the MLP; replacing it here changes attention only)"),
        text(x_attn, TEXT_RESID, "the normalised input of attention at the text tokens"),
        _per_head(image(z, RESID, ""), "batch token head head_channel",
                  "attention output per head at the image tokens, before any output projection "
                  "(TransformerLens' hook_z; single blocks have no W_O of their own: proj_out mixes the "
                  "heads with the MLP)", head_dim),
        _per_head(text(z, TEXT_RESID, ""), "batch text_token head head_channel",
                  "attention output per head at the text tokens, before any output projection", head_dim),
        image(x_mlp, RESID, "the normalised input of the MLP at the image tokens (the same values as "
              "attn.in; replacing it here changes the MLP only)"),
        text(x_mlp, TEXT_RESID, "the normalised input of the MLP at the text tokens"),
        image(act, MLP_RESID, "MLP hidden activation gelu(proj_mlp(x)) at the image tokens (mlp_channel = "
              "mlp_ratio * width; its output projection is part of proj_out)"),
        text(act, TEXT_MLP_RESID, "MLP hidden activation at the text tokens"),
        image(p_out, RESID, "proj_out(cat[attn.z, mlp.act]) at the image tokens: both branches after "
              "their output projection, before the gate"),
        text(p_out, TEXT_RESID, "proj_out of both branches at the text tokens, before the gate"),
        post("resid_post", "", RESID, "image tokens leaving the block", item=1),
        post("context.resid_post", "", TEXT_RESID, "text tokens leaving the block", item=0),
    ]
    return tuple(rows)


FLUX_MODEL: tuple[PointSpec, ...] = (
    post("embed.out", "x_embedder", RESID,
         "x_embedder(packed latents): the image stream entering block 0 (positions enter as rotary "
         "embeddings inside attention, not here)"),
    post("context_embed.out", "context_embedder", TEXT_RESID,
         "context_embedder(prompt_embeds): the text stream entering block 0"),
    post("time_embed.out", "time_text_embed", VECTOR,
         "temb: timestep (+ guidance when embedded) + pooled text projection; conditions every adaLN"),
)

FLUX_FINAL: tuple[PointSpec, ...] = (
    final_out("model output on the packed image tokens: the flow velocity, 4*latent channels per 2x2 patch "
              "(the sampler unpacks it to latent layout)", dims=("batch", "token", "out_channel")),
)


# -- the adapter ------------------------------------------------------------------------------------
@register
class FluxAdapter(ModelAdapter):
    """Flux.1 (dev: embedded guidance; schnell: none): double blocks, then single blocks.

    The latent size is not part of a Flux config (any resolution works): the geometry takes it
    from ``config.sample_size`` when the saved config carries one (VAE latent side, before
    packing), else 128 (1024 px); ``config.max_sequence_length`` likewise gives the text tokens
    (else 512, FluxPipeline's T5 length). Set ``adapter.sample_size`` / ``adapter.text_tokens``
    to override.
    """

    model_classes = ("FluxTransformer2DModel",)
    family = "flux"
    block_lists = ("transformer_blocks", "single_transformer_blocks")
    attention_paths = ("attn",)
    model_table = FLUX_MODEL
    final_table = FLUX_FINAL
    conditioning = "text"
    default_sampler = "flow"
    prediction = "flow"
    #: FLUX.1's scheduler config (FlowMatchEulerDiscreteScheduler), for checkpoints shipping none
    default_schedule = {"num_train_timesteps": 1000, "shift": 3.0, "use_dynamic_shifting": True,
                        "base_shift": 0.5, "max_shift": 1.15, "base_image_seq_len": 256,
                        "max_image_seq_len": 4096}

    def __init__(self, model: nn.Module):
        self.call = flux_call(model)
        self.block_tables = {"FluxTransformerBlock": double_block_table(),
                             "FluxSingleTransformerBlock": single_block_table(self.call, model.config.attention_head_dim)}
        cfg = model.config
        self.sample_size = int(cfg.get("sample_size", None) or DEFAULT_SAMPLE_SIZE)
        self.text_tokens = int(cfg.get("max_sequence_length", None) or DEFAULT_TEXT_TOKENS)
        super().__init__(model)

    # -- geometry ---------------------------------------------------------------------------------
    @property
    def geometry(self) -> Geometry:
        c = self.model.config
        return transformer_geometry(
            c, num_layers=c.num_layers + c.num_single_layers,
            sample_size=self.sample_size, latent_size=self.sample_size,
            patch_size=2 * c.patch_size,  # the pipeline's 2x2 packing, times the model's own patches
            latent_channels=c.in_channels // (4 * c.patch_size ** 2),
            text_tokens=self.text_tokens, text_width=c.joint_attention_dim)

    def dim_sizes(self, **settings) -> dict[str, int]:
        sizes = super().dim_sizes(**settings)
        singles = getattr(self.model, "single_transformer_blocks", None) or ()
        if len(singles):
            sizes["mlp_channel"] = int(singles[0].mlp_hidden_dim)
        return sizes

    # -- attention ------------------------------------------------------------------------------
    def make_processor(self, layer: int, emit, **settings) -> Any:
        from ..attention.flux_processor import HookedFluxAttnProcessor

        return HookedFluxAttnProcessor(layer, emit=emit, wanted=frozenset(), call=self.call, **settings)

    def processor_names(self, layer: int | None = None) -> dict[str, tuple[tuple[str, ...], str, bool]]:
        from ..attention.joint_processor import ALL_NAMES, NAME_DIMS, NAME_DOCS, WRITABLE_NAMES

        single = layer is not None and layer >= self.model.config.num_layers
        own = "to_q/to_k/to_v and RMSNorm norm_q/norm_k, shared with the image tokens" if single else \
            "add_q/k/v_proj and RMSNorm norm_added_q/norm_added_k"
        docs = {
            "attn.q": "image tokens' queries per head, after RMSNorm and the rotary embedding of (0, row, col): "
                      "what the softmax uses",
            "attn.k": "image tokens' keys per head, after RMSNorm and the rotary embedding of (0, row, col)",
            "attn.context_q": f"text tokens' queries per head ({own}), after the rotary embedding of (0, 0, 0)",
            "attn.context_k": f"text tokens' keys per head ({own}), after the rotary embedding of (0, 0, 0)",
            "attn.context_v": f"text tokens' values per head ({own.split(' and ')[0]})",
        }
        return {local: (NAME_DIMS[local], docs.get(local, NAME_DOCS[local]), local in WRITABLE_NAMES)
                for local in sorted(ALL_NAMES)}

    @property
    def jvp_support(self) -> frozenset[str]:
        """``jvp.full`` only (the core's generic ``torch.func.jvp`` of h -> resid_post of the image
        stream, the text stream, temb and rotary held fixed). The DiT part split (attn/mlp/routing/
        modulation) assumes one stream and a sequential adaLN-Zero block: Flux double blocks carry a
        text stream through the joint softmax and single blocks run attention and MLP in parallel
        on one joint sequence, so those parts are not offered."""
        return frozenset({"full"})

    # -- sampling -------------------------------------------------------------------------------
    @property
    def embedded_guidance(self) -> bool:
        """Flux-dev: guidance is a model input (no CFG batch); schnell: none."""
        return bool(self.model.config.guidance_embeds)

    def check_conditioning(self, cond, cfg: bool) -> None:
        """Prompt and pooled embeddings of the model's widths; embedded guidance only on models
        that take it (dev); CFG on a dev model only with negative prompts (true CFG)."""
        super().check_conditioning(cond, cfg)
        c = self.model.config
        if cond.pooled_prompt_embeds is None:
            raise DithooksError("flux models need pooled_prompt_embeds (the CLIP pooled vector) beside prompt_embeds")
        if cond.prompt_embeds.shape[-1] != c.joint_attention_dim:
            raise DithooksError(f"prompt_embeds have {cond.prompt_embeds.shape[-1]} channels; this model takes "
                                f"{c.joint_attention_dim} (joint_attention_dim)")
        if cond.pooled_prompt_embeds.shape[-1] != c.pooled_projection_dim:
            raise DithooksError(f"pooled_prompt_embeds have {cond.pooled_prompt_embeds.shape[-1]} channels; this "
                                f"model takes {c.pooled_projection_dim} (pooled_projection_dim)")
        if cond.guidance is not None and not self.embedded_guidance:
            raise DithooksError("this Flux model has no guidance embedding (guidance_embeds false, e.g. schnell): "
                                "drop the embedded guidance, or use the sampler's guidance (true CFG)")
        if cfg and self.embedded_guidance and cond.negative_prompt_embeds is None:
            raise DithooksError("Flux-dev takes guidance as a model input: set the conditioning's guidance "
                                "(e.g. 3.5) and keep the sampler's guidance at 1; true CFG needs negative_prompt_embeds")

    def encode_prompts(self, pipeline, prompts, negative_prompts=None):
        """Prompts to a :class:`~dithooks.conditioning.Conditioning` through a FluxPipeline's own
        ``encode_prompt`` (CLIP pooled + T5 sequence, ``max_sequence_length = text_tokens``).

        Called by :meth:`dithooks.loading.LoadedModel.encode_prompts` for a pipeline folder that
        ships its text encoders. Untested here: it needs ``transformers`` and real encoders."""
        from ..conditioning import Conditioning

        def encode(texts):
            pe, pooled, _ = pipeline.encode_prompt(prompt=list(texts), prompt_2=None,
                                                   max_sequence_length=int(self.text_tokens))
            return pe.float().cpu(), pooled.float().cpu()

        pe, pooled = encode(prompts)
        neg = encode(negative_prompts) if negative_prompts is not None else (None, None)
        return Conditioning(prompt_embeds=pe, pooled_prompt_embeds=pooled,
                            negative_prompt_embeds=neg[0], negative_pooled_prompt_embeds=neg[1])

    def timestep_input(self, t, batch: int, device) -> torch.Tensor:
        """FluxPipeline passes ``t / 1000`` (the model multiplies by 1000 again), in the model dtype."""
        t = torch.as_tensor(t, dtype=torch.float32, device=device).reshape(-1)
        return (t.expand(batch) / 1000).to(self.model_dtype())

    def model_kwargs(self, rows: Mapping[str, Any]) -> dict[str, Any]:
        prompt = rows.get("prompt_embeds")
        if prompt is None:
            raise DithooksError("flux models are text-conditional: give prompt embeddings")
        pooled = rows.get("pooled_prompt_embeds")
        if pooled is None:
            raise DithooksError("flux models need pooled_prompt_embeds (the CLIP pooled vector) beside prompt_embeds")
        dtype = self.model_dtype()
        kw = {"encoder_hidden_states": prompt.to(dtype), "pooled_projections": pooled.to(dtype),
              "txt_ids": text_ids(prompt.shape[1], prompt.device, dtype)}
        if self.embedded_guidance:
            g = rows.get("guidance")
            if g is None:
                g = 3.5  # FluxPipeline's default guidance_scale
            g = torch.as_tensor(g, dtype=torch.float32, device=prompt.device).reshape(-1)
            kw["guidance"] = g.expand(prompt.shape[0]).clone()
        return kw

    def denoise(self, x: torch.Tensor, t, rows: Mapping[str, Any]) -> torch.Tensor:
        """One model call on latents ``x`` (B, C, H, W): pack 2x2, ids, ``t/1000``; the velocity
        unpacked to (B, C, H, W), float32."""
        b, _, h, w = x.shape
        dtype = self.model_dtype()
        kw = self.model_kwargs(rows)
        out = self.model(hidden_states=pack_latents(x).to(dtype), timestep=self.timestep_input(t, b, x.device),
                         img_ids=image_ids(h, w, x.device, dtype), return_dict=False, **kw)[0]
        return unpack_latents(out.float(), h, w)

    def scheduler_kwargs(self, scheduler, steps: int) -> dict[str, Any]:
        """FluxPipeline's schedule: ``sigmas = linspace(1, 1/steps, steps)`` and, with dynamic
        shifting, ``mu`` from the image token count (:func:`calculate_shift`)."""
        import numpy as np

        cfg = getattr(scheduler, "config", {})
        kw: dict[str, Any] = {}
        if not cfg.get("use_flow_sigmas", False):
            kw["sigmas"] = np.linspace(1.0, 1 / steps, steps)
        if cfg.get("use_dynamic_shifting", False):
            kw["mu"] = calculate_shift(self.geometry.num_tokens, cfg.get("base_image_seq_len", 256),
                                       cfg.get("max_image_seq_len", 4096), cfg.get("base_shift", 0.5),
                                       cfg.get("max_shift", 1.15))
        return kw


__all__ = ["FluxAdapter", "FluxCall", "calculate_shift", "double_block_table", "flux_call", "image_ids",
           "pack_latents", "single_block_table", "text_ids", "unpack_latents"]
