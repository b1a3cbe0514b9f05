"""The conformance suite: what every model family's adapter must satisfy.

Every module ``tests/conformance/family_*.py`` is picked up automatically. It defines
``make_tiny(tmp_path) -> LoadedModel`` (a small random-init model saved with ``save_pretrained``
and loaded back through :func:`dithooks.loading.load_model`) and optionally
``conditioning(M) -> Conditioning`` (class families default to labels), ``SKIP_FIRE``
(``{template: reason}`` for hook points that cannot fire in the suite's run) and
``EXACT_WINDOW`` (True when a global window keeps the model's own kernel, bit for bit) and
``NO_EFFECT`` (templates of writable points whose change cannot reach the output).

Checks, for every family (docs/adapters.md):
1. every documented hook point fires, with its documented dims and the sizes the adapter's
   ``dim_sizes`` gives (one guided, coupled step reading everything);
2. reading is passive: module points, q/k/v and JVPs bit for bit, patterns within float error
   (they leave the fused kernel), and every processor is put back;
3. patterns equal softmax(q k^T / sqrt(d)) recomputed from the emitted q, k (and the text keys
   of joint attention: image rows are normalised over the joint sequence; cross-attention
   patterns are the softmax of their logits, which are q k^T / sqrt(d) off the padding);
4. coupling at g = 0 equals two independent runs (and g > 0 changes the output);
5. a window of radius side-1 equals global attention (r = 0 does not);
6. a short guided Sampler run in the family's own scheduler is finite and resumes exactly;
7. ``capture`` stores what the hooks see, and ``dithooks ls`` reads the store;
8. every writable point writes back what it reads (identity replacement: bit for bit) and a
   perturbation of it changes the output.
"""

from __future__ import annotations

import importlib
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from dithooks.hookpoints import split_name
from dithooks.hooks import HookManager
from dithooks.sampling import ReplicaSpec, Sampler, SamplerSpec, TrajectoryState

pytestmark = pytest.mark.usefixtures("one_torch_thread")

FAMILY_MODULES = sorted(p.stem for p in Path(__file__).parent.glob("family_*.py"))
QUERY_TOKENS = (0, 1)
TOP_K = 2
M = 2  # samples per run
#: dims of processor values computed by the explicit softmax (they leave the fused kernel)
PATTERN_DIMS = {"query", "key", "text_query", "text_key", "joint_query", "joint_key", "rank"}


@pytest.fixture(scope="module", params=FAMILY_MODULES)
def fam(request, tmp_path_factory):
    mod = importlib.import_module(f"{__package__}.{request.param}")
    loaded = mod.make_tiny(tmp_path_factory.mktemp(request.param))
    return SimpleNamespace(name=request.param, mod=mod, loaded=loaded, adapter=loaded.adapter)


def conditioning(fam, m: int = M):
    if hasattr(fam.mod, "conditioning"):
        return fam.mod.conditioning(m)
    return fam.adapter.make_conditioning(list(range(m)))


def spec(fam, steps: int = 1, guidance: float = 2.0) -> SamplerSpec:
    return SamplerSpec(fam.adapter.default_sampler, steps, guidance=guidance)


def attention(hm):
    return hm.extension("attention")


def processors(model) -> list[str]:
    return [type(m.processor).__name__ for m in model.modules() if hasattr(m, "set_processor")]


def torch_hooks(model) -> dict[str, tuple[int, int]]:
    """Number of forward (pre-)hooks per module (adapters may keep their own permanent ones)."""
    return {n: (len(m._forward_hooks), len(m._forward_pre_hooks)) for n, m in model.named_modules()
            if m._forward_hooks or m._forward_pre_hooks}


def sample(fam, hm=None, replicas=None, steps=1, guidance=2.0):
    return Sampler(fam.loaded, spec(fam, steps, guidance), hm, replicas=replicas).run(
        conditioning(fam), list(range(M)))


def read_all(hm, names, run):
    seen: dict[str, tuple] = {}

    def keep(v, ctx):
        seen.setdefault(ctx.name, (v.detach().clone(), ctx.batch_axes))

    with hm.hooks(read={n: keep for n in names}):
        out = run()
    return seen, out


