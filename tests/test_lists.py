"""The one list syntax (dithooks.lists) and the callers that keep their own domain checks."""

import itertools

import pytest

from dithooks.errors import DithooksError, LayerSelectionError
from dithooks.layers import parse_layers
from dithooks.lists import MAX_LIST_ITEMS, Span, parse_float_list, parse_int_list, parse_spans


def reference(spec: str) -> list[int]:
    """An independent reading of the syntax: split on commas, then on the dash between numbers."""
    out = []
    for item in spec.split(","):
        item = item.replace(" ", "")
        head, sep, tail = item[1:].partition("-")
        if sep:
            out.extend(range(int(item[0] + head), int(tail) + 1))
        else:
            out.append(int(item))
    return out


@pytest.mark.parametrize("spec", ["0", "7", "-3", "0-7", "2-2", "-2--1", "-2-1", "0,3,5", "5,1-2,5",
                                  " 0 - 2 ,  9", "10-12,0,0"])
def test_int_lists_match_an_independent_reading(spec):
    assert parse_int_list(spec, "x") == reference(spec)


def test_every_small_combination_matches_the_reference():
    items = ["0", "3", "1-2", "-1", "-3--2"]
    for n in (1, 2, 3):
        for combo in itertools.product(items, repeat=n):
            spec = ",".join(combo)
            assert parse_int_list(spec, "x") == reference(spec), spec


@pytest.mark.parametrize("spec,needle", [
    ("", "empty x"), ("  ", "empty x"), ("1,,2", "empty item"), ("1,", "empty item"), ("a", "malformed x"),
    ("1-", "malformed x"), ("0-3-5", "malformed x"), ("1.5", "malformed x"), ("5-2", "empty range '5-2'"),
    (f"0-{MAX_LIST_ITEMS}", "more than"),
])
def test_bad_int_lists_are_one_line_errors(spec, needle):
    with pytest.raises(DithooksError, match=needle) as e:
        parse_int_list(spec, "x")
    assert "\n" not in str(e.value) and repr(spec) in str(e.value)


def test_bounds_are_checked_on_range_ends_before_expanding():
    with pytest.raises(DithooksError, match=r"99999999999 is out of range \(use 0-9\)"):
        parse_int_list("0-99999999999", "seeds", lo=0, hi=9)
    with pytest.raises(DithooksError, match=r"-1 is out of range \(must be at least 0\)"):
        parse_int_list("-1-3", "seeds", lo=0)
    assert parse_int_list("0-9", "seeds", lo=0, hi=9) == list(range(10))


def test_open_ranges_only_where_the_caller_knows_the_end():
    assert parse_spans("20-,3", "layers", open_ended=True) == [Span(20, None), Span(3, 3)]
    with pytest.raises(DithooksError, match="malformed"):
        parse_spans("20-", "seeds")


def test_float_lists():
    assert parse_float_list(" 0, 0.3,1,1e-2 ", "g") == [0.0, 0.3, 1.0, 0.01]
    for bad, needle in (("0,a", "malformed g"), ("0,,1", "empty item"), ("", "empty g")):
        with pytest.raises(DithooksError, match=needle):
            parse_float_list(bad, "g")


def test_callers_share_the_syntax_and_keep_their_checks():
    from dithooks.locality.local_denoiser import parse_ints
    from dithooks.probes.width import parse_indices
    from dithooks.protocols.protocol1 import parse_g_grid, parse_s_star
    from dithooks.protocols.protocol2 import parse_g_list

    spec = "0-2,5"
    assert parse_layers(spec, 8) == parse_ints(spec, "radii") == list(parse_indices(spec)) == [0, 1, 2, 5]
    assert parse_layers("-2--1", 8) == [6, 7]  # negative block indices count from the end
    with pytest.raises(LayerSelectionError, match="blocks 0-7"):
        parse_layers("1,,2", 8)
    with pytest.raises(DithooksError, match="non-negative"):
        parse_ints("-1", "radii")
    with pytest.raises(ValueError, match="malformed query indices"):  # the probe API wraps ValueErrors
        parse_indices("1,x")
    assert parse_indices("") == () and parse_indices("[3, 4]") == (3, 4)
    assert parse_g_grid("0.3, 0 ,0.3") == (0.0, 0.3)
    assert parse_g_list("0.3, 0") == (0.3, 0.0)
    assert parse_s_star("0,5,10", 20) == (0, 5, 10)
    for fn, bad, needle in ((parse_g_grid, "0,x", "malformed coupling grid"), (parse_g_list, "0,x", "malformed g list"),
                            (parse_g_grid, "0,2", r"\[0, 1\]"), (parse_g_list, "0,0", "repeats")):
        with pytest.raises(DithooksError, match=needle):
            fn(bad)
    with pytest.raises(DithooksError, match="malformed s\\* grid"):
        parse_s_star("0,x", 20)
