"""What the two protocols' requests share: M seed pairs, their classes, the coupling list and a
JSON round trip."""

from __future__ import annotations

import math
from dataclasses import asdict
from typing import Any, Mapping, Sequence

from ..errors import DithooksError
from ..lists import parse_float_list
from .store import json_clean


def parse_couplings(text: str | Sequence[float], what: str, example: str, *, at_most: float | None = None,
                    as_set: bool = False) -> tuple[float, ...]:
    """Couplings g from ``"0,0.3,1"`` (the syntax of :func:`dithooks.lists.parse_float_list`) or
    a sequence: finite, ``>= 0`` (and ``<= at_most`` when given). ``as_set``: duplicates merged
    and sorted (a grid); otherwise the order is kept and a repeated value is refused."""
    vals = parse_float_list(text, what, example=example) if isinstance(text, str) else [float(v) for v in text]
    if not vals:
        raise DithooksError(f"empty {what}")
    bad = [v for v in vals if not (math.isfinite(v) and 0.0 <= v <= (math.inf if at_most is None else at_most))]
    if bad:
        where = f"lie in [0, {at_most:g}]" if at_most is not None else "be a finite number >= 0"
        raise DithooksError(f"coupling g must {where}, got {bad[0]:g}")
    if as_set:
        return tuple(sorted(set(vals)))
    if len(set(vals)) != len(vals):
        raise DithooksError(f"the {what} {vals} repeats a value")
    return tuple(vals)


class PairedRequest:
    """Mixin for a frozen dataclass with ``pairs``, ``first_seed`` and ``labels`` fields.

    ``TUPLE_FIELDS`` names the fields stored as JSON lists that the dataclass holds as tuples.
    """

    TUPLE_FIELDS: tuple[str, ...] = ()

    @property
    def seeds(self) -> list[int]:
        """Pair m uses seed ``first_seed + m`` (replica b's noise seed is derived from it)."""
        return [self.first_seed + m for m in range(self.pairs)]

    @property
    def pair_labels(self) -> list[int]:
        """One class per pair: the single class repeated, or the classes as given."""
        return list(self.labels) * self.pairs if len(self.labels) == 1 else list(self.labels)

    def as_dict(self) -> dict:
        return json_clean(asdict(self))

    @classmethod
    def known_fields(cls, d: Mapping[str, Any]) -> dict[str, Any]:
        """The stored request's entries this dataclass knows, lists turned back into tuples."""
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        for k in cls.TUPLE_FIELDS:
            if known.get(k) is not None:
                known[k] = tuple(known[k])
        return known