def expected_shape(fam, name: str, point, batch_axes) -> tuple[int, ...]:
    sizes = fam.adapter.dim_sizes(top_k=TOP_K)
    shape = [math.prod(k for _, k in batch_axes)]
    for d in point.dims[1:]:
        if split_name(name)[1].endswith("pattern_query") and d == "query":
            shape.append(len(QUERY_TOKENS))
            continue
        assert d in sizes, f"{name}: dim {d!r} is not sized by the adapter's dim_sizes()"
        shape.append(sizes[d])
    return tuple(shape)


def test_every_point_fires_with_documented_dims(fam):
    a = fam.adapter
    hm = HookManager(fam.loaded.transformer, a)
    att = attention(hm)
    replicas = None
    if att is not None:
        att.configure(query_tokens=QUERY_TOKENS, top_k=TOP_K)
        replicas = ReplicaSpec(kappa=0.5, g=0.3)  # coupled: the inter-replica names fire too
    names = list(a.hook_points())
    seen, out = read_all(hm, names, lambda: sample(fam, hm, replicas))
    skip = getattr(fam.mod, "SKIP_FIRE", {})
    missing = [n for n in names if n not in seen and a.point(n).template not in skip]
    assert not missing, f"documented hook points that never fired: {missing[:8]}"
    axes = Sampler(fam.loaded, spec(fam), hm, replicas=replicas).batch_axes(M)
    for name, (v, b_axes) in seen.items():
        p = a.point(name)
        assert p.doc and p.dims and p.dims[0] == "batch", name
        want_axes = axes[1:] if p.kind == "jvp" and replicas is not None else axes
        assert b_axes == want_axes, f"{name}: batch axes {b_axes}, expected {want_axes}"
        assert tuple(v.shape) == expected_shape(fam, name, p, b_axes), (
            f"{name}: shape {tuple(v.shape)} does not match dims {p.dims}")
    assert torch.isfinite(out).all()


def test_reading_is_passive(fam):
    a, model = fam.adapter, fam.loaded.transformer
    before, hooks_before = processors(model), torch_hooks(model)
    hm0 = HookManager(model, a)
    replicas = ReplicaSpec(kappa=0.5, g=0.3) if attention(hm0) is not None else None
    ref = sample(fam, HookManager(model, a), replicas)
    exact = [n for n, p in a.hook_points().items()
             if p.kind in ("pre", "post", "jvp") or not set(p.dims) & PATTERN_DIMS]
    hm = HookManager(model, a)
    if attention(hm) is not None:
        attention(hm).configure(query_tokens=QUERY_TOKENS, top_k=TOP_K)
    _, out = read_all(hm, exact, lambda: sample(fam, hm, replicas))
    assert torch.equal(out, ref), "reading module points, q/k/v and JVPs changed the samples"
    _, out = read_all(hm, list(a.hook_points()), lambda: sample(fam, hm, replicas))
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)  # explicit softmax: float error only
    assert torch.equal(sample(fam, HookManager(model, a), replicas), ref)
    assert processors(model) == before, "the model's own processors were not put back"
    assert torch_hooks(model) == hooks_before, "torch hooks were left on the model"


def _softmax_rows(logits):
    return torch.softmax(logits.double(), dim=-1)


