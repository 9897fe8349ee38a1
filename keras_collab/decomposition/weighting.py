"""Activation weighting: input second moments and their square roots.

An activation-aware decomposition minimises the error of the logits on real
inputs, `sum_h ||S_q^{1/2} (T_h - T_hat_h) S_k^{1/2}||_F^2`, where `S_q` and
`S_k` are the second moments of the layer's query-side and key-side inputs.
"""

import numpy as np

from keras_collab.decomposition._checks import validate_mask

# Relative diagonal loading (times the mean diagonal entry) applied to a
# weight matrix before its inverse square root maps a weighted solution back.
# Input second moments of trained networks are often nearly singular (dead
# or constant features); without loading, `S^{-1/2}` would amplify those
# directions by orders of magnitude and blow up the returned kernels.
WEIGHT_DAMPING = 1e-6


# Eigenvalues of a damped weight below this fraction of the largest one are
# raised to it, so that the inverse square root stays finite even when the
# mean diagonal (and hence the damping) is dominated by a few directions.
_WEIGHT_EIGENVALUE_FLOOR = 1e-12


def second_moment(inputs, mask=None, center_per_sequence=False):
    """Second moment `E[x x^T]` of layer inputs over valid tokens.

    This is the weight `collaborative_cp` expects for `query_weight` and
    `key_weight`. For the key side, pass `center_per_sequence=True`: adding
    the same vector to every key of a sequence shifts all logits of a query
    by one constant, which the softmax cancels, so only the key variation
    within a sequence matters.

    Args:
        inputs: Array of shape `(N, S, D)` (batches of sequences) or `(N, D)`
            (independent tokens). Anything `np.asarray` accepts, e.g. a
            backend tensor on the CPU.
        mask: Optional boolean array of shape `(N, S)` (or `(N,)` for 2D
            inputs), `True` for valid (non-padding) tokens. Defaults to all
            tokens valid.
        center_per_sequence: If `True`, subtract each sequence's mean over
            its valid tokens before accumulating. Requires 3D inputs.

    Returns:
        Float64 array of shape `(D, D)`: the sum of `x x^T` over valid tokens
        divided by their number.

    Example:

    >>> rng = np.random.default_rng(0)
    >>> hidden = rng.standard_normal((8, 10, 4))
    >>> mask = np.ones((8, 10), dtype=bool)
    >>> mask[:, 7:] = False  # Padding.
    >>> second_moment(hidden, mask, center_per_sequence=True).shape
    (4, 4)
    """
    inputs = np.asarray(inputs, dtype=np.float64)
    if inputs.ndim == 2:
        if center_per_sequence:
            raise ValueError(
                "`center_per_sequence=True` needs `inputs` of shape (N, S, D); "
                f"received inputs of shape {inputs.shape}."
            )
        # Independent tokens are sequences of length one.
        inputs = inputs[:, None, :]
        if mask is not None:
            mask = validate_mask(mask, (inputs.shape[0],))[:, None]
    elif inputs.ndim == 3:
        if mask is not None:
            mask = validate_mask(mask, inputs.shape[:2])
    else:
        raise ValueError(
            "`inputs` must have shape (N, S, D) or (N, D); received shape "
            f"{inputs.shape}."
        )
    if not np.all(np.isfinite(inputs)):
        raise ValueError("`inputs` contains non-finite values.")
    if mask is None:
        mask = np.ones(inputs.shape[:2], dtype=bool)

    num_valid = int(mask.sum())
    if num_valid == 0:
        raise ValueError("`mask` selects no valid token.")
    valid = mask[..., None].astype(np.float64)
    if center_per_sequence:
        counts = mask.sum(axis=1, keepdims=True)[..., None]
        # Fully padded sequences have no mean; their tokens are all masked
        # out below anyway, so any finite placeholder works.
        means = (inputs * valid).sum(axis=1, keepdims=True) / np.maximum(
            counts, 1
        )
        inputs = inputs - means
    tokens = (inputs * valid).reshape(-1, inputs.shape[-1])
    moment = tokens.T @ tokens / num_valid
    # Exactly symmetric, so it passes the weight validation bit for bit.
    return (moment + moment.T) / 2


def psd_square_root(weight):
    """Symmetric square root of a PSD matrix (tiny negative eigenvalues of
    a numerically PSD input are clipped to zero); `None` passes through."""
    if weight is None:
        return None
    eigenvalues, eigenvectors = np.linalg.eigh(weight)
    roots = np.sqrt(np.clip(eigenvalues, 0.0, None))
    return (eigenvectors * roots) @ eigenvectors.T


def damped_roots(weight):
    """`(S^{1/2}, S^{-1/2})` of the damped weight `S + damping * mean(diag S)`.

    Both come from one symmetric eigendecomposition. `(None, None)` when no
    weight is given.
    """
    if weight is None:
        return None, None
    size = weight.shape[0]
    loading = WEIGHT_DAMPING * np.trace(weight) / size
    eigenvalues, eigenvectors = np.linalg.eigh(weight + loading * np.eye(size))
    floor = _WEIGHT_EIGENVALUE_FLOOR * max(eigenvalues.max(), 0.0)
    eigenvalues = np.maximum(eigenvalues, max(floor, np.finfo(np.float64).tiny))
    roots = np.sqrt(eigenvalues)
    root = (eigenvectors * roots) @ eigenvectors.T
    inverse_root = (eigenvectors / roots) @ eigenvectors.T
    return root, inverse_root
