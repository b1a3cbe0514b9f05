"""A new capture store's skeleton: its metadata, coordinates and ``step_complete`` (all False).

What each coordinate means is described in :mod:`.layout`; :func:`write_skeleton` writes them
into a folder in one go, metadata last, so a skeleton with metadata is a whole one (the store's
lifecycle, :mod:`.lifecycle`, builds it under a temporary name and renames it into place).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .layout import STEP_COMPLETE
from .metadata import ATTR_KEY

CREATING_KEY = "dithooks_creating"  # a root group attribute while the skeleton is written


@dataclass(frozen=True)
class Coordinates:
    """The values of a capture store's coordinate arrays."""

    steps: int
    timesteps: Sequence[int]
    layers: Sequence[int]
    seeds: Sequence[int]
    labels: Sequence[int] | None = None     # class-conditional: one class per sample
    prompts: Sequence[int] | None = None    # text-conditioned: one embeddings row per sample
    cfg: bool = False                       # guidance on: a cfg dim ("cond", "uncond")
    replicas: bool = False                  # replica pairs: a replica dim ("a", "b")
    # partial layer dims (layout.layer_dim) -> their block indices, for points only some blocks have
    layer_dims: dict[str, Sequence[int]] | None = None

    @property
    def num_samples(self) -> int:
        return len(self.seeds)


def write_skeleton(folder: Path, meta: dict[str, Any], coords: Coordinates, marks_chunk: int | None = None) -> Any:
    """Create the Zarr group in ``folder`` (emptying it) with ``coords`` and ``step_complete``
    (in one chunk, or chunks of ``marks_chunk`` steps); ``meta`` goes into the group attributes
    last. Written by :mod:`.zarrio` (the files zarr-python writes for the same calls, without its
    ~45 ms of event-loop work per capture).

    In a build folder (:func:`.files.temp_path`, renamed into place only once whole) the files
    are written in place; elsewhere (an object store's prefix, built in place) each atomically,
    the group first marked as being created."""
    from .files import is_temp_name
    from .lock import LOCK_NAME
    from .storage import ObjectPath, as_path, remove_children
    from .zarrio import _json_bytes, array_metadata, write_array, write_atomic, write_group, write_private

    folder = as_path(folder)
    # a local build folder: nobody reads it before the rename, so no file needs its own
    # temporary name and rename (~20 fewer metadata operations, each 0.1-1 ms on this disk)
    private = not isinstance(folder, ObjectPath) and is_temp_name(folder.name)
    remove_children(folder, keep=LOCK_NAME)  # object stores: the writer's lock is taken before the build
    if not private:
        # until the metadata replaces it: a store being created (on object storage, where it is
        # built in place, a creation killed now leaves this for `dithooks ls` to report as half-made)
        write_group(folder, {CREATING_KEY: True})

    def coord(name, values, dims, dtype=None):
        # uncompressed: a few bytes each, and readers then need no codec library at all;
        # strings become Zarr v3 variable-length strings (vlen-utf8); key "c.0" (no "c/" folder)
        write_array(folder, name, np.asarray(values, dtype=dtype), dims, separator=".", private=private)

    steps, n = coords.steps, coords.num_samples
    coord("step", np.arange(steps), ("step",), "int64")
    # DDIM/DDPM timesteps are integers; flow matching's are floats in [0, 1000]
    ts = [float(t) for t in coords.timesteps]
    integral = all(t == int(t) for t in ts) and all(isinstance(t, (int, np.integer)) for t in coords.timesteps)
    coord("timestep", list(coords.timesteps), ("step",), "int64" if integral else "float64")
    coord("layer", list(coords.layers), ("layer",), "int64")
    for dim, layers in sorted((coords.layer_dims or {}).items()):
        coord(dim, list(layers), (dim,), "int64")
    coord("sample", np.arange(n), ("sample",), "int64")
    if coords.labels is not None:
        coord("label", list(coords.labels), ("sample",), "int64")
    if coords.prompts is not None:
        coord("prompt", list(coords.prompts), ("sample",), "int64")
    coord("seed", list(coords.seeds), ("sample",), "int64")
    coord("latent_step", np.arange(steps + 1), ("latent_step",), "int64")
    if coords.cfg:
        coord("cfg", np.array(["cond", "uncond"]), ("cfg",), str)
    if coords.replicas:
        coord("replica", np.array(["a", "b"]), ("replica",), str)
    # all False: its one chunk (with a CRC32C: damage must not read as marks) is written when the
    # first steps are marked (missing: all False), then rewritten whole, atomically, after each
    # batch of steps (store/steps.py mark_complete); a multi-worker store keeps a chunk per step
    # (its workers mark steps independently)
    (folder / STEP_COMPLETE).mkdir()
    (write_private if private else write_atomic)(
        str(folder / STEP_COMPLETE / "zarr.json"),
        [_json_bytes(array_metadata((steps,), (steps if marks_chunk is None else marks_chunk,), "bool", False,
                                    dims=("step",), crc=marks_chunk is None))])  # one chunk: checksummed
    write_group(folder, {ATTR_KEY: meta}, private=private)  # last: a skeleton with metadata is a whole one
