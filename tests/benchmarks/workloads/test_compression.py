"""Pure pieces of the conversion, fidelity, pruning and decoder_quality
suites (no MiniLM)."""

import keras
import numpy as np
import pytest

from benchmarks.workloads import compression
from keras_collab.conversion import convert_attention


def _mha(model_dim=16, num_heads=2, key_dim=4, value_dim=None, seed=0):
    layer = keras.layers.MultiHeadAttention(
        num_heads=num_heads,
        key_dim=key_dim,
        value_dim=value_dim,
        bias_initializer="random_normal",
        kernel_initializer=keras.initializers.GlorotUniform(seed=seed),
    )
    layer.build((None, None, model_dim), (None, None, model_dim))
    return layer


def _weights(layer):
    return {
        name: keras.ops.convert_to_numpy(variable)
        for name, variable in (
            ("query_kernel", layer.query_dense.kernel),
            ("query_bias", layer.query_dense.bias),
            ("key_kernel", layer.key_dense.kernel),
            ("key_bias", layer.key_dense.bias),
        )
    }


# ---------------------------------------------------------------------------
# Budgets
# ---------------------------------------------------------------------------


def test_collaborative_budget_counts_the_converted_layer():
    # The shapes of the other tests: on JAX, every new variable shape costs
    # a compilation of its initializer.
    mha = _mha()
    conversion = convert_attention(mha, shared_key_dim=3, max_iter=5)
    assert (
        conversion.qk_params_after
        == compression.collaborative_qk_parameters(16, 2, 3)
    )
    # The package also counts the key bias of the original layer.
    assert (
        conversion.qk_params_before
        == compression.mha_qk_parameters(16, 2, 4) + 2 * 4
    )


@pytest.mark.parametrize(
    "shared_key_dim, shared_value_dim, width",
    [
        # Full D̃ keeps the query bias in the shared query: no content
        # logits; per-head values, 2 heads of 4.
        (8, None, 8 + 0 + 8),
        # Below full D̃: 2 content logits; shared values of 3.
        (3, 3, 3 + 2 + 3),
        (8, 5, 8 + 0 + 5),
    ],
)
def test_decode_cache_counts_what_the_compact_cache_keeps(
    shared_key_dim, shared_value_dim, width
):
    from keras_collab.layers import CachedCollaborativeMultiHeadAttention

    conversion = convert_attention(
        _mha(),
        shared_key_dim=shared_key_dim,
        shared_value_dim=shared_value_dim,
        max_iter=5,
    )
    layers = [conversion.layer, conversion.layer]
    cache = compression.decode_cache(layers)
    # The cached twin of the same layer, built from its config, is the
    # independent count: the width of the cache it really allocates.
    twin = CachedCollaborativeMultiHeadAttention.from_config(
        conversion.layer.get_config()
    )
    allocated = twin.empty_cache(1, 7).shape[-1]
    assert allocated == width
    assert cache["cache_per_token"] == 2 * width
    # KerasHub's cache: keys and values of 2 heads of 4, per layer.
    assert cache["original_cache_per_token"] == 2 * 16
    assert cache["cache_ratio"] == pytest.approx(16 / width)
    values = shared_value_dim or 8
    assert cache["value_cache_share"] == pytest.approx(values / width)


def test_minilm_budgets():
    # D = 384, H = 12, key_dim = 32.
    assert compression.collaborative_qk_parameters(384, 12, 96) == 79584
    budget = compression.magnitude_budget(384, 12, 32, 79584)
    assert abs(budget["parameters"] - 79584) <= 2
    assert budget["kept_fraction"] == pytest.approx(39600 / 147456, abs=1e-5)
    assert compression.low_rank_total_rank(384, 79584) == 103
    assert compression.low_rank_parameters(384, [9] * 7 + [8] * 5) == 769 * 103
    with pytest.raises(ValueError):
        compression.magnitude_budget(384, 12, 32, 100)


@pytest.mark.parametrize(
    "size, sparsity, kept",
    [
        (10, 0.5, 5),
        (10, 0.25, 8),
        (10, 0.75, 2),
        (10, 1.0, 1),
        (147456, 0.0, 147456),
    ],
)
def test_tfmot_kept_count_rounds_half_to_even(size, sparsity, kept):
    assert compression.tfmot_kept_count(size, sparsity) == kept


def test_allocate_ranks_gives_the_remainder_to_the_largest_next_values():
    singular = np.array([[4.0, 3.0, 1.0], [4.0, 2.0, 1.0], [5.0, 3.5, 0.5]])
    np.testing.assert_array_equal(
        compression.allocate_ranks(singular, 4), [1, 1, 2]
    )
    np.testing.assert_array_equal(
        compression.allocate_ranks(singular, 5), [2, 1, 2]
    )
    np.testing.assert_array_equal(
        compression.allocate_ranks(singular, 9), [3, 3, 3]
    )
    with pytest.raises(ValueError):
        compression.allocate_ranks(singular, 10)


