"""Protocol II (paper §3.2 and §4.2, THEORY §4): where in depth the replica difference commits.

For each coupling strength g, M replica pairs (antisymmetric start with separation κ [67]) are
sampled **coupled at g for the whole trajectory** (DDIM; the paper: deterministic, 100 steps). At
every step and block the pair differences ``δ^{(m)} = h^a − h^b`` of a hook point (``resid_post``)
are projected on a fixed basis of difference modes fitted per block at step 0 (the
``difference_modes`` probe: Nyström on the M×M dual Gram, the D×D covariance is never formed).
Per pair, step, block and mode the store keeps the normalised energy

    e_k^{(m)}(s, ℓ) = (v_kᵀ δ_s^{(m)})² / λ_k,      E_k(s, ℓ) = mean_m e_k^{(m)}   [75–76]

so ``E_k(0, ℓ) = 1``. At the step of commitment, s = t_spec(g) from a Protocol I store (or a
step given), the bands ``E_lead``, ``E_trail`` [78–79] and the gap ratio ``R_ℓ = E_trail / E_lead``
[80] are reported per block.

Spread over seeds (pairs). ``R`` is a ratio of means over pairs, so it has no per-pair value.
``E_lead``/``E_trail`` are reported as mean ± standard deviation over the M pairs of the per-pair
band energies ``e_band^{(m)} = mean_{k ∈ band} e_k^{(m)}`` (the paper's "mean and spread from
paired seeds"). ``R`` gets a 95 % percentile interval and a standard error from a bootstrap over
pairs: B resamples of the M pairs with replacement (one fixed-seed set shared by every g and
block), ``R* = mean_{band} mean_{m ∈ resample} e_trail / … e_lead``, with the mode basis held fixed
at the one fitted on all M pairs (refitting it per resample would need every step-0 difference).

Spatial coherence. The paper's premise (Appendix B) is that leading modes are spatially coherent
(low-frequency) on the token grid. For each kept mode ``v_k`` (token × channel) the probe reports
its mean-free fraction ``‖P_⊥ v‖/‖v‖`` (THEORY §5; 1 − that² is the constant-token share) and its
low-frequency energy fraction: the share of ``‖v‖²`` in the 2-D DCT-II coefficients (orthonormal,
per channel over the √N × √N token grid) with ``√(u² + w²) ≤ r`` (``r`` = ``low_freq_radius``,
default side/4). For a Gaussian random vector of the same shape these are exactly distributed:
``(‖P_⊥ v‖/‖v‖)² ~ Beta((N−1)d/2, d/2)`` and the low-frequency fraction ``~ Beta(n_low d/2,
(N − n_low) d/2)``; the summary compares the band means of the modes with the same band mean of
independent random vectors (mean, and 2.5 %/97.5 % quantiles by sampling those Beta laws).

Store (one Zarr v3 directory, ``attrs["dithooks"]["kind"] == "protocol2"``): the summary arrays
at the root (dims named; ``xarray.open_zarr(STORE)`` opens them) and, per g, a full capture store
``runs/g_<g>`` written by :class:`~dithooks.capture.CaptureSession` with the probe's per-step
outputs. Each g is a cell with a completion flag: ``--resume`` skips finished couplings and reruns
an unfinished one from its start (the step-0 basis is not resumable mid-way).
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch

from ..errors import DithooksError, StoreError
from ..analysis.difference_modes import DifferenceModes
from ..analysis.modes import band_energies, band_indices
from ..probe_api import Option, Output, ProbeError, parse_band
from ..probe_runner import probe_array_name
from ..store.metadata import now
from .pairs import PairedRequest, parse_couplings
from .store import ResultsStore

KIND = "protocol2"
#: request fields that must match for --resume (the others only change the summary)
IDENTITY_KEYS = ("model", "g", "pairs", "first_seed", "labels", "steps", "eta", "guidance", "kappa", "layers",
                 "hook", "centre")
SUMMARY_KEYS = ("at_step", "from_protocol1", "lead", "trail", "bootstrap", "bootstrap_seed")
RANDOM_DRAWS = 20000  # samples of the Beta laws for the random-vector baseline


# -- the probe -------------------------------------------------------------------------------------
def dct_matrix(n: int, dtype=torch.float64) -> torch.Tensor:
    """Orthonormal DCT-II matrix ``C`` (n × n): ``C[k, i] = s_k cos(π (2i + 1) k / 2n)``."""
    i = torch.arange(n, dtype=dtype)
    k = i[:, None]
    C = torch.cos(math.pi * (2 * i[None, :] + 1) * k / (2 * n)) * math.sqrt(2.0 / n)
    C[0] /= math.sqrt(2.0)
    return C


def low_frequency_set(side: int, radius: float) -> torch.Tensor:
    """Boolean (side, side) mask of DCT frequencies ``(u, w)`` with ``√(u² + w²) ≤ radius``."""
    u = torch.arange(side, dtype=torch.float64)
    return (u[:, None] ** 2 + u[None, :] ** 2).sqrt() <= radius + 1e-9


def default_low_freq_radius(side: int) -> float:
    return max(1.0, side / 4)


def mode_coherence(maps: torch.Tensor, low_freq_radius: float | None = None) -> dict[str, torch.Tensor]:
    """Spatial coherence of token fields ``maps`` ``[K, N, ...]`` (token axis 1, the rest channels).

    ``mean_free_fraction``: ``‖P_⊥ v‖_F / ‖v‖_F`` (token mean removed per channel, THEORY §5);
    ``low_freq_fraction``: share of ``‖v‖²`` in the 2-D DCT frequencies within ``low_freq_radius``
    of the √N × √N grid (NaN when N is not a square). Also ``n_low``, the number of those frequencies.
    """
    K, N = maps.shape[:2]
    v = maps.reshape(K, N, -1).to(torch.float64)
    total = v.pow(2).sum((1, 2))
    perp = v - v.mean(dim=1, keepdim=True)
    out = {"mean_free_fraction": perp.pow(2).sum((1, 2)).sqrt() / total.sqrt()}
    side = math.isqrt(N)
    if side * side != N:
        out["low_freq_fraction"] = torch.full((K,), float("nan"), dtype=torch.float64)
        out["n_low"] = torch.tensor(0)
        return out
    r = default_low_freq_radius(side) if low_freq_radius is None else low_freq_radius
    C = dct_matrix(side)
    grid = v.reshape(K, side, side, -1)
    coef = torch.einsum("ui,wj,kijc->kuwc", C, C, grid)
    low = low_frequency_set(side, r)
    out["low_freq_fraction"] = coef.pow(2)[:, low].sum((1, 2)) / total
    out["n_low"] = low.sum()
    return out


class Protocol2Modes(DifferenceModes):
    """``difference_modes`` plus what Protocol II needs: per-pair energies and mode coherence.

    Stored under the same name (``probe.difference_modes.*``): everything the built-in stores, plus
    ``pair_energy`` (step, layer, pair, mode) ``e_k^{(m)} = (v_kᵀ δ^{(m)})²/λ_k`` (its mean over pairs
    is ``energy``), and at the end ``mean_free_fraction`` / ``low_freq_fraction`` (layer, mode) of
    every kept mode and ``coherence_geometry`` = (N tokens, channels, n_low, grid side).
    """

    options = {**DifferenceModes.options,
               "low_freq_radius": Option(0.0, "DCT radius of the low-frequency band on the token grid (0: side/4)")}

    def check_options(self) -> None:
        super().check_options()
        if self.opts["low_freq_radius"] < 0:
            raise ProbeError("low_freq_radius must be ≥ 0")

    def _new_step(self) -> None:
        super()._new_step()
        self.PE = torch.full((len(self.run.layers), self.M, self.K), float("nan"), dtype=torch.float64)

    def observe(self, name: str, value: torch.Tensor, ctx) -> None:
        X = self.pair_differences(value, ctx)
        basis = self.layer_basis(X, value, ctx)  # fitted at step 0 [42–44], then fixed
        P = basis.project(X)  # (M, K): one projection serves the per-pair and the mean energies
        e = (P * P / basis.eigenvalues).to(torch.float64).cpu()
        i = self.run.layer_pos(ctx.layer)
        self.PE[i, :, : basis.n_modes] = e
        E = e.mean(dim=0)
        self.E[i, : basis.n_modes] = E
        try:
            parts = band_energies(E, self.opts["lead"], self.opts["trail"])
        except ValueError as err:
            raise ProbeError(f"protocol2, layer {ctx.layer}: {err}") from None
        for k in ("E_lead", "E_trail", "R"):
            self.bands[k][i] = float(parts[k])

    def end_step(self, step: int) -> Mapping[str, Output]:
        pe = self.PE
        out = dict(super().end_step(step))  # resets E, bands and PE
        out["pair_energy"] = Output(pe, ("layer", "pair", "mode"),
                                    "per-pair normalised energy (v_kᵀδ^(m))²/λ_k; its mean over pairs is energy")
        return out

    def finish(self) -> Mapping[str, Output]:
        out = dict(super().finish())
        L = len(self.run.layers)
        mf = torch.full((L, self.K), float("nan"), dtype=torch.float64)
        lf = torch.full((L, self.K), float("nan"), dtype=torch.float64)
        geometry = torch.zeros(4, dtype=torch.int64)
        token_first = bool(self.value_dims) and self.value_dims[0] == "token"
        r = self.opts["low_freq_radius"] or None
        for layer, b in self.bases.items():
            if not token_first:
                break
            maps = b.mode_maps()
            c = mode_coherence(maps, r)
            i = self.run.layer_pos(layer)
            mf[i, : b.n_modes] = c["mean_free_fraction"].cpu()
            lf[i, : b.n_modes] = c["low_freq_fraction"].cpu()
            N = maps.shape[1]
            geometry = torch.tensor([N, int(np.prod(maps.shape[2:])), int(c["n_low"]), math.isqrt(N)])
        out["mean_free_fraction"] = Output(mf, ("layer", "mode"), "‖P_⊥ v_k‖/‖v_k‖ over tokens (THEORY §5)")
        out["low_freq_fraction"] = Output(lf, ("layer", "mode"), "share of ‖v_k‖² in the low DCT frequencies of the "
                                                                  "token grid")
        out["coherence_geometry"] = Output(geometry, ("geometry",), "N tokens, channels, n_low frequencies, grid side "
                                                                    "(zeros: the hook has no token axis)")
        return out


# -- random baselines ------------------------------------------------------------------------------
def random_baseline(N: int, d: int, n_low: int, band_size: int, draws: int = RANDOM_DRAWS,
                    seed: int = 0) -> dict[str, dict[str, float]]:
    """Mean and 2.5/97.5 % quantiles of the band mean (over ``band_size`` independent Gaussian
    N×d vectors) of the mean-free fraction and of the low-frequency fraction (exact Beta laws)."""
    rng = np.random.default_rng(seed)
    out: dict[str, dict[str, float]] = {}
    laws = {"mean_free_fraction": (lambda x: np.sqrt(x), (N - 1) * d / 2, d / 2),
            "low_freq_fraction": (lambda x: x, n_low * d / 2, (N - n_low) * d / 2)}
    for key, (fn, a, b) in laws.items():
        if a <= 0 or b <= 0:
            out[key] = {"mean": math.nan, "q025": math.nan, "q975": math.nan, "single_mean": math.nan}
            continue
        x = fn(rng.beta(a, b, size=(draws, max(1, band_size)))).mean(axis=1)
        single = fn(a / (a + b)) if key == "low_freq_fraction" else float(np.mean(fn(rng.beta(a, b, size=draws))))
        out[key] = {"mean": float(x.mean()), "q025": float(np.quantile(x, 0.025)),
                    "q975": float(np.quantile(x, 0.975)), "single_mean": float(single)}
    return out


# -- the request -----------------------------------------------------------------------------------
def parse_g_list(text: str | Sequence[float]) -> tuple[float, ...]:
    """``"0,0.3,1"`` -> (0.0, 0.3, 1.0): couplings >= 0 in the order given, none repeated."""
    return parse_couplings(text, "g list", "0,0.3,1")


def _band(spec: Any) -> Any:
    if isinstance(spec, str):
        try:
            spec = parse_band(spec)
        except ValueError:
            raise DithooksError(f"malformed band {spec!r}: a fraction (0.25), a count (4) or indices (0,1)") from None
    if isinstance(spec, (list, tuple)):
        return [int(x) for x in spec]
    if isinstance(spec, float) and not 0 < spec <= 1 or isinstance(spec, int) and spec < 1:
        raise DithooksError(f"band {spec!r}: a fraction in (0, 1], a count >= 1 or a list of mode indices")
    return spec


@dataclass(frozen=True)
class Protocol2Request(PairedRequest):
    """What to run (identity) and how to summarise it. Pair m uses seed ``first_seed + m``;
    ``labels`` one class for every pair or one per pair. ``at_step``: one step for every g, or one
    per g; ``from_protocol1``: a Protocol I store whose t_spec(g) gives the step instead (with both,
    ``at_step`` serves the g that Protocol I has no t_spec for, e.g. g = 0, whose curve is flat)."""

    model: str | None = None
    g: tuple[float, ...] = (0.0, 0.3)
    pairs: int = 32
    first_seed: int = 0
    labels: tuple[int, ...] = (0,)
    steps: int = 100
    eta: float = 0.0
    guidance: float = 1.0
    kappa: float = 2 ** -0.5
    layers: str = "all"
    hook: str = "resid_post"
    centre: bool = False
    lead: Any = 0.25
    trail: Any = 0.25
    at_step: tuple[int, ...] | None = None
    from_protocol1: str | None = None
    bootstrap: int = 1000
    bootstrap_seed: int = 0
    low_freq_radius: float = 0.0

    def __post_init__(self):
        from ..sampling import ReplicaSpec, SamplerSpec

        SamplerSpec("ddim", self.steps, self.eta, self.guidance)
        ReplicaSpec(kappa=self.kappa)
        object.__setattr__(self, "g", parse_g_list(self.g))
        object.__setattr__(self, "labels", tuple(int(v) for v in self.labels))
        object.__setattr__(self, "lead", _band(self.lead))
        object.__setattr__(self, "trail", _band(self.trail))
        if self.pairs < 2:
            raise DithooksError(f"Protocol II needs at least 2 pairs for modes, got {self.pairs}")
        if len(self.labels) not in (1, self.pairs):
            raise DithooksError(f"{len(self.labels)} classes for {self.pairs} pairs: give one class, or one per pair")
        if self.kappa == 0:
            raise DithooksError("kappa = 0 makes the replicas identical: there is no difference to analyse")
        if self.at_step is not None:
            at = tuple(int(s) for s in ((self.at_step,) if isinstance(self.at_step, int) else self.at_step))
            if len(at) not in (1, len(self.g)):
                raise DithooksError(f"--at-step gives {len(at)} steps for {len(self.g)} couplings: give one, or one per g")
            bad = [s for s in at if not 0 <= s < self.steps]
            if bad:
                raise DithooksError(f"step {bad[0]} is outside 0-{self.steps - 1}")
            object.__setattr__(self, "at_step", at)
        if self.bootstrap < 0:
            raise DithooksError(f"--bootstrap must be >= 0, got {self.bootstrap}")
        if not math.isfinite(self.low_freq_radius) or self.low_freq_radius < 0:
            raise DithooksError(f"--low-freq-radius must be a finite number >= 0, got {self.low_freq_radius}")

    TUPLE_FIELDS = ("g", "labels", "at_step")

    @classmethod
    def from_dict(cls, d: Mapping) -> "Protocol2Request":
        return cls(**cls.known_fields(d))


def merge_request(stored: Mapping, given: Mapping[str, Any]) -> Protocol2Request:
    """The stored request with the options given now (not None): identity options must agree, the
    summary options may change (and then only the summary is recomputed)."""
    base = Protocol2Request.from_dict(stored)
    changes: dict[str, Any] = {}
    for k, v in given.items():
        if v is None:
            continue
        probe = replace(base, **{k: v}) if k in IDENTITY_KEYS else None
        if probe is not None and getattr(probe, k) != getattr(base, k):
            raise StoreError(f"cannot resume: the store's {k} is {getattr(base, k)!r}, this run asks "
                             f"{getattr(probe, k)!r} (leave the option out to keep it, or use --overwrite)")
        changes[k] = v
    summary = {k: v for k, v in changes.items() if k not in IDENTITY_KEYS}
    if "at_step" in summary and "from_protocol1" not in summary:
        summary["from_protocol1"] = None
    elif "from_protocol1" in summary and "at_step" not in summary:
        summary["at_step"] = None
    return replace(base, **summary)


def _key(g: float) -> str:
    return f"g_{g:g}"


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


# -- the run ---------------------------------------------------------------------------------------
class Protocol2:
    """One Protocol II store: create (or reopen with ``mode="resume"``), run the missing g, summarise.

    ``log`` gets one-line messages (the plan, the time estimate); ``bar`` (optional) an object with
    ``update(n)`` (a tqdm bar) that sees every sampling step of every g.
    """

    def __init__(self, request: Protocol2Request | None, out: str | Path, *, mode: str = "create",
                 given: Mapping[str, Any] | None = None, loaded=None, device: str = "cpu",
                 log: Callable[[str], None] | None = None, figures: bool = True):
        if mode not in ("create", "overwrite", "resume"):
            raise ValueError(f"mode {mode!r}")
        self.out, self.mode, self.device, self.figures = Path(out), mode, device, figures
        self.log = log or (lambda msg: None)
        if mode == "resume":
            stored = ResultsStore.open(self.out, KIND).meta["request"]
            request = merge_request(stored, given or {})
        if request is None:
            raise ValueError("a request is needed unless resuming")
        check_summary_source(request)  # nothing is created for a run that could not be summarised
        self.request = request
        self._loaded = loaded
        self.store = self._open_store()

    @property
    def loaded(self):
        if self._loaded is None:
            from ..loading import load_model

            self._loaded = load_model(self.request.model, device=self.device, with_vae=False)
            self._loaded.adapter.require_class_conditional("protocol2")
        return self._loaded

    def _open_store(self) -> ResultsStore:
        r = self.request
        if self.mode == "resume":
            store = ResultsStore.open(self.out, KIND, mode="r+")
            if store.meta.get("request") != r.as_dict():  # new summary options
                store.update_meta(request=r.as_dict())
            return store
        self._check_model()
        store = ResultsStore.create(self.out, KIND, r.as_dict(), overwrite=self.mode == "overwrite")
        store.update_meta(model_id=self.loaded.model_id, timings={}, cells={"done": 0, "total": len(r.g)})
        store.coord("g", np.asarray(r.g, dtype="float64"), ("g",))
        store.array("g_done", ("g",), (len(r.g),), dtype="bool", fill=False, chunks=(1,))
        store.group.require_group("runs")
        return store

    def _check_model(self) -> None:
        r, geo = self.request, self.loaded.adapter.geometry
        if geo.num_classes is not None:
            bad = [y for y in r.labels if not 0 <= y < geo.num_classes]
            if bad:
                raise DithooksError(f"class {bad[0]} is out of range: this model has classes 0-{geo.num_classes - 1}")

    # -- cells -------------------------------------------------------------------------------------
    def run_path(self, g: float) -> Path:
        return self.out / "runs" / _key(g)

    def done(self) -> np.ndarray:
        return self.store.read("g_done")

    def capture_config(self, g: float, mode: str):
        from ..capture import CaptureConfig
        from ..sampling import ReplicaSpec, SamplerSpec

        r = self.request
        probe = Protocol2Modes(pairs="replica", hook=r.hook, lead=r.lead, trail=r.trail, centre=r.centre,
                               low_freq_radius=r.low_freq_radius)
        return CaptureConfig(out=str(self.run_path(g)), model=r.model, layers=r.layers, hooks=(),
                             sampler=SamplerSpec("ddim", r.steps, r.eta, r.guidance), labels=tuple(r.pair_labels),
                             seeds=tuple(r.seeds), device=self.device, mode=mode,
                             replicas=ReplicaSpec(kappa=r.kappa, g=g), probes=(probe,))

    def run(self, bar=None) -> dict:
        """Sample every g not yet complete, then (re)compute the summary, arrays and figures."""
        self.sample(bar)
        return self.summarise()

    def summarise(self) -> dict:
        """Summary, root arrays, figures and the summary convention, from the per-g runs."""
        t0 = time.perf_counter()
        summary = compute_summary(self.store, self.request)
        write_summary(self.store, summary, figures=self.figures)
        timings = dict(self.store.meta.get("timings") or {})
        timings["summary"] = round(time.perf_counter() - t0, 3)
        self.store.update_meta(error=None, timings=timings)
        self.store.finish("complete")
        return summary

    def sample(self, bar=None) -> None:
        """Run the capture of every g whose flag is not set (from its first step)."""
        from ..capture import CaptureSession

        r = self.request
        check_summary_source(r)  # before any sampling: a run must end in a summary
        todo = [i for i, ok in enumerate(self.done()) if not ok]
        if todo and self.mode == "resume":
            self.store.update_meta(status="running", finished=None, runs=list(self.store.meta.get("runs", [])) + [now()])
        if todo:
            self._check_model()
            sessions = []
            for i in todo:  # build every session first: a bad option fails before anything runs
                sessions.append((i, CaptureSession(self.capture_config(r.g[i], "overwrite"), self.loaded)))
            self.log(f"protocol2: {len(todo)} of {len(r.g)} couplings to run (g = "
                     f"{', '.join(f'{r.g[i]:g}' for i in todo)}), {r.steps} steps each, {r.pairs} pairs "
                     f"({2 * r.pairs} trajectories per step), {len(sessions[0][1].layers)} blocks")
            t_start = time.perf_counter()
            steps_left = [r.steps * len(todo)]
            announced = [False]

            def progress(it):
                t0 = time.perf_counter()
                for s in it:
                    yield s
                    steps_left[0] -= 1
                    if bar is not None:
                        bar.update(1)
                    if not announced[0] and s >= 1:  # after two steps: a time estimate for the rest
                        announced[0] = True
                        per = (time.perf_counter() - t0) / (s + 1)
                        self.log(f"protocol2: ~{per:.2f} s per step, estimated {_duration(per * steps_left[0])} "
                                 "for the rest")
            timings = dict(self.store.meta.get("timings") or {})
            try:
                for i, session in sessions:
                    t0 = time.perf_counter()
                    session.run(progress=progress)
                    timings[_key(r.g[i])] = round(time.perf_counter() - t0, 3)
                    self.store.write("g_done", i, True)
                    self.store.update_meta(timings=timings, cells={"done": int(self.done().sum()), "total": len(r.g)})
            except (KeyboardInterrupt, StoreError) as e:
                # a capture turns Ctrl-C / SIGTERM into "capture interrupted: ..." (its store is kept)
                if not isinstance(e, KeyboardInterrupt) and not str(e).startswith("capture interrupted"):
                    self.store.update_meta(error=f"{type(e).__name__}: {e}")
                    self.store.finish("failed")
                    raise
                self.store.finish("interrupted")
                raise StoreError(f"protocol2 interrupted: {self.out} holds {int(self.done().sum())} of {len(r.g)} "
                                 "couplings; continue with `dithooks protocol2 --out STORE --resume`") from None
            except BaseException as e:
                self.store.update_meta(error=f"{type(e).__name__}: {e}")
                self.store.finish("failed")
                raise
            self.log(f"protocol2: sampled in {_duration(time.perf_counter() - t_start)}")


def check_summary_source(r: Protocol2Request) -> None:
    """Refuse a request whose summary step cannot be known (before anything is sampled)."""
    if r.at_step is None and not r.from_protocol1:
        raise DithooksError("say where to read the energies: --from-protocol1 STORE (t_spec(g) of a Protocol I "
                            "run) or --at-step S")
    if r.from_protocol1:
        from .protocol1 import read_t_spec

        t = read_t_spec(r.from_protocol1)
        missing = [g for g in r.g if not any(abs(k - g) < 1e-9 for k in t)]
        if missing and r.at_step is None:
            raise DithooksError(f"the Protocol I store {r.from_protocol1} has no t_spec for g = {missing[0]:g} (it has "
                                f"g = {', '.join(f'{k:g}' for k in sorted(t))}); add --at-step S for it")
        failed = [g for g in r.g for k, v in t.items() if abs(k - g) < 1e-9 and not (v is not None and math.isfinite(v))]
        if failed and r.at_step is None:
            raise DithooksError(f"the Protocol I fit for g = {failed[0]:g} failed (t_spec n/a in {r.from_protocol1}); "
                                "add --at-step S for it")


def run_protocol2(request: Protocol2Request, out, *, mode: str = "create", given=None, loaded=None, device="cpu",
                  bar=None, log=None, figures: bool = True) -> dict:
    """Convenience: build :class:`Protocol2` and run it."""
    return Protocol2(request, out, mode=mode, given=given, loaded=loaded, device=device, figures=figures,
                     log=log or (lambda m: print(m, file=sys.stderr))).run(bar=bar)


# -- the summary -----------------------------------------------------------------------------------
def _steps_from_protocol1(path: str, g_list: Sequence[float], timesteps: np.ndarray,
                          fallback: Sequence[int] | None = None) -> tuple[list[int], list[float], list[str]]:
    """Protocol II steps whose timestep is nearest the Protocol I t_spec(g) (timestep where the pair
    commits), the t_spec values in Protocol I steps (NaN where the fallback step was used) and each
    g's source. ``fallback``: --at-step (one, or one per g) for the g Protocol I has no t_spec for."""
    from .protocol1 import read_t_spec

    by_t = read_t_spec(path, unit="timestep")
    by_s = read_t_spec(path, unit="step")
    steps, t_spec, sources = [], [], []
    for gi, g in enumerate(g_list):
        match = [k for k in by_t if abs(k - g) < 1e-9]
        t = by_t[match[0]] if match else None
        if t is None or not math.isfinite(t):
            if fallback is None:
                why = "has no t_spec for" if not match else "has a failed fit (t_spec n/a) for"
                raise DithooksError(f"the Protocol I store {path} {why} g = {g:g}; add --at-step S for it")
            steps.append(int(fallback[0] if len(fallback) == 1 else fallback[gi]))
            t_spec.append(math.nan)
            sources.append("--at-step (no Protocol I t_spec)")
            continue
        steps.append(int(np.argmin(np.abs(timesteps.astype(float) - t))))
        t_spec.append(float(by_s[match[0]]))
        sources.append(f"Protocol I t_spec = {by_s[match[0]]:.4g} steps (timestep {t:.4g})")
    return steps, t_spec, sources


