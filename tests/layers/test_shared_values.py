"""Shared values (`shared_value_dim`) of `CollaborativeMultiHeadAttention`:
exact multi-head attention at full size, the NumPy reference below it, the
fused one-key/value-head path, and every feature of the layer."""

import os

import keras
import numpy as np
import pytest
from keras import ops
from keras.src import testing

from keras_collab.layers import CollaborativeMultiHeadAttention
from keras_collab.layers import CollaborativeValueOutput
from keras_collab.layers.initializers import ConcatenateMixing
from keras_collab.layers.initializers import get_value_mixing_initializer
from tests.conftest import BACKEND
from tests.layers.test_collaborative_multi_head_attention import (
    _assert_all_close,
)
from tests.layers.test_collaborative_multi_head_attention import (
    _assert_config_round_trip,
)
from tests.layers.test_collaborative_multi_head_attention import (
    _assert_matches_reference,
)
from tests.layers.test_collaborative_multi_head_attention import (
    _assert_mixed_precision_matches,
)
from tests.layers.test_collaborative_multi_head_attention import _call_modes
from tests.layers.test_collaborative_multi_head_attention import _keras_masked
from tests.layers.test_collaborative_multi_head_attention import _over_scores
from tests.layers.test_collaborative_multi_head_attention import _random_layer
from tests.layers.test_collaborative_multi_head_attention import _random_mha
from tests.layers.test_collaborative_multi_head_attention import _recording_twin
from tests.layers.test_collaborative_multi_head_attention import _toy_classifier
from tests.layers.test_collaborative_multi_head_attention import _toy_data
from tests.reference import causal_mask
from tests.reference import layer_reference
from tests.reference import position_mask

RNG = np.random.default_rng(17)
FUSED_PREFERENCE = (
    "keras_collab.layers.collaborative_multi_head_attention."
    "_prefer_fused_on_torch"
)


def _normal(*shape):
    return RNG.normal(size=shape).astype("float32")


def _numpy(x):
    return ops.convert_to_numpy(x)


def _shared_layer(shared_value_dim=5, **kwargs):
    """A built layer with shared values and every weight random (the
    value mixing from its default random initializer)."""
    layer = _random_layer(shared_value_dim=shared_value_dim, **kwargs)
    if layer._use_gate:
        for variable in layer._gate_dense.weights:
            variable.assign(_normal(*variable.shape))
    return layer


def _concatenated_value_output(mha):
    """`mha`'s value side in the concatenated layout of shared values at
    full size: head `h` owns columns `[h * d_v, (h + 1) * d_v)`; its gate
    acts on that block (the others are mixed out by the value mixing)."""
    heads, head_dim = mha.num_heads, mha.value_dim
    full = heads * head_dim
    value = _numpy(mha.value_dense.kernel)
    output = _numpy(mha.output_dense.kernel)
    result = CollaborativeValueOutput(
        value_kernel=value.reshape(value.shape[0], full),
        value_mixing=np.repeat(np.eye(heads), head_dim, axis=1),
        output_kernel=output.reshape((full,) + output.shape[2:]),
    )
    if mha.value_dense.bias is not None:
        result.value_bias = _numpy(mha.value_dense.bias).reshape(full)
        result.output_bias = _numpy(mha.output_dense.bias)
    if mha._use_gate:
        gate = _numpy(mha._gate_dense.kernel)  # (D_q, H, d_v)
        result.gate_kernel = np.zeros((gate.shape[0], heads, full))
        result.gate_bias = np.zeros((heads, full))
        for h in range(heads):
            block = slice(h * head_dim, (h + 1) * head_dim)
            result.gate_kernel[:, h, block] = gate[:, h]
            if mha._gate_dense.bias is not None:
                result.gate_bias[h, block] = _numpy(mha._gate_dense.bias)[h]
    return result


def _shared_copy(mha):
    return CollaborativeMultiHeadAttention.from_multi_head_attention(
        mha, value_output=_concatenated_value_output(mha)
    )


