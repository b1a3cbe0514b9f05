"""Fast tests of the embedded default model (shipped weights, classifier, train/eval smoke)."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import DiTTransformer2DModel

from dithooks.default_model import (
    default_model_dir,
    evaluate_default_model,
    load_default_scheduler_config,
    load_default_transformer,
    load_digits_classifier,
    train_default_model,
)
from dithooks.default_model.config import NULL_CLASS, TRANSFORMER_CONFIG
from dithooks.default_model.data import digits_split, load_digit_images
from dithooks.default_model.evaluate import ddim_sample
from dithooks.default_model.model import build_transformer
from dithooks.default_model.weights_io import load_transformer_from, ship_model_dir


@pytest.fixture(autouse=True)
def one_thread():
    # The test machine has 2 cores shared with other work; tiny models gain nothing from more.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def test_shipped_weights_load_with_diffusers():
    model = DiTTransformer2DModel.from_pretrained(default_model_dir())
    assert model.config.num_layers == 28
    assert len(model.transformer_blocks) == 28
    assert model.config.num_embeds_ada_norm == 10
    assert model.config.out_channels == 1


def test_load_default_transformer_forward_shape():
    model = load_default_transformer()
    assert next(model.parameters()).dtype == torch.float32
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        out = model(x, timestep=torch.tensor([999, 10]), class_labels=torch.tensor([3, NULL_CLASS])).sample
    assert out.shape == (2, 1, 8, 8)
    assert torch.isfinite(out).all()
    assert load_default_scheduler_config()["num_train_timesteps"] == 1000


def test_digits_scaled_to_unit_range():
    images, labels = load_digit_images()
    assert images.shape == (1797, 1, 8, 8)
    assert images.min() == -1.0 and images.max() == 1.0
    assert set(labels.tolist()) == set(range(10))


def test_classifier_heldout_accuracy_and_features():
    classifier = load_digits_classifier()
    _, _, x_ho, y_ho = digits_split()
    with torch.no_grad():
        accuracy = (classifier(x_ho).argmax(1) == y_ho).float().mean().item()
        feats = classifier.features(x_ho[:5])
    assert accuracy >= 0.95
    assert feats.shape == (5, classifier.config["feature_dim"])


def test_built_model_has_no_internal_label_dropout_and_zero_gates():
    model = build_transformer(seed=0)
    for block in model.transformer_blocks:
        assert block.norm1.emb.class_embedder.dropout_prob == 0.0
        assert torch.count_nonzero(block.norm1.linear.weight) == 0
    assert torch.count_nonzero(model.proj_out_2.weight) == 0
    assert model.config.num_layers == TRANSFORMER_CONFIG["num_layers"]


def test_guidance_scale_one_equals_unguided():
    model = load_default_transformer()
    config = load_default_scheduler_config()
    labels = torch.tensor([0, 7])
    plain = ddim_sample(model, config, labels, num_steps=3, generator=torch.Generator().manual_seed(1))
    w1 = ddim_sample(
        model, config, labels, num_steps=3, guidance_scale=1.0, generator=torch.Generator().manual_seed(1)
    )
    torch.testing.assert_close(plain, w1, atol=1e-4, rtol=0)


def test_train_smoke_writes_loadable_weights(tmp_path):
    summary = train_default_model(
        tmp_path, seed=0, train_steps=3, batch_size=4, progress=False, log_every=1, checkpoint_every=2
    )
    assert summary["images_seen"] == 12
    for variant in ("ema", "raw"):
        model = DiTTransformer2DModel.from_pretrained(tmp_path / variant)
        assert len(model.transformer_blocks) == 28
    assert (tmp_path / "checkpoints" / "step_000002" / "ema" / "config.json").is_file()
    log = [json.loads(line) for line in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3]

    shipped = ship_model_dir(tmp_path / "ema", tmp_path / "shipped")
    assert "_name_or_path" not in json.loads((shipped / "config.json").read_text())
    reloaded = load_transformer_from(shipped)  # stored fp16, loaded fp32
    assert next(reloaded.parameters()).dtype == torch.float32
    assert json.loads((shipped / "scheduler_config.json").read_text())["timestep_spacing"] == "trailing"


def test_evaluate_smoke(tmp_path):
    result = evaluate_default_model(
        per_class=1, guidance_scales=(1.5,), num_steps=2, progress=False, grid_path=tmp_path / "g.png"
    )
    assert (tmp_path / "g.png").is_file()
    for key in ("unguided", "guided_w1.5"):
        assert 0.0 <= result[key]["accuracy"] <= 1.0
        assert set(result[key]["per_class"]) == {str(c) for c in range(10)}
    assert result["classifier_heldout_accuracy"] >= 0.95
    json.dumps(result)  # plain numbers only


def test_strong_guidance_stays_on_the_data_through_dithooks_sampler():
    """Regression: with clip_sample, DDIM must use the epsilon implied by the clipped x0."""
    from dithooks.loading import load_model
    from dithooks.sampling import Sampler, SamplerSpec

    from dithooks.default_model import load_digits_classifier

    loaded, clf = load_model(), load_digits_classifier()
    labels = list(range(10)) * 2
    x = Sampler(loaded, SamplerSpec("ddim", 20, guidance=3.0)).run(labels, list(range(20)))
    with torch.no_grad():
        acc = (clf(x.clamp(-1, 1)).argmax(1) == torch.tensor(labels)).float().mean().item()
    assert acc >= 0.9, acc


def test_digits64_is_the_8x8_token_model_and_samples_recognisable_digits():
    """The second embedded model: same DiT with patch 1 (64 tokens), selectable by name."""
    from dithooks.loading import load_model
    from dithooks.sampling import Sampler, SamplerSpec

    from dithooks.default_model import load_digits_classifier

    loaded = load_model("digits64")
    geo = loaded.adapter.geometry
    assert (geo.num_layers, geo.patch_size, geo.num_tokens) == (28, 1, 64)
    assert loaded.model_id == "dithooks/digits64-dit"
    assert load_model("dithooks/digits64-dit").model_id == loaded.model_id
    labels = list(range(10))
    x = Sampler(loaded, SamplerSpec("ddim", 20)).run(labels, list(range(10)))
    assert x.shape == (10, 1, 8, 8) and torch.isfinite(x).all()
    with torch.no_grad():
        acc = (load_digits_classifier()(x.clamp(-1, 1)).argmax(1) == torch.tensor(labels)).float().mean().item()
    assert acc >= 0.7, acc  # unguided, 20 steps, 10 samples: a smoke bar, the card has the real one
