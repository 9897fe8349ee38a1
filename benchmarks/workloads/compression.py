"""Pure pieces of the `conversion`, `fidelity`, `pruning` and
`decoder_quality` suites.

Parameter budgets, the compact decode cache of converted layers, magnitude
pruning (TFMOT's rule, in `keras.ops` and in NumPy), per-head low-rank
truncation of the attention bilinear forms, the synthetic BERT-base-shaped
attention weights and the writing of PARAFAC factors into a converted
collaborative layer. Nothing here loads a model:
the unit tests in `tests/benchmarks/workloads/test_compression.py` run them
on small random weights on every backend.

Shapes follow Keras' `MultiHeadAttention`: query and key kernels are
`(D, H, d_k)`, query and key biases `(H, d_k)`; `keras_collab`'s decomposition
functions take the per-head layout `(H, D, d_k)`.
"""

import math

import numpy as np

# ---------------------------------------------------------------------------
# Budgets
# ---------------------------------------------------------------------------


def collaborative_qk_parameters(model_dim, num_heads, shared_key_dim):
    """Query/key parameters of one converted collaborative layer.

    `2·D·D̃` (shared query and key kernels) `+ D̃` (shared query bias)
    `+ H·D̃` (mixing) `+ D·H` (content bias). The collaborative layer has no
    key bias: softmax cancels it.
    """
    return (
        2 * model_dim * shared_key_dim
        + shared_key_dim
        + num_heads * shared_key_dim
        + model_dim * num_heads
    )


def mha_qk_parameters(model_dim, num_heads, key_dim):
    """Query/key parameters of Keras MHA that matter: kernels and query bias.

    The key bias is left out, as in `collaborative_qk_parameters`: it adds
    the same value to every logit of a query, which softmax cancels.
    """
    return 2 * model_dim * num_heads * key_dim + num_heads * key_dim


def decode_cache(layers):
    """What a decoder with these attention layers would cache per token.

    Per layer: the shared key (D̃), the content-bias logits (H, with a
    content bias) and the values (D̃_v shared, or H·d_v per head), as
    `CachedCollaborativeMultiHeadAttention.cache_width`; the original's
    KerasHub cache holds H·(d_k + d_v). For an encoder (MiniLM), which keeps
    no cache, these are the numbers a decoder of its shape would keep.

    Returns:
        `cache_per_token` (numbers over all layers), `original_cache_per_
        token`, `cache_ratio` (original / converted) and
        `value_cache_share` (the values' fraction of the converted cache).
    """
    total = values = original = 0
    for layer in layers:
        heads = layer.num_heads
        value = layer.shared_value_dim or heads * layer.value_dim
        content = heads if layer.use_content_bias else 0
        total += layer.shared_key_dim + content + value
        values += value
        original += heads * (layer.key_dim + layer.value_dim)
    return {
        "cache_per_token": total,
        "original_cache_per_token": original,
        "cache_ratio": original / total,
        "value_cache_share": values / total,
    }


def tfmot_kept_count(size, sparsity):
    """How many entries TFMOT's magnitude pruning keeps at `sparsity`.

    `tfmot.sparsity.keras` (`pruning_impl.Pruning._update_mask`) computes
    `k = max(round(float32(size) * (1 - sparsity)), 1)` in float32, with
    TensorFlow's round-half-to-even; NumPy's `round` rounds the same way.
    """
    kept = np.float32(size) * (np.float32(1.0) - np.float32(sparsity))
    return max(int(np.round(kept)), 1)


def magnitude_budget(model_dim, num_heads, key_dim, budget):
    """Sparsity of the query and key kernels that meets a parameter budget.

    The pruned layer keeps its query bias (`H·d_k` entries, counted) and its
    key bias (not counted, as above); the rest of the budget goes to the
    nonzeros of the query and key kernels, half each, each kernel pruned
    with its own magnitude threshold (as TFMOT prunes each weight).

    Returns:
        A dict: `sparsity` (the `ConstantSparsity` target, float),
        `kept_per_kernel` (nonzeros TFMOT keeps per kernel at that sparsity),
        `kept_fraction` and `parameters` (nonzeros + query bias).
    """
    kernel_size = model_dim * num_heads * key_dim
    query_bias = num_heads * key_dim
    wanted = (budget - query_bias) // 2
    if not 1 <= wanted <= kernel_size:
        raise ValueError(
            f"A budget of {budget} parameters leaves {wanted} nonzeros per "
            f"kernel of {kernel_size} entries."
        )
    sparsity = 1.0 - wanted / kernel_size
    kept = tfmot_kept_count(kernel_size, sparsity)
    return {
        "sparsity": sparsity,
        "kept_per_kernel": kept,
        "kept_fraction": kept / kernel_size,
        "parameters": 2 * kept + query_bias,
    }


def low_rank_total_rank(model_dim, budget):
    """Total rank `Σ_h r_h` that a per-head truncation can afford.

    Each unit of rank costs a query column and a key column (`2·D`) plus one
    query-bias entry; the key bias is dropped (softmax cancels it).
    """
    return budget // (2 * model_dim + 1)


