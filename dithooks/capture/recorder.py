"""Recording a capture's steps: hooked values into per-step slabs, steps buffered and written a
few at a time, then marked complete (the order :mod:`dithooks.store.steps` keeps)."""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Sequence

import torch

from ..errors import DithooksError
from ..hookpoints import layer_template, store_array_name
from ..hooks import HookContext
from ..store.layout import hook_array_spec, layer_dim
from ..store.staging import HostStaging
from ..store.steps import StepLog
from ..store.writer import ArraySpec

# steps buffered per store write (small models): at most BATCH_STEPS steps and BATCH_BYTES
BATCH_STEPS = 16
BATCH_BYTES = 8 * 2**20
# steps smaller than this are written on the sampling thread (StoreWriter.inline): for small
# writes the interpreter-lock handoffs with a writer thread cost more than the writes
INLINE_STEP_BYTES = 2**20
# written batch buffers kept per array for reuse (one is filled while the last is written)
KEEP_BUFFERS = 2
# large steps (not inline, a step per write) whose layers fill chunks of their own: each chunk of
# layers is handed to the writer as soon as its last layer is recorded (StepRecorder._eager), so
# its file is written while the model computes the next blocks - the last step's write no longer
# waits for the whole step after sampling ends (docs/benchmarks.md run (k)). False: the whole
# step at step end (the layout and path before 2026-12-02 (k), a shard per step; for benchmarks)
EAGER_CHUNKS = True
# ... for chunks of at least this size: handing over smaller ones costs more than it hides (the
# writer thread's work for each one competes with the model for the interpreter lock: S/2's
# 768 KiB chunks took the capture from 1.034x to 1.066x plain sampling, while XL's 1.1 MiB ones
# took it from 1.020x to 1.015x and its 4 MiB attention patterns from 1.076x to 1.036x, run (k))
EAGER_CHUNK_BYTES = 2**20


class _ArraySlot:
    """One array's slab of the current step: ``[layer,] *batch, *value`` in the storage dtype, and
    its rows (one per captured layer; the slab itself without a layer dim); None between steps.

    A step's slab is a view of a *batch buffer* ``[steps, *slab]`` that holds the steps written
    together (see ``StepRecorder.flush_pending``: the buffer is written as it is, no stacking
    copy), made with its views once and reused once written (``free``)."""

    __slots__ = ("name", "shape", "with_layer", "slab", "rows", "buf", "views", "used", "free", "device",
                 "eager", "spec", "counts", "step")

    def __init__(self, name: str, shape: tuple[int, ...], with_layer: bool):
        self.name, self.shape, self.with_layer = name, shape, with_layer
        self.slab: torch.Tensor | None = None
        self.rows: tuple | None = None
        self.buf: torch.Tensor | None = None  # the open batch buffer
        self.views: list[tuple] = []  # its steps' (slab, rows)
        self.used = 0  # its steps taken so far
        self.free: list[tuple] = []  # written buffers, (buf, views), to reuse
        self.device: torch.Tensor | None = None  # an empty tensor on the values' device (pinning)
        # eager chunks (StepRecorder._eager): layers per chunk (0: off), the array's spec, rows
        # recorded this step per chunk of layers (-1 once handed to the writer), and that step
        self.eager = 0
        self.spec: ArraySpec | None = None
        self.counts: list[int] = []
        self.step = -1


class _PointPlan:
    """``record``'s plan for one hook point: its array's slot, its row there, the value shape it
    was planned for, and whether the value needs no reshape (``same``)."""

    __slots__ = ("slot", "row", "value_shape", "same")

    def __init__(self, slot: _ArraySlot, row: int, value_shape: torch.Size, same: bool):
        self.slot, self.row, self.value_shape, self.same = slot, row, value_shape, same


