"""`keras_collab.get_layout_map`: its rules and errors (every backend), and
collaborative attention under `keras.distribution` on 8 virtual CPU devices
(JAX, in a fresh process running `distribution_script.py`)."""

import json
import os
import pathlib
import subprocess
import sys

import keras
import pytest

import keras_collab

BACKEND = keras.backend.backend()
SCRIPT = pathlib.Path(__file__).with_name("distribution_script.py")


def mesh(axis_names=("batch", "model")):
    # Device names only: nothing is placed, so any backend will do.
    devices = [f"cpu:{i}" for i in range(8)]
    return keras.distribution.DeviceMesh((2, 4), axis_names, devices)


def axes(layout_map, path):
    layout = layout_map[path]
    return None if layout is None else tuple(layout.axes)


PREFIX = "transformer_layer_0/self_attention_layer/"
PER_HEAD = {
    "mixing": ("model", None),
    "content_bias": (None, "model"),
    "gate/kernel": ("batch", "model", None),
    "gate/bias": ("model", None),
    "value/kernel": ("batch", "model", None),
    "value/bias": ("model", None),
    "attention_output/kernel": ("model", None, "batch"),
}
SHARED = {
    "mixing": ("model", None),
    "content_bias": (None, "model"),
    "gate/kernel": ("batch", "model", None),
    "gate/bias": ("model", None),
    "value_mixing": ("model", None),
}
# No rule: replicated (`ModelParallel`'s default).
WITHOUT_RULE = (
    "query/kernel",
    "query/bias",
    "key/kernel",
    "attention_output/bias",
)


@pytest.mark.parametrize("shared_values", [False, True])
def test_layout_map_splits_heads_and_replicates_shared_projections(
    shared_values,
):
    layout_map = keras_collab.get_layout_map(
        mesh(), shared_values=shared_values
    )
    expected = SHARED if shared_values else PER_HEAD
    for name, spec in expected.items():
        assert axes(layout_map, PREFIX + name) == spec, name
    without_rule = WITHOUT_RULE
    if shared_values:  # shared by the heads: 2D, replicated
        without_rule += ("value/kernel", "value/bias")
        without_rule += ("attention_output/kernel",)
    for name in without_rule:
        assert axes(layout_map, PREFIX + name) is None, name
    # Whole path components only: a feed-forward "mixing_dense" or a
    # "my_value" layer is not attention.
    assert axes(layout_map, "block/mixing_dense/kernel") is None
    assert axes(layout_map, "block/my_value/kernel") is None


def test_layout_map_without_data_axis_replicates_model_widths():
    layout_map = keras_collab.get_layout_map(mesh(), data_axis=None)
    assert axes(layout_map, PREFIX + "value/kernel") == (None, "model", None)
    assert axes(layout_map, PREFIX + "attention_output/kernel") == (
        "model",
        None,
        None,
    )


def test_layout_map_other_axis_names_and_existing_map():
    device_mesh = mesh(("data", "heads"))
    existing = keras.distribution.LayoutMap(device_mesh)
    existing["dense/kernel"] = ("data", "heads")
    layout_map = keras_collab.get_layout_map(
        device_mesh, "heads", "data", layout_map=existing
    )
    assert layout_map is existing
    assert axes(layout_map, "dense/kernel") == ("data", "heads")
    assert axes(layout_map, PREFIX + "value/kernel") == ("data", "heads", None)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"model_axis": "heads"}, "`model_axis` 'heads' is not an axis"),
        ({"data_axis": "data"}, "`data_axis` 'data' is not an axis"),
        ({"model_axis": None}, "`model_axis` must name an axis"),
        ({"data_axis": "model"}, "both 'model'"),
    ],
)
def test_layout_map_bad_axes(kwargs, message):
    with pytest.raises(ValueError, match=message):
        keras_collab.get_layout_map(mesh(), **kwargs)


