import os
import re

import keras
import numpy as np
import pytest
from keras import ops
from keras.src import testing

from keras_collab import CollaborativeMultiHeadAttention
from keras_collab.layers import CollaborativeMultiHeadAttention as LayersExport
from keras_collab.layers import collaborative_multi_head_attention as cmha
from tests.conftest import BACKEND
from tests.reference import causal_mask
from tests.reference import layer_reference
from tests.reference import position_mask
from tests.reference import sliding_window_mask

RNG = np.random.default_rng(7)


def _normal(*shape):
    return RNG.normal(size=shape).astype("float32")


def _numpy(x):
    return ops.convert_to_numpy(x)


def _random_layer(
    query_dim=16,
    value_dim_in=12,
    num_heads=3,
    key_dim=4,
    shared_key_dim=6,
    rank=3,
    **kwargs,
):
    """A built layer with every weight random, content bias included, for
    inputs of the given rank."""
    layer = CollaborativeMultiHeadAttention(
        num_heads=num_heads,
        key_dim=key_dim,
        shared_key_dim=shared_key_dim,
        bias_initializer="random_normal",
        mixing_initializer="random_normal",
        **kwargs,
    )
    positions = (None,) * (rank - 1)
    layer.build(positions + (query_dim,), positions + (value_dim_in,))
    if layer.content_bias is not None:
        layer.content_bias.assign(_normal(*layer.content_bias.shape))
    return layer


def _random_mha(num_heads=3, key_dim=4, **kwargs):
    return keras.layers.MultiHeadAttention(
        num_heads=num_heads,
        key_dim=key_dim,
        bias_initializer="random_normal",
        **kwargs,
    )


def _mha_outputs(mha, *args, **kwargs):
    # Keras MHA's fused JAX path rejects value_dim != key_dim; asking for
    # scores routes it through its einsum path, which computes the same thing.
    output, _ = mha(*args, return_attention_scores=True, **kwargs)
    return _numpy(output)


def _keras_masked(x, valid):
    """`x` zeroed where `valid` is False and carrying that Keras mask, as the
    output of a `Masking` (or `Embedding(mask_zero=True)`) layer does."""
    x = np.where(valid[..., None], x, 0.0).astype("float32")
    return keras.layers.Masking(0.0)(x)


def _call_modes(layer, inputs, **kwargs):
    """`(output, output_with_scores, scores)`: `layer` called without and
    with `return_attention_scores`, Keras MHA's fused and masked-softmax
    paths. `inputs()` gives fresh inputs for each call (a call consumes the
    Keras mask of its query)."""
    plain = layer(**inputs(), **kwargs)
    output, scores = layer(**inputs(), return_attention_scores=True, **kwargs)
    return _numpy(plain), _numpy(output), _numpy(scores)


def _assert_all_close(actual, expected):
    names = ("output", "output with scores", "scores")
    for name, a, e in zip(names, actual, expected):
        assert np.all(np.isfinite(a)), name
        np.testing.assert_allclose(a, e, atol=1e-5, err_msg=name)


def _assert_matches_mha(mha, inputs, **kwargs):
    """The full-size copy of `mha` computes what `mha` computes, in both
    call modes. Returns Keras MHA's `_call_modes`."""
    expected = _call_modes(mha, inputs, **kwargs)
    layer = CollaborativeMultiHeadAttention.from_multi_head_attention(mha)
    _assert_all_close(_call_modes(layer, inputs, **kwargs), expected)
    return expected


def _assert_matches_reference(layer, inputs, mask, **kwargs):
    """`layer` computes the NumPy reference with `mask` (broadcastable to
    the scores), in both call modes."""
    fresh = {name: _numpy(x) for name, x in inputs().items() if x is not None}
    # A query whose keys are all masked: uniform probabilities where Keras
    # MHA runs its fused kernel (rank-3 inputs, no dropout, no scores), zero
    # where it runs its masked softmax.
    plain = "zero"
    if fresh["query"].ndim == 3 and layer.dropout == 0:
        plain = "uniform"
    (output, _), (with_scores, scores) = (
        layer_reference(layer, **fresh, mask=mask, fully_masked=fully_masked)
        for fully_masked in (plain, "zero")
    )
    actual = _call_modes(layer, inputs, **kwargs)
    _assert_all_close(actual, (output, with_scores, scores))


def _over_scores(mask, scores_rank, num_attention_axes):
    """A Keras MHA `attention_mask` with the axes it leaves out (batch,
    other axes, heads: those before the attention axes) made explicit."""
    split = mask.ndim - 2 * num_attention_axes
    missing = (1,) * (scores_rank - mask.ndim)
    return mask.reshape(mask.shape[:split] + missing + mask.shape[split:])


