"""Capture under diffusers' context parallelism: one store, written by rank 0 (docs/scaling.md §4).

``torchrun --nproc-per-node W -m dithooks.cli capture --context-parallel ulysses=W ...`` (or
:func:`capture_context_parallel` on every rank of a process group). Every rank loads the same
model, builds the same session (same checks, same inputs) and calls
``model.enable_parallelism(config=ContextParallelConfig(ulysses_degree=W))``; diffusers then cuts
the image and text sequences into W token shards at the model's entry and gathers the output
after ``proj_out``. Every rank samples the same trajectory (the model output, gathered, is the
same on every rank). The recorded hook points between entry and ``proj_out`` see a rank's shard:
each read is wrapped so that it all-gathers the shards along the point's token dim (``token``
or ``text_token``; a collective every rank runs in the same order, as SPMD code does) and
hands the whole value to the recorder **on rank 0 only**. Vector points (adaLN, ``time_embed``)
are the same on every rank and ``final.out`` is read after diffusers' own gather: no gather.
Single-stream blocks' joint ``[text; image]`` sequence is cut at the *local* text length (the
Flux adapter records it after diffusers' split), so their image/text points are plain shards.

Only rank 0 opens, writes and finishes the store; it sends the first step to run (and, on
``--resume``, the stored state to continue from) to the other ranks, which open nothing and
write nothing. Setup errors (options, model, refusals) are agreed on by all ranks before
anything runs (every rank raises the first one, one line); a rank failing mid-run leaves its
one-line error in the process group's key-value store and leaves the group, so the others'
next collective fails at once and they stop with ``rank r failed: ...`` (rank 0 marks the store
``failed``, keeping the finished steps; ``--resume`` continues it).

Refused (one line each), because the values would be wrong or the plumbing is missing:
attention-internal points (``kind == "processor"``: dithooks' processors attend over the local
tokens only, outside diffusers' all-to-all), windows and replica coupling (the same
processors), JVP points, probes, raw ``modules.*`` points (their token layout is unknown),
families whose diffusers model has no ``_cp_plan`` (DiT, PixArt, SD3 in diffusers 0.42), ring
attention (diffusers' native SDPA cannot return the log-sum-exp it needs), token counts or
heads that W does not divide (diffusers' equipartition), and ``--workers``/``--scheduler``.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch

from ..errors import DithooksError
from ..hooks import HookContext
from ..scale.context_parallel import gather_tokens
from .multi import torchrun_rank
from .session import CaptureResult, CaptureSession

__all__ = ["CPSpec", "ContextParallel", "ContextParallelSession", "RankFailed", "capture_context_parallel",
           "check_context_parallel", "parse_context_parallel", "token_dim"]

TOKEN_DIMS = ("token", "text_token")
ERROR_KEY = "dithooks/context-parallel/error"
KINDS = ("ulysses", "ring")


@dataclass(frozen=True)
class CPSpec:
    """``ulysses=W`` (or ``ring=W``, refused for now)."""

    kind: str
    degree: int

    def __str__(self) -> str:
        return f"{self.kind}={self.degree}"

    def config(self) -> Any:
        from diffusers import ContextParallelConfig

        return ContextParallelConfig(**{f"{self.kind}_degree": self.degree})


def parse_context_parallel(text: str | CPSpec) -> CPSpec:
    """``"ulysses=2"`` -> CPSpec("ulysses", 2); anything else is a one-line error."""
    if isinstance(text, CPSpec):
        return text
    kind, sep, n = str(text).strip().partition("=")
    kind = kind.strip().lower()
    if not sep or kind not in KINDS or not n.strip().isdigit() or int(n) < 2:
        raise DithooksError(f"--context-parallel takes ulysses=W (W >= 2, the number of ranks), got {text!r}")
    if kind == "ring":
        raise DithooksError("--context-parallel ring=W is not supported: ring attention needs an attention backend "
                            "that returns the log-sum-exp (diffusers' native SDPA does not); use ulysses=W")
    return CPSpec(kind, int(n))


def _one_line(e: BaseException) -> str:
    text = str(e) if isinstance(e, DithooksError) else f"{type(e).__name__}: {e}"
    return " ".join(text.split()) or type(e).__name__


def _is_peer_failure(e: BaseException) -> bool:
    """A collective that failed because another rank left (gloo/NCCL transport errors)."""
    dist_error = getattr(torch.distributed, "DistError", ())
    text = str(e)
    return isinstance(e, dist_error) or (isinstance(e, RuntimeError) and any(
        k in text for k in ("gloo", "NCCL", "Connection closed by peer", "Connection reset by peer")))


def _default_store() -> Any:
    try:
        from torch.distributed.distributed_c10d import _get_default_store

        return _get_default_store()
    except Exception:  # no group, or a torch without it: errors are then not shared
        return None


# -- the process group -------------------------------------------------------------------------------
class ContextParallel:
    """The ranks of one context-parallel capture: the process group and how ranks agree."""

    def __init__(self, spec: CPSpec, rank: int, world: int, own_group: bool):
        self.spec, self.rank, self.world, self.own_group = spec, rank, world, own_group

    @classmethod
    def start(cls, spec: str | CPSpec, device: str = "cpu") -> "ContextParallel":
        """Join (or, under torchrun, create) the default process group; ``W`` must be its size.

        On a CPU-only machine diffusers computes ``rank % torch.accelerator.device_count()`` (a
        division by zero): there ``torch.accelerator.device_count`` is made to answer 1, the only
        change to torch (docs/scaling.md §4)."""
        import torch.distributed as dist

        spec = parse_context_parallel(spec)
        own = False
        if not dist.is_initialized():
            world = (torchrun_rank() or (0, 1))[1]
            if world < 2:
                raise DithooksError(f"--context-parallel {spec} runs one process per rank: launch it with "
                                    f"torchrun --nproc-per-node {spec.degree} (WORLD_SIZE is {world} here)")
            dev = torch.device(device)
            if dev.type == "cuda":
                torch.cuda.set_device(dev)
                dist.init_process_group("cpu:gloo,cuda:nccl")
            else:
                dist.init_process_group("gloo")
            own = True
        rank, world = dist.get_rank(), dist.get_world_size()
        cp = cls(spec, rank, world, own)
        try:
            cp.agree(lambda: cp._check_world(device))
        except BaseException:
            cp.close()
            raise
        return cp

    def _check_world(self, device: str) -> None:
        if self.world != self.spec.degree:
            raise DithooksError(f"--context-parallel {self.spec} needs {self.spec.degree} ranks, this run has "
                                f"{self.world}: torchrun --nproc-per-node {self.spec.degree}")
        acc = getattr(torch, "accelerator", None)
        if torch.device(device).type == "cpu" and acc is not None and acc.device_count() == 0:
            acc.device_count = lambda: 1  # see start()

    def agree(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` on every rank; if it failed on any, every rank raises the first failure (one
        line, its own when it failed itself) - so no rank goes on to wait for one that stopped."""
        import torch.distributed as dist

        out, mine, err = None, None, None
        try:
            out = fn()
        except Exception as e:
            mine, err = e, _one_line(e)
        errs: list[Any] = [None] * self.world
        dist.all_gather_object(errs, err)
        for r, msg in enumerate(errs):
            if msg is not None:
                if r == self.rank and isinstance(mine, DithooksError):
                    raise mine
                raise DithooksError(msg if r == self.rank else f"rank {r}: {msg}")
        return out

    def session(self, make: Callable[[], CaptureSession] | CaptureSession) -> "ContextParallelSession":
        """The context-parallel session of ``make()`` (every rank), the model parallelised."""
        base = self.agree(make if callable(make) else (lambda: make))
        session = self.agree(lambda: ContextParallelSession.of(base, self))
        self.agree(session.enable)
        return session

    # -- failures --------------------------------------------------------------------------------------
    def report(self, e: BaseException) -> None:
        """Leave this rank's failure for the others, then leave the group so that their next
        collective fails at once instead of waiting for this rank."""
        import torch.distributed as dist

        store = _default_store()
        if store is not None and not isinstance(e, RankFailed):
            with contextlib.suppress(Exception):
                store.set(ERROR_KEY, f"rank {self.rank} failed: {_one_line(e)}")
        # the group's collectives are out of step now: leave it even when the caller created it
        if dist.is_initialized():
            with contextlib.suppress(Exception):
                dist.destroy_process_group()
        self.own_group = False

    def peer_error(self, e: BaseException, wait_s: float = 3.0) -> "RankFailed":
        """The one-line error of the rank whose leaving made this collective fail."""
        store = _default_store()
        msg = None
        t0 = time.monotonic()
        while store is not None and time.monotonic() - t0 < wait_s:
            try:
                if store.check([ERROR_KEY]):
                    msg = store.get(ERROR_KEY).decode()
                    break
            except Exception:
                break  # the store went with the rank that hosted it
            time.sleep(0.05)
        if msg is None:
            msg = f"another rank left the run ({_one_line(e)[:160]})"
        return RankFailed(msg)

    def close(self) -> None:
        import torch.distributed as dist

        if self.own_group and dist.is_initialized():
            with contextlib.suppress(Exception):
                dist.destroy_process_group()
        self.own_group = False


