"""The capture store format, in one place: which arrays a store holds, their dims, chunks and
coordinates (docs/store-format.md describes the same for readers).

Store layout (all arrays carry ``dimension_names``, so ``xarray.open_zarr`` reads them as is)::

    step, timestep (step)          sampling step index and the scheduler's timestep value
    layer (layer)                  the captured block indices
    sample, seed (sample)          one row per sample
    label (sample)                 class-conditional models: each sample's class
    prompt (sample)                text-conditioned models: each sample's row in the prompt
                                   embeddings (its file's sha256 is in the metadata)
    cfg (cfg)                      "cond", "uncond" when guidance is on
    replica (replica)              "a", "b" for replica pairs
    blocks.<point> (step, layer, [replica,] [cfg,] sample, <value dims>)   e.g. blocks.resid_post
    <point> (step, [replica,] [cfg,] sample, <value dims>)                e.g. final.out
    latents (latent_step, [replica,] sample, latent_channel, height, width)
                                   x before each step and the result
    rng_state (latent_step, [replica,] sample, rng_byte)   each sample's generator state, for
                                   --resume (rows written only when a state changed)
    probe.<probe>.<output> (step, [layer,] ...)   outputs of probes (dithooks/probe_api.py), or
                                   without step for those computed once at the end
    step_complete (step)           True once every array of that step is on disk

One shard (file) per step holds every captured layer; chunks inside it hold one layer (several
consecutive layers when layers are small), so reading a slice touches only the chunks it needs.
When steps are small the capture keeps a batch of steps in one shard instead, still a chunk per
step inside it (:class:`dithooks.capture.recorder.StepRecorder`, docs/store-format.md).

Who uses what: :mod:`.skeleton` writes the coordinates and ``step_complete``; the capture writes
hook arrays with :func:`hook_array_spec` and the trajectory with :func:`latents_spec` /
:func:`rng_spec` (:mod:`.steps`); :mod:`.verify` maps rows to steps with :func:`row_role`.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

if TYPE_CHECKING:  # readers import this module: it must not import torch or zarr itself
    import torch

    from .writer import ArraySpec

# coordinate arrays (1-d, no step data); every other array but step_complete holds data
COORDS = ("step", "timestep", "layer", "sample", "label", "prompt", "seed", "cfg", "latent_step", "replica")
STEP_COMPLETE = "step_complete"
LATENTS = "latents"
RNG_STATE = "rng_state"
LATENT_DIMS = ("latent_channel", "height", "width")
# dims that index rows of the store (a reduction keeps them unless told otherwise); the others
# are value dims (token, channel, head, ...)
INDEX_DIMS = ("step", "layer", "cfg", "replica", "sample", "latent_step")

# A hook point that only some captured blocks have (SD3's last block has no context.*; Flux's
# single blocks have no text stream) is stored over those blocks only: its array's layer dim is
# named after them, ``layer_<blocks>`` (e.g. ``layer_0-22``, ``layer_0_2_5-7``), with a
# coordinate array of that name holding the block indices (see layer_dim). Arrays over every
# captured block use ``layer``.
_LAYER_DIM = re.compile(r"^layer_[0-9][0-9_\-]*$")


def layer_dim(layers: Sequence[int], captured: Sequence[int]) -> str:
    """The name of the layer dim of an array over ``layers`` (of the ``captured`` blocks)."""
    layers = [int(i) for i in layers]
    if layers == [int(i) for i in captured]:
        return "layer"
    runs: list[str] = []
    start = prev = None
    for i in layers + [None]:
        if start is not None and (i is None or i != prev + 1):
            runs.append(str(start) if start == prev else f"{start}-{prev}")
            start = None
        if i is not None and start is None:
            start = i
        prev = i
    return "layer_" + "_".join(runs)


def is_layer_dim(dim: str) -> bool:
    """``layer`` or a partial layer dim (``layer_0-22``): values are block indices."""
    return dim == "layer" or _LAYER_DIM.match(dim) is not None


def is_coordinate(name: str) -> bool:
    """A coordinate array (no step data): the fixed ones and partial layer coordinates."""
    return name in COORDS or _LAYER_DIM.match(name) is not None


# chunks of small layers are grouped up to this size (see layers_per_chunk)
MIN_CHUNK_BYTES = 2**20


def layers_per_chunk(num_layers: int, layer_bytes: int, target: int = MIN_CHUNK_BYTES) -> int:
    """The largest divisor of ``num_layers`` (shards must be whole chunks) whose chunk stays
    within ``target`` bytes; 1 when one layer already reaches it."""
    fits = [d for d in range(1, num_layers + 1) if num_layers % d == 0 and d * layer_bytes <= target]
    return max(fits, default=1)


def sample_coords(conditioning: str = "class") -> tuple[str, ...]:
    """The coordinates along ``sample``: what each sample is conditioned on, and its seed."""
    return ("prompt", "seed") if conditioning == "text" else ("label", "seed")


def trajectory_batch_dims(replicas: bool) -> tuple[str, ...]:
    """Batch dims of ``latents`` and ``rng_state``: the sampler's rows without ``cfg``."""
    return ("replica", "sample") if replicas else ("sample",)


def _coordinates(dims: Sequence[str], sample: Sequence[str]) -> str:
    names = (["timestep"] if "step" in dims else []) + (list(sample) if "sample" in dims else [])
    return " ".join(names)


