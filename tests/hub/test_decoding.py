"""Decoding converted KerasHub models with the compact collaborative cache
(`keras_collab.hub.decoding`), on every backend."""

import keras
import numpy as np
import pytest
from keras import ops

from keras_collab.conversion import convert_model
from keras_collab.conversion import find_sites

keras_hub = pytest.importorskip("keras_hub")

VOCABULARY = 40
SMALL = dict(num_layers=2, num_heads=2, hidden_dim=8, intermediate_dim=16)
RNG = np.random.default_rng(5)


def _peaked(model):
    """Unit-scale query/key weights: peaked attention, so that a wrong key
    changes the tokens (KerasHub's small initial weights give near-uniform
    attention, which any D̃ reproduces)."""
    rng = np.random.default_rng(0)
    for site in find_sites(model):
        for dense in (site.layer.query_dense, site.layer.key_dense):
            for variable in dense.weights:
                variable.assign(rng.normal(size=variable.shape))
    return model


def _task(architecture):
    keras.utils.set_random_seed(0)
    text = dict(vocabulary_size=VOCABULARY, max_sequence_length=32, **SMALL)
    if architecture == "gpt2":
        backbone = keras_hub.models.GPT2Backbone(**text)
        task = keras_hub.models.GPT2CausalLM(backbone, preprocessor=None)
    elif architecture == "opt":
        backbone = keras_hub.models.OPTBackbone(**text)
        task = keras_hub.models.OPTCausalLM(backbone, preprocessor=None)
    else:
        backbone = keras_hub.models.BartBackbone(
            vocabulary_size=VOCABULARY,
            num_layers=1,
            num_heads=2,
            hidden_dim=8,
            intermediate_dim=16,
            max_sequence_length=32,
        )
        task = keras_hub.models.BartSeq2SeqLM(backbone, preprocessor=None)
    _peaked(task)
    task.compile(sampler="greedy")
    return task


def _prompt(architecture, batch=2, length=10, prompt_length=4):
    token_ids = RNG.integers(1, VOCABULARY, size=(batch, length))
    mask = np.zeros((batch, length), bool)
    mask[:, :prompt_length] = True
    token_ids = np.where(mask, token_ids, 0).astype("int32")
    if architecture == "bart":
        encoder_ids = RNG.integers(1, VOCABULARY, size=(batch, 7))
        return {
            "encoder_token_ids": encoder_ids.astype("int32"),
            "encoder_padding_mask": np.ones((batch, 7), bool),
            "decoder_token_ids": token_ids,
            "decoder_padding_mask": mask,
        }
    return {"token_ids": token_ids, "padding_mask": mask}


def _generated(task, inputs, stop_token_ids=None):
    output = task.generate(inputs, stop_token_ids=stop_token_ids)
    key = "decoder_token_ids" if "decoder_token_ids" in output else "token_ids"
    return ops.convert_to_numpy(output[key])


def _decoder_layers(task):
    backbone = task.backbone
    return getattr(backbone, "decoder_transformer_layers", None) or getattr(
        backbone, "transformer_layers"
    )


ARCHITECTURES = ["gpt2", "opt", "bart"]


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_full_rank_greedy_decoding_is_identical(architecture):
    task = _task(architecture)
    inputs = _prompt(architecture)
    expected = _generated(task, inputs)
    converted = convert_model(task).model
    # The sampler is compile state, carried over: greedy here.
    assert type(converted.sampler) is type(task.sampler)
    assert _generated(converted, inputs).tolist() == expected.tolist()
    # Stopping early goes through the same cache.
    stop = (int(expected[0, 5]),)
    assert (
        _generated(converted, inputs, stop).tolist()
        == _generated(task, inputs, stop).tolist()
    )


