"""Tests for `keras_collab.decomposition` (pure NumPy, backend independent).

Every error the solver reports is checked against an independent brute-force
computation on the full `D_q x H x D_k` tensor, which the solver itself never
forms.
"""

import numpy as np
import pytest

from keras_collab.decomposition import CPResult
from keras_collab.decomposition import collaborative_cp
from keras_collab.decomposition import rank_for_target_error
from keras_collab.decomposition import reference_parafac
from keras_collab.decomposition import relative_error
from keras_collab.decomposition import second_moment
from tests.fixtures.factors import anisotropic_samples
from tests.fixtures.factors import random_kernels
from tests.fixtures.factors import small_kernels
from tests.fixtures.factors import weighted_setup
from tests.reference import collaborative_products
from tests.reference import decomposition_error
from tests.reference import per_head_products


def _rank(result):
    return result.mixing.shape[1]


def test_relative_error_matches_brute_force_for_arbitrary_factors():
    rng = np.random.default_rng(0)
    query_kernels, key_kernels = random_kernels(rng)
    factors = (
        rng.standard_normal((24, 7)),
        rng.standard_normal((20, 7)),
        rng.standard_normal((4, 7)),
    )
    expected = decomposition_error(query_kernels, key_kernels, *factors)
    actual = relative_error(query_kernels, key_kernels, *factors)
    assert isinstance(actual, float)
    np.testing.assert_allclose(actual, expected, rtol=1e-10)


@pytest.mark.parametrize("rank", [1, 5, 17, 31])
def test_solver_error_matches_brute_force(rank):
    rng = np.random.default_rng(1)
    query_kernels, key_kernels = random_kernels(rng)
    result = collaborative_cp(query_kernels, key_kernels, rank, max_iter=60)
    assert isinstance(result, CPResult)
    assert result.query_kernel.shape == (24, rank)
    assert result.key_kernel.shape == (20, rank)
    assert result.mixing.shape == (4, rank)
    expected = decomposition_error(
        query_kernels,
        key_kernels,
        result.query_kernel,
        result.key_kernel,
        result.mixing,
    )
    np.testing.assert_allclose(result.relative_error, expected, rtol=1e-8)


def test_relative_error_stays_accurate_near_an_exact_fit():
    # The expansion ||T||^2 - 2<T, T_hat> + ||T_hat||^2 cannot resolve
    # relative errors below ~1e-8; the factored residual must.
    rng = np.random.default_rng(2)
    query_kernel = rng.standard_normal((12, 3))
    key_kernel = rng.standard_normal((10, 3))
    mixing = rng.standard_normal((5, 3))
    query_kernels = np.stack([query_kernel * row for row in mixing])
    key_kernels = np.stack([key_kernel] * 5)
    perturbed_mixing = mixing * (1 + 1e-10 * rng.standard_normal(mixing.shape))
    expected = decomposition_error(
        query_kernels, key_kernels, query_kernel, key_kernel, perturbed_mixing
    )
    actual = relative_error(
        query_kernels, key_kernels, query_kernel, key_kernel, perturbed_mixing
    )
    assert 1e-12 < expected < 1e-9
    np.testing.assert_allclose(actual, expected, rtol=1e-4)


def test_full_rank_returns_exact_concatenation():
    rng = np.random.default_rng(3)
    query_kernels, key_kernels = random_kernels(rng, num_heads=3, head_dim=5)
    result = collaborative_cp(query_kernels, key_kernels, 15)

    np.testing.assert_array_equal(
        result.query_kernel, np.concatenate(list(query_kernels), axis=1)
    )
    np.testing.assert_array_equal(
        result.key_kernel, np.concatenate(list(key_kernels), axis=1)
    )
    expected_mixing = np.zeros((3, 15))
    for head in range(3):
        expected_mixing[head, head * 5 : (head + 1) * 5] = 1.0
    np.testing.assert_array_equal(result.mixing, expected_mixing)
    assert result.relative_error < 1e-12
    assert result.iterations == 0
    assert result.converged
    np.testing.assert_allclose(
        collaborative_products(
            result.query_kernel, result.key_kernel, result.mixing
        ),
        per_head_products(query_kernels, key_kernels),
        rtol=1e-12,
        atol=1e-12,
    )