def _mha_expected(mha, inputs, **kwargs):
    """Keras MHA's output and scores on its masked-softmax path (its fused
    JAX path refuses `value_dim != key_dim`)."""
    output, scores = mha(**inputs(), return_attention_scores=True, **kwargs)
    return _numpy(output), _numpy(scores)


def _assert_matches_mha(mha, inputs, **kwargs):
    """The shared-value copy of `mha` at full size computes what `mha`
    computes, in both call modes (the masks leave no query without keys,
    where the modes differ)."""
    output, scores = _mha_expected(mha, inputs, **kwargs)
    layer = _shared_copy(mha)
    assert layer.shared_value_dim == mha.num_heads * mha.value_dim
    _assert_all_close(
        _call_modes(layer, inputs, **kwargs), (output, output, scores)
    )


class TestWeights:
    def test_names_and_shapes(self):
        layer = CollaborativeMultiHeadAttention(
            num_heads=3,
            key_dim=4,
            value_dim=5,
            shared_key_dim=6,
            shared_value_dim=7,
            use_gate=True,
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
            "gate/kernel": (16, 3, 7),
            "gate/bias": (3, 7),
            "value/kernel": (12, 7),
            "value/bias": (7,),
            "value_mixing": (3, 7),
            "attention_output/kernel": (7, 16),
            "attention_output/bias": (16,),
        }
        paths = [v.path.split("/", 1)[1] for v in layer.value_output_variables]
        assert paths == [
            "value/kernel",
            "value/bias",
            "value_mixing",
            "attention_output/kernel",
            "attention_output/bias",
            "gate/kernel",
            "gate/bias",
        ]

    def test_per_head_values_by_default(self):
        layer = CollaborativeMultiHeadAttention(num_heads=3, key_dim=4)
        layer.build((None, None, 16), (None, None, 16))
        assert layer.shared_value_dim is None
        assert layer.value_mixing is None
        assert layer.value_dense.kernel.shape == (16, 3, 4)
        # The configuration (and so saved files) as before shared values.
        config = layer.get_config()
        assert "shared_value_dim" not in config
        assert "value_mixing_initializer" not in config
        paths = [v.path.split("/", 1)[1] for v in layer.value_output_variables]
        assert paths == [
            "value/kernel",
            "value/bias",
            "attention_output/kernel",
            "attention_output/bias",
        ]

    def test_fewer_value_output_parameters(self):
        mha = keras.layers.MultiHeadAttention(num_heads=12, key_dim=64)
        layer = CollaborativeMultiHeadAttention(
            num_heads=12, key_dim=64, shared_value_dim=192
        )
        for each in (mha, layer):
            each.build((None, None, 768), (None, None, 768))
        assert sum(np.prod(v.shape) for v in layer.value_output_variables) == (
            768 * 192 + 192 + 12 * 192 + 192 * 768 + 768
        )
        assert layer.count_params() < mha.count_params()

    def test_concatenate_mixing_is_the_default_at_full_size(self):
        layer = CollaborativeMultiHeadAttention(
            num_heads=3, key_dim=2, value_dim=4, shared_value_dim=12
        )
        layer.build((None, None, 4), (None, None, 4))
        expected = np.repeat(np.eye(3), 4, axis=1)
        np.testing.assert_array_equal(_numpy(layer.value_mixing), expected)
        assert isinstance(layer._value_mixing_initializer, ConcatenateMixing)

    def test_random_mixing_preserves_the_variance(self):
        # Below full size: entries of variance 1 / H, so that Σ_h n_h c_h
        # has the variance of one context entry c, however correlated the
        # heads' contexts are (here they share a common part).
        heads = 8
        initializer = get_value_mixing_initializer(None, heads, 4, 4000)
        mixing = _numpy(initializer((heads, 4000)))
        np.testing.assert_allclose(mixing.std(), 1 / np.sqrt(heads), rtol=0.02)
        rng = np.random.default_rng(0)
        common = rng.normal(size=(64, 1, 4000))
        contexts = (common + rng.normal(size=(64, heads, 4000))) / np.sqrt(2)
        mixed = np.einsum("nhv,hv->nv", contexts, mixing)
        np.testing.assert_allclose(mixed.var(), contexts.var(), rtol=0.05)

    @pytest.mark.parametrize("value", [0, -2, True, 2.5])
    def test_invalid_shared_value_dim(self, value):
        with pytest.raises(ValueError, match="shared_value_dim"):
            CollaborativeMultiHeadAttention(
                num_heads=2, key_dim=2, shared_value_dim=value
            )

    def test_value_mixing_initializer_needs_shared_values(self):
        with pytest.raises(ValueError, match="needs `shared_value_dim`"):
            CollaborativeMultiHeadAttention(
                num_heads=2, key_dim=2, value_mixing_initializer="ones"
            )

    def test_concatenate_needs_divisible_size(self):
        layer = CollaborativeMultiHeadAttention(
            num_heads=2,
            key_dim=2,
            shared_value_dim=3,
            value_mixing_initializer="concatenate",
        )
        with pytest.raises(ValueError, match="multiple of `num_heads`"):
            layer.build((None, None, 4), (None, None, 4))