class TestAgainstNumpyReference:
    def test_exports(self):
        assert LayersExport is CollaborativeMultiHeadAttention

    @pytest.mark.parametrize("shared_key_dim", [1, 5, 12, 20])
    def test_cross_attention_with_scores(self, shared_key_dim):
        layer = _random_layer(shared_key_dim=shared_key_dim)
        query, value = _normal(2, 5, 16), _normal(2, 7, 12)
        output, scores = layer(query, value, return_attention_scores=True)
        expected_output, expected_scores = layer_reference(layer, query, value)
        assert output.shape == (2, 5, 16)
        assert scores.shape == (2, 3, 5, 7)
        np.testing.assert_allclose(_numpy(output), expected_output, atol=1e-5)
        np.testing.assert_allclose(_numpy(scores), expected_scores, atol=1e-5)

    def test_separate_key_input(self):
        layer = CollaborativeMultiHeadAttention(
            num_heads=2,
            key_dim=3,
            shared_key_dim=4,
            value_dim=5,
            output_shape=(9,),
            bias_initializer="random_normal",
        )
        query, value, key = _normal(2, 4, 6), _normal(2, 3, 7), _normal(2, 3, 8)
        layer.build(query.shape, value.shape, key.shape)
        layer.content_bias.assign(_normal(8, 2))
        output = layer(query, value, key=key)
        expected, _ = layer_reference(layer, query, value, key=key)
        assert layer.content_bias.shape == (8, 2)
        assert output.shape == (2, 4, 9)
        np.testing.assert_allclose(_numpy(output), expected, atol=1e-5)

    @pytest.mark.parametrize(
        "mask_shape",
        [
            (2, 5, 7),
            (5, 7),
            (1, 5, 7),
            (2, 1, 7),
            (2, 3, 5, 7),
            (1, 3, 5, 7),
            (2, 1, 5, 7),
        ],
    )
    def test_attention_mask_broadcasting(self, mask_shape):
        # 2-D, 3-D and per-head 4-D masks, on every path (the blocked kernel
        # on PyTorch without scores).
        layer = _random_layer()
        query, value = _normal(2, 5, 16), _normal(2, 7, 12)
        mask = RNG.random(mask_shape) > 0.3
        _assert_matches_reference(
            layer,
            lambda: {"query": query, "value": value},
            mask,
            attention_mask=mask,
        )

    def test_value_and_key_masks(self):
        layer = _random_layer()
        query, value = _normal(2, 5, 16), _normal(2, 7, 12)
        value_mask = np.array([[1] * 7, [1] * 4 + [0] * 3], dtype=bool)
        key_mask = np.array([[1] * 6 + [0], [1] * 7], dtype=bool)
        output = layer(query, value, value_mask=value_mask, key_mask=key_mask)
        combined = (value_mask & key_mask)[:, None, :]
        expected, _ = layer_reference(layer, query, value, mask=combined)
        np.testing.assert_allclose(_numpy(output), expected, atol=1e-5)

    def test_implicit_keras_masks(self):
        tokens = np.array([[3, 4, 5, 0, 0], [6, 7, 0, 0, 0]])
        embedding = keras.layers.Embedding(10, 16, mask_zero=True)
        layer = _random_layer(value_dim_in=16)
        embedded = embedding(tokens)
        output = layer(embedded, embedded)
        valid = tokens != 0
        mask = valid[:, :, None] & valid[:, None, :]
        expected, _ = layer_reference(
            layer, _numpy(embedded), _numpy(embedded), mask=mask
        )
        # Padded query rows are garbage by design; compare the valid ones.
        np.testing.assert_allclose(
            _numpy(output)[valid], expected[valid], atol=1e-5
        )

    @pytest.mark.parametrize("with_scores", [False, True])
    def test_causal_mask(self, with_scores):
        layer = _random_layer(value_dim_in=16)
        query = _normal(2, 6, 16)
        result = layer(
            query,
            query,
            use_causal_mask=True,
            return_attention_scores=with_scores,
        )
        output = result[0] if with_scores else result
        causal = np.tril(np.ones((6, 6), dtype=bool))
        expected, expected_scores = layer_reference(
            layer, query, query, mask=causal
        )
        np.testing.assert_allclose(_numpy(output), expected, atol=1e-5)
        if with_scores:
            np.testing.assert_allclose(
                _numpy(result[1]), expected_scores, atol=1e-5
            )

    def test_causal_combined_with_padding(self):
        layer = _random_layer(value_dim_in=16)
        query = _normal(2, 6, 16)
        value_mask = np.array([[1] * 6, [1] * 4 + [0] * 2], dtype=bool)
        output = layer(
            query, query, value_mask=value_mask, use_causal_mask=True
        )
        mask = np.tril(np.ones((6, 6), dtype=bool))[None] & value_mask[:, None]
        expected, _ = layer_reference(layer, query, query, mask=mask)
        np.testing.assert_allclose(_numpy(output), expected, atol=1e-5)

    def test_without_bias(self):
        layer = CollaborativeMultiHeadAttention(
            num_heads=2, key_dim=4, shared_key_dim=3, use_bias=False
        )
        query = _normal(2, 5, 8)
        output = layer(query, query)
        assert layer.content_bias is None
        assert layer.query_dense.bias is None
        assert len(layer.weights) == 5
        expected, _ = layer_reference(layer, query, query)
        np.testing.assert_allclose(_numpy(output), expected, atol=1e-5)

    @pytest.mark.parametrize("dropout", [0.0, 0.1])
    def test_fully_masked_rows(self, dropout):
        # Same finite numbers on every backend: the float64 reference's.
        layer = _random_layer(dropout=dropout)
        query, value = _normal(2, 5, 16), _normal(2, 7, 12)
        mask = RNG.random((2, 5, 7)) > 0.3
        mask[0, 2] = False
        mask[1, 4] = False
        _assert_matches_reference(
            layer,
            lambda: {"query": query, "value": value},
            mask,
            attention_mask=mask,
        )

    @pytest.mark.parametrize(
        "case", ["causal", "mask", "per_head", "per_head_and_causal"]
    )
    def test_fused_and_einsum_paths_agree(self, case, monkeypatch):
        # value_dim == shared_key_dim lets JAX's fused kernel run too; on
        # PyTorch the fused kernel is forced, as on an accelerator.
        monkeypatch.setattr(
            "keras_collab.layers.collaborative_multi_head_attention."
            "_prefer_fused_on_torch",
            lambda tensor: True,
        )
        layer = _random_layer(shared_key_dim=5, value_dim=5, value_dim_in=16)
        query = _normal(2, 5, 16)
        head_mask = RNG.random((2, 3, 5, 5)) > 0.2
        head_mask[0, 1, 2] = False  # one head of one query sees nothing
        kwargs, mask = {
            "causal": ({"use_causal_mask": True}, causal_mask(5, 5)),
            "mask": ({"attention_mask": head_mask[:, 0]}, head_mask[:, 0]),
            "per_head": ({"attention_mask": head_mask}, head_mask),
            "per_head_and_causal": (
                {"attention_mask": head_mask, "use_causal_mask": True},
                head_mask & causal_mask(5, 5),
            ),
        }[case]
        expected_fused = BACKEND in ("torch", "jax")
        assert layer._use_fused_kernel(False) == expected_fused
        _assert_matches_reference(
            layer, lambda: {"query": query, "value": query}, mask, **kwargs
        )

    def test_attention_over_two_axes(self):
        layer = CollaborativeMultiHeadAttention(
            num_heads=2,
            key_dim=3,
            shared_key_dim=4,
            attention_axes=(1, 2),
            bias_initializer="random_normal",
            mixing_initializer="random_normal",
        )
        query = _normal(2, 3, 4, 8)
        output, scores = layer(query, query, return_attention_scores=True)
        assert output.shape == (2, 3, 4, 8)
        assert scores.shape == (2, 2, 3, 4, 3, 4)
        flat = query.reshape(2, 12, 8)
        expected, expected_scores = layer_reference(layer, flat, flat)
        np.testing.assert_allclose(
            _numpy(output).reshape(2, 12, 8), expected, atol=1e-5
        )
        np.testing.assert_allclose(
            _numpy(scores).reshape(2, 2, 12, 12), expected_scores, atol=1e-5
        )

    def test_attention_over_inner_axis(self):
        layer = CollaborativeMultiHeadAttention(
            num_heads=2,
            key_dim=3,
            shared_key_dim=4,
            attention_axes=(2,),
            bias_initializer="random_normal",
        )
        query = _normal(2, 3, 5, 8)
        output = layer(query, query)
        assert output.shape == (2, 3, 5, 8)
        # Axis 1 behaves as a batch axis.
        for row in range(3):
            expected, _ = layer_reference(layer, query[:, row], query[:, row])
            np.testing.assert_allclose(
                _numpy(output)[:, row], expected, atol=1e-5
            )


