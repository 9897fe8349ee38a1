"""Conversion of whole models (`keras_collab.conversion.model`), on every
backend."""

import keras
import numpy as np
import pytest
from keras import ops

import keras_collab
from keras_collab import CollaborativeMultiHeadAttention
from keras_collab.conversion import convert_model
from keras_collab.conversion import find_sites
from keras_collab.conversion.attention import is_collaborative
from keras_collab.conversion.sites import find_attention_sites
from tests.fixtures.backbones import SMALL
from tests.fixtures.backbones import flat_outputs
from tests.fixtures.backbones import randomize_biases
from tests.fixtures.backbones import small_backbones

keras_hub = pytest.importorskip("keras_hub")
RNG = np.random.default_rng(3)


def _numpy(x):
    return ops.convert_to_numpy(x)


@pytest.mark.parametrize("shared_values", [False, True])
@pytest.mark.parametrize("architecture", list(small_backbones()))
def test_full_rank_is_exact_for_every_architecture(architecture, shared_values):
    backbone, inputs = small_backbones()[architecture]
    randomize_biases(backbone)
    expected = flat_outputs(backbone, inputs)
    sites = find_sites(backbone)
    before = [_numpy(w).copy() for w in backbone.weights]
    # Full-size shared values (D̃_v = H·d_v) are exact too.
    result = convert_model(
        backbone, shared_value_dim=1.0 if shared_values else None
    )
    if shared_values:
        assert all(c.shared_value_dim for c in result.layers.values())
    assert (
        type(result.model).__name__ == f"Collaborative{type(backbone).__name__}"
    )
    assert len(result.layers) == len(sites)
    if architecture == "albert":
        assert len(sites) == 1  # one shared layer, converted once
    if architecture == "bart":
        assert len(sites) == 6  # encoder self, decoder self and cross
    converted_sites = find_sites(result.model)
    assert converted_sites == []  # nothing left unconverted
    actual = flat_outputs(result.model, inputs)
    for key, value in expected.items():
        np.testing.assert_allclose(actual[key], value, atol=1e-5, rtol=1e-5)
    for old, new in zip(before, backbone.weights):
        np.testing.assert_array_equal(old, _numpy(new))  # source untouched


def test_reduced_rank_backbone_preset_round_trip(tmp_path):
    backbone, inputs = small_backbones()["bert"]
    result = convert_model(backbone, shared_key_dim=4, calibration_data=inputs)
    for conversion in result.layers.values():
        assert conversion.shared_key_dim == 4
        assert 0 < conversion.relative_error < 1
    expected = flat_outputs(result.model, inputs)
    result.model.save_to_preset(str(tmp_path))
    restored = keras_hub.models.Backbone.from_preset(str(tmp_path))
    assert type(restored) is type(result.model)
    actual = flat_outputs(restored, inputs)
    for key in expected:
        np.testing.assert_allclose(actual[key], expected[key], atol=1e-6)
    layer = find_attention_sites(restored, is_collaborative)[0].layer
    assert layer.shared_key_dim == 4


def test_activation_aware_beats_plain_on_its_data():
    backbone, inputs = small_backbones()["bert"]
    # Anisotropic inputs: scale a few embedding features up.
    embeddings = backbone.get_layer("token_embedding").embeddings
    scale = np.ones(8, dtype="float32")
    scale[:2] = 8.0
    embeddings.assign(_numpy(embeddings) * scale)
    reference = flat_outputs(backbone, inputs)["sequence_output"]

    def error(**kwargs):
        model = convert_model(backbone, shared_key_dim=3, **kwargs).model
        output = flat_outputs(model, inputs)["sequence_output"]
        return np.abs(output - reference).mean()

    assert error(calibration_data=inputs) < error()


def test_functional_model_with_graph_level_attention(tmp_path):
    tokens = keras.Input((6, 8))
    mha = keras.layers.MultiHeadAttention(
        num_heads=2, key_dim=4, bias_initializer="random_normal"
    )
    outputs = keras.layers.Dense(3)(mha(tokens, tokens))
    model = keras.Model(tokens, outputs)
    x = RNG.normal(size=(2, 6, 8)).astype("float32")
    expected = _numpy(model(x))
    result = convert_model(model)
    np.testing.assert_allclose(_numpy(result.model(x)), expected, atol=1e-5)
    assert isinstance(result.model.layers[1], CollaborativeMultiHeadAttention)
    path = tmp_path / "model.keras"
    result.model.save(path)
    restored = keras.saving.load_model(path)
    np.testing.assert_allclose(_numpy(restored(x)), expected, atol=1e-5)


