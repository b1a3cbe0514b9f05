"""Parsing of layer selections such as ``0-27``, ``0,5,27``, ``20-`` and ``all``."""

from __future__ import annotations

import re

from .errors import LayerSelectionError

_RANGE = re.compile(r"^(\d+)?\s*-\s*(\d+)?$")


def parse_layers(spec: str | int | list[int] | tuple[int, ...] | None, num_layers: int) -> list[int]:
    """Return the sorted, de-duplicated block indices that ``spec`` selects.

    Accepted forms: ``all`` (or ``None``; an empty string is refused), one index ``5``, an inclusive range ``0-27``,
    open ranges ``20-`` and ``-3``, negative indices ``-1`` (the last block), and any
    comma-separated mix of these. Anything else, or an index outside ``0..num_layers-1``,
    raises :class:`LayerSelectionError` naming the model's valid range.
    """
    valid = f"this model has blocks 0-{num_layers - 1}" if num_layers > 0 else "this model has no blocks"
    if spec is None:
        return list(range(num_layers))
    if isinstance(spec, int):
        spec = [spec]
    if isinstance(spec, (list, tuple)):
        return _check([int(i) for i in spec], num_layers, valid, str(spec))
    text = str(spec).strip().lower()
    if text in ("all", "*", ":"):
        return list(range(num_layers))
    if not text:
        raise LayerSelectionError(f"empty layer selection {spec!r}: use 'all', '0-27', '0,5,27' or '20-'; {valid}")
    chosen: list[int] = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            raise LayerSelectionError(f"malformed layer selection {spec!r}: empty item; {valid}")
        if re.fullmatch(r"-?\d+", part):
            i = int(part)
            chosen.append(i + num_layers if i < 0 else i)
            continue
        m = _RANGE.match(part)
        if not m or (m.group(1) is None and m.group(2) is None):
            raise LayerSelectionError(
                f"malformed layer selection {spec!r}: use e.g. 'all', '0-27', '0,5,27', '20-'; {valid}"
            )
        lo = int(m.group(1)) if m.group(1) is not None else 0
        hi = int(m.group(2)) if m.group(2) is not None else num_layers - 1
        if lo > hi:
            raise LayerSelectionError(f"empty layer range {part!r} in {spec!r}; {valid}")
        if hi >= num_layers:
            raise LayerSelectionError(f"layer {hi} in {spec!r} is out of range: {valid}")
        chosen.extend(range(lo, hi + 1))
    return _check(chosen, num_layers, valid, str(spec))


def _check(chosen: list[int], num_layers: int, valid: str, spec: str) -> list[int]:
    bad = [i for i in chosen if not 0 <= i < num_layers]
    if bad:
        raise LayerSelectionError(f"layer {bad[0]} in {spec!r} is out of range: {valid}")
    if not chosen:
        raise LayerSelectionError(f"layer selection {spec!r} selects no block; {valid}")
    return sorted(set(chosen))


def format_layers(layers: list[int]) -> str:
    """Compact text for a list of block indices: ``[0,1,2,3,7]`` -> ``0-3,7``."""
    if not layers:
        return ""
    runs, start, prev = [], layers[0], layers[0]
    for i in layers[1:]:
        if i == prev + 1:
            prev = i
            continue
        runs.append(f"{start}-{prev}" if prev > start else f"{start}")
        start = prev = i
    runs.append(f"{start}-{prev}" if prev > start else f"{start}")
    return ",".join(runs)
