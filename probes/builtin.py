"""Built-in probes: ``residual_norms`` and ``difference_modes`` (THEORY §4, Protocol II).

Both read one per-block hook point (``resid_post`` by default) and reduce it online: memory is
one step's outputs plus, for ``difference_modes``, the step-0 basis of each layer.
``difference_modes`` is implemented in the core (:mod:`dithooks.analysis.difference_modes`, which
Protocol II extends) and registered here.
"""

from __future__ import annotations

from typing import Mapping

import torch

from dithooks.analysis import difference_modes as _core
from dithooks.analysis.difference_modes import per_block as _per_block
from dithooks.analysis.modes import DifferenceModeBasis  # noqa: F401  (re-exported)
from dithooks.hooks import HookContext

from .api import Option, Output, Probe, RunInfo, register_probe, unbatch


@register_probe("residual_norms")
class ResidualNorms(Probe):
    """RMS of a hook point per step, layer and sample (and cfg branch): sqrt(mean over token, channel of h²)."""

    options = {"hook": Option("resid_post", "per-block hook point to measure (short name)")}
    resumable = True  # each step's output depends on that step alone

    def hook_points(self) -> tuple[str, ...]:
        return (self.opts["hook"],)

    def start(self, run: RunInfo) -> None:
        _per_block(self, run)
        self.run = run
        self.rms = torch.full((len(run.layers),) + run.batch_shape, float("nan"), dtype=torch.float64)

    def observe(self, name: str, value: torch.Tensor, ctx: HookContext) -> None:
        v = unbatch(value.detach(), ctx).to(torch.float64)
        nb = len(ctx.batch_axes)
        self.rms[self.run.layer_pos(ctx.layer)] = v.pow(2).mean(dim=tuple(range(nb, v.dim()))).sqrt().cpu()

    def end_step(self, step: int) -> Mapping[str, Output]:
        out = {"rms": Output(self.rms.clone(), ("layer",) + self.run.batch_dims,
                             f"RMS of {self.opts['hook']} over its value dims")}
        self.rms.fill_(float("nan"))
        return out


@register_probe("difference_modes")
class DifferenceModes(_core.DifferenceModes):
    __doc__ = _core.DifferenceModes.__doc__
