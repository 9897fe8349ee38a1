"""Collaborative attention with KerasHub's key/value cache contract."""

import keras
from keras import ops

from keras_collab.layers.collaborative_multi_head_attention import (
    CollaborativeMultiHeadAttention,
)


@keras.saving.register_keras_serializable(package="keras_collab")
class CachedCollaborativeMultiHeadAttention(CollaborativeMultiHeadAttention):
    """Collaborative attention that decodes with KerasHub's cache.

    A drop-in for `keras_hub.layers.CachedMultiHeadAttention`, the attention of
    KerasHub's GPT-2, OPT and BART decoders: same call signature, same cache
    tensor of shape `(batch, 2, max_length, num_heads, key_dim)` holding keys
    at index 0 and values at index 1, so `generate()` works unchanged.

    The cache keeps its shape: the key slot of a position, `num_heads *
    key_dim` numbers, holds the shared key (`shared_key_dim` numbers) followed
    by the position's content-bias logits (`num_heads` numbers) and zeros. A
    cache that actually shrinks with `shared_key_dim` needs a new contract
    with the decoder and is left for later work.

    Args:
        **kwargs: Those of `CollaborativeMultiHeadAttention`. `value_dim` must
            equal `key_dim` (keys and values share the cache tensor), and with
            a content bias `shared_key_dim + num_heads <= num_heads * key_dim`.

    Call arguments:
        query: Query tensor of shape `(B, T, dim)`.
        value: Value tensor of shape `(B, S, dim)`.
        key: Optional key tensor of shape `(B, S, dim)`.
        attention_mask: Optional boolean mask broadcastable to `(B, T, S)`.
        cache: Optional cache of shape `(B, 2, max_length, num_heads,
            key_dim)`.
        cache_update_index: Position at which `key`/`value` are written into
            the cache; `None` reads the cache as is.
        return_attention_scores: Whether to return the probabilities.
        training: Whether dropout is active.

    Returns:
        The attention output, then the scores if asked for, then the updated
        cache if a cache was passed.

    Example:

    >>> layer = CachedCollaborativeMultiHeadAttention(
    ...     num_heads=2, key_dim=8, shared_key_dim=6
    ... )
    >>> x = keras.random.normal((1, 4, 16))
    >>> cache = keras.ops.zeros((1, 2, 4, 2, 8))
    >>> output, cache = layer(x, x, cache=cache, cache_update_index=0)
    """

    def build(self, query_shape, value_shape, key_shape=None):
        slot = self._num_heads * self._key_dim
        needed = self._shared_key_dim + (
            self._num_heads if self._use_content_bias else 0
        )
        if needed > slot:
            raise ValueError(
                "The cache slot of a key holds num_heads * key_dim = "
                f"{slot} numbers, but shared_key_dim={self._shared_key_dim} "
                + (
                    f"plus {self._num_heads} content-bias logits "
                    if self._use_content_bias
                    else ""
                )
                + f"need {needed}. Use shared_key_dim <= "
                + f"{slot - self._num_heads} "
                "or use_content_bias=False."
            )
        if self._value_dim != self._key_dim:
            raise ValueError(
                "Cached attention stores keys and values in one tensor, so "
                f"`value_dim` ({self._value_dim}) must equal `key_dim` "
                f"({self._key_dim})."
            )
        super().build(query_shape, value_shape, key_shape)

    def _pack_keys(self, key):
        """Shared keys and content logits, laid out as a cache key slot."""
        packed = self._key_dense(key)
        if self._use_content_bias:
            content = ops.cast(self._content_logits(key), packed.dtype)
            packed = ops.concatenate([packed, content], axis=-1)
        slot = self._num_heads * self._key_dim
        padding = slot - packed.shape[-1]
        if padding:
            packed = ops.pad(packed, [[0, 0], [0, 0], [0, padding]])
        shape = ops.shape(packed)
        return ops.reshape(
            packed, (shape[0], shape[1], self._num_heads, self._key_dim)
        )

    def _unpack_keys(self, packed):
        shape = ops.shape(packed)
        flat = ops.reshape(packed, (shape[0], shape[1], -1))
        shared_key = flat[..., : self._shared_key_dim]
        content = None
        if self._use_content_bias:
            end = self._shared_key_dim + self._num_heads
            content = flat[..., self._shared_key_dim : end]
        return shared_key, content

    def call(
        self,
        query,
        value,
        key=None,
        attention_mask=None,
        cache=None,
        cache_update_index=None,
        return_attention_scores=False,
        training=None,
    ):
        if key is None:
            key = value
        shared_query = self._query_dense(query)
        if cache is not None:
            key_cache = cache[:, 0, ...]
            value_cache = cache[:, 1, ...]
            if cache_update_index is None:
                packed_key, projected_value = key_cache, value_cache
            else:
                start = [0, cache_update_index, 0, 0]
                packed_key = ops.slice_update(
                    key_cache, start, self._pack_keys(key)
                )
                projected_value = ops.slice_update(
                    value_cache, start, self._value_dense(value)
                )
                cache = ops.stack((packed_key, projected_value), axis=1)
            shared_key, content_logits = self._unpack_keys(packed_key)
        else:
            if cache_update_index is not None:
                raise ValueError(
                    "`cache_update_index` should not be set if `cache` is "
                    f"`None`. Received: cache={cache}, "
                    f"cache_update_index={cache_update_index}"
                )
            shared_key = self._key_dense(key)
            content_logits = self._content_logits(key)
            projected_value = self._value_dense(value)

        attention_output, attention_scores = (
            self._compute_collaborative_attention(
                shared_query,
                shared_key,
                projected_value,
                content_logits,
                attention_mask,
                training=training,
                return_attention_scores=return_attention_scores,
            )
        )
        attention_output = self._output_dense(attention_output)
        if return_attention_scores and cache is not None:
            return attention_output, attention_scores, cache
        if return_attention_scores:
            return attention_output, attention_scores
        if cache is not None:
            return attention_output, cache
        return attention_output