def _cached_logits(task, inputs):
    """Logits of every position, decoding one token at a time from an empty
    compact cache."""
    layers = _decoder_layers(task)
    if "decoder_token_ids" in inputs:
        token_ids = inputs["decoder_token_ids"]
        encoder = task.call_encoder(
            inputs["encoder_token_ids"], inputs["encoder_padding_mask"]
        )
        self_cache, cross_cache = task._initialize_cache(
            inputs["encoder_token_ids"], token_ids
        )
    else:
        token_ids = inputs["token_ids"]
        self_cache = tuple(
            layer._self_attention_layer.empty_cache(*token_ids.shape)
            for layer in layers
        )
    logits = []
    for index in range(token_ids.shape[1]):
        token = token_ids[:, index : index + 1]
        if "decoder_token_ids" in inputs:
            step, _, self_cache, cross_cache = task.call_decoder_with_cache(
                encoder,
                inputs["encoder_padding_mask"],
                token,
                self_attention_cache=self_cache,
                self_attention_cache_update_index=index,
                cross_attention_cache=cross_cache,
                cross_attention_cache_update_index=0 if index == 0 else None,
            )
        else:
            step, _, self_cache = task.call_with_cache(token, self_cache, index)
        logits.append(ops.convert_to_numpy(step))
    return np.concatenate(logits, axis=1), self_cache


def _full_inputs(inputs):
    """Every position real, so that the uncached pass sees the same tokens."""
    return {
        key: np.ones_like(value) if key.endswith("padding_mask") else value
        for key, value in inputs.items()
    }


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_reduced_rank_cached_logits_match_the_uncached_pass(architecture):
    converted = convert_model(_task(architecture), shared_key_dim=3).model
    inputs = _full_inputs(_prompt(architecture, length=6))
    expected = ops.convert_to_numpy(converted(inputs))
    actual, _ = _cached_logits(converted, inputs)
    np.testing.assert_allclose(actual, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_cache_holds_exactly_shared_key_content_logits_and_values(
    architecture,
):
    converted = convert_model(_task(architecture), shared_key_dim=3).model
    inputs = _full_inputs(_prompt(architecture, batch=2, length=6))
    _, cache = _cached_logits(converted, inputs)
    heads, value_dim = 2, 4  # hidden_dim 8 over 2 heads
    per_layer = 3 + heads + heads * value_dim
    assert [tuple(c.shape) for c in cache] == [(2, 1, 6, per_layer)] * len(
        _decoder_layers(converted)
    )
    # KerasHub's cache keeps 2 * H * d_k numbers per token and layer.
    assert per_layer < 2 * heads * value_dim


def test_layers_with_different_shared_key_dims_get_their_own_width():
    task = _task("gpt2")
    paths = [site.path for site in find_sites(task)]
    dims = dict(zip(paths, [2, 6]))
    converted = convert_model(task, shared_key_dim=dims).model
    inputs = _full_inputs(_prompt("gpt2", length=6))
    actual, cache = _cached_logits(converted, inputs)
    assert [int(c.shape[-1]) for c in cache] == [2 + 2 + 8, 6 + 2 + 8]
    expected = ops.convert_to_numpy(converted(inputs))
    np.testing.assert_allclose(actual, expected, atol=1e-5, rtol=1e-5)
    assert _generated(converted, _prompt("gpt2")).shape == (2, 10)


@pytest.mark.parametrize("architecture", ["gpt2", "opt"])
def test_reloaded_preset_generates_with_the_compact_cache(
    architecture, tmp_path
):
    converted = convert_model(_task(architecture), shared_key_dim=3).model
    inputs = _prompt(architecture)
    expected = _generated(converted, inputs)
    converted.save_to_preset(str(tmp_path))
    restored = keras_hub.models.CausalLM.from_preset(str(tmp_path))
    restored.compile(sampler="greedy")
    assert type(restored) is type(converted)
    _, cache = restored._build_cache(inputs["token_ids"])
    assert isinstance(cache, tuple)
    assert _generated(restored, inputs).tolist() == expected.tolist()


@pytest.mark.parametrize("architecture", ["gpt2", "bart"])
def test_shared_values_shrink_the_cache_and_keep_cached_logits_exact(
    architecture,
):
    converted = convert_model(
        _task(architecture), shared_key_dim=3, shared_value_dim=4
    ).model
    inputs = _full_inputs(_prompt(architecture, length=6))
    expected = ops.convert_to_numpy(converted(inputs))
    actual, cache = _cached_logits(converted, inputs)
    np.testing.assert_allclose(actual, expected, atol=1e-5, rtol=1e-5)
    # D̃ shared key + H content logits + D̃_v shared values.
    assert {int(c.shape[-1]) for c in cache} == {3 + 2 + 4}