class TestExactMultiHeadAttention:
    @pytest.mark.parametrize(
        "kwargs",
        [
            {},
            {"value_dim": 5},
            {"use_bias": False},
            {"output_shape": (7,)},
            {"use_gate": True},
        ],
    )
    def test_from_multi_head_attention_cross(self, kwargs):
        mha = _random_mha(**kwargs)
        query, value, key = (
            _normal(2, 5, 16),
            _normal(2, 7, 12),
            _normal(2, 7, 9),
        )
        mask = RNG.random((2, 5, 7)) > 0.3
        expected = _mha_outputs(mha, query, value, key=key, attention_mask=mask)
        layer = CollaborativeMultiHeadAttention.from_multi_head_attention(mha)
        assert layer.shared_key_dim == 12
        output = layer(query, value, key=key, attention_mask=mask)
        np.testing.assert_allclose(_numpy(output), expected, atol=1e-5)
        scores = layer(query, value, key=key, return_attention_scores=True)[1]
        _, expected_scores = mha(
            query, value, key=key, return_attention_scores=True
        )
        np.testing.assert_allclose(
            _numpy(scores), _numpy(expected_scores), atol=1e-5
        )

    def test_from_multi_head_attention_causal_and_padding(self):
        mha = _random_mha()
        query = _normal(2, 6, 16)
        value_mask = np.array([[1] * 6, [1] * 3 + [0] * 3], dtype=bool)
        layer = None
        for kwargs in (
            {"use_causal_mask": True},
            {"use_causal_mask": True, "value_mask": value_mask},
            {"value_mask": value_mask},
        ):
            expected = _mha_outputs(mha, query, query, **kwargs)
            if layer is None:
                layer = (
                    CollaborativeMultiHeadAttention.from_multi_head_attention(
                        mha
                    )
                )
            output = layer(query, query, **kwargs)
            np.testing.assert_allclose(_numpy(output), expected, atol=1e-5)

    def test_source_layer_is_untouched(self):
        mha = _random_mha()
        query = _normal(2, 5, 16)
        mha(query, query)
        before = [_numpy(w).copy() for w in mha.weights]
        layer = CollaborativeMultiHeadAttention.from_multi_head_attention(mha)
        for variable in layer.weights:
            variable.assign(np.zeros(variable.shape))
        for old, new in zip(before, mha.weights):
            np.testing.assert_array_equal(old, _numpy(new))

    def test_query_key_variables(self):
        mha = _random_mha()
        query = _normal(2, 5, 16)
        mha(query, query)
        layer = CollaborativeMultiHeadAttention.from_multi_head_attention(mha)
        paths = sorted(
            v.path.split("/", 1)[1] for v in layer.query_key_variables
        )
        # Full size: the query bias stays in the projection, no content bias.
        assert paths == ["key/kernel", "mixing", "query/bias", "query/kernel"]

    def test_from_multi_head_attention_refuses_other_layers(self):
        with pytest.raises(ValueError, match="not built"):
            CollaborativeMultiHeadAttention.from_multi_head_attention(
                keras.layers.MultiHeadAttention(2, 2)
            )
        with pytest.raises(ValueError, match="MultiHeadAttention"):
            CollaborativeMultiHeadAttention.from_multi_head_attention(
                keras.layers.Dense(2)
            )

    def test_sliding_window(self):
        mha = _random_mha(sliding_window=2)
        query = _normal(2, 6, 16)
        expected = _mha_outputs(mha, query, query)
        layer = CollaborativeMultiHeadAttention.from_multi_head_attention(mha)
        np.testing.assert_allclose(
            _numpy(layer(query, query)), expected, atol=1e-5
        )

    def test_concatenate_mixing_is_the_default_at_full_size(self):
        layer = CollaborativeMultiHeadAttention(num_heads=3, key_dim=2)
        layer.build((None, None, 4), (None, None, 4))
        expected = np.repeat(np.eye(3), 2, axis=1)
        np.testing.assert_array_equal(_numpy(layer.mixing), expected)


class TestMasksAsInMultiHeadAttention:
    """Masks of `(B, T, dim)` inputs: the full-size copy against Keras MHA,
    a smaller D̃ against the NumPy reference (TestAgainstNumpyReference)."""

    @pytest.mark.parametrize(
        "mask_shape",
        [
            (5, 7),
            (2, 5, 7),
            (1, 5, 7),
            (2, 3, 5, 7),
            (1, 3, 5, 7),
            (2, 1, 5, 7),
        ],
    )
    def test_explicit_masks(self, mask_shape):
        query, value = _normal(2, 5, 16), _normal(2, 7, 12)
        mask = RNG.random(mask_shape) > 0.3
        _assert_matches_mha(
            _random_mha(),
            lambda: {"query": query, "value": value},
            attention_mask=mask,
        )

    @pytest.mark.parametrize("mask_shape", [(2, 3, 5, 5), (1, 3, 5, 5)])
    def test_per_head_mask_on_the_fused_path(self, mask_shape, monkeypatch):
        # value_dim = num_heads * key_dim = D̃ lets JAX's fused kernel run;
        # on PyTorch it is forced, as on an accelerator. (Keras MHA's own
        # fused JAX path refuses value_dim != key_dim: its einsum path is
        # the expected value.)
        monkeypatch.setattr(
            "keras_collab.layers.collaborative_multi_head_attention."
            "_prefer_fused_on_torch",
            lambda tensor: True,
        )
        query = _normal(2, 5, 16)
        mask = RNG.random(mask_shape) > 0.3
        mask[..., 0] = True  # no fully masked row: both paths average none
        mha = _random_mha(value_dim=12)
        expected = _mha_outputs(mha, query, query, attention_mask=mask)
        layer = CollaborativeMultiHeadAttention.from_multi_head_attention(mha)
        assert layer._use_fused_kernel(False) == (BACKEND != "tensorflow")
        output = layer(query, query, attention_mask=mask)
        np.testing.assert_allclose(_numpy(output), expected, atol=1e-5)

    def test_per_head_mask_with_padding_and_causal(self):
        # A batch of 2 and 3 heads: the masks must meet position by position
        # (Keras MHA's own merge lines them up from the right, which fits
        # only a batch of 1; that case is compared with it below).
        layer = _random_layer(value_dim_in=16)
        query = _normal(2, 6, 16)
        head_mask = RNG.random((2, 3, 6, 6)) > 0.3
        value_mask = np.array([[1] * 6, [1] * 4 + [0] * 2], dtype=bool)
        _assert_matches_reference(
            layer,
            lambda: {"query": query, "value": query},
            head_mask & causal_mask(6, 6) & value_mask[:, None, None, :],
            attention_mask=head_mask,
            value_mask=value_mask,
            use_causal_mask=True,
        )

    def test_per_head_mask_with_padding_and_causal_matches_mha(self):
        query = _normal(1, 6, 16)
        _assert_matches_mha(
            _random_mha(),
            lambda: {"query": query, "value": query},
            attention_mask=RNG.random((1, 3, 6, 6)) > 0.3,
            value_mask=np.array([[1] * 4 + [0] * 2], dtype=bool),
            use_causal_mask=True,
        )

    @pytest.mark.parametrize("dropout", [0.0, 0.1])
    def test_fully_masked_rows(self, dropout):
        query, value = _normal(2, 5, 16), _normal(2, 7, 12)
        mask = RNG.random((2, 5, 7)) > 0.3
        mask[0, 2] = False
        plain, with_scores, scores = _assert_matches_mha(
            _random_mha(dropout=dropout),
            lambda: {"query": query, "value": value},
            attention_mask=mask,
        )
        np.testing.assert_array_equal(scores[0, :, 2], 0.0)
        # Keras MHA's fused kernel (no dropout, no scores) averages the
        # values; its masked softmax (scores or dropout) gives them no weight.
        differs = not np.allclose(plain[0, 2], with_scores[0, 2], atol=1e-3)
        assert differs == (dropout == 0.0)
        np.testing.assert_allclose(plain[1], with_scores[1], atol=1e-5)

    def test_fully_masked_rows_in_training(self):
        # Dropout draws differ between the layers, but a query that attends
        # nowhere has no weight to drop: Keras MHA outputs the output bias.
        query, value = _normal(2, 5, 16), _normal(2, 7, 12)
        mask = RNG.random((2, 5, 7)) > 0.3
        mask[0, 2] = False
        mha = _random_mha(dropout=0.5)
        expected = mha(query, value, attention_mask=mask, training=True)
        layer = CollaborativeMultiHeadAttention.from_multi_head_attention(mha)
        output = layer(query, value, attention_mask=mask, training=True)
        bias = _numpy(mha.output_dense.bias)
        np.testing.assert_allclose(_numpy(expected)[0, 2], bias, atol=1e-6)
        np.testing.assert_allclose(_numpy(output)[0, 2], bias, atol=1e-6)

    @pytest.mark.parametrize("mask_shape", [(2, 7), (7,), (2, 1, 7)])
    def test_padding_mask_shapes(self, mask_shape):
        # Shapes Keras MHA reads as (batch, 1, keys) pieces of the scores.
        query, value = _normal(2, 5, 16), _normal(2, 7, 12)
        _assert_matches_mha(
            _random_mha(),
            lambda: {"query": query, "value": value},
            value_mask=RNG.random(mask_shape) > 0.3,
            key_mask=np.ones(mask_shape, bool),
        )

    def test_padding_from_keras_masks(self):
        tokens = np.array([[3, 4, 5, 0, 0], [6, 7, 0, 0, 0]])
        embedding = keras.layers.Embedding(10, 16, mask_zero=True)
        embedding.build(tokens.shape)
        _assert_matches_mha(
            _random_mha(),
            lambda: {"query": embedding(tokens), "value": embedding(tokens)},
        )


