"""Re-parametrization of one multi-head attention layer into collaborative form.

A Keras `MultiHeadAttention` layer's logits for head `h` are
`(x W_Q^h + b_Q^h)(y W_K^h + b_K^h)ᵀ / sqrt(key_dim)`. Expanded, only two
terms vary along the keys, which is all softmax sees:

* `x W_Q^h W_K^hᵀ yᵀ`: the bilinear part, re-parametrized here as
  `x W̃_Q diag(m_h) W̃_Kᵀ yᵀ` by a CP decomposition of the per-head products
  (`keras_collab.decomposition`);
* `b_Q^h W_K^hᵀ yᵀ`: the query bias seen through the key projection, carried
  exactly by the content bias `c_h = W_K^h b_Q^h`.

The key bias only shifts each query's logits by a constant and is dropped.
Values and output projections are copied unchanged. At full size
(`shared_key_dim == num_heads * key_dim`) no decomposition is needed: the
projections are concatenated and the layer is exactly the original.
"""

import dataclasses
import time

import keras
import numpy as np

from keras_collab import decomposition
from keras_collab.conversion.calibration import as_statistics
from keras_collab.layers import CachedCollaborativeMultiHeadAttention
from keras_collab.layers import CollaborativeMultiHeadAttention
from keras_collab.layers import CollaborativeQueryKey


@dataclasses.dataclass
class AttentionConversion:
    """The outcome of converting one attention layer.

    Attributes:
        layer: The new, built `CollaborativeMultiHeadAttention`.
        shared_key_dim: The D̃ used.
        relative_error: Relative Frobenius error of the re-parametrized
            bilinear forms (activation-weighted when calibrated); 0 at full
            size.
        iterations: ALS iterations run.
        seconds: Wall time of the conversion.
        qk_params_before: Query/key parameters of the original layer.
        qk_params_after: Query/key parameters of the collaborative layer
            (projections, biases, mixing and content bias).
    """

    layer: CollaborativeMultiHeadAttention
    shared_key_dim: int
    relative_error: float
    iterations: int
    seconds: float
    qk_params_before: int
    qk_params_after: int


def is_convertible(layer):
    """Keras MHA and its subclasses, except collaborative ones."""
    return isinstance(
        layer, keras.layers.MultiHeadAttention
    ) and not isinstance(layer, CollaborativeMultiHeadAttention)


def is_collaborative(layer):
    return isinstance(layer, CollaborativeMultiHeadAttention)


def collaborative_class_for(layer):
    """The collaborative class that can stand in for `layer`: the cached
    one for layers that follow KerasHub's cached-attention call contract
    (recognised by class name, so that this needs no KerasHub import)."""
    cached = any(
        cls.__name__ == "CachedMultiHeadAttention"
        for cls in type(layer).__mro__
    )
    if cached:
        return CachedCollaborativeMultiHeadAttention
    return CollaborativeMultiHeadAttention


def full_shared_key_dim(mha):
    """`num_heads * key_dim`: the D̃ at which collaboration is exact."""
    return mha.num_heads * mha.key_dim


def parse_shared_key_dim(spec):
    """Checks a user's D̃ before any layer is known.

    Args:
        spec: `None` (full size), an integer, a float in (0, 1] read as a
            fraction of `num_heads * key_dim` (1.0: full size), a whole
            float above 1 (a size), or a string of one of those ("96",
            "0.5"; a string with a "." is a float).

    Returns:
        `None`, a positive `int` size, or a `float` fraction in (0, 1].

    Raises:
        ValueError: naming `shared_key_dim` and what was received.
    """
    if spec is None:
        return None
    if isinstance(spec, str):
        try:
            number = float(spec)
        except ValueError:
            raise ValueError(
                "`shared_key_dim` must be an integer or a fraction. "
                f"Received: shared_key_dim={spec!r}"
            ) from None
        spec = number if "." in spec or not number.is_integer() else int(number)
    if isinstance(spec, bool) or not isinstance(
        spec, (int, float, np.integer, np.floating)
    ):
        raise ValueError(
            f"`shared_key_dim` must be a number. Received: {spec!r}"
        )
    if spec <= 0:
        raise ValueError(
            "`shared_key_dim` must be positive. Received: "
            f"shared_key_dim={spec}"
        )
    if isinstance(spec, (float, np.floating)):
        if 0.0 < spec <= 1.0:
            return float(spec)
        if not float(spec).is_integer():
            raise ValueError(
                "A fractional `shared_key_dim` must lie in (0, 1]. "
                f"Received: shared_key_dim={spec}"
            )
    return int(spec)


def resolve_shared_key_dim(spec, mha):
    """Turns a user's `shared_key_dim` into an integer D̃ for `mha`.

    Args:
        spec: Anything `parse_shared_key_dim` accepts.
        mha: The attention layer.

    Returns:
        The integer D̃, checked to lie in `[1, num_heads * key_dim]`.
    """
    full = full_shared_key_dim(mha)
    spec = parse_shared_key_dim(spec)
    if spec is None:
        return full
    if isinstance(spec, float):
        return max(1, int(round(spec * full)))
    if not 1 <= spec <= full:
        raise ValueError(
            f"`shared_key_dim` must lie in [1, num_heads * key_dim = {full}] "
            f"for layer '{mha.name}'. Received: shared_key_dim={spec}"
        )
    return spec


def per_head_kernels(mha):
    """Query and key kernels of `mha` as `(H, D_q, d_k)`, `(H, D_k, d_k)`."""
    query = keras.ops.convert_to_numpy(mha.query_dense.kernel)
    key = keras.ops.convert_to_numpy(mha.key_dense.kernel)
    return (
        np.transpose(query.astype("float64"), (1, 0, 2)),
        np.transpose(key.astype("float64"), (1, 0, 2)),
    )


