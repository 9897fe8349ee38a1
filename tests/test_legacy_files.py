"""Files saved by the flat layout of keras-collab (before the pipeline
layout) still load and compute what they computed then, on every backend.

The files were written by `tests/fixtures/make_legacy_fixtures.py` under
JAX with commit 423c064; across backends float32 results agree to ~1e-6.
"""

import os

import keras
import numpy as np
import pytest

import keras_collab

LEGACY = os.path.join(os.path.dirname(__file__), "fixtures", "legacy")
EXPECTED = np.load(os.path.join(LEGACY, "expected.npz"))


def test_functional_keras_file_loads():
    model = keras.saving.load_model(os.path.join(LEGACY, "functional.keras"))
    attention = model.get_layer("attention")
    assert isinstance(attention, keras_collab.CollaborativeMultiHeadAttention)
    assert attention.shared_key_dim == 6
    output = model(EXPECTED["functional_token_ids"])
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(output),
        EXPECTED["functional_output"],
        atol=1e-5,
    )


def test_converted_preset_loads_through_kerashub():
    keras_hub = pytest.importorskip("keras_hub")
    preset = os.path.join(LEGACY, "bert_preset")
    backbone = keras_hub.models.Backbone.from_preset(preset)
    assert type(backbone).__name__ == "CollaborativeBertBackbone"
    batch = {
        name: EXPECTED[f"preset_{name}"]
        for name in ("token_ids", "padding_mask", "segment_ids")
    }
    output = backbone(batch)["sequence_output"]
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(output), EXPECTED["preset_output"], atol=1e-5
    )
    classifier = keras_hub.models.TextClassifier.from_preset(
        preset, num_classes=2
    )
    assert classifier.backbone.collaborative_attention
