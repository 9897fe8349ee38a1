"""Input second moments (`keras_collab.decomposition.weighting`), pure
NumPy, checked against sums written from the definition."""

import numpy as np
import pytest

from keras_collab.decomposition import collaborative_cp
from keras_collab.decomposition import second_moment
from tests.fixtures.factors import weighted_setup


def test_singular_weight_is_damped():
    # Fewer samples than dimensions: S is singular, S^{-1/2} needs damping.
    query_kernels, key_kernels, query_samples, _ = weighted_setup()
    query_samples = query_samples[:10]
    result = collaborative_cp(
        query_kernels,
        key_kernels,
        8,
        query_weight=second_moment(query_samples),
        max_iter=50,
    )
    assert np.all(np.isfinite(result.query_kernel))
    assert result.relative_error < 0.5


def test_second_moment_with_mask():
    rng = np.random.default_rng(12)
    inputs = rng.standard_normal((3, 5, 4))
    mask = rng.random((3, 5)) < 0.6
    mask[0, 0] = True
    tokens = inputs[mask]
    np.testing.assert_allclose(
        second_moment(inputs, mask), tokens.T @ tokens / len(tokens), rtol=1e-12
    )
    all_tokens = inputs.reshape(-1, 4)
    np.testing.assert_allclose(
        second_moment(inputs), all_tokens.T @ all_tokens / 15, rtol=1e-12
    )


def test_second_moment_centered_per_sequence():
    rng = np.random.default_rng(13)
    inputs = rng.standard_normal((4, 6, 3)) + 5.0  # Large shared offset.
    mask = np.ones((4, 6), dtype=bool)
    mask[1, 4:] = False
    mask[2, 1:] = False
    mask[3, :] = False  # A fully padded sequence contributes nothing.
    centered = []
    for sequence, valid in zip(inputs, mask):
        if valid.any():
            tokens = sequence[valid]
            centered.append(tokens - tokens.mean(axis=0))
    centered = np.concatenate(centered)
    expected = centered.T @ centered / len(centered)
    np.testing.assert_allclose(
        second_moment(inputs, mask, center_per_sequence=True),
        expected,
        rtol=1e-12,
        atol=1e-14,
    )


def test_second_moment_of_2d_inputs():
    rng = np.random.default_rng(14)
    inputs = rng.standard_normal((7, 3))
    mask = np.array([True, False, True, True, False, True, True])
    moment = second_moment(inputs, mask)
    np.testing.assert_allclose(
        moment, inputs[mask].T @ inputs[mask] / 5, rtol=1e-12
    )
    np.testing.assert_array_equal(moment, moment.T)


@pytest.mark.parametrize(
    "inputs, mask, center, match",
    [
        (np.zeros((2, 3)), None, True, "center_per_sequence"),
        (np.zeros((2, 3, 4, 5)), None, False, "inputs"),
        (np.zeros((2, 3, 4)), np.ones((2, 4), dtype=bool), False, "mask"),
        (np.zeros((2, 3, 4)), np.ones((2, 3)), False, "mask"),
        (np.zeros((2, 3, 4)), np.zeros((2, 3), dtype=bool), False, "mask"),
        (np.full((2, 3), np.nan), None, False, "inputs"),
    ],
)
def test_second_moment_rejects_bad_arguments(inputs, mask, center, match):
    with pytest.raises(ValueError, match=match):
        second_moment(inputs, mask, center_per_sequence=center)