# ---------------------------------------------------------------------------
# Magnitude pruning
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.731, 0.99])
def test_keras_ops_magnitude_mask_matches_numpy_with_ties(sparsity):
    rng = np.random.default_rng(3)
    # Rounded values: many entries tie at the threshold.
    kernel = np.round(rng.standard_normal((24, 3, 5)), 1).astype("float32")
    mask = keras.ops.convert_to_numpy(
        compression.magnitude_mask(kernel, sparsity)
    )
    reference = compression.magnitude_mask_numpy(kernel, sparsity)
    assert mask.dtype == bool and mask.shape == kernel.shape
    np.testing.assert_array_equal(mask, reference)
    kept = compression.tfmot_kept_count(kernel.size, sparsity)
    assert mask.sum() >= kept
    # Every pruned entry is no larger than every kept one.
    if (~mask).any():
        assert np.abs(kernel[~mask]).max() <= np.abs(kernel[mask]).min()


def test_magnitude_mask_keeps_exactly_k_without_ties():
    kernel = np.random.default_rng(0).permutation(200).reshape(10, 4, 5) - 100.5
    mask = keras.ops.convert_to_numpy(compression.magnitude_mask(kernel, 0.8))
    assert mask.sum() == 40
    assert np.abs(kernel[mask]).min() > np.abs(kernel[~mask]).max()


# ---------------------------------------------------------------------------
# Per-head low-rank truncation
# ---------------------------------------------------------------------------


def _truncated_twin(mha, ranks):
    weights = _weights(mha)
    query, key, query_bias, key_bias = compression.truncate_heads(
        weights["query_kernel"],
        weights["key_kernel"],
        weights["query_bias"],
        ranks,
    )
    twin = keras.layers.MultiHeadAttention.from_config(mha.get_config())
    twin.build((None, None, query.shape[0]), (None, None, query.shape[0]))
    twin.set_weights(mha.get_weights())
    twin.query_dense.kernel.assign(query)
    twin.query_dense.bias.assign(query_bias)
    twin.key_dense.kernel.assign(key)
    twin.key_dense.bias.assign(key_bias)
    return twin, (query, key, query_bias)


def _attend(layer, x):
    # Keras 3.15's JAX fused attention needs key_dim == value_dim; asking for
    # the scores takes the einsum path, on every backend.
    output, scores = layer(x, x, return_attention_scores=True)
    return keras.ops.convert_to_numpy(output), keras.ops.convert_to_numpy(
        scores
    )


def test_low_rank_truncation_is_exact_at_full_rank():
    mha = _mha()
    twin, _ = _truncated_twin(mha, [4, 4])
    x = np.random.default_rng(1).standard_normal((2, 5, 16)).astype("float32")
    for got, want in zip(_attend(twin, x), _attend(mha, x)):
        np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-4)


def test_low_rank_truncation_is_the_best_approximation():
    mha = _mha()
    weights = _weights(mha)
    query, key, _, _ = compression.truncate_heads(
        weights["query_kernel"], weights["key_kernel"], None, [2, 1]
    )
    for head, rank in enumerate([2, 1]):
        product = (
            weights["query_kernel"][:, head] @ weights["key_kernel"][:, head].T
        )
        u, s, vt = np.linalg.svd(product.astype(np.float64))
        best = (u[:, :rank] * s[:rank]) @ vt[:rank]
        np.testing.assert_allclose(
            query[:, head] @ key[:, head].T, best, atol=1e-5
        )
        assert not query[:, head, rank:].any() and not key[:, head, rank:].any()


def test_zero_padded_truncation_equals_a_layer_with_smaller_key_dim():
    mha = _mha()
    twin, (query, key, query_bias) = _truncated_twin(mha, [2, 2])
    rank, scale = 2, np.sqrt(2 / 4)
    small = keras.layers.MultiHeadAttention(
        num_heads=2, key_dim=rank, value_dim=4
    )
    x = np.random.default_rng(2).standard_normal((2, 5, 16)).astype("float32")
    small.build((None, None, 16), (None, None, 16))
    for name in ("value_dense", "output_dense"):
        for target, source in zip(
            getattr(small, name).weights, getattr(mha, name).weights
        ):
            target.assign(source)
    small.query_dense.kernel.assign(query[:, :, :rank] * scale)
    small.query_dense.bias.assign(query_bias[:, :rank] * scale)
    small.key_dense.kernel.assign(key[:, :, :rank])
    small.key_dense.bias.assign(np.zeros((2, rank), "float32"))
    for got, want in zip(_attend(small, x), _attend(twin, x)):
        np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-4)


# ---------------------------------------------------------------------------
# Synthetic weights
# ---------------------------------------------------------------------------


def test_synthetic_kernels_have_a_decaying_spectrum():
    query, key = compression.synthetic_attention_kernels(
        64, 4, 8, decay=4.0, seed=1
    )
    assert query.shape == key.shape == (4, 64, 8)
    concatenated = np.transpose(query, (1, 0, 2)).reshape(64, 32)
    singular = np.linalg.svd(concatenated, compute_uv=False)
    np.testing.assert_allclose(
        singular / singular[0], 1 / (1 + np.arange(32) / 4.0), rtol=1e-8
    )
    again, _ = compression.synthetic_attention_kernels(
        64, 4, 8, decay=4.0, seed=1
    )
    np.testing.assert_array_equal(query, again)
