"""StepRecorder's batch buffers (dithooks/capture/recorder.py): each batch of steps is recorded
into one buffer and handed to the writer as it is (no stacking copy), buffers are reused only
after the writer has written them, and what reaches the writer equals the hooked values, checked
against the values themselves (converted with plain torch) under a writer that lags behind."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from dithooks.capture import recorder as recorder_mod
from dithooks.capture.recorder import StepRecorder
from dithooks.errors import DithooksError
from dithooks.hookpoints import HookPoint
from dithooks.hooks import HookContext

AXES = (("sample", 2),)
LAYERS = [0, 2, 5]


class LaggingWriter:
    """Queues puts (by reference, like the real writer's zero-copy path) and calls; ``drain(keep)``
    'writes' all but the last ``keep`` operations in order: a put copies what the tensor holds then."""

    def __init__(self):
        self.queue: list[tuple] = []
        self.written: dict[tuple[str, int], torch.Tensor] = {}  # (array, step) -> data at write time
        self.put_tensors: list[torch.Tensor] = []
        self.inline = False

    def put(self, spec, index, value):
        self.put_tensors.append(value)
        self.queue.append(("put", spec.name, index[0], value))

    def call(self, fn):
        self.queue.append(("call", fn))

    def submit(self):
        pass  # the real writer hands its held file writes to its thread here; this one holds all

    def file_shape(self, name):
        return None  # no array in a store yet

    def drain(self, keep: int = 0) -> None:
        while len(self.queue) > keep:
            op = self.queue.pop(0)
            if op[0] == "call":
                op[1]()
                continue
            _, name, rows, value = op
            for i, step in enumerate(range(rows.start, rows.stop)):
                self.written[(name, step)] = value[i].clone()


class Log:
    def __init__(self, writer):
        self.writer = writer
        self.marked: list[slice] = []

    def write_states(self, states):
        pass

    def mark_complete(self, rows):
        self.marked.append(rows)


def _point(name: str, layer: int | None) -> HookPoint:
    return HookPoint(name, name, "m", "post", ("batch", "token", "channel"), "doc", layer)


def _values(steps: int):
    g = torch.Generator().manual_seed(0)
    return {(s, n): torch.randn(2, 4, 3, generator=g)
            for s in range(steps) for n in [f"blocks.{i}.resid_post" for i in LAYERS] + ["final.out"]}


def _run(steps: int, lag: int, batch_steps: int, monkeypatch, interrupt_at: tuple[int, int] | None = None,
         bound: bool = False):
    """``bound``: each point recorded through ``rec.bind`` (the hook manager's fast path: the value
    alone, the context asked for only when the point is planned) instead of ``rec.record``."""
    monkeypatch.setattr(recorder_mod, "BATCH_STEPS", batch_steps)
    writer = LaggingWriter()
    log = Log(writer)
    rec = StepRecorder(log, steps=steps, layers=LAYERS, store_dtype=torch.float16, sample_coords=("seed",))
    values = _values(steps)
    state = SimpleNamespace(latents=torch.zeros(2, 1, 2, 2))
    names = [f"blocks.{i}.resid_post" for i in LAYERS] + ["final.out"]
    now = {"step": 0}
    contexts = []  # what the bound functions asked for

    def binding(n, layer):
        def context():
            contexts.append(n)
            return HookContext(n, layer, now["step"], float(now["step"]), AXES, _point(n, layer))
        return rec.bind(_point(n, layer), context)
    bound_fns = {n: binding(n, LAYERS[k] if k < len(LAYERS) else None) for k, n in enumerate(names)}
    rec.contexts_asked = contexts
    for s in range(steps):
        now["step"] = s
        for k, n in enumerate(names):
            layer = LAYERS[k] if k < len(LAYERS) else None
            if bound:
                bound_fns[n](values[(s, n)])
            else:
                rec.record(values[(s, n)], HookContext(n, layer, s, float(s), AXES, _point(n, layer)))
            if interrupt_at == (s, k):  # a flush in the middle of a step (an interruption's)
                rec.flush_pending()
                writer.drain(lag)
        rec.end_step(s, state)
        writer.drain(lag)  # the writer lags `lag` operations behind the sampling thread
    writer.drain(0)
    return rec, writer, log, values


@pytest.mark.parametrize("bound", [False, True])
@pytest.mark.parametrize("lag", [0, 1, 3, 50])
@pytest.mark.parametrize("batch_steps", [1, 3, 16])
def test_written_values_equal_the_hooked_values_whatever_the_writer_lag(lag, batch_steps, bound, monkeypatch):
    steps = 8
    rec, writer, log, values = _run(steps, lag, batch_steps, monkeypatch, bound=bound)
    for s in range(steps):
        got = writer.written[("blocks.resid_post", s)]
        want = torch.stack([values[(s, f"blocks.{i}.resid_post")] for i in LAYERS]).to(torch.float16)
        assert torch.equal(got, want), (s, lag, batch_steps)
        assert torch.equal(writer.written[("final.out", s)], values[(s, "final.out")].to(torch.float16))
    # every step marked once, in order, in batches of the batch size (the last one shorter)
    covered = [s for rows in log.marked for s in range(rows.start, rows.stop)]
    assert covered == list(range(steps))
    if bound:  # a context only to plan each point, on its first value
        assert sorted(rec.contexts_asked) == sorted(f"blocks.{i}.resid_post" for i in LAYERS) + ["final.out"]
    b = min(batch_steps, steps)
    assert [rows.stop - rows.start for rows in log.marked][:-1] == [b] * (len(log.marked) - 1)


def test_batches_are_written_without_a_copy_and_buffers_are_reused(monkeypatch):
    steps = 10
    rec, writer, log, values = _run(steps, 2, 3, monkeypatch)
    resid = [t for t in writer.put_tensors if t.dim() == 5]  # (steps, layer, sample, token, channel)
    assert [t.shape[0] for t in resid] == [3, 3, 3, 1]
    # each batch is a view at the start of a batch buffer (step 0 moved into the first one)
    assert all(t._base is not None and t.data_ptr() == t._base.data_ptr() for t in resid)
    # buffers come back once written: a handful allocated for 10 steps, not one per batch
    assert rec.staging.allocated <= 2 * (1 + recorder_mod.KEEP_BUFFERS)


@pytest.mark.parametrize("lag", [0, 1])
@pytest.mark.parametrize("where", [(0, 2), (3, 1), (4, 0), (5, 3)])
def test_a_flush_in_the_middle_of_a_step_keeps_that_step_right(where, lag, monkeypatch):
    steps = 9
    rec, writer, log, values = _run(steps, lag, 4, monkeypatch, interrupt_at=where)
    for s in range(steps):
        want = torch.stack([values[(s, f"blocks.{i}.resid_post")] for i in LAYERS]).to(torch.float16)
        assert torch.equal(writer.written[("blocks.resid_post", s)], want), s
        assert torch.equal(writer.written[("final.out", s)], values[(s, "final.out")].to(torch.float16))
    covered = [s for rows in log.marked for s in range(rows.start, rows.stop)]
    assert covered == list(range(steps))


def test_a_bound_point_replans_when_its_value_changes_shape(monkeypatch):
    """A value of a new shape (the bound function's plan no longer fits) goes through ``record``
    with a context, as an ordinary read hook's would: the shape the store was planned for is
    checked there, not copied into silently (a broadcast)."""
    writer = LaggingWriter()
    rec = StepRecorder(Log(writer), steps=2, layers=[0], store_dtype=torch.float16, sample_coords=("seed",))
    asked = []
    point = _point("blocks.0.resid_post", 0)

    def context():
        asked.append(1)
        return HookContext(point.name, 0, 0, 0.0, AXES, point)
    fn = rec.bind(point, context)
    fn(torch.randn(2, 4, 3))
    fn(torch.randn(2, 4, 3))
    assert len(asked) == 1
    with pytest.raises(DithooksError, match=r"blocks.0.resid_post: a value of shape \(2, 1, 3\) at step 0"):
        fn(torch.randn(2, 1, 3))  # broadcastable into the (2, 4, 3) rows: refused, not copied silently
    assert len(asked) == 2