class TestMasksOverAttentionAxes:
    """Masks of inputs of rank > 3 with `attention_axes`."""

    def test_causal_mask_over_the_first_axis(self):
        x = _normal(1, 5, 3, 8)
        _, _, scores = _assert_matches_mha(
            _random_mha(num_heads=2, attention_axes=1),
            lambda: {"query": x, "value": x},
            use_causal_mask=True,
        )
        assert scores.shape == (1, 3, 2, 5, 5)
        np.testing.assert_array_equal(scores[..., ~causal_mask(5, 5)], 0.0)

    @pytest.mark.parametrize("axes", [(1,), (2,)])
    def test_causal_mask_and_padding(self, axes):
        # Axes of different sizes: Keras MHA builds its causal mask from
        # axis 1 whatever the attention axis, which fits only equal sizes
        # (compared with it below).
        layer = _random_layer(value_dim_in=16, rank=4, attention_axes=axes)
        x = _normal(2, 3, 5, 16)
        valid = RNG.random((2, 3, 5)) > 0.3
        n = x.shape[axes[0]]
        _assert_matches_reference(
            layer,
            lambda: {"query": x, "value": x},
            causal_mask(n, n) & position_mask(valid, axes, "key"),
            value_mask=valid,
            use_causal_mask=True,
        )

    def test_causal_mask_and_padding_match_mha(self):
        x = _normal(2, 4, 4, 16)
        _assert_matches_mha(
            _random_mha(attention_axes=(2,)),
            lambda: {"query": x, "value": x},
            value_mask=RNG.random((2, 4, 4)) > 0.3,
            use_causal_mask=True,
        )

    @pytest.mark.parametrize("axes", [(1,), (2,)])
    def test_sliding_window(self, axes):
        layer = _random_layer(
            value_dim_in=16, rank=4, attention_axes=axes, sliding_window=2
        )
        x = _normal(2, 3, 5, 16)
        n = x.shape[axes[0]]
        band = sliding_window_mask(n, n, 2)
        for kwargs, mask in (
            ({}, band),
            ({"use_causal_mask": True}, band & causal_mask(n, n)),
        ):
            _assert_matches_reference(
                layer, lambda: {"query": x, "value": x}, mask, **kwargs
            )

    def test_sliding_window_matches_mha(self):
        x = _normal(2, 5, 3, 16)
        mha = _random_mha(attention_axes=1, sliding_window=2)
        for kwargs in ({}, {"use_causal_mask": True}):
            _assert_matches_mha(mha, lambda: {"query": x, "value": x}, **kwargs)

    @pytest.mark.parametrize(
        "axes, value_positions",
        [((1,), (5, 4)), ((2,), (3, 5)), ((1, 2), (2, 5))],
    )
    def test_padding_masks(self, axes, value_positions):
        layer = _random_layer(rank=4, attention_axes=axes)
        query = _normal(2, 3, 4, 16)
        value = _normal(2, *value_positions, 12)
        query_valid = RNG.random((2, 3, 4)) > 0.3
        value_mask = RNG.random((2,) + value_positions) > 0.2
        key_mask = RNG.random((2,) + value_positions) > 0.2
        mask = (
            position_mask(query_valid, axes, "query")
            & position_mask(value_mask, axes, "key")
            & position_mask(key_mask, axes, "key")
        )
        _assert_matches_reference(
            layer,
            lambda: {
                "query": _keras_masked(query, query_valid),
                "value": value,
            },
            mask,
            value_mask=value_mask,
            key_mask=key_mask,
        )

    def test_padding_masks_match_mha(self):
        # Attention over the last positional axis, where Keras MHA lays its
        # padding masks out right.
        query = _normal(2, 3, 4, 16)
        value, key = _normal(2, 3, 5, 12), _normal(2, 3, 5, 9)
        query_valid = RNG.random((2, 3, 4)) > 0.3
        value_mask = RNG.random((2, 3, 5)) > 0.2
        mha = _random_mha(attention_axes=(2,))
        _assert_matches_mha(
            mha,
            lambda: {
                "query": _keras_masked(query, query_valid),
                "value": value,
                "key": key,
            },
            value_mask=value_mask,
            key_mask=RNG.random((2, 3, 5)) > 0.2,
        )
        # A mask without the other axis applies along all of it.
        _assert_matches_mha(
            mha,
            lambda: {"query": query, "value": value, "key": key},
            value_mask=value_mask[:, 0],
        )

    @pytest.mark.parametrize(
        "axes, value_positions, mask_shape",
        [
            ((2,), (3, 5), (4, 5)),
            ((2,), (3, 5), (2, 4, 5)),
            ((2,), (3, 5), (2, 3, 4, 5)),
            ((2,), (3, 5), (2, 3, 3, 4, 5)),
            ((2,), (3, 5), (1, 1, 3, 4, 5)),
            ((1,), (5, 4), (3, 5)),
            ((1,), (5, 4), (2, 4, 3, 5)),
            ((1,), (5, 4), (2, 4, 3, 3, 5)),
            ((1, 2), (2, 5), (3, 4, 2, 5)),
            ((1, 2), (2, 5), (2, 3, 4, 2, 5)),
            ((1, 2), (2, 5), (2, 3, 3, 4, 2, 5)),
        ],
    )
    def test_explicit_masks(self, axes, value_positions, mask_shape):
        query = _normal(2, 3, 4, 16)
        value = _normal(2, *value_positions, 12)
        mask = RNG.random(mask_shape) > 0.2
        inputs = lambda: {"query": query, "value": value}  # noqa: E731
        _assert_matches_mha(
            _random_mha(attention_axes=axes), inputs, attention_mask=mask
        )
        layer = _random_layer(rank=4, attention_axes=axes)
        _assert_matches_reference(
            layer,
            inputs,
            _over_scores(mask, 4 + len(axes), len(axes)),
            attention_mask=mask,
        )

    @pytest.mark.parametrize("fused", [False, True])
    def test_fully_masked_rows(self, fused, monkeypatch):
        # Keras MHA runs its masked softmax for these inputs: zero weights.
        query, value = _normal(2, 3, 4, 16), _normal(2, 3, 5, 16)
        mask = RNG.random((2, 3, 4, 5)) > 0.2
        mask[0, 1, 2] = False
        inputs = lambda: {"query": query, "value": value}  # noqa: E731
        plain, with_scores, scores = _assert_matches_mha(
            _random_mha(attention_axes=(2,)), inputs, attention_mask=mask
        )
        np.testing.assert_array_equal(scores[0, 1, :, 2], 0.0)
        np.testing.assert_allclose(plain, with_scores, atol=1e-5)
        if fused:  # as in test_fused_and_einsum_paths_agree
            monkeypatch.setattr(
                "keras_collab.layers.collaborative_multi_head_attention."
                "_prefer_fused_on_torch",
                lambda tensor: True,
            )
        layer = _random_layer(
            shared_key_dim=5,
            value_dim=5,
            value_dim_in=16,
            rank=4,
            attention_axes=(2,),
        )
        expected_fused = BACKEND == "jax" or (fused and BACKEND == "torch")
        assert layer._use_fused_kernel(False) == expected_fused
        _assert_matches_reference(
            layer, inputs, mask[:, :, None], attention_mask=mask
        )


