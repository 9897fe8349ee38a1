"""Conversion of single attention layers (`conversion.attention`), on
every backend."""

import keras
import numpy as np
import pytest
from keras import ops

from keras_collab.conversion import convert_attention

keras_hub = pytest.importorskip("keras_hub")
RNG = np.random.default_rng(3)


def _numpy(x):
    return ops.convert_to_numpy(x)


def _mha(num_heads=3, key_dim=4, width=12):
    mha = keras.layers.MultiHeadAttention(
        num_heads=num_heads, key_dim=key_dim, bias_initializer="random_normal"
    )
    x = RNG.normal(size=(2, 5, width)).astype("float32")
    mha(x, x)
    return mha


def _outputs(layer, x):
    return _numpy(layer(x, x, return_attention_scores=True)[0])


class TestConvertAttention:
    def test_exact_low_rank_layer_with_biases(self):
        # Head 2 repeats head 1, so the per-head products have CP rank 4 < 6:
        # a rank-4 conversion must be exact, query bias (carried by the
        # content bias) and key bias (dropped) included.
        mha = _mha(num_heads=3, key_dim=2, width=8)
        for dense in (mha.query_dense, mha.key_dense):
            kernel = _numpy(dense.kernel)
            kernel[:, 2] = kernel[:, 1]
            dense.kernel.assign(kernel)
        query_bias = _numpy(mha.query_dense.bias)
        query_bias[2] = query_bias[1]
        mha.query_dense.bias.assign(query_bias)
        result = convert_attention(
            mha, shared_key_dim=4, tol=1e-12, max_iter=2000
        )
        assert result.relative_error < 1e-5
        x = RNG.normal(size=(2, 6, 8)).astype("float32")
        np.testing.assert_allclose(
            _outputs(result.layer, x), _outputs(mha, x), atol=1e-4
        )
        assert _numpy(result.layer.content_bias).std() > 0

    def test_error_falls_as_shared_key_dim_grows(self):
        mha = _mha(num_heads=4, key_dim=4, width=16)
        errors = [
            convert_attention(mha, shared_key_dim=d).relative_error
            for d in (2, 4, 8, 12, 16)
        ]
        assert errors[-1] < 1e-6
        assert all(a >= b - 1e-6 for a, b in zip(errors, errors[1:])), errors

    def test_deterministic(self):
        mha = _mha()
        first = convert_attention(mha, shared_key_dim=5).layer
        second = convert_attention(mha, shared_key_dim=5).layer
        for a, b in zip(first.weights, second.weights):
            np.testing.assert_array_equal(_numpy(a), _numpy(b))

    def test_fraction_and_target_error(self):
        mha = _mha(num_heads=4, key_dim=4, width=16)
        assert convert_attention(mha, shared_key_dim=0.5).shared_key_dim == 8
        # 1.0 is the whole, not one dimension; a whole float above 1 a size.
        assert convert_attention(mha, shared_key_dim=1.0).shared_key_dim == 16
        assert convert_attention(mha, shared_key_dim=12.0).shared_key_dim == 12
        result = convert_attention(mha, target_error=0.3)
        assert result.relative_error <= 0.3
        assert result.shared_key_dim % 4 == 0

    @pytest.mark.parametrize("bad", [0, 13, -1, 1.5])
    def test_bad_shared_key_dim(self, bad):
        with pytest.raises(ValueError, match="shared_key_dim"):
            convert_attention(_mha(), shared_key_dim=bad)

    def test_source_layer_is_untouched(self):
        mha = _mha()
        before = [_numpy(w).copy() for w in mha.weights]
        layer = convert_attention(mha, shared_key_dim=4).layer
        for variable in layer.weights:
            variable.assign(np.zeros(variable.shape))
        for old, new in zip(before, mha.weights):
            np.testing.assert_array_equal(old, _numpy(new))

    def test_unbuilt_and_wrong_layers(self):
        with pytest.raises(ValueError, match="not built"):
            convert_attention(keras.layers.MultiHeadAttention(2, 2))
        with pytest.raises(ValueError, match="MultiHeadAttention"):
            convert_attention(keras.layers.Dense(3))


