"""Independent NumPy implementations of the equations, for tests only.

Written from the paper's equations, not from the layer's code: if both agree,
the layer computes what the README says it computes.
"""

import numpy as np


def softmax(logits, axis=-1):
    shifted = logits - logits.max(axis=axis, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=axis, keepdims=True)


def masked_softmax(logits, allowed, fully_masked="uniform"):
    """Softmax over the last axis restricted to the `allowed` keys.

    A row with no allowed key has no softmax; Keras MHA gives it zero
    probabilities where its masked softmax runs (`fully_masked="zero"`) and
    uniform ones where its fused kernel runs (`fully_masked="uniform"`).
    """
    if fully_masked not in ("zero", "uniform"):
        raise ValueError(f"fully_masked={fully_masked!r}")
    allowed = np.broadcast_to(allowed, logits.shape)
    top = np.where(allowed, logits, -np.inf).max(axis=-1, keepdims=True)
    top = np.where(np.isfinite(top), top, 0.0)
    exp = np.where(allowed, np.exp(logits - top), 0.0)
    total = exp.sum(axis=-1, keepdims=True)
    attended = total > 0
    p = exp / np.where(attended, total, 1.0)
    if fully_masked == "uniform":
        p = np.where(attended, p, 1.0 / logits.shape[-1])
    return p


def causal_mask(queries, keys):
    """`(T, S)`: query `t` sees keys `s <= t`."""
    return np.arange(queries)[:, None] >= np.arange(keys)[None, :]


def sliding_window_mask(queries, keys, window):
    """`(T, S)`: query `t` sees keys `s` with `|t - s| < window`."""
    distance = np.arange(queries)[:, None] - np.arange(keys)[None, :]
    return np.abs(distance) < window


def position_mask(valid, attention_axes, role):
    """A padding mask over the scores (B, <other axes>, H, <query attention
    axes>, <key attention axes>) of attention over `attention_axes`.

    Args:
        valid: Boolean (B, <positions>): which positions are real.
        attention_axes: Tuple of positional axes (1 to rank - 2 of the
            inputs, so 1 to `valid.ndim - 1`).
        role: `"query"` (a padded query attends nowhere) or `"key"` (a
            padded key is seen by no query).

    Returns:
        A boolean array broadcastable to the scores.
    """
    axes = tuple(attention_axes)
    others = tuple(a for a in range(1, valid.ndim) if a not in axes)
    laid_out = np.transpose(valid, (0,) + others + axes)
    lead = laid_out.shape[: 1 + len(others)]
    positions = laid_out.shape[1 + len(others) :]
    ones = (1,) * len(axes)
    if role == "query":
        return laid_out.reshape(lead + (1,) + positions + ones)
    if role == "key":
        return laid_out.reshape(lead + (1,) + ones + positions)
    raise ValueError(f"role={role!r}")


