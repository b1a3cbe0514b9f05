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


PATTERN_LIKE = ("logits", "pattern", "n_eff", "entropy", "topk", "pattern_")


def test_reading_every_hook_point_is_bit_for_bit_passive(tiny_model, dit_inputs):
    """Module hooks and q/k/v keep the fused kernel: output identical to the last bit."""
    ref = forward(tiny_model, dit_inputs)
    hm = HookManager(tiny_model)
    names = [n for n in hm.hook_points() if not any(k in n.rsplit(".", 1)[-1] for k in PATTERN_LIKE)]
    seen = {}
    with hm.hooks(read={n: (lambda v, ctx: seen.__setitem__(ctx.name, v.clone())) for n in names}):
        out = forward(tiny_model, dit_inputs)
    assert torch.equal(out, ref)
    assert set(seen) == set(names) and "blocks.1.attn.q" in seen
    assert no_torch_hooks(tiny_model)
    assert all(type(b.attn1.processor).__name__ == "AttnProcessor2_0" for b in tiny_model.transformer_blocks)


def test_attention_patterns_on_hooked_layers_only(tiny_model, dit_inputs):
    """Patterns need the explicit softmax on the hooked layer: equal to SDPA within float error."""
    ref = forward(tiny_model, dit_inputs)
    hm = HookManager(tiny_model)
    v = {}
    keep = lambda val, ctx: v.__setitem__(ctx.name, val.clone())
    with hm.hooks(read={"blocks.1.attn.pattern": keep, "blocks.1.attn.q": keep, "blocks.1.attn.k": keep,
                        "blocks.1.attn.n_eff": keep}):
        kinds = [type(b.attn1.processor).__name__ for b in tiny_model.transformer_blocks]
        out = forward(tiny_model, dit_inputs)
    assert kinds == ["AttnProcessor2_0", "HookedAttnProcessor", "AttnProcessor2_0", "AttnProcessor2_0"]
    assert all(type(b.attn1.processor).__name__ == "AttnProcessor2_0" for b in tiny_model.transformer_blocks)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    A = v["blocks.1.attn.pattern"]
    assert A.shape == (3, 2, 16, 16)
    torch.testing.assert_close(A.sum(-1), torch.ones(3, 2, 16))
    expected = torch.softmax(v["blocks.1.attn.q"] @ v["blocks.1.attn.k"].transpose(-1, -2) / 8**0.5, -1)
    torch.testing.assert_close(A, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(v["blocks.1.attn.n_eff"], 1 / (A**2).sum(-1), rtol=1e-5, atol=1e-5)


def test_attention_value_intervention(tiny_model, dit_inputs):
    hm = HookManager(tiny_model)
    v = {}
    with hm.hooks(replace={"blocks.1.attn.v": lambda val, c: torch.zeros_like(val)},
                  read={"blocks.1.attn.out": lambda val, c: v.__setitem__("out", val.clone())}):
        forward(tiny_model, dit_inputs)
    bias = tiny_model.transformer_blocks[1].attn1.to_out[0].bias
    torch.testing.assert_close(v["out"], bias.expand_as(v["out"]))
    with pytest.raises(DithooksError, match="read-only"):
        hm.add_intervention("blocks.1.attn.n_eff", lambda val, c: val)


def test_residual_identities_hold_exactly(tiny_model, dit_inputs):
    hm = HookManager(tiny_model)
    v = {}
    module_points = [n for n, p in hm.hook_points().items() if p.kind != "processor"]
    with hm.hooks(read={n: (lambda val, ctx: v.__setitem__(ctx.name, val.clone())) for n in module_points}):
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


def test_split_name_and_block_name_are_inverse():
    from dithooks.hookpoints import block_name, split_name

    assert split_name("blocks.3.attn.q") == (3, "attn.q")
    assert split_name("blocks.12.jvp.heads.dv") == (12, "jvp.heads.dv")
    assert split_name("final.out") == (None, "final.out")
    assert split_name("blocks.x.resid_post") == (None, "blocks.x.resid_post")
    for name in ("blocks.0.context.resid_mid", "embed.out", "blocks.7.adaln.gate_msa"):
        assert block_name(*split_name(name)) == name


def test_extensions_are_reached_by_name(tiny_model):
    from dithooks.adapters import ModelAdapter

    hm = HookManager(tiny_model)
    from dithooks.attention_hooks import AttentionHooks
    from dithooks.jvp_hooks import JVPHooks

    assert isinstance(hm.extension("attention"), AttentionHooks) and isinstance(hm.extension("jvp"), JVPHooks)
    assert hm.extension("attention") is hm.extension("attention", required=True)
    assert not hasattr(hm, "attention") and not hasattr(hm, "jvp")  # reached by name only
    assert hm.extension("nope") is None

    class NoAttention(ModelAdapter):  # a table without processor or JVP points
        block_tables = {"BasicTransformerBlock": ()}

    bare = HookManager(tiny_model, NoAttention(tiny_model))
    assert bare.extension("attention") is None
    with pytest.raises(DithooksError, match="no attention processors"):
        bare.extension("attention", required=True)


def test_attention_settings_are_validated(tiny_model):
    hm = HookManager(tiny_model)
    att = hm.extension("attention")
    with pytest.raises(DithooksError, match="top-k must lie in 1-16"):
        att.configure(top_k=17)
    with pytest.raises(DithooksError, match="query token 16 is out of range"):
        att.configure(query_tokens=[0, 16])
    with pytest.raises(DithooksError, match="query tile"):
        att.configure(query_tile=0)
    with pytest.raises(DithooksError, match="coupled layer 4 is out of range"):
        att.set_coupling(0.2, [4])
    att.configure(query_tokens=[3], top_k=2, query_tile=8)
    with pytest.raises(DithooksError, match="query token -1"):
        att.configure(top_k=3, query_tokens=[-1])  # all or nothing: top_k stays 2
    att.configure(query_tile=4)  # options not given keep their value
    with hm.hooks(read={"blocks.0.attn.pattern_query": lambda v, c: None}):
        proc = att.processor(0)
        assert (proc.query_tokens, proc.top_k, proc.query_tile) == ((3,), 2, 4)
        att.configure(top_k=None)
        assert att.processor(0) is not proc and att.processor(0).top_k is None
    with pytest.raises(DithooksError, match="unknown JVP setting"):
        hm.extension("jvp").configure(nope=1)
    with pytest.raises(DithooksError, match="JVP coupling"):
        hm.extension("jvp").configure(g=-1.0)


def test_carry_into_a_tuple_output(tiny_model, dit_inputs):
    """A replaced pre value re-used after the call reaches the carry module's tuple output item."""
    from dithooks.adapters import ModelAdapter
    from dithooks.adapters.spec import RESID, post, pre

    class TupleOut(torch.nn.Module):  # block 0 wrapped: returns (resid_post * 0, resid_post)
        def __init__(self, block):
            super().__init__()
            self.block = block

        def forward(self, h, **kw):
            out = self.block(h, **kw)
            return out * 0, out

    class Adapter(ModelAdapter):
        block_lists = ("wrapped",)
        block_tables = {"TupleOut": (pre("resid_mid", "block.norm3", RESID, "mid", carry_to="", carry_item=1),
                                     post("resid_post", "", RESID, "post", item=1))}

    holder = torch.nn.Module()
    holder.wrapped = torch.nn.ModuleList([TupleOut(tiny_model.transformer_blocks[0])])
    ad = Adapter(holder)
    assert ad.point("blocks.0.resid_mid").carry_item == 1
    hm = HookManager(holder, ad)
    x, t, y = dit_inputs
    h = tiny_model.pos_embed(x)
    kw = dict(timestep=t, class_labels=y)
    with torch.no_grad():
        ref = holder.wrapped[0](h, **kw)[1]
        with hm.hooks(replace={"blocks.0.resid_mid": lambda v, c: v + 1.0}):
            out = holder.wrapped[0](h, **kw)
    # the same replacement through DiT's own adapter (carry into a plain output) gives the same block output
    dit = HookManager(tiny_model)
    with torch.no_grad(), dit.hooks(replace={"blocks.0.resid_mid": lambda v, c: v + 1.0}):
        want = tiny_model.transformer_blocks[0](h, **kw)
    assert torch.equal(out[0], torch.zeros_like(out[0]))
    assert torch.equal(out[1], want) and not torch.allclose(want, ref, atol=0.1)
    with torch.no_grad():
        with hm.hooks(replace={"blocks.0.resid_mid": lambda v, c: v.clone()}):
            same = holder.wrapped[0](h, **kw)[1]
    assert torch.allclose(same, ref, atol=1e-6)
