"""DDIM (eta = 0) where every row of the batch follows its own plan, step by step.

A plan says, per row: the step it starts at (its ``x`` is the state at ``timesteps[start]``:
from noise ``start = 0``; forward-backward starts later), its class label, and for every step
whether it is conditioned (``cond``; otherwise the model's null class) and at which attention
radius it runs (``radius``; :data:`GLOBAL` = -1 is the global model). With guidance ``w != 1``
a conditioned step uses ``ε_∅ + w (ε_c − ε_∅)`` at that step's radius.

Each step runs one model call per distinct radius among the active rows (in batches, through
``adapter.denoise``), then one scheduler step for the active rows. Guidance and the step are the
:class:`dithooks.sampling.Sampler`'s own (:meth:`~dithooks.sampling.Sampler.guide`,
:meth:`~dithooks.sampling.Sampler.update`: same scheduler, same ``use_clipped_model_output``
rule); only the loop differs, because ``Sampler.run`` gives every row the same conditioning and
attention at every step while a plan is per row. An always-conditioned global plan reproduces
``Sampler.run`` (tested); windowed conditioning, windowed global attention and
forward-backward are all plans.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ..errors import DithooksError
from ..sampling import Sampler, SamplerSpec
from .local_denoiser import Denoiser

GLOBAL = -1


@dataclass
class Plans:
    """Per-row plans for an ``S``-step DDIM grid (tensors on the CPU)."""

    labels: torch.Tensor   # (rows,) int64 class labels used when conditioned
    start: torch.Tensor    # (rows,) int64 first step
    cond: torch.Tensor     # (rows, S) bool
    radius: torch.Tensor   # (rows, S) int64, GLOBAL = -1

    def __post_init__(self):
        rows = self.labels.shape[0]
        if not (self.start.shape == (rows,) and self.cond.shape[0] == rows and self.radius.shape == self.cond.shape):
            raise DithooksError("plans: labels, start, cond and radius disagree on the number of rows or steps")

    @property
    def rows(self) -> int:
        return int(self.labels.shape[0])

    @property
    def steps(self) -> int:
        return int(self.cond.shape[1])

    @staticmethod
    def cat(plans: list["Plans"]) -> "Plans":
        return Plans(*(torch.cat([getattr(p, f) for p in plans]) for f in ("labels", "start", "cond", "radius")))


def uniform_plans(labels, steps: int, *, start: int = 0, cond: bool = True, radius: int = GLOBAL) -> Plans:
    """Every row the same at every step."""
    labels = torch.as_tensor(labels, dtype=torch.long).reshape(-1)
    n = labels.shape[0]
    return Plans(labels, torch.full((n,), int(start), dtype=torch.long),
                 torch.full((n, steps), bool(cond)), torch.full((n, steps), int(radius), dtype=torch.long))


def ddim_spec(steps: int, guidance: float = 1.0) -> SamplerSpec:
    return SamplerSpec("ddim", steps=int(steps), eta=0.0, guidance=float(guidance))


def ddim_sampler(loaded, steps: int, guidance: float = 1.0, hooks=None) -> Sampler:
    """The :class:`~dithooks.sampling.Sampler` of the ``steps``-step deterministic DDIM grid."""
    return Sampler(loaded, ddim_spec(steps, guidance), hooks)


@torch.no_grad()
def run_plans(denoiser: Denoiser, steps: int, x: torch.Tensor, plans: Plans, guidance: float = 1.0,
              progress: Callable | None = None) -> torch.Tensor:
    """Run every row from its start step to the end of the ``steps``-step DDIM grid."""
    if plans.steps != steps or plans.rows != x.shape[0]:
        raise DithooksError(f"plans for {plans.rows} rows x {plans.steps} steps, "
                            f"given {x.shape[0]} rows and a {steps}-step grid")
    sampler = ddim_sampler(denoiser.loaded, steps, guidance, denoiser.hooks)
    sched = sampler.scheduler
    x = x.detach().to(torch.float32).cpu().clone()
    null = int(denoiser.null_class) if denoiser.null_class is not None else None
    guided = float(guidance) != 1.0
    first = int(plans.start.min()) if plans.rows else steps
    rng = range(first, steps)
    for s in (progress(rng) if progress else rng):
        t = sched.timesteps[s]
        active = torch.nonzero(plans.start <= s).flatten()
        if active.numel() == 0:
            continue
        cond = plans.cond[active, s]
        if null is None and not bool(cond.all()):
            raise DithooksError("unconditional steps need a class-conditional model with a null class")
        radius = plans.radius[active, s]
        xa = sched.scale_model_input(x[active], t)
        eps = torch.empty_like(xa)
        for r in torch.unique(radius).tolist():
            pos = torch.nonzero(radius == r).flatten()
            c = cond[pos]
            labels = torch.where(c, plans.labels[active][pos], torch.full_like(pos, null if null is not None else 0))
            # conditioned rows first, then (guidance) their null branch, as Sampler batches [cond; null]
            xin, lin = [xa[pos]], [labels]
            need_null = pos[c] if guided else pos[:0]
            if need_null.numel():
                xin.append(xa[need_null])
                lin.append(torch.full((need_null.numel(),), null, dtype=torch.long))
            out = denoiser.eps(torch.cat(xin), int(t), torch.cat(lin), None if r == GLOBAL else int(r))
            e = out[:pos.numel()]
            if need_null.numel():
                e_null = out[pos.numel():]
                cidx = torch.nonzero(c).flatten()
                e = e.clone()
                e[cidx] = sampler.guide(e[cidx], e_null)
            eps[pos] = e
        x[active] = sampler.update(eps, s, x[active])
    return x


def noise_to(denoiser: Denoiser, steps: int, x0: torch.Tensor, noise: torch.Tensor, step: int) -> torch.Tensor:
    """``x_t = sqrt(ᾱ_t) x0 + sqrt(1 − ᾱ_t) z`` at ``t = timesteps[step]`` of the ``steps``-step
    DDIM grid, with the model's training schedule (the forward process)."""
    sched = ddim_sampler(denoiser.loaded, steps).scheduler
    t = sched.timesteps[step]
    return sched.add_noise(x0.float(), noise.float(), torch.full((x0.shape[0],), int(t), dtype=torch.long))


def timesteps(loaded, steps: int) -> list[int]:
    """The integer timesteps of the ``steps``-step DDIM grid (largest first)."""
    return ddim_sampler(loaded, steps).timesteps


def num_train_timesteps(loaded) -> int:
    return int(loaded.scheduler_config.get("num_train_timesteps", 1000))