def collaborative_attention(
    x,
    y,
    v,
    *,
    query_kernel,
    key_kernel,
    mixing,
    value_kernel,
    output_kernel,
    key_dim,
    query_bias=None,
    content_bias=None,
    value_bias=None,
    output_bias=None,
    value_mixing=None,
    gate_kernel=None,
    gate_bias=None,
    mask=None,
    fully_masked="uniform",
):
    """Collaborative attention, head by head, in float64.

    Per-head values (`value_mixing=None`), as in multi-head attention:
    `output = Σ_h (g_h ⊙ A_h (V W_V^h + b_V^h)) W_O^h + b_O`. Shared values
    (`value_mixing` given): `Ṽ = V W̃_V + b̃_V`, `output = Σ_h (g_h ⊙ A_h Ṽ
    ⊙ n_h) W̃_O + b_O`. `g_h = sigmoid(X W_G^h + b_G^h)` is the gate (1
    without `gate_kernel`), `A_h` head h's attention probabilities.

    Args:
        x: (B, T, D_q) queries; y: (B, S, D_k) keys; v: (B, S, D_v) values.
        query_kernel: (D_q, D̃); key_kernel: (D_k, D̃); mixing: (H, D̃);
        value_kernel: (D_v, H, d_v), or (D_v, D̃_v) with shared values;
        output_kernel: (H, d_v, D_out), or (D̃_v, D_out) with shared values;
        value_bias: (H, d_v), or (D̃_v,); value_mixing: (H, D̃_v) or `None`;
        gate_kernel: (D_q, H, d_v) or (D_q, H, D̃_v); gate_bias: its last
        two axes; content_bias: (D_k, H); mask: boolean, broadcastable to
        (B, T, S), or of rank 4, broadcastable to (B, H, T, S) (one mask
        per head); fully_masked: see `masked_softmax`.

    Returns:
        (output (B, T, D_out), probabilities (B, H, T, S)).
    """
    x, y, v = (np.asarray(a, np.float64) for a in (x, y, v))
    shared_query = x @ query_kernel
    if query_bias is not None:
        shared_query = shared_query + query_bias
    shared_key = y @ key_kernel
    num_heads = mixing.shape[0]
    batch, queries, _ = x.shape
    keys = y.shape[1]
    probabilities = np.zeros((batch, num_heads, queries, keys))
    shared_value = None
    if value_mixing is not None:
        shared_value = v @ value_kernel
        if value_bias is not None:
            shared_value = shared_value + value_bias
    output = 0.0
    for h in range(num_heads):
        logits = (shared_query * mixing[h]) @ shared_key.transpose(0, 2, 1)
        if content_bias is not None:
            logits = logits + (y @ content_bias[:, h])[:, None, :]
        logits = logits / np.sqrt(key_dim)
        allowed = True
        if mask is not None:
            mask = np.asarray(mask, bool)
            allowed = mask
            if mask.ndim == 4:
                allowed = mask[:, h if mask.shape[1] > 1 else 0]
        p = masked_softmax(logits, allowed, fully_masked)
        probabilities[:, h] = p
        if shared_value is None:
            value_h = v @ value_kernel[:, h, :]
            if value_bias is not None:
                value_h = value_h + value_bias[h]
        else:
            value_h = shared_value
        context = p @ value_h
        if gate_kernel is not None:
            gate_logits = x @ gate_kernel[:, h, :]
            if gate_bias is not None:
                gate_logits = gate_logits + gate_bias[h]
            context = context / (1.0 + np.exp(-gate_logits))
        if shared_value is None:
            output = output + context @ output_kernel[h]
        else:
            output = output + context * value_mixing[h]
    if shared_value is not None:
        output = output @ output_kernel
    if output_bias is not None:
        output = output + output_bias
    return output, probabilities


def attention_over_axes(x, y, v, attention_axes, mask=None, **kwargs):
    """`collaborative_attention` over the `attention_axes` of rank > 3
    inputs: every other positional axis acts as a batch axis, and the
    attention axes together form the sequence.

    Args:
        x: (B, <positions>, D_q); y, v: (B, <positions>, D_k / D_v), with
            the same positions as `x` outside the attention axes.
        attention_axes: Tuple of positional axes (1 to rank - 2).
        mask: Boolean, broadcastable to the scores (B, <other axes>, H,
            <query attention axes>, <key attention axes>), or `None`.
        **kwargs: The weights and options of `collaborative_attention`.

    Returns:
        (output (B, <positions>, D_out), probabilities of the scores' shape).
    """
    axes = tuple(attention_axes)
    rank = x.ndim
    others = tuple(a for a in range(1, rank - 1) if a not in axes)
    order = (0,) + others + axes + (rank - 1,)
    outer = [x.shape[a] for a in (0,) + others]
    queries = [x.shape[a] for a in axes]
    keys = [y.shape[a] for a in axes]

    def flatten(t, positions):
        t = np.transpose(t, order)
        return t.reshape(-1, int(np.prod(positions)), t.shape[-1])

    num_heads = kwargs["mixing"].shape[0]
    scores_shape = tuple(outer) + (num_heads,) + tuple(queries + keys)
    flat_mask = None
    if mask is not None:
        flat_mask = np.broadcast_to(mask, scores_shape).reshape(
            -1, num_heads, int(np.prod(queries)), int(np.prod(keys))
        )
    output, probabilities = collaborative_attention(
        flatten(x, queries),
        flatten(y, keys),
        flatten(v, keys),
        mask=flat_mask,
        **kwargs,
    )
    output = output.reshape(tuple(outer) + tuple(queries) + (-1,))
    output = np.transpose(output, np.argsort(order))
    return output, probabilities.reshape(scores_shape)


