"""The routing probe and `dithooks routing`, against plain numpy and an autograd reference."""

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from dithooks.capture import CaptureConfig, capture
from dithooks.cli.main import app
from dithooks.jvp import block_jvp
from dithooks.probes.api import ProbeError, make_probe
from dithooks.sampling import ReplicaSpec, SamplerSpec
from dithooks.store.reader import open_store

# torch registers its forward-AD decompositions with torch.jit.script on first use (autograd reference)
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")

G = 0.3
RAW = ("jvp.heads.pattern", "jvp.heads.v", "jvp.heads.dv", "jvp.heads.dlogits_intra", "jvp.heads.dlogits_inter",
       "jvp.point", "jvp.direction")
ATTN = ("attn.q", "attn.k", "attn.v", "attn.out")


@pytest.fixture(scope="module")
def routing_store(tmp_path_factory, tiny_loaded, tiny_model_dir):
    out = tmp_path_factory.mktemp("routing") / "r.zarr"
    cfg = CaptureConfig(out=str(out), model=str(tiny_model_dir), layers="0-3", hooks=RAW + ATTN,
                        sampler=SamplerSpec("ddim", 3, guidance=2.0), labels=(1, 2, 3), seeds=(0, 1, 2),
                        storage_dtype="fp32", replicas=ReplicaSpec(kappa=0.5, g=G, couple_until=2),
                        probes=(("routing", {"modes": 2, "n_eff_rows": True}),))
    capture(cfg, loaded=tiny_loaded)
    return open_store(out)


def arr(store, name):
    return np.asarray(store.select(name).values, dtype=np.float64)


def numpy_report(A, dLi, dLe, V, dV, g):
    """Appendix-B quantities from the stored per-head tensors, written out in numpy."""
    A = A / A.sum(-1, keepdims=True)
    dL = dLi + g * dLe
    c = dL - (A * dL).sum(-1, keepdims=True)
    dA = A * c
    fro = lambda X: np.sqrt((X ** 2).sum((-2, -1)))  # noqa: E731
    R, M = fro(A @ dV), fro(dA @ V)
    N = A.shape[-1]
    n_eff = 1 / (A ** 2).sum(-1)
    P = np.eye(N) - 1 / N
    a = np.linalg.svd(A @ P, compute_uv=False)[..., 0]
    eps_V = fro(P @ V) / fro(V)
    eps_d = fro(P @ dV) / fro(dV)
    delta_max = np.abs(c).max(-1).max(-1)
    den = np.sqrt(1 - eps_d ** 2) - a * eps_d
    bound = np.where(den > 0, delta_max * np.sqrt(N / n_eff.min(-1)) * eps_V * fro(V) / (den * fro(dV)), np.inf)
    return dict(routing_norm=R, modulation_norm=M, N_eff=n_eff, a=a, eps_V=eps_V, eps_delta=eps_d,
                Delta_max=delta_max, bound=bound, row_sums=dA.sum(-1))


def test_probe_matches_numpy_on_the_stored_tensors(routing_store):
    s = routing_store
    raw = {k: arr(s, "blocks." + k) for k in RAW[:5]}
    g = arr(s, "probe.routing.g")
    assert np.allclose(g[:2], G) and np.allclose(g[2], 0.0)  # coupled before s* = 2, then not
    for step in range(3):
        ref = numpy_report(*(raw[f"jvp.heads.{k}"][step] for k in ("pattern", "dlogits_intra", "dlogits_inter", "v", "dv")),
                           g[step, 0])
        for key in ("routing_norm", "modulation_norm", "a", "eps_V", "eps_delta", "Delta_max", "bound"):
            got = arr(s, f"probe.routing.{key}")[step]
            np.testing.assert_allclose(got, ref[key], rtol=2e-4, atol=1e-7, err_msg=key)
        np.testing.assert_allclose(arr(s, "probe.routing.N_eff")[step], ref["N_eff"], rtol=1e-5)
        rho, xi = (1 - g[step, 0]) / (1 + g[step, 0]), 1 / (1 + g[step, 0])
        np.testing.assert_allclose(arr(s, "probe.routing.routing_dominance_gated")[step],
                                   rho * ref["routing_norm"] / (xi * ref["modulation_norm"]), rtol=2e-4)
        layer_R = np.sqrt(((rho * ref["routing_norm"]) ** 2).sum(-1))
        np.testing.assert_allclose(arr(s, "probe.routing.layer_routing_norm_gated")[step], layer_R, rtol=2e-4)