def test_layout_map_bad_mesh_and_map():
    with pytest.raises(ValueError, match="must be a `keras.distribution"):
        keras_collab.get_layout_map((2, 4))
    other = keras.distribution.LayoutMap(mesh())
    with pytest.raises(ValueError, match="another device mesh"):
        keras_collab.get_layout_map(mesh(), layout_map=other)


# Under keras.distribution, on 8 virtual CPU devices --------------------

# The layer's weights under `ModelParallel`, by name (replicated if absent).
LAYER_SPECS = {"per_head": PER_HEAD, "shared": SHARED}
# The converted BERT's (no gate), with its feed-forward blocks and token
# embedding.
BACKBONE_SPECS = {
    **{k: v for k, v in PER_HEAD.items() if not k.startswith("gate/")},
    "feedforward_intermediate_dense/kernel": ("batch", "model"),
    "feedforward_output_dense/kernel": ("model", "batch"),
    "token_embedding/embeddings": ("model", "batch"),
}


def expected_spec(path, specs):
    """The spec `specs` gives the weight at `path`, by its last components;
    replicated (all `None`) when it names none of them."""
    for name, spec in specs.items():
        if path == name or path.endswith("/" + name):
            return list(spec)
    return None


def check_specs(actual, specs):
    for path, spec in actual.items():
        expected = expected_spec(path, specs)
        if expected is None:
            assert all(axis is None for axis in spec), (path, spec)
        else:
            assert spec == expected, (path, spec, expected)
    # Every rule was applied to some weight.
    for name in specs:
        assert any(expected_spec(p, {name: ()}) is not None for p in actual)


@pytest.fixture(scope="module")
def distributed():
    """The JSON `distribution_script.py` prints, run once in a fresh JAX
    process (XLA reads the device count when JAX starts)."""
    environ = {
        **os.environ,
        "KERAS_BACKEND": "jax",
        "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
    }
    done = subprocess.run(
        [sys.executable, str(SCRIPT)],
        capture_output=True,
        text=True,
        env=environ,
        timeout=900,
    )
    assert done.returncode == 0, done.stderr[-5000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(
    BACKEND != "jax",
    reason="keras.distribution is implemented for JAX only (TensorFlow's "
    "distribution_lib is a 'do not use' prototype, PyTorch has none)",
)
def test_under_data_and_model_parallel_on_8_virtual_devices(distributed):
    result = distributed
    assert result["devices"] == 8 and result["mesh"] == [2, 4]

    # The layer: one-device outputs, the intended shardings.
    assert set(result["layer"]) == {
        f"{distribution}/{kind}"
        for distribution in ("data_parallel", "model_parallel")
        for kind in ("per_head", "shared")
    }
    for key, run in result["layer"].items():
        distribution, kind = key.split("/")
        assert run["output_scale"] > 1.0
        assert run["max_abs_difference"] < 1e-5, key
        if distribution == "data_parallel":
            check_specs(run["specs"], {})
        else:
            check_specs(run["specs"], LAYER_SPECS[kind])

    # The converted backbone, loaded from its preset under each
    # distribution with the twin's `get_layout_map`.
    for distribution, run in result["backbone"].items():
        assert run["class"] == "CollaborativeBertBackbone"
        assert run["max_abs_difference"] < 1e-5, distribution
        check_specs(
            run["specs"],
            {} if distribution == "data_parallel" else BACKBONE_SPECS,
        )

    # `fit`: the one-device losses, falling.
    single = result["fit"]["single_device"]
    assert single[-1] < 0.9 * single[0]
    for distribution in ("data_parallel", "model_parallel"):
        losses = result["fit"][distribution]
        assert losses == pytest.approx(single, rel=1e-5), distribution

    # `distill`: its loss falls, as on one device.
    before, after = result["distill"]["single_device"]
    assert after < 0.9 * before
    for distribution in ("data_parallel", "model_parallel"):
        losses = result["distill"][distribution]
        assert losses == pytest.approx([before, after], rel=1e-3)