def _recording_class(base, received):
    """A subclass of `base` whose `_compute_attention` (the override point)
    appends what it receives to `received`, then attends as `base` does."""

    class Recording(base):
        def _compute_attention(
            self,
            query,
            key,
            value,
            attention_mask=None,
            training=None,
            return_attention_scores=False,
            content_logits=None,
        ):
            received.append(
                {
                    "query": tuple(query.shape),
                    "key": tuple(key.shape),
                    "value": tuple(value.shape),
                    "mask": None
                    if attention_mask is None
                    else _numpy(attention_mask),
                    "content": None
                    if content_logits is None
                    else tuple(content_logits.shape),
                }
            )
            return super()._compute_attention(
                query,
                key,
                value,
                attention_mask,
                training,
                return_attention_scores,
                content_logits=content_logits,
            )

    return Recording


def _recording_twin(layer, received, **kwargs):
    """A built recording copy of `layer`, with its weights."""
    twin = _recording_class(type(layer), received).from_config(
        {**layer.get_config(), **kwargs}
    )
    positions = (None,) * (len(layer.query_dense.equation.split(",")[0]) - 1)
    twin.build(
        positions + (layer.query_dense.kernel.shape[0],),
        positions + (layer.value_dense.kernel.shape[0],),
        positions + (layer.key_dense.kernel.shape[0],),
    )
    twin.set_weights(layer.get_weights())
    return twin


class TestOverridePoint:
    """`_compute_attention` is the one override point of the attention."""

    @pytest.mark.parametrize("with_scores", [False, True])
    def test_causal_mask_reaches_an_override(self, with_scores):
        layer = _random_layer(value_dim_in=16)
        received = []
        twin = _recording_twin(layer, received)
        query = _normal(2, 6, 16)
        kwargs = dict(use_causal_mask=True, return_attention_scores=with_scores)
        expected = layer(query, query, **kwargs)
        actual = twin(query, query, **kwargs)
        (call,) = received
        assert call["query"] == (2, 6, 6) and call["key"] == (2, 6, 6)
        assert call["value"] == (2, 6, 3, 4)
        assert call["content"] == (2, 6, 3)
        assert call["mask"].ndim == 4
        np.testing.assert_array_equal(
            np.broadcast_to(call["mask"], (2, 3, 6, 6)),
            np.broadcast_to(causal_mask(6, 6), (2, 3, 6, 6)),
        )
        for a, e in zip(
            actual if with_scores else [actual],
            expected if with_scores else [expected],
        ):
            np.testing.assert_allclose(_numpy(a), _numpy(e), atol=1e-5)

    @pytest.mark.parametrize("axes", [(1,), (2,)])
    def test_causal_mask_over_attention_axes_reaches_an_override(self, axes):
        layer = _random_layer(value_dim_in=16, rank=4, attention_axes=axes)
        received = []
        twin = _recording_twin(layer, received)
        x = _normal(2, 4, 4, 16)
        expected = layer(x, x, use_causal_mask=True)
        actual = twin(x, x, use_causal_mask=True)
        (call,) = received
        # The other axis folds into the batch: (2 * 4, 4, ...).
        assert call["query"] == (8, 4, 6)
        assert call["value"] == (8, 4, 3, 4)
        assert call["mask"].ndim == 4
        np.testing.assert_array_equal(
            np.broadcast_to(call["mask"], (8, 3, 4, 4)),
            np.broadcast_to(causal_mask(4, 4), (8, 3, 4, 4)),
        )
        np.testing.assert_allclose(_numpy(actual), _numpy(expected), atol=1e-5)

    def test_combined_masks_reach_an_override(self):
        layer = _random_layer(value_dim_in=16)
        received = []
        twin = _recording_twin(layer, received)
        query = _normal(2, 5, 16)
        value_mask = np.array([[1] * 5, [1] * 3 + [0] * 2], dtype=bool)
        head_mask = RNG.random((2, 3, 5, 5)) > 0.3
        twin(
            query,
            query,
            value_mask=value_mask,
            attention_mask=head_mask,
            use_causal_mask=True,
        )
        expected = head_mask & causal_mask(5, 5) & value_mask[:, None, None]
        np.testing.assert_array_equal(
            np.broadcast_to(received[0]["mask"], expected.shape), expected
        )


