"""The hook manager's read-only dispatch (dithooks/hooks.py ``_Dispatch``): modules whose points
are only read take a short path with one context per point and step; anything that can change a
value (an intervention on the module, a replaced value carried into it) takes the general path.
Checked against what the general path and plain torch hooks see."""

from __future__ import annotations

import pytest
import torch

from dithooks.errors import DithooksError, HookNameError
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


class Reader:
    """A bindable reader (dithooks.hooks.BindableReader) that logs how it was called."""

    def __init__(self):
        self.calls: list[tuple] = []  # ("call", name, value) or ("bound", name, value, ctx)
        self.bound: list[str] = []

    def __call__(self, value, ctx):
        self.calls.append(("call", ctx.name, value.clone()))

    def bind(self, point, context):
        self.bound.append(point.name)

        def read(value):
            self.calls.append(("bound", point.name, value.clone(), context()))
        return read


def test_a_bindable_reader_alone_on_its_point_is_called_with_the_value_alone(tiny_model, dit_inputs):
    hm = HookManager(tiny_model)
    reader, plain = Reader(), {}
    names = ["blocks.0.resid_post", "blocks.1.resid_pre"]
    raw = [tiny_model.transformer_blocks[0].register_forward_hook(lambda m, a, o: plain.__setitem__(0, o.clone())),
           tiny_model.transformer_blocks[1].register_forward_pre_hook(
               lambda m, a, k: plain.__setitem__(1, k["hidden_states"].clone() if "hidden_states" in k
                                                 else a[0].clone()), with_kwargs=True)]
    try:
        ref = forward(tiny_model, dit_inputs)
        with hm.hooks(read={n: reader for n in names}):
            assert sorted(reader.bound) == sorted(names)
            hm.state.step, hm.state.timestep, hm.state.batch_axes = 3, 250.0, (("sample", 2),)
            out = forward(tiny_model, dit_inputs)
        assert torch.equal(out, ref)  # passive, bit for bit
        assert [c[:2] for c in reader.calls] == [("bound", "blocks.0.resid_post"), ("bound", "blocks.1.resid_pre")]
        assert torch.equal(reader.calls[0][2], plain[0]) and torch.equal(reader.calls[1][2], plain[1])
        for c in reader.calls:  # context() is the general path's context for the same point and state
            ctx, want = c[3], hm.context(hm.adapter.point(c[1]))
            assert (ctx.name, ctx.layer, ctx.step, ctx.timestep, ctx.batch_axes) == \
                (want.name, want.layer, 3, 250.0, (("sample", 2),))
    finally:
        for h in raw:
            h.remove()
    assert no_torch_hooks(tiny_model)


def test_a_bindable_reader_is_called_as_a_read_function_where_it_is_not_alone(tiny_model, dit_inputs):
    hm = HookManager(tiny_model)
    reader, other = Reader(), []
    # two functions on one point; an intervention on another point of the same module; binding off
    with hm.hooks(read={"blocks.0.resid_post": reader}):
        h = hm.add_hook("blocks.0.resid_post", lambda v, c: other.append(v.clone()))
        forward(tiny_model, dit_inputs)
        hm.remove(h)
        h = hm.add_intervention("blocks.0.resid_mid", lambda v, c: None)
        forward(tiny_model, dit_inputs)
        hm.remove(h)
        forward(tiny_model, dit_inputs)  # alone again: bound
    assert [c[0] for c in reader.calls] == ["call", "call", "bound"]
    assert torch.equal(reader.calls[0][2], other[0]) and torch.equal(reader.calls[2][2], other[0])
    reader.calls.clear()
    HookManager.bind_readers = False
    try:
        with hm.hooks(read={"blocks.0.resid_post": reader}):
            forward(tiny_model, dit_inputs)
    finally:
        HookManager.bind_readers = True
    assert [c[0] for c in reader.calls] == ["call"]


def test_a_bound_reader_is_passive_and_suspendable(tiny_model, dit_inputs):
    hm = HookManager(tiny_model)

    class Returns(Reader):
        def bind(self, point, context):
            return lambda value: value
    with hm.hooks(read={"blocks.0.resid_post": Returns()}):
        with pytest.raises(DithooksError, match="passive"):
            forward(tiny_model, dit_inputs)
    reader = Reader()
    with hm.hooks(read={"blocks.0.resid_post": reader}):
        with hm.suspended():
            forward(tiny_model, dit_inputs)
    assert reader.calls == []
    assert no_torch_hooks(tiny_model)


def test_the_documented_bindable_reader_runs_bound_and_unbound(tiny_model, dit_inputs):
    import re
    from pathlib import Path

    doc = (Path(__file__).resolve().parents[1] / "docs" / "writing-probes.md").read_text()
    block = next(b for b in re.findall(r"```python\n(.*?)```", doc, re.S) if "class LastNorms" in b)
    hm = HookManager(tiny_model)
    ns = {"hm": hm}
    exec(block.replace("    ...", "    forward(tiny_model, dit_inputs)"),
         {**ns, "forward": forward, "tiny_model": tiny_model, "dit_inputs": dit_inputs}, ns)
    seen = {}
    with hm.hooks(read={"blocks.*.resid_post": lambda v, c: seen.__setitem__(c.name, v.norm().item())}):
        forward(tiny_model, dit_inputs)
    reader = ns["LastNorms"]()
    with hm.hooks(read={"blocks.*.resid_post": reader}):
        assert all(s.direct is not None for s in hm._dispatch.values())  # bound
        forward(tiny_model, dit_inputs)
    assert reader.norms == seen and len(seen) == len(tiny_model.transformer_blocks)
