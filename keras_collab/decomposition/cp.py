"""Collaborative re-parametrisation of pretrained multi-head attention.

A multi-head attention layer with per-head query kernels `A_h` (`D_q x d_k`)
and key kernels `B_h` (`D_k x d_k`) computes, for head `h`, the attention
logits `x A_h B_h^T y^T`. "Multi-Head Attention: Collaborate Instead of
Concatenate" (Cordonnier et al., 2020) replaces the `H` pairs of kernels by a
single shared query kernel `U` (`D_q x R`), a shared key kernel `V`
(`D_k x R`) and a mixing matrix `M` (`H x R`), with logits
`x U diag(M[h]) V^T y^T`. Finding `U, M, V` is a rank-`R` CP decomposition of
the `D_q x H x D_k` tensor `T` whose slices are `T_h = A_h B_h^T`.

This module computes that decomposition with alternating least squares
(ALS) that never forms `T`: every quantity ALS needs (the MTTKRP numerators,
the norms and the residual) comes from the per-head factors `A_h, B_h`.
A sweep over the full tensor costs `O(D_q H D_k R)`; the factored sweep costs
`O(H d_k (D_q + D_k) R)`, which is `D / (2 d_k)` times cheaper and needs no
`D_q x H x D_k` buffer.

The decomposition can also be *activation aware*: given the second moments
`S_q = E[x x^T]` and `S_k = E[y y^T]` of the layer's real query-side and
key-side inputs, it minimises the expected logits error
`sum_h ||S_q^{1/2} (T_h - T_hat_h) S_k^{1/2}||_F^2` instead of the plain
Frobenius error, so the limited rank is spent on directions the data uses.

Everything here is plain NumPy in float64, so it behaves the same under every
Keras backend, needs no built layer and adds no dependency.
"""

import dataclasses
import math

import numpy as np

from keras_collab.decomposition._checks import candidate_ranks
from keras_collab.decomposition._checks import validate_factors
from keras_collab.decomposition._checks import validate_kernels
from keras_collab.decomposition._checks import validate_max_iter
from keras_collab.decomposition._checks import validate_rank
from keras_collab.decomposition._checks import validate_tol
from keras_collab.decomposition._checks import validate_weight
from keras_collab.decomposition.weighting import damped_roots
from keras_collab.decomposition.weighting import psd_square_root

# Ridge added to every ALS Gram matrix, relative to its mean diagonal entry.
# It is far below the precision the fit is judged at, but keeps the Cholesky
# solve defined when a factor is rank deficient (e.g. `R > D_q`, or a target
# of lower rank than `R`).
_RIDGE = 1e-12


# Below this fraction of `||T||^2`, the expanded squared error
# `||T||^2 - 2 <T, T_hat> + ||T_hat||^2` carries round-off of ~1e-14 relative
# to `||T||^2`, i.e. relative noise in the error itself that could trip the
# `tol` test, so ALS switches to the exact factored residual (which costs
# about one sweep) from there on.
_EXPANSION_TRUST_LIMIT = 1e-6


# A relative error this small is a perfect fit up to float64 round-off;
# further sweeps can only shuffle round-off around.
_EXACT_FIT_ERROR = 1e-13


@dataclasses.dataclass
class CPResult:
    """Factors of a collaborative (CP) re-parametrisation of attention.

    The reconstructed logits kernel of head `h` is
    `query_kernel @ np.diag(mixing[h]) @ key_kernel.T`.

    Attributes:
        query_kernel: Shared query kernel `U`, array of shape `(D_q, R)`.
        key_kernel: Shared key kernel `V`, array of shape `(D_k, R)`.
        mixing: Per-head mixing vectors `M`, array of shape `(H, R)`.
        relative_error: `||T - T_hat||_F / ||T||_F`, measured in the metric
            that was optimised: the plain Frobenius norm, or the
            activation-weighted norm when weights were given.
        iterations: Number of ALS sweeps performed (0 for the exact
            full-rank solution).
        converged: Whether the stopping criterion was met before the
            iteration limit.
    """

    query_kernel: np.ndarray
    key_kernel: np.ndarray
    mixing: np.ndarray
    relative_error: float
    iterations: int
    converged: bool


