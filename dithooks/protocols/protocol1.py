"""Protocol I (paper §3.1, THEORY §6): when do replica pairs commit, and coarse before fine?

For each coupling strength g and intervention step s*, M seed pairs are sampled as replica pairs
(antisymmetric start with separation κ [67]) coupled with strength g for the first s* reverse
steps and independent after (DDIM, η = 1 and 100 steps by default, as in the paper). For each
pair, from the two decoded final images:

- semantic agreement [70]: cosine similarity of encoder features (:mod:`.encoders`);
- ``D_coarse``, ``D_fine`` [71-72] (:mod:`.pixels`), each divided by the same pair's value at the
  independent baseline s* = 0.

A sigmoid is fitted to the median curve over pairs **as a function of s* in steps** (:mod:`.fits`);
its midpoint is t_spec (agreement), s_coarse, s_fine; Δ_out = s_fine - s_coarse [73]. 95 %
bootstrap intervals resample the pairs (one fixed-seed set of resamples shared by every curve).
The g = 0 control shares the sampler noise of the pair until s* and is otherwise uncoupled.

Work is cut into cells (g, s*) (and (control, s*)), each written to the store with a completion
flag, so an interrupted run resumes. Three shortcuts, all exact: the cells with s* = 0 and every
cell with g = 0 are the same independent run (no coupling ever acts), computed once; and for one
g, the coupled prefix is sampled once with a snapshot at each s*, and each cell continues from its
snapshot (bit-for-bit what a run with ``couple_until = s*`` from the start gives; tested).
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from ..errors import DithooksError, StoreError
from ..lists import parse_int_list
from .fits import MIN_RANGE, fit_curves
from ..store.metadata import now
from .pairs import PairedRequest, parse_couplings
from .store import ResultsStore

KIND = "protocol1"
#: The couplings of the paper's Table 1.
PAPER_G = (0.1, 0.3, 0.5, 0.7, 0.9, 1.0)
QUANTITIES = ("agreement", "d_coarse", "d_fine")
FIT_QUANTITIES = QUANTITIES + ("gap",)
FIT_FIELDS = ("midpoint", "ci_low", "ci_high", "midpoint_timestep", "width", "start", "end", "rmse")
#: Request fields that must match for --resume (the rest only affect the fits and may change).
IDENTITY_KEYS = ("model", "g", "s_star", "pairs", "first_seed", "labels", "steps", "eta", "guidance", "kappa",
                 "control", "encoder", "coarse_size", "images")


class Protocol1Interrupted(DithooksError):
    """Raised when a run is interrupted; the message says what the store holds."""


# -- the request --------------------------------------------------------------------------------
def parse_g_grid(text: str | Sequence[float]) -> tuple[float, ...]:
    """``"0,0.1,0.3"`` -> (0.0, 0.1, 0.3): distinct couplings in [0, 1], sorted."""
    return parse_couplings(text, "coupling grid", "0,0.1,0.3", at_most=1.0, as_set=True)


def parse_s_star(text: str | Sequence[int], steps: int) -> tuple[int, ...]:
    """The s* grid: ``"0,5,10"`` (a list), ``"0:100:10"`` (start:stop:step, stop included) or
    ``"11"`` (that many values evenly spaced over 0..steps). 0 (the independent baseline every
    discrepancy is normalised by) is always included."""
    if isinstance(text, str):
        t = text.strip()
        try:
            if ":" in t:
                parts = [int(p) for p in t.split(":")]
                if len(parts) not in (2, 3) or (len(parts) == 3 and parts[2] <= 0):
                    raise ValueError
                a, b = parts[0], parts[1]
                step = parts[2] if len(parts) == 3 else 1
                vals = list(range(a, b + 1, step))
            elif "," in t:
                vals = parse_int_list(t, "s* grid", example="a list 0,5,10, a range 0:100:10 or a count 11")
            else:
                n = int(t)
                if n < 2:
                    raise DithooksError(f"an s* count needs at least 2 values, got {n}")
                vals = sorted({int(round(v)) for v in np.linspace(0, steps, n)})
        except ValueError:
            raise DithooksError(f"malformed s* grid {text!r}: use a list 0,5,10, a range 0:100:10 "
                                "or a count 11") from None
    else:
        vals = [int(v) for v in text]
    bad = [v for v in vals if not 0 <= v <= steps]
    if bad:
        raise DithooksError(f"s* = {bad[0]} is outside 0-{steps} (the number of sampling steps)")
    vals = sorted(set(vals) | {0})
    if len(vals) < 2:
        raise DithooksError("the s* grid needs at least one value besides 0")
    return tuple(vals)


@dataclass(frozen=True)
class Protocol1Request(PairedRequest):
    """What to run. ``s_star`` and ``g`` are grids (see the parsers); ``labels`` one class for all
    pairs or one per pair; pair m uses seed ``first_seed + m``. ``encoder``/``coarse_size`` None
    mean: chosen from the model's image size (``auto``; :func:`.pixels.default_coarse_size`)."""

    model: str | None = None
    g: tuple[float, ...] = PAPER_G
    s_star: tuple[int, ...] | str | None = None  # None: 11 values evenly spaced over 0..steps
    pairs: int = 8
    first_seed: int = 0
    labels: tuple[int, ...] = (0,)
    steps: int = 100
    eta: float = 1.0
    guidance: float = 1.0
    kappa: float = 2 ** -0.5
    control: bool = True
    encoder: str = "auto"
    encoder_weights: str | None = None
    coarse_size: int | None = None
    images: bool = True
    bootstrap: int = 1000
    bootstrap_seed: int = 0
    min_range: float = MIN_RANGE

    def __post_init__(self):
        from ..sampling import ReplicaSpec, SamplerSpec

        SamplerSpec("ddim", self.steps, self.eta, self.guidance)  # validates steps, eta
        ReplicaSpec(kappa=self.kappa)
        object.__setattr__(self, "g", parse_g_grid(self.g))
        object.__setattr__(self, "s_star", parse_s_star("11" if self.s_star is None else self.s_star, self.steps))
        object.__setattr__(self, "labels", tuple(int(v) for v in self.labels))
        if self.pairs < 1:
            raise DithooksError(f"need at least 1 pair, got {self.pairs}")
        if len(self.labels) not in (1, self.pairs):
            raise DithooksError(f"{len(self.labels)} classes for {self.pairs} pairs: give one class, or one per pair")
        if self.bootstrap < 0:
            raise DithooksError(f"--bootstrap must be >= 0, got {self.bootstrap}")
        if self.coarse_size is not None and self.coarse_size < 1:
            raise DithooksError(f"coarse size must be at least 1, got {self.coarse_size}")

    TUPLE_FIELDS = ("g", "s_star", "labels")

    @classmethod
    def from_dict(cls, d: dict) -> "Protocol1Request":
        known = cls.known_fields(d)
        if known.get("min_range") is None:
            known.pop("min_range", None)
        return cls(**known)