class TestExactMultiHeadAttention:
    """At `shared_value_dim = num_heads * value_dim` with concatenated
    mixing, shared values are Keras MHA's per-head values."""

    @pytest.mark.parametrize(
        "kwargs",
        [
            {},
            {"value_dim": 5},
            {"use_bias": False},
            {"output_shape": (7,)},
            {"output_shape": (2, 4)},
            {"use_gate": True},
            {"use_gate": True, "value_dim": 5, "output_shape": (7,)},
        ],
    )
    def test_cross_attention_with_masks(self, kwargs):
        query, value, key = (
            _normal(2, 5, 16),
            _normal(2, 7, 12),
            _normal(2, 7, 9),
        )
        mask = RNG.random((2, 3, 5, 7)) > 0.3
        mask[..., 0] = True
        inputs = lambda: {"query": query, "value": value, "key": key}  # noqa: E731
        mha = _random_mha(**kwargs)
        _assert_matches_mha(mha, inputs, attention_mask=mask)
        _assert_matches_mha(mha, inputs)

    def test_built_from_the_constructor(self):
        # The default value mixing at full size is the concatenated one:
        # copying MHA's weights in the concatenated layout is enough.
        mha = _random_mha(value_dim=5)
        query = _normal(2, 6, 16)
        expected, _ = _mha_expected(
            mha, lambda: {"query": query, "value": query}, use_causal_mask=True
        )
        layer = CollaborativeMultiHeadAttention(
            num_heads=3, key_dim=4, value_dim=5, shared_value_dim=15
        )
        layer.build((None, None, 16), (None, None, 16))
        side = _concatenated_value_output(mha)
        for variable, source in (
            (layer.query_dense.kernel, mha.query_dense.kernel),
            (layer.query_dense.bias, mha.query_dense.bias),
            (layer.key_dense.kernel, mha.key_dense.kernel),
        ):
            variable.assign(np.reshape(_numpy(source), variable.shape))
        layer.content_bias.assign(np.zeros(layer.content_bias.shape))
        layer.value_dense.kernel.assign(side.value_kernel)
        layer.value_dense.bias.assign(side.value_bias)
        layer.output_dense.kernel.assign(side.output_kernel)
        layer.output_dense.bias.assign(side.output_bias)
        np.testing.assert_allclose(
            _numpy(layer(query, query, use_causal_mask=True)),
            expected,
            atol=1e-5,
        )

    def test_causal_padding_and_per_head_masks(self):
        query = _normal(1, 6, 16)
        value_mask = np.array([[1] * 4 + [0] * 2], dtype=bool)
        inputs = lambda: {"query": query, "value": query}  # noqa: E731
        head_mask = RNG.random((1, 3, 6, 6)) > 0.3
        head_mask[..., 0] = True  # no query without keys
        mha = _random_mha()
        for kwargs in (
            {"use_causal_mask": True},
            {"use_causal_mask": True, "value_mask": value_mask},
            {
                "use_causal_mask": True,
                "attention_mask": head_mask,
            },
        ):
            _assert_matches_mha(mha, inputs, **kwargs)

    def test_padding_from_keras_masks(self):
        tokens = np.array([[3, 4, 5, 0, 0], [6, 7, 1, 2, 0]])
        embedding = keras.layers.Embedding(10, 16, mask_zero=True)
        embedding.build(tokens.shape)
        inputs = lambda: {  # noqa: E731
            "query": embedding(tokens),
            "value": embedding(tokens),
        }
        mha = _random_mha()
        output, _ = _mha_expected(mha, inputs)
        layer = _shared_copy(mha)
        valid = tokens != 0
        for result in _call_modes(layer, inputs)[:2]:
            # Padded query rows attend nowhere: compare the others.
            np.testing.assert_allclose(result[valid], output[valid], atol=1e-5)

    @pytest.mark.parametrize("axes", [(1,), (2,), (1, 2)])
    def test_attention_axes(self, axes):
        query = _normal(2, 3, 4, 16)
        value = _normal(2, 3, 4, 12)
        if axes == (1, 2):
            mask = RNG.random((2, 3, 4, 3, 4)) > 0.3
            mask[..., 0, 0] = True
        else:
            n = query.shape[axes[0]]
            mask = RNG.random((n, n)) > 0.3
            mask[..., 0] = True
        inputs = lambda: {"query": query, "value": value}  # noqa: E731
        mha = _random_mha(attention_axes=axes, use_gate=True)
        _assert_matches_mha(mha, inputs, attention_mask=mask)

    def test_fully_masked_rows_in_training(self):
        # A query that attends nowhere outputs the output bias.
        query, value = _normal(2, 5, 16), _normal(2, 7, 12)
        mask = RNG.random((2, 5, 7)) > 0.3
        mask[0, 2] = False
        mha = _random_mha(dropout=0.5)
        mha(query, value)
        layer = _shared_copy(mha)
        output = layer(query, value, attention_mask=mask, training=True)
        np.testing.assert_allclose(
            _numpy(output)[0, 2], _numpy(mha.output_dense.bias), atol=1e-6
        )