def test_model_without_attention_is_refused():
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    with pytest.raises(ValueError, match="no keras.layers.MultiHeadAttention"):
        convert_model(model)


def test_causal_lm_generate_unchanged_at_full_rank(tmp_path):
    tokens = ["<|endoftext|>", "a", "b", "ab", "\u0120", "\u0120a", "\u0120b"]
    vocabulary = {token: index for index, token in enumerate(tokens)}
    tokenizer = keras_hub.models.GPT2Tokenizer(
        vocabulary=vocabulary, merges=["a b", "\u0120 a", "\u0120 b"]
    )
    preprocessor = keras_hub.models.GPT2CausalLMPreprocessor(
        tokenizer, sequence_length=8
    )
    backbone = keras_hub.models.GPT2Backbone(
        vocabulary_size=len(tokens), max_sequence_length=16, **SMALL
    )
    randomize_biases(backbone)
    causal_lm = keras_hub.models.GPT2CausalLM(backbone, preprocessor)
    expected = causal_lm.generate("ab a", max_length=8)
    result = convert_model(causal_lm)
    assert isinstance(result.model, keras_hub.models.GPT2CausalLM)
    assert result.model.generate("ab a", max_length=8) == expected
    result.model.save_to_preset(str(tmp_path))
    restored = keras_hub.models.CausalLM.from_preset(str(tmp_path))
    assert restored.generate("ab a", max_length=8) == expected
    # Reduced rank still decodes through the cache.
    reduced = convert_model(causal_lm, shared_key_dim=4).model
    assert isinstance(reduced.generate("ab a", max_length=8), str)


def test_keras_collab_exports():
    assert keras_collab.convert_model is convert_model


@pytest.mark.parametrize("objective", ["attention", "output"])
def test_refinement_fits_the_original_attention(objective):
    backbone, inputs = small_backbones()["bert"]
    randomize_biases(backbone)
    # KerasHub's small initial weights give near-uniform attention and tiny
    # outputs; use unit-scale kernels so that there is something to fit.
    for site in find_sites(backbone):
        layer = site.layer
        for dense, std in (
            (layer.query_dense, 1.0),
            (layer.key_dense, 1.0),
            (layer.value_dense, 0.35),
            (layer.output_dense, 0.35),
        ):
            dense.kernel.assign(RNG.normal(size=dense.kernel.shape) * std)
    reference = flat_outputs(backbone, inputs)["sequence_output"]
    plain = convert_model(backbone, shared_key_dim=2, calibration_data=inputs)
    refined = convert_model(
        backbone,
        shared_key_dim=2,
        calibration_data=inputs,
        refine_steps=60,
        refine_learning_rate=1e-2,
        refine_objective=objective,
    )
    assert set(refined.refinement) == set(refined.layers)
    for losses in refined.refinement.values():
        assert losses["loss_after"] < losses["loss_before"]

    def error(result):
        output = flat_outputs(result.model, inputs)["sequence_output"]
        return np.abs(output - reference).mean()

    assert error(refined) < error(plain)


def test_refinement_needs_calibration():
    backbone, _ = small_backbones()["bert"]
    with pytest.raises(ValueError, match="calibration_data"):
        convert_model(backbone, shared_key_dim=2, refine_steps=5)


def test_training_the_converted_model_leaves_the_source_intact():
    # On JAX, fit() donates weight buffers: the converted model must not
    # share any with the source.
    backbone, inputs = small_backbones()["bert"]
    expected = flat_outputs(backbone, inputs)["sequence_output"]
    converted = convert_model(backbone, shared_key_dim=4).model
    model = keras.Model(converted.input, converted.output["sequence_output"])
    model.compile(optimizer="sgd", loss="mse")
    model.fit(inputs, np.zeros_like(expected), epochs=1, verbose=0)
    actual = flat_outputs(backbone, inputs)["sequence_output"]
    np.testing.assert_array_equal(actual, expected)
