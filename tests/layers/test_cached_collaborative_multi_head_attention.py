import keras
import numpy as np
import pytest
from keras import ops

from keras_collab import CachedCollaborativeMultiHeadAttention

RNG = np.random.default_rng(11)


def _layer(**kwargs):
    kwargs = {"shared_key_dim": 6, **kwargs}
    layer = CachedCollaborativeMultiHeadAttention(
        num_heads=2,
        key_dim=8,
        bias_initializer="random_normal",
        mixing_initializer="random_normal",
        **kwargs,
    )
    layer.build((None, None, 16), (None, None, 16))
    if layer.content_bias is not None:
        layer.content_bias.assign(RNG.normal(size=layer.content_bias.shape))
    return layer


def _empty_cache(layer, layout, batch, length):
    if layout == "compact":
        return layer.empty_cache(batch, length)
    return ops.zeros((batch, 2, length, layer.num_heads, layer.key_dim))


@pytest.mark.parametrize(
    "layout, kwargs",
    [
        ("compact", {}),
        ("compact", {"shared_key_dim": 16, "value_dim": 5}),
        ("compact", {"use_content_bias": False}),
        ("compact", {"shared_value_dim": 5}),
        ("compact", {"shared_value_dim": 6, "use_content_bias": False}),
        ("compact", {"shared_key_dim": 16, "shared_value_dim": 16}),
        ("keras_hub", {}),
    ],
)
def test_incremental_decoding_matches_full_causal_attention(layout, kwargs):
    layer = _layer(**kwargs)
    x = RNG.normal(size=(2, 5, 16)).astype("float32")
    causal = np.tril(np.ones((5, 5), dtype=bool))[None]
    expected = ops.convert_to_numpy(layer(x, x, attention_mask=causal))
    cache = _empty_cache(layer, layout, 2, 5)
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


def test_compact_cache_holds_exactly_what_attention_needs():
    # Per position: D̃ shared key + H content logits + H * d_v values.
    layer = _layer(shared_key_dim=6, value_dim=5)
    assert layer.cache_width == 6 + 2 + 2 * 5
    x = RNG.normal(size=(3, 4, 16)).astype("float32")
    _, cache = layer(x, x, cache=layer.empty_cache(3, 7), cache_update_index=0)
    assert tuple(cache.shape) == (3, 1, 7, 18)
    cache = ops.convert_to_numpy(cache)
    np.testing.assert_allclose(
        cache[:, 0, :4, :6], ops.convert_to_numpy(layer.key_dense(x)), atol=1e-6
    )
    content = x @ ops.convert_to_numpy(layer.content_bias)
    np.testing.assert_allclose(cache[:, 0, :4, 6:8], content, atol=1e-5)
    values = ops.convert_to_numpy(layer.value_dense(x)).reshape(3, 4, 10)
    np.testing.assert_allclose(cache[:, 0, :4, 8:], values, atol=1e-6)
    assert not cache[:, 0, 4:].any()  # positions not yet written
    assert _layer(use_content_bias=False).cache_width == 6 + 2 * 8


def test_compact_cache_holds_the_shared_values():
    # Per position: D̃ shared key + H content logits + D̃_v shared values.
    layer = _layer(shared_key_dim=6, shared_value_dim=5)
    assert layer.cache_width == 6 + 2 + 5
    assert _layer(shared_value_dim=5, use_content_bias=False).cache_width == (
        6 + 5
    )
    x = RNG.normal(size=(3, 4, 16)).astype("float32")
    _, cache = layer(x, x, cache=layer.empty_cache(3, 7), cache_update_index=0)
    assert tuple(cache.shape) == (3, 1, 7, 13)
    cache = ops.convert_to_numpy(cache)
    values = ops.convert_to_numpy(layer.value_dense(x))
    assert values.shape == (3, 4, 5)
    np.testing.assert_allclose(cache[:, 0, :4, 8:], values, atol=1e-6)
    assert not cache[:, 0, 4:].any()