class TestAgainstNumpyReference:
    @pytest.mark.parametrize("shared_value_dim", [1, 5, 12, 20])
    def test_cross_attention_with_scores(self, shared_value_dim):
        layer = _shared_layer(shared_value_dim)
        query, value = _normal(2, 5, 16), _normal(2, 7, 12)
        output, scores = layer(query, value, return_attention_scores=True)
        expected, expected_scores = layer_reference(layer, query, value)
        assert output.shape == (2, 5, 16)
        np.testing.assert_allclose(_numpy(output), expected, atol=1e-5)
        np.testing.assert_allclose(_numpy(scores), expected_scores, atol=1e-5)

    @pytest.mark.parametrize(
        "kwargs",
        [
            {"use_gate": True},
            {"use_bias": False},
            {"use_content_bias": False},
            {"output_shape": (9,), "use_gate": True},
        ],
    )
    def test_variants(self, kwargs):
        layer = _shared_layer(**kwargs)
        query, value = _normal(2, 5, 16), _normal(2, 7, 12)
        mask = RNG.random((2, 5, 7)) > 0.3
        _assert_matches_reference(
            layer,
            lambda: {"query": query, "value": value},
            mask,
            attention_mask=mask,
        )

    @pytest.mark.parametrize(
        "mask_shape", [(5, 7), (2, 5, 7), (2, 3, 5, 7), (1, 3, 5, 7)]
    )
    @pytest.mark.parametrize("dropout", [0.0, 0.1])
    def test_masks_and_fully_masked_rows(self, mask_shape, dropout):
        layer = _shared_layer(dropout=dropout)
        query, value = _normal(2, 5, 16), _normal(2, 7, 12)
        mask = RNG.random(mask_shape) > 0.3
        mask[..., 2, :] = False
        _assert_matches_reference(
            layer,
            lambda: {"query": query, "value": value},
            mask,
            attention_mask=mask,
        )

    def test_causal_padding_and_per_head_masks(self):
        layer = _shared_layer(value_dim_in=16, use_gate=True)
        query = _normal(2, 6, 16)
        head_mask = RNG.random((2, 3, 6, 6)) > 0.3
        value_mask = np.array([[1] * 6, [1] * 4 + [0] * 2], dtype=bool)
        inputs = lambda: {"query": query, "value": query}  # noqa: E731
        _assert_matches_reference(
            layer, inputs, causal_mask(6, 6), use_causal_mask=True
        )
        _assert_matches_reference(
            layer,
            inputs,
            head_mask & causal_mask(6, 6) & value_mask[:, None, None, :],
            attention_mask=head_mask,
            value_mask=value_mask,
            use_causal_mask=True,
        )

    @pytest.mark.parametrize(
        "axes, value_positions",
        [((1,), (5, 4)), ((2,), (3, 5)), ((1, 2), (2, 5))],
    )
    def test_attention_axes_with_padding(self, axes, value_positions):
        layer = _shared_layer(rank=4, attention_axes=axes, use_gate=True)
        query = _normal(2, 3, 4, 16)
        value = _normal(2, *value_positions, 12)
        query_valid = RNG.random((2, 3, 4)) > 0.3
        value_mask = RNG.random((2,) + value_positions) > 0.2
        mask = position_mask(query_valid, axes, "query") & position_mask(
            value_mask, axes, "key"
        )
        _assert_matches_reference(
            layer,
            lambda: {
                "query": _keras_masked(query, query_valid),
                "value": value,
            },
            mask,
            value_mask=value_mask,
        )

    def test_attention_axes_with_causal_and_explicit_masks(self):
        layer = _shared_layer(
            value_dim_in=16, rank=4, attention_axes=(2,), sliding_window=3
        )
        x = _normal(2, 3, 5, 16)
        band = np.abs(np.arange(5)[:, None] - np.arange(5)[None]) < 3
        explicit = RNG.random((2, 3, 3, 5, 5)) > 0.3
        _assert_matches_reference(
            layer,
            lambda: {"query": x, "value": x},
            band & causal_mask(5, 5) & explicit,
            attention_mask=explicit,
            use_causal_mask=True,
        )
        mask = RNG.random((5, 5)) > 0.3
        _assert_matches_reference(
            layer,
            lambda: {"query": x, "value": x},
            band & _over_scores(mask, 5, 1),
            attention_mask=mask,
        )


