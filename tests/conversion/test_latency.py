"""Latency of converted models against their source
(`keras_collab.conversion.latency`). No timing value is asserted: the
machine's load decides those; what is tested is what gets called, on what,
in which order, and what is chosen from given ratios."""

import keras
import numpy as np
import pytest

from keras_collab.conversion import latency
from keras_collab.conversion.attention import is_collaborative
from keras_collab.conversion.sites import find_attention_sites


def _attention_model(num_heads=2, key_dim=8, width=16):
    """A functional self-attention model; full D̃ = num_heads * key_dim."""
    inputs = keras.Input((None, width), name="features")
    attention = keras.layers.MultiHeadAttention(num_heads, key_dim)
    outputs = keras.layers.Dense(3)(attention(inputs, inputs))
    return keras.Model(inputs, outputs)


class _Recorder:
    """A stand-in model whose `predict_on_batch` logs its calls."""

    def __init__(self, name, log):
        self.name, self.log = name, log

    def predict_on_batch(self, inputs):
        self.log.append((self.name, np.shape(inputs)))
        return inputs


def test_example_inputs_of_named_integer_inputs():
    names = ("token_ids", "segment_ids", "padding_mask")
    inputs = {
        name: keras.Input((None,), dtype="int32", name=name) for name in names
    }
    embedded = keras.layers.Embedding(10, 4)(inputs["token_ids"])
    model = keras.Model(inputs, embedded)
    example = latency.example_inputs(model, 3, 7)
    assert sorted(example) == sorted(names)
    for name in names:
        assert example[name].shape == (3, 7)
        assert example[name].dtype == np.int32
    assert np.all(example["token_ids"] == 0)
    assert np.all(example["segment_ids"] == 0)
    assert np.all(example["padding_mask"] == 1)


def test_example_inputs_keep_static_dimensions():
    example = latency.example_inputs(_attention_model(), 2, 5)
    assert example.shape == (2, 5, 16) and example.dtype == np.float32
    assert np.std(example) > 0.5  # standard normal, not a constant


def test_comparison_alternates_and_reports():
    log = []
    source, candidate = _Recorder("source", log), _Recorder("candidate", log)
    inputs = np.zeros((4, 6))
    comparison = latency.LatencyComparison(source, inputs, rounds=4)
    assert log == [("source", (4, 6))]  # compiled once, when made
    result = comparison(candidate)
    calls = [name for name, _ in log[1:]]
    # First call of the candidate, one warm-up call each, then 4 rounds
    # whose order flips from one round to the next.
    assert calls[:3] == ["candidate", "source", "candidate"]
    assert calls[3:] == ["candidate", "source", "source", "candidate"] * 2
    assert result["rounds"] == 4
    assert (result["batch_size"], result["sequence_length"]) == (4, 6)
    assert result["ratio"] == pytest.approx(
        result["converted_ms"] / result["source_ms"]
    )
    assert result["faster"] == (result["ratio"] < 1)


def test_comparison_needs_a_round():
    with pytest.raises(ValueError, match="rounds"):
        latency.LatencyComparison(_Recorder("source", []), None, rounds=0)


def test_compiled_forward_is_predict_on_batch():
    model = _attention_model()
    inputs = latency.example_inputs(model, 2, 5)
    np.testing.assert_allclose(
        latency.compiled_forward(model)(inputs),
        keras.ops.convert_to_numpy(model(inputs)),
        rtol=1e-5,
        atol=1e-5,
    )


def test_structural_conversion_has_the_converted_architecture():
    model = _attention_model()
    converted = latency.structural_conversion(model, 0.5)
    (site,) = find_attention_sites(converted, is_collaborative)
    assert site.layer.shared_key_dim == 8
    assert converted.output.shape[1:] == model.output.shape[1:]


class _FakeComparison:
    """Ratios by D̃ of the candidate's attention layer."""

    def __init__(self, ratios):
        self.ratios, self.timed = ratios, []

    def __call__(self, candidate):
        (site,) = find_attention_sites(candidate, is_collaborative)
        self.timed.append(site.layer.shared_key_dim)
        return {"ratio": self.ratios[site.layer.shared_key_dim]}


def test_choose_takes_the_largest_fast_enough_and_stops():
    model = _attention_model()  # full D̃ 16
    comparison = _FakeComparison({16: 1.3, 12: 0.95, 8: 0.85, 4: 0.7})
    # Fractions and sizes mixed, in no order: 0.25 -> 4, 0.5 -> 8, 1.0 -> 16.
    chosen = latency.choose_shared_key_dim_for_speedup(
        model, [0.25, 12, 1.0, 0.5], 1.1, comparison
    )
    assert comparison.timed == [16, 12, 8]  # largest first; 4 never timed
    assert chosen["chosen"] == 0.5 and chosen["ratio"] == 0.85
    assert chosen["max_ratio"] == pytest.approx(1 / 1.1)
    assert [row["shared_key_dim"] for row in chosen["candidates"]] == [
        1.0,
        12,
        0.5,
    ]


def test_choose_refuses_an_impossible_target():
    model = _attention_model()
    comparison = _FakeComparison({8: 0.9, 4: 0.8})
    with pytest.raises(ValueError, match=r"No candidate D̃ runs 5x") as error:
        latency.choose_shared_key_dim_for_speedup(
            model, [8, 4], 5.0, comparison
        )
    assert "D̃=8: 0.900x" in str(error.value)
    assert "D̃=4: 0.800x" in str(error.value)


@pytest.mark.parametrize(
    "candidates, target, message",
    [
        ([8], 0.0, "positive"),
        ([], 1.1, "at least one"),
        (["x"], 1.1, "integer"),
    ],
)
def test_choose_rejects_bad_arguments(candidates, target, message):
    with pytest.raises(ValueError, match=message):
        latency.choose_shared_key_dim_for_speedup(
            _attention_model(), candidates, target, _FakeComparison({})
        )
