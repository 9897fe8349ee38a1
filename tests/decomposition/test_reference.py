"""The TensorLy PARAFAC baseline (`keras_collab.decomposition.reference`)."""

import sys

import numpy as np
import pytest

from keras_collab.decomposition import collaborative_cp
from keras_collab.decomposition import reference_parafac
from tests.fixtures.factors import random_kernels
from tests.fixtures.factors import small_kernels
from tests.reference import decomposition_error


def test_reference_parafac_is_matched_by_the_structured_solver():
    pytest.importorskip("tensorly")
    rng = np.random.default_rng(18)
    query_kernels, key_kernels = random_kernels(
        rng, num_heads=3, query_dim=10, key_dim=9, head_dim=4
    )
    rank = 6
    reference = reference_parafac(
        query_kernels, key_kernels, rank, n_iter_max=300
    )
    assert reference.query_kernel.shape == (10, rank)
    assert reference.key_kernel.shape == (9, rank)
    assert reference.mixing.shape == (3, rank)
    np.testing.assert_allclose(
        reference.relative_error,
        decomposition_error(
            query_kernels,
            key_kernels,
            reference.query_kernel,
            reference.key_kernel,
            reference.mixing,
        ),
        rtol=1e-8,
    )
    structured = collaborative_cp(
        query_kernels, key_kernels, rank, max_iter=300
    )
    assert structured.relative_error <= reference.relative_error * 1.01


def test_reference_parafac_names_the_extra_when_tensorly_is_missing(
    monkeypatch,
):
    monkeypatch.setitem(sys.modules, "tensorly", None)
    monkeypatch.setitem(sys.modules, "tensorly.decomposition", None)
    rng = np.random.default_rng(19)
    query_kernels, key_kernels = random_kernels(rng, num_heads=2, head_dim=2)
    with pytest.raises(ImportError, match=r"keras-collab\[reference\]"):
        reference_parafac(query_kernels, key_kernels, 2)


def test_reference_parafac_rejects_bad_init():
    query_kernels, key_kernels = small_kernels()
    with pytest.raises(ValueError, match="init"):
        reference_parafac(query_kernels, key_kernels, 2, init="bogus")