class TestFusedOneKeyValueHead:
    """Shared values run as attention with one key/value head."""

    @pytest.mark.parametrize("key_size, value_size", [(5, 5), (5, 7)])
    def test_what_each_backend_accepts(self, key_size, value_size):
        # Head queries (B, T, H, D̃) against one key (B, S, 1, D̃) and one
        # value (B, S, 1, D̃_v), with a logit bias: PyTorch takes any sizes,
        # JAX equal ones, TensorFlow none (its einsum does not broadcast
        # the head axis). The layer's dispatch follows this.
        query = _normal(2, 4, 3, key_size)
        key = _normal(2, 6, 1, key_size)
        value = _normal(2, 6, 1, value_size)
        bias = _normal(2, 3, 1, 6)
        accepts = {
            "torch": True,
            "jax": key_size == value_size,
            "tensorflow": False,
        }[BACKEND]
        if not accepts:
            with pytest.raises(Exception):
                ops.dot_product_attention(query, key, value, bias=bias)
            return
        output = ops.dot_product_attention(
            query, key, value, bias=bias, scale=0.5
        )
        logits = np.einsum("bthd,bsd->bhts", query, key[:, :, 0]) * 0.5
        logits = logits + bias
        probabilities = np.exp(logits - logits.max(-1, keepdims=True))
        probabilities /= probabilities.sum(-1, keepdims=True)
        expected = np.einsum("bhts,bsv->bthv", probabilities, value[:, :, 0])
        np.testing.assert_allclose(_numpy(output), expected, atol=1e-5)

    @pytest.mark.parametrize("shared_value_dim", [5, 7])
    @pytest.mark.parametrize(
        "case",
        ["none", "causal", "mask", "per_head", "per_head_and_causal"],
    )
    @pytest.mark.parametrize("content_bias", [True, False])
    def test_fused_and_einsum_paths_agree(
        self, shared_value_dim, case, content_bias, monkeypatch
    ):
        # Without scores the fused path runs (PyTorch forced to it, as on an
        # accelerator); with scores the einsum path: both against the
        # NumPy reference, fully masked rows included.
        monkeypatch.setattr(FUSED_PREFERENCE, lambda tensor: True)
        layer = _shared_layer(
            shared_value_dim,
            shared_key_dim=5,
            value_dim_in=16,
            use_content_bias=content_bias,
        )
        expected_fused = {
            "torch": True,
            "jax": shared_value_dim == 5,
            "tensorflow": False,
        }[BACKEND]
        assert layer._use_fused_kernel(False) == expected_fused
        query = _normal(2, 5, 16)
        head_mask = RNG.random((2, 3, 5, 5)) > 0.2
        head_mask[0, 1, 2] = False  # one head of one query sees nothing
        kwargs, mask = {
            "none": ({}, None),
            "causal": ({"use_causal_mask": True}, causal_mask(5, 5)),
            "mask": ({"attention_mask": head_mask[:, 0]}, head_mask[:, 0]),
            "per_head": ({"attention_mask": head_mask}, head_mask),
            "per_head_and_causal": (
                {"attention_mask": head_mask, "use_causal_mask": True},
                head_mask & causal_mask(5, 5),
            ),
        }[case]
        _assert_matches_reference(
            layer, lambda: {"query": query, "value": query}, mask, **kwargs
        )

    def test_fused_path_over_attention_axes(self, monkeypatch):
        monkeypatch.setattr(FUSED_PREFERENCE, lambda tensor: True)
        layer = _shared_layer(
            5, shared_key_dim=5, value_dim_in=16, rank=4, attention_axes=(2,)
        )
        x = _normal(2, 3, 4, 16)
        mask = RNG.random((2, 3, 4, 4)) > 0.2
        mask[0, 1, 2] = False
        _assert_matches_reference(
            layer,
            lambda: {"query": x, "value": x},
            mask[:, :, None],
            attention_mask=mask,
        )

    def test_flash_attention_where_no_kernel_takes_it(self):
        if BACKEND == "torch":
            pytest.skip("PyTorch takes one key/value head of any size")
        layer = CollaborativeMultiHeadAttention(
            num_heads=2,
            key_dim=2,
            shared_key_dim=4,
            shared_value_dim=6,
            flash_attention=True,
        )
        x = _normal(1, 3, 8)
        with pytest.raises(ValueError, match="values of size 6"):
            layer(x, x)


