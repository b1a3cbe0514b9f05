"""Storage dtypes and compressors for capture stores.

bfloat16 has no numpy/Zarr dtype: it is stored as its raw 16 bits (``uint16``) with the array
attribute ``dithooks_dtype = "bfloat16"``; :func:`decode` turns it back into float32.
"""

from __future__ import annotations

import numpy as np
import torch

from ..errors import DithooksError

STORAGE_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
COMPRESSIONS = ("none", "zstd", "lz4")


def storage_dtype(name: str) -> torch.dtype:
    try:
        return STORAGE_DTYPES[name]
    except KeyError:
        raise DithooksError(f"unknown storage dtype {name!r}; choose one of {', '.join(STORAGE_DTYPES)}") from None


def to_numpy(t: torch.Tensor) -> np.ndarray:
    """A CPU tensor as the numpy array that is written (bf16 as raw uint16 bits)."""
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(np.uint16)
    return t.numpy()


def zarr_dtype(t: torch.dtype) -> str:
    return {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "uint16",
            torch.float64: "float64", torch.int64: "int64", torch.int32: "int32",
            torch.uint8: "uint8", torch.bool: "bool", torch.int16: "int16"}[t]


def decode(values: np.ndarray, attrs: dict) -> np.ndarray:
    """Undo the bf16 bit storage; other dtypes pass through."""
    if attrs.get("dithooks_dtype") == "bfloat16":
        return torch.from_numpy(np.ascontiguousarray(values).view(np.int16)).view(torch.bfloat16).float().numpy()
    return values


def compressors(name: str):
    import zarr

    if name == "none":
        return None
    if name == "zstd":
        return zarr.codecs.ZstdCodec(level=1)
    if name == "lz4":
        return zarr.codecs.BloscCodec(cname="lz4", clevel=5, shuffle="bitshuffle")
    raise DithooksError(f"unknown compression {name!r}; choose one of {', '.join(COMPRESSIONS)}")
