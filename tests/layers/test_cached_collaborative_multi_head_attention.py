import keras
import numpy as np
import pytest
from keras import ops

from keras_collab import CachedCollaborativeMultiHeadAttention

RNG = np.random.default_rng(11)


def _layer(**kwargs):
    layer = CachedCollaborativeMultiHeadAttention(
        num_heads=2,
        key_dim=8,
        shared_key_dim=6,
        bias_initializer="random_normal",
        mixing_initializer="random_normal",
        **kwargs,
    )
    layer.build((None, None, 16), (None, None, 16))
    if layer.content_bias is not None:
        layer.content_bias.assign(RNG.normal(size=layer.content_bias.shape))
    return layer


def test_incremental_decoding_matches_full_causal_attention():
    layer = _layer()
    x = RNG.normal(size=(2, 5, 16)).astype("float32")
    causal = np.tril(np.ones((5, 5), dtype=bool))[None]
    expected = ops.convert_to_numpy(layer(x, x, attention_mask=causal))
    cache = ops.zeros((2, 2, 5, 2, 8))
    outputs = []
    for step in range(5):
        token = x[:, step : step + 1]
        mask = np.arange(5)[None, None, :] <= step
        output, cache = layer(
            token,
            token,
            attention_mask=mask,
            cache=cache,
            cache_update_index=step,
        )
        outputs.append(ops.convert_to_numpy(output))
    np.testing.assert_allclose(
        np.concatenate(outputs, axis=1), expected, atol=1e-5
    )
    # Reading the filled cache without update gives the same result.
    output, _ = layer(
        x[:, -1:],
        x[:, -1:],
        attention_mask=np.ones((1, 1, 5), bool),
        cache=cache,
    )
    np.testing.assert_allclose(
        ops.convert_to_numpy(output), expected[:, -1:], atol=1e-5
    )


def test_cache_cannot_hold_too_large_a_shared_key():
    layer = CachedCollaborativeMultiHeadAttention(
        num_heads=2, key_dim=4, shared_key_dim=7
    )
    with pytest.raises(ValueError, match="shared_key_dim"):
        layer.build((None, None, 8), (None, None, 8))


def test_value_dim_must_match_key_dim():
    layer = CachedCollaborativeMultiHeadAttention(
        num_heads=2, key_dim=4, value_dim=3, shared_key_dim=4
    )
    with pytest.raises(ValueError, match="value_dim"):
        layer.build((None, None, 8), (None, None, 8))


def test_update_index_without_cache_is_refused():
    layer = _layer()
    x = RNG.normal(size=(1, 2, 16)).astype("float32")
    with pytest.raises(ValueError, match="cache_update_index"):
        layer(x, x, cache_update_index=0)


def test_serializable():
    layer = _layer()
    config = keras.saving.serialize_keras_object(layer)
    clone = keras.saving.deserialize_keras_object(config)
    assert isinstance(clone, CachedCollaborativeMultiHeadAttention)
    assert clone.shared_key_dim == 6