def test_bound_and_identities_hold_everywhere(routing_store):
    s = routing_store
    for check in ("bound_holds", "bound_intra_holds", "row_bound_holds", "frobenius_bound_holds",
                  "routing_lower_bound_holds"):
        assert np.asarray(s.select(f"probe.routing.{check}").values).all(), check
    for resid in ("stochasticity_residual", "dA_row_sum_residual", "constant_preservation_residual"):
        assert arr(s, f"probe.routing.{resid}").max() < 1e-5, resid
    assert arr(s, "probe.routing.mean_free_residual").max() < 1e-10
    n_eff = arr(s, "probe.routing.N_eff")
    assert (n_eff >= 1 - 1e-9).all() and (n_eff <= 16 + 1e-9).all()
    tight = arr(s, "probe.routing.tightness")
    valid = np.asarray(s.select("probe.routing.bound_valid").values)
    assert np.isnan(tight[~valid]).all() and (tight[valid] <= 1 + 1e-9).all()


def test_modal_gains_match_an_autograd_reference(routing_store, tiny_loaded):
    s = routing_store
    model = tiny_loaded.transformer
    point, direction = arr(s, "blocks.jvp.point"), arr(s, "blocks.jvp.direction")  # (step, layer, cfg, sample, N, D)
    chi, pi, f = (arr(s, f"probe.routing.mode_{k}") for k in ("chi", "pi", "f"))
    g = arr(s, "probe.routing.g")
    timesteps = s.coord("timestep")
    y = torch.tensor([1, 2, 3, 10, 10, 10])  # (cfg, sample) rows: cond labels, then the null class
    for layer in (0, 3):
        X = direction[0, layer].reshape(6, -1)  # step-0 directions of this layer: the basis
        _, sv, Vt = np.linalg.svd(X, full_matrices=False)
        for step in (0, 2):
            h = torch.tensor(point[step, layer].reshape(6, 16, -1), dtype=torch.float32)
            for k in range(2):
                v = torch.tensor(Vt[k].reshape(16, -1), dtype=torch.float32)
                ref = block_jvp(model.transformer_blocks[layer], h, v.expand_as(h).contiguous(),
                                timestep=torch.full((6,), int(timesteps[step])), class_labels=y,
                                parts=("routing", "modulation", "mlp"), g=float(g[step, layer]),
                                apply_gates=False, method="autograd")
                gains = {p: float((ref[p] * v).sum((1, 2)).mean()) for p in ref}
                np.testing.assert_allclose(chi[step, layer, k], gains["routing"], rtol=1e-3, atol=1e-6)
                np.testing.assert_allclose(pi[step, layer, k], gains["modulation"], rtol=1e-3, atol=1e-6)
                np.testing.assert_allclose(f[step, layer, k], gains["mlp"], rtol=1e-3, atol=1e-6)
    ratio = arr(s, "probe.routing.mode_ratio")
    np.testing.assert_allclose(ratio, np.abs(pi) / np.abs(chi), rtol=1e-6)


def test_gated_ratio_is_rho_over_xi_times_ungated(routing_store):
    s = routing_store
    gated, ungated = arr(s, "probe.routing.routing_dominance_gated"), arr(s, "probe.routing.routing_dominance")
    g = arr(s, "probe.routing.g")[:, :, None, None, None]
    np.testing.assert_allclose(gated, (1 - g) * ungated, rtol=1e-6)  # stored as float32


