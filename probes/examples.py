"""The worked example of docs/writing-probes.md (the test checks the doc shows this code verbatim).

Run it: ``dithooks probe dithooks.probes.examples:BlockUpdateRatio --steps 20 --seeds 0-3 --out u.zarr``
"""

from __future__ import annotations

import torch

from dithooks.probes.api import Option, Output, Probe, register_probe, unbatch


@register_probe("block_update_ratio")
class BlockUpdateRatio(Probe):
    """How much each block changes the residual stream: ‖h_post − h_pre‖ / ‖h_pre‖ per sample."""

    needs = ("resid_pre", "resid_post")
    options = {"eps": Option(1e-12, "added to ‖h_pre‖ so an all-zero input cannot divide by zero")}

    def start(self, run):
        self.run = run
        self.pre = {}  # layer -> resid_pre of this step, until the block's resid_post arrives
        self.ratio = torch.zeros((len(run.layers),) + run.batch_shape)
        self.peak = torch.zeros(len(run.layers))  # largest mean ratio over all steps (for finish)

    def observe(self, name, value, ctx):
        v = unbatch(value, ctx).double()  # [cfg?, sample, token, channel]
        if name.endswith("resid_pre"):
            self.pre[ctx.layer] = v.clone()
            return
        pre = self.pre.pop(ctx.layer)
        over = tuple(range(len(ctx.batch_axes), v.dim()))  # the value dims
        ratio = (v - pre).square().sum(over).sqrt() / (pre.square().sum(over).sqrt() + self.opts["eps"])
        i = self.run.layer_pos(ctx.layer)
        self.ratio[i] = ratio
        self.peak[i] = max(self.peak[i], ratio.mean())

    def end_step(self, step):
        return {"ratio": Output(self.ratio.clone(), ("layer",) + self.run.batch_dims,
                                "‖h_post − h_pre‖ / ‖h_pre‖ of each block")}

    def finish(self):
        return {"peak": Output(self.peak, ("layer",), "largest per-step mean ratio of each block")}