class StepRecorder:
    """Turns hooked values into store writes for one run.

    ``record`` (a read hook) copies a value into this step's slab; ``end_step`` (after each
    sampling step) queues the probes' outputs, buffers the step and writes the buffer every few
    steps and after the last; ``flush_pending`` writes what is buffered (also after an
    interruption: finished steps are kept).
    """

    # small steps (inline mode): a new hook array keeps a batch of steps in one shard (file), a
    # chunk per step inside it, so a batch is one file per array instead of one per step (each
    # file costs the writer thread ~0.1-0.4 ms however small: docs/benchmarks.md). False: a shard
    # per step (the layout before 2026-12-02 (i); for benchmarks)
    shard_steps = True

    def __init__(self, log: StepLog, *, steps: int, layers: Sequence[int], store_dtype: torch.dtype,
                 sample_coords: Sequence[str], probes: Any = None,
                 array_layers: dict[str, Sequence[int]] | None = None):
        """``array_layers``: array -> the captured blocks that have its point, when not all do
        (its layer dim then runs over those only, see store/layout.py layer_dim)."""
        self.log = log
        self.writer = log.writer
        self.steps = steps
        self.layers = list(layers)
        self.store_dtype = store_dtype
        self.sample_coords = tuple(sample_coords)
        self.probes = probes
        self.array_layers = {a: [int(i) for i in ls] for a, ls in (array_layers or {}).items()}
        self._layer_pos: dict[str, dict[int, int]] = {}  # array -> block index -> position
        # host slabs the hooks copy into (pinned + non-blocking from a GPU, one sync per step)
        self.staging = HostStaging()
        self._specs: dict[str, ArraySpec] = {}
        self._slots: dict[str, _ArraySlot] = {}  # array -> its slab of this step (see record)
        self._slabs: dict[str, _ArraySlot] = {}  # the arrays that have a slab this step
        self._buffers: list[tuple] = []  # batch buffers opened since the last flush: (slot, buf, views)
        self._plans: dict[str, _PointPlan] = {}  # hook point -> its plan (see _plan)
        self._recorders: dict[str, Callable] = {}  # hook point -> its bound function, for record()
        self._ctx: HookContext | None = None  # the context of record()'s call in progress
        # finished steps not yet written: (step, {array: values}, state); see flush_pending
        self._pending: list[tuple[int, dict[str, torch.Tensor], Any]] = []
        self._batch: int | None = None
        self._shard: int | None = None  # steps per shard of new hook arrays (decided with the batch)
        self._align = 1  # batches end where the hook arrays' files end (steps per file on disk)
        self._step = -1  # the step being recorded, once known (after the run's first step)

    # -- hooks -------------------------------------------------------------------------------
    def _spec(self, name: str, ctx: HookContext, value: torch.Tensor) -> ArraySpec:
        arr = store_array_name(name)
        spec = self._specs.get(arr)
        if spec is not None:
            return spec
        value_dims = tuple(ctx.point.dims[1:])
        if value_dims and value_dims[-1] == "...":
            value_dims = tuple(f"dim_{i}" for i in range(value.dim() - 1))
        layers = self.array_layers.get(arr, self.layers)
        self._layer_pos[arr] = {layer: i for i, layer in enumerate(layers)}
        spec = hook_array_spec(arr, hook=layer_template(name)[0], doc=ctx.point.doc, steps=self.steps,
                               num_layers=None if ctx.layer is None else len(layers),
                               batch_axes=ctx.batch_axes, value_dims=value_dims,
                               value_shape=tuple(value.shape[1:]), dtype=self.store_dtype,
                               sample=self.sample_coords, layer=layer_dim(layers, self.layers))
        if self._shard is not None:  # an array first seen after the first step
            spec = self._sharded(spec)
        self._specs[arr] = spec
        return spec

    def _sharded(self, spec: ArraySpec) -> ArraySpec:
        """``spec`` with ``self._shard`` steps per shard (file), a chunk per step inside it."""
        if self._shard is None or self._shard <= 1:
            return spec
        outer = spec.shards or spec.chunks
        return dataclasses.replace(spec, shards=(min(self._shard, spec.shape[0]),) + tuple(outer[1:]))

    def _plan_files(self) -> None:
        """After the first step, with the batch size known: new hook arrays get a batch of steps
        per shard when steps are small (``shard_steps``); batches then end where the arrays' files
        end (``_align``), so that each batch writes whole shards - also on resume, into the
        layout already on disk (a resume from inside a shard first completes that shard)."""
        inline = self.writer.inline
        self._shard = self._batch if (inline and self.shard_steps and getattr(self.log, "shard_steps", False)
                                      and self._batch and self._batch > 1) else 1
        eager = EAGER_CHUNKS and not inline and self._batch == 1 and getattr(self.log, "eager_chunks", False)
        for name, spec in list(self._specs.items()):
            on_disk = self.writer.file_shape(name)
            slot = self._slots.get(name)
            layers = spec.shape[1] if slot is not None and slot.with_layer else 0
            cpu = slot is not None and slot.device is not None and slot.device.device.type == "cpu"
            if on_disk is None:
                if (eager and cpu and layers and spec.chunks[1] < layers
                        and math.prod(spec.chunks) * spec.dtype.itemsize >= EAGER_CHUNK_BYTES):
                    # a file per chunk of layers (no shard: a shard is written whole)
                    spec = self._specs[name] = dataclasses.replace(spec, shards=None)
                else:
                    spec = self._specs[name] = self._sharded(spec)
                on_disk = spec.shards or spec.chunks
            if eager and cpu and layers and on_disk[0] == 1 and on_disk[1] < layers:
                slot.eager, slot.spec = int(on_disk[1]), spec  # (also a resume into such a layout)
            self._align = max(self._align, int(on_disk[0]))

    def _plan(self, value: torch.Tensor, ctx: HookContext) -> "_PointPlan":
        """What ``record`` needs for a hook point, worked out on its first call: the array's slot,
        the layer's row in the slab (0 without a layer dim), the value's shape."""
        spec = self._spec(ctx.name, ctx, value)
        shape = tuple(n for _, n in ctx.batch_axes) + tuple(value.shape[1:])
        slot = self._slots.get(spec.name)
        if slot is None:
            with_layer = ctx.layer is not None
            slot = self._slots[spec.name] = _ArraySlot(spec.name, ((spec.shape[1],) if with_layer else ()) + shape,
                                                       with_layer)
        rows_shape = slot.shape[1:] if slot.with_layer else slot.shape
        if shape != rows_shape or (value.dim() and math.prod(n for _, n in ctx.batch_axes) != value.shape[0]):
            # (a copy would broadcast a smaller value into the slab silently)
            raise DithooksError(f"hook point {ctx.name}: a value of shape {tuple(value.shape)} at step {ctx.step} "
                                f"does not fit its array {spec.name} (batch {ctx.batch_axes}, values "
                                f"{tuple(rows_shape[len(ctx.batch_axes):])}), planned from its first value")
        row = 0 if ctx.layer is None else self._layer_pos[spec.name][ctx.layer]
        plan = self._plans[ctx.name] = _PointPlan(slot, row, value.shape, shape == tuple(value.shape))
        return plan

    def _take(self, slot: _ArraySlot, value: torch.Tensor) -> tuple:
        """This step's slab of ``slot``'s array (every captured layer's values, written at step
        end) and its rows: the next step of the open batch buffer."""
        if slot.buf is None or slot.used == len(slot.views):
            if slot.device is None:
                slot.device = torch.empty(0, device=value.device)
            self._open_buffer(slot, self._batch or 1)
        slot.slab, slot.rows = slot.views[slot.used]
        slot.used += 1
        self._slabs[slot.name] = slot
        if slot.eager:
            k = slot.eager
            slot.counts, slot.step = [0] * -(-slot.shape[0] // k), self._step
        return slot.rows

    def _open_buffer(self, slot: _ArraySlot, steps: int) -> None:
        """Give ``slot`` a batch buffer of ``steps`` steps (a written one when one is free)."""
        while slot.free:
            buf, views = slot.free.pop()
            if len(views) == steps:
                break
        else:
            buf = self.staging.take((steps,) + slot.shape, self.store_dtype, slot.device)
            views = [(one, one.unbind(0) if slot.with_layer else (one,)) for one in buf.unbind(0)]
        slot.buf, slot.views, slot.used = buf, views, 0
        self._buffers.append((slot, buf, views))

    def _recycle(self, buffers: list[tuple]) -> None:
        """Buffers whose steps are written (the writer calls this after their writes)."""
        for slot, buf, views in buffers:
            if len(slot.free) < KEEP_BUFFERS:
                slot.free.append((buf, views))

    def record(self, value: torch.Tensor, ctx: HookContext) -> None:
        """A read hook: copy ``value`` into its row of this step's slab (dtype converted in the
        copy), through its point's bound function (:meth:`bind`; made on the point's first
        value), ``ctx`` its context."""
        fn = self._recorders.get(ctx.name)
        if fn is None:
            fn = self._recorders[ctx.name] = self.bind(ctx.point, self._context_now)
        self._ctx = ctx
        fn(value)

    def _context_now(self) -> HookContext:
        return self._ctx

    def __call__(self, value: torch.Tensor, ctx: HookContext) -> None:
        """The recorder is a read function (a :class:`dithooks.hooks.BindableReader`)."""
        self.record(value, ctx)

    def bind(self, point: Any, context: Callable[[], HookContext]) -> Callable[[torch.Tensor], None]:
        """The recorder for one point, called with the value alone (the hook manager's fast path,
        :class:`dithooks.hooks.BindableReader`): the point's plan is held here, and ``context()``
        is asked for only when the point is (re)planned - on its first value or a new shape.
        This is the hot path (called once per point and model call: keep it short)."""
        plans, plan_point, take, staging, eager = self._plans, self._plan, self._take, self.staging, self._eager
        held: list[_PointPlan | None] = [plans.get(point.name)]

        def record_value(value: torch.Tensor) -> None:
            plan = held[0]
            if plan is None or plan.value_shape != value.shape:
                plan = held[0] = plan_point(value, context())
            slot = plan.slot
            rows = slot.rows
            if rows is None:
                rows = take(slot, value)
            dst = rows[plan.row]
            if value.is_cpu:
                if value.requires_grad:
                    value = value.detach()
                dst.copy_(value if plan.same else value.reshape(dst.shape))
            else:
                staging.copy(dst, value)
            if slot.eager:
                eager(slot, plan.row)
        return record_value

    def _eager(self, slot: _ArraySlot, row: int) -> None:
        """Row ``row`` of an eager array is recorded: once every row of its chunk of layers is,
        hand that chunk to the writer (its rows of the slab, untouched until written: the buffer
        is reused only after the writes queued before its recycling). A row recorded twice in a
        step (a model calling a block twice) puts its chunk again, with the later value, at
        step end (``_put_rest``)."""
        g = row // slot.eager
        n = slot.counts[g] + 1
        if n <= 0:  # already handed over this step: the step's end writes it again
            slot.counts[g] = -2
            return
        r0, r1 = self._chunk_rows(slot, g)
        if n < r1 - r0:
            slot.counts[g] = n
            return
        slot.counts[g] = -1
        self._put_chunk(slot, slot.step, g)

    def _put_rest(self, slot: _ArraySlot, step: int) -> None:
        """At the end of an eager step: the chunks not handed over yet (a layer not recorded, or
        one recorded again after its chunk was)."""
        for g, n in enumerate(slot.counts):
            if n != -1:
                self._put_chunk(slot, step, g)

    @staticmethod
    def _chunk_rows(slot: _ArraySlot, g: int) -> tuple[int, int]:
        """The slab rows [r0, r1) of chunk of layers ``g`` (the last one may be shorter)."""
        r0 = g * slot.eager
        return r0, min(r0 + slot.eager, slot.shape[0])

    def _put_chunk(self, slot: _ArraySlot, step: int, g: int) -> None:
        r0, r1 = self._chunk_rows(slot, g)
        self.writer.put(slot.spec, (step, slice(r0, r1)), slot.slab[r0:r1])

    # -- steps -------------------------------------------------------------------------------
    @staticmethod
    def _step_bytes(step_values: dict[str, torch.Tensor], state: Any) -> int:
        step_bytes = sum(v.numel() * v.element_size() for v in step_values.values())
        return step_bytes + state.latents.numel() * state.latents.element_size()

    def _batch_size(self, step_values: dict[str, torch.Tensor], state: Any) -> int:
        """Steps written per store write: every write costs interpreter time however small, so
        small models batch up to BATCH_STEPS steps within BATCH_BYTES of memory."""
        step_bytes = self._step_bytes(step_values, state)
        return int(max(1, min(BATCH_STEPS, BATCH_BYTES // max(1, step_bytes))))

    def stored_dims(self) -> dict[str, int]:
        return {d: n for spec in self._specs.values() for d, n in zip(spec.dims, spec.shape)}

    def end_step(self, step: int, state: Any) -> None:
        """After step ``step``: queue its probe outputs, buffer its hooked values and state; write
        the buffer (then mark those steps complete) every few steps and after the last."""
        self.staging.end_step()  # the step's device-to-host copies are done (one wait, on GPU)
        values = {}
        for name, slot in self._slabs.items():
            if slot.eager and slot.step == step:  # handed over chunk by chunk as it was recorded
                self._put_rest(slot, step)
            else:
                values[name] = slot.slab
            slot.slab, slot.rows = None, None
        self._slabs = {}
        self._step = step + 1
        if self.probes:
            self.probes.emit_step(step, self.writer.put, self.stored_dims())
            if step == self.steps - 1:  # once-only outputs, before the last mark
                self.probes.emit_finish(self.writer.put, self.stored_dims())
        if self._batch is None:
            self._batch = self._batch_size(values, state)
            self.writer.inline = self._step_bytes(values, state) < INLINE_STEP_BYTES
            if self._batch > 1 and not self._pending:
                self._widen(values)
            self._plan_files()
        self._pending.append((step, values, state))
        if (len(self._pending) >= self._batch or step == self.steps - 1
                or (self._align > 1 and (step + 1) % self._align == 0)):
            self.flush_pending()

    def _widen(self, values: dict[str, torch.Tensor]) -> None:
        """After the first step (its buffers of one step, the batch size unknown before it): move
        its slabs into buffers of the batch size, so that each batch lies in one buffer."""
        for name, slab in values.items():
            slot = self._slots[name]
            if slot.buf is None or len(slot.views) != 1 or slot.views[0][0] is not slab:
                continue
            self._buffers = [b for b in self._buffers if b[0] is not slot]  # the one-step buffer: dropped
            self._open_buffer(slot, self._batch)
            first = slot.views[0][0]
            first.copy_(slab)
            slot.used, values[name] = 1, first

    def _block(self, slabs: list[torch.Tensor]) -> torch.Tensor | None:
        """``slabs`` as one tensor without a copy: the first steps of one batch buffer, else None."""
        for _, buf, views in self._buffers:
            if views[0][0] is slabs[0]:
                if len(slabs) <= len(views) and all(views[i][0] is s for i, s in enumerate(slabs)):
                    return buf[:len(slabs)]
                return None
        return None

    def flush_pending(self) -> None:
        """Write the buffered steps (consecutive, each complete) and then mark them complete.

        Each array's steps go to the writer as the batch buffer they were recorded into (a view,
        no copy; stacked only when they do not lie in one buffer); the buffers are reused once
        the writer has written them."""
        if not self._pending:
            return
        s0, n = self._pending[0][0], len(self._pending)
        rows = slice(s0, s0 + n)
        for name in self._pending[0][1]:
            slabs = [values[name] for _, values, _ in self._pending]
            block = self._block(slabs)
            self.writer.put(self._specs[name], (rows,), torch.stack(slabs) if block is None else block)
        self.log.write_states([state for _, _, state in self._pending])
        self.log.mark_complete(rows)
        self._pending = []
        # the next step starts a new buffer and these are reused once written - except the buffer
        # of a step still being recorded (a flush between steps is the rule; an interruption
        # may flush in the middle of one): it stays open, its later steps stacked when written
        recording = [slot for slot in self._slabs.values()]
        written = [b for b in self._buffers if not any(b[0] is r and b[1] is r.buf for r in recording)]
        self._buffers = [b for b in self._buffers if all(b is not w for w in written)]
        for slot in self._slots.values():
            if not any(slot is r for r in recording):
                slot.buf, slot.views, slot.used = None, [], 0
        if written:
            self.writer.call(lambda b=written: self._recycle(b))
        self.writer.submit()  # this batch's files go to the writer thread together
