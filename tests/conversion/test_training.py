import keras
import numpy as np
import pytest

from keras_collab import CollaborativeMultiHeadAttention
from keras_collab.conversion.training import approximated_variables
from keras_collab.conversion.training import only_approximated_trainable


def _model(shared_value_dim):
    inputs = keras.Input((5, 8))
    layer = CollaborativeMultiHeadAttention(
        num_heads=2, key_dim=4, shared_key_dim=3,
        shared_value_dim=shared_value_dim,
    )  # fmt: skip
    outputs = keras.layers.Dense(2)(layer(inputs, inputs))
    return keras.Model(inputs, outputs), layer


@pytest.mark.parametrize("value_side", [True, False])
@pytest.mark.parametrize("shared_value_dim", [None, 6])
def test_only_the_approximated_variables_train(shared_value_dim, value_side):
    model, layer = _model(shared_value_dim)
    before = {v.path: v.trainable for v in model.weights}
    expected = {v.path for v in approximated_variables(layer, value_side)}
    with only_approximated_trainable(model, [layer], value_side) as trainable:
        assert {v.path for v in trainable} == expected
        assert {v.path for v in model.trainable_weights} == expected
    # Every flag is restored, the layers' and the variables' own.
    assert {v.path: v.trainable for v in model.weights} == before
    assert len(model.trainable_weights) == len(model.weights)
    # With shared values and only the query/key side training, the value
    # mixing (a weight the layer owns itself) must stay out.
    if shared_value_dim and not value_side:
        assert not any("value_mixing" in path for path in expected)


def test_flags_restored_after_an_error():
    model, layer = _model(6)
    with pytest.raises(ValueError, match="inside"):
        with only_approximated_trainable(model, [layer], value_side=False):
            raise ValueError("inside")
    assert all(v.trainable for v in model.weights)
    np.testing.assert_array_equal(
        [layer.trainable, layer.value_dense.trainable], [True, True]
    )
