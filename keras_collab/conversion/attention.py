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
from keras_collab.layers import CollaborativeValueOutput


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
        shared_value_dim: The D̃_v used, or `None` for per-head values.
        value_relative_error: Relative error of the re-parametrized
            value/output products (activation-weighted when calibrated), or
            `None` for per-head values.
        vo_params_before: Value/output parameters of the original layer.
        vo_params_after: Value/output parameters of the collaborative layer.
    """

    layer: CollaborativeMultiHeadAttention
    shared_key_dim: int
    relative_error: float
    iterations: int
    seconds: float
    qk_params_before: int
    qk_params_after: int
    shared_value_dim: int = None
    value_relative_error: float = None
    vo_params_before: int = 0
    vo_params_after: int = 0


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


def full_shared_value_dim(mha):
    """`num_heads * value_dim`: the D̃_v at which shared values are exact."""
    return mha.num_heads * mha._value_dim


def parse_dim(spec, name="shared_key_dim"):
    """Checks a user's D̃ (or D̃_v) before any layer is known.

    Args:
        spec: `None` (full size), an integer, a float in (0, 1] read as a
            fraction of the full size (1.0: full size), a whole float above
            1 (a size), or a string of one of those ("96", "0.5"; a string
            with a "." is a float).
        name: The argument's name, for errors.

    Returns:
        `None`, a positive `int` size, or a `float` fraction in (0, 1].

    Raises:
        ValueError: naming the argument and what was received.
    """
    if spec is None:
        return None
    if isinstance(spec, str):
        try:
            number = float(spec)
        except ValueError:
            raise ValueError(
                f"`{name}` must be an integer or a fraction. "
                f"Received: {name}={spec!r}"
            ) from None
        spec = number if "." in spec or not number.is_integer() else int(number)
    if isinstance(spec, bool) or not isinstance(
        spec, (int, float, np.integer, np.floating)
    ):
        raise ValueError(f"`{name}` must be a number. Received: {spec!r}")
    if spec <= 0:
        raise ValueError(f"`{name}` must be positive. Received: {name}={spec}")
    if isinstance(spec, (float, np.floating)):
        if 0.0 < spec <= 1.0:
            return float(spec)
        if not float(spec).is_integer():
            raise ValueError(
                f"A fractional `{name}` must lie in (0, 1]. "
                f"Received: {name}={spec}"
            )
    return int(spec)


def parse_shared_key_dim(spec):
    """`parse_dim` for `shared_key_dim`."""
    return parse_dim(spec, "shared_key_dim")


def _resolve_dim(spec, full, name, mha):
    spec = parse_dim(spec, name)
    if spec is None:
        return full
    if isinstance(spec, float):
        return max(1, int(round(spec * full)))
    if not 1 <= spec <= full:
        raise ValueError(
            f"`{name}` must lie in [1, {full}] for layer '{mha.name}'. "
            f"Received: {name}={spec}"
        )
    return spec


def resolve_shared_key_dim(spec, mha):
    """Turns a user's `shared_key_dim` into an integer D̃ for `mha`, in
    `[1, num_heads * key_dim]` (`None`: full size)."""
    return _resolve_dim(spec, full_shared_key_dim(mha), "shared_key_dim", mha)


def resolve_shared_value_dim(spec, mha):
    """Turns a user's `shared_value_dim` into an integer D̃_v for `mha`, in
    `[1, num_heads * value_dim]` (`None`: full size)."""
    full = full_shared_value_dim(mha)
    return _resolve_dim(spec, full, "shared_value_dim", mha)


def per_head_kernels(mha):
    """Query and key kernels of `mha` as `(H, D_q, d_k)`, `(H, D_k, d_k)`."""
    query = keras.ops.convert_to_numpy(mha.query_dense.kernel)
    key = keras.ops.convert_to_numpy(mha.key_dense.kernel)
    return (
        np.transpose(query.astype("float64"), (1, 0, 2)),
        np.transpose(key.astype("float64"), (1, 0, 2)),
    )


def per_head_value_output_kernels(mha):
    """Value and output kernels of `mha` as `(H, D_v, d_v)` and the output
    kernels transposed, `(H, D_out, d_v)`: head `h` adds
    `A_h Y W_V^h W_O^h` to the output, so the products `W_V^h W_O^h` have
    the same structure as the query/key products."""
    if len(mha.output_dense.kernel.shape) != 3:
        raise ValueError(
            "Shared values need an output projection of shape (num_heads, "
            f"value_dim, features); layer '{mha.name}' has "
            f"{tuple(mha.output_dense.kernel.shape)} (a custom "
            "`output_shape`)."
        )
    value = keras.ops.convert_to_numpy(mha.value_dense.kernel)
    output = keras.ops.convert_to_numpy(mha.output_dense.kernel)
    return (
        np.transpose(value.astype("float64"), (1, 0, 2)),
        np.transpose(output.astype("float64"), (0, 2, 1)),
    )


def _parameters(variables):
    return int(sum(np.prod(v.shape) for v in variables if v is not None))


def query_key_parameters(layer):
    """How many parameters the query/key side of an attention layer has:
    kernels and biases of a Keras MHA, `query_key_variables` of a
    collaborative layer."""
    if is_collaborative(layer):
        return _parameters(layer.query_key_variables)
    return _parameters(
        [layer.query_dense.kernel, layer.key_dense.kernel]
        + [dense.bias for dense in (layer.query_dense, layer.key_dense)]
    )


def value_output_parameters(layer):
    """How many parameters the value and output projections (and gate)
    of an attention layer have."""
    if is_collaborative(layer) and getattr(layer, "shared_value_dim", None):
        return _parameters(layer.value_output_variables)
    denses = [layer.value_dense, layer.output_dense]
    if getattr(layer, "_gate_dense", None) is not None:
        denses.append(layer._gate_dense)
    return _parameters([w for dense in denses for w in dense.weights])


def convert_attention(
    mha,
    shared_key_dim=None,
    *,
    shared_value_dim=None,
    calibration=None,
    target_error=None,
    value_target_error=None,
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
        shared_value_dim: D̃_v of shared values: `None` keeps per-head
            values (exact copies); an integer or a fraction of
            `num_heads * value_dim` decomposes the per-head value/output
            products `W_V^h W_O^h` the same way (full size is exact).
        calibration: Optional description of the layer's real inputs: an
            `AttentionStatistics`, an array of self-attention inputs
            `(N, T, D)`, or a `(query_inputs, key_inputs)` pair for
            cross-attention. With it the decomposition minimises the error
            of the logits (and of the values) on that data instead of the
            error of the weights.
        target_error: Optional float in (0, 1): pick the smallest D̃ (a
            multiple of `key_dim`) whose relative error meets it.
        value_target_error: The same for D̃_v (shared values).
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
    start = time.perf_counter()
    decomposed = decompose_attention(
        mha,
        shared_key_dim,
        shared_value_dim=shared_value_dim,
        calibration=calibration,
        target_error=target_error,
        value_target_error=value_target_error,
        seed=seed,
        tol=tol,
        max_iter=max_iter,
    )
    return build_conversion(
        mha, decomposed, layer_class=layer_class, name=name, start=start
    )


@dataclasses.dataclass
class AttentionDecomposition:
    """The factors `convert_attention` builds a layer from (NumPy only).

    Attributes:
        query_key: `CPResult` of the per-head query/key products.
        value_output: `CPResult` of the value/output products, or `None`
            for per-head values.
        seconds: Wall time of the decomposition.
    """

    query_key: decomposition.CPResult
    value_output: decomposition.CPResult = None
    seconds: float = 0.0


def decompose_attention(
    mha,
    shared_key_dim=None,
    *,
    shared_value_dim=None,
    calibration=None,
    target_error=None,
    value_target_error=None,
    seed=0,
    tol=1e-7,
    max_iter=500,
):
    """The decomposition step of `convert_attention` (same arguments),
    which builds no layer: plain NumPy work on `mha`'s weights, safe to run
    in a worker thread (`keras_collab.conversion.model.convert_sites` runs
    layers side by side).

    Returns:
        An `AttentionDecomposition`.
    """
    _check_convertible(mha)
    start = time.perf_counter()
    statistics = None if calibration is None else as_statistics(calibration)
    solver = dict(seed=seed, tol=tol, max_iter=max_iter)
    cp = _decompose_query_key(
        mha, shared_key_dim, statistics, target_error, solver
    )
    value_cp = None
    if shared_value_dim is not None or value_target_error is not None:
        value_cp = _decompose_value_output(
            mha, shared_value_dim, statistics, value_target_error, solver
        )
    return AttentionDecomposition(
        query_key=cp,
        value_output=value_cp,
        seconds=time.perf_counter() - start,
    )


def build_conversion(
    mha, decomposed, *, layer_class=None, name=None, start=None
):
    """The collaborative layer of a decomposition of `mha`.

    Args:
        mha: The layer that `decompose_attention` decomposed.
        decomposed: Its `AttentionDecomposition`.
        layer_class, name: As in `convert_attention`.
        start: `time.perf_counter()` when the conversion started; by
            default the decomposition's own time is counted.

    Returns:
        An `AttentionConversion`.
    """
    build_start = time.perf_counter()
    cp, value_cp = decomposed.query_key, decomposed.value_output
    layer_class = layer_class or collaborative_class_for(mha)
    value_side = {}
    if value_cp is not None:
        value_side["value_output"] = _value_output_side(mha, value_cp)
    layer = layer_class.from_multi_head_attention(
        mha, query_key=_query_key_side(mha, cp), name=name, **value_side
    )
    end = time.perf_counter()
    if start is None:
        seconds = decomposed.seconds + end - build_start
    else:
        seconds = end - start
    return AttentionConversion(
        layer=layer,
        shared_key_dim=layer.shared_key_dim,
        relative_error=float(cp.relative_error),
        iterations=int(cp.iterations),
        seconds=seconds,
        qk_params_before=query_key_parameters(mha),
        qk_params_after=query_key_parameters(layer),
        shared_value_dim=None if value_cp is None else layer.shared_value_dim,
        value_relative_error=None
        if value_cp is None
        else float(value_cp.relative_error),
        vo_params_before=value_output_parameters(mha),
        vo_params_after=value_output_parameters(layer),
    )


def _check_convertible(mha):
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


def _fit(query_kernels, key_kernels, rank_spec, target_error, weights, solver):
    """CP factors at a given rank, or at the smallest that meets a target."""
    if target_error is not None:
        return decomposition.rank_for_target_error(
            query_kernels, key_kernels, target_error, **weights, **solver
        )
    return decomposition.collaborative_cp(
        query_kernels, key_kernels, rank_spec, **weights, **solver
    )


def _decompose_query_key(mha, shared_key_dim, statistics, target_error, solver):
    """The CP factors of `mha`'s per-head query/key products."""
    query_kernels, key_kernels = per_head_kernels(mha)
    weights = {}
    if statistics is not None:
        weights = dict(
            query_weight=statistics.query_moment,
            key_weight=statistics.key_moment,
        )
    rank = None
    if target_error is None:
        rank = resolve_shared_key_dim(shared_key_dim, mha)
    return _fit(query_kernels, key_kernels, rank, target_error, weights, solver)


