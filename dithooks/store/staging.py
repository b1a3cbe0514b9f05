"""Host staging of hooked values: the copies a capture makes between the model and the writer.

A capture keeps, per array and step, one host *slab* ``[layers, *value shape]`` in the storage
dtype; each read hook copies its value into its layer's row. :class:`HostStaging` owns those slabs:

* **One copy per hook, dtype converted on the way.** On CPU, ``Tensor.copy_`` converts (fp32 ->
  fp16, say) straight into the slab: no intermediate tensor per hook.
* **A GPU is never waited on per hook.** When values live on an accelerator, slabs are *pinned*
  host memory, a value is converted on the device and copied with ``non_blocking=True`` (the
  copy is queued on the current stream and the hook returns at once); :meth:`end_step`
  records one event after the step's copies and waits for it once. So: one synchronisation per
  step, never per hook, and nothing reads a slab before its copies are done (the writer gets
  slabs only after :meth:`end_step`).
* **Slabs are reused.** A slab goes back to a free list when its values are no longer needed
  (:meth:`recycle`; from the writer thread once it has written them), so a run allocates (and
  pins, which is slow) a handful of slabs, not one per step. The free list is bounded.

The same code runs on CPU and CUDA (``--device cuda``); the device is taken from the values.
"""

from __future__ import annotations

import threading
from collections import defaultdict
from typing import Iterable

import torch


class HostStaging:
    """Slabs for hooked values, reused across steps; see the module docstring.

    ``pin``: pin slabs in host memory (default: when values come from CUDA). ``keep``: free slabs
    kept per (shape, dtype); more are dropped (memory stays bounded by what is in flight)."""

    def __init__(self, pin: bool | None = None, keep: int = 4):
        self.pin = pin
        self.keep = keep
        self._free: dict[tuple, list[torch.Tensor]] = defaultdict(list)
        self._lock = threading.Lock()
        self._device: torch.device | None = None  # the accelerator values came from this step
        self.allocated = 0  # slabs created (tests, benchmarks)
        self.syncs = 0      # end_step synchronisations that waited on a device

    # -- slabs -------------------------------------------------------------------------------
    def take(self, shape: tuple[int, ...], dtype: torch.dtype, source: torch.Tensor | None = None) -> torch.Tensor:
        """A host slab of ``shape`` and ``dtype`` (contents undefined), pinned when ``source``
        lives on CUDA (or ``pin`` says so)."""
        key = (tuple(shape), dtype)
        with self._lock:
            free = self._free.get(key)
            if free:
                return free.pop()
        pin = self.pin if self.pin is not None else (source is not None and source.device.type == "cuda")
        self.allocated += 1
        return torch.empty(shape, dtype=dtype, pin_memory=bool(pin) and torch.cuda.is_available())

    def recycle(self, slabs: Iterable[torch.Tensor]) -> None:
        """Give slabs back (thread-safe: the writer thread calls it once a write is done)."""
        with self._lock:
            for t in slabs:
                free = self._free[(tuple(t.shape), t.dtype)]
                if len(free) < self.keep:
                    free.append(t)

    # -- copies ------------------------------------------------------------------------------
    def copy(self, dst: torch.Tensor, value: torch.Tensor) -> None:
        """Copy ``value`` (any device, any float dtype) into ``dst`` (a view of a slab), converting
        to ``dst``'s dtype; from an accelerator without waiting for it."""
        value = value.detach()
        if value.device.type == "cpu":
            dst.copy_(value.reshape(dst.shape))
            return
        self._device = value.device
        if value.dtype != dst.dtype:  # convert where the value is, then move the smaller bytes
            value = value.to(dst.dtype)
        dst.copy_(value.reshape(dst.shape), non_blocking=value.device.type == "cuda")

    def end_step(self) -> None:
        """Wait once for the step's device-to-host copies (no-op when every value was on CPU)."""
        dev, self._device = self._device, None
        if dev is None or dev.type != "cuda":
            return
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(dev))
        event.synchronize()
        self.syncs += 1
