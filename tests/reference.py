"""Independent NumPy implementations of the equations, for tests only.

Written from the paper's equations, not from the layer's code: if both agree,
the layer computes what the README says it computes.
"""

import numpy as np


def softmax(logits, axis=-1):
    shifted = logits - logits.max(axis=axis, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=axis, keepdims=True)


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
    mask=None,
):
    """Collaborative attention, head by head, in float64.

    Args:
        x: (B, T, D_q) queries; y: (B, S, D_k) keys; v: (B, S, D_v) values.
        query_kernel: (D_q, D̃); key_kernel: (D_k, D̃); mixing: (H, D̃);
        value_kernel: (D_v, H, d_v); output_kernel: (H, d_v, D_out);
        content_bias: (D_k, H); mask: boolean, broadcastable to (B, T, S).

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
    output = 0.0
    for h in range(num_heads):
        logits = (shared_query * mixing[h]) @ shared_key.transpose(0, 2, 1)
        if content_bias is not None:
            logits = logits + (y @ content_bias[:, h])[:, None, :]
        logits = logits / np.sqrt(key_dim)
        if mask is not None:
            logits = np.where(np.broadcast_to(mask, logits.shape), logits, -1e9)
        p = softmax(logits)
        probabilities[:, h] = p
        value_h = v @ value_kernel[:, h, :]
        if value_bias is not None:
            value_h = value_h + value_bias[h]
        output = output + (p @ value_h) @ output_kernel[h]
    if output_bias is not None:
        output = output + output_bias
    return output, probabilities


def layer_reference(layer, query, value, key=None, mask=None):
    """Runs `collaborative_attention` with the weights of a built layer."""
    from keras import ops

    def numpy(variable):
        if variable is None:
            return None
        return ops.convert_to_numpy(variable).astype(np.float64)

    key = value if key is None else key
    return collaborative_attention(
        ops.convert_to_numpy(query),
        ops.convert_to_numpy(key),
        ops.convert_to_numpy(value),
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
        mask=mask,
    )