def _load_run(path: Path) -> dict[str, np.ndarray]:
    from ..store.reader import open_store

    s = open_store(path)
    need = ("pair_energy", "n_modes", "eigenvalues", "mean_free_fraction", "low_freq_fraction", "coherence_geometry")
    name = {n: probe_array_name(Protocol2Modes.label(), n) for n in need}
    missing = [name[n] for n in need if name[n] not in s.array_names()]
    if missing:
        raise StoreError(f"{path} lacks {missing[0]}: was it written by protocol2?")
    out = {n: np.asarray(s.select(name[n]).values, dtype=np.float64) for n in need}
    out["timestep"] = s.coord("timestep")
    out["layer"] = s.coord("layer")
    return out


def _band_idx(spec, n: int, which: str) -> np.ndarray:
    try:
        return band_indices(spec, n, which).numpy()
    except ValueError as e:
        raise DithooksError(f"band {spec!r}: {e}") from None


def compute_summary(store: ResultsStore, request: Protocol2Request) -> dict:
    """Everything the report shows, from the per-g capture stores (see the module docstring)."""
    r = request
    G = len(r.g)
    runs = [_load_run(store.path / "runs" / _key(g)) for g in r.g]
    timesteps = runs[0]["timestep"]
    layers = runs[0]["layer"].astype(int)
    L, S = len(layers), len(timesteps)
    if r.from_protocol1:
        at, t_spec, sources = _steps_from_protocol1(r.from_protocol1, r.g, timesteps, r.at_step)
        source = (f"t_spec(g) of the Protocol I store {r.from_protocol1} (the Protocol II step with the nearest "
                  "timestep): " + "; ".join(f"g = {g:g}: step {s} ({src})" for g, s, src in zip(r.g, at, sources)))
    elif r.at_step is not None:
        at = list(r.at_step) * (G if len(r.at_step) == 1 else 1)
        t_spec = [math.nan] * G
        source = "the step given (--at-step): " + ", ".join(f"g = {g:g}: step {s}" for g, s in zip(r.g, at))
    else:
        raise DithooksError("say where to read the energies: --from-protocol1 STORE (t_spec(g)) or --at-step S")
    M = r.pairs
    rng = np.random.default_rng(r.bootstrap_seed)
    boot = rng.integers(0, M, size=(r.bootstrap, M)) if r.bootstrap else None
    res = {k: np.full((G, L), np.nan) for k in ("E_lead", "E_trail", "E_lead_std", "E_trail_std", "R", "R_ci_low",
                                                "R_ci_high", "R_boot_std", "lead_mean_free", "trail_mean_free",
                                                "lead_low_freq", "trail_low_freq")}
    per_step = {k: np.full((G, S, L), np.nan) for k in ("E_lead", "E_trail", "R")}
    n_modes = np.zeros((G, L), dtype=np.int64)
    baselines: dict[str, Any] = {}
    for gi, run in enumerate(runs):
        pe = run["pair_energy"]  # (step, layer, pair, mode)
        s = at[gi]
        for li in range(L):
            K = int(run["n_modes"][li])
            n_modes[gi, li] = K
            if K < 1:
                continue
            lead, trail = _band_idx(r.lead, K, "lead"), _band_idx(r.trail, K, "trail")
            e = pe[:, li, :, :K]  # (step, pair, K)
            E = e.mean(axis=1)
            per_step["E_lead"][gi, :, li] = E[:, lead].mean(-1)
            per_step["E_trail"][gi, :, li] = E[:, trail].mean(-1)
            em = e[s]  # (pair, K) at the chosen step
            el, et = em[:, lead].mean(-1), em[:, trail].mean(-1)  # per-pair band energies
            res["E_lead"][gi, li], res["E_trail"][gi, li] = el.mean(), et.mean()
            res["E_lead_std"][gi, li] = el.std(ddof=1) if M > 1 else math.nan
            res["E_trail_std"][gi, li] = et.std(ddof=1) if M > 1 else math.nan
            res["R"][gi, li] = et.mean() / el.mean()
            if boot is not None:
                Rb = et[boot].mean(-1) / el[boot].mean(-1)
                res["R_ci_low"][gi, li], res["R_ci_high"][gi, li] = np.quantile(Rb, [0.025, 0.975])
                res["R_boot_std"][gi, li] = Rb.std(ddof=1) if len(Rb) > 1 else math.nan
            mf, lf = run["mean_free_fraction"][li, :K], run["low_freq_fraction"][li, :K]
            res["lead_mean_free"][gi, li], res["trail_mean_free"][gi, li] = mf[lead].mean(), mf[trail].mean()
            res["lead_low_freq"][gi, li], res["trail_low_freq"][gi, li] = lf[lead].mean(), lf[trail].mean()
            n_lead = len(lead)
            geo = tuple(int(x) for x in run["coherence_geometry"])
            if geo[0] and (geo, n_lead) not in baselines:
                baselines[(geo, n_lead)] = random_baseline(geo[0], geo[1], geo[2], n_lead)
        per_step["R"][gi] = per_step["E_trail"][gi] / per_step["E_lead"][gi]
    geo = tuple(int(x) for x in runs[0]["coherence_geometry"])
    # the baseline for the (most common) leading-band size
    sizes = [len(_band_idx(r.lead, int(k), "lead")) for k in n_modes.ravel() if k > 0]
    n_lead = max(set(sizes), key=sizes.count) if sizes else 1
    base = baselines.get((geo, n_lead)) or (random_baseline(geo[0], geo[1], geo[2], n_lead) if geo[0] else None)
    coherence = _coherence_verdict(res, base, geo, n_lead, r)
    return {"request": r.as_dict(), "g": list(r.g), "layers": layers.tolist(), "timesteps": timesteps.tolist(),
            "at_step": at, "at_timestep": [int(timesteps[s]) for s in at], "t_spec": t_spec, "source": source,
            "per_layer": res, "per_step": per_step, "n_modes": n_modes, "geometry": geo, "n_lead": n_lead,
            "random": base, "coherence": coherence, "notes": _notes(r, source, geo, n_lead, base)}


