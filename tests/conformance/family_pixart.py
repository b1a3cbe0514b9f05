"""PixArt-α in the conformance suite: a tiny random-init ``PixArtTransformer2DModel``.

2 blocks of 2 heads x 16 channels (width 32), 8x8 latents in 2x2 patches (a 4x4 token grid),
learned sigma (8 output channels for 4 latent channels), T5-like caption embeddings of 32
channels projected to the width (``cross_attention_dim`` = width), 8 text tokens. Saved with
``save_pretrained`` beside a DDIM scheduler config and loaded back through
:func:`dithooks.loading.load_model`, as a user's local checkpoint would be.
"""

from __future__ import annotations

from pathlib import Path

import torch

FAMILY = "pixart"
#: self-attention runs HookedAttnProcessor, which keeps SDPA without a mask when the window covers the grid
EXACT_WINDOW = True
TEXT_TOKENS = 8
CAPTION_CHANNELS = 32
CONFIG = dict(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8, num_layers=2,
              cross_attention_dim=32, sample_size=8, patch_size=2, caption_channels=CAPTION_CHANNELS)
#: PixArt-α's training schedule (linear betas, 1000 steps), as its pipeline's scheduler config says
SCHEDULE = dict(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear",
                prediction_type="epsilon", clip_sample=False)


def make_transformer(seed: int = 0):
    from diffusers import PixArtTransformer2DModel

    torch.manual_seed(seed)
    return PixArtTransformer2DModel(**CONFIG).eval()


def save_tiny(path: Path, seed: int = 0) -> Path:
    """A transformer folder (config.json + weights + scheduler_config.json) at ``path``."""
    from diffusers import DDIMScheduler

    path = Path(path)
    make_transformer(seed).save_pretrained(str(path))
    DDIMScheduler(**SCHEDULE).save_config(str(path))
    return path


def make_tiny(tmp_path):
    """The tiny PixArt saved with save_pretrained and loaded through ``load_model``."""
    from dithooks.loading import load_model

    loaded = load_model(str(save_tiny(Path(tmp_path) / "tiny-pixart")))
    loaded.adapter.text_tokens = TEXT_TOKENS  # the prompt length the test conditioning uses
    return loaded


def prompt_embeds(M: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random precomputed 'T5' embeddings (M, L, 32) and a 1/0 attention mask (M, L) with padding."""
    g = torch.Generator().manual_seed(seed)
    emb = torch.randn(M, TEXT_TOKENS, CAPTION_CHANNELS, generator=g)
    mask = torch.ones(M, TEXT_TOKENS)
    for m in range(M):  # prompts of different lengths: the tail is padding
        mask[m, TEXT_TOKENS - (m % 3):] = 0
    return emb, mask


def conditioning(M: int, seed: int = 0):
    """Text conditioning for M samples: random prompt embeddings with a padding mask."""
    from dithooks.conditioning import Conditioning

    emb, mask = prompt_embeds(M, seed)
    return Conditioning(prompt_embeds=emb, extras={"prompt_attention_mask": mask})
