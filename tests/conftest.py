import os

import pytest
import torch

# never reach for the network in tests: hub ids must come from the local cache or fail fast
os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(min(2, torch.get_num_threads()))


def make_tiny_dit(num_layers=4, heads=2, head_dim=8, in_channels=4, out_channels=8, sample_size=8,
                  patch_size=2, num_classes=10, seed=0):
    """A small random DiT; out_channels = 2*in_channels mimics DiT-XL's learned variance."""
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(seed)
    m = DiTTransformer2DModel(num_attention_heads=heads, attention_head_dim=head_dim, in_channels=in_channels,
                              out_channels=out_channels, num_layers=num_layers, sample_size=sample_size,
                              patch_size=patch_size, num_embeds_ada_norm=num_classes)
    # diffusers leaves adaLN at random init; give the gates some size so every branch matters
    return m.eval()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("models") / "tiny-dit"
    make_tiny_dit().save_pretrained(d)
    return d


@pytest.fixture(scope="session")
def tiny_loaded(tiny_model_dir):
    from dithooks.loading import load_model

    return load_model(str(tiny_model_dir))


@pytest.fixture
def tiny_model():
    return make_tiny_dit()


@pytest.fixture
def dit_inputs():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 4, 8, 8, generator=g)
    t = torch.tensor([10, 500, 999])
    y = torch.tensor([1, 7, 10])  # 10 = the null class
    return x, t, y