def query_key_parameters(layer):
    """How many parameters the query/key side of an attention layer has:
    kernels and biases of a Keras MHA, `query_key_variables` of a
    collaborative layer."""
    if is_collaborative(layer):
        variables = layer.query_key_variables
    else:
        variables = [layer.query_dense.kernel, layer.key_dense.kernel]
        for dense in (layer.query_dense, layer.key_dense):
            if dense.bias is not None:
                variables.append(dense.bias)
    return int(sum(np.prod(v.shape) for v in variables))


def convert_attention(
    mha,
    shared_key_dim=None,
    *,
    calibration=None,
    target_error=None,
    layer_class=None,
    name=None,
    seed=0,
    tol=1e-7,
    max_iter=500,
):
    """Converts a built Keras MHA layer into a collaborative one.

    Args:
        mha: A built `keras.layers.MultiHeadAttention` (or subclass). It is
            never modified.
        shared_key_dim: D̃: `None` for full size (exact), an integer, or a
            fraction of `num_heads * key_dim`. Ignored when `target_error`
            is given.
        calibration: Optional description of the layer's real inputs: an
            `AttentionStatistics`, an array of self-attention inputs
            `(N, T, D)`, or a `(query_inputs, key_inputs)` pair for
            cross-attention. With it the decomposition minimises the error
            of the logits on that data instead of the error of the weights.
        target_error: Optional float in (0, 1): pick the smallest D̃ (a
            multiple of `key_dim`) whose relative error meets it.
        layer_class: The collaborative class to build (a subclass of
            `CollaborativeMultiHeadAttention`); by default the one that can
            stand in for `mha` (`collaborative_class_for`).
        name: Name of the new layer; defaults to `mha.name`.
        seed: Seed of the decomposition (it is deterministic).
        tol: Relative improvement under which ALS stops.
        max_iter: Maximum ALS iterations.

    Returns:
        An `AttentionConversion`.

    Example:

    >>> mha = keras.layers.MultiHeadAttention(num_heads=4, key_dim=8)
    >>> x = keras.random.normal((2, 5, 32))
    >>> _ = mha(x, x)
    >>> result = convert_attention(mha, shared_key_dim=16)
    >>> result.layer.shared_key_dim, result.relative_error < 1.0
    (16, True)
    """
    if not isinstance(mha, keras.layers.MultiHeadAttention):
        raise ValueError(
            "`mha` must be a keras.layers.MultiHeadAttention. Received: "
            f"{type(mha).__name__}"
        )
    if not mha.built:
        raise ValueError(
            f"Layer '{mha.name}' is not built: call it on data (or build the "
            "model) before converting it."
        )
    if is_collaborative(mha):
        raise ValueError(
            f"Layer '{mha.name}' is already collaborative; convert the "
            "original multi-head attention instead."
        )
    start = time.perf_counter()
    cp = _decompose(
        mha, shared_key_dim, calibration, target_error, seed, tol, max_iter
    )
    layer_class = layer_class or collaborative_class_for(mha)
    layer = layer_class.from_multi_head_attention(
        mha, query_key=_query_key_side(mha, cp), name=name
    )
    return AttentionConversion(
        layer=layer,
        shared_key_dim=layer.shared_key_dim,
        relative_error=float(cp.relative_error),
        iterations=int(cp.iterations),
        seconds=time.perf_counter() - start,
        qk_params_before=query_key_parameters(mha),
        qk_params_after=query_key_parameters(layer),
    )


def _decompose(
    mha, shared_key_dim, calibration, target_error, seed, tol, max_iter
):
    """The CP factors of `mha`'s per-head query/key products."""
    query_kernels, key_kernels = per_head_kernels(mha)
    weights = {}
    if calibration is not None:
        statistics = as_statistics(calibration)
        weights = dict(
            query_weight=statistics.query_moment,
            key_weight=statistics.key_moment,
        )
    solver = dict(seed=seed, tol=tol, max_iter=max_iter, **weights)
    if target_error is not None:
        return decomposition.rank_for_target_error(
            query_kernels, key_kernels, target_error, **solver
        )
    rank = resolve_shared_key_dim(shared_key_dim, mha)
    return decomposition.collaborative_cp(
        query_kernels, key_kernels, rank, **solver
    )


def _query_key_side(mha, cp):
    """The collaborative query/key weights from CP factors.

    At full size the factors are the concatenated heads, and the query bias
    stays in the shared projection. Below it, the query bias moves to the
    content bias `c_h = W_K^h b_Q^h`, exactly; the key bias is dropped
    (softmax cancels it).
    """
    rank = cp.query_kernel.shape[1]
    query_bias = content_bias = None
    if mha.query_dense.bias is not None:
        bias = keras.ops.convert_to_numpy(mha.query_dense.bias)
        if rank == full_shared_key_dim(mha):
            # Concatenated layout: head h owns columns [h*d_k, (h+1)*d_k).
            query_bias = np.reshape(bias, (-1,))
        else:
            _, key_kernels = per_head_kernels(mha)
            # (H, D_k, d_k) x (H, d_k) -> (D_k, H).
            content_bias = np.einsum(
                "hkd,hd->kh", key_kernels, bias.astype("float64")
            )
    return CollaborativeQueryKey(
        query_kernel=cp.query_kernel,
        key_kernel=cp.key_kernel,
        mixing=cp.mixing,
        query_bias=query_bias,
        content_bias=content_bias,
    )