def _coherence_verdict(res, base, geo, n_lead, r) -> list[dict]:
    rows = []
    for gi, g in enumerate(r.g):
        row: dict[str, Any] = {"g": g}
        for key, label in (("mean_free", "mean_free_fraction"), ("low_freq", "low_freq_fraction")):
            lead = res[f"lead_{key}"][gi]
            trail = res[f"trail_{key}"][gi]
            b = (base or {}).get(label, {})
            row[f"lead {key} (median over blocks)"] = float(np.nanmedian(lead)) if np.isfinite(lead).any() else math.nan
            row[f"trail {key} (median over blocks)"] = float(np.nanmedian(trail)) if np.isfinite(trail).any() else math.nan
            row[f"random {key} mean"] = b.get("mean", math.nan)
            lo, hi = b.get("q025", math.nan), b.get("q975", math.nan)
            row[f"random {key} 95%"] = [lo, hi]
            fin = np.isfinite(lead)
            # more coherent than random: mean-free fraction below, low-frequency share above the random 95% range
            beyond = (lead < lo) if key == "mean_free" else (lead > hi)
            row[f"blocks with lead {key} beyond random"] = f"{int((beyond & fin).sum())}/{int(fin.sum())}"
        rows.append(row)
    return rows


def _notes(r: Protocol2Request, source: str, geo, n_lead, base) -> list[str]:
    notes = [
        f"Replica pairs coupled at constant g for all {r.steps} DDIM steps (eta {r.eta:g}, guidance {r.guidance:g}), "
        f"kappa {r.kappa:.4g}, {r.pairs} pairs (seeds {r.first_seed}-{r.first_seed + r.pairs - 1}, classes "
        f"{sorted(set(r.pair_labels))}); hook {r.hook}; modes fitted per block at step 0 from the {r.pairs} pair "
        f"differences (uncentred second moment{'; centred' if r.centre else ''}).",
        f"Energies read at {source}. Bands: lead {r.lead!r}, trail {r.trail!r} of the kept modes (descending eigenvalue).",
        "E_lead, E_trail: mean over pairs of the per-pair band energies; spread = standard deviation over pairs. "
        f"R = E_trail/E_lead: 95% percentile interval over {r.bootstrap} bootstrap resamples of the pairs (seed "
        f"{r.bootstrap_seed}, mode basis fixed).",
    ]
    if base is not None and geo[0]:
        N, d, n_low, side = geo
        notes.append(
            f"Coherence: mean-free fraction ||P_perp v||/||v|| over the N = {N} tokens, low-frequency share = energy in "
            f"the {n_low} DCT frequencies of the {side}x{side} grid within radius "
            f"{r.low_freq_radius or default_low_freq_radius(side):g}. A Gaussian random vector of the same shape has "
            f"mean-free fraction {base['mean_free_fraction']['single_mean']:.4f} and low-frequency share "
            f"{base['low_freq_fraction']['single_mean']:.4f} on average; the mean over {n_lead} independent ones falls in "
            f"[{base['mean_free_fraction']['q025']:.4f}, {base['mean_free_fraction']['q975']:.4f}] and "
            f"[{base['low_freq_fraction']['q025']:.4f}, {base['low_freq_fraction']['q975']:.4f}] with 95% probability. "
            "Leading modes below / above those ranges are more coherent than random: the paper's low-frequency premise.")
    else:
        notes.append(f"Coherence not measured: the hook {r.hook} has no token axis.")
    return notes


