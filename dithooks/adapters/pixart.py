"""Adapter for diffusers' ``PixArtTransformer2DModel`` (PixArt-α: adaLN-single, cross-attention to text).

Block ``i`` is ``transformer_blocks[i]``, a ``BasicTransformerBlock`` with
``norm_type="ada_norm_single"``. The model computes, once per call (diffusers 0.3x-0.42)::

    h0          = pos_embed(x)                                   # embed.out
    t6, t_emb   = adaln_single(timestep)                         # t6 = linear(silu(t_emb)): (B, 6D)
    c           = caption_projection(prompt_embeds)              # context_embed.out: (B, L, D)

and every block (``timestep`` argument = ``t6``; its own ``scale_shift_table`` (6, D))::

    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp =
                  (scale_shift_table[None] + t6.reshape(B, 6, D)).chunk(6, dim=1)   # inline, no module
    x       = norm1(h) * (1 + scale_msa) + shift_msa              # attn.in      (attn1's input)
    h_mid   = h + gate_msa * attn1(x)                             # attn.out = attn1(x), before the gate
    h_cross = h_mid + attn2(h_mid, c, mask)                       # no norm, no gate before/after
    y       = norm2(h_cross) * (1 + scale_mlp) + shift_mlp        # mlp.in       (ff's input)
    h_post  = h_cross + gate_mlp * ff(y)                          # mlp.out = ff(y), before the gate

How each hook point is read (all passive: PyTorch hooks on modules that already compute the
value; reading never changes the arithmetic, tested bit for bit):

* ``resid_pre``: first argument of the block; ``resid_post``: its output.
* ``attn.in`` / ``attn.out``: argument / output of ``attn1``. ``mlp.in`` / ``mlp.out``: of ``ff``.
* ``resid_mid`` (= h_mid): the first argument of ``attn2`` - PixArt feeds the residual stream
  to cross-attention without a norm. Trick for writing it: the block re-uses its own h_mid in
  ``h_mid + attn2(...)``, so the replacement's difference is carried into ``attn2``'s output (as
  DiT's ``resid_mid`` is carried into the block's).
* ``cross_attn.in``: the input of ``attn2.to_q``, which the processor calls on ``attn2``'s
  first argument as it is - the same tensor as ``resid_mid``, read one call later, so writing it
  changes only what the cross-attention queries read (and a ``resid_mid`` replacement shows in
  it); keys and values come from the text (``context_embed.out``).
* ``cross_attn.out``: the output of ``attn2.to_out.0`` (the output projection), which *is*
  ``attn2``'s output bit for bit (``to_out.1`` is dropout, identity in eval;
  ``rescale_output_factor`` is 1; no residual connection). Read there, not on ``attn2`` itself,
  so a ``resid_mid`` replacement's carried difference does not show up in it.
* ``resid_cross`` (= h_cross, PixArt's extra residual point between cross-attention and MLP):
  the first argument of ``norm2``; a replacement is carried into the block's output.
* ``adaln.<chunk>``: no module computes them (the sum with the block's ``scale_shift_table`` is
  inline in ``BasicTransformerBlock.forward``). Trick: a pre-hook on the block reads its
  ``timestep`` argument ``t6`` and adds the block's own ``scale_shift_table`` exactly as the block
  does - the same single float addition on the same operands, so the value equals the block's
  bit for bit (tested). A replacement is written back into ``t6`` as ``new - table[j]``, which
  the block adds to ``table[j]`` again: the block then uses ``new`` to one rounding.
* ``embed.out``: ``pos_embed``'s output; ``context_embed.out``: ``caption_projection``'s output
  (the text tokens every block's cross-attention reads as keys and values);
  ``time_embed.out``: ``adaln_single.emb``'s output (``t_emb``, also the final layer's input).
* ``final.adaln.shift`` / ``final.adaln.scale``: the output layer's modulation, computed inline
  from the model's ``scale_shift_table`` and ``t_emb``; read like the blocks' (``adaln_single``'s
  output ``t_emb`` plus the table, the model's own expression), read-only because both share
  ``t_emb``. ``final.in``: the input of ``proj_out``.
* ``final.out``: the model's output ``(B, 2C, H, W)`` with learned sigma: epsilon in the first
  ``in_channels`` channels, the variance interpolation behind them.

Processor points: one :class:`~dithooks.attention.pixart_processor.HookedPixArtAttnProcessor`
serves both attention modules of a hooked (or coupled, or windowed) block, and only such blocks.
Self-attention (``attn1``) calls are ``HookedAttnProcessor``'s: ``attn.q/k/v/logits/pattern/...``
on the image tokens, replica coupling and Chebyshev windows on the ``grid x grid`` patch grid.
Cross-attention (``attn2``) calls emit ``cross_attn.q/k/v/logits/pattern/n_eff/entropy/
pattern_headmean`` (image queries, text keys: patterns ``(batch, head, query, text_key)``) and
are never coupled or windowed - the keys are text tokens, with no grid to window, and both
replicas of a pair read the same text; with nothing wanted they are diffusers'
``AttnProcessor2_0`` step for step (bit for bit, tested with a padding mask, and at g > 0).

JVPs: ``jvp_support = {"full"}``, the core's generic JVP of resid_pre -> resid_post (timestep
and text held fixed). The DiT split (``dithooks.jvp``: attn / routing / modulation / mlp / cross)
assumes an adaLN-Zero block ``h + a1 Attn(adaLN1 h) + a2 MLP(adaLN2 .)`` whose modulation comes
from ``norm1.linear``. Here ``attn``, ``routing`` and ``modulation`` would be well defined (the
self-attention branch has that form; only its vectors come from ``scale_shift_table + t6``) but
are not wired to this table; ``mlp`` and ``cross`` are not the same objects, since the MLP reads
``h_mid + attn2(h_mid)``, a third, ungated branch between attention and MLP.

Not supported: ``set_chunk_feed_forward`` (``ff`` would then be called once per chunk, and
``mlp.in/out`` would see chunks).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import torch
from torch import nn

from ..errors import DithooksError
from ..hookpoints import split_name
from .base import Geometry, ModelAdapter, transformer_geometry
from .registry import register
from .spec import RESID, TEXT_RESID, VECTOR, PointSpec, final_out, post, pre

ADALN_CHUNKS = ("shift_msa", "scale_msa", "gate_msa", "shift_mlp", "scale_mlp", "gate_mlp")
#: PixArt-α's T5 prompt length (pipeline ``max_sequence_length``); the config does not record it
DEFAULT_TEXT_TOKENS = 120
#: the conditioning extra holding the text attention mask (1 = token, 0 = padding), as the pipeline's
#: ``prompt_attention_mask``
MASK = "prompt_attention_mask"
#: ``timestep`` is the 5th positional parameter of ``BasicTransformerBlock.forward``
_TIMESTEP_POS = 4


# -- adaLN-single: the block's table plus the shared timestep projection ----------------------------
def _block_t6(args: tuple, kwargs: dict) -> torch.Tensor:
    if "timestep" in kwargs:
        return kwargs["timestep"]
    if len(args) > _TIMESTEP_POS:
        return args[_TIMESTEP_POS]
    raise KeyError("the block was called without its timestep argument")


def _adaln_reader(block: nn.Module, j: int):
    def read(args, kwargs, output):
        t6 = _block_t6(args, kwargs)
        # exactly the block's own expression (one elementwise add), then chunk j: (B, D)
        mods = block.scale_shift_table[None] + t6.reshape(t6.shape[0], 6, -1)
        return mods[:, j]
    return read


def _adaln_writer(block: nn.Module, j: int):
    def write(args, kwargs, output, new):
        t6 = _block_t6(args, kwargs)
        parts = t6.reshape(t6.shape[0], 6, -1).clone()  # t6 is shared by all blocks: never in place
        table = block.scale_shift_table[j].to(parts.dtype)
        parts[:, j] = new.to(parts.dtype) - table
        t6_new = parts.reshape(t6.shape)
        if "timestep" in kwargs or len(args) <= _TIMESTEP_POS:
            return args, {**kwargs, "timestep": t6_new}
        args = tuple(args)
        return args[:_TIMESTEP_POS] + (t6_new,) + args[_TIMESTEP_POS + 1:], kwargs
    return write


def block_table(block: nn.Module) -> tuple[PointSpec, ...]:
    """The hook points of one PixArt block, paths relative to the block."""
    rows = [pre("resid_pre", "", RESID, "residual stream entering the block (h)")]
    for j, chunk in enumerate(ADALN_CHUNKS):
        what, branch = chunk.split("_")
        rows.append(PointSpec(
            f"adaln.{chunk}", "", "pre", VECTOR,
            f"adaLN-single {what} for the {branch.upper()} branch: the block's scale_shift_table[{j}] "
            f"plus chunk {j} of adaln_single's timestep projection",
            _adaln_reader(block, j), _adaln_writer(block, j)))
    rows += [
        pre("attn.in", "attn1", RESID,
            "norm1(h)*(1+scale_msa)+shift_msa: the input of self-attention"),
        post("attn.out", "attn1", RESID,
             "self-attention output after W_O, before the gate_msa multiplication"),
    ]
    if block.attn2 is not None:
        rows += [
            pre("resid_mid", "attn2", RESID,
                "residual stream after self-attention, before cross-attention (h + gate_msa*attn.out)",
                carry_to="attn2"),
            pre("cross_attn.in", "attn2.to_q", RESID,
                "what cross-attention's queries read: resid_mid itself (PixArt applies no norm "
                "before cross-attention); a replacement changes only the queries' input"),
            post("cross_attn.out", "attn2.to_out.0", RESID,
                 "what cross-attention to the text adds to the residual stream (no gate): "
                 "W_O softmax(Q K_text^T/sqrt(d)) V_text + b_O"),
            pre("resid_cross", "norm2", RESID,
                "residual stream after cross-attention, before the MLP (resid_mid + cross_attn.out)",
                carry_to=""),
        ]
    else:  # no cross-attention: the MLP follows self-attention directly
        rows.append(pre("resid_mid", "norm2", RESID,
                        "residual stream after self-attention, before the MLP", carry_to=""))
    rows += [
        pre("mlp.in", "ff", RESID, "norm2(resid_cross)*(1+scale_mlp)+shift_mlp: the input of the MLP"),
        post("mlp.out", "ff", RESID, "MLP output before the gate_mlp multiplication"),
        post("resid_post", "", RESID, "residual stream leaving the block"),
    ]
    return tuple(rows)


def model_table(model: nn.Module) -> tuple[PointSpec, ...]:
    """Model-level hook points, paths relative to the model."""
    rows = [post("embed.out", "pos_embed", RESID,
                 "patch embedding plus positional embedding: the residual stream entering block 0"),
            post("time_embed.out", "adaln_single.emb", VECTOR,
                 "timestep embedding t_emb; adaln_single.linear(silu(t_emb)) is added to each "
                 "block's scale_shift_table, t_emb itself to the final layer's")]
    if getattr(model, "caption_projection", None) is not None:
        rows.append(post("context_embed.out", "caption_projection", TEXT_RESID,
                         "caption_projection(prompt_embeds): the text tokens cross-attention reads "
                         "as keys and values in every block"))
    return tuple(rows)


def _final_adaln_reader(model: nn.Module, j: int):
    def read(args, kwargs, output):
        t_emb = output[1]  # adaln_single returns (t6, t_emb)
        # the model's own expression for its output layer's (shift, scale), then chunk j: (B, D)
        return (model.scale_shift_table[None] + t_emb[:, None].to(model.scale_shift_table.device))[:, j]
    return read


def final_table(model: nn.Module) -> tuple[PointSpec, ...]:
    """Model-level points after the blocks: the output layer's adaLN and input, the output."""
    rows = [PointSpec(f"final.adaln.{what}", "adaln_single", "post", VECTOR,
                      f"the output layer's {what}: the model's scale_shift_table[{j}] plus t_emb "
                      "(read-only: shift and scale share t_emb)", _final_adaln_reader(model, j))
            for j, what in enumerate(("shift", "scale"))]
    rows.append(pre("final.in", "proj_out", RESID,
                    "norm_out(h)*(1+final scale)+final shift: what the output projection reads"))
    return tuple(rows) + PIXART_FINAL