def merge_resume_request(stored: dict, given: dict[str, Any]) -> Protocol1Request:
    """The stored request, with the options given now (not None) checked against it.

    Identity options (what was sampled and measured) must agree; the fit options (bootstrap,
    bootstrap_seed, min_range) may change and then refit the stored data.
    """
    base = Protocol1Request.from_dict(stored)
    changes = {}
    for k, v in given.items():
        if v is None:
            continue
        if k in ("g", "s_star"):
            v = parse_g_grid(v) if k == "g" else parse_s_star(v, base.steps if given.get("steps") is None else given["steps"])
        elif k == "labels":
            v = tuple(v)
        if k in IDENTITY_KEYS and getattr(base, k) != v:
            raise StoreError(f"cannot resume: the store's {k} is {getattr(base, k)!r}, this run asks {v!r} "
                             "(leave the option out to keep the stored value, or use --overwrite)")
        changes[k] = v
    return replace(base, **{k: v for k, v in changes.items() if k not in IDENTITY_KEYS})


# -- small helpers --------------------------------------------------------------------------------
def same_stream(seed_a: int, seed_b: int) -> bool:
    """Whether two seeds give torch CPU generators the same stream (it keeps 32 bits of a seed)."""
    a = torch.randn(4, generator=torch.Generator().manual_seed(int(seed_a)))
    b = torch.randn(4, generator=torch.Generator().manual_seed(int(seed_b)))
    return bool(torch.equal(a, b))


def independent_seed(seed: int) -> int:
    """A 32-bit seed for replica b's sampler noise, derived from the pair's seed by numpy's
    SeedSequence (so it does not replay any small seed's stream)."""
    return int(np.random.SeedSequence([int(seed) % 2**63, 0xB]).generate_state(1)[0])


def timestep_at(s: float, timesteps: Sequence[int]) -> float:
    """Timestep where the coupling stops after s steps (interpolated for fractional s; 0 at s = T)."""
    if not math.isfinite(s):
        return math.nan
    ts = list(timesteps) + [0]
    return float(np.interp(s, np.arange(len(ts)), ts))


def _key(g: float) -> str:
    return f"{g:g}"


@dataclass
class _Plan:
    baseline: bool = False
    coupled: dict[float, list[int]] = field(default_factory=dict)  # g -> s* still to run (s* > 0)
    control: list[int] = field(default_factory=list)

    def steps(self, T: int) -> tuple[int, int]:
        """(uncoupled, coupled) model steps this plan runs."""
        unc = T if self.baseline else 0
        cpl = 0
        for ss in self.coupled.values():
            cpl += max(ss)
            unc += sum(T - s for s in ss)
        if self.control:
            unc += max(self.control) + sum(T - s for s in self.control)
        return unc, cpl

    @property
    def cells(self) -> int:
        return int(self.baseline) + sum(len(v) for v in self.coupled.values()) + len(self.control)