class TestWeights:
    def test_names_and_shapes(self):
        layer = CollaborativeMultiHeadAttention(
            num_heads=3, key_dim=4, value_dim=5, shared_key_dim=6
        )
        layer.build((None, None, 16), (None, None, 12), (None, None, 10))
        shapes = {
            w.path.split("/", 1)[1]: tuple(w.shape) for w in layer.weights
        }
        assert shapes == {
            "query/kernel": (16, 6),
            "query/bias": (6,),
            "key/kernel": (10, 6),
            "mixing": (3, 6),
            "content_bias": (10, 3),
            "value/kernel": (12, 3, 5),
            "value/bias": (3, 5),
            "attention_output/kernel": (3, 5, 16),
            "attention_output/bias": (16,),
        }
        assert layer.query_dense.name == "query"
        assert layer.key_dense.name == "key"
        assert layer.value_dense.name == "value"
        assert layer.output_dense.name == "attention_output"

    def test_fewer_key_query_parameters(self):
        mha = keras.layers.MultiHeadAttention(num_heads=12, key_dim=64)
        layer = CollaborativeMultiHeadAttention(
            num_heads=12, key_dim=64, shared_key_dim=192
        )
        for each in (mha, layer):
            each.build((None, None, 768), (None, None, 768))
        assert layer.count_params() < mha.count_params()

        def qk(attention):
            return sum(
                dense.count_params()
                for dense in (attention.query_dense, attention.key_dense)
            )

        assert qk(mha) == 2 * 768 * 768 + 2 * 768
        assert qk(layer) == 2 * 768 * 192 + 192

    def test_gradients_reach_every_weight(self):
        layer = _random_layer(dropout=0.1, value_dim_in=16)
        inputs = keras.Input((5, 16))
        outputs = layer(inputs, inputs)
        model = keras.Model(inputs, outputs)
        model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
        before = [_numpy(w).copy() for w in model.trainable_weights]
        model.fit(_normal(4, 5, 16), _normal(4, 5, 16), epochs=1, verbose=0)
        assert len(before) == 9
        for old, variable in zip(before, model.trainable_weights):
            assert not np.allclose(old, _numpy(variable)), variable.path


def _toy_classifier(jit_compile="auto", **attention_kwargs):
    """A compiled token classifier around one collaborative layer (the
    model's layer 2): 2 heads of 8, D̃ = 4 unless `attention_kwargs` say
    otherwise."""
    inputs = keras.Input((6,), dtype="int32")
    x = keras.layers.Embedding(20, 16, mask_zero=True)(inputs)
    x = CollaborativeMultiHeadAttention(
        **{"num_heads": 2, "key_dim": 8, "shared_key_dim": 4, "dropout": 0.1}
        | attention_kwargs
    )(x, x)
    x = keras.layers.GlobalAveragePooling1D()(x)
    outputs = keras.layers.Dense(2)(x)
    model = keras.Model(inputs, outputs)
    model.compile(
        optimizer=keras.optimizers.Adam(1e-2),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        jit_compile=jit_compile,
    )
    return model


def _toy_data():
    """Tokens and labels `_toy_classifier` can learn."""
    # Its own generator: the data must not depend on the tests before.
    tokens = np.random.default_rng(0).integers(1, 20, size=(64, 6))
    labels = (tokens[:, 0] > 10).astype("int32")
    return tokens, labels


def _assert_config_round_trip(layer):
    """A layer built from `layer`'s config has the same config and, with its
    weights, computes the same."""
    config = layer.get_config()
    clone = CollaborativeMultiHeadAttention.from_config(config)
    assert clone.get_config() == config
    clone.build((None, None, 16), (None, None, 12))
    clone.set_weights(layer.get_weights())
    query, value = _normal(2, 5, 16), _normal(2, 7, 12)
    np.testing.assert_allclose(
        _numpy(clone(query, value)), _numpy(layer(query, value)), atol=1e-6
    )


def _assert_mixed_precision_matches(layer32, policy):
    """A copy of the float32 `layer32` under the mixed `policy` computes in
    the policy's dtype, finite everywhere and close to `layer32` wherever a
    query has keys, with and without scores."""
    query, value = _normal(2, 5, 16), _normal(2, 7, 12)
    mask = RNG.random((2, 5, 7)) > 0.3
    mask[0, 1] = False  # a fully masked row must stay finite
    expected, _ = layer32(
        query, value, attention_mask=mask, return_attention_scores=True
    )
    layer = CollaborativeMultiHeadAttention.from_config(
        {**layer32.get_config(), "dtype": policy}
    )
    layer.build((None, None, 16), (None, None, 12))
    layer.set_weights(layer32.get_weights())
    for with_scores in (False, True):
        result = layer(
            query,
            value,
            attention_mask=mask,
            return_attention_scores=with_scores,
        )
        output = result[0] if with_scores else result
        assert keras.backend.standardize_dtype(output.dtype) == policy[6:]
        output = _numpy(ops.cast(output, "float32"))
        assert np.all(np.isfinite(output))
        # A fully masked row has no meaningful value, only a finite one;
        # elsewhere bfloat16 keeps 8 bits of mantissa.
        attended = mask.any(axis=-1)
        np.testing.assert_allclose(
            output[attended],
            _numpy(expected)[attended],
            atol=0.1,
            rtol=0.05,
        )


