"""The DiT-XL/2 path on a narrow random model: pipeline folder, VAE decoding, learned sigma,
the 1000-class null label and guidance - the same code users take with facebook/DiT-XL-2-256."""

import json

import numpy as np
import pytest
import torch

from dithooks.capture import CaptureConfig, capture
from dithooks.loading import load_model
from dithooks.sampling import Sampler, SamplerSpec
from dithooks.store.reader import open_store


@pytest.fixture(scope="module")
def xl_pipeline_dir(tmp_path_factory):
    from diffusers import AutoencoderKL, DDIMScheduler, DiTTransformer2DModel

    root = tmp_path_factory.mktemp("xl") / "DiT-XL-2-256-narrow"
    torch.manual_seed(0)
    # XL's shape where it matters (4 latent channels, learned sigma, 1000 classes, patch 2),
    # narrow and shallow so that it runs in a test
    DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
                          num_layers=3, sample_size=8, patch_size=2, num_embeds_ada_norm=1000
                          ).save_pretrained(root / "transformer")
    AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8, 8, 8),
                  down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                  layers_per_block=1, norm_num_groups=4, sample_size=64).save_pretrained(root / "vae")
    DDIMScheduler(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear",
                  clip_sample=False).save_pretrained(root / "scheduler")
    (root / "model_index.json").write_text(json.dumps({"_class_name": "DiTPipeline", "transformer": ["diffusers", "DiTTransformer2DModel"],
                                                       "vae": ["diffusers", "AutoencoderKL"], "scheduler": ["diffusers", "DDIMScheduler"]}))
    return root


def test_xl_shaped_pipeline_loads_samples_and_decodes(xl_pipeline_dir):
    loaded = load_model(str(xl_pipeline_dir))
    geo = loaded.adapter.geometry
    assert geo.learned_sigma and geo.null_class == 1000 and geo.num_tokens == 16
    assert loaded.vae is not None and loaded.vae_scale == pytest.approx(0.18215)
    x = Sampler(loaded, SamplerSpec("ddim", 4, guidance=4.0)).run([207, 999], [0, 1])
    assert x.shape == (2, 4, 8, 8) and torch.isfinite(x).all()
    img = loaded.decode(x)
    assert img.shape == (2, 3, 64, 64) and 0 <= img.min() and img.max() <= 1


def test_null_label_branch_is_the_1000th_row(xl_pipeline_dir):
    loaded = load_model(str(xl_pipeline_dir))
    seen = []
    from dithooks.hooks import HookManager

    hm = HookManager(loaded.transformer, loaded.adapter)
    labels_seen = []
    emb = loaded.transformer.transformer_blocks[0].norm1.emb.class_embedder
    h = emb.register_forward_hook(lambda m, a, o: labels_seen.append(a[0].tolist()))
    try:
        Sampler(loaded, SamplerSpec("ddim", 1, guidance=2.0), hm).run([5], [0])
    finally:
        h.remove()
    assert labels_seen[0] == [5, 1000]


def test_capture_on_xl_path_splits_learned_sigma(xl_pipeline_dir, tmp_path):
    res = capture(CaptureConfig(out=str(tmp_path / "xl.zarr"), model=str(xl_pipeline_dir), layers="all",
                                hooks=("resid_post", "final.out"), sampler=SamplerSpec("ddpm", 3, guidance=1.5),
                                labels=(1,), seeds=(0,)))
    s = open_store(res.path)
    out = s.select("final.out")
    assert out.dims == ("step", "cfg", "sample", "out_channel", "height", "width")
    assert out.values.shape[3] == 8  # epsilon (4) then variance (4), both stored
    assert s.meta["model_config"]["num_embeds_ada_norm"] == 1000
    assert np.isfinite(s.select("latents").values).all()
