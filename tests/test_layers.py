import pytest

from dithooks.errors import LayerSelectionError
from dithooks.layers import format_layers, parse_layers


@pytest.mark.parametrize("spec,expected", [
    ("all", list(range(28))), (None, list(range(28))), ("0-27", list(range(28))),
    ("0,5,27", [0, 5, 27]), ("20-", list(range(20, 28))), ("-3", [25]),
    ("-1", [27]), ("3", [3]), ("5,1-2,5", [1, 2, 5]), (" 0 - 2 ", [0, 1, 2]), ([4, 2], [2, 4]), (7, [7]),
])
def test_parse_layers_forms(spec, expected):
    assert parse_layers(spec, 28) == expected


@pytest.mark.parametrize("spec", ["0-28", "30", "5-2", "a-b", "1,,2", "0-27-3", "x", "-29"])
def test_bad_layer_selections_name_the_valid_range(spec):
    with pytest.raises(LayerSelectionError) as e:
        parse_layers(spec, 28)
    assert "0-27" in str(e.value)
    assert "\n" not in str(e.value)


def test_format_layers_round_trips():
    layers = [0, 1, 2, 3, 7, 9, 10]
    assert format_layers(layers) == "0-3,7,9-10"
    assert parse_layers(format_layers(layers), 28) == layers