def _decompose_value_output(
    mha, shared_value_dim, statistics, target_error, solver
):
    """The CP factors of `mha`'s per-head value/output products, weighted
    on the input side by the second moment of the value inputs (the
    output side is the layer's output itself, unweighted)."""
    value_kernels, output_kernels = per_head_value_output_kernels(mha)
    weights = {}
    if statistics is not None and statistics.value_moment is not None:
        weights = dict(query_weight=statistics.value_moment)
    rank = None
    if target_error is None:
        rank = resolve_shared_value_dim(shared_value_dim, mha)
    full = rank == full_shared_value_dim(mha)
    if getattr(mha, "_use_gate", False) and not full:
        raise ValueError(
            f"Layer '{mha.name}' has a gate, which acts on each head's "
            "values before the output projection; below full size "
            "(shared_value_dim < num_heads * value_dim) shared values "
            "cannot carry it. Keep per-head values (shared_value_dim=None)."
        )
    return _fit(
        value_kernels, output_kernels, rank, target_error, weights, solver
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


def _numpy(variable):
    return np.asarray(keras.ops.convert_to_numpy(variable), "float64")


def _value_output_side(mha, cp):
    """The shared value/output weights from CP factors of `W_V^h W_O^h`.

    At full size the factors are the concatenated heads and every bias and
    gate is copied into that layout. Below it, each head's value bias adds
    the constant `b_V^h W_O^h` to the output (attention rows sum to one),
    so it folds exactly into the output bias.
    """
    rank = cp.query_kernel.shape[1]
    full = rank == full_shared_value_dim(mha)
    value_bias = output_bias = gate_kernel = gate_bias = None
    if mha.output_dense.bias is not None:
        output_bias = _numpy(mha.output_dense.bias)
    if mha.value_dense.bias is not None:
        bias = _numpy(mha.value_dense.bias)  # (H, d_v)
        if full:
            value_bias = np.reshape(bias, (-1,))
        else:
            output = _numpy(mha.output_dense.kernel)  # (H, d_v, D_out)
            folded = np.einsum("hv,hvo->o", bias, output)
            output_bias = (
                folded if output_bias is None else output_bias + folded
            )
            value_bias = np.zeros(rank)
    if getattr(mha, "_use_gate", False):
        # Full size only (checked): head h's gate on its block of columns.
        gate = _numpy(mha._gate_dense.kernel)  # (D_q, H, d_v)
        gate_kernel = np.tile(
            np.reshape(gate, (gate.shape[0], 1, -1)), (1, mha.num_heads, 1)
        )
        if mha._gate_dense.bias is not None:
            gate_bias = np.tile(
                np.reshape(_numpy(mha._gate_dense.bias), (1, -1)),
                (mha.num_heads, 1),
            )
    return CollaborativeValueOutput(
        value_kernel=cp.query_kernel,
        value_mixing=cp.mixing,
        output_kernel=cp.key_kernel.T,
        value_bias=value_bias,
        output_bias=output_bias,
        gate_kernel=gate_kernel,
        gate_bias=gate_bias,
    )