def hook_array_spec(name: str, *, hook: str, doc: str, steps: int, num_layers: int | None,
                    batch_axes: Sequence[tuple[str, int]], value_dims: Sequence[str],
                    value_shape: Sequence[int], dtype: torch.dtype,
                    sample: Sequence[str] = ("label", "seed"), layer: str = "layer") -> ArraySpec:
    """The array of a hook point: ``(step, [layer,] *batch, *value)``.

    ``num_layers`` None: a point outside the blocks, one chunk per step. Else one shard (file)
    per step holds every layer, so a step is one write; inside it a chunk holds one layer, or
    several when a layer is small (the codec pays per chunk, ~0.5 ms, which dwarfs an 8 KiB
    chunk), so a (step, layer) read touches one chunk. ``layer``: the name of the layer dim
    (:func:`layer_dim`; ``num_layers`` is its length).
    """
    import torch

    from .writer import ArraySpec

    rest = tuple(n for _, n in batch_axes) + tuple(value_shape)
    batch_dims = tuple(a for a, _ in batch_axes)
    if num_layers is None:
        lead_dims, shape, chunks, shards = ("step",), (steps,) + rest, (1,) + rest, None
    else:
        L = num_layers
        itemsize = torch.empty((), dtype=dtype).element_size()
        lead_dims, shape = ("step", layer), (steps, L) + rest
        chunks = (1, layers_per_chunk(L, int(np.prod(rest)) * itemsize)) + rest
        shards = (1, L) + rest
    dims = lead_dims + batch_dims + tuple(value_dims)
    attrs = (("coordinates", _coordinates(("step", "sample"), sample)), ("hook", hook), ("description", doc))
    return ArraySpec(name, dims, shape, chunks, dtype, attrs, shards)


# latents rows per chunk: up to this many, within LATENT_CHUNK_BYTES (a chunk is rewritten whole
# after each batch of steps: store/steps.py write_states)
LATENT_ROWS_PER_CHUNK = 16
LATENT_CHUNK_BYTES = 256 * 2**10


def latent_rows_per_chunk(row_shape: Sequence[int]) -> int:
    """Rows of ``latents`` per chunk (file): several when a row is small (each file costs the
    writer ~0.1-0.4 ms however small, docs/benchmarks.md), one when a row reaches the bound."""
    row_bytes = 4 * int(np.prod(tuple(row_shape)))
    return int(max(1, min(LATENT_ROWS_PER_CHUNK, LATENT_CHUNK_BYTES // max(1, row_bytes))))


def latents_spec(steps: int, row_shape: Sequence[int], replicas: bool,
                 sample: Sequence[str] = ("label", "seed"), rows_per_chunk: int | None = None) -> ArraySpec:
    """``latents``: row k is x before step k (k = 0 is x_T; k = steps is the result); chunks of
    ``rows_per_chunk`` rows (default :func:`latent_rows_per_chunk`)."""
    import torch

    from .writer import ArraySpec

    row_shape = tuple(row_shape)
    rows = latent_rows_per_chunk(row_shape) if rows_per_chunk is None else rows_per_chunk
    return ArraySpec(LATENTS, ("latent_step",) + trajectory_batch_dims(replicas) + LATENT_DIMS,
                     (steps + 1,) + row_shape, (min(rows, steps + 1),) + row_shape, torch.float32,
                     (("coordinates", " ".join(sample)),
                      ("description", "x before each step; the last is the result")))


def rng_spec(steps: int, row_shape: Sequence[int], replicas: bool) -> ArraySpec:
    """``rng_state``: generator states before each step, a row only when they changed."""
    import torch

    from .writer import ArraySpec

    row_shape = tuple(row_shape)
    return ArraySpec(RNG_STATE, ("latent_step",) + trajectory_batch_dims(replicas) + ("rng_byte",),
                     (steps + 1,) + row_shape, (1,) + row_shape, torch.uint8,
                     (("description", "generator states before each step; a row is written "
                                      "only when they changed (0 = same as the row before)"),))


PROBE_PREFIX = "probe."


def probe_array_name(probe: str, output: str) -> str:
    """The array holding output ``output`` of probe ``probe``: ``probe.<probe>.<output>``."""
    return f"{PROBE_PREFIX}{probe}.{output}"


def probe_attrs(dims: Sequence[str], probe: str, description: str,
                sample: Sequence[str] = ("label", "seed")) -> tuple[tuple[str, Any], ...]:
    """Attributes of a probe output array (its coordinates when it has step or sample dims)."""
    attrs: tuple[tuple[str, Any], ...] = (("probe", probe), ("description", description))
    coords = _coordinates(dims, sample)
    return ((("coordinates", coords),) if coords else ()) + attrs


def row_role(name: str, dims: Sequence[str], first_len: int, steps: int) -> str:
    """How an array's rows map onto steps: ``flags`` (step_complete), ``coordinate``, ``step``
    (row s is step s), ``latent`` (row k is x before step k: written with step k - 1), ``rng``
    (rows only where a generator moved; row 0 always), or ``whole`` (written once at the end)."""
    if name == STEP_COMPLETE:
        return "flags"
    if is_coordinate(name) or not dims:
        return "coordinate"
    if dims[0] == "step" and first_len == steps:
        return "step"
    if dims[0] == "latent_step" and first_len == steps + 1:
        return "rng" if name == RNG_STATE else "latent"
    return "whole"


def rows_kept_by_resume(dims: Sequence[str], start: int) -> int:
    """Rows of an array that a resume from step ``start`` keeps (the rest is rewritten)."""
    first = dims[0] if dims else None
    return start if first == "step" else start + 1 if first == "latent_step" else 0
