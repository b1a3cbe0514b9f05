"""The ``routing`` probe: routing versus modulation, Appendix B tested at every layer, head and step.

The paper's Appendix B ([85–106]) argues that in the linearised replica difference (THEORY §3)

    (O^a − O^b)/2 = ρ(g) A δV  +  ξ(g) (δA_intra + g δA_inter) V      [25]

the routing term dominates the modulation term, and bounds their ratio [105]. It never measures
either (``seeds/001``). This probe does, while the model samples: it reads the per-head
linearisation of each block's attention (``blocks.{i}.jvp.heads.*``, computed at the symmetric
state along the replica difference, or along a chosen direction; see ``dithooks/jvp_hooks.py``)
and hands it to :func:`~dithooks.probes.attention_terms.routing_dominance_report`, which
computes every ingredient of the bound, the bound, whether it holds and how tight it is, and the
identity residuals. A bound that fails is a bug in the toolkit or the theory, never rounding:
the checks carry only a rounding slack.

With ``modes=K`` it also measures the per-mode gains of [44–46] (``χ_k``, ``π_k``, ``f_k``,
``|π_k|/|χ_k|``): at step 0 a difference-mode basis is fitted per layer from the JVP directions
(the replica differences at the block input, Nyström, never the D×D covariance); at every step the
block is linearised along each mode at each pair's symmetric state, and the gains are the
Rayleigh quotients ``v_kᵀ 𝓡̃ v_k`` etc. (ungated, in residual units: α1·W_O included), averaged
over the pairs. That costs K extra block JVPs per pair, layer and step.

Linearisation error (replica runs). [25] is first order in the replica difference. Beside the split
the probe measures how well it describes the *actual* coupled difference of the pair: it reads each
replica's own per-head ``Q, K, V`` (``blocks.{i}.attn.q/k/v``, the tensors the coupled processor
used) and its attention output (``blocks.{i}.attn.out``), and reports

    ε_lin = ‖(O^a − O^b)/2 − (ρ R + ξ M)‖_F / ‖(O^a − O^b)/2‖_F

per layer, pair and head, like for like: ``O^{a,b}`` are the per-head coupled outputs of eq [19]
(before ``W_O`` and before the adaLN gate α1), recomputed in float64 from the replicas' own
``Q, K, V`` with the g and window the block ran at, and ``ρR + ξM`` is the gated split per head
at the same g. ``layer_linearisation_error`` is the same in residual units with every head:
``(attn.out^a − attn.out^b)/2`` (the module's actual output after ``W_O``; its bias cancels)
against ``W_O (ρR + ξM)``. ``(O^a − O^b)/2`` is odd in the half-difference δ, so
ε_lin = O(‖δ‖²): second order in κ at the first step (tested against a float64 model).

Resumable without modes (each step's outputs depend on that step alone); with modes the step-0
basis lives in memory, so a capture with ``modes > 0`` cannot be resumed mid-way.
"""

from __future__ import annotations

from typing import Mapping

import torch

from dithooks.attention.functional import attend, couple
from dithooks.attention.window import window_mask
from dithooks.hookpoints import split_name
from dithooks.hooks import HookContext

from .api import Option, Output, Probe, ProbeError, RunInfo, register_probe
from .attention_terms import combine_head_norms, linearised_difference, modal_gains, routing_dominance_report
from .modes import DifferenceModeBasis

HEAD_POINTS = ("jvp.heads.pattern", "jvp.heads.v", "jvp.heads.dv", "jvp.heads.dlogits_intra",
               "jvp.heads.dlogits_inter")
MODE_POINTS = ("jvp.point", "jvp.direction")
#: arguments of routing_dominance_report, in order
REPORT_TERMS = ("jvp.heads.pattern", "jvp.heads.dlogits_intra", "jvp.heads.dlogits_inter", "jvp.heads.v",
                "jvp.heads.dv")
#: queued per-head terms (bytes) above which the waiting layers are reported at once
REPORT_BATCH_BYTES = 32 * 2**20
LIN_POINTS = ("attn.q", "attn.k", "attn.v", "attn.out")
LINEARISATION = ("auto", "on", "off")

