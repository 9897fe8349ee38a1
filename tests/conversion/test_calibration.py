"""Calibration statistics (`keras_collab.conversion.calibration`): the
compiled path against the eager float64 reference, on every backend."""

import keras
import numpy as np
import pytest

from keras_collab.conversion import calibration
from keras_collab.conversion import find_sites
from keras_collab.decomposition import second_moment

keras_hub = pytest.importorskip("keras_hub")
RNG = np.random.default_rng(11)
VOCABULARY = 50
BUCKET = 16
MOMENTS = ("query_moment", "key_moment", "value_moment")


def _text_batch(lengths, width, segments=True):
    """Token ids and a padding mask: row i has `lengths[i]` real tokens
    (token ids after them are random, as padding must not matter)."""
    token_ids = RNG.integers(1, VOCABULARY, size=(len(lengths), width))
    mask = np.arange(width)[None, :] < np.asarray(lengths)[:, None]
    batch = {"token_ids": token_ids, "padding_mask": mask}
    if segments:
        batch["segment_ids"] = np.zeros_like(token_ids)
    return batch


def _pad(batch, width):
    """`batch` padded to `width` tokens, the padding masked out."""

    def pad(x):
        padding = [(0, 0), (0, width - x.shape[1])] + [(0, 0)] * (x.ndim - 2)
        return np.pad(x, padding)

    return {key: pad(value) for key, value in batch.items()}


def _mixed_length_batches(segments=True):
    """Unpadded batches of mixed lengths (each cut to its longest text)."""
    return [
        _text_batch([5, 3, 7], 7, segments),
        _text_batch([9, 12, 2], 12, segments),
        _text_batch([4, 4], 4, segments),
        _text_batch([13, 1, 6, 10], 13, segments),
    ]


