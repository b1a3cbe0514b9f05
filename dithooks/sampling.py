"""Sampling any registered family on diffusers schedulers, with every step indexed.

The loop mirrors diffusers' pipelines (``DiTPipeline``: classifier-free guidance on the epsilon
channels, learned-variance channels dropped before the scheduler step; SD3/Flux: flow matching
with ``FlowMatchEulerDiscreteScheduler``, ``SamplerSpec(name="flow")``) but asks the model
adapter for everything family-specific: ``adapter.denoise(x, t, rows)`` is one model call,
:class:`~dithooks.conditioning.Conditioning` rows say what it is conditioned on. Guidance is
``uncond + w (cond - uncond)`` for epsilon and velocity predictions alike. It exposes what a probe needs:
the step index and timestep of each model call, the batch layout (cfg branch, sample), and a
:class:`TrajectoryState` after every step so that an interrupted run resumes exactly.

Each sample has its own ``torch.Generator`` seeded by its seed, so sample ``i`` is the same
trajectory whatever the batch size, and a resumed run draws the same noise as an unbroken one.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from .conditioning import Conditioning
from .errors import DithooksError
from .hooks import HookManager
from .loading import LoadedModel

SAMPLERS = ("ddim", "ddpm", "flow")


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
        if isinstance(self.steps, bool) or not isinstance(self.steps, numbers.Integral):
            raise DithooksError(f"steps must be a whole number, got {self.steps!r}")
        if self.steps < 1:
            raise DithooksError(f"steps must be at least 1, got {self.steps}")
        if not 0.0 <= float(self.eta) <= 1.0:  # NaN fails this too
            raise DithooksError(f"eta must lie in [0, 1], got {self.eta}")
        if not math.isfinite(float(self.guidance)):
            raise DithooksError(f"guidance must be a finite number, got {self.guidance}")

    @property
    def cfg(self) -> bool:
        """Whether the null-label branch runs beside the conditional one."""
        return self.guidance != 1.0


@dataclass(frozen=True)
class ReplicaSpec:
    """Replica pairs (a, b) sampled together, coupled through attention (THEORY §2).

    ``kappa``: antisymmetric start x^{a,b} = sqrt(1-κ²) z ± κ η [67] (1/√2: independent starts).
    ``g``: coupling strength of eq [19] on ``layers`` (None = every block) for the steps before
    ``couple_until`` (None = the whole trajectory), then the replicas run independently
    (Protocol I). ``share_noise_until``: the g = 0 control - replica b reuses a's sampler noise
    for the steps before it (only matters for stochastic samplers).
    """

    kappa: float = 2 ** -0.5
    g: float = 0.0
    couple_until: int | None = None
    share_noise_until: int | None = None
    layers: tuple[int, ...] | None = None

    def __post_init__(self):
        from .gates import validate_coupling
        from .replicas import validate_kappa

        try:
            validate_kappa(self.kappa)
            validate_coupling(self.g)
        except (TypeError, ValueError) as e:
            raise DithooksError(str(e)) from None
        if not float(self.g) <= 1.0:
            raise DithooksError(f"coupling strength g must lie in [0, 1] (eq [19]), got {self.g}")
        for what, step in (("couple_until", self.couple_until), ("share_noise_until", self.share_noise_until)):
            if step is not None and (isinstance(step, bool) or not isinstance(step, numbers.Integral) or step < 0):
                raise DithooksError(f"{what} must be a step >= 0 (or None), got {step!r}")
        if self.layers is not None:
            if not self.layers or any(isinstance(i, bool) or not isinstance(i, numbers.Integral) or i < 0 for i in self.layers):
                raise DithooksError(f"coupled layers must be block indices >= 0 (or None for all), got {self.layers!r}")

    def coupling_at(self, step: int) -> float:
        return self.g if self.couple_until is None or step < self.couple_until else 0.0


def replica_seed(seed: int) -> int:
    """Seed of replica b's sampler-noise generator (replica a's is the pair's own seed).

    torch's CPU generator keeps only the low 32 bits of a seed, so an offset above bit 32 (as
    this once was, ``seed + 2**40``) replays a's own stream. The seed is hashed into 32 bits
    instead; b's stream then differs from a's (tested) and from small sample seeds' by chance
    only (about one in 2**32 per pair).
    """
    import numpy as np

    return int(np.random.SeedSequence([int(seed), 1]).generate_state(1)[0])


def _ddim_float64_scheduler_class():
    """diffusers' DDIM with its cumulative alphas held in float64, for eta > 0.

    With eta > 0, DDIM's direction coefficient is sqrt(1 - ᾱ_prev - σ_t²), which is exactly
    (1 - ᾱ_prev)(ᾱ_t/ᾱ_prev - ᾱ_t)/(1 - ᾱ_t) >= 0 but tiny when ᾱ_t ≈ 0 (the first step from pure
    noise on a cosine schedule: ᾱ_999 = 2.4e-9, the coefficient's square ~2e-8). In float32 it
    rounds below 0 and the square root gives NaN latents (seen: DDIM 5 steps, eta 1). With the
    alphas in float64 every scalar of the step is float64 and the difference stays positive; the
    step is otherwise diffusers' own, and the latents stay in their dtype (the scalars are 0-dim).
    """
    import torch
    from diffusers import DDIMScheduler

    class DDIMScheduler64(DDIMScheduler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.alphas_cumprod = self.alphas_cumprod.to(torch.float64)
            self.final_alpha_cumprod = torch.as_tensor(self.final_alpha_cumprod, dtype=torch.float64)

    return DDIMScheduler64


_FLOW_KEYS = ("num_train_timesteps", "shift", "use_dynamic_shifting", "base_shift", "max_shift",
              "base_image_seq_len", "max_image_seq_len", "invert_sigmas", "shift_terminal",
              "use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "time_shift_type",
              "stochastic_sampling")


def make_scheduler(spec: SamplerSpec, schedule: dict, adapter=None):
    from diffusers import DDIMScheduler, DDPMScheduler

    cfg = {k: v for k, v in schedule.items() if not k.startswith("_")}
    if spec.name == "flow":
        from diffusers import FlowMatchEulerDiscreteScheduler

        sched = FlowMatchEulerDiscreteScheduler.from_config({k: v for k, v in cfg.items() if k in _FLOW_KEYS})
        set_flow_timesteps(sched, spec.steps, adapter)
        return sched
    if spec.name == "ddim":
        # eta = 0 (deterministic DDIM) keeps diffusers' scheduler bit for bit
        sched = (_ddim_float64_scheduler_class() if spec.eta > 0 else DDIMScheduler).from_config(cfg)
    else:
        # the variance of learned-sigma checkpoints is dropped (as DiTPipeline does): fixed_small
        cfg["variance_type"] = "fixed_small"
        sched = DDPMScheduler.from_config(cfg)
    try:
        sched.set_timesteps(spec.steps)
    except ValueError:  # more steps than the model's training schedule has timesteps
        limit = sched.config.num_train_timesteps
        raise DithooksError(f"{spec.steps} steps is more than this model's schedule has timesteps ({limit}): "
                            f"use --steps 1-{limit}") from None
    if len(sched.timesteps) != spec.steps:
        raise DithooksError(f"the scheduler made {len(sched.timesteps)} timesteps for {spec.steps} steps")
    return sched


def set_flow_timesteps(sched, steps: int, adapter=None) -> None:
    """``set_timesteps`` for flow matching (resets the scheduler's step index too); the adapter
    adds what its family's pipeline passes (``mu`` for dynamic shifting)."""
    kwargs = adapter.scheduler_kwargs(sched, steps) if adapter is not None else {}
    sched.set_timesteps(steps, **kwargs)


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
    shape = loaded.adapter.geometry.latent_shape
    gens = [torch.Generator(device="cpu").manual_seed(int(s)) for s in seeds]
    x = torch.stack([torch.randn(shape, generator=g) for g in gens]) * init_sigma
    return TrajectoryState(0, x, [g.get_state() for g in gens])


def initial_replica_state(loaded: LoadedModel, seeds: Sequence[int], replicas: ReplicaSpec,
                          init_sigma: float = 1.0) -> TrajectoryState:
    """M = len(seeds) antisymmetric pairs, laid out [a_0..a_{M-1}; b_0..b_{M-1}].

    Pair m draws z and η from a generator seeded by ``seeds[m]``, which then serves replica a's
    sampler noise; replica b's noise comes from a generator seeded by ``replica_seed(seeds[m])``.
    """
    from .replicas import antisymmetric_pair

    shape = (len(seeds), *loaded.adapter.geometry.latent_shape)
    gens_a = [torch.Generator(device="cpu").manual_seed(int(s)) for s in seeds]
    x_a, x_b = antisymmetric_pair(shape, replicas.kappa, gens_a)
    gens_b = [torch.Generator(device="cpu").manual_seed(replica_seed(s)) for s in seeds]
    x = torch.cat([x_a, x_b]) * init_sigma
    return TrajectoryState(0, x, [g.get_state() for g in gens_a + gens_b])


StepCallback = Callable[[int, TrajectoryState], None]


def _copy_generator(g: torch.Generator) -> torch.Generator:
    c = torch.Generator(device=g.device)
    c.set_state(g.get_state())
    return c


class Sampler:
    """Runs the reverse process for a batch of samples (class labels or a :class:`Conditioning`)."""

    def __init__(self, loaded: LoadedModel, spec: SamplerSpec, hooks: HookManager | None = None,
                 device: str | torch.device = "cpu", replicas: ReplicaSpec | None = None,
                 clipped_model_output: bool | None = None):
        """``clipped_model_output``: DDIM's ``use_clipped_model_output`` (None: on when the
        schedule clips x0, see the step loop)."""
        self.loaded = loaded
        self.clipped_model_output = clipped_model_output
        self.spec = spec
        self.replicas = replicas
        self.adapter = loaded.adapter
        if replicas is not None and hooks is None:  # coupling lives in the hook manager's processors
            hooks = HookManager(loaded.transformer, loaded.adapter)
        if replicas is not None and hooks.extension("attention") is None:
            raise DithooksError(f"replica coupling needs attention processors, which "
                                f"{type(loaded.transformer).__name__} does not expose")
        self.hooks = hooks
        self.device = torch.device(device)
        prediction = getattr(self.adapter, "prediction", "epsilon")
        if (spec.name == "flow") != (prediction == "flow"):
            want = "flow" if prediction == "flow" else "ddim or ddpm"
            raise DithooksError(f"sampler {spec.name!r} does not fit a model that predicts {prediction}: use {want}")
        self.scheduler = make_scheduler(spec, loaded.scheduler_config, self.adapter)
        geo = self.adapter.geometry
        if spec.cfg and getattr(self.adapter, "conditioning", "class") == "class" and geo.num_classes is None:
            raise DithooksError("guidance needs a class-conditional model (num_embeds_ada_norm unset)")
        self.geometry = geo

    @property
    def timesteps(self) -> list:
        """Scheduler timesteps (ints for DDIM/DDPM, floats in [0, 1000] for flow matching)."""
        if self.spec.name == "flow":
            return [float(t) for t in self.scheduler.timesteps]
        return [int(t) for t in self.scheduler.timesteps]

    def batch_axes(self, num_samples: int) -> tuple[tuple[str, int], ...]:
        """The model batch, outermost first: replica (if any), cfg (if guided), sample.

        The replica axis is outermost because the coupled processor pairs row i with row i+B/2.
        """
        axes: tuple[tuple[str, int], ...] = (("sample", num_samples),)
        if self.spec.cfg:
            axes = (("cfg", 2),) + axes
        if self.replicas is not None:
            axes = (("replica", 2),) + axes
        return axes

    def check_labels(self, labels: Sequence[int]) -> None:
        n = self.geometry.num_classes
        if n is None:
            return
        bad = [y for y in labels if not 0 <= int(y) < n]
        if bad:
            raise DithooksError(f"class label {bad[0]} is out of range: this model has classes 0-{n - 1}")

    def conditioning(self, labels_or_cond, num_seeds: int) -> Conditioning:
        """``labels`` (a sequence of class labels) or a :class:`Conditioning`, checked against
        the model and the number of seeds."""
        if isinstance(labels_or_cond, Conditioning):
            cond = labels_or_cond
            if len(cond) == 1 and num_seeds > 1:  # one conditioning for every seed
                cond = cond.select([0] * num_seeds)
            if len(cond) != num_seeds:
                raise DithooksError(f"conditioning for {len(cond)} samples with {num_seeds} seeds: "
                                    "give one per sample")
        else:
            labels = list(labels_or_cond)
            if len(labels) != num_seeds:
                raise DithooksError(f"{len(labels)} labels for {num_seeds} seeds: give one label per sample")
            self.check_labels(labels)
            cond = self.adapter.make_conditioning(labels)
        self.adapter.check_conditioning(cond, self.spec.cfg)
        return cond

    def _timestep(self, t):
        return float(t) if self.spec.name == "flow" else int(t)

    def guide(self, eps_cond: torch.Tensor, eps_null: torch.Tensor) -> torch.Tensor:
        """Classifier-free guidance: ``eps_null + w (eps_cond - eps_null)`` with this spec's ``w``."""
        return eps_null + self.spec.guidance * (eps_cond - eps_null)

    def update(self, eps: torch.Tensor, s: int, x: torch.Tensor, generators=None) -> torch.Tensor:
        """The scheduler step of step ``s``: ``x`` at step ``s + 1`` from the (guided) prediction
        ``eps`` (flow matching; DDPM; DDIM with this spec's eta and the clipped-model-output rule).
        ``generators``: one per row for the sampler noise (DDPM, DDIM with eta > 0)."""
        t = self.scheduler.timesteps[s]
        if self.spec.name == "flow":
            return self.scheduler.step(eps, t, x).prev_sample
        kwargs = {"eta": self.spec.eta} if self.spec.name == "ddim" else {}
        if self.spec.name == "ddim":
            # with clip_sample, DDIM clips x0 but would keep the unclipped epsilon; guided
            # epsilons overshoot and the trajectory ends in noise (w=3: 5% recognisable
            # digits vs 100% with this). Recompute epsilon from the clipped x0.
            clipped = self.clipped_model_output
            if clipped is None:
                clipped = bool(self.scheduler.config.clip_sample) or None
            if clipped is not None:
                kwargs["use_clipped_model_output"] = clipped
        return self.scheduler.step(eps, t, x, generator=generators, **kwargs).prev_sample

    @torch.no_grad()
    def run(self, labels: Sequence[int] | Conditioning, seeds: Sequence[int], *, state: TrajectoryState | None = None,
            on_step: StepCallback | None = None, progress: Callable | None = None) -> torch.Tensor:
        """Sample; ``state`` resumes a run; ``on_step(s, state_after_s)`` follows every step.

        ``labels``: class labels (one per seed) or a :class:`Conditioning`. With replicas,
        ``seeds``/``labels`` name the pairs and the result is [x_a; x_b].
        """
        cond = self.conditioning(labels, len(seeds))
        if self.spec.name == "flow":  # the flow scheduler counts its steps: start afresh (or resume)
            set_flow_timesteps(self.scheduler, self.spec.steps, self.adapter)
        init_sigma = float(getattr(self.scheduler, "init_noise_sigma", 1.0))
        if state is None:
            state = (initial_state(self.loaded, seeds, init_sigma) if self.replicas is None
                     else initial_replica_state(self.loaded, seeds, self.replicas, init_sigma))
        x = state.latents.to(self.device, dtype=torch.float32)
        gens = state.generators()
        M, R = len(seeds), 1 if self.replicas is None else 2
        ncfg = 2 if self.spec.cfg else 1
        rows = cond.rows(self.spec.cfg, R, device=self.device)  # (replica, cfg, sample) order
        if self.hooks is not None:
            self.hooks.state.batch_axes = self.batch_axes(M)
        attention = self.hooks.extension("attention") if self.replicas is not None else None
        steps = range(state.step, self.spec.steps)
        try:
            for s in (progress(steps) if progress else steps):
                t = self.scheduler.timesteps[s]
                if self.hooks is not None:
                    self.hooks.state.step, self.hooks.state.timestep = s, self._timestep(t)
                if attention is not None:
                    g = self.replicas.coupling_at(s)
                    # g = 0 is exactly the uncoupled model: give the blocks their own processors back
                    attention.set_coupling(g if g > 0 else None, self.replicas.layers)
                xin = x.view(R, 1, M, *x.shape[1:]).expand(R, ncfg, M, *x.shape[1:]).reshape(-1, *x.shape[1:])
                if hasattr(self.scheduler, "scale_model_input"):
                    xin = self.scheduler.scale_model_input(xin, t)
                # the prediction (epsilon or velocity), variance channels dropped
                eps = self.adapter.denoise(xin, t, rows)
                eps = eps.reshape(R, ncfg, M, *eps.shape[1:])
                if self.spec.cfg:
                    eps = self.guide(eps[:, 0], eps[:, 1])
                else:
                    eps = eps[:, 0]
                eps = eps.reshape(R * M, *eps.shape[2:])
                step_gens = gens
                if (self.spec.name != "flow" and self.replicas is not None
                        and self.replicas.share_noise_until is not None and s < self.replicas.share_noise_until):
                    # b draws exactly a's noise from a copy of a's generator; b's own stream is
                    # left untouched for the independent steps after s*
                    step_gens = gens[:M] + [_copy_generator(g) for g in gens[:M]]
                x = self.update(eps, s, x, step_gens)
                if on_step is not None:
                    on_step(s, TrajectoryState(s + 1, x.detach().cpu(), [g.get_state() for g in gens]))
        finally:
            if self.hooks is not None:
                self.hooks.state.step = self.hooks.state.timestep = None
                if attention is not None:
                    attention.set_coupling(None)
        return x