def test_bad_options_are_refused():
    with pytest.raises(ProbeError, match="modes must be"):
        make_probe("routing", {"modes": "-1"})
    with pytest.raises(ProbeError, match="precision"):
        make_probe("routing", {"precision": "fp8"})
    with pytest.raises(ProbeError, match="a must be exact or upper"):
        make_probe("routing", {"a": "svd"})


def test_routing_command_table_json_csv_and_plot(tmp_path, tiny_model_dir):
    runner = CliRunner()
    out, png = tmp_path / "r.zarr", tmp_path / "heat.png"
    base = ["routing", "--model", str(tiny_model_dir), "--steps", "3", "--seeds", "0-2", "--class", "4",
            "--coupling", "0.3", "--out", str(out), "--quiet"]
    r = runner.invoke(app, base + ["--plot", str(png)])
    assert r.exit_code == 0, r.output
    assert "routing dominance" in r.output and "The bound holds on every one of the" in r.output
    assert "non-vacuous (denominator > 0) on" in r.output and "Linearisation error" in r.output
    assert png.stat().st_size > 1000
    r = runner.invoke(app, ["routing", "--from", str(out), "--json", "--per-head"])
    rows = json.loads(r.output)["rows"]
    summary = json.loads(r.output)["summary"]
    s = open_store(out)
    valid = np.asarray(s.select("probe.routing.bound_valid").values)
    tight = arr(s, "probe.routing.tightness")
    assert summary["bound"]["measurements"] == valid.size == 3 * 4 * 3 * 2  # steps, layers, pairs, heads
    assert summary["bound"]["valid"] == valid.sum() and summary["bound"]["vacuous"] == (~valid).sum()
    assert summary["bound"]["tight"] == (valid & (np.nan_to_num(tight) > 0.5)).sum()
    assert summary["bound"]["violations"] == 0
    lin = arr(s, "probe.routing.linearisation_error")
    assert summary["linearisation"]["per_head"]["median"] == pytest.approx(np.median(lin), rel=1e-6)
    assert len(rows) == 4 * 2 and {"layer", "head", "R/M", "bound holds"} <= set(rows[0])
    assert json.loads(r.output)["replicas"]["g"] == 0.3
    r = runner.invoke(app, ["routing", "--from", str(out), "--csv"])
    assert r.output.splitlines()[0].startswith("layer,g,R/M")
    r = runner.invoke(app, base)
    assert r.exit_code == 2 and "already exists" in r.output
    r = runner.invoke(app, ["routing", "--from", str(tmp_path / "nope.zarr")])
    assert r.exit_code == 2 and "no store" in r.output


def test_routing_without_modes_resumes_to_the_same_store(tmp_path, tiny_loaded, tiny_model_dir):
    from dithooks.capture import CaptureSession
    from tests.test_capture import Interrupt

    def cfg(out, **kw):
        return CaptureConfig(out=str(out), model=str(tiny_model_dir), layers="0-3", hooks=(),
                             sampler=SamplerSpec("ddim", 4), labels=(1, 2), seeds=(0, 1),
                             replicas=ReplicaSpec(g=G), probes=("routing",), **kw)
    capture(cfg(tmp_path / "full.zarr"), loaded=tiny_loaded)
    session = CaptureSession(cfg(tmp_path / "part.zarr"), loaded=tiny_loaded)
    session.hooks.add_hook("blocks.1.resid_post", Interrupt(2))
    with pytest.raises(Exception, match="interrupted"):
        session.run()
    session.hooks.remove_all()
    assert capture(cfg(tmp_path / "part.zarr", mode="resume"), loaded=tiny_loaded).resumed_from == 2
    a, b = open_store(tmp_path / "full.zarr"), open_store(tmp_path / "part.zarr")
    for name in ("routing_norm", "bound", "layer_routing_dominance_gated"):
        np.testing.assert_array_equal(arr(a, f"probe.routing.{name}"), arr(b, f"probe.routing.{name}"))
    assert make_probe("routing", {"modes": 2}).resumable is False


