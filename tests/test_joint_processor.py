"""The hooked joint-attention processor (SD3/Flux MMDiT) against independent computations."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import SD3Transformer2DModel
from diffusers.models.attention_processor import JointAttnProcessor2_0

from dithooks.attention.joint_processor import ALL_NAMES, NAME_DIMS, HookedJointAttnProcessor, JointAttention
from dithooks.attention.window import window_mask

torch.set_num_threads(1)
L_TEXT = 5


def tiny_sd3(seed=0):
    torch.manual_seed(seed)
    return SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=2,
                                 attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                 caption_projection_dim=32, pooled_projection_dim=16, out_channels=4,
                                 pos_embed_max_size=8).eval()


def inputs(batch=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    return dict(hidden_states=torch.randn(batch, 4, 8, 8, generator=g),
                encoder_hidden_states=torch.randn(batch, L_TEXT, 32, generator=g),
                pooled_projections=torch.randn(batch, 16, generator=g),
                timestep=torch.full((batch,), 700.0))


def attn_io(model, x, block=0):
    """(attention module, its hidden_states and encoder_hidden_states inputs) from a real call."""
    seen = {}
    attn = model.transformer_blocks[block].attn
    h = attn.register_forward_pre_hook(lambda m, a, kw: seen.update(kw), with_kwargs=True)
    with torch.no_grad():
        model(**x)
    h.remove()
    return attn, seen["hidden_states"], seen["encoder_hidden_states"]


def run(attn, proc, hs, ehs):
    attn.set_processor(proc)
    try:
        with torch.no_grad():
            return attn(hidden_states=hs, encoder_hidden_states=ehs)
    finally:
        attn.set_processor(JointAttnProcessor2_0())


def np_softmax(x):
    x = x - x.max(-1, keepdims=True)
    e = np.exp(x)
    return e / e.sum(-1, keepdims=True)


def numpy_joint(attn, hs, ehs):
    """q/k/v of both streams and the joint pattern, written with numpy from the weights."""
    lin = lambda m, x: x.numpy().astype(np.float64) @ m.weight.detach().numpy().T.astype(np.float64) + m.bias.detach().numpy()
    H = attn.heads
    def heads(x):
        B, S, C = x.shape
        return x.reshape(B, S, H, C // H).transpose(0, 2, 1, 3)
    q, k, v = heads(lin(attn.to_q, hs)), heads(lin(attn.to_k, hs)), heads(lin(attn.to_v, hs))
    cq, ck, cv = (heads(lin(attn.add_q_proj, ehs)), heads(lin(attn.add_k_proj, ehs)),
                  heads(lin(attn.add_v_proj, ehs)))
    Q, K, V = (np.concatenate(p, 2) for p in ((q, cq), (k, ck), (v, cv)))
    P = np_softmax(Q @ K.transpose(0, 1, 3, 2) / np.sqrt(Q.shape[-1]))
    return dict(q=q, k=k, v=v, cq=cq, ck=ck, cv=cv, P=P, O=P @ V)


def collect(store):
    def emit(name, value):
        store[name] = value.detach().clone()
    return emit


@pytest.fixture(scope="module")
def setup():
    model = tiny_sd3()
    return (model,) + attn_io(model, inputs())


def test_unhooked_and_trivially_hooked_are_bit_for_bit(setup):
    model, attn, hs, ehs = setup
    ref = run(attn, JointAttnProcessor2_0(), hs, ehs)
    for proc in (HookedJointAttnProcessor(0),                                # nothing requested
                 HookedJointAttnProcessor(0, emit=lambda n, v: None, wanted={"attn.q", "attn.context_v"}),
                 HookedJointAttnProcessor(0, coupling=0.0),                  # g = 0: inter call skipped
                 HookedJointAttnProcessor(0, window=3),                      # side 4: r >= side-1
                 HookedJointAttnProcessor(0, window=10)):
        out = run(attn, proc, hs, ehs)
        assert torch.equal(out[0], ref[0]) and torch.equal(out[1], ref[1])
    assert HookedJointAttnProcessor(0, window=3).hooked and not HookedJointAttnProcessor(0).hooked


def test_emitted_values_match_numpy(setup):
    model, attn, hs, ehs = setup
    got = {}
    proc = HookedJointAttnProcessor(0, emit=collect(got), wanted=ALL_NAMES - {"attn.logits_inter", "attn.pattern_inter"},
                                    query_tokens=[5, 0, 15], top_k=3)
    out = run(attn, proc, hs, ehs)
    ref = numpy_joint(attn, hs, ehs)
    N = hs.shape[1]
    for name, key in (("attn.q", "q"), ("attn.k", "k"), ("attn.v", "v"), ("attn.context_q", "cq"),
                      ("attn.context_k", "ck"), ("attn.context_v", "cv")):
        np.testing.assert_allclose(got[name].numpy(), ref[key], rtol=1e-4, atol=1e-5)
    P = ref["P"]
    np.testing.assert_allclose(got["attn.pattern_joint"].numpy(), P, atol=1e-6)
    np.testing.assert_allclose(got["attn.pattern"].numpy(), P[:, :, :N, :N], atol=1e-6)
    np.testing.assert_allclose(got["attn.pattern_image_text"].numpy(), P[:, :, :N, N:], atol=1e-6)
    np.testing.assert_allclose(got["attn.pattern_text_image"].numpy(), P[:, :, N:, :N], atol=1e-6)
    Pi = P[:, :, :N]
    np.testing.assert_allclose(got["attn.n_eff"].numpy(), 1 / (Pi ** 2).sum(-1), rtol=1e-5)
    np.testing.assert_allclose(got["attn.entropy"].numpy(), -(Pi * np.log(Pi)).sum(-1), rtol=1e-5)
    # image->image rows do not sum to 1: the rest goes to the text keys
    rows = got["attn.pattern"].sum(-1) + got["attn.pattern_image_text"].sum(-1)
    assert torch.allclose(rows, torch.ones_like(rows), atol=1e-6) and (got["attn.pattern"].sum(-1) < 1).all()
    # and the pattern recomputed from the emitted q, k
    Q = torch.cat([got["attn.q"], got["attn.context_q"]], 2)
    K = torch.cat([got["attn.k"], got["attn.context_k"]], 2)
    assert torch.allclose(torch.softmax(Q @ K.transpose(-1, -2) / 4.0, -1), got["attn.pattern_joint"], atol=1e-6)
    # the attn.pattern reductions: image queries, image keys (numpy top-k, head mean, rows)
    Pii = P[:, :, :N, :N]
    np.testing.assert_allclose(got["attn.pattern_headmean"].numpy(), Pii.mean(1), atol=1e-6)
    np.testing.assert_allclose(got["attn.pattern_query"].numpy(), Pii[:, :, [5, 0, 15]], atol=1e-6)
    order = np.argsort(-Pii, axis=-1)[..., :3]
    np.testing.assert_array_equal(got["attn.topk_idx"].numpy(), order)
    np.testing.assert_allclose(got["attn.topk_val"].numpy(), np.take_along_axis(Pii, order, -1), atol=1e-6)
    for name, v in got.items():
        assert v.ndim == len(NAME_DIMS[name]), name
    # the explicit path's output equals SDPA's to float error; per-stream outputs from numpy
    ref_out = run(attn, JointAttnProcessor2_0(), hs, ehs)
    assert torch.allclose(out[0], ref_out[0], atol=1e-5) and torch.allclose(out[1], ref_out[1], atol=1e-5)


@pytest.mark.parametrize("order", ["image_first", "text_first"])
def test_reductions_tiled_equal_untiled(setup, order):
    """Query tiles (3 rows, straddling the image/text boundary) give the untiled statistics; in
    both orders the reductions describe the image rows (and image keys for the pattern ones)."""
    model, attn, hs, ehs = setup
    names = {"attn.n_eff", "attn.entropy", "attn.pattern_headmean", "attn.pattern_query", "attn.topk_idx",
             "attn.topk_val"}
    settings = dict(query_tokens=[15, 2, 7], top_k=4, order=order)
    if order == "image_first":
        a, b = {}, {}
        run(attn, HookedJointAttnProcessor(0, emit=collect(a), wanted=names, query_tile=3, **settings), hs, ehs)
        run(attn, HookedJointAttnProcessor(0, emit=collect(b), wanted=names | {"attn.pattern"}, **settings), hs, ehs)
    else:
        g = torch.Generator().manual_seed(5)
        q, k, v = (torch.randn(2, 2, 16 + L_TEXT, 8, generator=g) for _ in range(3))
        a, b = {}, {}
        JointAttention(emit=collect(a), wanted=names, query_tile=3, **settings).attend_joint(q, k, v, L_TEXT)
        JointAttention(emit=collect(b), wanted=names | {"attn.pattern"}, **settings).attend_joint(q, k, v, L_TEXT)
        Pii = torch.softmax(q @ k.transpose(-1, -2) / 8 ** 0.5, -1)[:, :, L_TEXT:, L_TEXT:]  # text first
        assert torch.allclose(b["attn.pattern"], Pii, atol=1e-6)
        assert torch.allclose(b["attn.pattern_query"], Pii[:, :, [15, 2, 7]], atol=1e-6)
    for n in names:
        assert torch.allclose(a[n].float(), b[n].float(), atol=1e-6), n
    for n in ("attn.n_eff", "attn.entropy"):
        assert a[n].shape == (2, 2, 16)
    assert a["attn.pattern_headmean"].shape == (2, 16, 16) and a["attn.topk_idx"].shape == (2, 2, 16, 4)
    assert torch.allclose(b["attn.pattern_headmean"], b["attn.pattern"].mean(1), atol=1e-6)
    assert a["attn.pattern_query"].shape == (2, 2, 3, 16)


def _coupled_numpy(attn, hs, ehs, g, radius=None):
    """Eq [19] on image query rows, written out in numpy; text rows uncoupled."""
    r = numpy_joint(attn, hs, ehs)
    N = hs.shape[1]
    Q = np.concatenate([r["q"], r["cq"]], 2)
    K = np.concatenate([r["k"], r["ck"]], 2)
    V = np.concatenate([r["v"], r["cv"]], 2)
    d = Q.shape[-1]
    win = np.ones((N, N), bool)
    if radius is not None:
        side = int(np.sqrt(N))
        rr, cc = np.divmod(np.arange(N), side)
        win = np.maximum(abs(rr[:, None] - rr[None]), abs(cc[:, None] - cc[None])) <= radius
    jm = np.ones(Q.shape[2:3] * 2, bool)
    jm[:N, :N] = win
    logits = np.where(jm, Q @ K.transpose(0, 1, 3, 2) / np.sqrt(d), -np.inf)
    O = np_softmax(logits) @ V
    half = Q.shape[0] // 2
    swap = lambda x: np.concatenate([x[half:], x[:half]])
    li = np.where(win, r["q"] @ swap(r["k"]).transpose(0, 1, 3, 2) / np.sqrt(d), -np.inf)
    Oi = np_softmax(li) @ swap(r["v"])
    O[:, :, :N] = O[:, :, :N] / (1 + g) + g / (1 + g) * Oi
    return O


def _per_head_out(attn, proc, hs, ehs):
    got = {}
    orig = proc.attend_joint
    proc.attend_joint = lambda *a, **k: got.setdefault("o", orig(*a, **k))
    run(attn, proc, hs, ehs)
    return got["o"].numpy()


@pytest.mark.parametrize("g,radius", [(0.4, None), (1.0, 1), (0.0, 0)])
def test_coupling_and_window_match_numpy(setup, g, radius):
    model, attn, hs, ehs = setup
    proc = HookedJointAttnProcessor(0, coupling=g, window=radius)
    np.testing.assert_allclose(_per_head_out(attn, proc, hs, ehs), _coupled_numpy(attn, hs, ehs, g, radius),
                               rtol=1e-4, atol=1e-5)


def test_coupled_inter_pattern_and_window_emission(setup):
    model, attn, hs, ehs = setup
    got = {}
    proc = HookedJointAttnProcessor(0, emit=collect(got), coupling=0.5, window=1,
                                    wanted={"attn.pattern_inter", "attn.logits", "attn.pattern_joint"})
    o = _per_head_out(attn, proc, hs, ehs)
    np.testing.assert_allclose(o, _coupled_numpy(attn, hs, ehs, 0.5, 1), rtol=1e-4, atol=1e-5)
    win = window_mask(16, 1)
    assert torch.isinf(got["attn.logits"][..., ~win]).all() and torch.isfinite(got["attn.logits"][..., win]).all()
    assert (got["attn.pattern_inter"][..., ~win] == 0).all()
    assert torch.allclose(got["attn.pattern_inter"].sum(-1), torch.ones(2, 2, 16), atol=1e-6)
    # text keys and text queries are never masked
    assert (got["attn.pattern_joint"][:, :, :, 16:] > 0).all() and (got["attn.pattern_joint"][:, :, 16:] > 0).all()


def test_replacements_change_the_output(setup):
    model, attn, hs, ehs = setup
    ref = run(attn, JointAttnProcessor2_0(), hs, ehs)
    # zeroing the text part of V removes the text contribution
    proc = HookedJointAttnProcessor(0, emit=lambda n, v: torch.zeros_like(v), wanted={"attn.context_v"})
    out = run(attn, proc, hs, ehs)
    r = numpy_joint(attn, hs, ehs)
    N = hs.shape[1]
    V0 = np.concatenate([r["v"], 0 * r["cv"]], 2)
    O = (r["P"] @ V0)[:, :, :N]
    B = O.shape[0]
    expect = O.transpose(0, 2, 1, 3).reshape(B, N, -1) @ attn.to_out[0].weight.detach().numpy().T.astype(np.float64) \
        + attn.to_out[0].bias.detach().numpy()
    np.testing.assert_allclose(out[0].numpy(), expect, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(out[0], ref[0])
    # a replaced image->image pattern block is what multiplies V
    proc = HookedJointAttnProcessor(0, emit=lambda n, v: torch.zeros_like(v), wanted={"attn.pattern"})
    o = _per_head_out(attn, proc, hs, ehs)
    P = r["P"].copy()
    P[:, :, :N, :N] = 0
    V = np.concatenate([r["v"], r["cv"]], 2)
    np.testing.assert_allclose(o, P @ V, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="shape"):
        run(attn, HookedJointAttnProcessor(0, emit=lambda n, v: v[:1], wanted={"attn.k"}), hs, ehs)


def test_text_first_order_and_rotary():
    """The core in Flux's order [text; image] equals the image-first result permuted, rotary included."""
    g = torch.Generator().manual_seed(3)
    B, H, N, L, D = 4, 2, 9, 3, 8
    q, k, v = (torch.randn(B, H, N + L, D, generator=g) for _ in range(3))
    rot = torch.randn(N + L, D, generator=g)
    rot_t = torch.cat([rot[N:], rot[:N]])
    got_i, got_t = {}, {}
    a = JointAttention(emit=collect(got_i), wanted={"attn.pattern", "attn.q", "attn.context_k", "attn.pattern_text_image"},
                       coupling=0.3, window=1, order="image_first")
    b = JointAttention(emit=collect(got_t), wanted={"attn.pattern", "attn.q", "attn.context_k", "attn.pattern_text_image"},
                       coupling=0.3, window=1, order="text_first")
    tf = lambda x: torch.cat([x[:, :, N:], x[:, :, :N]], 2)
    oi = a.attend_joint(q, k, v, L, rotary=lambda x: x * rot)
    ot = b.attend_joint(tf(q), tf(k), tf(v), L, rotary=lambda x: x * rot_t)
    assert torch.allclose(tf(oi), ot, atol=1e-6)
    for n in got_i:
        assert torch.allclose(got_i[n], got_t[n], atol=1e-6), n
    assert torch.allclose(got_i["attn.q"], (q * rot)[:, :, :N])  # emitted after the rotary


