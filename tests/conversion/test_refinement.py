"""Layer-by-layer refinement (whole-model behaviour is in test_convert.py)."""

import keras
import numpy as np
import pytest
from keras import ops

from keras_collab.conversion import convert_attention
from keras_collab.conversion.refinement import refine_layer


def _teacher(dropout, rng):
    layer = keras.layers.MultiHeadAttention(
        num_heads=3, key_dim=4, dropout=dropout
    )
    x = rng.normal(size=(2, 5, 12)).astype("float32")
    layer(x, x)
    # The same weights whatever the dropout (creating a dropout layer draws
    # from Keras' global seed, which would shift the initializers').
    layer.set_weights(
        [rng.normal(size=w.shape) * 0.5 for w in layer.get_weights()]
    )
    return layer


@pytest.mark.parametrize("objective", ["attention", "output"])
def test_dropout_does_not_reach_the_fit(objective):
    # Targets are computed in inference mode; were the student trained with
    # its attention dropout on, a layer with dropout would fit a noisy copy
    # and end elsewhere than the same layer without dropout.
    results, weights = [], []
    for dropout in (0.0, 0.5):
        rng = np.random.default_rng(0)
        teacher = _teacher(dropout, rng)
        student = convert_attention(teacher, shared_key_dim=3).layer
        query = rng.normal(size=(16, 6, 12)).astype("float32")
        mask = np.ones((16, 6, 6), bool)
        keras.utils.set_random_seed(0)
        results.append(
            refine_layer(
                teacher,
                student,
                query,
                query,
                mask,
                steps=20,
                learning_rate=1e-2,
                objective=objective,
            )
        )
        weights.append([ops.convert_to_numpy(w) for w in student.weights])
    assert results[0]["loss_after"] < results[0]["loss_before"]
    assert results[1]["loss_after"] == pytest.approx(
        results[0]["loss_after"], rel=1e-4
    )
    for a, b in zip(*weights):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