def collaborative_cp(
    query_kernels,
    key_kernels,
    rank,
    *,
    query_weight=None,
    key_weight=None,
    tol=1e-7,
    max_iter=500,
    seed=0,
):
    """Decomposes per-head attention kernels into collaborative factors.

    Fits `A_h B_h^T ~= U diag(M[h]) V^T` for all heads `h` jointly with
    alternating least squares on the factored tensor (the `D_q x H x D_k`
    tensor is never formed). `U` and `V` start from the leading left
    singular vectors of the tensor's query and key unfoldings and `M` from
    least squares, so the result is deterministic.

    When `rank == H * d_k` the exact "concatenate" solution is returned
    without iterating: `U = [A_1 ... A_H]`, `V = [B_1 ... B_H]` and `M[h]`
    the indicator of head `h`'s block of `d_k` columns.

    Otherwise, on return each column of `mixing` has its largest-magnitude
    entry equal to `+1` (as in the concatenate solution) and the matching
    columns of `query_kernel` and `key_kernel` have equal norms, so neither
    kernel dwarfs the other.

    Args:
        query_kernels: Array of shape `(H, D_q, d_k)`, the per-head query
            kernels `A_h`. A Keras `MultiHeadAttention` query kernel of shape
            `(D_q, H, d_k)` becomes this with `np.transpose(k, (1, 0, 2))`.
        key_kernels: Array of shape `(H, D_k, d_k)`, the per-head key
            kernels `B_h`.
        rank: Integer `R` between 1 and `H * d_k`, the number of shared
            query/key dimensions.
        query_weight: Optional symmetric positive semi-definite array of
            shape `(D_q, D_q)`, the second moment `E[x x^T]` of the query-side
            inputs (see `second_moment`). Weights the query side of the
            error.
        key_weight: Optional symmetric positive semi-definite array of shape
            `(D_k, D_k)`, the second moment of the key-side inputs (best
            computed with `center_per_sequence=True`).
        tol: Non-negative float. ALS stops once a sweep improves the
            relative error by less than `tol` times its previous value.
        max_iter: Non-negative integer, the maximum number of ALS sweeps.
        seed: Integer seed of the random columns used when `rank` exceeds
            `D_q` or `D_k` (the spectral initialisation has only `D`
            directions to offer). Unused otherwise.

    Returns:
        A `CPResult` with `U`, `V`, `M`, the relative error (in the weighted
        metric when weights are given), the number of sweeps and whether
        ALS converged.

    Example:

    >>> rng = np.random.default_rng(0)
    >>> query_kernels = rng.standard_normal((4, 16, 8))  # (H, D_q, d_k)
    >>> key_kernels = rng.standard_normal((4, 16, 8))    # (H, D_k, d_k)
    >>> result = collaborative_cp(query_kernels, key_kernels, rank=12)
    >>> result.query_kernel.shape, result.mixing.shape, result.key_kernel.shape
    ((16, 12), (4, 12), (16, 12))
    >>> bool(0.0 < result.relative_error < 1.0)
    True
    """
    query_kernels, key_kernels = validate_kernels(query_kernels, key_kernels)
    num_heads, query_dim, head_dim = query_kernels.shape
    key_dim = key_kernels.shape[1]
    rank = validate_rank(rank, num_heads * head_dim)
    tol = validate_tol(tol)
    max_iter = validate_max_iter(max_iter)
    query_weight = validate_weight(query_weight, query_dim, "query_weight")
    key_weight = validate_weight(key_weight, key_dim, "key_weight")

    if rank == num_heads * head_dim:
        return _concatenate_solution(
            query_kernels, key_kernels, query_weight, key_weight
        )

    # Weighting the error by S_q^{1/2} . S_k^{1/2} is the plain problem on
    # S_q^{1/2} A_h and S_k^{1/2} B_h, so ALS itself stays unweighted and the
    # solution is mapped back through the (damped) inverse roots.
    query_root, query_inverse_root = damped_roots(query_weight)
    key_root, key_inverse_root = damped_roots(key_weight)
    problem = _FactoredProblem(
        _left_multiply_heads(query_root, query_kernels),
        _left_multiply_heads(key_root, key_kernels),
    )

    rng = np.random.default_rng(seed)
    query_kernel = _spectral_init(
        problem.query_kernels, problem.key_kernels, rank, rng
    )
    key_kernel = _spectral_init(
        problem.key_kernels, problem.query_kernels, rank, rng
    )
    query_kernel, key_kernel, mixing, iterations, converged = _run_als(
        problem, query_kernel, key_kernel, tol, max_iter
    )

    if query_inverse_root is not None:
        query_kernel = query_inverse_root @ query_kernel
    if key_inverse_root is not None:
        key_kernel = key_inverse_root @ key_kernel
    query_kernel, key_kernel, mixing = _balance_factors(
        query_kernel, key_kernel, mixing
    )
    # Measured on the returned kernels in the undamped metric: that is the
    # error they actually make on the data, damping included.
    error = _weighted_relative_error(
        query_kernels,
        key_kernels,
        query_kernel,
        key_kernel,
        mixing,
        query_weight,
        key_weight,
    )
    return CPResult(
        query_kernel=query_kernel,
        key_kernel=key_kernel,
        mixing=mixing,
        relative_error=error,
        iterations=iterations,
        converged=converged,
    )


