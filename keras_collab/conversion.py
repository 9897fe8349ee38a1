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
import inspect
import time

import keras
import numpy as np

from keras_collab import decomposition
from keras_collab.layers import CollaborativeMultiHeadAttention


@dataclasses.dataclass
class AttentionStatistics:
    """Second moments of the inputs an attention layer sees on real data.

    Attributes:
        query_moment: `(D_q, D_q)` second moment `E[x xᵀ]` of query inputs.
        key_moment: `(D_k, D_k)` second moment of key inputs, centred per
            sequence (a shift shared by every key of a sequence changes each
            query's logits by a constant, which softmax cancels).
        tokens: Number of (valid) query tokens the moments were estimated on.
    """

    query_moment: np.ndarray
    key_moment: np.ndarray
    tokens: int = 0


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


def as_statistics(calibration):
    """`AttentionStatistics` from statistics or from raw input activations."""
    if isinstance(calibration, AttentionStatistics):
        return calibration
    if isinstance(calibration, (tuple, list)) and len(calibration) == 2:
        query, key = (np.asarray(keras.ops.convert_to_numpy(x)) for x in calibration)
    else:
        query = key = np.asarray(keras.ops.convert_to_numpy(calibration))
    if query.ndim != 3 or key.ndim != 3:
        raise ValueError(
            "`calibration` activations must have shape (N, T, D). Received "
            f"shapes {query.shape} and {key.shape}."
        )
    return AttentionStatistics(
        query_moment=decomposition.second_moment(query),
        key_moment=decomposition.second_moment(key, center_per_sequence=True),
        tokens=query.shape[0] * query.shape[1],
    )


def full_shared_key_dim(mha):
    """`num_heads * key_dim`: the D̃ at which collaboration is exact."""
    return mha.num_heads * mha.key_dim


def resolve_shared_key_dim(spec, mha):
    """Turns a user's `shared_key_dim` into an integer D̃ for `mha`.

    Args:
        spec: `None` (full size), an integer, or a float in (0, 1] read as a
            fraction of `num_heads * key_dim` (1.0: full size).
        mha: The attention layer.

    Returns:
        The integer D̃, checked to lie in `[1, num_heads * key_dim]`.
    """
    full = full_shared_key_dim(mha)
    if spec is None:
        return full
    if isinstance(spec, bool):
        raise ValueError(f"`shared_key_dim` must be a number. Received: {spec}")
    # A float in (0, 1] is a fraction, 1.0 included (full size); a whole
    # float above 1 (e.g. 96.0) is a size.
    if isinstance(spec, float) and (0.0 < spec <= 1.0):
        return max(1, int(round(spec * full)))
    if isinstance(spec, float) and not spec.is_integer():
        raise ValueError(
            "A fractional `shared_key_dim` must lie in (0, 1]. "
            f"Received: shared_key_dim={spec}"
        )
    value = int(spec)
    if not 1 <= value <= full:
        raise ValueError(
            f"`shared_key_dim` must lie in [1, num_heads * key_dim = {full}] "
            f"for layer '{mha.name}'. Received: shared_key_dim={spec}"
        )
    return value


def per_head_kernels(mha):
    """Query and key kernels of `mha` as `(H, D_q, d_k)`, `(H, D_k, d_k)`."""
    query = keras.ops.convert_to_numpy(mha.query_dense.kernel)
    key = keras.ops.convert_to_numpy(mha.key_dense.kernel)
    return (
        np.transpose(query.astype("float64"), (1, 0, 2)),
        np.transpose(key.astype("float64"), (1, 0, 2)),
    )


def _input_shapes(mha):
    """Build shapes of `mha`, read from its kernels (rank from the equation)."""
    rank = len(mha.query_dense.equation.split(",")[0])
    positions = (None,) * (rank - 1)
    query_shape = positions + (mha.query_dense.kernel.shape[0],)
    key_shape = positions + (mha.key_dense.kernel.shape[0],)
    value_shape = positions + (mha.value_dense.kernel.shape[0],)
    return query_shape, value_shape, key_shape


def _qk_parameters(layer):
    weights = [layer.query_dense.kernel, layer.key_dense.kernel]
    for sublayer in (layer.query_dense, layer.key_dense):
        if sublayer.bias is not None:
            weights.append(sublayer.bias)
    if isinstance(layer, CollaborativeMultiHeadAttention):
        weights.append(layer.mixing)
        if layer.content_bias is not None:
            weights.append(layer.content_bias)
    return int(sum(np.prod(w.shape) for w in weights))