PIXART_FINAL: tuple[PointSpec, ...] = (
    final_out("model output in latent layout: epsilon, then the learned-sigma channels"),
)


@register
class PixArtAdapter(ModelAdapter):
    """PixArt-α (``PixArtTransformer2DModel``); see the module docstring for each hook point."""

    model_classes = ("PixArtTransformer2DModel",)
    family = "pixart"
    block_lists = ("transformer_blocks",)
    #: one HookedPixArtAttnProcessor serves both: self-attention (attn.*, coupling, windows) and
    #: cross-attention (cross_attn.* read, never coupled or windowed)
    attention_paths = ("attn1", "attn2")
    conditioning = "text"
    default_sampler = "ddim"
    prediction = "epsilon"

    def __init__(self, model: nn.Module, text_tokens: int = DEFAULT_TEXT_TOKENS):
        self.text_tokens = int(text_tokens)
        super().__init__(model)

    # -- hook points ------------------------------------------------------------------------------
    @property
    def model_table(self) -> tuple[PointSpec, ...]:
        return model_table(self.model)

    @property
    def final_table(self) -> tuple[PointSpec, ...]:
        return final_table(self.model)

    def block_table(self, layer: int) -> tuple[PointSpec, ...]:
        # built per block: the adaLN readers hold the block's own scale_shift_table
        return block_table(self.blocks()[layer])

    # -- attention ---------------------------------------------------------------------------------
    def make_processor(self, layer: int, emit, **settings):
        from ..attention.pixart_processor import HookedPixArtAttnProcessor

        return HookedPixArtAttnProcessor(layer, emit=emit, **settings)

    def processor_names(self, layer: int | None = None) -> dict[str, tuple[tuple[str, ...], str, bool]]:
        from ..attention.pixart_processor import CROSS_NAME_DIMS, CROSS_NAME_DOCS, CROSS_WRITABLE

        names = super().processor_names(layer)
        blk = self.blocks()[layer] if layer is not None else self.blocks()[0]
        if getattr(blk, "attn2", None) is not None:
            names.update({n: (d, CROSS_NAME_DOCS[n], n in CROSS_WRITABLE) for n, d in CROSS_NAME_DIMS.items()})
        return names

    def _processor_points(self, layer: int, prefix: str):
        # the base files every processor point under the first attention module (attn1); the
        # cross-attention values are computed in attn2's call
        pts = super()._processor_points(layer, prefix)
        return {n: (dataclasses.replace(p, module_path=f"{prefix}.attn2")
                    if split_name(n)[1].startswith("cross_attn.") else p) for n, p in pts.items()}

    @property
    def jvp_support(self) -> frozenset[str]:
        return frozenset({"full"})

    # -- geometry ---------------------------------------------------------------------------------
    @property
    def geometry(self) -> Geometry:
        c = self.model.config
        return transformer_geometry(c, text_tokens=self.text_tokens,
                                    text_width=c.caption_channels or c.cross_attention_dim or 0)

    # -- sampling -----------------------------------------------------------------------------------
    def check_conditioning(self, cond, cfg: bool) -> None:
        """Prompt embeddings (M, L, caption_channels) [+ a (M, L) 1/0 mask in
        ``extras["prompt_attention_mask"]``]; the text length L becomes ``geometry.text_tokens``."""
        super().check_conditioning(cond, cfg)
        want = self.model.config.caption_channels or self.model.config.cross_attention_dim
        emb = cond.prompt_embeds
        if want is not None and emb.shape[-1] != want:
            raise DithooksError(f"prompt embeddings have {emb.shape[-1]} channels; this PixArt model takes "
                                f"{want} (caption_channels: T5-XXL's 4096 for PixArt-α)")
        for what, extras in (("", cond.extras), ("negative ", cond.negative_extras)):
            unknown = sorted(set(extras) - {MASK})
            if unknown:
                raise DithooksError(f"PixArt takes no conditioning {what}extra {unknown[0]!r} (only {MASK!r})")
            mask = extras.get(MASK)
            if mask is not None and tuple(torch.as_tensor(mask).shape) != tuple(emb.shape[:2]):
                raise DithooksError(f"{what}{MASK} has shape {tuple(torch.as_tensor(mask).shape)}; the prompt embeddings "
                                    f"need (samples, tokens) = {tuple(emb.shape[:2])}")
        if cond.pooled_prompt_embeds is not None or cond.negative_pooled_prompt_embeds is not None:
            raise DithooksError("PixArt takes no pooled prompt embeddings (that is SD3/Flux): drop them")
        if cond.guidance is not None:
            raise DithooksError("PixArt has no embedded guidance (that is Flux-dev): use the sampler's --guidance")
        neg = cond.negative_prompt_embeds
        if neg is not None and tuple(neg.shape) != tuple(emb.shape):
            raise DithooksError(f"negative prompt embeddings have shape {tuple(neg.shape)}, the prompt "
                                f"embeddings {tuple(emb.shape)}: pad both to the same length")
        self.text_tokens = int(emb.shape[1])

    def encode_prompts(self, pipeline, prompts, negative_prompts=None):
        """Prompts to a :class:`~dithooks.conditioning.Conditioning` through a PixArtAlphaPipeline's
        own ``encode_prompt`` (T5, padded to ``max_sequence_length = text_tokens``, with its masks).

        The null branch is the pipeline's: T5 of ``negative_prompts``, default ``""`` (PixArt-α's
        convention), not zeros. Called by :meth:`dithooks.loading.LoadedModel.encode_prompts` for a
        pipeline folder that ships its text encoder; tested with a stand-in pipeline only (real
        encoders need ``transformers`` and T5 weights)."""
        from ..conditioning import Conditioning

        prompts = list(prompts)
        negative = "" if negative_prompts is None else list(negative_prompts)
        if isinstance(negative, list) and len(negative) not in (1, len(prompts)):
            raise DithooksError(f"{len(negative)} negative prompts for {len(prompts)} prompts: give one, or one each")
        if isinstance(negative, list) and len(negative) == 1:
            negative = negative * len(prompts)
        emb, mask, neg, neg_mask = pipeline.encode_prompt(
            prompts, do_classifier_free_guidance=True, negative_prompt=negative, num_images_per_prompt=1,
            clean_caption=False, max_sequence_length=int(self.text_tokens))
        return Conditioning(prompt_embeds=emb.float().cpu(), negative_prompt_embeds=neg.float().cpu(),
                            extras={MASK: mask.cpu()}, negative_extras={MASK: neg_mask.cpu()})

    def model_kwargs(self, rows: Mapping[str, Any]) -> dict[str, Any]:
        """``encoder_hidden_states`` (the T5 embeddings; the model projects them with
        ``caption_projection``), ``encoder_attention_mask`` (1 keep / 0 padding) and the
        micro-conditions of 1024-px checkpoints."""
        emb = rows["prompt_embeds"]
        dtype = self.model_dtype()
        kwargs = {"encoder_hidden_states": emb.to(dtype),
                  "added_cond_kwargs": self.added_cond_kwargs(emb.shape[0], emb.device, dtype)}
        mask = rows.get(MASK)
        if mask is not None:
            kwargs["encoder_attention_mask"] = mask.to(device=emb.device, dtype=dtype)
        return kwargs

    def added_cond_kwargs(self, batch: int, device, dtype) -> dict[str, Any]:
        """PixArt's micro-conditions: image resolution and aspect ratio, for 1024-px checkpoints."""
        if not getattr(self.model, "use_additional_conditions", False):
            return {"resolution": None, "aspect_ratio": None}
        side = self.model.config.sample_size * 8  # latent side x the VAE's factor 8, as the pipeline
        res = torch.tensor([[side, side]], dtype=dtype, device=device).expand(batch, 2)
        ar = torch.ones((batch, 1), dtype=dtype, device=device)
        return {"resolution": res, "aspect_ratio": ar}