def test_incremental_decoding_with_shared_values_matches_mha():
    # At full size with concatenated mixing, shared values decode exactly
    # as the Keras MHA they copy.
    from keras_collab.layers import CollaborativeValueOutput

    mha = keras.layers.MultiHeadAttention(
        num_heads=2, key_dim=8, bias_initializer="random_normal"
    )
    x = RNG.normal(size=(2, 5, 16)).astype("float32")
    causal = np.tril(np.ones((5, 5), dtype=bool))[None]
    expected, _ = mha(x, x, attention_mask=causal, return_attention_scores=True)
    value = ops.convert_to_numpy(mha.value_dense.kernel)
    output = ops.convert_to_numpy(mha.output_dense.kernel)
    side = CollaborativeValueOutput(
        value_kernel=value.reshape(16, 16),
        value_mixing=np.repeat(np.eye(2), 8, axis=1),
        output_kernel=output.reshape(16, 16),
        value_bias=ops.convert_to_numpy(mha.value_dense.bias).reshape(16),
        output_bias=ops.convert_to_numpy(mha.output_dense.bias),
    )
    layer = CachedCollaborativeMultiHeadAttention.from_multi_head_attention(
        mha, value_output=side
    )
    assert layer.cache_width == 16 + 16
    cache = layer.empty_cache(2, 5)
    outputs = []
    for step in range(5):
        token = x[:, step : step + 1]
        output, cache = layer(
            token,
            token,
            attention_mask=np.arange(5)[None, None, :] <= step,
            cache=cache,
            cache_update_index=step,
        )
        outputs.append(ops.convert_to_numpy(output))
    np.testing.assert_allclose(
        np.concatenate(outputs, axis=1),
        ops.convert_to_numpy(expected),
        atol=1e-5,
    )


def test_keras_hub_layout_refuses_shared_values():
    layer = _layer(shared_value_dim=5)
    x = RNG.normal(size=(1, 2, 16)).astype("float32")
    with pytest.raises(ValueError, match="shares its values"):
        layer(x, x, cache=ops.zeros((1, 2, 2, 2, 8)), cache_update_index=0)


def test_keras_hub_layout_cannot_hold_too_large_a_shared_key():
    layer = _layer(shared_key_dim=15)
    x = RNG.normal(size=(1, 2, 16)).astype("float32")
    cache = ops.zeros((1, 2, 2, 2, 8))
    with pytest.raises(ValueError, match="shared_key_dim"):
        layer(x, x, cache=cache, cache_update_index=0)
    # The compact cache holds it.
    layer(x, x, cache=layer.empty_cache(1, 2), cache_update_index=0)


def test_keras_hub_layout_needs_value_dim_equal_to_key_dim():
    layer = _layer(value_dim=3)
    x = RNG.normal(size=(1, 2, 16)).astype("float32")
    with pytest.raises(ValueError, match="value_dim"):
        layer(x, x, cache=ops.zeros((1, 2, 2, 2, 8)), cache_update_index=0)


@pytest.mark.parametrize("shape", [(1, 1, 2, 5), (1, 2, 2, 3, 8), (1, 2, 8)])
def test_cache_of_the_wrong_shape_is_named(shape):
    layer = _layer()
    x = RNG.normal(size=(1, 2, 16)).astype("float32")
    with pytest.raises(ValueError, match="cache.shape"):
        layer(x, x, cache=ops.zeros(shape), cache_update_index=0)


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
    assert clone.shared_value_dim is None
    shared = _layer(shared_value_dim=5)
    clone = keras.saving.deserialize_keras_object(
        keras.saving.serialize_keras_object(shared)
    )
    assert clone.shared_value_dim == 5
    assert clone.cache_width == shared.cache_width == 6 + 2 + 5


def test_cached_attention_goes_through_the_override_point():
    received = []

    class Recording(CachedCollaborativeMultiHeadAttention):
        def _compute_attention(
            self, query, key, value, attention_mask=None, *args, **kwargs
        ):
            received.append(
                None
                if attention_mask is None
                else ops.convert_to_numpy(attention_mask)
            )
            return super()._compute_attention(
                query, key, value, attention_mask, *args, **kwargs
            )

    layer = _layer()
    twin = Recording.from_config(layer.get_config())
    twin.build((None, None, 16), (None, None, 16))
    twin.set_weights(layer.get_weights())
    x = RNG.normal(size=(2, 3, 16)).astype("float32")
    mask = np.arange(4)[None, None, :] <= 1
    cache = layer.empty_cache(2, 4)
    expected, _ = layer(
        x[:, 1:2],
        x[:, 1:2],
        attention_mask=mask,
        cache=cache,
        cache_update_index=1,
    )
    output, _ = twin(
        x[:, 1:2],
        x[:, 1:2],
        attention_mask=mask,
        cache=cache,
        cache_update_index=1,
    )
    (received_mask,) = received
    assert received_mask.ndim == 4
    np.testing.assert_array_equal(
        np.broadcast_to(received_mask, (2, 2, 1, 4)),
        np.broadcast_to(mask[:, None], (2, 2, 1, 4)),
    )
    np.testing.assert_allclose(
        ops.convert_to_numpy(output), ops.convert_to_numpy(expected), atol=1e-6
    )
