"""Argument checks shared by the decomposition functions.

Each raises a `ValueError` that names the argument and what was received.
"""

import numpy as np

# Tolerance on the asymmetry / negativity accepted from weight matrices,
# relative to their largest absolute entry (they are usually averaged in
# float32 by the caller).
WEIGHT_CHECK_TOLERANCE = 1e-5


def validate_kernels(query_kernels, key_kernels):
    query_kernels = as_float_array(query_kernels, "query_kernels")
    key_kernels = as_float_array(key_kernels, "key_kernels")
    for name, kernels, layout in (
        ("query_kernels", query_kernels, "(H, D_q, d_k)"),
        ("key_kernels", key_kernels, "(H, D_k, d_k)"),
    ):
        if kernels.ndim != 3:
            raise ValueError(
                f"`{name}` must be a 3D array of shape {layout}; received "
                f"shape {kernels.shape}."
            )
        if 0 in kernels.shape:
            raise ValueError(
                f"`{name}` must have no empty dimension; received shape "
                f"{kernels.shape}."
            )
    if query_kernels.shape[0] != key_kernels.shape[0]:
        raise ValueError(
            "`query_kernels` and `key_kernels` must have the same number of "
            f"heads; received {query_kernels.shape[0]} and "
            f"{key_kernels.shape[0]} (shapes {query_kernels.shape} and "
            f"{key_kernels.shape})."
        )
    if query_kernels.shape[2] != key_kernels.shape[2]:
        raise ValueError(
            "`query_kernels` and `key_kernels` must have the same key "
            f"dimension d_k (last axis); received {query_kernels.shape[2]} "
            f"and {key_kernels.shape[2]}."
        )
    return query_kernels, key_kernels


def validate_factors(
    query_kernel, key_kernel, mixing, num_heads, query_dim, key_dim
):
    query_kernel = as_float_array(query_kernel, "query_kernel")
    key_kernel = as_float_array(key_kernel, "key_kernel")
    mixing = as_float_array(mixing, "mixing")
    for name, factor in (
        ("query_kernel", query_kernel),
        ("key_kernel", key_kernel),
        ("mixing", mixing),
    ):
        if factor.ndim != 2:
            raise ValueError(
                f"`{name}` must be a 2D array; received shape {factor.shape}."
            )
    rank = mixing.shape[1]
    expected = {
        "query_kernel": (query_kernel, (query_dim, rank)),
        "key_kernel": (key_kernel, (key_dim, rank)),
        "mixing": (mixing, (num_heads, rank)),
    }
    for name, (factor, shape) in expected.items():
        if rank < 1 or factor.shape != shape:
            raise ValueError(
                f"`{name}` must have shape {shape} (rank R={rank} taken from "
                f"`mixing`); received shape {factor.shape}."
            )
    return query_kernel, key_kernel, mixing


def validate_rank(rank, full_rank):
    if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)):
        raise ValueError(f"`rank` must be an integer; received {rank!r}.")
    if not 1 <= rank <= full_rank:
        raise ValueError(
            f"`rank` must be between 1 and H * d_k = {full_rank}; received "
            f"{rank}."
        )
    return int(rank)


def validate_tol(tol):
    if (
        isinstance(tol, bool)
        or not isinstance(tol, (int, float, np.integer, np.floating))
        or not tol >= 0.0
    ):
        raise ValueError(
            f"`tol` must be a non-negative float; received {tol!r}."
        )
    return float(tol)


def validate_max_iter(max_iter):
    if (
        isinstance(max_iter, bool)
        or not isinstance(max_iter, (int, np.integer))
        or max_iter < 0
    ):
        raise ValueError(
            f"`max_iter` must be a non-negative integer; received {max_iter!r}."
        )
    return int(max_iter)


def validate_weight(weight, dim, name):
    """Checks a second-moment weight; returns it symmetrised, or `None`."""
    if weight is None:
        return None
    weight = as_float_array(weight, name)
    if weight.shape != (dim, dim):
        raise ValueError(
            f"`{name}` must have shape ({dim}, {dim}) to match the kernels; "
            f"received shape {weight.shape}."
        )
    scale = np.max(np.abs(weight))
    if scale == 0.0:
        raise ValueError(f"`{name}` must not be all zeros.")
    if np.max(np.abs(weight - weight.T)) > WEIGHT_CHECK_TOLERANCE * scale:
        raise ValueError(f"`{name}` must be symmetric.")
    weight = (weight + weight.T) / 2
    if np.linalg.eigvalsh(weight)[0] < -WEIGHT_CHECK_TOLERANCE * scale:
        raise ValueError(f"`{name}` must be positive semi-definite.")
    return weight


def validate_mask(mask, shape):
    mask = np.asarray(mask)
    if mask.shape != tuple(shape):
        raise ValueError(
            f"`mask` must have shape {tuple(shape)} to match `inputs`; "
            f"received shape {mask.shape}."
        )
    if mask.dtype != bool:
        raise ValueError(
            f"`mask` must be boolean; received dtype {mask.dtype}."
        )
    return mask


def candidate_ranks(candidates, head_dim, full_rank):
    """Sorted unique candidate ranks, ending with the full rank."""
    if candidates is None:
        return list(range(head_dim, full_rank + 1, head_dim))
    ranks = []
    for candidate in candidates:
        if (
            isinstance(candidate, bool)
            or not isinstance(candidate, (int, np.integer))
            or not 1 <= candidate <= full_rank
        ):
            raise ValueError(
                "`candidates` must hold integer ranks between 1 and "
                f"H * d_k = {full_rank}; received {candidate!r}."
            )
        ranks.append(int(candidate))
    return sorted(set(ranks) | {full_rank})


def as_float_array(value, name):
    try:
        array = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError) as error:
        raise ValueError(
            f"`{name}` must be convertible to a float array."
        ) from error
    if not np.all(np.isfinite(array)):
        raise ValueError(f"`{name}` contains non-finite values.")
    return array