# -- the run --------------------------------------------------------------------------------------
class Protocol1:
    """One Protocol I store: create (or reopen with ``mode="resume"``), run the missing cells, fit.

    ``log`` gets one-line messages (the plan, the time estimate); ``bar`` (of :meth:`run`) an
    object with ``update(n)`` (a tqdm bar) that sees every model step, or a factory ``bar(total)``
    called once the number of steps is known.
    """

    def __init__(self, request: Protocol1Request | None, out: str | Path, *, mode: str = "create", loaded=None,
                 device: str = "cpu", log: Callable[[str], None] | None = None):
        if mode not in ("create", "overwrite", "resume"):
            raise ValueError(f"mode {mode!r}")
        self.out = Path(out)
        self.mode = mode
        self.device = torch.device(device)
        self.log = log or (lambda msg: None)
        if mode != "resume":  # before loading anything: an existing store is refused at once
            ResultsStore.check_can_create(self.out, KIND, overwrite=mode == "overwrite")
        if mode == "resume" and request is None:  # continue exactly what the store asked for
            request = Protocol1Request.from_dict(ResultsStore.open(self.out, KIND).meta["request"])
        if request is None:
            raise ValueError("a request is needed unless resuming")
        from ..hooks import HookManager
        from ..loading import load_model

        self.loaded = loaded if loaded is not None else load_model(request.model, device=str(self.device))
        self.loaded.adapter.require_class_conditional("protocol1")
        geo = self.loaded.adapter.geometry
        if geo.num_classes is not None:
            bad = [y for y in request.labels if not 0 <= y < geo.num_classes]
            if bad:
                raise DithooksError(f"class {bad[0]} is out of range: this model has classes 0-{geo.num_classes - 1}")
        if request.guidance != 1.0 and geo.num_classes is None:
            raise DithooksError("guidance needs a class-conditional model")
        self.image_shape = tuple(self._decode(torch.zeros(1, geo.in_channels, geo.sample_size, geo.sample_size,
                                                          device=self.device)).shape[1:])
        from .encoders import make_encoder, resolve_encoder_name
        from .pixels import check_coarse_size, default_coarse_size

        enc_name = resolve_encoder_name(request.encoder, self.image_shape)
        size = request.coarse_size or default_coarse_size(min(self.image_shape[-2:]))
        check_coarse_size(size, *self.image_shape[-2:])
        self.request = replace(request, encoder=enc_name, coarse_size=size)
        self.encoder = make_encoder(enc_name, image_shape=self.image_shape, device=self.device,
                                    weights=request.encoder_weights)
        self.hm = HookManager(self.loaded.transformer, self.loaded.adapter)
        # replica coupling needs attention processors: a one-line DithooksError when absent
        self.attention = self.hm.extension("attention", required=True)
        self.timesteps = self._sampler(None).timesteps
        self.start, self.b_noise = self.initial_state()
        self.store = self._open_store()

    # -- store ---------------------------------------------------------------------------------
    def _open_store(self) -> ResultsStore:
        r = self.request
        if self.mode == "resume":
            store = ResultsStore.open(self.out, KIND, mode="r+")
            stored = Protocol1Request.from_dict(store.meta["request"])
            for k in IDENTITY_KEYS:  # encoder / coarse size resolved the same way?
                if getattr(stored, k) != getattr(r, k):
                    raise StoreError(f"cannot resume {self.out}: its {k} is {getattr(stored, k)!r}, "
                                     f"this run resolves to {getattr(r, k)!r}")
            if store.meta.get("b_noise_seeds", "library") != self.b_noise:
                raise StoreError(f"cannot resume {self.out}: replica b's noise was seeded by "
                                 f"{store.meta.get('b_noise_seeds', 'library')!r} there and would be by "
                                 f"{self.b_noise!r} now (dithooks.sampling.replica_seed changed): use --overwrite")
            store.update_meta(request=r.as_dict(), status="running", finished=None,
                              runs=list(store.meta.get("runs", [])) + [now()])
            return store
        store = ResultsStore.create(self.out, KIND, r.as_dict(), overwrite=self.mode == "overwrite")
        G, S, M = len(r.g), len(r.s_star), r.pairs
        C, H, W = self.image_shape
        store.update_meta(model_id=self.loaded.model_id, model_source=self.loaded.source,
                          timesteps=list(self.timesteps), image_shape=list(self.image_shape),
                          fit_variable="s_star (steps coupled before the switch to independent sampling)",
                          encoder=getattr(self.encoder, "name", r.encoder), b_noise_seeds=self.b_noise)
        store.coord("g", np.asarray(r.g, dtype="float64"), ("g",))
        store.coord("s_star", np.asarray(r.s_star, dtype="int64"), ("s_star",))
        store.coord("timestep", np.asarray([timestep_at(s, self.timesteps) for s in r.s_star]), ("s_star",))
        store.coord("s_frac", np.asarray(r.s_star, dtype="float64") / r.steps, ("s_star",))
        store.coord("pair", np.arange(M, dtype="int64"), ("pair",))
        store.coord("seed", np.asarray(r.seeds, dtype="int64"), ("pair",))
        store.coord("label", np.asarray(r.pair_labels, dtype="int64"), ("pair",))
        store.coord("quantity", np.asarray(FIT_QUANTITIES), ("quantity",))
        store.coord("replica", np.asarray(["a", "b"]), ("replica",))
        desc = {"agreement": "cosine similarity of encoder features of the pair's final images [70]",
                "d_coarse": "||U P x^a - U P x^b|| of the final images [71]",
                "d_fine": "||(x^a - U P x^a) - (x^b - U P x^b)|| [72]",
                "d_coarse_norm": "d_coarse / the same pair's d_coarse at s* = 0",
                "d_fine_norm": "d_fine / the same pair's d_fine at s* = 0"}
        for prefix, dims, shape in (("", ("g", "s_star", "pair"), (G, S, M)), ("control_", ("s_star", "pair"), (S, M))):
            if prefix and not r.control:
                continue
            for q, d in desc.items():
                store.array(prefix + q, dims, shape, attrs={"description": d})
            flag_dims = dims[:-1]
            store.array(prefix + "done" if prefix else "cell_done", flag_dims, shape[:-1], dtype="bool", fill=False,
                        chunks=(1,) * len(flag_dims))
            if r.images:
                img_dims = dims[:-1] + ("replica", "pair", "channel", "y", "x")
                img_shape = shape[:-1] + (2, M, C, H, W)
                store.array(prefix + "images", img_dims, img_shape, dtype="float16",
                            chunks=(1,) * len(flag_dims) + (2, M, C, H, W),
                            attrs={"description": "decoded final images in [0, 1]"})
            fdims = ("g", "quantity") if not prefix else ("quantity",)
            fshape = (G, len(FIT_QUANTITIES)) if not prefix else (len(FIT_QUANTITIES),)
            for f in FIT_FIELDS:
                store.array(f"{prefix}fit_{f}", fdims, fshape, dtype="float64",
                            attrs={"description": f"sigmoid fit of the median curve over pairs vs s*: {f}"})
        store.update_meta(cells=self._cell_status(store))
        return store

    def _done(self, store: ResultsStore | None = None) -> tuple[np.ndarray, np.ndarray | None]:
        store = store or self.store
        cells = store.read("cell_done")
        ctrl = store.read("control_done") if self.request.control else None
        return cells, ctrl

    def _cell_status(self, store: ResultsStore | None = None) -> dict:
        cells, ctrl = self._done(store)
        r = self.request
        done = int(cells.sum()) + (int(ctrl.sum()) if ctrl is not None else 0)
        total = cells.size + (ctrl.size if ctrl is not None else 0)
        by_g = {_key(g): [s for s, ok in zip(r.s_star, cells[i]) if ok] for i, g in enumerate(r.g)}
        out = {"done": done, "total": int(total), "complete_s_star_by_g": by_g}
        if ctrl is not None:
            out["complete_s_star_control"] = [s for s, ok in zip(r.s_star, ctrl) if ok]
        return out

    def plan(self) -> _Plan:
        """What is still to run."""
        r = self.request
        cells, ctrl = self._done()
        p = _Plan()
        need_base = [not cells[i, 0] for i in range(len(r.g))]
        need_base += [not cells[i].all() for i, g in enumerate(r.g) if g == 0.0]
        if ctrl is not None:
            need_base.append(not ctrl[0])
        p.baseline = any(need_base)
        for i, g in enumerate(r.g):
            if g == 0.0:
                continue
            todo = [s for j, s in enumerate(r.s_star) if s > 0 and not cells[i, j]]
            if todo:
                p.coupled[g] = todo
        if ctrl is not None:
            p.control = [s for j, s in enumerate(r.s_star) if s > 0 and not ctrl[j]]
        return p

    # -- sampling ------------------------------------------------------------------------------
    def _sampler(self, replicas):
        from ..sampling import ReplicaSpec, Sampler, SamplerSpec

        r = self.request
        return Sampler(self.loaded, SamplerSpec("ddim", r.steps, r.eta, r.guidance), self.hm, device=self.device,
                       replicas=replicas or ReplicaSpec(kappa=r.kappa))

    def _replicas(self, g: float = 0.0, couple_until=None, share_noise_until=None):
        from ..sampling import ReplicaSpec

        return ReplicaSpec(kappa=self.request.kappa, g=g, couple_until=couple_until,
                           share_noise_until=share_noise_until)

    def initial_state(self):
        """The pairs' start (:func:`dithooks.sampling.initial_replica_state`) and where replica b's
        sampler noise comes from.

        torch's CPU generator keeps only the low 32 bits of a seed, so when the library's
        ``replica_seed(seed)`` equals ``seed`` modulo 2**32, b's "own" generator would replay a's
        stream (the one that drew the start): b's noise would lag a's by two draws, and after the
        shared-noise control it would re-inject the start's z. Then b's generator is seeded with
        :func:`independent_seed` instead. Returns ``(state, "library" | "protocol1")``.
        """
        from ..sampling import TrajectoryState, initial_replica_state, replica_seed

        r = self.request
        sigma = float(self._sampler(None).scheduler.init_noise_sigma)
        st = initial_replica_state(self.loaded, r.seeds, self._replicas(), sigma)
        states, source = list(st.rng_states), "library"
        for m, seed in enumerate(r.seeds):
            if same_stream(seed, replica_seed(seed)):
                states[r.pairs + m] = torch.Generator().manual_seed(independent_seed(seed)).get_state()
                source = "protocol1"
        return TrajectoryState(0, st.latents, states), source

    def _run(self, replicas, state=None, on_step=None) -> torch.Tensor:
        r = self.request
        return self._sampler(replicas).run(r.pair_labels, r.seeds, state=state if state is not None else self.start, on_step=on_step,
                                           progress=self._progress).cpu()

    def _progress(self, it):
        for s in it:
            yield s
            if self.bar is not None:
                self.bar.update(1)

    def time_one_step(self) -> tuple[float, float]:
        """Seconds per model step (uncoupled, coupled at the largest g) at this batch size, measured
        on the last step of the schedule (one warm-up step first)."""
        from ..sampling import TrajectoryState

        r = self.request
        last = TrajectoryState(r.steps - 1, self.start.latents, self.start.rng_states)
        out = []
        for g in (0.0, 0.0, max(r.g)):
            t0 = time.perf_counter()
            self._sampler(self._replicas(g)).run(r.pair_labels, r.seeds, state=last)
            out.append(time.perf_counter() - t0)
        return out[1], out[2]

    def _decode(self, latents: torch.Tensor, chunk: int = 8) -> torch.Tensor:
        dev = next(self.loaded.transformer.parameters()).device
        parts = [self.loaded.decode(latents[i:i + chunk].to(dev)).float().cpu() for i in range(0, len(latents), chunk)]
        return torch.cat(parts)

    def measure(self, latents: torch.Tensor) -> dict[str, torch.Tensor]:
        """Final latents ``[a; b]`` of M pairs -> images and per-pair agreement, D_coarse, D_fine."""
        from .encoders import cosine_agreement
        from .pixels import coarse_fine

        imgs = self._decode(latents)
        M = self.request.pairs
        a, b = imgs[:M], imgs[M:]
        with torch.no_grad():
            fa, fb = self.encoder.features(a).float().cpu(), self.encoder.features(b).float().cpu()
        dc, df = coarse_fine(a, b, self.request.coarse_size)
        return {"images": imgs, "agreement": cosine_agreement(fa, fb), "d_coarse": dc, "d_fine": df}

    def _write(self, prefix: str, index: tuple, m: dict[str, torch.Tensor]) -> None:
        M = self.request.pairs
        for q in QUANTITIES:
            self.store.write(prefix + q, index, m[q].numpy().astype("float32"))
        if self.request.images:
            img = m["images"].reshape(2, M, *m["images"].shape[1:]).numpy().astype("float16")
            self.store.write(prefix + "images", index, img)
        flag = "control_done" if prefix else "cell_done"
        self.store.write(flag, index, True)

    def _cell_written(self) -> None:
        self.store.update_meta(cells=self._cell_status())

    def run(self, bar=None, estimate: bool = True, plots: bool = True) -> dict:
        """Run what is missing, then fit and summarise (and draw the figures unless ``plots`` is
        False); returns the summary."""
        r, T = self.request, self.request.steps
        self.bar = bar
        t_start = time.perf_counter()
        plan = self.plan()
        unc, cpl = plan.steps(T)
        if plan.cells:
            msg = (f"protocol1: {plan.cells} runs to do ({unc + cpl} model steps, {cpl} of them coupled) "
                   f"on {r.pairs} pairs (batch {2 * r.pairs}{' x2 cfg' if r.guidance != 1.0 else ''})")
            if estimate:
                tu, tc = self.time_one_step()
                msg += f"; about {_duration(unc * tu + cpl * tc)} ({tu * 1e3:.0f} ms/step uncoupled, {tc * 1e3:.0f} coupled)"
            self.log(msg)
        if callable(bar) and not hasattr(bar, "update"):  # a factory: bar(total)
            bar = bar(unc + cpl) if plan.cells else None
        elif bar is not None and hasattr(bar, "total"):
            bar.total = unc + cpl
            if hasattr(bar, "refresh"):
                bar.refresh()
        self.bar = bar
        try:
            try:
                self._run_plan(plan)
            finally:
                if bar is not None and hasattr(bar, "close"):
                    bar.close()
        except KeyboardInterrupt:
            self.store.update_meta(cells=self._cell_status())
            self.store.finish("interrupted")
            c = self._cell_status()
            raise Protocol1Interrupted(
                f"interrupted: {self.out} holds {c['done']} of {c['total']} cells; continue with "
                f"`dithooks protocol1 --out {self.out} --resume`") from None
        except BaseException as e:
            self.store.update_meta(cells=self._cell_status(), error=str(e).splitlines()[0][:300] if str(e) else type(e).__name__)
            self.store.finish("failed")
            raise
        t_sampled = time.perf_counter()
        if plan.cells:
            self.log(f"fitting ({r.bootstrap} bootstrap resamples){' and drawing figures' if plots else ''}")
        return self.finalize(plots=plots, sampling_seconds=t_sampled - t_start)

    def _run_plan(self, plan: _Plan) -> None:
        r = self.request
        S = list(r.s_star)
        if plan.baseline:
            m = self.measure(self._run(self._replicas(0.0)))
            cells, ctrl = self._done()
            for i, g in enumerate(r.g):
                for j, s in enumerate(S):
                    if (s == 0 or g == 0.0) and not cells[i, j]:
                        self._write("", (i, j), m)
            if ctrl is not None and not ctrl[0]:
                self._write("control_", (0,), m)
            self._cell_written()
        for g, todo in plan.coupled.items():
            i = r.g.index(g)
            self._prefix_and_cells(todo, self._replicas(g, couple_until=max(todo)),
                                   lambda s: self._replicas(g, couple_until=s), "", lambda j: (i, j))
        if plan.control:
            self._prefix_and_cells(plan.control, self._replicas(0.0, share_noise_until=max(plan.control)),
                                   lambda s: self._replicas(0.0, share_noise_until=s), "control_", lambda j: (j,))

    def _prefix_and_cells(self, todo, prefix_spec, cell_spec, prefix, index) -> None:
        """Sample the shared prefix once (snapshots at each s* in ``todo``), then each cell's rest."""
        T = self.request.steps
        top = max(todo)
        snaps = {}

        def keep(s, state):
            if state.step in todo:
                snaps[state.step] = state

        # only the steps before the largest s* are shared: run them, then stop
        self._run_prefix(self._sampler(prefix_spec), top, keep)
        j_of = {s: j for j, s in enumerate(self.request.s_star)}
        for s in sorted(todo, reverse=True):  # s* = T first: its cell is the prefix itself
            st = snaps[s]
            final = st.latents if s == T else self._run(cell_spec(s), state=st)
            self._write(prefix, index(j_of[s]), self.measure(final))
            self._cell_written()

    def _run_prefix(self, sampler, until: int, keep) -> None:
        """Steps 0..until-1 of ``sampler`` (a truncated copy of its schedule), snapshots via ``keep``."""
        r = self.request

        class _Stop(Exception):
            pass

        def on_step(s, state):
            keep(s, state)
            if state.step >= until:
                raise _Stop

        try:
            sampler.run(r.pair_labels, r.seeds, state=self.start, on_step=on_step, progress=self._progress)
        except _Stop:  # the last step ran but its progress update was skipped
            if self.bar is not None:
                self.bar.update(1)
        finally:
            self.attention.set_coupling(None)

    # -- fits and summary ---------------------------------------------------------------------
    def finalize(self, plots: bool = True, sampling_seconds: float | None = None) -> dict:
        """Normalise the discrepancies, fit every curve, write fits, figures and the summary."""
        t0 = time.perf_counter()
        summary = compute_summary(self.store, self.request, self.timesteps)
        if self.b_noise == "protocol1":
            summary["notes"].append("replica b's sampler noise is seeded by protocol1.independent_seed: the library's "
                                    "replica_seed(seed) = seed + 2**40 replays seed's stream in torch (32-bit seeds).")
        write_fits(self.store, summary)
        figures = []
        if plots:
            try:
                from .plots import protocol1_figures

                figures = protocol1_figures(self.store.path, summary)
            except ImportError as e:  # matplotlib missing: the numbers stand without figures
                summary["notes"].append(f"no figures: {e}")
        self.store.update_meta(
            cells=self._cell_status(), fits=summary["fits"],
            summary={"tables": [{"title": TABLE_TITLE, "rows": display_rows(summary)}],
                     "figures": figures, "notes": summary["notes"]})
        timings = dict(self.store.meta.get("timings") or {})
        key = f"run {len(self.store.meta.get('runs', []))}"
        if sampling_seconds is not None:
            timings[key + ": sampling"] = round(sampling_seconds, 2)
        timings[key + ": fits and figures"] = round(time.perf_counter() - t0, 2)
        self.store.update_meta(timings=timings)
        self.store.finish("complete")
        summary["figures"] = figures
        return summary