def collaborative_config(mha, shared_key_dim, layer_class):
    """Constructor arguments of a collaborative twin of `mha`."""
    config = mha.get_config()
    config.pop("name", None)
    full_size = shared_key_dim == full_shared_key_dim(mha)
    config.update(
        shared_key_dim=shared_key_dim,
        mixing_initializer="concatenate" if full_size else None,
        # At full size the query bias stays in the shared query projection and
        # the content bias would always be zero.
        use_content_bias=not full_size,
    )
    # KerasHub subclasses add their own arguments; keep only ours.
    accepted = inspect.signature(CollaborativeMultiHeadAttention).parameters
    return {k: v for k, v in config.items() if k in accepted}


def convert_attention(
    mha,
    shared_key_dim=None,
    *,
    calibration=None,
    target_error=None,
    layer_class=CollaborativeMultiHeadAttention,
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
            `CollaborativeMultiHeadAttention`, e.g. a cached variant).
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
    if isinstance(mha, CollaborativeMultiHeadAttention):
        raise ValueError(
            f"Layer '{mha.name}' is already collaborative; convert the "
            "original multi-head attention instead."
        )
    start = time.perf_counter()
    query_kernels, key_kernels = per_head_kernels(mha)
    weights = {}
    if calibration is not None:
        calibration = as_statistics(calibration)
        weights = dict(
            query_weight=calibration.query_moment,
            key_weight=calibration.key_moment,
        )
    if target_error is not None:
        cp = decomposition.rank_for_target_error(
            query_kernels,
            key_kernels,
            target_error,
            seed=seed,
            tol=tol,
            max_iter=max_iter,
            **weights,
        )
    else:
        rank = resolve_shared_key_dim(shared_key_dim, mha)
        cp = decomposition.collaborative_cp(
            query_kernels,
            key_kernels,
            rank,
            seed=seed,
            tol=tol,
            max_iter=max_iter,
            **weights,
        )
    rank = cp.query_kernel.shape[1]
    layer = layer_class(
        name=name or mha.name,
        dtype=mha.dtype_policy,
        **collaborative_config(mha, rank, layer_class),
    )
    layer.build(*_input_shapes(mha))
    _assign_weights(layer, mha, cp, query_kernels, key_kernels)
    return AttentionConversion(
        layer=layer,
        shared_key_dim=rank,
        relative_error=float(cp.relative_error),
        iterations=int(cp.iterations),
        seconds=time.perf_counter() - start,
        qk_params_before=_qk_parameters(mha),
        qk_params_after=_qk_parameters(layer),
    )


def _assign_weights(layer, mha, cp, query_kernels, key_kernels):
    """Writes the decomposition and the copied weights into `layer`."""
    full_size = layer.shared_key_dim == full_shared_key_dim(mha)
    layer.query_dense.kernel.assign(cp.query_kernel)
    layer.key_dense.kernel.assign(cp.key_kernel)
    layer.mixing.assign(cp.mixing)
    if mha.query_dense.bias is not None:
        query_bias = keras.ops.convert_to_numpy(mha.query_dense.bias)
        if full_size:
            # Concatenated layout: head h owns columns [h*d_k, (h+1)*d_k).
            layer.query_dense.bias.assign(np.reshape(query_bias, (-1,)))
        else:
            layer.query_dense.bias.assign(
                np.zeros(layer.shared_key_dim, dtype="float32")
            )
            # c_h = W_K^h b_Q^h: (H, D_k, d_k) x (H, d_k) -> (D_k, H).
            content = np.einsum(
                "hkd,hd->kh", key_kernels, query_bias.astype("float64")
            )
            layer.content_bias.assign(content)
    sublayers = [("value_dense", "value_dense"), ("output_dense", "output_dense")]
    if getattr(mha, "_use_gate", False):
        sublayers.append(("_gate_dense", "_gate_dense"))
    for source_name, target_name in sublayers:
        source = getattr(mha, source_name)
        target = getattr(layer, target_name)
        for source_var, target_var in zip(source.weights, target.weights):
            # A copy: on JAX, `assign` would share the source's buffer, which
            # training the new layer would donate and delete.
            target_var.assign(np.array(keras.ops.convert_to_numpy(source_var)))