def test_full_rank_is_exact_in_the_weighted_metric_too():
    rng = np.random.default_rng(4)
    query_kernels, key_kernels = random_kernels(rng, num_heads=2, head_dim=4)
    query_samples = anisotropic_samples(rng, 200, 24, 0.8)
    result = collaborative_cp(
        query_kernels,
        key_kernels,
        8,
        query_weight=second_moment(query_samples),
    )
    assert result.iterations == 0
    assert result.relative_error < 1e-12


def test_exact_low_rank_structure_is_recovered():
    rng = np.random.default_rng(5)
    rank, num_heads = 5, 6
    query_kernel = rng.standard_normal((20, rank))
    key_kernel = rng.standard_normal((18, rank))
    mixing = rng.standard_normal((num_heads, rank))
    # d_k = R: head h is A_h = U diag(M[h]), B_h = V.
    query_kernels = np.stack([query_kernel * row for row in mixing])
    key_kernels = np.stack([key_kernel] * num_heads)

    result = collaborative_cp(query_kernels, key_kernels, rank)

    assert result.relative_error < 1e-6
    assert result.converged
    brute_force = decomposition_error(
        query_kernels,
        key_kernels,
        result.query_kernel,
        result.key_kernel,
        result.mixing,
    )
    assert brute_force < 1e-6


def test_error_does_not_grow_with_rank():
    rng = np.random.default_rng(6)
    query_kernels, key_kernels = random_kernels(rng)  # Full rank 32.
    errors = [
        collaborative_cp(
            query_kernels, key_kernels, rank, max_iter=100
        ).relative_error
        for rank in (4, 8, 16, 32)
    ]
    assert all(
        later <= earlier + 1e-9 for earlier, later in zip(errors, errors[1:])
    )
    assert errors[0] < 1.0
    assert errors[-1] < 1e-12


def test_factors_are_balanced():
    rng = np.random.default_rng(7)
    query_kernels, key_kernels = random_kernels(rng)
    result = collaborative_cp(query_kernels, key_kernels, 10, max_iter=30)
    np.testing.assert_allclose(np.max(result.mixing, axis=0), 1.0, rtol=1e-12)
    np.testing.assert_allclose(
        np.max(np.abs(result.mixing), axis=0), 1.0, rtol=1e-12
    )
    np.testing.assert_allclose(
        np.linalg.norm(result.query_kernel, axis=0),
        np.linalg.norm(result.key_kernel, axis=0),
        rtol=1e-10,
    )


def test_max_iter_zero_returns_the_initialisation():
    rng = np.random.default_rng(8)
    query_kernels, key_kernels = random_kernels(rng)
    result = collaborative_cp(query_kernels, key_kernels, 6, max_iter=0)
    assert result.iterations == 0
    assert not result.converged
    assert 0.0 < result.relative_error < 1.0
    longer = collaborative_cp(query_kernels, key_kernels, 6, max_iter=20)
    assert longer.relative_error <= result.relative_error


def test_deterministic():
    rng = np.random.default_rng(9)
    query_kernels, key_kernels = random_kernels(rng)
    first = collaborative_cp(query_kernels, key_kernels, 12, max_iter=40)
    second = collaborative_cp(query_kernels, key_kernels, 12, max_iter=40)
    for field in ("query_kernel", "key_kernel", "mixing"):
        np.testing.assert_array_equal(
            getattr(first, field), getattr(second, field)
        )
    assert first.relative_error == second.relative_error
    assert first.iterations == second.iterations

    # With R <= D the initialisation is purely spectral: the seed is unused.
    other_seed = collaborative_cp(
        query_kernels, key_kernels, 12, max_iter=40, seed=7
    )
    np.testing.assert_array_equal(first.mixing, other_seed.mixing)


def test_seed_only_matters_for_random_fill_beyond_the_dimension():
    rng = np.random.default_rng(10)
    # D_q = 6 < R = 10 <= H d_k = 20: four query columns are random.
    query_kernels, key_kernels = random_kernels(
        rng, num_heads=4, query_dim=6, key_dim=7, head_dim=5
    )
    results = [
        collaborative_cp(query_kernels, key_kernels, 10, max_iter=50, seed=seed)
        for seed in (0, 0, 1)
    ]
    np.testing.assert_array_equal(results[0].mixing, results[1].mixing)
    assert not np.array_equal(results[0].mixing, results[2].mixing)
    for result in results:
        expected = decomposition_error(
            query_kernels,
            key_kernels,
            result.query_kernel,
            result.key_kernel,
            result.mixing,
        )
        np.testing.assert_allclose(result.relative_error, expected, rtol=1e-8)
        assert result.relative_error < 0.5


