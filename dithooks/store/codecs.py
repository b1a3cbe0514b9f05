"""Storage dtypes and compressors for capture stores.

bfloat16 has no numpy/Zarr dtype: it is stored as its raw 16 bits (``uint16``) with the array
attribute ``dithooks_dtype = "bfloat16"``; :func:`decode` turns it back into float32 (exactly:
a bfloat16 is the upper half of a float32).

Reading never needs torch: only the write-side helpers (:func:`storage_dtype`, :func:`to_numpy`,
:func:`zarr_dtype`) import it, when they are called, so ``dithooks query`` starts without it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import DithooksError

if TYPE_CHECKING:  # pragma: no cover
    import torch

STORAGE_DTYPE_NAMES = ("fp32", "fp16", "bf16")
COMPRESSIONS = ("none", "zstd", "lz4")


def _storage_dtypes() -> dict[str, "torch.dtype"]:
    import torch

    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def __getattr__(name: str) -> Any:  # STORAGE_DTYPES, kept for callers, built on first use
    if name == "STORAGE_DTYPES":
        return _storage_dtypes()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def storage_dtype(name: str) -> "torch.dtype":
    if name not in STORAGE_DTYPE_NAMES:
        raise DithooksError(f"unknown storage dtype {name!r}; choose one of {', '.join(STORAGE_DTYPE_NAMES)}")
    return _storage_dtypes()[name]


def to_numpy(t: "torch.Tensor") -> np.ndarray:
    """A CPU tensor as the numpy array that is written (bf16 as raw uint16 bits)."""
    import torch

    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(np.uint16)
    return t.numpy()


def zarr_dtype(t: "torch.dtype") -> str:
    import torch

    return {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "uint16",
            torch.float64: "float64", torch.int64: "int64", torch.int32: "int32",
            torch.uint8: "uint8", torch.bool: "bool", torch.int16: "int16"}[t]


def bf16_bits_to_float32(bits: np.ndarray) -> np.ndarray:
    """Raw bfloat16 bits (uint16/int16) -> float32, exactly, without torch."""
    return (np.asarray(bits).view(np.uint16).astype(np.uint32) << 16).view(np.float32)


def decode(values: np.ndarray, attrs: dict) -> np.ndarray:
    """Undo the bf16 bit storage; other dtypes pass through (no copy)."""
    if attrs.get("dithooks_dtype") == "bfloat16":
        return bf16_bits_to_float32(values)
    return values


def compressor_config(name: str) -> dict | None:
    """The compressor of ``--compression NAME`` as :func:`zarrio.array_metadata` takes it (the
    same codec :func:`compressors` gives zarr-python)."""
    if name == "none":
        return None
    if name == "zstd":
        return {"name": "zstd", "level": 1}
    if name == "lz4":
        return {"name": "blosc", "cname": "lz4", "clevel": 5, "shuffle": "bitshuffle"}
    raise DithooksError(f"unknown compression {name!r}; choose one of {', '.join(COMPRESSIONS)}")


def compressors(name: str):
    import zarr

    if name == "none":
        return None
    if name == "zstd":
        return zarr.codecs.ZstdCodec(level=1)
    if name == "lz4":
        return zarr.codecs.BloscCodec(cname="lz4", clevel=5, shuffle="bitshuffle")
    raise DithooksError(f"unknown compression {name!r}; choose one of {', '.join(COMPRESSIONS)}")