def test_bad_settings():
    with pytest.raises(ValueError, match="unknown"):
        JointAttention(wanted={"attn.nope"})
    with pytest.raises(ValueError):
        JointAttention(coupling=-1)
    with pytest.raises(ValueError):
        JointAttention(window=-2)
    with pytest.raises(ValueError, match="order"):
        JointAttention(order="sideways")
    with pytest.raises(ValueError, match="need top_k"):
        JointAttention(wanted={"attn.topk_idx"})
    with pytest.raises(ValueError, match="needs query_tokens"):
        JointAttention(wanted={"attn.pattern_query"})
    with pytest.raises(ValueError, match="top_k must be >= 1"):
        JointAttention(top_k=0)
    with pytest.raises(ValueError, match="image tokens"):  # 5 text + 4 image tokens: index 4 is not an image token
        JointAttention(emit=lambda n, v: None, wanted={"attn.pattern_query"}, query_tokens=[4]).attend_joint(
            *(torch.randn(2, 1, 9, 4) for _ in range(3)), 5)
    with pytest.raises(TypeError):  # no setting is silently ignored
        JointAttention(topk=3)
    with pytest.raises(ValueError, match="even"):
        JointAttention(coupling=0.5).attend_joint(*(torch.randn(3, 1, 5, 4) for _ in range(3)), 1)
    assert window_mask(16, 3) is None and window_mask(16, 2).sum() < 256