# -- analysis (works on any complete protocol1 store) ----------------------------------------------
TABLE_TITLE = "Protocol I (paper Table 1): speciation time t_spec and output gap per coupling g"


def _normalised(d: np.ndarray) -> np.ndarray:
    """Divide by the s* = 0 column (axis -2) pair by pair; a zero baseline gives NaN."""
    base = d[..., :1, :]
    with np.errstate(divide="ignore", invalid="ignore"):
        out = d / base
    return np.where(base > 0, out, np.nan)


def compute_summary(store: ResultsStore, request: Protocol1Request, timesteps: Sequence[int]) -> dict:
    """Fits and table numbers from the stored per-pair values (also writes the *_norm arrays)."""
    r = request
    x = np.asarray(r.s_star, dtype=float)
    curves: dict[str, dict[str, np.ndarray]] = {}
    for i, g in enumerate(r.g):
        curves[_key(g)] = {q: store.read(q)[i].T for q in QUANTITIES}  # (pair, s_star)
    if r.control:
        curves["control"] = {q: store.read("control_" + q).T for q in QUANTITIES}
    for prefix in ("", "control_") if r.control else ("",):
        for q in ("d_coarse", "d_fine"):
            store.write(prefix + q + "_norm", ..., _normalised(store.read(prefix + q)).astype("float32"))
    fits: dict[str, dict] = {}
    for name, c in curves.items():
        norm = {"agreement": c["agreement"], "d_coarse": _normalised(c["d_coarse"].T).T,
                "d_fine": _normalised(c["d_fine"].T).T}
        res = fit_curves(x, norm, n_boot=r.bootstrap, seed=r.bootstrap_seed, min_range=r.min_range,
                         differences={"gap": ("d_fine", "d_coarse")})
        entry = {}
        for q, v in res.items():
            f = v["fit"]
            entry[q] = {"midpoint": v["value"], "ci_low": v["ci"].low, "ci_high": v["ci"].high,
                        "midpoint_timestep": timestep_at(v["value"], timesteps) if q != "gap" else math.nan,
                        "width": f.width if f else math.nan, "start": f.start if f else math.nan,
                        "end": f.end if f else math.nan, "rmse": f.rmse if f else math.nan,
                        "reason": v["reason"], "ci_reason": v["ci"].reason, "bootstrap_ok": v["ci"].n_ok,
                        "bootstrap": v["ci"].n_boot, "noise": v["noise"],
                        "median": None if v["median"] is None else [float(m) for m in v["median"]]}
        fits[name] = entry
    notes = [
        f"Fits are to the median over {r.pairs} pairs as a function of s* in sampling steps (of {r.steps}; "
        "timestep = the schedule's timestep at which coupling stops); the midpoint is half-way between "
        "the fitted plateaus.",
        f"95% CIs: {r.bootstrap} bootstrap resamples of the pairs (RNG seed {r.bootstrap_seed}), "
        "one set shared by all curves (so the gap gets a paired interval).",
        f"Discrepancies on decoded images, coarse = adaptive average pool to {r.coarse_size}x{r.coarse_size} "
        "then bilinear upsample; each pair's value divided by its value at s* = 0.",
        f"Semantic agreement: cosine similarity of {r.encoder} encoder features.",
        f"DDIM eta {r.eta:g}, {r.steps} steps, guidance {r.guidance:g}, kappa {r.kappa:.4g}, "
        f"classes {sorted(set(r.pair_labels))}, seeds {r.first_seed}-{r.first_seed + r.pairs - 1}.",
    ]
    if 0.0 in r.g:
        notes.append("g = 0 rows are the independent baseline at every s* (no coupling acts), so their curves are flat.")
    if r.control:
        notes.append("control: g = 0, the pair shares its sampler noise until s*, independent after.")
    return {"request": r.as_dict(), "s_star": list(r.s_star), "timesteps": list(timesteps), "fits": fits,
            "notes": notes}