def relative_error(
    query_kernels,
    key_kernels,
    query_kernel,
    key_kernel,
    mixing,
    *,
    query_weight=None,
    key_weight=None,
):
    """Relative error of a collaborative approximation of attention kernels.

    Computes `||T - T_hat||_F / ||T||_F` with `T_h = A_h B_h^T` and
    `T_hat_h = U diag(M[h]) V^T`, or, with weights, the same ratio of
    `sum_h ||S_q^{1/2} (.)_h S_k^{1/2}||_F^2` norms (which equals the relative
    error of the attention logits on the data the weights were estimated
    from). The residual is evaluated exactly through small per-head
    coordinate matrices, without forming `T` and without the cancellation
    of the `||T||^2 - 2 <T, T_hat> + ||T_hat||^2` expansion, so errors down to
    float64 round-off are reported faithfully.

    Args:
        query_kernels: Array of shape `(H, D_q, d_k)`, the kernels `A_h`.
        key_kernels: Array of shape `(H, D_k, d_k)`, the kernels `B_h`.
        query_kernel: Array of shape `(D_q, R)`, the shared query kernel `U`.
        key_kernel: Array of shape `(D_k, R)`, the shared key kernel `V`.
        mixing: Array of shape `(H, R)`, the mixing matrix `M`.
        query_weight: Optional `(D_q, D_q)` symmetric PSD weight (query-side
            input second moment).
        key_weight: Optional `(D_k, D_k)` symmetric PSD weight (key-side
            input second moment).

    Returns:
        The relative error as a Python float.

    Example:

    >>> rng = np.random.default_rng(0)
    >>> query_kernels = rng.standard_normal((2, 6, 3))
    >>> key_kernels = rng.standard_normal((2, 5, 3))
    >>> result = collaborative_cp(query_kernels, key_kernels, rank=6)
    >>> error = relative_error(query_kernels, key_kernels,
    ...                        result.query_kernel, result.key_kernel,
    ...                        result.mixing)
    >>> bool(error < 1e-12)
    True
    """
    query_kernels, key_kernels = validate_kernels(query_kernels, key_kernels)
    num_heads, query_dim, _ = query_kernels.shape
    key_dim = key_kernels.shape[1]
    query_kernel, key_kernel, mixing = validate_factors(
        query_kernel, key_kernel, mixing, num_heads, query_dim, key_dim
    )
    query_weight = validate_weight(query_weight, query_dim, "query_weight")
    key_weight = validate_weight(key_weight, key_dim, "key_weight")
    return _weighted_relative_error(
        query_kernels,
        key_kernels,
        query_kernel,
        key_kernel,
        mixing,
        query_weight,
        key_weight,
    )


