"""Linearised blocks as hook points: ``blocks.{i}.jvp.*``, computed while the model samples.

A JVP hook point is not a value the forward pass computes; it is what block ``i`` would do to a
small perturbation ``delta`` of its residual input, with the conditioning (t, y) held fixed
(THEORY §3). When any ``blocks.{i}.jvp.*`` point is attached, this extension puts a forward
pre-hook and a forward hook on block ``i``; the pre-hook reads the block's input and builds the
linearisation point and the direction, and every attached part and head term is computed in one
fused pass (:func:`dithooks.jvp.block_tangents`) and handed to the attached functions like any
other hook value. The block's own forward is untouched, so the model's output is bit-for-bit
what it is without the hook.

**Riding along the forward.** When the linearisation point is the block's own input (every
direction but ``"replica"``), the layer runs uncoupled (``g = 0`` is exactly uncoupled) and
nothing inside the block is intervened on, the block's forward computes the primal the JVP
needs. Passive hooks inside the block then keep what it computes (the adaLN vectors, ``Q, K, V``,
attention's ``A V``, ``h_mid``, the GELU pre-activation) and, after the forward, only the tangent
is propagated: no projection runs twice (``JVPSettings.ride_along``, default on; the values are
those of the separate primal to float32 rounding, tested). Otherwise the pre-hook computes the
JVP beside the forward from its own primal (``block_jvp``), as it always did; ``JVPHooks.calls``
counts the block calls of each path.

Directions (:class:`JVPSettings.direction`):

``"replica"``
    the batch holds replica pairs (the sampler's ``replica`` axis, outermost): linearise at the
    symmetric state ``(h^a + h^b)/2`` along ``(h^a - h^b)/2``, at the coupling ``g`` the block runs
    at this step. JVP values have the batch without the ``replica`` axis.
``"random"``
    a Gaussian direction per batch row, scaled to unit Frobenius norm, drawn from a generator
    seeded by (``seed``, step, layer): the same on a rerun or a resume.
a tensor
    ``(N, D)`` (every row) or ``(B, N, D)``; a ``{layer: tensor}`` dict gives one per block
    (e.g. a difference mode of that layer).
a callable
    ``fn(h, ctx) -> delta`` shaped like ``h``.
``"auto"`` (default)
    ``"replica"`` when the batch has a replica axis, else ``"random"``.
"""

from __future__ import annotations

import dataclasses
import numbers
from dataclasses import dataclass
from typing import Any, Mapping

import torch
from torch import nn

from .errors import DithooksError
from .hookpoints import HookPoint, block_name, block_template, split_name
from .jvp import (ALL_PARTS, AdaLNConditioning, BlockPrimal, _check_block, block_jvp, block_tangents,
                  gelu_linear_layers)

RESID = ("batch", "token", "channel")

PART_DOCS = {
    "full": "d resid_post: the whole block linearised along delta (identity included) = "
            "delta + attn + mlp + cross",
    "attn": "attention branch a1*W_O*(rho*R + xi*M): the gated coupled difference [25]",
    "routing": "routing term a1*W_O*(rho*A*dV): pattern frozen, values moved [25] "
               "(ungated: without rho when apply_gates is off)",
    "modulation": "modulation term a1*W_O*(xi*(dA_intra + g*dA_inter)*V): values frozen [25]",
    "modulation_intra": "a1*W_O*(dA_intra*V), never gated",
    "modulation_inter": "a1*W_O*(dA_inter*V), never gated (coupled replicas)",
    "mlp": "MLP branch a2*J_MLP(h_mid)*delta (adaLN2 included) [33]",
    "cross": "a2*J_MLP(h_mid)*attn: the a1*a2 cross term the propagator drops [31-33]",
}

HEAD_POINTS = {
    "heads.pattern": (("batch", "head", "query", "key"),
                      "attention pattern A at the linearisation point (window applied)"),
    "heads.v": (("batch", "head", "token", "head_channel"), "values V at the linearisation point"),
    "heads.dv": (("batch", "head", "token", "head_channel"), "value perturbation dV = W_V dx"),
    "heads.dlogits_intra": (("batch", "head", "query", "key"),
                            "intra-replica logit perturbation (dQ K^T + Q dK^T)/sqrt(d_h) [21]"),
    "heads.dlogits_inter": (("batch", "head", "query", "key"),
                            "inter-replica logit perturbation (dQ K^T - Q dK^T)/sqrt(d_h) [22]"),
}

