"""Built-in probe ``attention_width``: effective attention width per layer and head (THEORY §5 [92]).

``N_eff,i = 1 / Σ_j A_ij²`` says how many keys query row i effectively reads (1: one key,
N: all keys alike). The attention processor computes it per head and query row from the
softmax in query tiles (``attn.n_eff``), so the full N×N patterns are never stored; this probe
reduces those rows to a few numbers per layer and head each step. Optionally it also keeps
the head-averaged attention rows of a few chosen query tokens (from ``attn.pattern_headmean``).
"""

from __future__ import annotations

from typing import Any, Mapping

import torch

from dithooks.hooks import HookContext

from .api import Option, Output, Probe, ProbeError, RunInfo, register_probe, unbatch
from .attention_width import width_summary

__all__ = ["AttentionWidth", "STATS", "parse_indices"]

#: order of the ``stat`` dim of ``n_eff_stats`` (quartiles interpolate linearly, as numpy does)
STATS: tuple[str, ...] = ("min", "q25", "median", "q75", "max", "mean")

N_EFF = "attn.n_eff"
HEADMEAN = "attn.pattern_headmean"


def parse_indices(text: str) -> tuple[int, ...]:
    """``"0,5,17"`` or ``"0-3,9"`` → indices; ``""`` → ``()`` (the CLI text of the ``queries`` option).

    The list syntax is :func:`dithooks.lists.parse_int_list`'s; a ValueError names the problem."""
    from dithooks.errors import DithooksError
    from dithooks.lists import parse_int_list

    text = text.strip().strip("[]()")
    if not text.strip():
        return ()
    try:
        return tuple(parse_int_list(text, "query indices"))
    except DithooksError as e:
        raise ValueError(str(e)) from None


@register_probe("attention_width")
class AttentionWidth(Probe):
    """Effective attention width N_eff = 1/Σ_j A_ij² per layer and head: quantiles over query rows [92]."""

    options = {
        "per_sample": Option(False, "keep the batch dims (replica, cfg, sample) instead of pooling them"),
        "queries": Option("", "query token indices, e.g. 0,5,17: also store their head-mean attention rows "
                              "(costs a batch×N×N head-mean pattern per hooked layer, transiently)",
                          parse_indices),
    }
    resumable = True  # every output of a step is computed from that step's attention alone

    def check_options(self) -> None:
        q = self.opts["queries"]
        # Python callers may pass an int or a list instead of text; store one canonical form
        if isinstance(q, int) and not isinstance(q, bool):
            q = (q,)
        if not isinstance(q, (tuple, list)) or not all(isinstance(i, int) and not isinstance(i, bool) for i in q):
            raise ProbeError(f"probe attention_width: queries must be token indices like 0,5,17, not {q!r}")
        if any(i < 0 for i in q):
            raise ProbeError(f"probe attention_width: queries must be token indices ≥ 0, not {list(q)}")
        self.opts["queries"] = tuple(q)
        if not isinstance(self.opts["per_sample"], bool):
            raise ProbeError(f"probe attention_width: per_sample must be true or false, "
                             f"not {self.opts['per_sample']!r}")

    def hook_points(self) -> tuple[str, ...]:
        # the head-mean pattern is B×N×N per layer: only ask the processor for it when rows are wanted
        return (N_EFF, HEADMEAN) if self.opts["queries"] else (N_EFF,)

    # -- run ------------------------------------------------------------------------------------
    def start(self, run: RunInfo) -> None:
        self.run = run
        self.queries: tuple[int, ...] = self.opts["queries"]
        # pooled: reduce over the batch axes (outermost dims after unbatch); per_sample: keep them
        nb = len(run.batch_axes)
        self.batch_dims: tuple[str, ...] = run.batch_dims if self.opts["per_sample"] else ()
        self.pool: tuple[int, ...] = () if self.opts["per_sample"] else tuple(range(nb))
        self.n_tokens: int | None = None  # known from the run, else when the first value arrives
        if run.num_tokens is not None:
            self._check_tokens(run.num_tokens)
        self._new_step()

    def _new_step(self) -> None:
        # layer position -> this step's results; a layer that never reports stays NaN
        self.stats: dict[int, torch.Tensor] = {}
        self.headmean: dict[int, torch.Tensor] = {}
        self.maps: dict[int, torch.Tensor] = {}

    def _check_tokens(self, n: int) -> None:
        """Refuse query indices beyond the token count, once N is known."""
        if self.n_tokens is None:
            self.n_tokens = n
            bad = [i for i in self.queries if i >= n]
            if bad:
                raise ProbeError(f"probe attention_width: queries {bad} out of range: "
                                 f"this model has {n} tokens (valid 0-{n - 1})")

    def observe(self, name: str, value: torch.Tensor, ctx: HookContext) -> None:
        i = self.run.layer_pos(ctx.layer)
        if name.endswith(N_EFF):
            v = unbatch(value.detach(), ctx)  # [*batch, head, query]
            self._check_tokens(v.shape[-1])
            # float64 on the CPU: the quantiles sort B·N values per head, small next to the pattern
            v = v.to("cpu", torch.float64)
            if self.opts["per_sample"]:
                rows = v  # [*batch, head, query]
            else:  # every query row of every batch row of this step is one sample of the head's widths
                rows = v.movedim(-2, 0).reshape(v.shape[-2], -1)  # [head, batch·query]
            s = width_summary(rows)
            self.stats[i] = torch.stack([s[k] for k in STATS], dim=-1)
            self.headmean[i] = v.mean(dim=self.pool + (v.dim() - 2,))  # [*batch?, query]
        elif name.endswith(HEADMEAN):
            p = unbatch(value.detach(), ctx)  # [*batch, query, key]
            self._check_tokens(p.shape[-2])
            # select the few rows on the device first: only Q×N per batch row leaves it
            rows = p[..., list(self.queries), :].to("cpu", torch.float64)
            self.maps[i] = rows.mean(dim=self.pool) if self.pool else rows

    def _stack(self, per_layer: dict[int, torch.Tensor]) -> torch.Tensor:
        shape = next(iter(per_layer.values())).shape
        out = torch.full((len(self.run.layers),) + tuple(shape), float("nan"), dtype=torch.float64)
        for i, t in per_layer.items():
            out[i] = t
        return out

    def end_step(self, step: int) -> Mapping[str, Output]:
        if not self.stats:  # nothing hooked this step (no captured layer ran)
            return {}
        b = self.batch_dims
        out: dict[str, Output] = {
            "n_eff_stats": Output(self._stack(self.stats), ("layer",) + b + ("head", "stat"),
                                  "N_eff = 1/sum_j A_ij^2 over query rows" + ("" if b else " and batch rows")
                                  + f" [92]; stat: {', '.join(STATS)}"),
            "n_eff_headmean": Output(self._stack(self.headmean), ("layer",) + b + ("query",),
                                     "N_eff of each query token, mean over heads"
                                     + ("" if b else " and batch rows")),
        }
        if self.maps:
            out["headmean_map"] = Output(self._stack(self.maps), ("layer",) + b + ("query_token", "key"),
                                         f"head-mean attention rows of query tokens {list(self.queries)}"
                                         + ("" if b else ", mean over batch rows") + "; rows sum to 1")
        self._new_step()
        return out

    def describe(self) -> dict[str, Any]:
        d = super().describe()
        d["stats"] = list(STATS)  # the stat dim's labels, kept in the store metadata too
        return d