def write_fits(store: ResultsStore, summary: dict) -> None:
    r = Protocol1Request.from_dict(summary["request"])
    for f in FIT_FIELDS:
        arr = np.array([[summary["fits"][_key(g)][q][f] for q in FIT_QUANTITIES] for g in r.g], dtype="float64")
        store.write(f"fit_{f}", ..., arr)
        if r.control:
            store.write(f"control_fit_{f}", ..., np.array([summary["fits"]["control"][q][f] for q in FIT_QUANTITIES]))


def table_rows(summary: dict) -> list[dict]:
    """Numeric Table 1 rows: one per g (and the control), NaN where a fit failed (see ``note``)."""
    rows = []
    for name, fq in summary["fits"].items():
        a, c, f, gap = fq["agreement"], fq["d_coarse"], fq["d_fine"], fq["gap"]
        reasons = []
        for label, e in (("t_spec", a), ("s_coarse", c), ("s_fine", f)):
            if e["reason"]:
                reasons.append(f"{label}: {e['reason']}")
            elif e["ci_reason"]:
                reasons.append(f"{label} CI: {e['ci_reason']}")
        med = a["median"] or [math.nan]
        rows.append({
            "g": "control" if name == "control" else float(name),
            "t_spec": a["midpoint"], "t_spec_ci": [a["ci_low"], a["ci_high"]], "t_spec_timestep": a["midpoint_timestep"],
            "s_coarse": c["midpoint"], "s_coarse_ci": [c["ci_low"], c["ci_high"]],
            "s_fine": f["midpoint"], "s_fine_ci": [f["ci_low"], f["ci_high"]],
            "gap": gap["midpoint"], "gap_ci": [gap["ci_low"], gap["ci_high"]],
            "agreement_s0": med[0], "agreement_sT": med[-1], "note": "; ".join(reasons)})
    return rows


