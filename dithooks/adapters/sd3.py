"""Adapter for diffusers' ``SD3Transformer2DModel`` (Stable Diffusion 3 / 3.5, MMDiT).

Block ``i`` is ``transformer_blocks[i]``, a ``JointTransformerBlock`` with two streams that have
their own weights - the image stream ``h`` (N tokens) and the text (context) stream ``c``
(L tokens) - and ONE joint softmax over ``[image; text]``::

    x, gate_msa, shift_mlp, scale_mlp, gate_mlp = norm1(h, temb)            # norm1.linear: 6 chunks
    xc, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = norm1_context(c, temb)
    a, ac  = attn(x, xc)                         # joint attention (JointAttnProcessor2_0)
    h_mid  = h + gate_msa * a                    # [SD3.5 dual blocks: + gate_msa2 * attn2(x2)]
    h_post = h_mid + gate_mlp * ff(LN(h_mid) * (1 + scale_mlp) + shift_mlp)
    c_mid  = c + c_gate_msa * ac
    c_post = c_mid + c_gate_mlp * ff_context(LN(c_mid) * (1 + c_scale_mlp) + c_shift_mlp)

The last block is ``context_pre_only``: ``norm1_context`` is an ``AdaLayerNormContinuous``
(chunks ``scale``, ``shift``; no gates), the text stream only serves as keys/values and the
block returns no text stream, so that block has no ``context.attn.out`` / ``context.mlp.*`` /
``context.resid_{mid,post}`` points.

Hook points: the image stream under the shared names (``resid_pre``, ``adaln.*``, ``attn.in``,
``attn.out``, ``resid_mid``, ``mlp.in``, ``mlp.out``, ``resid_post``), the text stream under
``context.*``, the joint-attention processor's points (:mod:`dithooks.attention.joint_processor`)
and the model-level ``embed.out``, ``context_embed.out``, ``time_embed.out``, ``final.out``.
Every point is read with a PyTorch hook on the module that computes it (bit for bit). A
replaced ``resid_mid`` (read at ``norm2``'s input) is carried to the block's output tuple
(element 1 for the image stream, 0 for ``context.resid_mid``), since the block re-uses the
value after the hooked call.

Sampling: flow matching (``FlowMatchEulerDiscreteScheduler``, ``shift`` from the scheduler
config); the model's ``timestep`` is the scheduler's timestep ``t = sigma * 1000`` as the SD3
pipeline passes it; conditioning = precomputed ``prompt_embeds`` (M, L, joint_attention_dim) and
``pooled_prompt_embeds`` (M, pooled_projection_dim), CFG null branch = the ``negative_*``
embeddings or zeros.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import nn

from ..errors import DithooksError
from .base import Geometry, ModelAdapter, transformer_geometry
from .registry import register
from .spec import RESID, TEXT_RESID, VECTOR, PointSpec, final_out, post, pre

ADALN_CHUNKS = ("shift_msa", "scale_msa", "gate_msa", "shift_mlp", "scale_mlp", "gate_mlp")
#: SD35AdaLayerNormZeroX (SD3.5 dual-attention blocks): three more for attn2
ADALN_CHUNKS_X = ADALN_CHUNKS + ("shift_msa2", "scale_msa2", "gate_msa2")
#: AdaLayerNormContinuous (the last block's norm1_context): scale first, then shift
CONTINUOUS_CHUNKS = ("scale_msa", "shift_msa")

#: SD3's text sequence when none is given: 77 CLIP tokens + 256 T5 tokens (the pipeline default)
DEFAULT_TEXT_TOKENS = 333


def _adaln_doc(chunk: str, stream: str) -> str:
    what, branch = chunk.split("_")
    branch = {"msa": "attention", "mlp": "MLP", "msa2": "second (image-only) attention"}[branch]
    return f"adaLN-Zero {what} of the {stream} stream's {branch} branch, from temb (timestep + pooled text)"


def _image_points(chunks: tuple[str, ...], dual: bool) -> tuple[PointSpec, ...]:
    pts = [
        pre("resid_pre", "", RESID, "image residual stream entering the block (h)", arg="hidden_states"),
        *(post(f"adaln.{c}", "norm1.linear", VECTOR, _adaln_doc(c, "image"), chunk=(j, len(chunks)))
          for j, c in enumerate(chunks)),
        pre("attn.in", "attn", RESID, "LayerNorm(h)*(1+scale_msa)+shift_msa: the image input of joint attention",
            arg="hidden_states"),
        post("attn.out", "attn", RESID, "joint attention's image output after W_O (to_out), before gate_msa",
             item=0),
    ]
    if dual:
        pts += [pre("attn2.in", "attn2", RESID, "SD3.5 dual block: LayerNorm(h)*(1+scale_msa2)+shift_msa2, "
                    "the input of the second, image-only attention", arg="hidden_states"),
                post("attn2.out", "attn2", RESID, "SD3.5 dual block: image-only attention output, before gate_msa2")]
    pts += [
        pre("resid_mid", "norm2", RESID, "image residual stream after attention, before the MLP "
            "(h + gate_msa*attn.out [+ gate_msa2*attn2.out])", carry_to="", carry_item=1),
        pre("mlp.in", "ff", RESID, "LayerNorm(resid_mid)*(1+scale_mlp)+shift_mlp: the input of the image MLP"),
        post("mlp.out", "ff", RESID, "image MLP output before the gate_mlp multiplication"),
        post("resid_post", "", RESID, "image residual stream leaving the block", item=1),
    ]
    return tuple(pts)


def _context_points(last: bool) -> tuple[PointSpec, ...]:
    pts = [pre("context.resid_pre", "", TEXT_RESID, "text (context) stream entering the block (c)",
               arg="encoder_hidden_states")]
    if last:
        pts += [post(f"context.adaln.{c}", "norm1_context.linear", VECTOR,
                     f"last block (context_pre_only): AdaLayerNormContinuous {c.split('_')[0]} of the text "
                     "stream's attention input, from temb", chunk=(j, 2)) for j, c in enumerate(CONTINUOUS_CHUNKS)]
    else:
        pts += [post(f"context.adaln.{c}", "norm1_context.linear", VECTOR, _adaln_doc(c, "text"), chunk=(j, 6))
                for j, c in enumerate(ADALN_CHUNKS)]
    pts.append(pre("context.attn.in", "attn", TEXT_RESID, "the text input of joint attention "
                   "(LayerNorm(c)*(1+c_scale_msa)+c_shift_msa)", arg="encoder_hidden_states"))
    if not last:
        pts += [
            post("context.attn.out", "attn", TEXT_RESID,
                 "joint attention's text output after to_add_out, before c_gate_msa", item=1),
            pre("context.resid_mid", "norm2_context", TEXT_RESID,
                "text stream after attention, before its MLP (c + c_gate_msa*context.attn.out)",
                carry_to="", carry_item=0),
            pre("context.mlp.in", "ff_context", TEXT_RESID, "LayerNorm(context.resid_mid)*(1+c_scale_mlp)+c_shift_mlp"),
            post("context.mlp.out", "ff_context", TEXT_RESID, "text MLP output before the c_gate_mlp multiplication"),
            post("context.resid_post", "", TEXT_RESID, "text stream leaving the block", item=0),
        ]
    return tuple(pts)


def block_table(last: bool, dual: bool) -> tuple[PointSpec, ...]:
    """The table of a JointTransformerBlock (``last``: context_pre_only; ``dual``: SD3.5 attn2)."""
    return _image_points(ADALN_CHUNKS_X if dual else ADALN_CHUNKS, dual) + _context_points(last)


SD3_MODEL: tuple[PointSpec, ...] = (
    post("embed.out", "pos_embed", RESID,
         "patch embedding plus positional embedding: the image stream entering block 0"),
    post("context_embed.out", "context_embedder", TEXT_RESID,
         "prompt embeddings projected to the model width: the text stream entering block 0"),
    post("time_embed.out", "time_text_embed", VECTOR,
         "temb = timestep embedding + pooled text projection: what every adaLN reads"),
)
SD3_FINAL: tuple[PointSpec, ...] = (final_out("model output in latent layout: the flow-matching velocity"),)


@register
class SD3Adapter(ModelAdapter):
    """SD3 / SD3.5 MMDiT: joint attention over [image; text], flow matching, text conditioning.

    ``text_tokens`` (default 333 = 77 CLIP + 256 T5 tokens, the pipeline's) sizes the text axes
    of capture stores; set it to your prompt embeddings' length (``adapter.text_tokens = L``)
    before planning a capture with other embeddings.
    """

    model_classes = ("SD3Transformer2DModel",)
    family = "sd3"
    block_lists = ("transformer_blocks",)
    attention_paths = ("attn",)
    model_table = SD3_MODEL
    final_table = SD3_FINAL
    conditioning = "text"
    default_sampler = "flow"
    prediction = "flow"

    def __init__(self, model: nn.Module, text_tokens: int = DEFAULT_TEXT_TOKENS):
        self.text_tokens = int(text_tokens)
        super().__init__(model)

    # -- blocks and tables --------------------------------------------------------------------
    def block_table(self, layer: int) -> tuple[PointSpec, ...]:
        block = self.blocks()[layer]
        return block_table(last=bool(block.context_pre_only), dual=bool(getattr(block, "use_dual_attention", False)))

    # -- attention ---------------------------------------------------------------------------
    def make_processor(self, layer: int, emit, **settings) -> Any:
        from ..attention.joint_processor import HookedJointAttnProcessor

        return HookedJointAttnProcessor(layer, emit=emit, order="image_first", **settings)

    def processor_names(self, layer: int | None = None) -> dict[str, tuple[tuple[str, ...], str, bool]]:
        from ..attention.joint_processor import ALL_NAMES, NAME_DIMS, NAME_DOCS, WRITABLE_NAMES

        return {local: (NAME_DIMS[local], NAME_DOCS[local], local in WRITABLE_NAMES) for local in sorted(ALL_NAMES)}

    # -- JVPs ----------------------------------------------------------------------------------
    @property
    def jvp_support(self) -> frozenset[str]:
        """``full`` only: the generic JVP (torch.func.jvp of the block from resid_pre to
        resid_post, the text stream and temb held fixed). The routing/modulation split of THEORY
        §3 is DiT's single-stream adaLN-Zero algebra; in the joint block the image rows' softmax
        also runs over text keys whose values move with the text stream, which this JVP holds
        fixed, so the split is not offered."""
        return frozenset({"full"})

    # -- geometry ------------------------------------------------------------------------------
    @property
    def geometry(self) -> Geometry:
        c = self.model.config
        return transformer_geometry(c, text_tokens=self.text_tokens, text_width=c.joint_attention_dim)

    # -- sampling ----------------------------------------------------------------------------
    def check_conditioning(self, cond, cfg: bool) -> None:
        c = self.model.config
        if cond.prompt_embeds is None:
            raise DithooksError("SD3 models are text-conditional: give prompt embeddings (prompt_embeds "
                                "and pooled_prompt_embeds)")
        if cond.prompt_embeds.shape[-1] != c.joint_attention_dim:
            raise DithooksError(f"prompt embeddings have {cond.prompt_embeds.shape[-1]} channels; this model "
                                f"takes {c.joint_attention_dim} (joint_attention_dim)")
        if cond.pooled_prompt_embeds is None:
            raise DithooksError("SD3 models need pooled_prompt_embeds beside prompt_embeds")
        if cond.pooled_prompt_embeds.shape[-1] != c.pooled_projection_dim:
            raise DithooksError(f"pooled prompt embeddings have {cond.pooled_prompt_embeds.shape[-1]} channels; "
                                f"this model takes {c.pooled_projection_dim} (pooled_projection_dim)")
        for name in ("negative_prompt_embeds", "negative_pooled_prompt_embeds"):
            neg, pos = getattr(cond, name), getattr(cond, name[len("negative_"):])
            if neg is not None and neg.shape[1:] != pos.shape[1:]:
                raise DithooksError(f"{name} has shape {tuple(neg.shape[1:])} per sample, "
                                    f"{name[len('negative_'):]} {tuple(pos.shape[1:])}")

    def encode_prompts(self, pipeline, prompts, negative_prompts=None):
        """Prompts to a :class:`~dithooks.conditioning.Conditioning` through a
        StableDiffusion3Pipeline's own ``encode_prompt`` (CLIP-L + CLIP-G pooled, and the
        sequence [77 CLIP tokens; T5 tokens] with ``max_sequence_length = text_tokens - 77``).

        The null branch is the pipeline's: the encoders of ``negative_prompts``, default ``""``
        (SD3's convention), not zeros. Called by
        :meth:`dithooks.loading.LoadedModel.encode_prompts` for a pipeline folder that ships its
        text encoders; tested with a stand-in pipeline only (real encoders need ``transformers``
        and weights)."""
        from ..conditioning import Conditioning

        prompts = list(prompts)
        clip = int(getattr(pipeline, "tokenizer_max_length", 77))
        if self.text_tokens <= clip:
            raise DithooksError(f"text_tokens = {self.text_tokens} leaves no T5 tokens after SD3's {clip} CLIP "
                                f"tokens: set text_tokens above {clip} (default {DEFAULT_TEXT_TOKENS})")
        negative = "" if negative_prompts is None else list(negative_prompts)
        if isinstance(negative, list) and len(negative) not in (1, len(prompts)):
            raise DithooksError(f"{len(negative)} negative prompts for {len(prompts)} prompts: give one, or one each")
        if isinstance(negative, list) and len(negative) == 1:
            negative = negative * len(prompts)
        pe, npe, ppe, nppe = pipeline.encode_prompt(
            prompt=prompts, prompt_2=None, prompt_3=None, num_images_per_prompt=1, do_classifier_free_guidance=True,
            negative_prompt=negative, max_sequence_length=self.text_tokens - clip)
        return Conditioning(prompt_embeds=pe.float().cpu(), pooled_prompt_embeds=ppe.float().cpu(),
                            negative_prompt_embeds=npe.float().cpu(), negative_pooled_prompt_embeds=nppe.float().cpu())

    def timestep_input(self, t, batch: int, device) -> torch.Tensor:
        """The SD3 pipeline's convention: the scheduler timestep ``t = sigma * 1000`` as a float."""
        return torch.full((batch,), float(t), device=device, dtype=torch.float32)

    def model_kwargs(self, rows: Mapping[str, Any]) -> dict[str, Any]:
        dtype = self.model_dtype()
        return {"encoder_hidden_states": rows["prompt_embeds"].to(dtype),
                "pooled_projections": rows["pooled_prompt_embeds"].to(dtype)}

