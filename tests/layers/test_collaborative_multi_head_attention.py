import os

import keras
import numpy as np
import pytest
from keras import ops
from keras.src import testing

from keras_collab import CollaborativeMultiHeadAttention
from keras_collab.layers import CollaborativeMultiHeadAttention as LayersExport
from tests.conftest import BACKEND
from tests.reference import layer_reference

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
    **kwargs,
):
    """A built layer with every weight random, content bias included."""
    layer = CollaborativeMultiHeadAttention(
        num_heads=num_heads,
        key_dim=key_dim,
        shared_key_dim=shared_key_dim,
        bias_initializer="random_normal",
        mixing_initializer="random_normal",
        **kwargs,
    )
    layer.build((None, None, query_dim), (None, None, value_dim_in))
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
        "mask_shape", [(2, 5, 7), (5, 7), (1, 5, 7), (2, 1, 7)]
    )
    def test_attention_mask_broadcasting(self, mask_shape):
        layer = _random_layer()
        query, value = _normal(2, 5, 16), _normal(2, 7, 12)
        mask = RNG.random(mask_shape) > 0.3
        for training_path in (False, True):  # fused and einsum paths
            output = layer(
                query,
                value,
                attention_mask=mask,
                return_attention_scores=training_path,
            )
            output = output[0] if training_path else output
            expected, _ = layer_reference(layer, query, value, mask=mask)
            np.testing.assert_allclose(_numpy(output), expected, atol=1e-5)

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

    def test_fully_masked_row_is_finite(self):
        layer = _random_layer()
        query, value = _normal(2, 5, 16), _normal(2, 7, 12)
        mask = np.ones((2, 5, 7), dtype=bool)
        mask[0, 2] = False
        for with_scores in (False, True):
            result = layer(
                query,
                value,
                attention_mask=mask,
                return_attention_scores=with_scores,
            )
            output = result[0] if with_scores else result
            assert np.all(np.isfinite(_numpy(output)))

    @pytest.mark.parametrize("causal", [False, True])
    def test_fused_and_einsum_paths_agree(self, causal, monkeypatch):
        # value_dim == shared_key_dim lets JAX's fused kernel run too; on
        # PyTorch the fused kernel is forced, as on an accelerator.
        monkeypatch.setattr(
            "keras_collab.layers.collaborative_multi_head_attention."
            "_prefer_fused_on_torch",
            lambda tensor: True,
        )
        layer = _random_layer(shared_key_dim=5, value_dim=5, value_dim_in=16)
        query = _normal(2, 5, 16)
        mask = None if causal else RNG.random((2, 5, 5)) > 0.2
        kwargs = {"attention_mask": mask, "use_causal_mask": causal}
        fused = layer(query, query, **kwargs)
        einsum, _ = layer(query, query, return_attention_scores=True, **kwargs)
        expected_fused = BACKEND in ("torch", "jax")
        assert layer._use_fused_kernel(False) == expected_fused
        np.testing.assert_allclose(_numpy(fused), _numpy(einsum), atol=1e-5)

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

    def _classifier(self, shared_key_dim=4, jit_compile="auto"):
        inputs = keras.Input((6,), dtype="int32")
        x = keras.layers.Embedding(20, 16, mask_zero=True)(inputs)
        x = CollaborativeMultiHeadAttention(
            num_heads=2, key_dim=8, shared_key_dim=shared_key_dim, dropout=0.1
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

    def _toy_data(self):
        tokens = RNG.integers(1, 20, size=(64, 6))
        labels = (tokens[:, 0] > 10).astype("int32")
        return tokens, labels

    def test_fit_lowers_the_loss(self):
        model = self._classifier()
        tokens, labels = self._toy_data()
        history = model.fit(tokens, labels, epochs=8, batch_size=16, verbose=0)
        losses = history.history["loss"]
        assert losses[-1] < 0.7 * losses[0]

    def test_fit_with_jit_compile(self):
        if BACKEND == "torch" and os.environ.get("KERAS_COLLAB_FAST_TESTS"):
            pytest.skip("torch.compile is slow on CPU")
        model = self._classifier(jit_compile=True)
        tokens, labels = self._toy_data()
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
        config = layer.get_config()
        assert config["shared_key_dim"] == 6
        clone = CollaborativeMultiHeadAttention.from_config(config)
        assert clone.get_config() == config
        clone.build((None, None, 16), (None, None, 12))
        clone.set_weights(layer.get_weights())
        query, value = _normal(2, 5, 16), _normal(2, 7, 12)
        np.testing.assert_allclose(
            _numpy(clone(query, value)), _numpy(layer(query, value)), atol=1e-6
        )

    def test_keras_file_round_trip(self, tmp_path):
        model = self._classifier()
        tokens, _ = self._toy_data()
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
        layer32 = _random_layer()
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

    def test_int8_quantization(self):
        model = self._classifier()
        tokens, _ = self._toy_data()
        expected = _numpy(model(tokens))
        model.quantize("int8")
        layer = model.layers[2]
        assert layer.query_dense.kernel.dtype == "int8"
        assert layer.value_dense.kernel.dtype == "int8"
        np.testing.assert_allclose(_numpy(model(tokens)), expected, atol=0.05)

    def test_lora_on_projections(self):
        model = self._classifier()
        layer = model.layers[2]
        layer.query_dense.enable_lora(2)
        layer.value_dense.enable_lora(2)
        lora_weights = [w for w in model.trainable_weights if "lora" in w.path]
        assert len(lora_weights) == 4
        tokens, labels = self._toy_data()
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
        layer = CollaborativeMultiHeadAttention(num_heads=2, key_dim=2)
        with pytest.raises(ValueError, match="`value` and `key`"):
            layer(_normal(2, 3, 4), _normal(2, 5, 4), key=_normal(2, 6, 4))

    def test_concatenate_needs_divisible_size(self):
        layer = CollaborativeMultiHeadAttention(
            num_heads=2,
            key_dim=2,
            shared_key_dim=3,
            mixing_initializer="concatenate",
        )
        with pytest.raises(ValueError, match="multiple of `num_heads`"):
            layer.build((None, None, 4), (None, None, 4))