def rank_for_target_error(
    query_kernels,
    key_kernels,
    target_error,
    *,
    query_weight=None,
    key_weight=None,
    candidates=None,
    seed=0,
    tol=1e-7,
    max_iter=500,
):
    """Smallest rank whose collaborative decomposition meets an error target.

    Binary-searches the candidate ranks (assuming, as holds for ALS fits in
    practice, that the error does not grow with the rank), running
    `collaborative_cp` at `O(log n)` of them. The full rank `H * d_k` is
    always a candidate of last resort, where the error is zero.

    Args:
        query_kernels: Array of shape `(H, D_q, d_k)`, the kernels `A_h`.
        key_kernels: Array of shape `(H, D_k, d_k)`, the kernels `B_h`.
        target_error: Float in `(0, 1)`, the largest acceptable relative
            error (in the weighted metric when weights are given).
        query_weight: Optional `(D_q, D_q)` query-side input second moment.
        key_weight: Optional `(D_k, D_k)` key-side input second moment.
        candidates: Optional iterable of integer ranks in `[1, H * d_k]`.
            Defaults to the multiples of `d_k` up to `H * d_k`.
        seed: Seed forwarded to `collaborative_cp`.
        tol: Tolerance forwarded to `collaborative_cp`.
        max_iter: Iteration limit forwarded to `collaborative_cp`.

    Returns:
        The `CPResult` of the smallest candidate rank found to meet the
        target. Its rank is `result.mixing.shape[1]`.

    Example:

    >>> rng = np.random.default_rng(0)
    >>> query_kernels = rng.standard_normal((4, 16, 8))
    >>> key_kernels = rng.standard_normal((4, 16, 8))
    >>> result = rank_for_target_error(query_kernels, key_kernels, 0.5)
    >>> bool(result.relative_error <= 0.5)
    True
    """
    query_kernels, key_kernels = validate_kernels(query_kernels, key_kernels)
    num_heads, _, head_dim = query_kernels.shape
    full_rank = num_heads * head_dim
    if isinstance(target_error, bool) or not isinstance(
        target_error, (int, float, np.integer, np.floating)
    ):
        raise ValueError(
            "`target_error` must be a float in (0, 1); received "
            f"{target_error!r}."
        )
    if not 0.0 < float(target_error) < 1.0:
        raise ValueError(
            f"`target_error` must be in the open interval (0, 1); received "
            f"{target_error}."
        )
    ranks = candidate_ranks(candidates, head_dim, full_rank)

    def fit(rank):
        return collaborative_cp(
            query_kernels,
            key_kernels,
            rank,
            query_weight=query_weight,
            key_weight=key_weight,
            tol=tol,
            max_iter=max_iter,
            seed=seed,
        )

    # Invariant: every rank below ranks[low] was seen to miss the target, and
    # ranks[high] meets it (the full rank does by construction).
    low, high = 0, len(ranks) - 1
    best = None
    while low < high:
        middle = (low + high) // 2
        result = fit(ranks[middle])
        if result.relative_error <= target_error:
            high, best = middle, result
        else:
            low = middle + 1
    return best if best is not None else fit(ranks[high])


class _FactoredProblem:
    """The tensor `T_h = A_h B_h^T`, held only through its factors.

    The per-head kernels are also stored side by side (`[A_1 ... A_H]`, of
    shape `(D, H * d_k)`) so that each ALS contraction over all heads is one
    large matrix product instead of `H` small ones.
    """

    def __init__(self, query_kernels, key_kernels):
        self.query_kernels = query_kernels
        self.key_kernels = key_kernels
        self.num_heads, _, self.head_dim = query_kernels.shape
        self.query_columns = _heads_side_by_side(query_kernels)
        self.key_columns = _heads_side_by_side(key_kernels)
        self.norm_sq = _tensor_norm_sq(query_kernels, key_kernels)
        if self.norm_sq == 0.0:
            raise ValueError(
                "The attention tensor A_h B_h^T is zero for every head (in "
                "the weighted metric if weights were given), so no relative "
                "error can be defined."
            )

    def project_on_keys(self, key_kernel):
        """`P_h = B_h^T V` for every head, shape `(H, d_k, R)`."""
        return self._project(self.key_columns, key_kernel)

    def project_on_queries(self, query_kernel):
        """`Q_h = A_h^T U` for every head, shape `(H, d_k, R)`."""
        return self._project(self.query_columns, query_kernel)

    def query_numerator(self, key_projections, mixing):
        """MTTKRP of the query mode: `sum_h A_h (P_h * M[h])`."""
        return self._contract(self.query_columns, key_projections, mixing)

    def key_numerator(self, query_projections, mixing):
        """MTTKRP of the key mode: `sum_h B_h (Q_h * M[h])`."""
        return self._contract(self.key_columns, query_projections, mixing)

    @staticmethod
    def mixing_numerator(query_projections, key_projections):
        """MTTKRP of the head mode: `sum_i Q_h[i, r] P_h[i, r]`, `(H, R)`."""
        return np.einsum("hir,hir->hr", query_projections, key_projections)

    def _project(self, columns, kernel):
        projections = columns.T @ kernel
        return projections.reshape(self.num_heads, self.head_dim, -1)

    def _contract(self, columns, projections, mixing):
        weighted = projections * mixing[:, None, :]
        return columns @ weighted.reshape(self.num_heads * self.head_dim, -1)