def test_override_point_receives_the_shared_values():
    layer = _shared_layer(7, value_dim_in=16, rank=4, attention_axes=(2,))
    received = []
    twin = _recording_twin(layer, received)
    x = _normal(2, 3, 4, 16)
    expected = layer(x, x, use_causal_mask=True)
    actual = twin(x, x, use_causal_mask=True)
    (call,) = received
    assert call["value"] == (6, 4, 7)
    np.testing.assert_array_equal(
        np.broadcast_to(call["mask"], (6, 3, 4, 4)),
        np.broadcast_to(causal_mask(4, 4), (6, 3, 4, 4)),
    )
    np.testing.assert_allclose(_numpy(actual), _numpy(expected), atol=1e-5)


class TestFromMultiHeadAttention:
    def _mha(self, **kwargs):
        mha = _random_mha(**kwargs)
        mha(_normal(1, 2, 16), _normal(1, 2, 12))
        return mha

    def test_reduced_value_side(self):
        mha = self._mha(use_gate=True)
        side = CollaborativeValueOutput(
            value_kernel=_normal(12, 5),
            value_mixing=_normal(3, 5),
            output_kernel=_normal(5, 16),
            value_bias=_normal(5),
            output_bias=_normal(16),
            gate_kernel=_normal(16, 3, 5),
            gate_bias=_normal(3, 5),
        )
        assert side.shared_value_dim == 5
        layer = CollaborativeMultiHeadAttention.from_multi_head_attention(
            mha, value_output=side, name="shared"
        )
        assert layer.name == "shared"
        assert layer.shared_value_dim == 5
        assert layer.shared_key_dim == 12  # the query/key side copied
        assert layer.get_config()["value_mixing_initializer"] is not None
        for variable, value in zip(
            layer.value_output_variables,
            (
                side.value_kernel,
                side.value_bias,
                side.value_mixing,
                side.output_kernel,
                side.output_bias,
                side.gate_kernel,
                side.gate_bias,
            ),
        ):
            np.testing.assert_array_equal(_numpy(variable), value)
        query, value = _normal(2, 4, 16), _normal(2, 6, 12)
        expected, _ = layer_reference(layer, query, value)
        np.testing.assert_allclose(
            _numpy(layer(query, value)), expected, atol=1e-5
        )
        # The source is untouched and shares nothing with the copy.
        before = [_numpy(w).copy() for w in mha.weights]
        for variable in layer.weights:
            variable.assign(np.zeros(variable.shape))
        for old, new in zip(before, mha.weights):
            np.testing.assert_array_equal(old, _numpy(new))

    def test_missing_biases_are_zero(self):
        mha = self._mha()
        side = CollaborativeValueOutput(
            value_kernel=_normal(12, 4),
            value_mixing=_normal(3, 4),
            output_kernel=_normal(4, 16),
        )
        layer = CollaborativeMultiHeadAttention.from_multi_head_attention(
            mha, value_output=side
        )
        assert not _numpy(layer.value_dense.bias).any()
        assert not _numpy(layer.output_dense.bias).any()

    @pytest.mark.parametrize(
        "mha_kwargs, change, message",
        [
            ({}, {"value_kernel": (11, 4)}, "value/kernel"),
            ({}, {"value_mixing": (2, 4)}, "value_mixing"),
            ({}, {"output_kernel": (4, 15)}, "attention_output/kernel"),
            ({}, {"gate_kernel": (16, 3, 4)}, "has a gate"),
            ({"use_gate": True}, {}, "gate_kernel"),
            ({"use_bias": False}, {"value_bias": (4,)}, "no such weight"),
        ],
    )
    def test_refused_value_sides(self, mha_kwargs, change, message):
        mha = self._mha(**mha_kwargs)
        fields = {
            "value_kernel": (12, 4),
            "value_mixing": (3, 4),
            "output_kernel": (4, 16),
            **change,
        }
        side = CollaborativeValueOutput(
            **{name: _normal(*shape) for name, shape in fields.items()}
        )
        with pytest.raises(ValueError, match=message):
            CollaborativeMultiHeadAttention.from_multi_head_attention(
                mha, value_output=side
            )


