"""The hook manager's read-only dispatch (dithooks/hooks.py ``_Dispatch``): modules whose points
are only read take a short path with one context per point and step; anything that can change a
value (an intervention on the module, a replaced value carried into it) takes the general path.
Checked against what the general path and plain torch hooks see."""

from __future__ import annotations

import pytest
import torch

from dithooks.errors import HookNameError
from dithooks.hooks import HookManager
from tests.test_hooks import forward, no_torch_hooks


def test_contexts_follow_the_sampling_state_call_by_call(tiny_model, dit_inputs):
    hm = HookManager(tiny_model)
    seen = []
    names = ["blocks.0.resid_post", "blocks.1.resid_post", "blocks.1.resid_pre"]
    with hm.hooks(read={n: (lambda v, ctx: seen.append(ctx)) for n in names}):
        for step, t, axes in [(0, 999.0, (("sample", 2),)), (0, 999.0, (("sample", 2),)), (1, 500.0, (("sample", 2),)),
                              (1, 500.0, (("cfg", 2), ("sample", 1))), (None, None, ())]:
            hm.state.step, hm.state.timestep, hm.state.batch_axes = step, t, axes
            seen.clear()
            forward(tiny_model, dit_inputs)
            assert [c.name for c in seen] == ["blocks.0.resid_post", "blocks.1.resid_pre", "blocks.1.resid_post"]
            for c in seen:  # what the general path's context() gives for the same point and state
                want = hm.context(hm.adapter.point(c.name))
                assert (c.name, c.layer, c.step, c.timestep, c.batch_axes, c.point, dict(c.info)) == \
                    (want.name, want.layer, want.step, want.timestep, want.batch_axes, want.point, dict(want.info))
    assert no_torch_hooks(tiny_model)


def test_an_intervention_on_the_module_switches_to_the_general_path_and_back(tiny_model, dit_inputs):
    hm = HookManager(tiny_model)
    ref = forward(tiny_model, dit_inputs)
    got = {}
    block = tiny_model.transformer_blocks[0]
    after = {}  # the block's output as torch hands it on (a plain hook registered after ours)
    read = hm.add_hook("blocks.0.resid_post", lambda v, ctx: got.__setitem__("post", v.clone()))
    raw = block.register_forward_hook(lambda m, a, o: after.__setitem__("out", o.clone()))
    try:
        forward(tiny_model, dit_inputs)
        plain_post = got["post"]
        assert torch.equal(plain_post, after["out"])
        assert hm._dispatch[("transformer_blocks.0", "post")].reads is not None  # read-only: the short path
        # resid_mid replaced: its change is carried into the block's output, which resid_post reads
        fix = hm.add_intervention("blocks.0.resid_mid", lambda v, ctx: v + 1.0)
        assert hm._dispatch[("transformer_blocks.0", "post")].reads is None
        forward(tiny_model, dit_inputs)
        assert torch.equal(got["post"], after["out"]) and not torch.allclose(got["post"], plain_post, atol=0.1)
        # an intervention on the read point itself: the read sees the value before it
        hm.remove(fix)
        rep = hm.add_intervention("blocks.0.resid_post", lambda v, ctx: v * 0)
        forward(tiny_model, dit_inputs)
        assert torch.equal(got["post"], plain_post) and torch.equal(after["out"], torch.zeros_like(plain_post))
        hm.remove(rep)
        assert hm._dispatch[("transformer_blocks.0", "post")].reads is not None
        assert torch.equal(forward(tiny_model, dit_inputs), ref)  # bit for bit once only reads are left
        assert torch.equal(got["post"], plain_post)
    finally:
        raw.remove()
        hm.remove(read)
    assert no_torch_hooks(tiny_model)


def test_a_bad_name_in_a_hooks_block_attaches_nothing(tiny_model):
    hm = HookManager(tiny_model)
    with pytest.raises(HookNameError):
        with hm.hooks(read={"blocks.0.resid_post": lambda v, c: None, "blocks.0.resid_pots": lambda v, c: None}):
            pass
    assert hm.attached() == [] and no_torch_hooks(tiny_model)
    with hm.hooks(read={"blocks.*.resid_post": lambda v, c: None}, replace={"blocks.1.mlp.out": lambda v, c: None}):
        assert len(hm.attached()) == len(tiny_model.transformer_blocks) + 1
    assert hm.attached() == [] and no_torch_hooks(tiny_model)
