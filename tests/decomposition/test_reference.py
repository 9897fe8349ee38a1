"""The TensorLy PARAFAC baseline (`keras_collab.decomposition.reference`)."""

import sys

import numpy as np
import pytest

from keras_collab.decomposition import collaborative_cp
from keras_collab.decomposition import reference_parafac


def _random_kernels(rng, num_heads=4, query_dim=24, key_dim=20, head_dim=8):
    query_kernels = rng.standard_normal((num_heads, query_dim, head_dim))
    key_kernels = rng.standard_normal((num_heads, key_dim, head_dim))
    return query_kernels, key_kernels


def _full_tensor(query_kernels, key_kernels):
    """Slices `A_h B_h^T`, shape `(H, D_q, D_k)`."""
    return np.einsum("hik,hjk->hij", query_kernels, key_kernels)


def _reconstruction(query_kernel, key_kernel, mixing):
    """Slices `U diag(M[h]) V^T`, shape `(H, D_q, D_k)`."""
    return np.einsum("ir,hr,jr->hij", query_kernel, mixing, key_kernel)


def _psd_sqrt(matrix):
    eigenvalues, eigenvectors = np.linalg.eigh(matrix)
    return (
        eigenvectors * np.sqrt(np.clip(eigenvalues, 0, None))
    ) @ eigenvectors.T


def _brute_force_error(
    query_kernels,
    key_kernels,
    query_kernel,
    key_kernel,
    mixing,
    query_weight=None,
    key_weight=None,
):
    target = _full_tensor(query_kernels, key_kernels)
    residual = target - _reconstruction(query_kernel, key_kernel, mixing)
    if query_weight is not None:
        root = _psd_sqrt(query_weight)
        target, residual = root @ target, root @ residual
    if key_weight is not None:
        root = _psd_sqrt(key_weight)
        target, residual = target @ root, residual @ root
    return np.linalg.norm(residual) / np.linalg.norm(target)


def _anisotropic_samples(rng, num_samples, dim, decay):
    """Rows with a strongly decaying spectrum in a random orthonormal basis."""
    basis = np.linalg.qr(rng.standard_normal((dim, dim)))[0]
    scales = decay ** np.arange(dim)
    return rng.standard_normal((num_samples, dim)) * scales @ basis.T


def _rank(result):
    return result.mixing.shape[1]


# ---------------------------------------------------------------------------
# Error computation
# ---------------------------------------------------------------------------


# ---------------------------------------------------------------------------
# Solutions
# ---------------------------------------------------------------------------


# ---------------------------------------------------------------------------
# Activation-aware weighting
# ---------------------------------------------------------------------------


def _weighted_setup():
    rng = np.random.default_rng(11)
    query_kernels, key_kernels = _random_kernels(rng)
    query_samples = _anisotropic_samples(rng, 300, 24, 0.75)
    key_samples = _anisotropic_samples(rng, 250, 20, 0.7)
    return query_kernels, key_kernels, query_samples, key_samples


# ---------------------------------------------------------------------------
# second_moment
# ---------------------------------------------------------------------------


# ---------------------------------------------------------------------------
# rank_for_target_error
# ---------------------------------------------------------------------------


# ---------------------------------------------------------------------------
# reference_parafac
# ---------------------------------------------------------------------------


# ---------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------


def _valid_arguments():
    rng = np.random.default_rng(20)
    return _random_kernels(rng, num_heads=3, query_dim=6, key_dim=5, head_dim=2)


def test_reference_parafac_is_matched_by_the_structured_solver():
    pytest.importorskip("tensorly")
    rng = np.random.default_rng(18)
    query_kernels, key_kernels = _random_kernels(
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
        _brute_force_error(
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
    query_kernels, key_kernels = _random_kernels(rng, num_heads=2, head_dim=2)
    with pytest.raises(ImportError, match=r"keras-collab\[reference\]"):
        reference_parafac(query_kernels, key_kernels, 2)


def test_reference_parafac_rejects_bad_init():
    query_kernels, key_kernels = _valid_arguments()
    with pytest.raises(ValueError, match="init"):
        reference_parafac(query_kernels, key_kernels, 2, init="bogus")