class RankFailed(DithooksError):
    """Another rank failed; the message is its one-line error (``rank r failed: ...``)."""


# -- hooks: gather the shards, record on rank 0 -------------------------------------------------------------
def token_dim(point: Any) -> int | None:
    """The dim a point's value is sharded along under context parallelism, or None (not sharded:
    vectors such as adaLN chunks and ``temb``, and ``final.out``, read after diffusers' gather)."""
    if point.name == "final.out":
        return None
    for i, d in enumerate(point.dims):
        if d in TOKEN_DIMS:
            return i
    return None


class _GatheringHooks:
    """The session's hook manager, whose read hooks (``hooks(read=...)`` and ``add_hook``) gather
    each value's token shards (every rank) and call the read function with the whole value on
    rank 0 only. Which dim to gather is looked up from the point the hook fires on."""

    def __init__(self, manager: Any, rank: int, cp: ContextParallel):
        self._manager, self._rank, self._cp = manager, rank, cp
        self._dims: dict[str, int | None] = {}

    def __getattr__(self, name: str) -> Any:
        return getattr(self._manager, name)

    def _wrap(self, fn: Callable[[torch.Tensor, HookContext], Any]) -> Callable:
        rank, dims = self._rank, self._dims

        def read(value: torch.Tensor, ctx: HookContext) -> None:
            dim = dims.get(ctx.name, -1)
            if dim == -1:
                dim = dims[ctx.name] = token_dim(ctx.point)
            if dim is not None:  # a rank gone fails the collective: _Sampler.run names it
                value = gather_tokens(value, dim, equal=True)  # equal shards: checked
            if rank == 0:
                fn(value, ctx)

        return read

    def add_hook(self, names: Any, fn: Callable) -> Any:
        return self._manager.add_hook(names, self._wrap(fn))

    def add_intervention(self, names: Any, fn: Callable) -> Any:
        raise DithooksError("interventions are not supported under context parallelism")

    @contextlib.contextmanager
    def hooks(self, read: dict | None = None, replace: dict | None = None) -> Iterator[Any]:
        if replace:
            raise DithooksError("interventions are not supported under context parallelism")
        with self._manager.hooks(read={n: self._wrap(fn) for n, fn in (read or {}).items()}) as m:
            yield m