OTHER_POINTS = {
    "direction": (RESID, "the direction delta the block is linearised along"),
    "point": (RESID, "the residual state the block is linearised at (the symmetric state for "
                     "replica directions)"),
}

LOCAL_NAMES = tuple(f"jvp.{p}" for p in ALL_PARTS) + tuple(f"jvp.{n}" for n in HEAD_POINTS) + \
    tuple(f"jvp.{n}" for n in OTHER_POINTS)
DIRECTIONS = ("auto", "replica", "random")


def jvp_points(layer: int, module_path: str, parts=None) -> dict[str, HookPoint]:
    """The JVP hook points of block ``layer`` (read-only) for the supported ``parts``
    (None = every part and the head terms: DiT). Head terms come with the ``attn`` part only."""
    pts = {}
    parts = set(ALL_PARTS if parts is None else parts)
    table = {**{p: (RESID, d) for p, d in PART_DOCS.items() if p in parts},
             **(HEAD_POINTS if "attn" in parts else {}), **OTHER_POINTS}
    for local, (dims, doc) in table.items():
        name = block_name(layer, "jvp." + local)
        pts[name] = HookPoint(name, block_template("jvp." + local), module_path, "jvp", dims, doc, layer)
    return pts


@dataclass
class JVPSettings:
    """How ``blocks.{i}.jvp.*`` values are computed (see the module docstring).

    ``g``: coupling at which the difference is propagated; None = what the block runs at now
    (the replica coupling of this step, 0 when uncoupled). ``apply_gates``: whether ``routing``
    and ``modulation`` carry rho(g), xi(g). ``ride_along``: reuse the block's forward where it
    computes the primal (module docstring); False computes every JVP from its own primal.
    """

    direction: Any = "auto"
    g: float | None = None
    apply_gates: bool = True
    seed: int = 0
    ride_along: bool = True

    def describe(self) -> dict[str, Any]:
        d = self.direction
        kind = d if isinstance(d, str) else ("callable" if callable(d) else
                                             "per-layer tensors" if isinstance(d, Mapping) else "tensor")
        return {"direction": kind, "g": self.g, "apply_gates": self.apply_gates, "seed": self.seed}


def check_direction(direction: Any) -> None:
    if isinstance(direction, str) and direction not in DIRECTIONS:
        raise DithooksError(f"unknown JVP direction {direction!r}; choose one of {', '.join(DIRECTIONS)}, "
                            "or give a tensor / {layer: tensor} / callable")


def check_settings(settings: JVPSettings) -> None:
    """One-line errors for settings that cannot be used."""
    check_direction(settings.direction)
    if settings.g is not None:
        from .gates import validate_coupling
        try:
            validate_coupling(settings.g)
        except (TypeError, ValueError) as e:
            raise DithooksError(f"JVP coupling: {e}") from None
    seed = settings.seed
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise DithooksError(f"JVP seed must be a whole number, got {seed!r}")


class _Tap:
    """Passive forward hooks inside one block that keep what the tangent pass reuses.

    They record only while armed (between the block's pre-hook and its post-hook on a
    ride-along call) and never return a value, so the block computes exactly what it would.
    """

    def __init__(self, block: nn.Module):
        self.armed = False
        self.got: dict[str, torch.Tensor] = {}
        attn = block.attn1
        self.keys = ["emb", "q", "k", "v", "h_mid"]
        self.handles = [block.norm1.linear.register_forward_hook(self._output("emb")),
                        attn.to_q.register_forward_hook(self._output("q")),
                        attn.to_k.register_forward_hook(self._output("k")),
                        attn.to_v.register_forward_hook(self._output("v")),
                        block.norm3.register_forward_pre_hook(self._input("h_mid"))]
        # optional pieces: without them the tangent pass forms them itself
        self.optional = []
        ff = gelu_linear_layers(block.ff)
        if ff is not None:
            self.optional.append("ff_hidden")
            self.handles.append(ff[0].proj.register_forward_hook(self._output("ff_hidden")))
        if isinstance(attn.to_out[0], nn.Linear):  # its input is A V, heads merged
            self.optional.append("attn_heads")
            self.handles.append(attn.to_out[0].register_forward_pre_hook(self._input("attn_heads")))

    def _output(self, key: str):
        def hook(module, args, output):
            if self.armed:
                self.got[key] = output
        return hook

    def _input(self, key: str):
        def hook(module, args):
            if self.armed:
                self.got[key] = args[0]
        return hook

    def arm(self) -> None:
        self.got = {}
        self.armed = True

    def take(self) -> dict[str, torch.Tensor]:
        got, self.got, self.armed = self.got, {}, False
        return got

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []
        self.armed, self.got = False, {}


