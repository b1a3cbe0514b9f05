"""Adapter for diffusers' ``DiTTransformer2DModel`` (class-conditional DiT, adaLN-Zero blocks).

Block ``i`` is ``transformer_blocks[i]`` (a ``BasicTransformerBlock`` with
``norm_type="ada_norm_zero"``)::

    x, gate_msa, shift_mlp, scale_mlp, gate_mlp = norm1(h, t, y)     # norm1.linear -> 6 chunks
    h_mid  = h     + gate_msa * attn1(x)
    h_post = h_mid + gate_mlp * ff(norm3(h_mid) * (1 + scale_mlp) + shift_mlp)

Every hook point is read with a PyTorch hook on the module that already computes it, so
capturing never changes the model's arithmetic.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..attention_hooks import attention_points
from ..hookpoints import HookPoint
from ..jvp_hooks import jvp_points
from .base import (Geometry, ModelAdapter, first_tensor_arg, plain_output, replace_first_arg,
                   replace_output)

ADALN_CHUNKS = ("shift_msa", "scale_msa", "gate_msa", "shift_mlp", "scale_mlp", "gate_mlp")

RESID = ("batch", "token", "channel")


def _adaln_reader(j: int):
    def read(args, kwargs, output):
        return output.chunk(6, dim=1)[j]
    return read


def _adaln_writer(j: int):
    def write(args, kwargs, output, new):
        parts = list(output.chunk(6, dim=1))
        parts[j] = new
        return torch.cat(parts, dim=1)
    return write


def _model_output(args, kwargs, output: Any) -> torch.Tensor:
    return output.sample if hasattr(output, "sample") else output[0]


def _replace_model_output(args, kwargs, output: Any, new: torch.Tensor):
    if hasattr(output, "sample"):
        output.sample = new
        return output
    return (new,) + tuple(output[1:])


class DiTAdapter(ModelAdapter):
    model_classes = ("DiTTransformer2DModel",)

    def blocks(self) -> list[nn.Module]:
        return list(self.model.transformer_blocks)

    def attention_module(self, layer: int) -> nn.Module:
        return self.model.transformer_blocks[layer].attn1

    @property
    def geometry(self) -> Geometry:
        c = self.model.config
        return Geometry(
            num_layers=c.num_layers,
            width=c.num_attention_heads * c.attention_head_dim,
            num_heads=c.num_attention_heads,
            head_dim=c.attention_head_dim,
            in_channels=c.in_channels,
            out_channels=c.out_channels or c.in_channels,
            sample_size=c.sample_size,
            patch_size=c.patch_size,
            num_classes=c.num_embeds_ada_norm,
        )

    def _build_points(self) -> dict[str, HookPoint]:
        pts: dict[str, HookPoint] = {}

        def add(name, template, path, kind, dims, doc, layer=None, read=None, write=None, carry_to=None):
            pts[name] = HookPoint(name, template, path, kind, dims, doc, layer, read, write, carry_to)

        add("embed.out", "embed.out", "pos_embed", "post", RESID,
            "patch embedding plus positional embedding: the residual stream entering block 0",
            read=plain_output, write=replace_output)
        for i, block in enumerate(self.blocks()):
            b = f"transformer_blocks.{i}"
            p = f"blocks.{i}"
            add(f"{p}.resid_pre", "blocks.{i}.resid_pre", b, "pre", RESID,
                "residual stream entering the block (h)", i, first_tensor_arg, replace_first_arg)
            for j, chunk in enumerate(ADALN_CHUNKS):
                add(f"{p}.adaln.{chunk}", "blocks.{i}.adaln." + chunk, f"{b}.norm1.linear", "post",
                    ("batch", "channel"),
                    f"adaLN-Zero {chunk.split('_')[0]} for the {chunk.split('_')[1].upper()} branch, from (t, y)",
                    i, _adaln_reader(j), _adaln_writer(j))
            add(f"{p}.attn.in", "blocks.{i}.attn.in", f"{b}.attn1", "pre", RESID,
                "adaLN1(h) = LayerNorm(h)*(1+scale_msa)+shift_msa: the input of attention", i,
                first_tensor_arg, replace_first_arg)
            pts.update(attention_points(i, f"{b}.attn1"))
            add(f"{p}.attn.out", "blocks.{i}.attn.out", f"{b}.attn1", "post", RESID,
                "attention branch output after W_O, before the gate_msa multiplication", i,
                plain_output, replace_output)
            add(f"{p}.resid_mid", "blocks.{i}.resid_mid", f"{b}.norm3", "pre", RESID,
                "residual stream after attention, before the MLP (h + gate_msa*attn.out)", i,
                first_tensor_arg, replace_first_arg, carry_to=b)
            add(f"{p}.mlp.in", "blocks.{i}.mlp.in", f"{b}.ff", "pre", RESID,
                "adaLN2(resid_mid) = LayerNorm*(1+scale_mlp)+shift_mlp: the input of the MLP", i,
                first_tensor_arg, replace_first_arg)
            add(f"{p}.mlp.out", "blocks.{i}.mlp.out", f"{b}.ff", "post", RESID,
                "MLP output before the gate_mlp multiplication", i, plain_output, replace_output)
            add(f"{p}.resid_post", "blocks.{i}.resid_post", b, "post", RESID,
                "residual stream leaving the block", i, plain_output, replace_output)
            pts.update(jvp_points(i, b))
        add("final.out", "final.out", "", "post", ("batch", "out_channel", "height", "width"),
            "model output in latent layout: epsilon (and the variance channels when learned)",
            read=_model_output, write=_replace_model_output)
        return pts