# report key -> description; stored per (layer, batch..., head)
PER_HEAD = {
    "routing_norm": "‖A δV‖_F, ungated routing term",
    "modulation_norm": "‖δA_g V‖_F, ungated modulation term (δA_g = δA_intra + g δA_inter)",
    "routing_norm_gated": "‖R‖ = ρ(g)‖A δV‖_F",
    "modulation_norm_gated": "‖M‖ = ξ(g)‖δA_g V‖_F",
    "routing_dominance": "‖A δV‖/‖δA_g V‖ (ungated)",
    "routing_dominance_gated": "‖R‖/‖M‖ (gated: what the coupled dynamics sees)",
    "measured_ratio": "‖δA_g V‖/‖A δV‖: the ratio [105] bounds",
    "measured_ratio_gated": "‖M‖/‖R‖",
    "bound": "Appendix-B bound [105] on measured_ratio (inf when vacuous)",
    "bound_gated": "bound/(1−g): bound on measured_ratio_gated",
    "bound_valid": "denominator of [105] positive (else the bound says nothing)",
    "bound_holds": "measured_ratio ≤ bound (rounding slack only)",
    "tightness": "measured_ratio / bound (NaN when vacuous)",
    "measured_ratio_intra": "paper-literal ‖δA_intra V‖/‖A δV‖",
    "bound_intra": "[105] with Δ from δL_intra",
    "bound_intra_holds": "measured_ratio_intra ≤ bound_intra",
    "N_min": "min over query rows of N_eff [92]",
    "Delta_max": "max row logit spread Δ of δL_g [96]",
    "Delta_max_intra": "max row logit spread of δL_intra",
    "Delta_max_inter": "max row logit spread of δL_inter",
    "eps_V": "ε_V = ‖P_⊥V‖/‖V‖ [100]",
    "eps_delta": "ε_δ = ‖P_⊥δV‖/‖δV‖ [102]",
    "a": "a = ‖A P_⊥‖_op [103]",
    "norm_V": "‖V‖_F",
    "norm_dV": "‖δV‖_F",
    "row_bound_holds": "per-row bound [98] holds on every row",
    "frobenius_bound_holds": "Frobenius bound [99] holds",
    "routing_lower_bound_holds": "routing lower bound [104] holds",
    "stochasticity_residual": "max |A1 − 1| (identity A1 = 1)",
    "dA_row_sum_residual": "max |δA_g 1| (identity δA1 = 0)",
    "mean_free_residual": "‖δA_g V − δA_g P_⊥V‖_F (identity [90])",
    "constant_preservation_residual": "max |A P_∥ − P_∥| (identity [91])",
}
LIN_PER_HEAD = {
    "linearisation_error": "‖(O^a−O^b)/2 − (ρR+ξM)‖/‖(O^a−O^b)/2‖ per head, before W_O: how far the "
                           "linear split is from the actual coupled difference (replica runs)",
    "true_difference_norm": "‖(O^a−O^b)/2‖_F per head, before W_O: the actual coupled difference",
}
CHECKS = ("bound_holds", "bound_intra_holds", "row_bound_holds", "frobenius_bound_holds",
          "routing_lower_bound_holds")