def low_rank_parameters(model_dim, ranks):
    return (2 * model_dim + 1) * int(np.sum(ranks))


# ---------------------------------------------------------------------------
# Magnitude pruning
# ---------------------------------------------------------------------------


def magnitude_mask(kernel, sparsity):
    """TFMOT's magnitude mask of one kernel, written with `keras.ops`.

    Keeps every entry whose magnitude is at least the `k`-th largest
    magnitude (`k` from `tfmot_kept_count`), so ties at the threshold are all
    kept, exactly as `tfmot.sparsity.keras` does (`greater_equal`).

    Args:
        kernel: A tensor or array (any shape).
        sparsity: Target fraction of zeros, as for `ConstantSparsity`.

    Returns:
        A boolean tensor of the kernel's shape.
    """
    from keras import ops

    magnitudes = ops.abs(ops.convert_to_tensor(kernel, dtype="float32"))
    size = int(np.prod(magnitudes.shape))
    kept = tfmot_kept_count(size, sparsity)
    values, _ = ops.top_k(ops.reshape(magnitudes, (-1,)), k=kept, sorted=True)
    return ops.greater_equal(magnitudes, values[kept - 1])


def magnitude_mask_numpy(kernel, sparsity):
    """NumPy reference of `magnitude_mask` (full sort, same tie rule)."""
    magnitudes = np.abs(np.asarray(kernel, dtype=np.float32))
    kept = tfmot_kept_count(magnitudes.size, sparsity)
    threshold = np.sort(magnitudes, axis=None)[::-1][kept - 1]
    return magnitudes >= threshold


# ---------------------------------------------------------------------------
# Per-head low-rank truncation
# ---------------------------------------------------------------------------


def head_product_svd(query_kernel, key_kernel):
    """SVD of every head's bilinear form `W_Q^h W_K^hᵀ`, through its factors.

    With thin QR factorisations `W_Q^h = Q_a R_a` and `W_K^h = Q_b R_b`,
    `W_Q^h W_K^hᵀ = (Q_a U) S (Q_b V)ᵀ` where `U S Vᵀ` is the SVD of the small
    `R_a R_bᵀ`; the `D x D` product is never formed.

    Args:
        query_kernel: `(D, H, d_k)` query kernel.
        key_kernel: `(D, H, d_k)` key kernel.

    Returns:
        `(left, singular, right)`: `(H, D, d_k)` left singular vectors,
        `(H, d_k)` singular values (descending) and `(H, D, d_k)` right
        singular vectors.
    """
    query = np.transpose(np.asarray(query_kernel, np.float64), (1, 0, 2))
    key = np.transpose(np.asarray(key_kernel, np.float64), (1, 0, 2))
    query_basis, query_triangle = np.linalg.qr(query)
    key_basis, key_triangle = np.linalg.qr(key)
    core = query_triangle @ np.swapaxes(key_triangle, 1, 2)
    u, singular, vt = np.linalg.svd(core)
    return query_basis @ u, singular, key_basis @ np.swapaxes(vt, 1, 2)


def allocate_ranks(singular_values, total_rank):
    """Ranks per head that sum to `total_rank`, as even as possible.

    Every head gets `total_rank // H`; the remaining ranks go, one each, to
    the heads whose next singular value is largest.

    Args:
        singular_values: `(H, d_k)` singular values, descending per head.
        total_rank: Integer between 0 and `H·d_k`.

    Returns:
        An integer array of `H` ranks.
    """
    num_heads, head_dim = singular_values.shape
    if not 0 <= total_rank <= num_heads * head_dim:
        raise ValueError(
            f"`total_rank` must lie in [0, {num_heads * head_dim}]; "
            f"received {total_rank}."
        )
    base, extra = divmod(total_rank, num_heads)
    ranks = np.full(num_heads, base, dtype=int)
    if extra:
        next_values = singular_values[:, base]
        ranks[np.argsort(-next_values, kind="stable")[:extra]] += 1
    return ranks


