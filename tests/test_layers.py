"""Unit tests of :mod:`d2sm_loss.layers`: layer specs checked, indices resolved to taps, a layer
chosen twice refused, default layers and graph nodes found, on plain data (no backbone built)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from d2sm_loss.layers import (
    DEFAULT_LAYERS,
    checked_layers,
    default_layers,
    node_for,
    reject_duplicate_layers,
    tap_index,
)

TAPS = [
    {"module": "act1", "num_chs": 16, "reduction": 2},
    {"module": "layer1", "num_chs": 32, "reduction": 4},
    {"module": "layer2", "num_chs": 64, "reduction": 8},
]
NODES = ["conv1", "layer1.0.conv", "layer1.0.act", "layer1.1.conv", "layer1.1.act", "head.fc"]


@pytest.mark.parametrize("layer,index", [(0, 0), (2, 2), (-1, 2), (-3, 0)])
def test_tap_index_counts_negative_indices_from_the_end(layer, index):
    assert tap_index(layer, TAPS, "net") == index


@pytest.mark.parametrize("layer", [3, -4])
def test_tap_index_out_of_range_names_the_taps(layer):
    with pytest.raises(ValueError, match=rf"feature index {layer} is out of range for 'net', which has 3 taps: "
                                         r"0: act1 \(16 ch, /2\), 1: layer1"):
        tap_index(layer, TAPS, "net")


@pytest.mark.parametrize("given,expected", [
    (None, None),
    (2, [2]),
    ("layer1", ["layer1"]),
    ([0, "layer2", -1], [0, "layer2", -1]),
    ((np.int64(1), torch.tensor(2)), [1, 2]),
    (np.int32(-1), [-1]),
])
def test_checked_layers_accepts_ints_strs_and_integer_scalars(given, expected):
    checked = checked_layers(given)
    assert checked == expected
    assert checked is None or all(type(layer) in (int, str) for layer in checked)


@pytest.mark.parametrize("given,error,match", [
    ([], ValueError, "at least one layer"),
    ([1.5], TypeError, "ints .feature indices. or strs"),
    ([True], TypeError, "ints .feature indices. or strs"),
    (2.0, TypeError, "an int, a str or a sequence"),
    ([1, 1], ValueError, "1 is given twice"),
    (["layer1", "layer1"], ValueError, "'layer1' is given twice"),
])
def test_checked_layers_errors_name_the_argument(given, error, match):
    with pytest.raises(error, match=match) as raised:
        checked_layers(given)
    assert "layers" in str(raised.value)


def test_two_specs_that_resolve_to_one_layer_are_refused():
    # 2 and -1 are different specs for the same tap of a three-tap model.
    with pytest.raises(ValueError, match=r"2 and -1 are the same layer of net \(2\)"):
        reject_duplicate_layers([2, -1], [tap_index(2, TAPS, "net"), tap_index(-1, TAPS, "net")], "net")
    reject_duplicate_layers([0, -1], [0, 2], "net")  # different taps: no error


def test_default_layers_are_the_listed_layer_or_the_deepest_tap():
    assert default_layers("resnet18", TAPS) == [2]
    assert default_layers("vgg19.tv_in1k", TAPS) == DEFAULT_LAYERS["vgg19"]
    default = default_layers("vgg16", TAPS)
    default.append("mutated")  # a copy: the table is not changed through the result
    assert DEFAULT_LAYERS["vgg16"] == ["features.28"]
    with pytest.raises(ValueError, match="has no feature taps; choose layers by module name"):
        default_layers("plain", [])


def test_node_for_finds_a_node_or_the_last_node_inside_a_container():
    assert node_for("layer1.0.act", NODES, "net") == "layer1.0.act"
    assert node_for("layer1", NODES, "net") == "layer1.1.act"
    assert node_for("layer1.0", NODES, "net") == "layer1.0.act"
    with pytest.raises(ValueError, match=r"'layer1.0.actv' is not a module or node of 'net'; close matches: \['layer1.0.act'"):
        node_for("layer1.0.actv", NODES, "net")
