"""Hook points under context parallelism: gather the token shards before recording.

Under diffusers' context parallelism (``model.enable_parallelism(config=ContextParallelConfig(
ulysses_degree=W or ring_degree=W))``, for models with a ``_cp_plan``: Flux, Flux 2, QwenImage,
Wan, LTX, ...) the model's input sequences are cut along the token dim at the model's entry
(``hidden_states`` and ``encoder_hidden_states`` on dim 1, each with ``torch.chunk``: rank r holds
tokens ``[r·n/W, (r+1)·n/W)`` of each) and gathered again after ``proj_out``; attention alone
exchanges tokens (Ulysses: all-to-all of q/k/v over heads; ring: k/v passed around). Every hook
point in between - residual stream, adaLN, MLP, attention output - therefore sees **a shard of the
tokens** on each rank: the same batch and channels, ``n/W`` of the tokens, at the rank's offset.
In single-stream (joint) blocks a rank's sequence is ``[its text shard, its image shard]``, so a
plain concatenation of the ranks' shards is *not* the joint sequence in order.

What dithooks does (the simplest honest option): a read function wrapped by :func:`gathered`
all-gathers the value's shards along the token dim (lengths may differ between ranks), in rank
order and segment by segment for joint sequences, and calls the wrapped function with the whole
value - on rank 0 only by default, so one process records. The hook stays passive (the value the
model goes on with is the rank's own shard, untouched). The gather is a collective: every rank
must attach the same hooks, which SPMD code does by construction.

``dithooks capture --context-parallel ulysses=W`` records through :func:`gather_tokens`
(:mod:`dithooks.capture.context_parallel`; the Flux adapter cuts single blocks' joint sequences
at the local text length, so its points are plain shards there). Not valid under context
parallelism, and refused by the capture (see docs/scaling.md §4): dithooks' own attention
processors (q/k/v, patterns, windows, coupling) compute attention from the local tokens only and
do not take part in diffusers' all-to-all, so attention-internal points and interventions are wrong.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist

__all__ = ["equipartition", "gather_tokens", "gathered", "shard_offsets"]


def equipartition(total: int, world: int) -> list[tuple[int, int]]:
    """(offset, length) of each rank's shard when ``total`` tokens are cut as diffusers cuts them
    (``torch.chunk``; ``tensor_split`` for the "anything" modes gives the same when W divides n)."""
    sizes = [c.shape[0] for c in torch.empty(total).chunk(world)]
    sizes += [0] * (world - len(sizes))
    offsets = [sum(sizes[:r]) for r in range(world)]
    return list(zip(offsets, sizes))


def shard_offsets(local: int, group: Any = None) -> list[tuple[int, int]]:
    """(offset, length) of every rank's shard, from each rank's local length (a collective)."""
    world = dist.get_world_size(group)
    n = torch.tensor([int(local)], dtype=torch.int64)
    got = [torch.zeros(1, dtype=torch.int64) for _ in range(world)]
    dist.all_gather(got, n, group=group)
    lengths = [int(g.item()) for g in got]
    return [(sum(lengths[:r]), lengths[r]) for r in range(world)]


def _gather_one(value: torch.Tensor, dim: int, group: Any,
                equal: bool = False) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    n = value.shape[dim]
    offsets = ([(r * n, n) for r in range(dist.get_world_size(group))] if equal
               else shard_offsets(n, group))
    most = max(n for _, n in offsets)
    v = value.detach()
    if v.shape[dim] < most:  # all_gather needs equal shapes: pad, then cut each shard back
        pad = list(v.shape)
        pad[dim] = most - v.shape[dim]
        v = torch.cat([v, v.new_zeros(pad)], dim=dim)
    parts = [torch.empty_like(v) for _ in offsets]
    dist.all_gather(parts, v.contiguous(), group=group)
    return torch.cat([p.narrow(dim, 0, n) for p, (_, n) in zip(parts, offsets)], dim=dim), offsets


def gather_tokens(value: torch.Tensor, dim: int = 1, group: Any = None, segments: Sequence[int] | None = None,
                  return_offsets: bool = False, equal: bool = False) -> Any:
    """The whole value from every rank's token shard ``value`` (a collective: call on every rank).

    ``dim``: the token dim (1 for ``(batch, token, channel)``). ``segments``: for a sequence that
    is a concatenation of separately sharded sequences (a joint block's ``[text, image]``), this
    rank's local length of each; each segment is gathered on its own and the results concatenated
    segment by segment. With ``return_offsets``, also each segment's per-rank ``(offset, length)``.
    ``equal``: every rank's shard is known to be as long as this one (diffusers' equipartition),
    so the lengths are not exchanged (one collective instead of two).
    The value is not changed (a copy is gathered)."""
    if not dist.is_available() or not dist.is_initialized():
        full = value.detach().clone()
        offs = [[(0, n)] for n in (segments or [value.shape[dim]])]
        return (full, offs) if return_offsets else full
    if segments is None:
        segments = [value.shape[dim]]
    if sum(segments) != value.shape[dim]:
        raise ValueError(f"segments {list(segments)} do not add up to the token dim ({value.shape[dim]})")
    pieces, offsets, at = [], [], 0
    for n in segments:
        full, offs = _gather_one(value.narrow(dim, at, n), dim, group, equal)
        pieces.append(full)
        offsets.append(offs)
        at += n
    out = torch.cat(pieces, dim=dim) if len(pieces) > 1 else pieces[0]
    return (out, offsets) if return_offsets else out


def gathered(fn: Callable[[torch.Tensor, Any], Any], dim: int = 1, group: Any = None,
             segments: Callable[[torch.Tensor, Any], Sequence[int]] | Sequence[int] | None = None,
             ranks: Sequence[int] | None = (0,)) -> Callable[[torch.Tensor, Any], None]:
    """A read function for :class:`dithooks.hooks.HookManager` that gathers the token shards and
    calls ``fn(whole_value, ctx)`` on ``ranks`` (None: every rank). Attach it on every rank.

    ``segments``: see :func:`gather_tokens`; a callable ``(value, ctx) -> lengths`` may work them
    out per call. The wrapped read returns nothing: the model goes on with its own shard.
    """
    def read(value: torch.Tensor, ctx: Any) -> None:
        seg = segments(value, ctx) if callable(segments) else segments
        full = gather_tokens(value, dim, group, seg)
        rank = dist.get_rank(group) if dist.is_available() and dist.is_initialized() else 0
        if ranks is None or rank in ranks:
            fn(full, ctx)

    return read