def _replace_array(store: ResultsStore, name: str, dims, values, dtype="float64", attrs=None) -> None:
    if name in store.group:
        del store.group[name]
    values = np.asarray(values)
    store.array(name, dims, values.shape, dtype=dtype, attrs=attrs,
                fill=np.nan if np.dtype(dtype).kind == "f" else 0)
    store.write(name, ..., values.astype(dtype))


def table_rows(summary: dict) -> list[dict]:
    """One row per (g, block): the numbers of the paper's Figures 1/9/10 at t_spec(g)."""
    rows = []
    pl = summary["per_layer"]
    for gi, g in enumerate(summary["g"]):
        for li, layer in enumerate(summary["layers"]):
            rows.append({"g": g, "block": layer, "step": summary["at_step"][gi],
                         "E_lead": pl["E_lead"][gi, li], "E_lead sd": pl["E_lead_std"][gi, li],
                         "E_trail": pl["E_trail"][gi, li], "E_trail sd": pl["E_trail_std"][gi, li],
                         "R": pl["R"][gi, li], "R 95% low": pl["R_ci_low"][gi, li], "R 95% high": pl["R_ci_high"][gi, li],
                         "lead mean-free": pl["lead_mean_free"][gi, li], "lead low-freq": pl["lead_low_freq"][gi, li],
                         "modes": int(summary["n_modes"][gi, li])})
    return rows


