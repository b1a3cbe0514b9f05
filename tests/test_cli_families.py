"""The family-facing CLI: --prompt-embeds, --prompt-rows, --sampler auto, `dithooks hooks` per block kind.

Tiny random-init SD3 / Flux / PixArt folders from tests/conformance (saved with save_pretrained).
"""

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from dithooks.cli.main import app
from dithooks.store.reader import open_store
from tests.conformance import family_flux, family_pixart, family_sd3

pytestmark = pytest.mark.usefixtures("one_torch_thread")
runner = CliRunner()


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def one_line_error(r) -> str:
    assert r.exit_code != 0 and "Traceback" not in r.output, r.output[-1500:]
    lines = [line for line in r.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("dithooks: error: "), r.output
    return lines[0]


def save_embeds(path, cond, rows=None):
    data = {k: getattr(cond, k) for k in ("prompt_embeds", "pooled_prompt_embeds")
            if getattr(cond, k, None) is not None}
    data.update(getattr(cond, "extras", None) or {})
    if rows is not None:
        data = {k: v[rows] for k, v in data.items()}
    torch.save(data, path)
    return path


@pytest.fixture(scope="module")
def sd3(tmp_path_factory):
    d = tmp_path_factory.mktemp("sd3")
    model = family_sd3.save_tiny(d / "model")
    cond = family_sd3.conditioning(3, seed=4)
    return model, save_embeds(d / "embeds.pt", cond), save_embeds(d / "row1.pt", cond, rows=[1])


def test_sd3_capture_from_a_prompt_file_picks_flow_and_the_rows(sd3, tmp_path):
    model, embeds, row1 = sd3
    common = ("--model", model, "--steps", "2", "--hooks", "resid_post", "-q")
    r = run("capture", *common, "--prompt-embeds", embeds, "--prompt-rows", "1", "--seeds", "5",
            "--out", tmp_path / "rows.zarr")
    assert r.exit_code == 0, r.output
    store = open_store(tmp_path / "rows.zarr")
    assert store.meta["sampler"]["name"] == "flow"  # --sampler auto: the family's own
    assert f"prompt rows [1] of {embeds}" in run("ls", tmp_path / "rows.zarr").output
    # --prompt-rows 1 of a 3-row file samples what a file holding only that row samples
    r = run("capture", *common, "--prompt-embeds", row1, "--seeds", "5", "--sampler", "flow",
            "--out", tmp_path / "one.zarr")
    assert r.exit_code == 0, r.output
    a = open_store(tmp_path / "rows.zarr").select("blocks.resid_post").values
    b = open_store(tmp_path / "one.zarr").select("blocks.resid_post").values
    assert a.shape == b.shape and np.array_equal(a, b)
    # and a different row samples something else
    r = run("capture", *common, "--prompt-embeds", embeds, "--prompt-rows", "0", "--seeds", "5",
            "--out", tmp_path / "row0.zarr")
    assert r.exit_code == 0, r.output
    assert not np.array_equal(a, open_store(tmp_path / "row0.zarr").select("blocks.resid_post").values)


@pytest.mark.parametrize("args,needle", [
    (("--sampler", "ddim", "--prompt-embeds", "{embeds}", "--seeds", "0-2"), "predicts flow"),  # SD3 with DDIM
    ((), "text-conditioned"),                                        # no prompt embeddings
    (("--prompt-rows", "0"), "--prompt-rows picks rows"),            # rows without a file
    (("--prompt-embeds", "{tmp}/none.pt"), "no such file"),
    (("--prompt-embeds", "{embeds}", "--prompt-rows", "7"), "prompt row 7 is out of range"),
    (("--prompt-embeds", "{embeds}", "--prompt-rows", "x"), "malformed prompt rows"),
])
def test_sd3_refusals_are_one_line(sd3, tmp_path, args, needle):
    model, embeds, _ = sd3
    args = [str(a).format(tmp=tmp_path, embeds=embeds) for a in args]
    r = run("capture", "--model", model, "--steps", "2", "--out", tmp_path / "x.zarr", *args)
    assert needle in one_line_error(r)
    assert not (tmp_path / "x.zarr").exists()


def test_dit_keeps_ddim_and_refuses_prompt_files(sd3, tiny_model_dir, tmp_path):
    r = run("capture", "--model", tiny_model_dir, "--steps", "2", "--out", tmp_path / "d.zarr", "-q")
    assert r.exit_code == 0, r.output
    assert open_store(tmp_path / "d.zarr").meta["sampler"]["name"] == "ddim"
    r = run("capture", "--model", tiny_model_dir, "--steps", "2", "--prompt-embeds", sd3[1], "--out", tmp_path / "e.zarr")
    assert "class-conditional" in one_line_error(r)
    r = run("capture", "--model", tiny_model_dir, "--steps", "2", "--sampler", "flow", "--out", tmp_path / "f.zarr")
    assert "does not fit" in one_line_error(r)


@pytest.mark.parametrize("family", [family_flux, family_pixart, family_sd3])
def test_hooks_lists_each_block_kind(family, tmp_path):
    from dithooks.loading import load_model

    model = family.save_tiny(tmp_path / family.FAMILY)
    r = run("hooks", "--model", model, "--layer", "1", "--json")
    assert r.exit_code == 0, r.output
    j = json.loads(r.output)
    adapter = load_model(str(model), with_vae=False).adapter
    pts = adapter.hook_points()
    # independent count: the distinct per-block point sets over the blocks
    per_block = [frozenset(n.split(".", 2)[2] for n, p in pts.items() if p.layer == i) for i in range(adapter.num_layers)]
    assert len(j["block_kinds"]) == len({(type(adapter.blocks()[i]).__name__, s) for i, s in enumerate(per_block)})
    assert j["family"] == family.FAMILY and j["conditioning"] == "text"
    assert j["default_sampler"] == ("ddim" if family is family_pixart else "flow")
    listed = {p["hook point"] for p in j["hook_points"] if p["hook point"].startswith("blocks.")}
    assert listed == {f"blocks.1.{local}" for local in per_block[1]}
    text = run("hooks", "--model", model, "--layer", "1").output
    assert "shown for block 1" in text and f"{family.FAMILY} family" in text


def test_prompts_as_text_go_through_the_pipeline_encoder(sd3, tmp_path, monkeypatch):
    """--prompt: the model's encode_prompts (a stand-in here: real encoders need T5/CLIP weights) gives
    the embeddings; the capture equals one from a file holding the same tensors."""
    from dithooks.loading import LoadedModel

    model, embeds, _ = sd3
    cond = family_sd3.conditioning(2, seed=9)
    calls = []

    def fake_encode(self, prompts, negative_prompts=None):
        calls.append((list(prompts), negative_prompts))
        return cond

    common = ("--model", model, "--steps", "2", "--hooks", "resid_post", "--seeds", "0-1", "-q")
    r = run("capture", *common, "--prompt", "a cat", "--prompt", "a dog", "--out", tmp_path / "text.zarr")
    assert "ships no text encoders" in one_line_error(r)  # a bare transformer folder has no pipeline
    monkeypatch.setattr(LoadedModel, "encode_prompts", fake_encode)
    r = run("capture", *common, "--prompt", "a cat", "--prompt", "a dog", "--negative-prompt", "blurry",
            "--out", tmp_path / "text.zarr")
    assert r.exit_code == 0, r.output
    assert calls == [(["a cat", "a dog"], ["blurry", "blurry"])]
    r = run("capture", *common, "--prompt-embeds", save_embeds(tmp_path / "same.pt", cond), "--out", tmp_path / "file.zarr")
    assert r.exit_code == 0, r.output
    a = open_store(tmp_path / "text.zarr").select("blocks.resid_post").values
    b = open_store(tmp_path / "file.zarr").select("blocks.resid_post").values
    assert np.array_equal(a, b)
    for args, needle in ((("--prompt", "x", "--prompt-embeds", embeds), "exclude each other"),
                         (("--negative-prompt", "x", "--prompt-embeds", embeds), "goes with --prompt")):
        assert needle in one_line_error(run("capture", *common, *args, "--out", tmp_path / "bad.zarr"))


def test_bad_prompt_files_are_one_line(sd3, tmp_path):
    model = sd3[0]
    (tmp_path / "garbage.pt").write_bytes(b"\x00not a torch file" * 10)
    torch.save({"embeds": torch.zeros(1, 6, 32)}, tmp_path / "nokey.pt")
    torch.save({"prompt_embeds": torch.zeros(1, 6, 7), "pooled_prompt_embeds": torch.zeros(1, 16)}, tmp_path / "width.pt")
    for name, needle in (("garbage.pt", "cannot read prompt embeddings"), ("nokey.pt", "no 'prompt_embeds'"),
                         ("width.pt", "7")):
        r = run("capture", "--model", model, "--steps", "2", "--prompt-embeds", tmp_path / name, "--out", tmp_path / "x.zarr")
        assert needle.lower() in one_line_error(r).lower(), name
        assert not (tmp_path / "x.zarr").exists()


def test_embedded_guidance_reaches_flux_dev(tmp_path):
    """--embedded-guidance sets Flux-dev's guidance input: equal to a file carrying that guidance, not to another."""
    model = family_flux.save_tiny(tmp_path / "dev", guidance_embeds=True)
    cond = family_flux.conditioning(1, seed=2)
    plain = save_embeds(tmp_path / "plain.pt", cond)
    with_g = tmp_path / "g2.pt"
    torch.save({**torch.load(plain), "guidance": torch.tensor(2.0)}, with_g)
    common = ("--model", model, "--steps", "2", "--hooks", "resid_post", "-q")

    def values(name, *args):
        r = run("capture", *common, *args, "--out", tmp_path / name)
        assert r.exit_code == 0, r.output
        return open_store(tmp_path / name).select("blocks.resid_post").values

    a = values("opt.zarr", "--prompt-embeds", plain, "--embedded-guidance", "2")
    cfg = json.loads((model / "config.json").read_text())   # ls counts double- and single-stream blocks
    n, m = cfg["num_layers"], cfg["num_single_layers"]
    assert f"{n + m} blocks: {n} double, {m} single" in run("ls", tmp_path / "opt.zarr").output
    assert np.array_equal(a, values("file.zarr", "--prompt-embeds", with_g))
    assert not np.array_equal(a, values("other.zarr", "--prompt-embeds", plain, "--embedded-guidance", "5"))
    for args, needle in ((("--prompt-embeds", plain, "--embedded-guidance", "nan"), "--embedded-guidance"),
                         (("--embedded-guidance", "2"), "goes with --prompt-embeds")):
        assert needle in one_line_error(run("capture", *common, *args, "--out", tmp_path / "bad.zarr"))
    schnell = family_flux.save_tiny(tmp_path / "schnell")  # guidance_embeds false
    r = run("capture", "--model", schnell, "--steps", "2", "--prompt-embeds", plain, "--embedded-guidance", "2",
            "--out", tmp_path / "s.zarr")
    assert "no guidance embedding" in one_line_error(r)


@pytest.mark.parametrize("args,needle", [
    (("routing", "--steps", "2"), "sd3 blocks do not offer jvp.heads"),    # DiT's JVP split only
    (("capture", "--steps", "2", "--hooks", "jvp.routing", "--prompt-embeds", "{embeds}"),
     "sd3 blocks do not offer jvp.routing (they offer jvp.full)"),
    (("protocol1", "--encoder", "pixels"), "protocol1 runs on class-conditional models"),
    (("protocol2", "--at-step", "1"), "protocol2 runs on class-conditional models"),
])
def test_dit_only_experiments_refuse_text_families_by_name(sd3, tmp_path, args, needle):
    model, embeds, _ = sd3
    args = [str(a).format(embeds=embeds) for a in args]
    r = run(*args, "--model", model, "--out", tmp_path / "x.zarr")
    assert needle in one_line_error(r)
    assert not (tmp_path / "x.zarr").exists()