class TestKerasIntegration:
    def test_run_layer_test(self):
        testing.TestCase().run_layer_test(
            CollaborativeMultiHeadAttention,
            init_kwargs={"num_heads": 2, "key_dim": 2, "shared_key_dim": 3},
            input_shape={"query_shape": (2, 4, 8), "value_shape": (2, 5, 8)},
            expected_output_shape=(2, 4, 8),
            expected_num_trainable_weights=9,
            expected_num_non_trainable_weights=0,
            expected_num_seed_generators=0,
            expected_num_losses=0,
            supports_masking=True,
            run_training_check=False,
        )

    def test_fit_lowers_the_loss(self):
        model = _toy_classifier()
        tokens, labels = _toy_data()
        history = model.fit(tokens, labels, epochs=8, batch_size=16, verbose=0)
        losses = history.history["loss"]
        assert losses[-1] < 0.7 * losses[0]

    def test_fit_with_jit_compile(self):
        if BACKEND == "torch" and os.environ.get("KERAS_COLLAB_FAST_TESTS"):
            pytest.skip("torch.compile is slow on CPU")
        model = _toy_classifier(jit_compile=True)
        tokens, labels = _toy_data()
        history = model.fit(tokens, labels, epochs=3, batch_size=32, verbose=0)
        assert np.isfinite(history.history["loss"][-1])

    def test_subclassed_model(self):
        class Block(keras.Model):
            def __init__(self):
                super().__init__()
                self.attention = CollaborativeMultiHeadAttention(
                    num_heads=2, key_dim=4, shared_key_dim=4
                )
                self.head = keras.layers.Dense(1)

            def call(self, x):
                return self.head(self.attention(x, x))

        model = Block()
        model.compile(optimizer="adam", loss="mse")
        history = model.fit(
            _normal(16, 5, 8), _normal(16, 5, 1), epochs=2, verbose=0
        )
        assert np.isfinite(history.history["loss"][-1])
        assert len(model.trainable_weights) == 11

    def test_config_round_trip(self):
        layer = _random_layer(dropout=0.2, value_dim=5, output_shape=(9,))
        assert layer.get_config()["shared_key_dim"] == 6
        _assert_config_round_trip(layer)

    def test_keras_file_round_trip(self, tmp_path):
        model = _toy_classifier()
        tokens, _ = _toy_data()
        expected = _numpy(model(tokens))
        path = tmp_path / "model.keras"
        model.save(path)
        restored = keras.saving.load_model(path)
        layer = restored.layers[2]
        assert isinstance(layer, CollaborativeMultiHeadAttention)
        assert layer.shared_key_dim == 4
        np.testing.assert_allclose(
            _numpy(restored(tokens)), expected, atol=1e-6
        )

    @pytest.mark.parametrize("policy", ["mixed_bfloat16", "mixed_float16"])
    def test_mixed_precision(self, policy):
        _assert_mixed_precision_matches(_random_layer(), policy)

    def test_int8_quantization(self):
        model = _toy_classifier()
        tokens, _ = _toy_data()
        expected = _numpy(model(tokens))
        model.quantize("int8")
        layer = model.layers[2]
        assert layer.query_dense.kernel.dtype == "int8"
        assert layer.value_dense.kernel.dtype == "int8"
        np.testing.assert_allclose(_numpy(model(tokens)), expected, atol=0.05)

    def test_lora_on_projections(self):
        model = _toy_classifier()
        layer = model.layers[2]
        layer.query_dense.enable_lora(2)
        layer.value_dense.enable_lora(2)
        lora_weights = [w for w in model.trainable_weights if "lora" in w.path]
        assert len(lora_weights) == 4
        tokens, labels = _toy_data()
        before = [_numpy(w).copy() for w in lora_weights]
        model.fit(tokens, labels, epochs=1, verbose=0)
        assert any(
            not np.allclose(old, _numpy(new))
            for old, new in zip(before, lora_weights)
        )


class TestBadInput:
    @pytest.mark.parametrize(
        "kwargs, argument",
        [
            ({"num_heads": 0, "key_dim": 2}, "num_heads"),
            ({"num_heads": 2, "key_dim": 0}, "key_dim"),
            (
                {"num_heads": 2, "key_dim": 2, "shared_key_dim": 0},
                "shared_key_dim",
            ),
            ({"num_heads": 2, "key_dim": 2, "dropout": 1.0}, "dropout"),
            ({"num_heads": 2, "key_dim": 2, "dropout": -0.1}, "dropout"),
        ],
    )
    def test_constructor_arguments(self, kwargs, argument):
        with pytest.raises(ValueError, match=argument):
            CollaborativeMultiHeadAttention(**kwargs)

    def test_mismatched_rank(self):
        layer = CollaborativeMultiHeadAttention(num_heads=2, key_dim=2)
        with pytest.raises(ValueError, match="same rank"):
            layer(_normal(2, 3, 4), _normal(2, 3, 2, 4))

    def test_mismatched_feature_size(self):
        layer = CollaborativeMultiHeadAttention(num_heads=2, key_dim=2)
        layer(_normal(2, 3, 4), _normal(2, 3, 4))
        with pytest.raises(ValueError, match="`query` has 5 features"):
            layer(_normal(2, 3, 5), _normal(2, 3, 4))

    def test_mask_that_does_not_broadcast(self):
        layer = CollaborativeMultiHeadAttention(num_heads=2, key_dim=2)
        with pytest.raises(ValueError, match="attention_mask"):
            layer(
                _normal(2, 3, 4),
                _normal(2, 5, 4),
                attention_mask=np.ones((2, 3, 4), dtype=bool),
            )

    def test_mismatched_key_and_value_positions(self):
        query, value, key = _normal(2, 3, 4), _normal(2, 5, 4), _normal(2, 6, 4)
        mha = keras.layers.MultiHeadAttention(num_heads=2, key_dim=2)
        with pytest.raises(ValueError, match="must be equal") as expected:
            mha(query, value, key=key)
        layer = CollaborativeMultiHeadAttention(num_heads=2, key_dim=2)
        with pytest.raises(ValueError, match=re.escape(str(expected.value))):
            layer(query, value, key=key)

    @pytest.mark.parametrize(
        "query_shape, value_shape, axes",
        [((2, 3, 4), (3, 5, 4), None), ((2, 3, 4, 4), (2, 2, 5, 4), (2,))],
    )
    def test_mismatched_query_and_value_batch(
        self, query_shape, value_shape, axes
    ):
        # Keras MHA fails in the backend's einsum (not always a ValueError).
        layer = CollaborativeMultiHeadAttention(
            num_heads=2, key_dim=2, attention_axes=axes
        )
        with pytest.raises(ValueError, match="must be equal"):
            layer(_normal(*query_shape), _normal(*value_shape))

    @pytest.mark.parametrize(
        "value_shape, axes, kwargs, message",
        [
            ((2, 5, 4), None, {"attention_mask": (2, 3, 4)}, "broadcastable"),
            (
                (2, 5, 4),
                None,
                {"attention_mask": (2, 4, 3, 5)},
                "broadcastable",
            ),
            (
                (2, 5, 4),
                None,
                {"attention_mask": (1, 2, 2, 3, 5)},
                "must not have more dimensions",
            ),
            ((2, 5, 4), None, {"value_mask": (2, 4)}, "broadcastable"),
            (
                (2, 3, 5, 4),
                (2,),
                {"attention_mask": (2, 3, 4, 6)},
                "broadcastable",
            ),
            ((2, 3, 5, 4), (2,), {"value_mask": (2, 3, 6)}, "broadcastable"),
        ],
    )
    def test_masks_that_do_not_broadcast(
        self, value_shape, axes, kwargs, message
    ):
        # Keras MHA raises from its masked softmax; so does the layer, with
        # the same words, on every path.
        query = _normal(*value_shape[:-2], 3, 4)
        value = _normal(*value_shape)
        masks = {name: np.ones(shape, bool) for name, shape in kwargs.items()}
        mha = keras.layers.MultiHeadAttention(
            num_heads=2, key_dim=2, attention_axes=axes
        )
        with pytest.raises(ValueError, match=message):
            mha(query, value, return_attention_scores=True, **masks)
        layer = CollaborativeMultiHeadAttention(
            num_heads=2, key_dim=2, attention_axes=axes
        )
        for with_scores in (False, True):
            with pytest.raises(ValueError, match=message):
                layer(
                    query,
                    value,
                    return_attention_scores=with_scores,
                    **masks,
                )

    @pytest.mark.parametrize(
        "kwargs, call, name",
        [
            ({}, {"use_causal_mask": True}, "use_causal_mask=True"),
            ({"sliding_window": 2}, {}, "sliding_window=2"),
        ],
    )
    def test_causal_or_sliding_window_over_two_axes(self, kwargs, call, name):
        x = _normal(1, 3, 4, 8)
        layer = CollaborativeMultiHeadAttention(
            num_heads=2, key_dim=2, attention_axes=(1, 2), **kwargs
        )
        with pytest.raises(
            ValueError, match=re.escape(f"{name} with attention_axes=(1, 2)")
        ):
            layer(x, x, **call)
        # Keras MHA cannot either: its (1, T, S) mask, built from axis 1
        # alone, does not expand to these scores (the error is the
        # backend's).
        mha = keras.layers.MultiHeadAttention(
            num_heads=2, key_dim=2, attention_axes=(1, 2), **kwargs
        )
        with pytest.raises(Exception, match="axis|dim"):
            mha(x, x, **call)

    def test_short_padding_mask_over_two_axes(self):
        layer = CollaborativeMultiHeadAttention(
            num_heads=2, key_dim=2, attention_axes=(1, 2)
        )
        x = _normal(2, 3, 4, 8)
        with pytest.raises(
            ValueError, match="`value_mask` must have the shape of the"
        ):
            layer(x, x, value_mask=np.ones((2, 4), bool))

    def test_concatenate_needs_divisible_size(self):
        layer = CollaborativeMultiHeadAttention(
            num_heads=2,
            key_dim=2,
            shared_key_dim=3,
            mixing_initializer="concatenate",
        )
        with pytest.raises(ValueError, match="multiple of `num_heads`"):
            layer.build((None, None, 4), (None, None, 4))


