"""Flux in the conformance suite: a tiny random-init ``FluxTransformer2DModel``.

One double-stream block then one single-stream block (layers 0 and 1) of 2 heads x 16 channels
(width 32), rotary axes (4, 6, 6) summing to the head dim, 8x8 latents of 4 channels packed
2x2 into 16 input channels (a 4x4 image-token grid), prompt embeddings of 32 channels
(joint_attention_dim), pooled embeddings of 16 channels, 5 text tokens, no guidance embedding
(schnell-like). Saved with ``save_pretrained`` beside Flux's FlowMatchEulerDiscreteScheduler
config (shift 3.0, dynamic shifting) and loaded back through :func:`dithooks.loading.load_model`.
The latent size is not a Flux config field: ``sample_size`` is added to config.json (diffusers
keeps unknown keys), which is how the adapter learns it.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

FAMILY = "flux"
EXACT_WINDOW = True  # a window covering the grid builds no mask: SDPA on the same (B, H, S, D) views as diffusers
TEXT_TOKENS = 5
JOINT_DIM = 32
POOLED_DIM = 16
LATENT_SIZE = 8
CONFIG = dict(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
              num_attention_heads=2, joint_attention_dim=JOINT_DIM, pooled_projection_dim=POOLED_DIM,
              guidance_embeds=False, axes_dims_rope=(4, 6, 6))
#: black-forest-labs/FLUX.1-schnell/scheduler/scheduler_config.json (dev differs only in
#: use_dynamic_shifting=True; dynamic shifting is used here so that mu is exercised)
SCHEDULE = dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
                max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096)


def make_transformer(seed: int = 0, **overrides):
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    return FluxTransformer2DModel(**{**CONFIG, **overrides}).eval()


def save_tiny(path: Path, seed: int = 0, **overrides) -> Path:
    """A transformer folder (config.json + weights + scheduler_config.json) at ``path``."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    path = Path(path)
    make_transformer(seed, **overrides).save_pretrained(str(path))
    cfg_file = path / "config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg["sample_size"] = LATENT_SIZE  # not a Flux field: the adapter's latent size
    cfg_file.write_text(json.dumps(cfg, indent=2))
    FlowMatchEulerDiscreteScheduler(**SCHEDULE).save_config(str(path))
    return path


def make_tiny(tmp_path, **overrides):
    """The tiny Flux saved with save_pretrained and loaded through ``load_model``."""
    from dithooks.loading import load_model

    loaded = load_model(str(save_tiny(Path(tmp_path) / "tiny-flux", **overrides)))
    loaded.adapter.text_tokens = TEXT_TOKENS  # the prompt length the test conditioning uses
    return loaded


def conditioning(M: int, seed: int = 0):
    """Random precomputed prompt_embeds (M, 5, 32) and pooled_prompt_embeds (M, 16)."""
    from dithooks.conditioning import Conditioning

    g = torch.Generator().manual_seed(seed)
    return Conditioning(prompt_embeds=torch.randn(M, TEXT_TOKENS, JOINT_DIM, generator=g),
                        pooled_prompt_embeds=torch.randn(M, POOLED_DIM, generator=g))
