import argparse

import pytest

from benchmarks.harness.options import config_with_options
from benchmarks.harness.options import dimension_points
from benchmarks.harness.options import integers


def test_config_with_options_overrides_only_the_options_given():
    full = {"steps": 100, "seeds": [0, 1], "minilm_layers": None}
    quick = {**full, "steps": 10}
    args = argparse.Namespace(quick=True, steps=None, seeds=[2], layers=[0])
    config = config_with_options(args, full, quick, ("steps", "seeds"))
    assert config == {"steps": 10, "seeds": [2], "minilm_layers": None}
    assert quick["seeds"] == [0, 1]  # a copy: the next run starts afresh
    mapped = config_with_options(args, full, quick, {"layers": "minilm_layers"})
    assert mapped["minilm_layers"] == [0]


def test_integers_option_can_be_emptied():
    assert integers("96,192") == [96, 192]
    assert integers("") == []


def test_points_parse_shared_and_per_head_values():
    assert dimension_points("192, 96:none,192:192,96:96,48:NONE") == [
        [192, None],
        [96, None],
        [192, 192],
        [96, 96],
        [48, None],
    ]
    assert dimension_points("") == []


@pytest.mark.parametrize("text", ["192:", "0:96", "192:0", "a:b", "1:2:3"])
def test_points_reject_bad_entries(text):
    with pytest.raises(argparse.ArgumentTypeError, match=repr(text)):
        dimension_points(text)