class TestXlaLayout:
    """The XLA backends' paths (one head at a time; query-major for shared
    values and few queries) against the `(B, H, T, S)` einsum path, on the
    inputs where both run."""

    @pytest.mark.parametrize(
        "case",
        [
            "none",
            "padding",
            "per_head",
            "causal",
            "shared_values",
            "shared_values_masked",
            "shared_values_many_queries",
            "more_queries",
            "mixed_precision",
        ],
    )
    def test_matches_einsum_path(self, case, monkeypatch):
        kwargs = {
            "shared_values": {"shared_value_dim": 5},
            "shared_values_masked": {"shared_value_dim": 5},
            "shared_values_many_queries": {"shared_value_dim": 5},
            "mixed_precision": {"dtype": "mixed_bfloat16"},
        }.get(case, {})
        layer = _random_layer(**kwargs)
        query, value = _normal(2, 5, 16), _normal(2, 7, 12)
        head_mask = RNG.random((2, 3, 5, 7)) > 0.3
        head_mask[1, 2, 4] = False  # one head of one query sees nothing
        call_kwargs = {
            "padding": {"attention_mask": head_mask[:, 0]},
            "per_head": {"attention_mask": head_mask},
            "shared_values_masked": {"attention_mask": head_mask},
            "causal": {"use_causal_mask": True},
        }.get(case, {})
        if case == "causal":
            value = _normal(2, 5, 12)
        if case == "shared_values_many_queries":
            # Past _QUERY_MAJOR_MAX_ROWS: one head at a time, shared values.
            query, value = _normal(2, 20, 16), _normal(2, 7, 12)
        if case == "more_queries":
            # Fewer keys than queries: the mixing scales the keys.
            query, value = _normal(2, 7, 16), _normal(2, 4, 12)
        expected_path = BACKEND in ("jax", "tensorflow")
        assert layer._use_xla_layout(False, False) == expected_path
        # These small batches would otherwise take the einsums themselves.
        monkeypatch.setattr(cmha, "_EINSUM_MAX_QUERY_ROWS", 0)
        xla_layout = _numpy(layer(query, value, **call_kwargs))
        monkeypatch.setattr(layer, "_use_xla_layout", lambda *args: False)
        einsum = _numpy(layer(query, value, **call_kwargs))
        tolerance = 2e-2 if case == "mixed_precision" else 1e-5
        np.testing.assert_allclose(xla_layout, einsum, atol=tolerance)

    def test_not_taken_for_scores_or_training_dropout(self):
        layer = _random_layer(dropout=0.1)
        assert not layer._use_xla_layout(True, False)
        assert not layer._use_xla_layout(False, True)
        assert layer._use_xla_layout(False, False) == (
            BACKEND in ("jax", "tensorflow")
        )

    @pytest.mark.parametrize(
        "rows, shared, expected",
        [
            (1, True, "_query_major_attention"),
            (16, True, "_query_major_attention"),
            (17, True, "_einsum_attention"),  # 2 * 17 rows in all
            (65, True, "_head_by_head_attention"),  # 2 * 65 > 128
            (1, False, "_head_by_head_attention"),  # a decoding step
            (16, False, "_head_by_head_attention"),
            (64, False, "_einsum_attention"),  # 2 * 64 = 128
            (65, False, "_head_by_head_attention"),
        ],
    )
    def test_layout_chosen_by_value_sharing_and_rows(
        self, rows, shared, expected, monkeypatch
    ):
        if BACKEND not in ("jax", "tensorflow"):
            pytest.skip("the XLA layouts run on JAX and TensorFlow")
        assert cmha._EINSUM_MAX_QUERY_ROWS == 128
        layer = _random_layer(**({"shared_value_dim": 5} if shared else {}))
        calls = []
        names = (
            "_query_major_attention",
            "_head_by_head_attention",
            "_einsum_attention",
        )
        for name in names:
            original = getattr(layer, name)

            def spy(*args, _name=name, _original=original, **kwargs):
                calls.append(_name)
                return _original(*args, **kwargs)

            monkeypatch.setattr(layer, name, spy)
        layer(_normal(2, rows, 16), _normal(2, 7, 12))
        assert calls == [expected]