class _Sampler:
    """The session's sampler; a collective that fails because a rank left becomes that rank's error."""

    def __init__(self, sampler: Any, cp: ContextParallel):
        self._sampler, self._cp = sampler, cp

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sampler, name)

    def run(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return self._sampler.run(*args, **kwargs)
        except RankFailed:
            raise
        except Exception as e:
            if _is_peer_failure(e):
                raise self._cp.peer_error(e) from None
            raise


# -- the session -------------------------------------------------------------------------------------------
def check_context_parallel(session: CaptureSession, spec: CPSpec) -> None:
    """Refuse, in one line, what cannot be right (or is not built) under context parallelism."""
    import diffusers

    cfg, adapter = session.cfg, session.loaded.adapter
    model = session.loaded.transformer
    family = getattr(adapter, "family", type(adapter).__name__)
    if getattr(type(model), "_cp_plan", None) is None:
        raise DithooksError(f"{family} does not support context parallelism in diffusers {diffusers.__version__} "
                            f"({type(model).__name__} has no _cp_plan)")
    if family != "flux":
        raise DithooksError(f"context-parallel capture is built for flux only, not {family}")
    if cfg.probes:
        raise DithooksError("probes cannot run under --context-parallel (their state is per rank): capture, then "
                            "run them offline")
    if cfg.replicas is not None:
        raise DithooksError("replica pairs/coupling are not supported under --context-parallel (coupling runs in "
                            "dithooks' attention processors, which see the local tokens only)")
    if cfg.window is not None:
        raise DithooksError("--window is not supported under --context-parallel (windows run in dithooks' "
                            "attention processors, which see the local tokens only)")
    for name in session.hook_names:
        if name.startswith("modules."):
            raise DithooksError(f"{name}: raw module points are not supported under --context-parallel (their "
                                f"token layout on a rank is not known)")
        kind = adapter.point(name).kind
        if kind == "processor":
            raise DithooksError(f"{name}: attention-internal points are computed by dithooks' attention processors "
                                f"over a rank's local tokens only, so they are wrong under --context-parallel; "
                                f"capture them without it")
        if kind == "jvp":
            raise DithooksError(f"{name}: JVP points are not supported under --context-parallel (the "
                                f"linearisation would see one rank's tokens)")
    w = spec.degree
    heads = int(model.config.num_attention_heads)
    image, text = int(adapter.geometry.num_tokens), session.conditioning.text_tokens
    if heads % w:
        raise DithooksError(f"--context-parallel {spec}: Ulysses splits the {heads} attention heads over {w} ranks; "
                            f"choose W dividing {heads}")
    for what, n in (("image", image), ("text", text)):
        if n is not None and int(n) % w:
            raise DithooksError(f"--context-parallel {spec}: diffusers cuts the {int(n)} {what} tokens into {w} "
                                f"equal shards; choose W dividing {int(n)}")


class ContextParallelSession(CaptureSession):
    """A :class:`CaptureSession` run by every rank; rank 0 alone holds and writes the store."""

    cp: ContextParallel

    @classmethod
    def of(cls, base: CaptureSession, cp: ContextParallel) -> "ContextParallelSession":
        """This rank's session from an ordinary one (same checks already run): the refusals, the
        gathering hooks, the peer-aware sampler."""
        check_context_parallel(base, cp.spec)
        self = cls.__new__(cls)
        self.__dict__.update(base.__dict__)
        self.cp = cp
        self.hooks = _GatheringHooks(base.hooks, cp.rank, cp)
        self.sampler = _Sampler(base.sampler, cp)
        self._opened: tuple[int, Any] | None = None
        return self

    def enable(self) -> None:
        """``model.enable_parallelism(config=ContextParallelConfig(ulysses_degree=W))`` on this rank."""
        model = self.loaded.transformer
        if getattr(model, "_parallel_config", None) is None:
            model.enable_parallelism(config=self.cp.spec.config())

    # -- rank 0 opens the store and tells the others where to start ---------------------------------------
    def open_store(self) -> tuple[Any, int]:
        import torch.distributed as dist

        if self.cp.rank != 0:
            raise DithooksError("only rank 0 opens the store")
        box: list[Any] = [None]
        failure: BaseException | None = None
        group = start = None
        try:
            group, start = super().open_store()
            try:
                state = self._state_at(group, start) if start < self.cfg.sampler.steps else (None, None)
            except BaseException:
                self.release_store()
                raise
            self._opened = (start, state)
            box = [("ok", start, state[0])]
        except Exception as e:
            failure, box = e, [("error", _one_line(e))]
        dist.broadcast_object_list(box, src=0)
        if failure is not None:
            raise failure
        return group, start

    def _state_at(self, group: Any, step: int) -> tuple[Any, Any]:
        if self._opened is not None and self._opened[0] == step:
            return self._opened[1]
        return super()._state_at(group, step)

    def run(self, progress: Callable | None = None) -> CaptureResult | None:
        """Rank 0: the capture (its result); other ranks: the same sampling, nothing written (None).
        A failure on any rank stops every rank (see the module docstring)."""
        try:
            return super().run(progress) if self.cp.rank == 0 else self._follow()
        except BaseException as e:
            self.cp.report(e)
            if isinstance(e, (DithooksError, KeyboardInterrupt, SystemExit)):
                raise
            # one line on every rank (rank 0 has marked the store failed by now)
            raise RankFailed(f"rank {self.cp.rank} failed: {_one_line(e)}") from e

    def _follow(self) -> None:
        import torch.distributed as dist

        box: list[Any] = [None]
        try:
            dist.broadcast_object_list(box, src=0)
        except Exception as e:
            if _is_peer_failure(e):
                raise self.cp.peer_error(e) from None
            raise
        if box[0][0] == "error":
            raise RankFailed(f"rank 0 failed: {box[0][1]}")
        _, start, state = box[0]
        cfg = self.cfg
        if start >= cfg.sampler.steps:
            return None
        read = {n: _ignore for n in self.hook_names}
        with self.hooks.hooks(read=read):
            # state None (step 0): Sampler.run draws rank 0's start itself (seeded per sample)
            self.sampler.run(self.conditioning.sampler_input, cfg.seeds, state=state)
        return None


def _ignore(value: torch.Tensor, ctx: HookContext) -> None:
    return None


def capture_context_parallel(cfg: Any, spec: str | CPSpec, loaded: Any = None,
                             progress: Callable | None = None) -> CaptureResult | None:
    """Run ``cfg`` (a :class:`~dithooks.capture.CaptureConfig`) under context parallelism; call on
    every rank (the default process group, or torchrun's environment). Rank 0 returns the
    capture's result, the others None."""
    cp = ContextParallel.start(spec, getattr(cfg, "device", "cpu"))
    try:
        session = cp.session(lambda: CaptureSession(cfg, loaded))
        return session.run(progress)
    finally:
        cp.close()