def test_weighted_solution_wins_in_its_own_metric():
    query_kernels, key_kernels, query_samples, key_samples = weighted_setup()
    weights = {
        "query_weight": second_moment(query_samples),
        "key_weight": second_moment(key_samples),
    }
    rank = 8
    weighted = collaborative_cp(query_kernels, key_kernels, rank, **weights)
    plain = collaborative_cp(query_kernels, key_kernels, rank)

    def error(result, **metric):
        return relative_error(
            query_kernels,
            key_kernels,
            result.query_kernel,
            result.key_kernel,
            result.mixing,
            **metric,
        )

    assert error(weighted, **weights) < 0.5 * error(plain, **weights)
    assert error(plain) < error(weighted)
    np.testing.assert_allclose(
        weighted.relative_error, error(weighted, **weights), rtol=1e-12
    )
    np.testing.assert_allclose(
        weighted.relative_error,
        decomposition_error(
            query_kernels,
            key_kernels,
            weighted.query_kernel,
            weighted.key_kernel,
            weighted.mixing,
            **weights,
        ),
        rtol=1e-8,
    )


def test_weighted_error_is_the_logits_error_on_the_samples():
    query_kernels, key_kernels, query_samples, key_samples = weighted_setup()
    result = collaborative_cp(
        query_kernels,
        key_kernels,
        8,
        query_weight=query_samples.T @ query_samples / len(query_samples),
        key_weight=key_samples.T @ key_samples / len(key_samples),
    )
    true_logits = np.einsum(
        "nd,hde,me->hnm",
        query_samples,
        per_head_products(query_kernels, key_kernels),
        key_samples,
    )
    approximate_logits = np.einsum(
        "nd,hde,me->hnm",
        query_samples,
        collaborative_products(
            result.query_kernel, result.key_kernel, result.mixing
        ),
        key_samples,
    )
    logits_error = np.linalg.norm(
        true_logits - approximate_logits
    ) / np.linalg.norm(true_logits)
    np.testing.assert_allclose(result.relative_error, logits_error, rtol=1e-8)


def test_rank_for_target_error_default_candidates():
    rng = np.random.default_rng(15)
    query_kernels, key_kernels = random_kernels(rng)  # d_k = 8, full rank 32.
    target = 0.5
    result = rank_for_target_error(
        query_kernels, key_kernels, target, max_iter=100
    )
    rank = _rank(result)
    assert rank % 8 == 0
    assert result.relative_error <= target
    assert rank > 8  # The target is not trivially met...
    smaller = collaborative_cp(
        query_kernels, key_kernels, rank - 8, max_iter=100
    )
    assert smaller.relative_error > target  # ...and the rank is minimal.


def test_rank_for_target_error_custom_candidates():
    rng = np.random.default_rng(16)
    query_kernels, key_kernels = random_kernels(rng)
    candidates = [20, 3, 12, 6, 12]
    result = rank_for_target_error(
        query_kernels, key_kernels, 0.4, candidates=candidates, max_iter=100
    )
    rank = _rank(result)
    assert rank in candidates
    assert result.relative_error <= 0.4
    previous = max(candidate for candidate in candidates if candidate < rank)
    smaller = collaborative_cp(
        query_kernels, key_kernels, previous, max_iter=100
    )
    assert smaller.relative_error > 0.4


def test_rank_for_target_error_falls_back_to_full_rank():
    rng = np.random.default_rng(17)
    query_kernels, key_kernels = random_kernels(rng, num_heads=2, head_dim=3)
    result = rank_for_target_error(
        query_kernels, key_kernels, 1e-9, candidates=[1, 2], max_iter=50
    )
    assert _rank(result) == 6
    assert result.relative_error < 1e-12


def test_rank_for_target_error_with_weights():
    query_kernels, key_kernels, query_samples, key_samples = weighted_setup()
    weights = {
        "query_weight": second_moment(query_samples),
        "key_weight": second_moment(key_samples),
    }
    weighted = rank_for_target_error(
        query_kernels, key_kernels, 0.2, max_iter=100, **weights
    )
    plain = rank_for_target_error(query_kernels, key_kernels, 0.2, max_iter=100)
    assert weighted.relative_error <= 0.2
    # The data only uses a few directions, so fewer components suffice.
    assert _rank(weighted) < _rank(plain)