def test_convert_attention_with_raw_calibration_inputs():
    mha = _mha(num_heads=4, key_dim=4, width=16)
    scale = np.ones(16, dtype="float32")
    scale[:3] = 10.0
    x = (RNG.normal(size=(8, 6, 16)) * scale).astype("float32")
    reference = _outputs(mha, x)
    plain = convert_attention(mha, shared_key_dim=6).layer
    aware = convert_attention(mha, shared_key_dim=6, calibration=x).layer

    def error(layer):
        return np.abs(_outputs(layer, x) - reference).mean()

    assert error(aware) < error(plain)
    with pytest.raises(ValueError, match="calibration"):
        convert_attention(mha, shared_key_dim=6, calibration=x[0])


def _gated_mha(num_heads=3, key_dim=4, width=12, use_gate=False):
    mha = keras.layers.MultiHeadAttention(
        num_heads=num_heads,
        key_dim=key_dim,
        bias_initializer="random_normal",
        use_gate=use_gate,
    )
    x = RNG.normal(size=(2, 5, width)).astype("float32")
    mha(x, x)
    return mha


class TestSharedValues:
    @pytest.mark.parametrize("use_gate", [False, True])
    def test_full_size_is_exact(self, use_gate):
        mha = _gated_mha(use_gate=use_gate)
        result = convert_attention(mha, shared_value_dim=1.0)
        assert result.shared_value_dim == 12
        assert result.value_relative_error < 1e-12
        x = RNG.normal(size=(2, 6, 12)).astype("float32")
        np.testing.assert_allclose(
            _outputs(result.layer, x), _outputs(mha, x), atol=1e-5
        )

    def test_exact_low_rank_value_side_with_folded_value_bias(self):
        # Head 2 repeats head 1 on the value/output side, so the products
        # W_V^h W_O^h have CP rank 8 < 12: a rank-8 conversion must be exact,
        # the value bias (folded into the output bias) included.
        mha = _gated_mha()
        value = _numpy(mha.value_dense.kernel)
        value[:, 2] = value[:, 1]
        mha.value_dense.kernel.assign(value)
        output = _numpy(mha.output_dense.kernel)
        output[2] = output[1]
        mha.output_dense.kernel.assign(output)
        # A unit-scale value bias, so that folding it matters.
        mha.value_dense.bias.assign(RNG.normal(size=(3, 4)))
        result = convert_attention(
            mha, shared_value_dim=8, tol=1e-12, max_iter=2000
        )
        assert result.value_relative_error < 1e-5
        assert result.vo_params_after < result.vo_params_before
        x = RNG.normal(size=(2, 6, 12)).astype("float32")
        np.testing.assert_allclose(
            _outputs(result.layer, x), _outputs(mha, x), atol=1e-4
        )

    def test_error_falls_as_shared_value_dim_grows(self):
        mha = _gated_mha(num_heads=4, key_dim=4, width=16)
        errors = [
            convert_attention(mha, shared_value_dim=d).value_relative_error
            for d in (2, 4, 8, 12, 16)
        ]
        assert errors[-1] < 1e-6
        assert all(a >= b - 1e-6 for a, b in zip(errors, errors[1:])), errors

    def test_both_sides_shared_at_once(self):
        mha = _gated_mha(num_heads=4, key_dim=4, width=16)
        result = convert_attention(mha, shared_key_dim=8, shared_value_dim=8)
        assert result.layer.shared_key_dim == 8
        assert result.layer.shared_value_dim == 8
        chosen = convert_attention(mha, value_target_error=0.3)
        assert chosen.value_relative_error <= 0.3
        assert chosen.shared_value_dim % 4 == 0

    def test_activation_aware_beats_plain_on_its_data(self):
        mha = _gated_mha(num_heads=4, key_dim=4, width=16)
        scale = np.ones(16, dtype="float32")
        scale[:3] = 10.0
        x = (RNG.normal(size=(8, 6, 16)) * scale).astype("float32")
        reference = _outputs(mha, x)

        def error(layer):
            return np.abs(_outputs(layer, x) - reference).mean()

        plain = convert_attention(mha, shared_value_dim=6).layer
        aware = convert_attention(mha, shared_value_dim=6, calibration=x).layer
        assert error(aware) < error(plain)

    def test_gate_below_full_size_is_refused(self):
        mha = _gated_mha(use_gate=True)
        with pytest.raises(ValueError, match="gate"):
            convert_attention(mha, shared_value_dim=6)

    @pytest.mark.parametrize("bad", [0, 13, -1, 1.5, "x"])
    def test_bad_shared_value_dim(self, bad):
        with pytest.raises(ValueError, match="shared_value_dim"):
            convert_attention(_gated_mha(), shared_value_dim=bad)