def _bucketed(batches, bucket=BUCKET):
    return [
        _pad(batch, -(-batch["token_ids"].shape[1] // bucket) * bucket)
        for batch in batches
    ]


def _eager_reference(model, sites, batches):
    layers = {site.path: site.layer for site in sites}
    with calibration.record_attention_inputs(layers) as records:
        for batch in batches:
            model(batch, training=False)
    return calibration.attention_statistics(records)


def _assert_same_statistics(actual, expected):
    assert sorted(actual) == sorted(expected)
    for path in expected:
        assert actual[path].tokens == expected[path].tokens, path
        for name in MOMENTS:
            got = getattr(actual[path], name)
            want = getattr(expected[path], name)
            assert got.dtype == np.float64
            np.testing.assert_array_equal(got, got.T)
            # float32 sums on the device against float64 on the host.
            np.testing.assert_allclose(
                got,
                want,
                rtol=0,
                atol=2e-6 * np.abs(want).max(),
                err_msg=f"{path} {name}",
            )


def _bert():
    return keras_hub.models.BertBackbone(
        vocabulary_size=VOCABULARY,
        num_layers=2,
        num_heads=2,
        hidden_dim=8,
        intermediate_dim=16,
        max_sequence_length=32,
    )


def _albert():
    # One attention layer shared by every block: several calls per batch.
    return keras_hub.models.AlbertBackbone(
        vocabulary_size=VOCABULARY,
        num_layers=3,
        num_heads=2,
        embedding_dim=8,
        hidden_dim=8,
        intermediate_dim=16,
        num_groups=1,
        num_inner_repetitions=1,
        max_sequence_length=32,
    )


@pytest.mark.parametrize("make_model", [_bert, _albert], ids=["bert", "albert"])
def test_bucketed_compiled_statistics_equal_the_unpadded_eager_ones(
    make_model,
):
    model = make_model()
    sites = find_sites(model)
    batches = _mixed_length_batches()
    expected = _eager_reference(model, sites, batches)
    # Padding changes the statistics' inputs only where the mask hides them.
    padded = _bucketed(batches)
    assert {b["token_ids"].shape[1] for b in padded} == {16}
    actual = calibration.collect_statistics(model, sites, padded)
    _assert_same_statistics(actual, expected)
    # The unpadded batches through the compiled path, too.
    _assert_same_statistics(
        calibration.collect_statistics(model, sites, batches), expected
    )


def test_statistics_follow_the_equations():
    """The eager reference itself, against the moments computed here from
    the layer inputs: plain over real tokens, keys centred per sequence."""
    model = _bert()
    sites = find_sites(model)
    batches = _bucketed(_mixed_length_batches())
    layer = sites[0].layer
    with calibration.record_attention_inputs({"a": layer}) as records:
        for batch in batches:
            model(batch, training=False)
    moments = {name: 0.0 for name in MOMENTS}
    tokens = 0
    for call, batch in zip(records["a"], batches):
        x = call.query.astype("float64")
        mask = batch["padding_mask"]
        count = mask.sum()
        tokens += count
        centred = (
            x
            - (x * mask[..., None]).sum(1, keepdims=True)
            / np.maximum(mask.sum(1), 1)[:, None, None]
        )
        for name, inputs in (
            ("query_moment", x),
            ("key_moment", centred),
            ("value_moment", x),
        ):
            rows = inputs[mask]
            moments[name] = moments[name] + rows.T @ rows
    compiled = calibration.collect_statistics(model, sites, batches)
    statistics = compiled[sites[0].path]
    assert statistics.tokens == tokens
    for name in MOMENTS:
        want = moments[name] / tokens
        np.testing.assert_allclose(
            getattr(statistics, name), want, atol=2e-6 * np.abs(want).max()
        )


def test_padding_that_is_not_masked_would_be_caught():
    """The comparison above can fail: counting the padded tokens as real
    changes the statistics far beyond its tolerance."""
    model = _bert()
    sites = find_sites(model)
    batches = _mixed_length_batches()
    expected = _eager_reference(model, sites, batches)
    unmasked = []
    for batch in _bucketed(batches):
        batch = dict(batch)
        batch["padding_mask"] = np.ones_like(batch["padding_mask"])
        unmasked.append(batch)
    actual = calibration.collect_statistics(model, sites, unmasked)
    with pytest.raises(AssertionError):
        _assert_same_statistics(actual, expected)


def test_cross_attention_statistics_equal_the_eager_ones():
    """BART: encoder and decoder self-attention, and cross-attention, whose
    query and key lengths differ (values are the encoder's outputs)."""
    model = keras_hub.models.BartBackbone(
        vocabulary_size=VOCABULARY,
        num_layers=1,
        num_heads=2,
        hidden_dim=8,
        intermediate_dim=16,
        max_sequence_length=32,
    )
    sites = find_sites(model)
    assert len(sites) == 3

    def batch(encoder_lengths, decoder_lengths, encoder_width, decoder_width):
        encoder = _text_batch(encoder_lengths, encoder_width, segments=False)
        decoder = _text_batch(decoder_lengths, decoder_width, segments=False)
        return {
            "encoder_token_ids": encoder["token_ids"],
            "encoder_padding_mask": encoder["padding_mask"],
            "decoder_token_ids": decoder["token_ids"],
            "decoder_padding_mask": decoder["padding_mask"],
        }

    batches = [batch([5, 9], [3, 4], 9, 4), batch([2, 6], [7, 5], 6, 7)]
    expected = _eager_reference(model, sites, batches)
    actual = calibration.collect_statistics(model, sites, batches)
    _assert_same_statistics(actual, expected)


def test_one_trace_per_batch_shape(monkeypatch):
    """TensorFlow and JAX trace the statistics function once per batch
    shape, not once per batch; PyTorch runs eagerly, once per batch."""
    model = _bert()
    sites = find_sites(model)
    calls = []
    original = calibration.attention_sums

    def counting(*args):
        calls.append(1)
        return original(*args)

    monkeypatch.setattr(calibration, "attention_sums", counting)
    # Four batches of two shapes: (3, 16) and (3, 32).
    batches = [
        _pad(_text_batch(lengths, max(lengths)), width)
        for lengths, width in (
            ([5, 3, 7], 16),
            ([9, 20, 2], 32),
            ([4, 4, 16], 16),
            ([13, 1, 30], 32),
        )
    ]
    calibration.collect_statistics(model, sites, batches)
    per_layer = len(calls) // len(sites)
    if keras.backend.backend() in ("tensorflow", "jax"):
        assert per_layer == 2
    else:
        assert per_layer == len(batches)


def test_raw_activations_give_the_same_statistics_as_second_moment():
    x = RNG.normal(size=(3, 5, 4))
    statistics = calibration.as_statistics(x)
    np.testing.assert_allclose(statistics.query_moment, second_moment(x))
    np.testing.assert_allclose(
        statistics.key_moment, second_moment(x, center_per_sequence=True)
    )


def test_compiled_input_recorder_matches_eager_recording():
    """The compiled recorder returns what the eager one records, and reads
    the weights anew on every call (refinement changes them in between)."""
    model = _bert()
    sites = find_sites(model)
    layers = {site.path: site.layer for site in sites}
    batches = _bucketed(_mixed_length_batches())

    def eager():
        with calibration.record_attention_inputs(layers) as records:
            for batch in batches:
                model(batch, training=False)
        return records

    def assert_same(actual, expected):
        assert sorted(actual) == sorted(expected)
        for path in expected:
            assert len(actual[path]) == len(expected[path]) == len(batches)
            for got, want in zip(actual[path], expected[path]):
                for field in ("query", "key", "value"):
                    np.testing.assert_allclose(
                        getattr(got, field),
                        getattr(want, field),
                        atol=1e-5,
                        err_msg=f"{path} {field}",
                    )
                np.testing.assert_array_equal(got.mask, want.mask)

    expected = eager()
    with calibration.compiled_input_recorder(model, layers) as record:
        first = record(batches)
        # Change the first layer's weights: what the second layer sees moves.
        dense = sites[0].layer.output_dense
        dense.kernel.assign(dense.kernel * 2.0)
        second = record(batches)
    assert_same(first, expected)
    assert_same(second, eager())
    assert not np.allclose(
        second[sites[1].path][0].query, first[sites[1].path][0].query
    )
    # The layers' calls are restored on exit.
    assert all("call" not in vars(layer) for layer in layers.values())


def test_compiled_input_recorder_refuses_a_layer_twice():
    model = _bert()
    layer = find_sites(model)[0].layer
    with pytest.raises(ValueError, match="distinct"):
        with calibration.compiled_input_recorder(
            model, {"a": layer, "b": layer}
        ):
            pass
