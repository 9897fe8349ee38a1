"""The published baseline: TensorLy PARAFAC on the full attention tensor."""

import numpy as np

from keras_collab.decomposition._checks import validate_kernels
from keras_collab.decomposition._checks import validate_rank
from keras_collab.decomposition._checks import validate_tol
from keras_collab.decomposition.cp import CPResult
from keras_collab.decomposition.cp import relative_error


def reference_parafac(
    query_kernels,
    key_kernels,
    rank,
    *,
    init="random",
    seed=0,
    tol=1e-7,
    n_iter_max=500,
):
    """Published baseline: TensorLy PARAFAC on the full attention tensor.

    Forms the `D_q x H x D_k` tensor `T` explicitly and decomposes it with
    `tensorly.decomposition.parafac`, as the reference implementation of
    Cordonnier et al. does. Meant for comparisons and tests; prefer
    `collaborative_cp`, which gives the same kind of factors without the
    `D_q H D_k` memory and per-sweep cost.

    Args:
        query_kernels: Array of shape `(H, D_q, d_k)`, the kernels `A_h`.
        key_kernels: Array of shape `(H, D_k, d_k)`, the kernels `B_h`.
        rank: Integer `R` between 1 and `H * d_k`.
        init: `"random"` (as in the paper's code) or `"svd"`, forwarded to
            `parafac`.
        seed: Integer `random_state` forwarded to `parafac`.
        tol: TensorLy's tolerance: it stops once the relative error changes
            by less than `tol` in absolute terms between sweeps.
        n_iter_max: Maximum number of sweeps.

    Returns:
        A `CPResult` whose `mixing` absorbs TensorLy's component weights and
        whose `relative_error` is recomputed exactly by `relative_error`.

    Raises:
        ImportError: If TensorLy is not installed (install the
            `keras-collab[reference]` extra).

    Example:

    >>> rng = np.random.default_rng(0)
    >>> query_kernels = rng.standard_normal((2, 6, 3))
    >>> key_kernels = rng.standard_normal((2, 5, 3))
    >>> result = reference_parafac(query_kernels, key_kernels, rank=4)
    >>> result.mixing.shape
    (2, 4)
    """
    query_kernels, key_kernels = validate_kernels(query_kernels, key_kernels)
    num_heads, _, head_dim = query_kernels.shape
    rank = validate_rank(rank, num_heads * head_dim)
    tol = validate_tol(tol)
    if init not in ("random", "svd"):
        raise ValueError(
            f"`init` must be 'random' or 'svd'; received {init!r}."
        )
    if (
        isinstance(n_iter_max, bool)
        or not isinstance(n_iter_max, (int, np.integer))
        or n_iter_max < 1
    ):
        raise ValueError(
            f"`n_iter_max` must be a positive integer; received {n_iter_max!r}."
        )
    try:
        import tensorly
        from tensorly.decomposition import parafac
    except ImportError as error:
        raise ImportError(
            "`reference_parafac` requires TensorLy. Install it with "
            "`pip install keras-collab[reference]` (or `pip install tensorly`)."
        ) from error

    full_tensor = np.einsum("hik,hjk->ihj", query_kernels, key_kernels)
    with tensorly.backend_context("numpy"):
        (weights, factors), errors = parafac(
            tensorly.tensor(full_tensor),
            rank,
            init=init,
            random_state=int(seed),
            tol=tol,
            n_iter_max=int(n_iter_max),
            return_errors=True,
        )
    query_kernel, head_factor, key_kernel = (
        np.asarray(factor, dtype=np.float64) for factor in factors
    )
    mixing = head_factor * np.asarray(weights, dtype=np.float64)[None, :]
    errors = [float(error) for error in errors]
    converged = len(errors) >= 2 and abs(errors[-2] - errors[-1]) < tol
    error = relative_error(
        query_kernels, key_kernels, query_kernel, key_kernel, mixing
    )
    return CPResult(
        query_kernel=query_kernel,
        key_kernel=key_kernel,
        mixing=mixing,
        relative_error=error,
        iterations=len(errors),
        converged=converged,
    )