def test_reports_batched_over_layers_equal_one_report_per_layer(tmp_path, tiny_loaded, tiny_model_dir, monkeypatch):
    """The probe reports the queued layers in one call (per g and shape) within a memory budget,
    and their linearisation errors with every layer's heads side by side; a budget of one byte
    computes every layer on its own, with the same numbers."""
    import dithooks.probes.routing as routing

    def run(name):
        out = tmp_path / name
        capture(CaptureConfig(out=str(out), model=str(tiny_model_dir), layers="0-3", hooks=(),
                              sampler=SamplerSpec("ddim", 2), labels=(1, 2), seeds=(0, 1),
                              replicas=ReplicaSpec(g=G), probes=("routing",)), loaded=tiny_loaded)
        return open_store(out)

    batched = run("batched.zarr")
    monkeypatch.setattr(routing, "REPORT_BATCH_BYTES", 1)
    single = run("single.zarr")
    names = (*routing.PER_HEAD, *routing.LIN_PER_HEAD, "layer_linearisation_error", "layer_true_difference_norm")
    for name in names:
        a, b = arr(batched, f"probe.routing.{name}"), arr(single, f"probe.routing.{name}")
        np.testing.assert_allclose(a, b, rtol=1e-11, atol=1e-15, err_msg=name)


# -- linearisation error ----------------------------------------------------------------------


def numpy_coupled_half_difference(q, k, v, g):
    """(O^a - O^b)/2 per head from eq [19], written out in numpy (float64)."""
    def attend(Q, K, V):
        L = Q @ np.swapaxes(K, -1, -2) / np.sqrt(Q.shape[-1])
        A = np.exp(L - L.max(-1, keepdims=True))
        return (A / A.sum(-1, keepdims=True)) @ V
    (qa, qb), (ka, kb), (va, vb) = q, k, v  # each (2, ...): replica first
    Oa = attend(qa, ka, va) / (1 + g) + g / (1 + g) * attend(qa, kb, vb)
    Ob = attend(qb, kb, vb) / (1 + g) + g / (1 + g) * attend(qb, ka, va)
    return (Oa - Ob) / 2


def test_linearisation_error_matches_numpy_on_the_stored_tensors(routing_store, tiny_loaded):
    """ε_lin per head (before W_O) and per layer (attn.out, after W_O) against numpy on the stored q, k, v."""
    s = routing_store
    raw = {k: arr(s, "blocks." + k) for k in RAW[:5] + ATTN}  # attn.*: (step, layer, replica, cfg, sample, ...)
    g = arr(s, "probe.routing.g")
    err, lerr = arr(s, "probe.routing.linearisation_error"), arr(s, "probe.routing.layer_linearisation_error")
    fro = lambda X: np.sqrt((X ** 2).sum((-2, -1)))  # noqa: E731
    assert np.isfinite(err).all() and np.isfinite(lerr).all()
    for step in range(3):
        gg = g[step, 0]
        true = numpy_coupled_half_difference(raw["attn.q"][step].swapaxes(0, 1), raw["attn.k"][step].swapaxes(0, 1),
                                             raw["attn.v"][step].swapaxes(0, 1), gg)  # (layer, cfg, sample, H, N, d)
        A, dLi, dLe, V, dV = (raw[f"jvp.heads.{k}"][step] for k in ("pattern", "dlogits_intra", "dlogits_inter", "v", "dv"))
        dL = dLi + gg * dLe
        dA = A * (dL - (A * dL).sum(-1, keepdims=True))
        lin = (1 - gg) / (1 + gg) * (A @ dV) + 1 / (1 + gg) * (dA @ V)
        np.testing.assert_allclose(err[step], fro(true - lin) / fro(true), rtol=1e-5)
        out = raw["attn.out"][step]  # (layer, replica, cfg, sample, N, D)
        true_out = (out[:, 0] - out[:, 1]) / 2
        for layer in range(4):
            attn = tiny_loaded.transformer.transformer_blocks[layer].attn1
            W = attn.to_out[0].weight.detach().double().numpy()
            merged = np.swapaxes(lin[layer], -3, -2).reshape(lin[layer].shape[:-3] + (16, -1))  # heads -> channels
            lin_out = merged @ W.T
            np.testing.assert_allclose(lerr[step, layer], fro(true_out[layer] - lin_out) / fro(true_out[layer]),
                                       rtol=1e-4)
            # the recomputed per-head outputs are the ones the module produced: W_O·merge(O^a−O^b)/2 = Δattn.out
            t_merged = np.swapaxes(true[layer], -3, -2).reshape(merged.shape)
            np.testing.assert_allclose(t_merged @ W.T, true_out[layer], atol=2e-6 * np.abs(true_out[layer]).max())


