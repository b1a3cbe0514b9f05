"""Adapter for diffusers' ``DiTTransformer2DModel`` (class-conditional DiT, adaLN-Zero blocks).

Block ``i`` is ``transformer_blocks[i]`` (a ``BasicTransformerBlock`` with
``norm_type="ada_norm_zero"``)::

    x, gate_msa, shift_mlp, scale_mlp, gate_mlp = norm1(h, t, y)     # norm1.linear -> 6 chunks
    h_mid  = h     + gate_msa * attn1(x)
    h_post = h_mid + gate_mlp * ff(norm3(h_mid) * (1 + scale_mlp) + shift_mlp)

Every hook point is read with a PyTorch hook on the module that already computes it, so
capturing never changes the model's arithmetic. The whole adapter is the table below plus the
geometry; the base class supplies the rest (DiT is what its defaults reproduce).
"""

from __future__ import annotations

from .base import Geometry, ModelAdapter, transformer_geometry
from .registry import register
from .spec import RESID, VECTOR, PointSpec, final_out, post, pre

ADALN_CHUNKS = ("shift_msa", "scale_msa", "gate_msa", "shift_mlp", "scale_mlp", "gate_mlp")


def _adaln_doc(chunk: str) -> str:
    what, branch = chunk.split("_")
    return f"adaLN-Zero {what} for the {branch.upper()} branch, from (t, y)"


#: BasicTransformerBlock (adaLN-Zero): canonical local name -> module path relative to the block
DIT_BLOCK: tuple[PointSpec, ...] = (
    pre("resid_pre", "", RESID, "residual stream entering the block (h)"),
    *(post(f"adaln.{c}", "norm1.linear", VECTOR, _adaln_doc(c), chunk=(j, 6)) for j, c in enumerate(ADALN_CHUNKS)),
    pre("attn.in", "attn1", RESID,
        "adaLN1(h) = LayerNorm(h)*(1+scale_msa)+shift_msa: the input of attention"),
    post("attn.out", "attn1", RESID, "attention branch output after W_O, before the gate_msa multiplication"),
    pre("resid_mid", "norm3", RESID, "residual stream after attention, before the MLP (h + gate_msa*attn.out)",
        carry_to=""),
    pre("mlp.in", "ff", RESID, "adaLN2(resid_mid) = LayerNorm*(1+scale_mlp)+shift_mlp: the input of the MLP"),
    post("mlp.out", "ff", RESID, "MLP output before the gate_mlp multiplication"),
    post("resid_post", "", RESID, "residual stream leaving the block"),
)

DIT_MODEL: tuple[PointSpec, ...] = (
    post("embed.out", "pos_embed", RESID,
         "patch embedding plus positional embedding: the residual stream entering block 0"),
)

DIT_FINAL: tuple[PointSpec, ...] = (
    final_out("model output in latent layout: epsilon (and the variance channels when learned)"),
)


@register
class DiTAdapter(ModelAdapter):
    model_classes = ("DiTTransformer2DModel",)
    family = "dit"
    block_lists = ("transformer_blocks",)
    block_tables = {"BasicTransformerBlock": DIT_BLOCK}
    model_table = DIT_MODEL
    final_table = DIT_FINAL

    @property
    def jvp_support(self) -> frozenset[str]:
        from ..jvp import ALL_PARTS

        return frozenset(ALL_PARTS)  # the adaLN-Zero block: every part, fused and ride-along

    @property
    def geometry(self) -> Geometry:
        return transformer_geometry(self.model.config, num_classes=self.model.config.num_embeds_ada_norm)