def _fmt(v: float, digits: int = 1) -> str:
    return "n/a" if v is None or not math.isfinite(v) else f"{v:.{digits}f}"


def _fmt_ci(v: float, ci: Sequence[float]) -> str:
    if v is None or not math.isfinite(v):
        return "n/a"
    lo, hi = ci
    return f"{v:.1f} [{_fmt(lo)}, {_fmt(hi)}]"


def display_rows(summary: dict) -> list[dict]:
    """Table 1 as strings, the way the paper prints it: value [95% CI]."""
    out = []
    for row in table_rows(summary):
        out.append({"g": row["g"] if isinstance(row["g"], str) else f"{row['g']:g}",
                    "t_spec [95% CI] (steps)": _fmt_ci(row["t_spec"], row["t_spec_ci"]),
                    "t_spec (timestep)": _fmt(row["t_spec_timestep"], 0),
                    "s_coarse [95% CI]": _fmt_ci(row["s_coarse"], row["s_coarse_ci"]),
                    "s_fine [95% CI]": _fmt_ci(row["s_fine"], row["s_fine_ci"]),
                    "gap s_fine-s_coarse [95% CI]": _fmt_ci(row["gap"], row["gap_ci"]),
                    "agreement s*=0 -> T": f"{_fmt(row['agreement_s0'], 3)} -> {_fmt(row['agreement_sT'], 3)}",
                    "note": row["note"]})
    return out


