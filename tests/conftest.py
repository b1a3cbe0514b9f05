import contextlib
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
    # diffusers leaves adaLN-Zero at its random (not zero) init, so the gates are non-zero and
    # every branch of a block contributes: no re-initialisation needed
    return m.eval()


# -- helpers for the attention / coupling / window / JVP tests ----------------------------------
TINY_HEADS, TINY_HEAD_DIM = 4, 8  # D = 32; sample 8, patch 2 -> a 4x4 grid, N = 16


def make_tiny_attn_dit(channels=4, layers=2, sample_size=8, dtype=torch.float32, seed=0):
    """A small random DiT with TINY_HEADS heads of TINY_HEAD_DIM and out_channels = in_channels."""
    model = make_tiny_dit(num_layers=layers, heads=TINY_HEADS, head_dim=TINY_HEAD_DIM, in_channels=channels,
                          out_channels=channels, sample_size=sample_size, seed=seed)
    return model.to(dtype)


def make_dit_inputs(batch, channels=4, sample_size=8, num_labels=10, seed=1):
    """Random (x, t, y) for a DiT forward; y is drawn from range(num_labels) (label 10 = the null class)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, channels, sample_size, sample_size, generator=g)
    t = torch.randint(0, 1000, (batch,), generator=g)
    y = torch.randint(0, num_labels, (batch,), generator=g)
    return x, t, y


def run_dit(model, x, t, y):
    """The whole model's forward, without grad, with whatever attention processors are installed."""
    with torch.no_grad():
        return model(x, timestep=t, class_labels=y).sample


def call_attn(attn, processor, x):
    """One attention module on x with processor set for this call only, then the old one restored."""
    saved = attn.processor
    attn.set_processor(processor)
    try:
        with torch.no_grad():
            return attn(x)
    finally:
        attn.set_processor(saved)


class Recorder:
    """An ``emit`` that records what it is given and optionally replaces values."""

    def __init__(self, replace=None):
        self.seen: dict[str, torch.Tensor] = {}
        self.calls: list[str] = []
        self.replace = replace or {}

    def __call__(self, name, value):
        self.calls.append(name)
        self.seen[name] = value.detach().clone()
        return self.replace[name](value) if name in self.replace else value


@pytest.fixture(scope="module")
def one_torch_thread():
    """Use with ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``: one thread for a module."""
    # tiny models gain nothing from threads; on a busy 2-core machine they only oversubscribe
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@contextlib.contextmanager
def shards_per_step():
    """Within it, captures keep hook arrays in a shard (file) per step, as large steps and
    multi-worker regions do (small steps keep a batch of steps per shard: capture/recorder.py):
    for stores whose tests damage or look for one step's file."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("dithooks.capture.recorder.StepRecorder.shard_steps", False)
        yield


@pytest.fixture
def shard_per_step():
    """:func:`shards_per_step` for one test."""
    with shards_per_step():
        yield


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