@dataclass
class _Job:
    """What a block's pre-hook decided, for its post-hook to finish (ride-along calls)."""

    point: torch.Tensor
    delta: torch.Tensor
    axes: Any
    t: torch.Tensor
    y: torch.Tensor | None
    g: float
    window: int | None


# processors that call attn1.to_q/to_k/to_v once on the attention input (what the tap reads)
_KNOWN_PROCESSORS = ("AttnProcessor2_0", "AttnProcessor", "HookedAttnProcessor")


def _is_adaln_zero_block(block: nn.Module) -> bool:
    """Whether the DiT paths (fused tangents, ride-along) know this block."""
    try:
        _check_block(block)
    except NotImplementedError:
        return False
    return True


def _can_ride_along(block: nn.Module) -> bool:
    """Whether the block is the adaLN-Zero DiT block the ride-along tangent knows."""
    try:
        _check_block(block)
    except NotImplementedError:
        return False
    norm1 = block.norm1
    return (getattr(norm1, "emb", None) is not None and isinstance(getattr(norm1, "linear", None), nn.Linear)
            and all(isinstance(getattr(block.attn1, n, None), nn.Linear) for n in ("to_q", "to_k", "to_v")))


class JVPHooks:
    """Hook-manager extension owning the ``jvp`` hook points."""

    def __init__(self, manager, settings: JVPSettings | None = None):
        self._manager = manager
        self.settings = settings or JVPSettings()
        self._handles: dict[int, list[Any]] = {}
        self._taps: dict[int, _Tap] = {}
        self._jobs: dict[int, _Job] = {}
        self._generic: set[int] = set()  # layers linearised by torch.func.jvp (not adaLN-Zero DiT blocks)
        self._signatures: dict[int, tuple] = {}  # layer -> what its hooks were built for (see sync)
        #: how many block calls took each path since the last sync: {"ride_along": n, "separate": n}
        self.calls = {"ride_along": 0, "separate": 0}

    def configure(self, **changes: Any) -> None:
        """Change :class:`JVPSettings` fields (direction, g, apply_gates, seed, ride_along)."""
        for k in changes:
            if not hasattr(self.settings, k):
                raise DithooksError(f"unknown JVP setting {k!r}")
        check_settings(dataclasses.replace(self.settings, **changes))
        for k, v in changes.items():  # in place: whoever holds the settings sees the change
            setattr(self.settings, k, v)

    def use_settings(self, settings: JVPSettings) -> None:
        """Replace the settings by ``settings`` (validated like :meth:`configure`)."""
        if not isinstance(settings, JVPSettings):
            raise DithooksError(f"JVP settings must be a JVPSettings, got {type(settings).__name__}")
        check_settings(settings)
        self.settings = settings

    # -- the extension protocol ---------------------------------------------------------------
    def sync(self, manager) -> None:
        self._manager = manager
        wanted: dict[int, set[str]] = {}
        inside: set[int] = set()  # blocks with an intervention inside them
        for h in manager.attached():
            p = manager.adapter.point(h.name)
            if p.kind == "jvp":
                wanted.setdefault(p.layer, set()).add(split_name(h.name)[1][len("jvp."):])
            elif h.mode == "replace":
                inside.update(self._layers_inside(manager, p))
        # A layer's hooks are (re)built only when what it computes changed: its attached parts,
        # whether an intervention lies inside it, or the manager's own pre-hook dispatcher on the
        # block (ours must run after it, so that a replaced resid_pre is the state the block is
        # linearised at: a dispatcher created after ours means re-registering ours). Rebuilding
        # every layer on every attach made attaching N points O(N^2) (the probe runner attaches
        # hundreds one by one).
        blocks = manager.adapter.blocks()
        signatures = {}
        for layer, names in wanted.items():
            dispatcher = manager._torch_handles.get((manager.adapter.block_path(layer), "pre"))
            signatures[layer] = (frozenset(names), layer in inside, dispatcher.id if dispatcher is not None else None)
        for layer in list(self._handles):
            if signatures.get(layer) != self._signatures.get(layer):
                self._drop_layer(layer)
        self.calls = {"ride_along": 0, "separate": 0}
        self._generic = {layer for layer in wanted if not _is_adaln_zero_block(blocks[layer])}
        for layer, names in wanted.items():
            if layer in self._handles:
                continue
            block, names = blocks[layer], frozenset(names)
            self._handles[layer] = [
                block.register_forward_pre_hook(self._make_hook(layer, names), with_kwargs=True),
                block.register_forward_hook(self._make_post_hook(layer, names), with_kwargs=True)]
            # an intervention inside the block changes what its forward computes; today's JVP
            # ignores those, so such a block is linearised from its own primal (separate path)
            if layer not in inside and _can_ride_along(block):
                self._taps[layer] = _Tap(block)
        self._signatures = signatures

    def _drop_layer(self, layer: int) -> None:
        for handle in self._handles.pop(layer, ()):
            handle.remove()
        tap = self._taps.pop(layer, None)
        if tap is not None:
            tap.remove()
        self._jobs.pop(layer, None)

    @staticmethod
    def _layers_inside(manager, p) -> set[int]:
        """The blocks that hook point ``p`` lies inside (not on the block itself: resid_pre/post)."""
        if p.kind == "processor":
            return {p.layer}
        out = set()
        for layer in range(manager.adapter.num_layers):
            path = manager.adapter.block_path(layer)
            if p.module_path.startswith(path + "."):
                out.add(layer)
        return out

    # -- computing ------------------------------------------------------------------------------
    def _generic_jvp(self, layer: int, block: nn.Module, args: tuple, kwargs: dict, names: frozenset[str]) -> None:
        """``blocks.{i}.jvp.full`` of any family: ``torch.func.jvp`` of h -> resid_post(block with
        resid_pre replaced by h), through the block's own modules (hook functions suspended), every
        other input of the call (text stream, conditioning, rotary embeddings) held at its value.

        Replica directions run the pair for real: the primal is ``[p; p]`` (p the symmetric state),
        the tangent ``[delta; -delta]``, with the block's attention coupled at the JVP's g, and the
        value is half the difference of the tangent's halves (the difference-mode JVP the DiT path
        computes analytically)."""
        from contextlib import nullcontext

        from torch.nn.attention import SDPBackend, sdpa_kernel

        from .attention.install import installed_processors

        m = self._manager
        adapter = m.adapter
        pre_point = adapter.point(block_name(layer, "resid_pre"))
        post_point = adapter.point(block_name(layer, "resid_post"))
        h = pre_point.read(args, kwargs, None)
        point, delta, axes, rows = self._direction(layer, h, m.state.batch_axes)
        g_live, window = self._layer_attention(layer)
        g = g_live if self.settings.g is None else float(self.settings.g)
        paired = rows != slice(None)
        if g != 0.0 and not paired:
            raise DithooksError(f"block {layer}: a JVP at coupling g = {g} needs replica pairs "
                                "(direction 'replica')")
        values: dict[str, torch.Tensor] = {"point": point, "direction": delta}
        if "full" in names:
            x0 = torch.cat([point, point]) if paired else point
            dx = torch.cat([delta, -delta]) if paired else delta
            ext = m.extension("attention")
            swap = g != g_live or (window is not None) or (ext is not None and ext.processor(layer) is not None)
            # a fresh processor without emit: the block's coupling/window, nothing emitted
            make = (lambda _l: adapter.make_processor(layer, None, coupling=g if g != 0.0 else None, window=window))
            procs = installed_processors(adapter, [layer], make) if swap else nullcontext()

            def f(x):
                a, kw = pre_point.write(args, kwargs, None, x)
                return post_point.read(a, kw, block.forward(*a, **kw))

            with torch.no_grad(), m.suspended(), procs, sdpa_kernel(SDPBackend.MATH):
                _, tangent = torch.func.jvp(f, (x0,), (dx,))
            if paired:
                half = tangent.shape[0] // 2
                tangent = (tangent[:half] - tangent[half:]) / 2
            values["full"] = tangent
        self.calls["separate"] += 1
        info = {"g": g, "window": window, "apply_gates": self.settings.apply_gates,
                "attention": {"g": g_live, "window": window}}
        for local in names:
            m.run_hooks(adapter.point(block_name(layer, "jvp." + local)), values[local], batch_axes=axes, info=info)

    def _layer_attention(self, layer: int) -> tuple[float, int | None]:
        att = self._manager.extension("attention")
        if att is None:
            return 0.0, None
        g, r = att.layer_settings(layer)
        return float(g or 0.0), r

    def _direction(self, layer: int, h: torch.Tensor, axes) -> tuple[torch.Tensor, torch.Tensor, Any, slice]:
        """(linearisation point, delta, batch axes of the JVP values, rows of the conditioning)."""
        d = resolved_direction(self.settings.direction, axes)
        if d == "replica":
            if not _has_replica(axes):
                raise DithooksError("JVP direction 'replica' needs replica pairs (capture with --kappa/--coupling, "
                                    "or Sampler(replicas=...)); use direction 'random' or a tensor otherwise")
            half = h.shape[0] // 2
            a, b = h[:half], h[half:]
            return (a + b) / 2, (a - b) / 2, tuple(axes[1:]), slice(0, half)
        if isinstance(d, str):  # random
            step = self._manager.state.step or 0
            gen = torch.Generator(device="cpu").manual_seed(
                (int(self.settings.seed) * 1_000_003 + step * 1009 + layer) % 2**63)
            delta = torch.randn(h.shape, generator=gen, dtype=torch.float32).to(h.device, h.dtype)
            delta = delta / torch.linalg.vector_norm(delta.flatten(1), dim=1).clamp_min(1e-30)[:, None, None]
            return h, delta, axes, slice(None)
        if isinstance(d, Mapping):
            if layer not in d:
                raise DithooksError(f"no JVP direction given for block {layer} (directions for blocks "
                                    f"{sorted(d)})")
            d = d[layer]
        if callable(d) and not isinstance(d, torch.Tensor):
            ctx = self._manager.context(self._manager.adapter.point(block_name(layer, "jvp.direction")))
            d = d(h, ctx)
        delta = torch.as_tensor(d).to(h.device, h.dtype)
        try:
            delta = delta.expand_as(h)
        except RuntimeError:
            raise DithooksError(f"JVP direction of shape {tuple(delta.shape)} does not fit block {layer}'s "
                                f"input {tuple(h.shape)} (give (tokens, channels) or (batch, tokens, channels))") from None
        return h, delta, axes, slice(None)

    def _rides_along(self, layer: int, block: nn.Module, h: torch.Tensor, point: torch.Tensor,
                     g_live: float, window: int | None, kwargs: Mapping[str, Any]) -> bool:
        """Whether this call's forward computes the primal at the linearisation point as the
        separate path would (then the tangent reuses it): the point is the block's input, the layer
        runs uncoupled (g = 0 is exactly uncoupled) with the window the JVP uses, plain self-attention."""
        if not self.settings.ride_along or layer not in self._taps or point is not h or g_live != 0.0:
            return False
        if any(kwargs.get(k) is not None for k in ("attention_mask", "encoder_hidden_states",
                                                   "cross_attention_kwargs", "added_cond_kwargs")):
            return False
        proc = getattr(block.attn1, "processor", None)
        if type(proc).__name__ not in _KNOWN_PROCESSORS:
            return False
        return getattr(proc, "g", None) in (None, 0.0) and getattr(proc, "window", None) == window

    def _make_hook(self, layer: int, names: frozenset[str]):
        def pre_hook(block, args, kwargs):
            m = self._manager
            if layer in self._generic:
                self._generic_jvp(layer, block, args, kwargs, names)
                return None
            h = args[0] if args else kwargs["hidden_states"]
            t, y = kwargs.get("timestep"), kwargs.get("class_labels")
            if t is None:
                raise DithooksError(f"block {layer} was called without a timestep: cannot linearise it")
            point, delta, axes, rows = self._direction(layer, h, m.state.batch_axes)
            g_live, window = self._layer_attention(layer)
            g = g_live if self.settings.g is None else float(self.settings.g)
            t = torch.as_tensor(t).reshape(-1).expand(h.shape[0])[rows]
            y = None if y is None else torch.as_tensor(y).reshape(-1).expand(h.shape[0])[rows]
            job = _Job(point, delta, axes, t, y, g, window)
            if self._rides_along(layer, block, h, point, g_live, window, kwargs):
                self._taps[layer].arm()  # the post-hook finishes from what the forward computes
                self._jobs[layer] = job
                return None
            self._jobs.pop(layer, None)
            if layer in self._taps:
                self._taps[layer].take()  # disarmed, holding nothing (a call before may have failed)
            self._finish(layer, block, names, job, None)
            return None
        return pre_hook

    def _make_post_hook(self, layer: int, names: frozenset[str]):
        def post_hook(block, args, kwargs, output):
            job = self._jobs.pop(layer, None)
            if job is None:
                return None
            got = self._taps[layer].take()
            self._finish(layer, block, names, job, got)
            return None
        return post_hook

    def _finish(self, layer: int, block: nn.Module, names: frozenset[str], job: _Job,
                got: dict[str, torch.Tensor] | None) -> None:
        """Compute every attached JVP value of this call and hand it to the attached functions."""
        m = self._manager
        parts = tuple(p for p in ALL_PARTS if p in names)
        heads = tuple(n for n in HEAD_POINTS if n in names)
        values: dict[str, torch.Tensor] = {"point": job.point, "direction": job.delta}
        tap = self._taps.get(layer)
        complete = got is not None and tap is not None and all(k in got for k in tap.keys)
        with torch.no_grad():
            if parts or heads:
                if complete:
                    primal = BlockPrimal(AdaLNConditioning(*got["emb"].chunk(6, dim=1)),
                                         (got["q"], got["k"], got["v"]), got["h_mid"], got.get("ff_hidden"),
                                         got.get("attn_heads"))
                    values.update(block_tangents(block, job.point, job.delta, primal, parts, job.g,
                                                 self.settings.apply_gates, job.window, heads))
                else:
                    values.update(block_jvp(block, job.point, job.delta, timestep=job.t, class_labels=job.y,
                                            parts=parts, heads=heads, g=job.g,
                                            apply_gates=self.settings.apply_gates, window=job.window))
        self.calls["ride_along" if complete else "separate"] += 1
        g_live, window_live = self._layer_attention(layer)
        info = {"g": job.g, "window": job.window, "apply_gates": self.settings.apply_gates,
                "attention": {"g": g_live, "window": window_live},
                "linearise": _lineariser(block, job), "out_proj": _out_projection(block.attn1),
                "timestep": job.t, "class_labels": job.y}  # the conditioning rows of this call
        for local in names:
            m.run_hooks(m.adapter.point(block_name(layer, "jvp." + local)), values[local], batch_axes=job.axes,
                        info=info)


