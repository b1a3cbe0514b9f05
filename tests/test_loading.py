import json
import shutil

import pytest
import torch

from dithooks.adapters import DiTAdapter, GenericAdapter
from dithooks.errors import ModelNotFoundError
from dithooks.loading import load_model

from .conftest import make_tiny_dit


def test_local_transformer_dir(tiny_model_dir):
    loaded = load_model(str(tiny_model_dir))
    assert isinstance(loaded.adapter, DiTAdapter)
    geo = loaded.adapter.geometry
    assert (geo.num_layers, geo.num_tokens, geo.width, geo.learned_sigma, geo.null_class) == (4, 16, 16, True, 10)
    assert loaded.scheduler_config["num_train_timesteps"] == 1000
    assert not loaded.transformer.training


def test_pipeline_dir_with_scheduler(tmp_path):
    from diffusers import DDIMScheduler

    make_tiny_dit().save_pretrained(tmp_path / "transformer")
    DDIMScheduler(beta_schedule="scaled_linear", num_train_timesteps=500).save_pretrained(tmp_path / "scheduler")
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "DiTPipeline"}))
    loaded = load_model(str(tmp_path))
    assert loaded.scheduler_config["num_train_timesteps"] == 500
    assert loaded.vae is None


def test_hub_id_from_local_cache(tmp_path, monkeypatch, tiny_model_dir):
    """A hub id resolves through the Hugging Face cache layout without any network."""
    cache = tmp_path / "hub"
    snap = cache / "models--someorg--tiny-dit" / "snapshots" / "0123abc"
    (snap / "transformer").mkdir(parents=True)
    for f in tiny_model_dir.iterdir():
        shutil.copy(f, snap / "transformer" / f.name)
    (snap / "model_index.json").write_text(json.dumps({"_class_name": "DiTPipeline"}))
    (cache / "models--someorg--tiny-dit" / "refs").mkdir()
    (cache / "models--someorg--tiny-dit" / "refs" / "main").write_text("0123abc")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    import huggingface_hub.constants as c
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(cache))
    loaded = load_model("someorg/tiny-dit")
    assert loaded.adapter.num_layers == 4 and loaded.source == "hub cache"


def test_missing_models_give_one_line_errors(tmp_path):
    with pytest.raises(ModelNotFoundError, match="no model directory"):
        load_model(str(tmp_path / "nope"))
    with pytest.raises(ModelNotFoundError, match="huggingface-cli download facebook/DiT-XL-2-256"):
        load_model("facebook/DiT-XL-2-256")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelNotFoundError, match="neither model_index.json"):
        load_model(str(tmp_path / "empty"))


def test_generic_adapter_for_unknown_models():
    from dithooks.adapters import adapter_for

    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU())
    ad = adapter_for(model)
    assert isinstance(ad, GenericAdapter)
    assert ad.resolve(["modules.0.out"]) == ["modules.0.out"]


def test_family_pipeline_dir_picks_adapter_and_schedule(tmp_path):
    """A pipeline folder naming SD3Transformer2DModel loads with the SD3 adapter and, without a
    scheduler config, flow matching's default schedule; adapter options are checked."""
    from dithooks.errors import DithooksError
    from dithooks.sampling import Sampler, SamplerSpec
    from tests.conformance import family_sd3 as fam

    fam.make_transformer().save_pretrained(tmp_path / "transformer")
    (tmp_path / "model_index.json").write_text(json.dumps(
        {"_class_name": "StableDiffusion3Pipeline", "transformer": ["diffusers", "SD3Transformer2DModel"],
         "text_encoder": [None, None]}))
    loaded = load_model(str(tmp_path), adapter_options={"text_tokens": 6})
    assert loaded.family == "sd3" and loaded.adapter.prediction == "flow"
    assert loaded.scheduler_config == {"num_train_timesteps": 1000, "shift": 1.0}
    assert loaded.components == ("transformer",) and not loaded.has_text_encoders
    assert loaded.adapter.geometry.text_tokens == 6
    s = Sampler(loaded, SamplerSpec("flow", 2))
    assert type(s.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"
    with pytest.raises(DithooksError, match="ships no text encoders"):
        loaded.encode_prompts(["a cat"])
    with pytest.raises(DithooksError, match="no option 'nope'"):
        load_model(str(tmp_path), adapter_options={"nope": 1})


def test_registry_maps_every_family_class():
    from dithooks.adapters import ADAPTERS, ModelAdapter, register, registered_families

    fams = registered_families()
    assert {"dit", "pixart", "sd3", "flux"} <= set(fams)
    for name in ("DiTTransformer2DModel", "PixArtTransformer2DModel", "SD3Transformer2DModel",
                 "FluxTransformer2DModel"):
        assert name in ADAPTERS and ADAPTERS[name].model_classes and name in ADAPTERS[name].model_classes

    class Clash(ModelAdapter):
        model_classes = ("DiTTransformer2DModel",)

    with pytest.raises(ValueError, match="already has the adapter"):
        register(Clash)
    assert ADAPTERS["DiTTransformer2DModel"] is fams["dit"]


def test_adapter_default_schedule_when_the_folder_has_none(tmp_path):
    from dithooks.adapters.flux import FluxAdapter
    from tests.conformance import family_flux as fam

    fam.make_transformer().save_pretrained(tmp_path)
    loaded = load_model(str(tmp_path))
    assert loaded.family == "flux"
    assert loaded.scheduler_config == FluxAdapter.default_schedule
    assert loaded.scheduler_config is not FluxAdapter.default_schedule  # a copy
