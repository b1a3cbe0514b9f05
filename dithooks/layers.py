"""Parsing of layer selections such as ``0-27``, ``0,5,27``, ``20-`` and ``all``."""

from __future__ import annotations

from .errors import LayerSelectionError
from .lists import Span, expand_spans, parse_spans

_EXAMPLE = "'all', '0-27', '0,5,27' or '20-'"


def parse_layers(spec: str | int | list[int] | tuple[int, ...] | None, num_layers: int) -> list[int]:
    """Return the sorted, de-duplicated block indices that ``spec`` selects.

    Accepted forms (the list syntax of :mod:`dithooks.lists`): ``all`` (or ``None``; an empty
    string is refused), one index ``5``, an inclusive range ``0-27``, the open range ``20-``
    (to the last block), negative indices ``-1`` (the last block; ``-3--1``: the last three), and
    any comma-separated mix of these. Anything else, or an index outside ``0..num_layers-1``,
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

    def error(message: str) -> LayerSelectionError:
        return LayerSelectionError(f"{message}; {valid}")

    spans = parse_spans(text, "layer selection", open_ended=True, example=_EXAMPLE, error=error)
    # an index past either end is refused before anything expands; negative ones count from the end
    for s in spans:
        for i in (s.first, s.last):
            if i is not None and not -num_layers <= i < num_layers:
                raise LayerSelectionError(f"layer {i} in {spec!r} is out of range: {valid}")
    spans = [Span(s.first % num_layers, None if s.last is None else s.last % num_layers) for s in spans]
    chosen = expand_spans(spans, "layer selection", str(spec), upper=num_layers - 1, error=error)
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