class TestKerasIntegration:
    def test_run_layer_test(self):
        testing.TestCase().run_layer_test(
            CollaborativeMultiHeadAttention,
            init_kwargs={
                "num_heads": 2,
                "key_dim": 2,
                "shared_key_dim": 3,
                "shared_value_dim": 3,
            },
            input_shape={"query_shape": (2, 4, 8), "value_shape": (2, 5, 8)},
            expected_output_shape=(2, 4, 8),
            expected_num_trainable_weights=10,
            expected_num_non_trainable_weights=0,
            expected_num_seed_generators=0,
            expected_num_losses=0,
            supports_masking=True,
            run_training_check=False,
        )

    def test_fit_lowers_the_loss_and_trains_every_weight(self):
        model = _toy_classifier(shared_value_dim=6, use_gate=True)
        layer = model.layers[2]
        before = [_numpy(w).copy() for w in layer.trainable_weights]
        tokens, labels = _toy_data()
        history = model.fit(tokens, labels, epochs=8, batch_size=16, verbose=0)
        losses = history.history["loss"]
        assert losses[-1] < 0.7 * losses[0]
        assert len(before) == 12
        for old, variable in zip(before, layer.trainable_weights):
            assert not np.allclose(old, _numpy(variable)), variable.path

    def test_fit_with_jit_compile(self):
        if BACKEND == "torch" and os.environ.get("KERAS_COLLAB_FAST_TESTS"):
            pytest.skip("torch.compile is slow on CPU")
        model = _toy_classifier(shared_value_dim=6, jit_compile=True)
        tokens, labels = _toy_data()
        history = model.fit(tokens, labels, epochs=2, batch_size=32, verbose=0)
        assert np.isfinite(history.history["loss"][-1])

    def test_config_round_trip(self):
        layer = _shared_layer(7, dropout=0.2, value_dim=5, output_shape=(9,))
        assert layer.get_config()["shared_value_dim"] == 7
        _assert_config_round_trip(layer)

    def test_keras_file_round_trip(self, tmp_path):
        model = _toy_classifier(shared_value_dim=6, use_gate=True)
        tokens, _ = _toy_data()
        expected = _numpy(model(tokens))
        path = tmp_path / "model.keras"
        model.save(path)
        restored = keras.saving.load_model(path)
        layer = restored.layers[2]
        assert layer.shared_value_dim == 6
        assert layer.value_mixing.shape == (2, 6)
        np.testing.assert_allclose(
            _numpy(restored(tokens)), expected, atol=1e-6
        )

    @pytest.mark.parametrize(
        "kwargs, expected",
        [
            ({}, (None, 5, 16)),
            ({"output_shape": (7,)}, (None, 5, 7)),
            ({"output_shape": (2, 3)}, (None, 5, 2, 3)),
        ],
    )
    def test_output_shape(self, kwargs, expected):
        layer = CollaborativeMultiHeadAttention(
            num_heads=3, key_dim=4, shared_value_dim=5, **kwargs
        )
        assert layer.compute_output_shape((None, 5, 16), (None, 7, 12)) == (
            expected
        )
        query, value = keras.Input((5, 16)), keras.Input((7, 12))
        output, scores = layer(query, value, return_attention_scores=True)
        assert tuple(output.shape) == expected
        assert tuple(scores.shape) == (None, 3, 5, 7)
        assert tuple(layer(_normal(2, 5, 16), _normal(2, 7, 12)).shape) == (
            (2,) + expected[1:]
        )

    @pytest.mark.parametrize("policy", ["mixed_bfloat16", "mixed_float16"])
    @pytest.mark.parametrize("shared_value_dim", [6, 9])
    def test_mixed_precision(self, policy, shared_value_dim, monkeypatch):
        # D̃_v = D̃ = 6 takes the fused path on JAX (and, forced, PyTorch).
        monkeypatch.setattr(FUSED_PREFERENCE, lambda tensor: True)
        layer32 = _shared_layer(shared_value_dim, use_gate=True)
        _assert_mixed_precision_matches(layer32, policy)

    def test_int8_quantization(self):
        model = _toy_classifier(shared_value_dim=6, use_gate=True)
        tokens, _ = _toy_data()
        expected = _numpy(model(tokens))
        model.quantize("int8")
        layer = model.layers[2]
        for dense in (
            layer.query_dense,
            layer.value_dense,
            layer.output_dense,
            layer._gate_dense,
        ):
            assert dense.kernel.dtype == "int8", dense.name
        assert tuple(layer.output_dense.kernel.shape) == (6, 16)
        assert keras.backend.standardize_dtype(layer.value_mixing.dtype) == (
            "float32"
        )
        np.testing.assert_allclose(_numpy(model(tokens)), expected, atol=0.05)

    def test_lora_on_value_and_output_projections(self):
        model = _toy_classifier(shared_value_dim=6)
        layer = model.layers[2]
        layer.value_dense.enable_lora(2)
        layer.output_dense.enable_lora(2)
        lora_weights = [w for w in model.trainable_weights if "lora" in w.path]
        assert len(lora_weights) == 4
        tokens, labels = _toy_data()
        before = [_numpy(w).copy() for w in lora_weights]
        model.fit(tokens, labels, epochs=1, verbose=0)
        assert all(
            not np.allclose(old, _numpy(new))
            for old, new in zip(before, lora_weights)
        )
