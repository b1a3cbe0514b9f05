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


def write_skeleton(folder: Path, meta: dict[str, Any], coords: Coordinates) -> Any:
    """Create the Zarr group in ``folder`` (emptying it) with ``coords`` and ``step_complete``;
    ``meta`` goes into the group attributes last. Written by :mod:`.zarrio` (the files zarr-python
    writes for the same calls, without its ~45 ms of event-loop work per capture)."""
    from .lock import LOCK_NAME
    from .storage import as_path, remove_children
    from .zarrio import array_metadata, write_array, write_group, write_json_atomic

    folder = as_path(folder)
    remove_children(folder, keep=LOCK_NAME)  # object stores: the writer's lock is taken before the build
    # until the metadata replaces it: a store being created (on object storage, where it is built
    # in place, a creation killed now leaves this for `dithooks ls` to report as half-made)
    write_group(folder, {CREATING_KEY: True})

    def coord(name, values, dims, dtype=None):
        # uncompressed: a few bytes each, and readers then need no codec library at all;
        # strings become Zarr v3 variable-length strings (vlen-utf8)
        write_array(folder, name, np.asarray(values, dtype=dtype), dims)

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
    # all False: its chunks are written only when a step is marked (a missing one is False)
    (folder / STEP_COMPLETE).mkdir()
    write_json_atomic(str(folder / STEP_COMPLETE / "zarr.json"),
                      array_metadata((steps,), (1,), "bool", False, dims=("step",), crc=False))
    write_group(folder, {ATTR_KEY: meta})  # last: a skeleton with metadata is a whole one