def _run_als(problem, query_kernel, key_kernel, tol, max_iter):
    """Alternates exact least-squares updates of `U`, `V` and `M`.

    Each update minimises the error over one factor with the other two fixed,
    so the error never increases (up to round-off and the tiny ridge). `U`
    and `V` are rescaled to unit columns after their updates, leaving all
    scale in `M`; otherwise the scale can drift between factors over many
    sweeps until the normal equations are badly conditioned.

    Returns:
        `(U, V, M, iterations, converged)`.
    """
    query_kernel = _unit_columns(query_kernel)
    key_kernel = _unit_columns(key_kernel)
    key_projections = problem.project_on_keys(key_kernel)
    query_projections = problem.project_on_queries(query_kernel)
    mixing, error = _update_mixing(
        problem, query_kernel, key_kernel, query_projections, key_projections
    )

    iterations = 0
    converged = error <= _EXACT_FIT_ERROR
    while not converged and iterations < max_iter:
        iterations += 1
        gram = (mixing.T @ mixing) * (key_kernel.T @ key_kernel)
        query_kernel = _unit_columns(
            _solve_normal_equations(
                problem.query_numerator(key_projections, mixing), gram
            )
        )
        query_projections = problem.project_on_queries(query_kernel)

        gram = (mixing.T @ mixing) * (query_kernel.T @ query_kernel)
        key_kernel = _unit_columns(
            _solve_normal_equations(
                problem.key_numerator(query_projections, mixing), gram
            )
        )
        key_projections = problem.project_on_keys(key_kernel)

        previous_error = error
        mixing, error = _update_mixing(
            problem,
            query_kernel,
            key_kernel,
            query_projections,
            key_projections,
        )
        # A sweep that fails to improve (round-off can make it slightly
        # worse) has converged just as much as one that improves too little.
        converged = (
            previous_error - error < tol * previous_error
            or error <= _EXACT_FIT_ERROR
        )
    return query_kernel, key_kernel, mixing, iterations, converged


def _update_mixing(
    problem, query_kernel, key_kernel, query_projections, key_projections
):
    """Least-squares `M` given `U`, `V`; returns it with the new error.

    The error comes almost for free from quantities the update already has:
    `<T, T_hat> = sum(M * numerator)` and `||T_hat||^2 = sum(M * (M G))`.
    Near a perfect fit that expansion is dominated by cancellation, so the
    exact factored residual is used there instead.
    """
    numerator = problem.mixing_numerator(query_projections, key_projections)
    gram = (query_kernel.T @ query_kernel) * (key_kernel.T @ key_kernel)
    mixing = _solve_normal_equations(numerator, gram)
    error_sq = (
        problem.norm_sq
        - 2.0 * np.sum(mixing * numerator)
        + np.sum(mixing * (mixing @ gram))
    )
    if error_sq < _EXPANSION_TRUST_LIMIT * problem.norm_sq:
        error_sq = _residual_norm_sq(
            problem.query_kernels,
            problem.key_kernels,
            query_kernel,
            key_kernel,
            mixing,
        )
    return mixing, math.sqrt(max(error_sq, 0.0) / problem.norm_sq)


def _solve_normal_equations(numerator, gram):
    """Solves `X gram = numerator` for `X`, with `gram` symmetric PSD.

    A ridge relative to the Gram's scale keeps the system non-singular for
    rank-deficient factors (LU with partial pivoting is backward stable on
    such a well-posed SPD system); should it still be singular, fall back to
    the minimum-norm least-squares solution.
    """
    size = gram.shape[0]
    ridge = _RIDGE * max(np.trace(gram) / size, np.finfo(np.float64).tiny)
    regularised = gram + ridge * np.eye(size)
    try:
        solution = np.linalg.solve(regularised, numerator.T)
    except np.linalg.LinAlgError:
        solution = np.linalg.lstsq(regularised, numerator.T, rcond=None)[0]
    return solution.T


def _unit_columns(matrix):
    """Rescales the non-zero columns of `matrix` to unit Euclidean norm."""
    norms = np.linalg.norm(matrix, axis=0)
    return matrix / np.where(norms > 0.0, norms, 1.0)