def _lineariser(block: nn.Module, job: _Job):
    """``ctx.info["linearise"]``: DiT block ``JVPs`` of this call's block at any point/direction.

    ``linearise(point, direction, parts, *, apply_gates=False) -> {part: tensor}`` is
    :func:`~dithooks.jvp.block_jvp` of this block with this call's conditioning rows (repeated
    when ``point`` stacks K copies of the call's rows along the batch), at the JVP's coupling g
    and window."""
    def linearise(point: torch.Tensor, direction: torch.Tensor, parts, *, apply_gates: bool = False):
        rows = job.t.shape[0]
        if point.shape[0] % rows:
            raise DithooksError(f"linearise: {point.shape[0]} rows is not a multiple of the call's {rows}")
        k = point.shape[0] // rows
        y = None if job.y is None else job.y.repeat(k)
        with torch.no_grad():
            return block_jvp(block, point, direction, timestep=job.t.repeat(k), class_labels=y,
                             parts=tuple(parts), g=job.g, apply_gates=apply_gates, window=job.window)
    return linearise


def _out_projection(attn: nn.Module):
    """``ctx.info["out_proj"]``: ``z -> W_O z / rescale`` (no bias, no gate) for per-head ``z``
    (B, heads, N, d_head), in residual-stream units (B, N, D), in ``z``'s dtype."""
    def out_proj(z: torch.Tensor) -> torch.Tensor:
        b, h, n, d = z.shape
        w = attn.to_out[0].weight
        res = torch.nn.functional.linear(z.transpose(1, 2).reshape(b, n, h * d), w.to(z.dtype))
        return res / attn.rescale_output_factor if attn.rescale_output_factor != 1.0 else res
    return out_proj


def _has_replica(axes) -> bool:
    return bool(axes) and axes[0][0] == "replica"


def resolved_direction(direction: Any, axes) -> Any:
    """``"auto"`` made concrete for a sampler batch ``axes``; anything else as given."""
    if isinstance(direction, str) and direction == "auto":
        return "replica" if _has_replica(axes) else "random"
    return direction


def jvp_batch_axes(axes, direction: Any) -> tuple[tuple[str, int], ...]:
    """The batch layout of JVP values for a sampler batch ``axes`` (no replica axis for pairs)."""
    d = resolved_direction(direction, axes)
    if isinstance(d, str) and d == "replica" and _has_replica(axes):
        return tuple(axes[1:])
    return tuple(axes)

