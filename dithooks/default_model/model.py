"""Building the default DiT and its noise schedule from :mod:`.config`."""

from __future__ import annotations

import torch
from diffusers import DDPMScheduler, DiTTransformer2DModel

from .config import DEFAULT_VARIANT, SCHEDULER_CONFIG, transformer_config


def disable_internal_label_dropout(model: DiTTransformer2DModel) -> None:
    """Turn off the label dropout that each block's embedder draws on its own in train() mode.

    Every block holds its own label embedder, so in-model dropout would drop the label in some
    blocks and not others; training drops labels once per sample instead (see train.py).
    """
    for block in model.transformer_blocks:
        block.norm1.emb.class_embedder.dropout_prob = 0.0


def zero_init_modulation(model: DiTTransformer2DModel) -> None:
    """Zero the adaLN modulation and the output projection, as in the DiT paper.

    With zero gates every block starts as the identity and the model starts predicting 0,
    which makes a 28-block stack train stably from the first step.
    """
    for block in model.transformer_blocks:
        torch.nn.init.zeros_(block.norm1.linear.weight)
        torch.nn.init.zeros_(block.norm1.linear.bias)
    for layer in (model.proj_out_1, model.proj_out_2):
        torch.nn.init.zeros_(layer.weight)
        torch.nn.init.zeros_(layer.bias)


def build_transformer(seed: int = 0, variant: str = DEFAULT_VARIANT) -> DiTTransformer2DModel:
    """A freshly initialised embedded DiT of ``variant`` (deterministic for a given seed)."""
    torch.manual_seed(seed)
    model = DiTTransformer2DModel(**transformer_config(variant))
    zero_init_modulation(model)
    disable_internal_label_dropout(model)
    return model


def build_noise_scheduler() -> DDPMScheduler:
    """The training (DDPM) noise schedule."""
    return DDPMScheduler(**SCHEDULER_CONFIG)