def _spectral_init(kernels, other_kernels, rank, rng):
    """Leading left singular vectors of the tensor unfolding along one mode.

    The unfolding `[A_1 B_1^T, ..., A_H B_H^T]` has the same left singular
    vectors as `[A_1 R_1^T, ..., A_H R_H^T]` with `B_h = Q_h R_h` (QR), which
    is only `D x H d_k`. Columns beyond what the SVD provides (`rank > D`)
    are filled with seeded Gaussian directions.
    """
    num_heads, dim, _ = kernels.shape
    other_triangles = np.linalg.qr(other_kernels, mode="r")
    compressed = kernels @ np.swapaxes(other_triangles, 1, 2)
    singular_vectors = np.linalg.svd(
        _heads_side_by_side(compressed), full_matrices=False
    )[0][:, :rank]
    # The sign of a singular vector is arbitrary; fix it so the result does
    # not depend on the LAPACK build.
    peaks = np.argmax(np.abs(singular_vectors), axis=0)
    signs = np.sign(
        singular_vectors[peaks, np.arange(singular_vectors.shape[1])]
    )
    singular_vectors = singular_vectors * np.where(signs == 0, 1.0, signs)
    missing = rank - singular_vectors.shape[1]
    if missing > 0:
        random_columns = _unit_columns(rng.standard_normal((dim, missing)))
        singular_vectors = np.concatenate(
            [singular_vectors, random_columns], axis=1
        )
    return singular_vectors


def _balance_factors(query_kernel, key_kernel, mixing):
    """Puts the factors' free scales into a canonical, balanced form.

    `U diag(M[h]) V^T` is unchanged by rescaling a column of any factor if
    another absorbs the inverse. Choose: the largest-magnitude entry of each
    mixing column is `+1` (like the 0/1 concatenate solution) and the query
    and key columns carry the rest of the scale with equal norms, so that
    neither kernel's activations dwarf the other's.
    """
    query_kernel, key_kernel, mixing = (
        query_kernel.copy(),
        key_kernel.copy(),
        mixing.copy(),
    )
    peak_rows = np.argmax(np.abs(mixing), axis=0)
    peaks = mixing[peak_rows, np.arange(mixing.shape[1])]
    query_norms = np.linalg.norm(query_kernel, axis=0)
    key_norms = np.linalg.norm(key_kernel, axis=0)
    for column, peak in enumerate(peaks):
        if peak == 0.0:
            continue  # The component is unused; nothing to balance.
        mixing[:, column] /= peak
        query_norm, key_norm = query_norms[column], key_norms[column]
        if query_norm > 0.0 and key_norm > 0.0:
            query_scale = math.sqrt(abs(peak) * key_norm / query_norm)
            key_scale = math.sqrt(abs(peak) * query_norm / key_norm)
        else:
            query_scale, key_scale = abs(peak), 1.0
        query_kernel[:, column] *= math.copysign(query_scale, peak)
        key_kernel[:, column] *= key_scale
    return query_kernel, key_kernel, mixing


def _concatenate_solution(query_kernels, key_kernels, query_weight, key_weight):
    """Exact full-rank factors: every head keeps its own block of columns."""
    num_heads, _, head_dim = query_kernels.shape
    query_kernel = _heads_side_by_side(query_kernels)
    key_kernel = _heads_side_by_side(key_kernels)
    mixing = np.kron(np.eye(num_heads), np.ones((1, head_dim)))
    error = _weighted_relative_error(
        query_kernels,
        key_kernels,
        query_kernel,
        key_kernel,
        mixing,
        query_weight,
        key_weight,
    )
    return CPResult(
        query_kernel=query_kernel,
        key_kernel=key_kernel,
        mixing=mixing,
        relative_error=error,
        iterations=0,
        converged=True,
    )


def _weighted_relative_error(
    query_kernels,
    key_kernels,
    query_kernel,
    key_kernel,
    mixing,
    query_weight,
    key_weight,
):
    """Relative error, in the metric defined by the (undamped) weights."""
    query_root = psd_square_root(query_weight)
    key_root = psd_square_root(key_weight)
    if query_root is not None:
        query_kernels = _left_multiply_heads(query_root, query_kernels)
        query_kernel = query_root @ query_kernel
    if key_root is not None:
        key_kernels = _left_multiply_heads(key_root, key_kernels)
        key_kernel = key_root @ key_kernel
    norm_sq = _tensor_norm_sq(query_kernels, key_kernels)
    if norm_sq == 0.0:
        raise ValueError(
            "The attention tensor A_h B_h^T is zero for every head (in the "
            "weighted metric if weights were given), so no relative error "
            "can be defined."
        )
    residual_sq = _residual_norm_sq(
        query_kernels, key_kernels, query_kernel, key_kernel, mixing
    )
    return math.sqrt(residual_sq / norm_sq)


