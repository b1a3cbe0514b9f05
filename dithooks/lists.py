"""The one parser of list options: ``0-3,5`` (integers and ranges) and ``0,0.3,1`` (numbers).

Every list the package accepts as text - blocks (``--layers``), seeds, classes, steps, radii,
query tokens, probe indices, coupling grids - uses this syntax:

* items are separated by commas; spaces around items and around a range's dash are ignored;
  an empty item (``1,,2``, a trailing comma) is refused;
* an integer item is ``N`` (``-N`` is negative: callers that index from the end map it) or an
  inclusive range ``a-b`` (``0-7``; either end may be negative: ``-2--1``); callers that know an
  upper end also accept the open range ``a-`` (``20-``: from 20 to the end);
* a number item is anything ``float()`` reads (callers refuse NaN/inf and check their domain).

The functions here check the syntax and, optionally, bounds; each caller keeps its own domain
checks and wording (valid block range, radius limits, ...). Errors are one line and name the
option (``what``) and the text given.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

from .errors import DithooksError

#: Most items a list option (--seeds, --class, --query-tokens, ...) may expand to.
MAX_LIST_ITEMS = 100_000

_INT = re.compile(r"-?\d+")
_RANGE = re.compile(r"(-?\d+)\s*-\s*(-?\d+)?")
INT_EXAMPLE = "3, 0-7 or 0,2,5"


@dataclass(frozen=True)
class Span:
    """One integer item: ``first..last`` inclusive; ``last`` None for an open range (``20-``)."""

    first: int
    last: int | None

    @property
    def single(self) -> bool:
        return self.first == self.last


def split_items(spec: str, what: str, *, example: str = INT_EXAMPLE,
                error: Callable[[str], Exception] = DithooksError) -> list[str]:
    """The stripped comma-separated items of ``spec``; refuses an empty list or an empty item."""
    text = str(spec).strip()
    if not text:
        raise error(f"empty {what} {spec!r}: use e.g. {example}")
    items = [p.strip() for p in text.split(",")]
    if any(not p for p in items):
        raise error(f"malformed {what} {spec!r}: empty item; use e.g. {example}")
    return items


def parse_spans(spec: str, what: str, *, open_ended: bool = False, example: str = INT_EXAMPLE,
                error: Callable[[str], Exception] = DithooksError) -> list[Span]:
    """``"0-3,5,20-"`` -> ``[Span(0, 3), Span(5, 5), Span(20, None)]`` (syntax only, no bounds).

    ``open_ended``: accept ``a-`` (to the caller's upper end). Empty ranges (``5-2``) are refused
    when expanded (:func:`expand_spans`), after the caller mapped negative indices if it does.
    """
    spans: list[Span] = []
    for part in split_items(spec, what, example=example, error=error):
        if _INT.fullmatch(part):
            v = int(part)
            spans.append(Span(v, v))
            continue
        m = _RANGE.fullmatch(part)
        if not m or (m.group(2) is None and not open_ended):
            raise error(f"malformed {what} {spec!r}: use e.g. {example}")
        spans.append(Span(int(m.group(1)), None if m.group(2) is None else int(m.group(2))))
    return spans


def expand_spans(spans: list[Span], what: str, spec: str, *, upper: int | None = None,
                 max_items: int = MAX_LIST_ITEMS, error: Callable[[str], Exception] = DithooksError) -> list[int]:
    """The integers the spans select, in the order given; ``upper`` closes open ranges."""
    out: list[int] = []
    for s in spans:
        last = upper if s.last is None else s.last
        if last is None:
            raise error(f"malformed {what} {spec!r}: an open range needs a known end")
        if last < s.first:
            raise error(f"empty range '{s.first}-{s.last if s.last is not None else ''}' in {what} {spec!r}: "
                        "write it low-high")
        if last - s.first + 1 + len(out) > max_items:
            raise error(f"{what} {spec!r} selects more than {max_items} items")
        out.extend(range(s.first, last + 1))
    return out


def parse_int_list(spec: str, what: str, *, lo: int | None = None, hi: int | None = None,
                   example: str = INT_EXAMPLE, max_items: int = MAX_LIST_ITEMS,
                   error: Callable[[str], Exception] = DithooksError) -> list[int]:
    """``0-7``, ``0,3,5``, ``4`` -> list of ints (order and repeats kept), each within ``[lo, hi]``
    when given (checked on the range ends before anything is expanded)."""
    spans = parse_spans(spec, what, example=example, error=error)
    for s in spans:
        for v in (s.first, s.last):
            if (lo is not None and v < lo) or (hi is not None and v > hi):
                allowed = (f"use {lo}-{hi}" if lo is not None and hi is not None
                           else f"must be at least {lo}" if lo is not None else f"must be at most {hi}")
                raise error(f"{what} {spec!r}: {v} is out of range ({allowed})")
    return expand_spans(spans, what, spec, max_items=max_items, error=error)


def parse_float_list(spec: str, what: str, *, example: str = "0,0.3,1",
                     error: Callable[[str], Exception] = DithooksError) -> list[float]:
    """``"0, 0.3,1"`` -> ``[0.0, 0.3, 1.0]`` (order and repeats kept; NaN/inf are the caller's to refuse)."""
    try:
        return [float(p) for p in split_items(spec, what, example=example, error=error)]
    except ValueError:
        raise error(f"malformed {what} {spec!r}: use e.g. {example}") from None