def test_patterns_are_the_softmax_of_emitted_q_k(fam):
    a = fam.adapter
    hm = HookManager(fam.loaded.transformer, a)
    if attention(hm) is None:
        pytest.skip(f"{fam.name} exposes no attention processors")
    wanted = ("attn.q", "attn.k", "attn.context_q", "attn.context_k", "attn.logits", "attn.pattern",
              "attn.pattern_image_text", "attn.pattern_text_image",
              "cross_attn.q", "cross_attn.k", "cross_attn.logits", "cross_attn.pattern")
    names = [n for n in a.hook_points() if split_name(n)[1] in wanted]
    seen, _ = read_all(hm, names, lambda: sample(fam, hm, guidance=1.0))
    checked = 0
    for layer in range(a.num_layers):
        got = {split_name(n)[1]: v for n, (v, _) in seen.items() if split_name(n)[0] == layer}
        if "attn.pattern" not in got:
            continue
        q, k = got["attn.q"].double(), got["attn.k"].double()
        scale = q.shape[-1] ** -0.5
        ck = got.get("attn.context_k")
        keys = k if ck is None else torch.cat([k, ck.double()], dim=-2)
        n_img = k.shape[-2]
        joint = _softmax_rows((q @ keys.transpose(-1, -2)) * scale)
        torch.testing.assert_close(got["attn.pattern"].double(), joint[..., :n_img], rtol=1e-4, atol=1e-6)
        if "attn.logits" in got:
            torch.testing.assert_close(got["attn.logits"].double(), (q @ k.transpose(-1, -2)) * scale,
                                       rtol=1e-4, atol=1e-5)
        if "attn.pattern_image_text" in got:
            torch.testing.assert_close(got["attn.pattern_image_text"].double(), joint[..., n_img:],
                                       rtol=1e-4, atol=1e-6)
        if "attn.pattern_text_image" in got:
            cq = got["attn.context_q"].double()
            text_rows = _softmax_rows((cq @ keys.transpose(-1, -2)) * scale)
            torch.testing.assert_close(got["attn.pattern_text_image"].double(), text_rows[..., :n_img],
                                       rtol=1e-4, atol=1e-6)
        if "cross_attn.pattern" in got:  # cross-attention to text (PixArt): masks are additive biases
            cq, ck2 = got["cross_attn.q"].double(), got["cross_attn.k"].double()
            logits = got["cross_attn.logits"].double()
            plain = (cq @ ck2.transpose(-1, -2)) * cq.shape[-1] ** -0.5
            kept = logits > -1000.0  # padding carries a large negative bias
            assert kept.any()
            torch.testing.assert_close(logits[kept], plain[kept], rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(got["cross_attn.pattern"].double(), _softmax_rows(logits), rtol=1e-4, atol=1e-6)
        if ck is None:  # plain self-attention: rows sum to one
            torch.testing.assert_close(got["attn.pattern"].double().sum(-1),
                                       torch.ones(got["attn.pattern"].shape[:-1], dtype=torch.float64))
        checked += 1
    assert checked, f"{fam.name}: no layer emitted attn.pattern"


def _denoise_inputs(fam, replicas: int):
    a = fam.adapter
    g = torch.Generator().manual_seed(3)
    x = torch.randn(replicas * M, *a.geometry.latent_shape, generator=g)
    t = Sampler(fam.loaded, spec(fam, 2)).scheduler.timesteps[0]
    rows = conditioning(fam).rows(cfg=False, replicas=replicas)
    return x, t, rows


def test_coupling_at_g0_is_two_independent_runs(fam):
    a = fam.adapter
    hm = HookManager(fam.loaded.transformer, a)
    att = attention(hm)
    if att is None:
        pytest.skip(f"{fam.name} exposes no attention processors")
    x, t, rows = _denoise_inputs(fam, 2)
    one = {k: v[:M] if isinstance(v, torch.Tensor) else v for k, v in rows.items()}
    with torch.no_grad():
        separate = torch.cat([a.denoise(x[:M], t, one), a.denoise(x[M:], t, one)])
        att.set_coupling(0.0)
        try:
            assert any(n.startswith("Hooked") or "Hooked" in n for n in processors(fam.loaded.transformer))
            coupled0 = a.denoise(x, t, rows)
            att.set_coupling(0.5)
            coupled = a.denoise(x, t, rows)
        finally:
            att.set_coupling(None)
    torch.testing.assert_close(coupled0, separate, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(coupled, separate, rtol=1e-3, atol=1e-3), "g = 0.5 did not couple the replicas"


def test_global_window_is_global_attention(fam):
    a = fam.adapter
    hm = HookManager(fam.loaded.transformer, a)
    att = attention(hm)
    if att is None:
        pytest.skip(f"{fam.name} exposes no attention processors")
    x, t, rows = _denoise_inputs(fam, 1)
    side = max(a.geometry.grid_height, a.geometry.grid_width)
    with torch.no_grad():
        ref = a.denoise(x, t, rows)
        try:
            att.set_window(side - 1)
            wide = a.denoise(x, t, rows)
            att.set_window(side + 3)
            wider = a.denoise(x, t, rows)
            att.set_window(0)
            local = a.denoise(x, t, rows)
        finally:
            att.set_window(None)
    if getattr(fam.mod, "EXACT_WINDOW", False):
        assert torch.equal(wide, ref) and torch.equal(wider, ref)
    else:
        torch.testing.assert_close(wide, ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(wider, ref, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(local, ref, rtol=1e-3, atol=1e-3), "a radius-0 window changed nothing"
    assert torch.equal(a.denoise(x, t, rows), ref)


def test_short_guided_sampler_run_resumes_exactly(fam):
    states = []
    s = Sampler(fam.loaded, spec(fam, 2))
    full = s.run(conditioning(fam), list(range(M)), on_step=lambda i, st: states.append(st))
    assert full.shape == (M, *fam.adapter.geometry.latent_shape) and torch.isfinite(full).all()
    assert [st.step for st in states] == [1, 2]
    again = s.run(conditioning(fam), list(range(M)), state=states[0])
    assert torch.equal(again, full)
    fresh = Sampler(fam.loaded, spec(fam, 2)).run(conditioning(fam), list(range(M)))
    assert torch.equal(fresh, full)
    assert isinstance(states[0], TrajectoryState)


def test_capture_into_a_store(fam, tmp_path):
    """capture() stores what the hooks see (bit for bit at fp32) and ``dithooks ls`` reads it."""
    import numpy as np

    from dithooks.capture import CaptureConfig, capture
    from dithooks.store.reader import open_store

    cond = conditioning(fam)
    sp = spec(fam, 2)
    hm = HookManager(fam.loaded.transformer, fam.adapter)
    ref = {}
    keep = lambda v, c: ref.__setitem__((c.layer, c.step), v.clone())  # noqa: E731
    with hm.hooks(read={f"blocks.{i}.resid_post": keep for i in range(fam.adapter.num_layers)}):
        Sampler(fam.loaded, sp, hm).run(cond, list(range(M)))
    kw = dict(labels=tuple(int(v) for v in cond.labels)) if fam.adapter.conditioning == "class" else dict(conditioning=cond)
    res = capture(CaptureConfig(out=str(tmp_path / "s.zarr"), model=str(fam.loaded.model_id), layers="all",
                                hooks=("resid_post", "final.out"), sampler=sp, seeds=tuple(range(M)),
                                storage_dtype="fp32", **kw), loaded=fam.loaded)
    assert res.steps_run == 2
    store = open_store(tmp_path / "s.zarr")
    assert store.completeness()["complete"]
    got = store.select("blocks.resid_post")
    assert got.dims == ("step", "layer", "cfg", "sample", "token", "channel")
    for (layer, step), v in ref.items():
        np.testing.assert_array_equal(got.values[step, layer].reshape(v.shape), v.numpy())
    from typer.testing import CliRunner

    from dithooks.cli.main import app

    r = CliRunner().invoke(app, ["ls", str(tmp_path / "s.zarr"), "--json"])
    assert r.exit_code == 0, r.output
    assert "blocks.resid_post" in r.output


def test_writable_points_write_what_they_read(fam):
    """An identity replacement on a writable point keeps the output bit for bit (its writer puts
    back exactly what its reader took), and a perturbation changes the output."""
    a, model = fam.adapter, fam.loaded.transformer
    hm = HookManager(model, a)
    x, t, rows = _denoise_inputs(fam, 1)
    with torch.no_grad():
        ref = a.denoise(x, t, rows)
    names = [n for n, p in a.hook_points().items()
             if p.writable and (p.kind in ("pre", "post") or not set(p.dims) & PATTERN_DIMS)]
    assert names
    no_effect = getattr(fam.mod, "NO_EFFECT", {})
    unchanged, inert = [], []
    for name in names:
        with torch.no_grad():
            with hm.hooks(replace={name: lambda v, c: v.clone()}):
                same = a.denoise(x, t, rows)
            with hm.hooks(replace={name: lambda v, c: v + 0.1 * v.abs().mean() + 0.05}):
                moved = a.denoise(x, t, rows)
        if not torch.equal(same, ref):
            unchanged.append(name)
        layer, local = split_name(name)
        # the text stream of the last block feeds nothing: the model's output is the image tokens
        dead_text = layer == a.num_layers - 1 and (local.startswith("context.") or local == "attn.context_q")
        if torch.equal(moved, ref) and a.point(name).template not in no_effect and not dead_text:
            inert.append(name)
    assert not unchanged, f"identity replacements changed the output: {unchanged[:6]}"
    assert not inert, f"perturbing these writable points changed nothing: {inert[:6]}"
    assert not hm.attached()