def load_summary(store_path: str | Path) -> dict:
    """The summary of a complete protocol1 store (fits as stored; no refitting)."""
    store = ResultsStore.open(store_path, KIND)
    meta = store.meta
    if "fits" not in meta:
        c = meta.get("cells", {})
        raise StoreError(f"{store_path} has no fits yet ({meta.get('status')}; {c.get('done')} of {c.get('total')} "
                         "cells): finish it with `dithooks protocol1 --out STORE --resume`")
    req = Protocol1Request.from_dict(meta["request"])
    return {"request": meta["request"], "s_star": list(req.s_star), "timesteps": meta.get("timesteps"),
            "fits": meta["fits"], "notes": meta.get("summary", {}).get("notes", []),
            "figures": meta.get("summary", {}).get("figures", []), "status": meta.get("status"),
            "model_id": meta.get("model_id")}


def read_t_spec(store_path: str | Path, unit: str = "step", with_ci: bool = False) -> dict:
    """``{g: t_spec}`` from a complete protocol1 store; NaN where the fit failed.

    ``unit="step"``: s* in sampling steps (fractional; the first s* steps were coupled);
    ``"timestep"``: the schedule's timestep there. ``with_ci``: ``{g: (t_spec, ci_low, ci_high)}``
    (the CI in steps). The shared-noise control is not included. The run's step count is
    ``attrs["dithooks"]["request"]["steps"]`` and its timesteps ``attrs["dithooks"]["timesteps"]``.
    """
    if unit not in ("step", "timestep"):
        raise DithooksError(f"unit must be 'step' or 'timestep', got {unit!r}")
    s = load_summary(store_path)
    out = {}
    for name, fq in s["fits"].items():
        if name == "control":
            continue
        a = fq["agreement"]
        v = a["midpoint"] if unit == "step" else a["midpoint_timestep"]
        v = math.nan if v is None else float(v)
        if with_ci:
            out[float(name)] = (v, *(math.nan if a[k] is None else float(a[k]) for k in ("ci_low", "ci_high")))
        else:
            out[float(name)] = v
    return out


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def run_protocol1(request: Protocol1Request | None, out, *, mode: str = "create", loaded=None, device="cpu",
                  bar=None, log=None, estimate: bool = True, plots: bool = True) -> dict:
    """Convenience: build :class:`Protocol1` and run it."""
    return Protocol1(request, out, mode=mode, loaded=loaded, device=device,
                     log=log or (lambda m: print(m, file=sys.stderr))).run(bar=bar, estimate=estimate, plots=plots)
