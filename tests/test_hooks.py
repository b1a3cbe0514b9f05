import pytest
import torch

from dithooks.errors import DithooksError, HookNameError
from dithooks.hooks import HookManager


def forward(model, inputs):
    x, t, y = inputs
    with torch.no_grad():
        return model(x, timestep=t, class_labels=y).sample


def no_torch_hooks(model):
    return all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_reading_every_hook_point_is_bit_for_bit_passive(tiny_model, dit_inputs):
    ref = forward(tiny_model, dit_inputs)
    hm = HookManager(tiny_model)
    seen = {}
    with hm.hooks(read={"*": lambda v, ctx: seen.__setitem__(ctx.name, v.clone())}):
        out = forward(tiny_model, dit_inputs)
    assert torch.equal(out, ref)
    assert set(seen) == set(hm.hook_points())
    assert no_torch_hooks(tiny_model)


def test_residual_identities_hold_exactly(tiny_model, dit_inputs):
    hm = HookManager(tiny_model)
    v = {}
    with hm.hooks(read={"*": lambda val, ctx: v.__setitem__(ctx.name, val.clone())}):
        forward(tiny_model, dit_inputs)
    assert torch.equal(v["embed.out"], v["blocks.0.resid_pre"])
    for i in range(4):
        b = f"blocks.{i}"
        mid = v[f"{b}.resid_pre"] + v[f"{b}.adaln.gate_msa"][:, None] * v[f"{b}.attn.out"]
        post = v[f"{b}.resid_mid"] + v[f"{b}.adaln.gate_mlp"][:, None] * v[f"{b}.mlp.out"]
        assert torch.equal(v[f"{b}.resid_mid"], mid)
        assert torch.equal(v[f"{b}.resid_post"], post)
        if i < 3:
            assert torch.equal(v[f"{b}.resid_post"], v[f"blocks.{i + 1}.resid_pre"])
        # adaLN1 applied by hand matches what attention reads
        ln = torch.nn.functional.layer_norm(v[f"{b}.resid_pre"], (v[f"{b}.resid_pre"].shape[-1],), eps=1e-6)
        attn_in = ln * (1 + v[f"{b}.adaln.scale_msa"][:, None]) + v[f"{b}.adaln.shift_msa"][:, None]
        torch.testing.assert_close(v[f"{b}.attn.in"], attn_in, rtol=1e-5, atol=1e-5)
    assert v["final.out"].shape == (3, 8, 8, 8)


def test_context_passes_layer_and_state(tiny_model, dit_inputs):
    hm = HookManager(tiny_model)
    hm.state.step, hm.state.timestep = 4, 123
    ctxs = []
    with hm.hooks(read={"blocks.2.mlp.out": lambda v, c: ctxs.append(c)}):
        forward(tiny_model, dit_inputs)
    (c,) = ctxs
    assert (c.name, c.layer, c.step, c.timestep) == ("blocks.2.mlp.out", 2, 4, 123)


def test_intervention_replaces_values(tiny_model, dit_inputs):
    hm = HookManager(tiny_model)
    v = {}
    keep = lambda val, ctx: v.__setitem__(ctx.name, val.clone())
    with hm.hooks(read={"blocks.1.resid_pre": keep, "blocks.1.resid_mid": keep, "blocks.1.resid_post": keep,
                        "blocks.1.mlp.out": keep, "blocks.1.adaln.gate_mlp": keep},
                  replace={"blocks.1.attn.out": lambda val, ctx: torch.zeros_like(val)}):
        out = forward(tiny_model, dit_inputs)
    assert torch.equal(v["blocks.1.resid_mid"], v["blocks.1.resid_pre"])  # the attention branch is gone
    assert not torch.equal(out, forward(tiny_model, dit_inputs))
    # replacing resid_mid reaches both the MLP input and the residual sum (resid_post)
    with hm.hooks(read={"blocks.2.resid_post": keep, "blocks.2.mlp.out": keep, "blocks.2.adaln.gate_mlp": keep},
                  replace={"blocks.2.resid_mid": lambda val, ctx: torch.zeros_like(val)}):
        forward(tiny_model, dit_inputs)
    torch.testing.assert_close(v["blocks.2.resid_post"], v["blocks.2.adaln.gate_mlp"][:, None] * v["blocks.2.mlp.out"],
                               rtol=0, atol=1e-6)
    assert no_torch_hooks(tiny_model)


def test_adaln_intervention_changes_only_that_chunk(tiny_model, dit_inputs):
    hm = HookManager(tiny_model)
    v = {}
    with hm.hooks(replace={"blocks.0.adaln.gate_msa": lambda val, c: torch.zeros_like(val)},
                  read={"blocks.0.resid_mid": lambda val, c: v.__setitem__("mid", val.clone()),
                        "blocks.0.resid_pre": lambda val, c: v.__setitem__("pre", val.clone())}):
        forward(tiny_model, dit_inputs)
    assert torch.equal(v["mid"], v["pre"])


def test_hooks_are_removed_even_on_error(tiny_model, dit_inputs):
    hm = HookManager(tiny_model)

    def boom(v, ctx):
        raise RuntimeError("user bug")

    with pytest.raises(RuntimeError):
        with hm.hooks(read={"blocks.0.resid_post": boom}):
            forward(tiny_model, dit_inputs)
    assert hm.attached() == [] and no_torch_hooks(tiny_model)
    with HookManager(tiny_model) as hm2:
        hm2.add_hook("blocks.*.resid_post", lambda v, c: None)
        assert len(hm2.attached()) == 4
    assert no_torch_hooks(tiny_model)


def test_read_hooks_cannot_change_the_model(tiny_model, dit_inputs):
    hm = HookManager(tiny_model)
    with pytest.raises(DithooksError, match="passive"):
        with hm.hooks(read={"blocks.0.resid_post": lambda v, c: v * 0}):
            forward(tiny_model, dit_inputs)
    with pytest.raises(DithooksError, match="shape"):
        with hm.hooks(replace={"blocks.0.resid_post": lambda v, c: v[:, :1]}):
            forward(tiny_model, dit_inputs)


def test_unknown_names_suggest_close_ones(tiny_model):
    hm = HookManager(tiny_model)
    with pytest.raises(HookNameError) as e:
        hm.add_hook("blocks.1.resid_pst", lambda v, c: None)
    assert "blocks.1.resid_post" in str(e.value)
    with pytest.raises(HookNameError):
        hm.add_hook("blocks.99.resid_post", lambda v, c: None)
    assert hm.attached() == []


def test_listing_and_removal(tiny_model):
    hm = HookManager(tiny_model)
    a = hm.add_hook("blocks.0.resid_pre", lambda v, c: None)
    b = hm.add_intervention("blocks.1.attn.out", lambda v, c: None)
    text = hm.describe()
    assert "read" in text and "replace" in text and "blocks.1.attn.out" in text
    hm.remove(a)
    assert [h.name for h in hm.attached()] == ["blocks.1.attn.out"]
    hm.remove(b)
    assert no_torch_hooks(tiny_model)


def test_generic_module_paths(tiny_model, dit_inputs):
    hm = HookManager(tiny_model)
    seen = {}
    with hm.hooks(read={"modules.transformer_blocks.1.ff.net.0.out": lambda v, c: seen.__setitem__("gelu", v.shape)}):
        forward(tiny_model, dit_inputs)
    assert seen["gelu"][-1] == 4 * 16
    with pytest.raises(HookNameError):
        hm.add_hook("modules.transformer_blocks.1.nope.out", lambda v, c: None)
