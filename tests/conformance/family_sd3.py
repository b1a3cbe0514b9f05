"""SD3 (MMDiT) in the conformance suite: a tiny random-init ``SD3Transformer2DModel``.

2 joint blocks of 2 heads x 16 channels (width 32; block 1 is context_pre_only), 8x8 latents of
4 channels in 2x2 patches (a 4x4 image-token grid), prompt embeddings of 32 channels
(joint_attention_dim) projected to the width, pooled embeddings of 16 channels, 6 text tokens.
Saved with ``save_pretrained`` beside a FlowMatchEulerDiscreteScheduler config (shift 3.0, as
SD3's) and loaded back through :func:`dithooks.loading.load_model`.
"""

from __future__ import annotations

from pathlib import Path

import torch

FAMILY = "sd3"
EXACT_WINDOW = True  # a window covering the grid builds no mask: the hooked joint processor calls SDPA as diffusers does
TEXT_TOKENS = 6
JOINT_DIM = 32
POOLED_DIM = 16
CONFIG = dict(sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=16,
              num_attention_heads=2, joint_attention_dim=JOINT_DIM, caption_projection_dim=32,
              pooled_projection_dim=POOLED_DIM, out_channels=4, pos_embed_max_size=8)
#: SD3's scheduler config (stabilityai/stable-diffusion-3-medium-diffusers: shift 3.0)
SCHEDULE = dict(num_train_timesteps=1000, shift=3.0)


def make_transformer(seed: int = 0):
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(seed)
    return SD3Transformer2DModel(**CONFIG).eval()


def save_tiny(path: Path, seed: int = 0) -> Path:
    """A transformer folder (config.json + weights + scheduler_config.json) at ``path``."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    path = Path(path)
    make_transformer(seed).save_pretrained(str(path))
    FlowMatchEulerDiscreteScheduler(**SCHEDULE).save_config(str(path))
    return path


def make_tiny(tmp_path):
    """The tiny SD3 saved with save_pretrained and loaded through ``load_model``."""
    from dithooks.loading import load_model

    loaded = load_model(str(save_tiny(Path(tmp_path) / "tiny-sd3")))
    loaded.adapter.text_tokens = TEXT_TOKENS  # the prompt length the test conditioning uses
    return loaded


def conditioning(M: int, seed: int = 0):
    """Random precomputed prompt_embeds (M, 6, 32) and pooled_prompt_embeds (M, 16)."""
    from dithooks.conditioning import Conditioning

    g = torch.Generator().manual_seed(seed)
    return Conditioning(prompt_embeds=torch.randn(M, TEXT_TOKENS, JOINT_DIM, generator=g),
                        pooled_prompt_embeds=torch.randn(M, POOLED_DIM, generator=g))
