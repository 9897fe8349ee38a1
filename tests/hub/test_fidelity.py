"""Fidelity measures (`keras_collab.hub.fidelity`) against NumPy and SciPy
computations written from their definitions."""

import numpy as np
import pytest
from scipy import stats

from keras_collab.hub.fidelity import Fidelity
from keras_collab.hub.fidelity import fidelity

RNG = np.random.default_rng(7)


def _batch(texts=6, tokens=5):
    mask = np.ones((texts, tokens), bool)
    mask[1, 3:] = False
    mask[texts - 1, 1:] = False
    return {"padding_mask": mask}


def _model(outputs, key="sequence_output"):
    """A stand-in model returning fixed outputs for each batch, in order."""
    calls = iter(outputs)

    def call(batch, training=None):
        assert training is False
        return {key: next(calls)}

    return call


def _expected(reference, candidate, masks):
    def pooled(outputs):
        rows = []
        for output, mask in zip(outputs, masks):
            for row, row_mask in zip(output, mask):
                rows.append(row[row_mask].mean(axis=0))
        return np.array(rows)

    a, b = pooled(reference), pooled(candidate)
    cosines = [
        x @ y / np.linalg.norm(x) / np.linalg.norm(y) for x, y in zip(a, b)
    ]
    pairs = [(i, j) for i in range(len(a)) for j in range(i + 1, len(a))]

    def similarities(x):
        return [
            x[i] @ x[j] / np.linalg.norm(x[i]) / np.linalg.norm(x[j])
            for i, j in pairs
        ]

    max_abs = max(
        np.abs(r - c)[m].max() for r, c, m in zip(reference, candidate, masks)
    )
    return {
        "mean_cosine": np.mean(cosines),
        "min_cosine": np.min(cosines),
        "spearman_pairwise": stats.spearmanr(
            similarities(a), similarities(b)
        ).statistic,
        "max_abs_difference": max_abs,
        "texts": len(a),
    }


def test_measures_match_their_definitions():
    batches = [_batch(), _batch(4)]
    reference = [
        RNG.normal(size=(len(b["padding_mask"]), 5, 3)) for b in batches
    ]
    candidate = [r + 0.3 * RNG.normal(size=r.shape) for r in reference]
    # Padded tokens must not count: make them wildly different.
    for c, b in zip(candidate, batches):
        c[~b["padding_mask"]] = 1e3
    measured = Fidelity(_model(reference), batches)(_model(candidate))
    expected = _expected(
        reference, candidate, [b["padding_mask"] for b in batches]
    )
    assert measured.keys() == expected.keys()
    for key, value in expected.items():
        np.testing.assert_allclose(measured[key], value, rtol=1e-5)


def test_identical_models_are_perfect_and_the_original_runs_once():
    batches = [_batch()]
    reference = [RNG.normal(size=(6, 5, 3))]
    measure = Fidelity(_model(reference), batches)  # one call only
    result = measure(_model(reference))
    assert result["mean_cosine"] == pytest.approx(1.0)
    assert result["max_abs_difference"] == 0.0
    assert fidelity(_model(reference), _model(reference), batches)[
        "spearman_pairwise"
    ] == pytest.approx(1.0)


def test_decoder_output_is_compared_over_its_own_mask():
    batch = {"decoder_padding_mask": _batch()["padding_mask"]}
    reference = [RNG.normal(size=(6, 5, 3))]
    candidate = [reference[0] + 0.1]
    result = fidelity(
        _model(reference, "decoder_sequence_output"),
        _model(candidate, "decoder_sequence_output"),
        [batch],
    )
    assert result["output"] == "decoder_sequence_output"
    assert result["max_abs_difference"] == pytest.approx(0.1)


def test_missing_mask_is_named():
    with pytest.raises(ValueError, match="padding_mask"):
        Fidelity(_model([np.zeros((2, 3, 4))]), [{"token_ids": np.zeros(2)}])
