"""Class-conditional DiT sampling on diffusers schedulers, with every step indexed.

The loop mirrors diffusers' ``DiTPipeline`` (classifier-free guidance on the epsilon channels,
learned-variance channels dropped before the scheduler step) but exposes what a probe needs:
the step index and timestep of each model call, the batch layout (cfg branch, sample), and a
:class:`TrajectoryState` after every step so that an interrupted run resumes exactly.

Each sample has its own ``torch.Generator`` seeded by its seed, so sample ``i`` is the same
trajectory whatever the batch size, and a resumed run draws the same noise as an unbroken one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from .errors import DithooksError
from .hooks import HookManager
from .loading import LoadedModel

SAMPLERS = ("ddim", "ddpm")


@dataclass(frozen=True)
class SamplerSpec:
    """Which sampler, how many steps, DDIM's eta and the guidance scale (1 = no guidance)."""

    name: str = "ddim"
    steps: int = 50
    eta: float = 0.0
    guidance: float = 1.0

    def __post_init__(self):
        if self.name not in SAMPLERS:
            raise DithooksError(f"unknown sampler {self.name!r}; choose one of {', '.join(SAMPLERS)}")
        if self.steps < 1:
            raise DithooksError(f"steps must be at least 1, got {self.steps}")
        if not 0.0 <= self.eta <= 1.0:
            raise DithooksError(f"eta must lie in [0, 1], got {self.eta}")

    @property
    def cfg(self) -> bool:
        """Whether the null-label branch runs beside the conditional one."""
        return self.guidance != 1.0


def make_scheduler(spec: SamplerSpec, schedule: dict):
    from diffusers import DDIMScheduler, DDPMScheduler

    cfg = {k: v for k, v in schedule.items() if not k.startswith("_")}
    if spec.name == "ddim":
        sched = DDIMScheduler.from_config(cfg)
    else:
        # the variance of learned-sigma checkpoints is dropped (as DiTPipeline does): fixed_small
        cfg["variance_type"] = "fixed_small"
        sched = DDPMScheduler.from_config(cfg)
    sched.set_timesteps(spec.steps)
    if len(sched.timesteps) != spec.steps:
        raise DithooksError(f"the scheduler made {len(sched.timesteps)} timesteps for {spec.steps} steps")
    return sched


@dataclass
class TrajectoryState:
    """Everything needed to continue sampling at ``step``: latents and each sample's RNG."""

    step: int
    latents: torch.Tensor
    rng_states: list[torch.Tensor] = field(default_factory=list)

    def generators(self) -> list[torch.Generator]:
        gens = []
        for state in self.rng_states:
            g = torch.Generator(device="cpu")
            g.set_state(state)
            gens.append(g)
        return gens


def initial_state(loaded: LoadedModel, seeds: Sequence[int], init_sigma: float = 1.0) -> TrajectoryState:
    """x_T drawn per sample from its own generator seeded by ``seeds[i]``."""
    geo = loaded.adapter.geometry
    shape = (geo.in_channels, geo.sample_size, geo.sample_size)
    gens = [torch.Generator(device="cpu").manual_seed(int(s)) for s in seeds]
    x = torch.stack([torch.randn(shape, generator=g) for g in gens]) * init_sigma
    return TrajectoryState(0, x, [g.get_state() for g in gens])


StepCallback = Callable[[int, TrajectoryState], None]


class Sampler:
    """Runs the reverse process for a batch of (label, seed) samples."""

    def __init__(self, loaded: LoadedModel, spec: SamplerSpec, hooks: HookManager | None = None,
                 device: str | torch.device = "cpu"):
        self.loaded = loaded
        self.spec = spec
        self.hooks = hooks
        self.device = torch.device(device)
        self.scheduler = make_scheduler(spec, loaded.scheduler_config)
        geo = loaded.adapter.geometry
        if spec.cfg and geo.num_classes is None:
            raise DithooksError("guidance needs a class-conditional model (num_embeds_ada_norm unset)")
        self.geometry = geo

    @property
    def timesteps(self) -> list[int]:
        return [int(t) for t in self.scheduler.timesteps]

    def batch_axes(self, num_samples: int) -> tuple[tuple[str, int], ...]:
        axes = (("sample", num_samples),)
        return (("cfg", 2),) + axes if self.spec.cfg else axes

    def check_labels(self, labels: Sequence[int]) -> None:
        n = self.geometry.num_classes
        if n is None:
            return
        bad = [y for y in labels if not 0 <= int(y) < n]
        if bad:
            raise DithooksError(f"class label {bad[0]} is out of range: this model has classes 0-{n - 1}")

    @torch.no_grad()
    def run(self, labels: Sequence[int], seeds: Sequence[int], *, state: TrajectoryState | None = None,
            on_step: StepCallback | None = None, progress: Callable | None = None) -> torch.Tensor:
        """Sample; ``state`` resumes a run; ``on_step(s, state_after_s)`` follows every step."""
        if len(labels) != len(seeds):
            raise DithooksError(f"{len(labels)} labels for {len(seeds)} seeds: give one label per sample")
        self.check_labels(labels)
        if state is None:
            state = initial_state(self.loaded, seeds, float(self.scheduler.init_noise_sigma))
        x = state.latents.to(self.device, dtype=torch.float32)
        gens = state.generators()
        y = torch.tensor([int(v) for v in labels], device=self.device)
        if self.spec.cfg:
            y = torch.cat([y, torch.full_like(y, self.geometry.null_class)])
        if self.hooks is not None:
            self.hooks.state.batch_axes = self.batch_axes(len(seeds))
        model = self.loaded.transformer
        dtype = next(model.parameters()).dtype
        C = self.geometry.in_channels
        steps = range(state.step, self.spec.steps)
        for s in (progress(steps) if progress else steps):
            t = self.scheduler.timesteps[s]
            if self.hooks is not None:
                self.hooks.state.step, self.hooks.state.timestep = s, int(t)
            xin = torch.cat([x, x]) if self.spec.cfg else x
            xin = self.scheduler.scale_model_input(xin, t)
            tt = torch.full((xin.shape[0],), int(t), device=self.device, dtype=torch.long)
            out = model(xin.to(dtype), timestep=tt, class_labels=y).sample.float()
            eps = out[:, :C]  # learned-sigma models (out_channels = 2C) put the variance behind
            if self.spec.cfg:
                cond, uncond = eps.chunk(2)
                eps = uncond + self.spec.guidance * (cond - uncond)
            kwargs = {"eta": self.spec.eta} if self.spec.name == "ddim" else {}
            x = self.scheduler.step(eps, t, x, generator=gens, **kwargs).prev_sample
            if on_step is not None:
                on_step(s, TrajectoryState(s + 1, x.detach().cpu(), [g.get_state() for g in gens]))
        if self.hooks is not None:
            self.hooks.state.step = self.hooks.state.timestep = None
        return x