def _float64_reference_error(block, h, delta, t, y, g):
    """ε_lin of the attention module's output, by autograd through diffusers' own modules (float64).

    True: ``(attn(adaLN1(h+δ)) − attn(adaLN1(h−δ)))/2`` with the replicas coupled at g; linear: its
    ``torch.func.jvp`` in δ at 0. Independent of the probe (which recomputes from captured q, k, v and
    uses the hand-written fused JVP).
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from dithooks.attention.processor import HookedAttnProcessor

    B = h.shape[0]
    saved = block.attn1.processor
    block.attn1.set_processor(HookedAttnProcessor(-1, coupling=g))
    try:
        def F(u):
            hh = torch.cat([h + u, h - u])
            x, *_ = block.norm1(hh, torch.cat([t, t]), torch.cat([y, y]), hidden_dtype=hh.dtype)
            o = block.attn1(x)
            return (o[:B] - o[B:]) / 2
        with torch.no_grad(), sdpa_kernel([SDPBackend.MATH]):
            true = F(delta)
            lin = torch.func.jvp(F, (torch.zeros_like(delta),), (delta,))[1]
    finally:
        block.attn1.set_processor(saved)
    return float(torch.linalg.vector_norm(true - lin) / torch.linalg.vector_norm(true))


@pytest.mark.parametrize("g", [0.0, 0.5])
def test_linearisation_error_vanishes_at_second_order_in_kappa(tmp_path, tiny_model_dir, g):
    """ε_lin → 0 like κ² (the difference is odd in δ), agreeing with an autograd float64 reference."""
    from dithooks.loading import load_model

    loaded = load_model(str(tiny_model_dir), dtype=torch.float64)
    errs = {}
    for kappa in (0.04, 0.02, 0.01):
        out = tmp_path / f"k{kappa}.zarr"
        capture(CaptureConfig(out=str(out), model=str(tiny_model_dir), layers="all", hooks=("jvp.point", "jvp.direction"),
                              sampler=SamplerSpec("ddim", 1), labels=(3,), seeds=(0, 1), storage_dtype="fp32",
                              replicas=ReplicaSpec(kappa=kappa, g=g), probes=("routing",)), loaded=loaded)
        s = open_store(out)
        lerr = arr(s, "probe.routing.layer_linearisation_error")[0]  # step 0: (layer, sample)
        errs[kappa] = lerr
        point, direction = arr(s, "blocks.jvp.point")[0], arr(s, "blocks.jvp.direction")[0]
        t, y = torch.full((1,), int(s.coord("timestep")[0])), torch.tensor([3])
        for layer in (0, 3):
            for m in range(2):  # one pair at a time: the stored error is per (layer, sample)
                ref = _float64_reference_error(loaded.transformer.transformer_blocks[layer],
                                               torch.tensor(point[layer, m:m + 1]),
                                               torch.tensor(direction[layer, m:m + 1]), t, y, g)
                np.testing.assert_allclose(lerr[layer, m], ref, rtol=1e-4)
    # halving κ divides the error by ~4 (second order); fp32 storage of the ratio is ample here
    for big, small in ((0.04, 0.02), (0.02, 0.01)):
        ratio = np.median(errs[big] / errs[small])
        assert 3.5 < ratio < 4.5, (big, small, ratio)
    assert np.max(errs[0.01]) < 1e-3


def test_option_a_upper_stores_an_upper_bound_on_a(tmp_path, tiny_loaded, tiny_model_dir, routing_store):
    """a=upper: the stored a is ≥ the SVD's a of the stored pattern (and within a few %), says so in
    its description, and leaves the ingredients that do not use a unchanged."""
    out = tmp_path / "upper.zarr"
    capture(CaptureConfig(out=str(out), model=str(tiny_model_dir), layers="0-3", hooks=("jvp.heads.pattern",),
                          sampler=SamplerSpec("ddim", 3, guidance=2.0), labels=(1, 2, 3), seeds=(0, 1, 2),
                          storage_dtype="fp32", replicas=ReplicaSpec(kappa=0.5, g=G, couple_until=2),
                          probes=(("routing", {"a": "upper", "linearisation": "off"}),)), loaded=tiny_loaded)
    s = open_store(out)
    A = arr(s, "blocks.jvp.heads.pattern")
    A = A / A.sum(-1, keepdims=True)
    a_svd = np.linalg.svd(A @ (np.eye(A.shape[-1]) - 1 / A.shape[-1]), compute_uv=False)[..., 0]
    a_up = arr(s, "probe.routing.a")
    assert (a_up >= a_svd * (1 - 1e-6)).all()  # stored as float32
    assert (a_up <= a_svd * 1.1).all()
    assert "upper bound" in s.array_meta(s.resolve("probe.routing.a")[0]).attrs["description"]
    assert "upper bound" not in routing_store.array_meta(routing_store.resolve("probe.routing.a")[0]).attrs["description"]
    np.testing.assert_allclose(arr(s, "probe.routing.modulation_norm"), arr(routing_store, "probe.routing.modulation_norm"),
                               rtol=1e-6)
    b_up, b_ex = arr(s, "probe.routing.bound"), arr(routing_store, "probe.routing.bound")
    assert np.all((b_up >= b_ex * (1 - 1e-5)) | np.isinf(b_up))  # [105] with ā: looser or vacuous, never tighter
    assert np.all(np.isfinite(b_up) <= np.isfinite(b_ex))
    assert arr(s, "probe.routing.bound_holds").all()


def test_probe_with_lanczos_a_matches_the_svd(tmp_path, tiny_loaded, tiny_model_dir, monkeypatch):
    """The Lanczos path for a (used from 64 tokens; forced here on the 16-token model) gives the SVD's a of
    the stored pattern in the probe, and the bound built on it matches numpy's."""
    from dithooks.probes import attention_terms

    monkeypatch.setattr(attention_terms, "LANCZOS_MIN_N", 2)
    out = tmp_path / "lanczos.zarr"
    capture(CaptureConfig(out=str(out), model=str(tiny_model_dir), layers="0-1", hooks=RAW[:5],
                          sampler=SamplerSpec("ddim", 2, guidance=2.0), labels=(1, 2), seeds=(0, 1),
                          storage_dtype="fp32", replicas=ReplicaSpec(kappa=0.5, g=G, couple_until=1),
                          probes=(("routing", {"linearisation": "off"}),)), loaded=tiny_loaded)
    s = open_store(out)
    raw = {k: arr(s, "blocks." + k) for k in RAW[:5]}
    g = arr(s, "probe.routing.g")
    for step in range(2):
        ref = numpy_report(*(raw[f"jvp.heads.{k}"][step] for k in ("pattern", "dlogits_intra", "dlogits_inter", "v", "dv")),
                           g[step, 0])
        np.testing.assert_allclose(arr(s, "probe.routing.a")[step], ref["a"], rtol=1e-6)  # stored as float32
        np.testing.assert_allclose(arr(s, "probe.routing.bound")[step], ref["bound"], rtol=2e-4, atol=1e-7)
    assert arr(s, "probe.routing.bound_holds").all()
