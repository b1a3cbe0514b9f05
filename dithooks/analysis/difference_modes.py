"""The ``difference_modes`` probe (THEORY §4, Protocol II): difference-mode energies per step.

The implementation lives in the core so that Protocol II (:mod:`dithooks.protocols.protocol2`)
can extend it without importing ``probes/``; ``dithooks.probes.builtin`` registers it as the
built-in probe ``difference_modes``.
"""

from __future__ import annotations

from typing import Mapping

import torch

from ..hookpoints import layer_template
from ..hooks import HookContext
from ..probe_api import Option, Output, Probe, ProbeError, RunInfo, parse_band, unbatch
from .modes import DifferenceModeBasis

__all__ = ["DifferenceModes", "per_block", "value_dims"]


def per_block(probe: Probe, run: RunInfo) -> None:
    """Refuse a run whose hook points are not per-block ones (one line, naming the probe)."""
    if not run.hook_names or any(layer_template(n)[1] is None for n in run.hook_names):
        raise ProbeError(f"probe {probe.label()} reads per-block hook points (resid_post, attn.out, ...), "
                         f"not {', '.join(run.hook_names) or 'nothing'}")


def value_dims(ctx: HookContext, value: torch.Tensor) -> tuple[str, ...]:
    """Dim names of one sample's value at the hook point of ``ctx`` (``dim_i`` for a ``...`` point)."""
    dims = tuple(ctx.point.dims[1:])
    if dims and dims[-1] == "...":
        dims = tuple(f"dim_{i}" for i in range(value.dim() - 1))
    return dims