def _tensor_norm_sq(query_kernels, key_kernels):
    """`sum_h ||A_h B_h^T||_F^2`, as `sum_h ||R_{A_h} R_{B_h}^T||_F^2`.

    With thin QR factorisations `A_h = Q R_A`, `B_h = Q' R_B` the orthonormal
    factors drop out of the norm, which leaves a `d_k x d_k` product per
    head; unlike `trace((A^T A)(B^T B))` it stays accurate when `A_h B_h^T`
    is small compared with `||A_h|| ||B_h||`.
    """
    query_triangles = np.linalg.qr(query_kernels, mode="r")
    key_triangles = np.linalg.qr(key_kernels, mode="r")
    cores = query_triangles @ np.swapaxes(key_triangles, 1, 2)
    return float(np.sum(cores * cores))


def _residual_norm_sq(
    query_kernels, key_kernels, query_kernel, key_kernel, mixing
):
    """`sum_h ||A_h B_h^T - U diag(M[h]) V^T||_F^2`, exactly and cheaply.

    Write `A_h = Q_U C_h + W_h R_h` with `Q_U` an orthonormal basis of
    `range(U)` and `W_h` one of the part of `A_h` outside it (so
    `[Q_U, W_h]` is orthonormal), `U = Q_U R_U`, and likewise on the key
    side. Then the residual of head `h` is `[Q_U, W_h] K_h [Q_V, W'_h]^T`
    with the small core
    `K_h = [[C_h C'_h^T - R_U diag(M[h]) R_V^T, C_h R'_h^T],
            [R_h C'_h^T,                         R_h R'_h^T]]`,
    whose Frobenius norm is the residual's. The core is formed directly,
    not as a difference of squared norms, so it keeps full relative
    precision even when the fit is nearly exact.
    """
    query_basis, query_triangle = np.linalg.qr(query_kernel)
    key_basis, key_triangle = np.linalg.qr(key_kernel)
    query_inside, query_outside = _split_along_basis(query_basis, query_kernels)
    key_inside, key_outside = _split_along_basis(key_basis, key_kernels)

    fitted = np.einsum(
        "ir,hr,jr->hij", query_triangle, mixing, key_triangle, optimize=True
    )
    top_left = query_inside @ np.swapaxes(key_inside, 1, 2) - fitted
    top_right = query_inside @ np.swapaxes(key_outside, 1, 2)
    bottom_left = query_outside @ np.swapaxes(key_inside, 1, 2)
    bottom_right = query_outside @ np.swapaxes(key_outside, 1, 2)
    return float(
        sum(
            np.sum(block * block)
            for block in (top_left, top_right, bottom_left, bottom_right)
        )
    )


def _split_along_basis(basis, kernels):
    """Coordinates of each head's kernel inside and outside `range(basis)`.

    Returns `(inside, outside)` of shapes `(H, k, d_k)` and `(H, p, d_k)`
    with `kernels[h] = basis @ inside[h] + W_h @ outside[h]` for some
    orthonormal `W_h` orthogonal to `basis`. The projection is repeated
    once ("twice is enough") because a single Gram-Schmidt pass loses
    orthogonality when most of a kernel lies inside the basis, which is
    exactly the well-fitted case.
    """
    inside = basis.T @ kernels
    remainder = kernels - basis @ inside
    correction = basis.T @ remainder
    inside = inside + correction
    remainder = remainder - basis @ correction
    outside = np.linalg.qr(remainder, mode="r")
    return inside, outside


def _left_multiply_heads(matrix, kernels):
    """`matrix @ kernels[h]` for every head; identity when `matrix` is None."""
    if matrix is None:
        return kernels
    return matrix @ kernels


def _heads_side_by_side(kernels):
    """`(H, D, d)` -> `(D, H * d)`: `[K_1 K_2 ... K_H]` along columns."""
    num_heads, dim, head_dim = kernels.shape
    return np.ascontiguousarray(
        np.transpose(kernels, (1, 0, 2)).reshape(dim, num_heads * head_dim)
    )
