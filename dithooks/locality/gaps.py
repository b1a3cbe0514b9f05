"""Conditioning gap and locality gap along trajectories (THEORY §7; seed 004 §3.2, C.2).

For a state ``x_t`` at integer timestep ``t`` with class ``c``:

    G_cond(t)        = ‖ε(x_t, t, c) − ε(x_t, t, ∅)‖ / N
    G_loc(t, r)      = ‖ε_global(x_t, t, c) − ε_local,r(x_t, t, c)‖ / N
    G_loc,∅(t, r)    = the same with the null class ∅ (the unconditional score)

``‖·‖`` is the L2 norm over all latent elements (channels x height x width) of one sample and N
the number of image tokens (the paper's "norm divided by the number of image tokens"). Every
value is per sample; tables and figures show the mean over samples. ``‖ε(x_t,t,c)‖/N`` is kept
too (``eps_norm``), so relative gaps are one division away. Note the 1/N: for per-token
differences of a fixed size the gap falls like 1/sqrt(N), so gaps of models with different
token counts (digits: 16, digits64: 64) compare only after multiplying by sqrt(N)/sqrt(N').

Two kinds of trajectories, on one time grid (the steps of an ``S``-step DDIM schedule, every
``every``-th one):

* ``sampling``: DDIM (eta = 0) from noise with :class:`dithooks.sampling.Sampler` (classes and
  guidance as asked), ``x_t`` = the state entering step s;
* ``training``: data ``x_0`` noised forward with the training schedule, ``x_t = sqrt(ᾱ_t) x_0 +
  sqrt(1 − ᾱ_t) z`` with one ``z`` per sample shared by all t (a forward trajectory), the class
  being the datum's label.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from ..errors import DithooksError
from ..sampling import Sampler, SamplerSpec, TrajectoryState, initial_state, make_scheduler
from .local_denoiser import Denoiser, gap_norm
from .planned import ddim_spec, num_train_timesteps
from .store import ArrayDef, CellStore, run_cells

KIND = "locality-gaps"
TRAJECTORIES = ("sampling", "training")


@torch.no_grad()
def gaps_at(denoiser: Denoiser, x: torch.Tensor, t: int, labels: torch.Tensor,
            radii: Sequence[int]) -> dict[str, torch.Tensor]:
    """All gaps of a batch of states at one timestep: ``gcond`` (n,), ``gloc`` and
    ``gloc_uncond`` (R, n), ``eps_norm`` (n,). One model call (2n rows) per radius plus one."""
    n = x.shape[0]
    labels = torch.as_tensor(labels, dtype=torch.long).reshape(-1)
    both_x, both_y = torch.cat([x, x]), torch.cat([labels, denoiser.null_labels(n)])
    eps = denoiser.eps(both_x, t, both_y, None)
    e_c, e_u = eps[:n], eps[n:]
    N = denoiser.num_tokens
    gl, gu = [], []
    for r in radii:
        loc = denoiser.eps(both_x, t, both_y, int(r))
        gl.append(gap_norm(e_c, loc[:n], N))
        gu.append(gap_norm(e_u, loc[n:], N))
    empty = torch.zeros((0, n))
    return {"gcond": gap_norm(e_c, e_u, N), "gloc": torch.stack(gl) if gl else empty,
            "gloc_uncond": torch.stack(gu) if gu else empty,
            "eps_norm": torch.linalg.vector_norm(e_c.flatten(1), dim=1) / N}


@torch.no_grad()
def sampling_trajectory(loaded, spec: SamplerSpec, labels: Sequence[int], seeds: Sequence[int],
                        device="cpu", progress=None) -> torch.Tensor:
    """(S, n, C, H, W): the state entering each step of a :class:`Sampler` run from noise."""
    sampler = Sampler(loaded, spec, None, device=device)
    state = initial_state(loaded, seeds, float(sampler.scheduler.init_noise_sigma))
    xs = [state.latents.clone()]
    sampler.run(labels, seeds, state=TrajectoryState(0, state.latents.clone(), list(state.rng_states)),
                on_step=lambda s, st: xs.append(st.latents.clone()), progress=progress)
    return torch.stack(xs[:spec.steps])


def training_trajectory(loaded, steps: int, x0: torch.Tensor, seeds: Sequence[int],
                        step_index: Sequence[int]) -> torch.Tensor:
    """(len(step_index), n, C, H, W): ``x0`` noised forward to each chosen step's timestep, with
    one noise draw per sample from a generator seeded by its seed."""
    sched = make_scheduler(ddim_spec(steps), loaded.scheduler_config)
    z = torch.stack([torch.randn(tuple(x0.shape[1:]), generator=torch.Generator().manual_seed(int(s)))
                     for s in seeds])
    out = []
    for s in step_index:
        t = sched.timesteps[s]
        out.append(sched.add_noise(x0.float(), z, torch.full((x0.shape[0],), int(t), dtype=torch.long)))
    return torch.stack(out)


@dataclass
class GapsRequest:
    """What a gap scan measures (everything that must match for ``--resume``)."""

    model: str
    steps: int = 50
    every: int = 2
    radii: tuple[int, ...] = ()
    trajectories: tuple[str, ...] = TRAJECTORIES
    labels: tuple[int, ...] = ()          # sampling trajectory classes, one per sample
    seeds: tuple[int, ...] = ()
    guidance: float = 1.0                 # of the sampling trajectory
    data: str = ""                        # what the training trajectory noises (description)

    def as_dict(self) -> dict:
        return {"model": self.model, "steps": self.steps, "every": self.every, "radii": list(self.radii),
                "trajectories": list(self.trajectories), "labels": list(self.labels), "seeds": list(self.seeds),
                "guidance": self.guidance, "data": self.data}


def run_gaps(denoiser: Denoiser, req: GapsRequest, out, mode: str = "create",
             data: tuple[torch.Tensor, torch.Tensor] | None = None, progress=None) -> CellStore:
    """Measure the gap grid into a store at ``out`` (see :mod:`dithooks.locality.store`).

    ``data`` = (x0 (n, C, H, W), labels (n,)) for the training trajectory (n = len(seeds)).
    """
    loaded = denoiser.loaded
    bad = [t for t in req.trajectories if t not in TRAJECTORIES]
    if bad or not req.trajectories:
        raise DithooksError(f"unknown trajectory {bad[0] if bad else ''!r}: choose from {', '.join(TRAJECTORIES)}")
    if req.every < 1 or req.steps < 1:
        raise DithooksError("--steps and --every must be at least 1")
    n = len(req.seeds)
    if n == 0 or len(req.labels) != n:
        raise DithooksError(f"{len(req.labels)} labels for {n} seeds: give one label per sample")
    if denoiser.null_class is None:
        raise DithooksError("the conditioning gap needs a class-conditional model with a null class")
    if "training" in req.trajectories:
        if data is None:
            raise DithooksError("the training trajectory needs data to noise (only the embedded digits "
                                "models come with theirs); use --trajectories sampling")
        if data[0].shape[0] != n:
            raise DithooksError(f"training data has {data[0].shape[0]} samples for {n} seeds")
    spec = SamplerSpec("ddim", req.steps, 0.0, req.guidance)
    sched = make_scheduler(spec, loaded.scheduler_config)
    step_index = list(range(0, req.steps, req.every))
    ts = np.array([int(sched.timesteps[s]) for s in step_index], dtype=np.int64)
    geo = loaded.adapter.geometry
    C, H = geo.in_channels, geo.sample_size
    sizes = {"trajectory": len(req.trajectories), "step": len(step_index), "radius": len(req.radii),
             "sample": n, "channel": C, "height": H, "width": H}
    tlabels = np.array([list(req.labels) if tr == "sampling" else data[1].tolist() for tr in req.trajectories],
                       dtype=np.int64)
    coords = {"trajectory": (("trajectory",), np.array(list(req.trajectories))),
              "step": (("step",), np.array(step_index, dtype=np.int64)),
              "timestep": (("step",), ts),
              "t": (("step",), ts.astype(np.float64) / num_train_timesteps(loaded)),
              "radius": (("radius",), np.array(req.radii, dtype=np.int64)),
              "sample": (("sample",), np.arange(n, dtype=np.int64)),
              "seed": (("sample",), np.array(req.seeds, dtype=np.int64)),
              "label": (("trajectory", "sample"), tlabels)}
    arrays = {"gcond": ArrayDef(("trajectory", "step", "sample")),
              "gloc": ArrayDef(("trajectory", "step", "radius", "sample")),
              "gloc_uncond": ArrayDef(("trajectory", "step", "radius", "sample")),
              "eps_norm": ArrayDef(("trajectory", "step", "sample")),
              "xt": ArrayDef(("trajectory", "step", "sample", "channel", "height", "width"))}
    request = {**req.as_dict(), "num_tokens": denoiser.num_tokens, "grid_side": denoiser.layout.grid_side,
               "norm": "L2 over channel x height x width per sample, divided by num_tokens"}
    store = CellStore.open(out, kind=KIND, request=request, mode=mode, coords=coords, arrays=arrays,
                           sizes=sizes, cell_dims=("trajectory", "step"))
    pending = store.pending()
    trajs: dict[int, torch.Tensor] = {}

    def states(k: int) -> torch.Tensor:
        if k not in trajs:
            if req.trajectories[k] == "sampling":
                full = sampling_trajectory(loaded, spec, req.labels, req.seeds, device=denoiser.device)
                trajs[k] = full[step_index]
            else:
                trajs[k] = training_trajectory(loaded, req.steps, data[0], req.seeds, step_index)
        return trajs[k]

    def work(cells):
        for k, j in cells:
            x = states(k)[j]
            g = gaps_at(denoiser, x, int(ts[j]), torch.as_tensor(tlabels[k]), req.radii)
            store.write("xt", (k, j), x.numpy())
            store.write("gcond", (k, j), g["gcond"].numpy())
            store.write("gloc", (k, j), g["gloc"].numpy())
            store.write("gloc_uncond", (k, j), g["gloc_uncond"].numpy())
            store.write("eps_norm", (k, j), g["eps_norm"].numpy())
            store.mark((k, j))

    run_cells(store, [[c] for c in pending], work, progress)
    store.finish("complete" if store.complete else "running")
    return store
