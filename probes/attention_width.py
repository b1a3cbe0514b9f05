"""Attention width: how many keys a query row effectively reads (THEORY §5, eq [92]).

Everything here is a pure function of an attention pattern ``A`` of shape ``[..., N, N]``
(query rows, key columns; rows sum to 1) or of per-row widths ``[..., N]``. Leading
dimensions (layer, head, step, ...) are kept, so one call summarises a whole capture.

- effective width  ``N_eff,i = 1 / Σ_j A_ij²``  [92]; ``1 ≤ N_eff,i ≤ N`` with 1 for a
  one-hot row and N for a uniform row.
- row entropy  ``H_i = −Σ_j A_ij log A_ij`` (nats, ``0 log 0 = 0``); ``exp(H_i)`` is the
  Shannon "perplexity" width and always ``≥ N_eff,i`` (Rényi-2 entropy ≤ Shannon entropy).
"""

from __future__ import annotations

import torch

from dithooks.attention import functional as AF

__all__ = [
    "effective_width",
    "row_entropy",
    "width_summary",
    "effective_width_summary",
]


def _cast(x: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    return x if dtype is None else x.to(dtype)


def effective_width(A: torch.Tensor, *, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Per-row effective attention width ``N_eff,i = 1/Σ_j A_ij²`` [92].

    ``A``: ``[..., N, N]`` row-stochastic pattern. Returns ``[..., N]``. The minimum over rows
    is the ``N_min`` of the Appendix-B bound [99].
    """
    return AF.effective_width(_cast(A, dtype))


def row_entropy(A: torch.Tensor, *, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Shannon entropy of each attention row, in nats: ``H_i = −Σ_j A_ij log A_ij``.

    Zero entries contribute 0 (the limit of ``p log p``), so masked or saturated patterns
    give finite values. Returns ``[..., N]``; ``0 ≤ H_i ≤ log N``.
    """
    return AF.row_entropy(_cast(A, dtype))  # entr(0) = 0: the limit for masked / underflowed keys


def width_summary(values: torch.Tensor, *, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Distribution over query rows (last axis) of a per-row quantity, e.g. ``N_eff`` ``[..., N]``.

    Returns a dict of ``[...]`` tensors: ``min``, ``q25``, ``median``, ``q75``, ``max``,
    ``mean``. Quartiles use linear interpolation (numpy's default), so they match
    ``numpy.percentile``.
    """
    values = _cast(values, dtype)
    if not values.is_floating_point():
        values = values.to(torch.get_default_dtype())
    q = torch.tensor([0.25, 0.5, 0.75], dtype=values.dtype, device=values.device)
    quart = torch.quantile(values, q, dim=-1)  # [3, ...]
    return {
        "min": values.amin(dim=-1),
        "q25": quart[0],
        "median": quart[1],
        "q75": quart[2],
        "max": values.amax(dim=-1),
        "mean": values.mean(dim=-1),
    }


def effective_width_summary(
    A: torch.Tensor | None = None,
    *,
    n_eff: torch.Tensor | None = None,
    dtype: torch.dtype | None = None,
) -> dict[str, torch.Tensor]:
    """``N_eff`` distribution per (layer, head, step, ...) from a pattern or precomputed widths.

    Give exactly one of ``A`` (``[..., N, N]``) or ``n_eff`` (``[..., N]``). Returns
    :func:`width_summary` of ``N_eff`` (``min`` is ``N_min``), plus, when ``A`` is given,
    the row-entropy summary under ``entropy_*`` keys and ``N`` (number of keys).
    """
    if (A is None) == (n_eff is None):
        raise ValueError("give exactly one of A (pattern) or n_eff (precomputed widths)")
    if A is not None:
        out = width_summary(effective_width(A, dtype=dtype))
        out.update({f"entropy_{k}": v for k, v in width_summary(row_entropy(A, dtype=dtype)).items()})
        out["N"] = torch.tensor(A.shape[-1])
        return out
    return width_summary(n_eff, dtype=dtype)