class DifferenceModes(Probe):
    """Difference-mode energies E_k(s, ℓ), band means and gap ratio R (THEORY §4 [42–44, 74–80]).

    Pairs: ``halves`` pairs sample m with sample m + M (seeds list of 2M, same label per pair);
    ``replica`` pairs replica a with replica b of a replica run. At step 0 a
    :class:`DifferenceModeBasis` is fitted per layer from the M differences (Nyström, the D×D
    covariance is never formed); every step stores the normalised energies [75–76]
    ``E_k(s, ℓ) = (1/M) Σ_m (v_kᵀ δ_s^{(m)})² / λ_k`` (so ``E_k(0, ℓ) = 1``), the band means
    ``E_lead``, ``E_trail`` [78–79] and ``R = E_trail / E_lead`` [80]. ``finish`` stores the
    eigenvalues, the number of kept modes per layer and, optionally, the mode maps.

    The ``mode`` dim has room for every possible mode (M, or ``max_modes``); a layer that keeps
    fewer has NaN there. Not resumable: the step-0 basis lives only in memory.
    """

    name = "difference_modes"
    options = {
        "hook": Option("resid_post", "per-block hook point whose pair differences are analysed"),
        "pairs": Option("halves", "halves: sample m vs m+M; replica: replica a vs b"),
        "cfg": Option("cond", "guided runs: which branch's activations (cond or uncond)"),
        "lead": Option(0.25, "leading band: fraction (0.25), count (3) or indices (0,1)", parse_band),
        "trail": Option(0.25, "trailing band: fraction, count or indices (-1,-2)", parse_band),
        "centre": Option(False, "subtract the pair mean before fitting (at most M-1 modes)"),
        "max_modes": Option(0, "keep at most this many modes (0: all above the tolerance)"),
        "rel_tol": Option(0.0, "relative eigenvalue tolerance (0: sqrt(eps) of the precision)"),
        "precision": Option("fp64", "basis dtype: fp64 or fp32 (memory: K×D per layer)"),
        "mode_maps": Option(False, "store the modes v_k reshaped to the hook's value dims at finish"),
    }

    def check_options(self) -> None:
        o = self.opts
        for key, allowed in (("pairs", ("halves", "replica")), ("cfg", ("cond", "uncond")),
                             ("precision", ("fp64", "fp32"))):
            if o[key] not in allowed:
                raise ProbeError(f"probe difference_modes: {key} must be {' or '.join(allowed)}, not {o[key]!r}")
        if o["max_modes"] < 0 or o["rel_tol"] < 0:
            raise ProbeError("probe difference_modes: max_modes and rel_tol must be ≥ 0")
        for band in ("lead", "trail"):  # band_indices checks the spec itself against K at step 0
            spec = o[band]
            if isinstance(spec, float) and not 0 < spec <= 1 or isinstance(spec, int) and spec < 1:
                raise ProbeError(f"probe difference_modes: {band} must be a fraction in (0, 1], a count ≥ 1 "
                                 f"or a list of mode indices, not {spec!r}")

    def hook_points(self) -> tuple[str, ...]:
        return (self.opts["hook"],)

    # -- run ------------------------------------------------------------------------------------
    def start(self, run: RunInfo) -> None:
        per_block(self, run)
        axes = dict(run.batch_axes)
        if self.opts["pairs"] == "replica":
            if "replica" not in axes:
                raise ProbeError("probe difference_modes: pairs=replica needs a replica run; "
                                 "use pairs=halves (seeds 0..2M-1, sample m paired with m+M)")
            self.M = axes["sample"]
        else:
            if "replica" in axes:
                raise ProbeError("probe difference_modes: this is a replica run; use pairs=replica")
            n = axes["sample"]
            if n < 2 or n % 2:
                raise ProbeError(f"probe difference_modes: pairs=halves needs an even number of samples "
                                 f"(2M seeds), not {n}")
            self.M = n // 2
            labels = run.labels
            if list(labels[: self.M]) != list(labels[self.M:]):
                raise ProbeError("probe difference_modes: pairs=halves pairs sample m with m+M, which must "
                                 f"share a label; labels are {list(labels)}")
        if self.opts["cfg"] == "uncond" and "cfg" not in axes:
            raise ProbeError("probe difference_modes: cfg=uncond needs a guided run (-g ≠ 1)")
        if run.first_step != 0:
            raise ProbeError("probe difference_modes fits its basis at step 0 and cannot start later")
        self.run = run
        self.K = self.M if not self.opts["max_modes"] else min(self.M, self.opts["max_modes"])
        self.dtype = torch.float64 if self.opts["precision"] == "fp64" else torch.float32
        self.bases: dict[int, DifferenceModeBasis] = {}
        self.value_dims: tuple[str, ...] = ()
        self._new_step()

    def _new_step(self) -> None:
        L = len(self.run.layers)
        self.E = torch.full((L, self.K), float("nan"), dtype=torch.float64)
        self.bands = {k: torch.full((L,), float("nan"), dtype=torch.float64) for k in ("E_lead", "E_trail", "R")}

    def pair_differences(self, value: torch.Tensor, ctx: HookContext) -> torch.Tensor:
        """``δ^{(m)} = h^a − h^b`` of the M pairs: ``[batch, *value] → [M, *value]`` (THEORY §4)."""
        v = unbatch(value.detach(), ctx)
        names = [a for a, _ in ctx.batch_axes]
        if "cfg" in names:
            v = v.select(names.index("cfg"), 0 if self.opts["cfg"] == "cond" else 1)
            names.remove("cfg")
        v = v.to(self.dtype)
        if self.opts["pairs"] == "replica":  # (replica, sample, ...) once cfg is gone
            r = names.index("replica")
            return v.select(r, 0) - v.select(r, 1)
        return v[: self.M] - v[self.M:]

    def layer_basis(self, X: torch.Tensor, value: torch.Tensor, ctx: HookContext) -> DifferenceModeBasis:
        """This layer's fixed basis; fitted from the pair differences ``X`` on first sight (step 0:
        :meth:`start` guarantees it) [42–44], with the probe's options."""
        basis = self.bases.get(ctx.layer)
        if basis is None:
            try:
                basis = DifferenceModeBasis.fit(X, centre=self.opts["centre"], rel_tol=self.opts["rel_tol"] or None,
                                                max_modes=self.K, dtype=self.dtype)
            except ValueError as e:
                raise ProbeError(f"probe {self.label()}, layer {ctx.layer}: {e}") from None
            self.bases[ctx.layer] = basis
            self.value_dims = value_dims(ctx, value)
        return basis

    def observe(self, name: str, value: torch.Tensor, ctx: HookContext) -> None:
        X = self.pair_differences(value, ctx)
        basis = self.layer_basis(X, value, ctx)
        i = self.run.layer_pos(ctx.layer)
        try:
            parts = basis.band_energies(X, self.opts["lead"], self.opts["trail"])
        except ValueError as e:  # e.g. band indices beyond this layer's kept modes
            raise ProbeError(f"probe difference_modes, layer {ctx.layer}: {e}") from None
        self.E[i, : basis.n_modes] = parts["E"].to(torch.float64).cpu()
        for k in ("E_lead", "E_trail", "R"):
            self.bands[k][i] = float(parts[k])

    def end_step(self, step: int) -> Mapping[str, Output]:
        out = {"energy": Output(self.E, ("layer", "mode"), "normalised energy E_k(s, layer) [75-76]; NaN: mode not kept"),
               "E_lead": Output(self.bands["E_lead"], ("layer",), "mean E_k over the leading band [78]"),
               "E_trail": Output(self.bands["E_trail"], ("layer",), "mean E_k over the trailing band [79]"),
               "R": Output(self.bands["R"], ("layer",), "energy gap ratio E_trail / E_lead [80]")}
        self._new_step()
        return out

    def finish(self) -> Mapping[str, Output]:
        L = len(self.run.layers)
        lam = torch.full((L, self.K), float("nan"), dtype=torch.float64)
        gram = torch.full((L, self.M), float("nan"), dtype=torch.float64)
        kept = torch.zeros(L, dtype=torch.int64)
        for layer, b in self.bases.items():
            i = self.run.layer_pos(layer)
            lam[i, : b.n_modes] = b.eigenvalues.to(torch.float64).cpu()
            gram[i] = b.gram_eigenvalues.to(torch.float64).cpu()
            kept[i] = b.n_modes
        out = {"eigenvalues": Output(lam, ("layer", "mode"), "kept eigenvalues λ_k of C = XᵀX/M at step 0, descending"),
               "gram_eigenvalues": Output(gram, ("layer", "pair"), "all eigenvalues of the dual Gram XXᵀ/M at step 0"),
               "n_modes": Output(kept, ("layer",), "number of kept modes per layer")}
        if self.opts["mode_maps"] and self.bases:
            feat = next(iter(self.bases.values())).feature_shape
            maps = torch.full((L, self.K) + feat, float("nan"), dtype=torch.float32)
            for layer, b in self.bases.items():
                maps[self.run.layer_pos(layer), : b.n_modes] = b.mode_maps().to(torch.float32).cpu()
            out["modes"] = Output(maps, ("layer", "mode") + self.value_dims, "mode maps v_k at step 0 (unit norm)")
        return out
