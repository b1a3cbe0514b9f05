"""DiT in the conformance suite: a tiny random-init ``DiTTransformer2DModel``.

2 adaLN-Zero blocks of 2 heads x 16 channels (width 32), 8x8 latents of 4 channels in 2x2
patches (a 4x4 token grid), learned sigma (8 output channels), 10 classes (+ the null class).
Saved with ``save_pretrained`` beside DiT's linear DDPM schedule and loaded back through
:func:`dithooks.loading.load_model`.
"""

from __future__ import annotations

from pathlib import Path

import torch

FAMILY = "dit"
CONFIG = dict(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8, num_layers=2,
              sample_size=8, patch_size=2, num_embeds_ada_norm=10)


def make_tiny(tmp_path):
    from diffusers import DDPMScheduler, DiTTransformer2DModel

    from dithooks.loading import load_model

    torch.manual_seed(0)
    path = Path(tmp_path) / "tiny-dit"
    DiTTransformer2DModel(**CONFIG).eval().save_pretrained(str(path))
    DDPMScheduler(beta_schedule="linear", num_train_timesteps=1000).save_config(str(path))
    return load_model(str(path))


def conditioning(M: int, seed: int = 0):
    """Class labels 0..M-1 (mod 10) with the null class for guidance."""
    from dithooks.conditioning import Conditioning

    return Conditioning.from_labels([m % 10 for m in range(M)], null_label=10)
EXACT_WINDOW = True  # HookedAttnProcessor keeps SDPA without a mask when the window covers the grid