def write_summary(store: ResultsStore, summary: dict, figures: bool = True) -> None:
    """Root arrays (dims named), figures under STORE/figures/ (unless ``figures`` is off) and the
    summary convention in attrs."""
    from . import protocol2_plots as plots

    _replace_array(store, "layer", ("layer",), summary["layers"], dtype="int64")
    _replace_array(store, "step", ("step",), np.arange(len(summary["timesteps"])), dtype="int64")
    _replace_array(store, "timestep", ("step",), summary["timesteps"], dtype="int64")
    _replace_array(store, "at_step", ("g",), summary["at_step"], dtype="int64",
                   attrs={"description": "sampling step at which the energies are read (t_spec(g) or --at-step)"})
    _replace_array(store, "t_spec", ("g",), summary["t_spec"],
                   attrs={"description": "Protocol I t_spec(g) in its steps (NaN: --at-step)"})
    _replace_array(store, "n_modes", ("g", "layer"), summary["n_modes"], dtype="int64")
    docs = {"E_lead": "mean over pairs of the leading-band energy at at_step [78]",
            "E_trail": "mean over pairs of the trailing-band energy at at_step [79]",
            "E_lead_std": "standard deviation over pairs of the per-pair leading-band energy",
            "E_trail_std": "standard deviation over pairs of the per-pair trailing-band energy",
            "R": "E_trail / E_lead at at_step [80]", "R_ci_low": "bootstrap 2.5% quantile of R (pairs resampled)",
            "R_ci_high": "bootstrap 97.5% quantile of R", "R_boot_std": "bootstrap standard deviation of R",
            "lead_mean_free": "mean over the leading band of ||P_perp v_k||/||v_k||",
            "trail_mean_free": "mean over the trailing band of ||P_perp v_k||/||v_k||",
            "lead_low_freq": "mean over the leading band of the low-frequency energy share",
            "trail_low_freq": "mean over the trailing band of the low-frequency energy share"}
    for k, v in summary["per_layer"].items():
        _replace_array(store, k, ("g", "layer"), v, attrs={"description": docs[k]})
    for k, v in summary["per_step"].items():
        _replace_array(store, f"{k}_by_step", ("g", "step", "layer"), v,
                       attrs={"description": f"{k} at every step (bands of the request)"})
    figures = plots.write_figures(store.path, summary) if figures else []
    rows = table_rows(summary)
    meta_summary = {
        "tables": [
            {"title": "Protocol II: mode energies and gap ratio R = E_trail/E_lead per block at t_spec(g)",
             "rows": rows},
            {"title": "Spatial coherence of the leading difference modes against Gaussian random vectors",
             "rows": summary["coherence"]},
        ],
        "figures": figures, "notes": summary["notes"],
    }
    store.update_meta(summary=meta_summary, at_step=summary["at_step"], t_spec=summary["t_spec"],
                      random_baseline=summary["random"])


def load_summary(store_path: str | Path) -> dict:
    """The stored summary of a complete protocol2 store (as written by :func:`write_summary`)."""
    store = ResultsStore.open(store_path, KIND)
    meta = store.meta
    if "summary" not in meta:
        c = meta.get("cells", {})
        raise StoreError(f"{store_path} has no summary yet ({meta.get('status')}; {c.get('done')} of {c.get('total')} "
                         "couplings): finish it with `dithooks protocol2 --out STORE --resume`")
    return meta