@register_probe("routing")
class RoutingDominance(Probe):
    """Routing vs modulation per layer, head and step, with every Appendix-B ingredient and check."""

    options = {
        "modes": Option(0, "also measure per-mode gains χ_k, π_k, f_k along the K leading difference modes (0: off)"),
        "n_eff_rows": Option(False, "store N_eff of every query row (layer, batch, head, query)"),
        "precision": Option("fp64", "compute dtype of the report: fp64 or fp32"),
        "rtol": Option(0.0, "relative slack of the bound checks (0: 1e3·eps of the precision)"),
        "a": Option("exact", "a = ‖A P_⊥‖_op of [103]: exact (Lanczos from 64 tokens, dense eigensolver below, "
                             "to ~1e-12) or upper (a rigorous upper bound ā ≥ a; [104]/[105] stay proven, looser)"),
        "linearisation": Option("auto", "measure how far R+M is from the actual (O^a−O^b)/2 of the pair: "
                                        "auto (replica runs), on (refuse other runs), off"),
    }

    def check_options(self) -> None:
        if self.opts["modes"] < 0:
            raise ProbeError("probe routing: modes must be ≥ 0")
        if self.opts["precision"] not in ("fp64", "fp32"):
            raise ProbeError(f"probe routing: precision must be fp64 or fp32, not {self.opts['precision']!r}")
        if self.opts["a"] not in ("exact", "upper"):
            raise ProbeError(f"probe routing: a must be exact or upper, not {self.opts['a']!r}")
        if self.opts["rtol"] < 0:
            raise ProbeError("probe routing: rtol must be ≥ 0")
        if self.opts["linearisation"] not in LINEARISATION:
            raise ProbeError(f"probe routing: linearisation must be auto, on or off, not {self.opts['linearisation']!r}")
        # without modes every output of a step depends on that step alone: a capture can resume
        self.resumable = self.opts["modes"] == 0

    def hook_points(self) -> tuple[str, ...]:
        return (HEAD_POINTS + (MODE_POINTS if self.opts["modes"] else ())
                + (LIN_POINTS if self.opts["linearisation"] != "off" else ()))

    # -- run ------------------------------------------------------------------------------------
    def start(self, run: RunInfo) -> None:
        if self.opts["modes"] and run.first_step != 0:
            raise ProbeError("probe routing with modes fits its basis at step 0 and cannot start later")
        replica_run = bool(run.batch_axes) and run.batch_axes[0][0] == "replica"
        if self.opts["linearisation"] == "on" and not replica_run:
            raise ProbeError("probe routing: linearisation=on needs a replica run (--kappa/--coupling): the error "
                             "compares the split with the pair's actual attention difference")
        self.linearise = replica_run and self.opts["linearisation"] != "off"
        self.run = run
        self.dtype = torch.float64 if self.opts["precision"] == "fp64" else torch.float32
        self.bases: dict[int, DifferenceModeBasis] = {}
        self._new_step()

    def _new_step(self) -> None:
        self._pending: dict[int, dict[str, torch.Tensor]] = {}
        self._queue: list[tuple[int, tuple[torch.Tensor, ...]]] = []  # layers waiting for their report
        self._lin_queue: list[tuple] = []  # layers waiting for their linearisation error
        self._queued_bytes = 0
        self._reports: dict[int, dict[str, torch.Tensor]] = {}
        self._g: dict[int, float] = {}
        self._gains: dict[int, dict[str, torch.Tensor]] = {}
        self._lin: dict[int, dict[str, torch.Tensor]] = {}
        self._batch: tuple[tuple[str, int], ...] | None = None
        self._replica_batch: tuple[tuple[str, int], ...] | None = None
        self._info: dict[int, Mapping] = {}  # the JVP points' documented context fields, per layer

    def observe(self, name: str, value: torch.Tensor, ctx: HookContext) -> None:
        local = split_name(name)[1]
        got = self._pending.setdefault(ctx.layer, {})
        got[local] = value.detach()
        if local.startswith("jvp."):  # JVP values: the batch without the replica axis
            self._batch = ctx.batch_axes
            self._g[ctx.layer] = float(ctx.info.get("g", 0.0))
            self._info[ctx.layer] = ctx.info
        else:  # the replicas' own attention values: the sampler's batch
            self._replica_batch = ctx.batch_axes
        if local in HEAD_POINTS and all(p in got for p in HEAD_POINTS):
            self._report(ctx.layer, got, ctx)
        if self.opts["modes"] and local in MODE_POINTS and all(p in got for p in MODE_POINTS):
            self._modal_gains(ctx.layer, got, ctx)
        if self.linearise and local in HEAD_POINTS + LIN_POINTS and all(p in got for p in HEAD_POINTS + LIN_POINTS):
            self._linearisation(ctx.layer, got)
        if all(p in got for p in self.hook_points()):
            del self._pending[ctx.layer]

    def _report(self, layer: int, got: dict[str, torch.Tensor], ctx: HookContext) -> None:
        """Queue this layer's per-head terms; the queue is reported in one call per g and shape
        (one report for every layer of a small model: its cost is per call, not per element)."""
        terms = tuple(got[p] for p in REPORT_TERMS)
        self._queue.append((layer, terms))
        self._queued_bytes += sum(t.numel() * t.element_size() for t in terms)
        if self._queued_bytes >= REPORT_BATCH_BYTES:
            self._flush_reports()

    def _flush_reports(self) -> None:
        self._flush_linearisation()
        groups: dict[tuple, list[tuple[int, tuple[torch.Tensor, ...]]]] = {}
        for layer, terms in self._queue:
            key = (self._g[layer], tuple(t.shape for t in terms), terms[0].device, terms[0].dtype)
            groups.setdefault(key, []).append((layer, terms))
        self._queue, self._queued_bytes = [], 0
        for (g, *_), items in groups.items():
            stacked = [torch.stack([terms[j] for _, terms in items]) for j in range(len(REPORT_TERMS))]
            rep = routing_dominance_report(*stacked, g, dtype=self.dtype, rtol=self.opts["rtol"] or None,
                                           a_method=self.opts["a"])
            for i, (layer, _) in enumerate(items):
                self._reports[layer] = {k: rep[k][i].cpu() for k in (*PER_HEAD, "N_eff")}

    def _linearisation(self, layer: int, got: dict[str, torch.Tensor]) -> None:
        """Queue ε_lin of this layer (per head before W_O, per layer after W_O) from the pair's own
        attention values; computed with the queued reports, every layer's heads in one call."""
        axes = self._replica_batch or ()
        if not axes or axes[0][0] != "replica" or tuple(axes[1:]) != tuple(self._batch or ()):
            # the JVP was not taken along the replica difference (another --jvp-direction): nothing to compare
            return
        info = self._info.get(layer, {})
        ran = info.get("attention") or {}  # the coupling and window the block's attention ran at
        g, window = float(ran.get("g") or 0.0), ran.get("window")
        own = tuple(got[p] for p in ("attn.q", "attn.k", "attn.v", "attn.out"))
        self._lin_queue.append((layer, g, window, own, tuple(got[p] for p in REPORT_TERMS), info["out_proj"]))
        self._queued_bytes += sum(t.numel() * t.element_size() for t in own)
        if self._queued_bytes >= REPORT_BATCH_BYTES:
            self._flush_reports()

    def _flush_linearisation(self) -> None:
        groups: dict[tuple, list] = {}
        for item in self._lin_queue:
            layer, g, window, own, terms, _ = item
            key = (g, window, tuple(t.shape for t in own + terms), own[0].device)
            groups.setdefault(key, []).append(item)
        self._lin_queue = []
        f64 = torch.float64
        fro = lambda x: torch.linalg.vector_norm(x, dim=(-2, -1))  # noqa: E731
        for (g, window, *_), items in groups.items():
            # heads are independent: the layers' heads side by side along the head axis, one call
            def cat(j, own=True):
                return torch.cat([(it[3] if own else it[4])[j] for it in items], dim=1).to(f64)
            true_all = coupled_half_difference(cat(0), cat(1), cat(2), g, window)
            lin_all = linearised_difference(*(cat(j, own=False) for j in range(len(REPORT_TERMS))), g)
            heads = items[0][3][0].shape[1]
            for i, (layer, _, _, own, _, out_proj) in enumerate(items):
                true, lin = (x[:, i * heads:(i + 1) * heads] for x in (true_all, lin_all))
                out = own[3].to(f64)
                half = out.shape[0] // 2
                true_out = (out[:half] - out[half:]) / 2  # W_O's bias cancels
                lin_out = out_proj(lin)  # W_O (ρR + ξM) / rescale, no bias, no gate
                self._lin[layer] = {
                    "linearisation_error": (fro(true - lin) / fro(true)).cpu(),
                    "true_difference_norm": fro(true).cpu(),
                    "layer_linearisation_error": (fro(true_out - lin_out) / fro(true_out)).cpu(),
                    "layer_true_difference_norm": fro(true_out).cpu(),
                }

    def _modal_gains(self, layer: int, got: dict[str, torch.Tensor], ctx: HookContext) -> None:
        point, delta = got["jvp.point"].to(self.dtype), got["jvp.direction"].to(self.dtype)
        B = point.shape[0]
        basis = self.bases.get(layer)
        if basis is None:  # step 0: the basis of this layer's directions, fixed from now on
            try:
                basis = DifferenceModeBasis.fit(delta, max_modes=self.opts["modes"], dtype=self.dtype)
            except ValueError as e:
                raise ProbeError(f"probe routing, layer {layer}: {e}") from None
            self.bases[layer] = basis
        K = basis.n_modes
        v = basis.modes.reshape((K,) + tuple(point.shape[1:]))
        model_dtype = got["jvp.point"].dtype
        h = point.repeat(K, 1, 1).to(model_dtype)  # (K·B, N, D): mode-major
        d = v.repeat_interleave(B, dim=0).to(model_dtype)
        # the block's JVP with this call's conditioning, at its g and window (documented JVP context)
        resp = ctx.info["linearise"](h, d, ("routing", "modulation", "mlp"), apply_gates=False)
        shaped = {k: r.reshape((K, B) + tuple(point.shape[1:])) for k, r in resp.items()}
        gains = modal_gains(v[:, None], shaped["routing"], shaped["modulation"], mlp_response=shaped["mlp"],
                            g=self._g[layer], feature_ndim=2, dtype=self.dtype)
        # average over the pairs (rows), then form the ratio of the averaged gains
        mean = {k: gains[k].mean(dim=1) for k in ("chi", "pi", "f", "rho_chi", "xi_pi", "kappa")}
        mean["ratio"] = mean["pi"].abs() / mean["chi"].abs()
        self._gains[layer] = {k: v_.cpu() for k, v_ in mean.items()}

    # -- outputs --------------------------------------------------------------------------------
    def end_step(self, step: int) -> Mapping[str, Output]:
        self._flush_reports()
        if self._pending:
            layer, got = next(iter(self._pending.items()))
            missing = [p for p in self.hook_points() if p not in got]
            raise ProbeError(f"probe routing: block {layer} at step {step} never produced {', '.join(missing)}")
        if not self._reports:
            return {}
        L = len(self.run.layers)
        batch_dims = tuple(a for a, _ in self._batch or ())
        batch_shape = tuple(n for _, n in self._batch or ())
        sample = next(iter(self._reports.values()))
        H, N = sample["N_eff"].shape[-2:]
        out: dict[str, Output] = {}
        for key, doc in PER_HEAD.items():
            t0 = sample[key]
            arr = torch.full((L,) + batch_shape + (H,), float("nan"), dtype=torch.float64) if t0.dtype != torch.bool \
                else torch.zeros((L,) + batch_shape + (H,), dtype=torch.bool)
            for layer, rep in self._reports.items():
                arr[self.run.layer_pos(layer)] = rep[key].reshape(batch_shape + (H,))
            if key == "a" and self.opts["a"] == "upper":
                doc = "ā ≥ ‖A P_⊥‖_op: rigorous upper bound (Schatten-8 norm of A P_⊥, option a=upper) used in [104]/[105]"
            out[key] = Output(arr, ("layer",) + batch_dims + ("head",), doc)
        # layer level: heads combined as √Σ_h ‖·‖_h² (THEORY §5)
        for key, doc in (("routing_norm", "‖A δV‖ over heads"), ("modulation_norm", "‖δA_g V‖ over heads"),
                         ("routing_norm_gated", "‖R‖ over heads"), ("modulation_norm_gated", "‖M‖ over heads")):
            out[f"layer_{key}"] = Output(combine_head_norms(out[key].values, dim=-1), ("layer",) + batch_dims,
                                         f"{doc}: √Σ_h ‖·‖_h²")
        out["layer_routing_dominance_gated"] = Output(
            out["layer_routing_norm_gated"].values / out["layer_modulation_norm_gated"].values,
            ("layer",) + batch_dims, "‖R‖/‖M‖ with heads combined (gated)")
        out["layer_routing_dominance"] = Output(
            out["layer_routing_norm"].values / out["layer_modulation_norm"].values,
            ("layer",) + batch_dims, "‖A δV‖/‖δA_g V‖ with heads combined (ungated)")
        g = torch.full((L,), float("nan"), dtype=torch.float64)
        for layer, value in self._g.items():
            g[self.run.layer_pos(layer)] = value
        out["g"] = Output(g, ("layer",), "coupling g at which the difference was linearised")
        if self.linearise and self._lin:
            for key, doc in LIN_PER_HEAD.items():
                arr = torch.full((L,) + batch_shape + (H,), float("nan"), dtype=torch.float64)
                for layer, lin in self._lin.items():
                    arr[self.run.layer_pos(layer)] = lin[key].reshape(batch_shape + (H,))
                out[key] = Output(arr, ("layer",) + batch_dims + ("head",), doc)
            for key, doc in (("layer_linearisation_error", "‖(out^a−out^b)/2 − W_O(ρR+ξM)‖/‖(out^a−out^b)/2‖ "
                                                           "with every head, after W_O (attn.out, before the gate)"),
                             ("layer_true_difference_norm", "‖(attn.out^a − attn.out^b)/2‖_F")):
                arr = torch.full((L,) + batch_shape, float("nan"), dtype=torch.float64)
                for layer, lin in self._lin.items():
                    arr[self.run.layer_pos(layer)] = lin[key].reshape(batch_shape)
                out[key] = Output(arr, ("layer",) + batch_dims, doc)
        if self.opts["n_eff_rows"]:
            arr = torch.full((L,) + batch_shape + (H, N), float("nan"), dtype=torch.float64)
            for layer, rep in self._reports.items():
                arr[self.run.layer_pos(layer)] = rep["N_eff"].reshape(batch_shape + (H, N))
            out["N_eff"] = Output(arr, ("layer",) + batch_dims + ("head", "query"), "N_eff of each query row [92]")
        if self.opts["modes"]:
            K = self.opts["modes"]
            docs = {"chi": "routing gain χ_k = v_kᵀ𝓡̃v_k (ungated) [44–46]",
                    "pi": "modulation gain π_k = v_kᵀ𝓜̃v_k (ungated)", "f": "MLP gain f_k",
                    "ratio": "|π_k|/|χ_k| (the reviewer's untested assumption: ≪ 1 for leading modes [59])",
                    "rho_chi": "ρ(g)χ_k", "xi_pi": "ξ(g)π_k", "kappa": "κ_k = 1 + ρχ_k + ξπ_k + f_k"}
            for key, doc in docs.items():
                arr = torch.full((L, K), float("nan"), dtype=torch.float64)
                for layer, gains in self._gains.items():
                    arr[self.run.layer_pos(layer), : gains[key].shape[0]] = gains[key]
                out[f"mode_{key}"] = Output(arr, ("layer", "mode"), doc + "; mean over pairs; NaN: mode not kept")
        self._new_step()
        return out


def coupled_half_difference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: float,
                            window: int | None = None) -> torch.Tensor:
    """``(O^a − O^b)/2`` per head from the replicas' own ``Q, K, V`` (replica-major ``[a; b]``).

    ``O^a = 1/(1+g) softmax(Q^a K^aᵀ/√d_h) V^a + g/(1+g) softmax(Q^a K^bᵀ/√d_h) V^b`` (and a↔b),
    each block with its own row softmax, within the Chebyshev window if one is set (eq [19], THEORY
    §2): what the coupled processor computes, written out. Shapes ``(2B, heads, N, d_h) → (B, heads, N, d_h)``.
    """
    half = q.shape[0] // 2
    mask = window_mask(q.shape[-2], window, q.device) if window is not None else None
    qa, qb, ka, kb, va, vb = q[:half], q[half:], k[:half], k[half:], v[:half], v[half:]
    diff = attend(qa, ka, va, mask) - attend(qb, kb, vb, mask)
    inter = attend(qa, kb, vb, mask) - attend(qb, ka, va, mask) if g else None
    return couple(diff, inter, g) / 2
