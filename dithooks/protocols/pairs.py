"""What the two protocols' requests share: M seed pairs, their classes, and a JSON round trip."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any, Mapping

from .store import json_clean


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