@pytest.mark.parametrize("rank", [0, -1, 7, 2.0, True])
def test_rejects_bad_rank(rank):
    query_kernels, key_kernels = small_kernels()
    with pytest.raises(ValueError, match="rank"):
        collaborative_cp(query_kernels, key_kernels, rank)
    with pytest.raises(ValueError, match="rank"):
        reference_parafac(query_kernels, key_kernels, rank)


def test_rejects_mismatched_head_counts():
    query_kernels, key_kernels = small_kernels()
    with pytest.raises(ValueError, match="number of heads"):
        collaborative_cp(query_kernels, key_kernels[:2], 2)


def test_rejects_mismatched_key_dims():
    query_kernels, key_kernels = small_kernels()
    with pytest.raises(ValueError, match="d_k"):
        collaborative_cp(
            query_kernels, np.concatenate([key_kernels] * 2, axis=2), 2
        )


@pytest.mark.parametrize("argument", ["query_kernels", "key_kernels"])
def test_rejects_wrong_ndim(argument):
    kernels = dict(zip(("query_kernels", "key_kernels"), small_kernels()))
    kernels[argument] = kernels[argument][0]
    with pytest.raises(ValueError, match=argument):
        collaborative_cp(kernels["query_kernels"], kernels["key_kernels"], 2)


def test_rejects_non_finite_kernels():
    query_kernels, key_kernels = small_kernels()
    query_kernels[0, 0, 0] = np.inf
    with pytest.raises(ValueError, match="query_kernels"):
        collaborative_cp(query_kernels, key_kernels, 2)


@pytest.mark.parametrize(
    "name, weight, match",
    [
        ("query_weight", np.eye(5), "shape"),
        ("key_weight", np.eye(6), "shape"),
        ("query_weight", np.ones((6,)), "shape"),
        ("query_weight", np.triu(np.ones((6, 6))), "symmetric"),
        ("key_weight", -np.eye(5), "positive semi-definite"),
        ("key_weight", np.zeros((5, 5)), "zeros"),
    ],
)
def test_rejects_bad_weights(name, weight, match):
    query_kernels, key_kernels = small_kernels()
    with pytest.raises(ValueError, match=f"{name}.*{match}"):
        collaborative_cp(query_kernels, key_kernels, 2, **{name: weight})
    with pytest.raises(ValueError, match=name):
        rank_for_target_error(query_kernels, key_kernels, 0.5, **{name: weight})


@pytest.mark.parametrize("target_error", [0.0, 1.0, -0.1, 1.5, "0.5"])
def test_rejects_target_error_outside_unit_interval(target_error):
    query_kernels, key_kernels = small_kernels()
    with pytest.raises(ValueError, match="target_error"):
        rank_for_target_error(query_kernels, key_kernels, target_error)


@pytest.mark.parametrize("candidates", [[0, 2], [2, 7], [2.5]])
def test_rejects_bad_candidates(candidates):
    query_kernels, key_kernels = small_kernels()
    with pytest.raises(ValueError, match="candidates"):
        rank_for_target_error(
            query_kernels, key_kernels, 0.5, candidates=candidates
        )


@pytest.mark.parametrize(
    "keyword, value", [("tol", -1.0), ("max_iter", -1), ("max_iter", 1.5)]
)
def test_rejects_bad_solver_settings(keyword, value):
    query_kernels, key_kernels = small_kernels()
    with pytest.raises(ValueError, match=keyword):
        collaborative_cp(query_kernels, key_kernels, 2, **{keyword: value})


def test_rejects_all_zero_tensor():
    query_kernels, key_kernels = small_kernels()
    with pytest.raises(ValueError, match="zero"):
        collaborative_cp(np.zeros_like(query_kernels), key_kernels, 2)


def test_relative_error_rejects_mismatched_factors():
    query_kernels, key_kernels = small_kernels()
    with pytest.raises(ValueError, match="query_kernel"):
        relative_error(
            query_kernels,
            key_kernels,
            np.ones((5, 2)),
            np.ones((5, 2)),
            np.ones((3, 2)),
        )
    with pytest.raises(ValueError, match="mixing"):
        relative_error(
            query_kernels,
            key_kernels,
            np.ones((6, 2)),
            np.ones((5, 2)),
            np.ones((4, 2)),
        )
