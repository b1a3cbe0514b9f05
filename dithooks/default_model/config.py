"""Architecture, noise schedule and training constants of the embedded default model (one place).

The default model is a class-conditional ``diffusers.DiTTransformer2DModel`` trained on the
8x8 ``sklearn.datasets.load_digits`` images. It keeps the full DiT depth (28 blocks) so that
layer-wise tooling sees a realistic block count, but is narrow (64 wide) so that it trains
and samples on one CPU core.
"""

from __future__ import annotations

NUM_CLASSES = 10
#: Label index meaning "no class" (the extra row of the label table), used for guidance.
NULL_CLASS = NUM_CLASSES
IMAGE_SIZE = 8
IN_CHANNELS = 1

#: Keyword arguments of ``DiTTransformer2DModel(...)``.
TRANSFORMER_CONFIG: dict = dict(
    num_attention_heads=4,
    attention_head_dim=16,  # width 64
    in_channels=IN_CHANNELS,
    out_channels=IN_CHANNELS,  # epsilon only, no learned variance
    num_layers=28,
    dropout=0.0,
    attention_bias=True,
    sample_size=IMAGE_SIZE,
    patch_size=2,  # 16 tokens on a 4x4 grid; patch 1 (64 tokens) trains ~4.6x slower
    activation_fn="gelu-approximate",
    num_embeds_ada_norm=NUM_CLASSES,  # number of classes (table has NUM_CLASSES + 1 rows)
    norm_type="ada_norm_zero",
    norm_elementwise_affine=False,
    norm_eps=1e-5,
)

#: The embedded models, by name: overrides of :data:`TRANSFORMER_CONFIG`. ``digits`` has 16
#: tokens (4x4 grid); ``digits64`` has one token per pixel (8x8 grid, 64 tokens), which gives
#: Chebyshev windows radii 0-7 and difference modes room to be spatially coherent.
VARIANTS: dict[str, dict] = {
    "digits": dict(patch_size=2),
    "digits64": dict(patch_size=1),
}
DEFAULT_VARIANT = "digits"


def transformer_config(variant: str = DEFAULT_VARIANT) -> dict:
    """``DiTTransformer2DModel`` keyword arguments of one embedded model variant."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown embedded model {variant!r}; choose one of {', '.join(VARIANTS)}")
    return dict(TRANSFORMER_CONFIG, **VARIANTS[variant])


#: Keyword arguments of ``DDPMScheduler(...)``. The cosine schedule (Nichol & Dhariwal 2021)
#: keeps more signal at mid timesteps than the linear one, which matters for tiny images
#: where a linear schedule is near pure noise for the last quarter of the chain.
SCHEDULER_CONFIG: dict = dict(
    num_train_timesteps=1000,
    beta_schedule="squaredcos_cap_v2",
    prediction_type="epsilon",
    clip_sample=True,
    clip_sample_range=1.0,
)

#: DDIM settings used for evaluation. "trailing" spacing starts sampling at t=999, the
#: timestep whose marginal is closest to the pure noise we start from.
DDIM_TIMESTEP_SPACING = "trailing"
DDIM_NUM_STEPS = 50
# Recorded in the saved scheduler config so samplers built from it space steps the same way
# (it only affects set_timesteps, not training).
SCHEDULER_CONFIG["timestep_spacing"] = DDIM_TIMESTEP_SPACING

#: Training recipe defaults.
TRAIN_DEFAULTS: dict = dict(
    batch_size=128,
    lr=1e-3,
    weight_decay=0.0,
    betas=(0.9, 0.99),
    warmup_steps=200,
    min_lr_ratio=0.05,  # cosine decay ends at lr * min_lr_ratio
    grad_clip=1.0,
    label_dropout=0.1,
    ema_decay=0.999,
)