def layer_reference(
    layer, query, value, key=None, mask=None, fully_masked="uniform"
):
    """Runs `collaborative_attention` (or `attention_over_axes` for inputs of
    rank > 3) with the weights of a built layer."""
    from keras import ops

    def numpy(variable):
        if variable is None:
            return None
        return ops.convert_to_numpy(variable).astype(np.float64)

    key = value if key is None else key
    inputs = [ops.convert_to_numpy(t) for t in (query, key, value)]
    gate = getattr(layer, "_gate_dense", None) if layer._use_gate else None
    kwargs = dict(
        query_kernel=numpy(layer.query_dense.kernel),
        key_kernel=numpy(layer.key_dense.kernel),
        mixing=numpy(layer.mixing),
        value_kernel=numpy(layer.value_dense.kernel),
        output_kernel=numpy(layer.output_dense.kernel),
        key_dim=layer.key_dim,
        query_bias=numpy(layer.query_dense.bias),
        content_bias=numpy(layer.content_bias),
        value_bias=numpy(layer.value_dense.bias),
        output_bias=numpy(layer.output_dense.bias),
        value_mixing=numpy(layer.value_mixing),
        gate_kernel=None if gate is None else numpy(gate.kernel),
        gate_bias=None if gate is None else numpy(gate.bias),
        mask=mask,
        fully_masked=fully_masked,
    )
    if inputs[0].ndim > 3:
        inputs = [np.asarray(t, np.float64) for t in inputs]
        return attention_over_axes(*inputs, layer.attention_axes, **kwargs)
    return collaborative_attention(*inputs, **kwargs)


def per_head_products(query_kernels, key_kernels):
    """The tensor a collaborative decomposition approximates: the slices
    `A_h B_hᵀ` of the per-head query and key kernels, `(H, D_q, D_k)`."""
    return np.einsum("hik,hjk->hij", query_kernels, key_kernels)


def collaborative_products(query_kernel, key_kernel, mixing):
    """The slices `U diag(M[h]) Vᵀ` of a collaborative layer,
    `(H, D_q, D_k)`."""
    return np.einsum("ir,hr,jr->hij", query_kernel, mixing, key_kernel)


def psd_sqrt(matrix):
    """The symmetric square root of a positive semi-definite matrix."""
    eigenvalues, eigenvectors = np.linalg.eigh(matrix)
    return (
        eigenvectors * np.sqrt(np.clip(eigenvalues, 0, None))
    ) @ eigenvectors.T


def decomposition_error(
    query_kernels,
    key_kernels,
    query_kernel,
    key_kernel,
    mixing,
    query_weight=None,
    key_weight=None,
):
    """Relative Frobenius error of a collaborative decomposition, on the full
    `(H, D_q, D_k)` tensor, weighted by `S_q^{1/2}` and `S_k^{1/2}` where
    given: the brute-force form of what the solver computes without forming
    the tensor."""
    target = per_head_products(query_kernels, key_kernels)
    residual = target - collaborative_products(query_kernel, key_kernel, mixing)
    if query_weight is not None:
        root = psd_sqrt(query_weight)
        target, residual = root @ target, root @ residual
    if key_weight is not None:
        root = psd_sqrt(key_weight)
        target, residual = target @ root, residual @ root
    return np.linalg.norm(residual) / np.linalg.norm(target)