def truncate_heads(query_kernel, key_kernel, query_bias, ranks):
    """Per-head rank-`r_h` truncation of an attention layer's logits.

    Head `h` keeps the best rank-`r_h` approximation (Eckart-Young) of its
    bilinear form `W_Q^h W_K^hᵀ`, split evenly as `(U_r S_r^{1/2})
    (V_r S_r^{1/2})ᵀ`, written into the first `r_h` of its `d_k` columns;
    the other columns are zero. The layer keeps its `key_dim` and hence its
    scale `1/sqrt(d_k)`, so the logits are those of the truncated forms (a
    layer with `key_dim = r` would compute the same with `sqrt(r / d_k)`
    folded into its query kernel and bias).

    The query bias only reaches the softmax through the content term
    `b_Q^h W_K^hᵀ y = c_hᵀ y`, `c_h = W_K^h b_Q^h`; the truncated bias is the
    least-squares `b'` with `W'_K b' ≈ c_h` (exact when `r_h = d_k` and
    `W_K^h` has full column rank). The key bias is set to zero (softmax
    cancels it).

    Args:
        query_kernel: `(D, H, d_k)` query kernel.
        key_kernel: `(D, H, d_k)` key kernel.
        query_bias: `(H, d_k)` query bias, or `None`.
        ranks: `H` integer ranks in `[0, d_k]`.

    Returns:
        `(query_kernel, key_kernel, query_bias, key_bias)`, float32 arrays of
        the input shapes (biases `(H, d_k)`, zero when `query_bias` is None).
    """
    model_dim, num_heads, head_dim = np.shape(query_kernel)
    left, singular, right = head_product_svd(query_kernel, key_kernel)
    key = np.asarray(key_kernel, np.float64)
    new_query = np.zeros((model_dim, num_heads, head_dim))
    new_key = np.zeros((model_dim, num_heads, head_dim))
    new_query_bias = np.zeros((num_heads, head_dim))
    for head, rank in enumerate(np.asarray(ranks, dtype=int)):
        if not 0 <= rank <= head_dim:
            raise ValueError(
                f"Rank {rank} of head {head} is not in [0, {head_dim}]."
            )
        if rank == 0:
            continue
        roots = np.sqrt(singular[head, :rank])
        new_query[:, head, :rank] = left[head, :, :rank] * roots
        new_key[:, head, :rank] = right[head, :, :rank] * roots
        if query_bias is not None:
            content = key[:, head, :] @ np.asarray(query_bias, np.float64)[head]
            new_query_bias[head, :rank] = np.linalg.lstsq(
                new_key[:, head, :rank], content, rcond=None
            )[0]
    return (
        new_query.astype(np.float32),
        new_key.astype(np.float32),
        new_query_bias.astype(np.float32),
        np.zeros((num_heads, head_dim), np.float32),
    )


# ---------------------------------------------------------------------------
# Synthetic weights
# ---------------------------------------------------------------------------


def synthetic_attention_kernels(
    model_dim=768, num_heads=12, key_dim=64, decay=32.0, seed=0
):
    """Random query and key kernels with a decaying singular spectrum.

    Each of `W_Q` and `W_K` (`D x H·d_k`, as concatenated heads) is
    `U diag(σ) Vᵀ` with Haar-random orthogonal `U`, `V` and
    `σ_i = 1 / (1 + i / decay)`, scaled so that entries have the size of a
    Glorot-initialised kernel; it is then split into `H` heads of `d_k`
    columns. Heads therefore share the dominant input directions, as trained
    attention layers do, without any planted low-rank CP structure.

    Returns:
        `(query_kernels, key_kernels)` in the per-head layout `(H, D, d_k)`,
        float64.
    """
    rng = np.random.default_rng(seed)
    total = num_heads * key_dim

    def kernel():
        u = _haar_orthogonal(rng, model_dim)[:, :total]
        v = _haar_orthogonal(rng, total)
        spectrum = 1.0 / (1.0 + np.arange(total) / decay)
        matrix = (u * spectrum) @ v.T
        matrix *= (
            math.sqrt(2.0 / (model_dim + total))
            * math.sqrt(model_dim * total)
            / np.linalg.norm(matrix)
        )
        return np.transpose(
            matrix.reshape(model_dim, num_heads, key_dim), (1, 0, 2)
        )

    return kernel(), kernel()


def _haar_orthogonal(rng, size):
    q, r = np.linalg.qr(rng.standard_normal((size, size)))
    return q * np.sign(np.diag(r))


# ---------------------------------------------------------------------------
# Factors into layers
# ---------------------------------------------------------------------------


def assign_factors(layer, query_kernel, key_kernel, mixing):
    """Writes CP factors into a built `CollaborativeMultiHeadAttention`.

    `query_kernel` `(D_q, D̃)`, `key_kernel` `(D_k, D̃)` and `mixing`
    `(H, D̃)` replace the layer's shared kernels and mixing; biases, content
    bias, values and output are left as they are.
    """
    for variable, value in (
        (layer.query_dense.kernel, query_kernel),
        (layer.key_dense.kernel, key_kernel),
        (layer.mixing, mixing),
    ):
        variable.assign(
            np.reshape(np.asarray(value), tuple(variable.shape)).astype(
                variable.dtype
            )
        )


def layer_factors(layer):
    """`(U, V, M)` of a collaborative layer as float64 `(D, D̃)`, `(D, D̃)`,
    `(H, D̃)` arrays."""
    import keras

    def read(variable, columns):
        value = keras.ops.convert_to_numpy(variable).astype(np.float64)
        return value.reshape(-1, columns)

    rank = layer.shared_key_dim
    return (
        read(layer.query_dense.kernel, rank),
        read(layer.key_dense.kernel, rank),
        read(layer.mixing, rank),
    )
