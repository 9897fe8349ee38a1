"""Collaborative attention that decodes with a key/value cache."""

import keras
from keras import ops

from keras_collab.layers.collaborative_multi_head_attention import (
    CollaborativeMultiHeadAttention,
)
from keras_collab.layers.collaborative_multi_head_attention import _rank4_mask

COMPACT = "compact"
KERAS_HUB = "keras_hub"


@keras.saving.register_keras_serializable(package="keras_collab")
class CachedCollaborativeMultiHeadAttention(CollaborativeMultiHeadAttention):
    """Collaborative attention that decodes with a key/value cache.

    A drop-in for `keras_hub.layers.CachedMultiHeadAttention`, the attention
    of KerasHub's GPT-2, OPT and BART decoders: same call signature, and it
    reads and writes either of two cache layouts, told apart by rank.

    * **Compact** (rank 4), what keras-collab's decoders use:
      `(batch, 1, max_length, cache_width)`. Each position holds exactly
      what collaborative attention needs of a key: the shared key
      (`shared_key_dim` numbers), the content-bias logits (`num_heads`, only
      with a content bias), then the values of every head
      (`num_heads * value_dim`), or with shared values the shared value
      `Ṽ` (`shared_value_dim` numbers). Nothing is padded, so the key part
      of the cache shrinks with D̃ and the value part with D̃_v. The axis
      of size 1 keeps `max_length` on axis 2, where KerasHub's
      `TransformerDecoder` reads it.
      `empty_cache(batch_size, max_length)` makes one.
    * **KerasHub's** (rank 5): `(batch, 2, max_length, num_heads, key_dim)`
      with keys at index 0 and values at index 1, so that KerasHub's own
      decoding loops work unchanged. A key slot of `num_heads * key_dim`
      numbers holds the shared key and the content logits, padded with
      zeros: it saves no memory, and needs `value_dim == key_dim`,
      `shared_key_dim (+ num_heads) <= num_heads * key_dim` and per-head
      values (no `shared_value_dim`).

    Args:
        **kwargs: Those of `CollaborativeMultiHeadAttention`.

    Call arguments:
        query: Query tensor of shape `(B, T, dim)`.
        value: Value tensor of shape `(B, S, dim)`.
        key: Optional key tensor of shape `(B, S, dim)`.
        attention_mask: Optional boolean mask broadcastable to `(B, T, S)`
            (with a cache, `S` is `max_length`).
        cache: Optional cache in either layout above.
        cache_update_index: Position at which `key`/`value` are written into
            the cache; `None` reads the cache as it is (e.g. the encoder
            side of cross-attention, computed once).
        return_attention_scores: Whether to return the probabilities.
        training: Whether dropout is active.

    Returns:
        The attention output, then the scores if asked for, then the updated
        cache if a cache was passed.

    As in KerasHub's `CachedMultiHeadAttention`, a gate (`use_gate`) is not
    applied.

    Example:

    >>> layer = CachedCollaborativeMultiHeadAttention(
    ...     num_heads=2, key_dim=8, shared_key_dim=6
    ... )
    >>> x = keras.random.normal((1, 4, 16))
    >>> _ = layer(x, x)
    >>> layer.cache_width  # 6 shared key + 2 content logits + 2 * 8 values
    24
    >>> cache = layer.empty_cache(batch_size=1, max_length=4)
    >>> output, cache = layer(x, x, cache=cache, cache_update_index=0)
    >>> tuple(cache.shape)
    (1, 1, 4, 24)

    With shared values the cache holds `Ṽ` instead of per-head values:

    >>> layer = CachedCollaborativeMultiHeadAttention(
    ...     num_heads=2, key_dim=8, shared_key_dim=6, shared_value_dim=5
    ... )
    >>> _ = layer(x, x)
    >>> layer.cache_width  # 6 shared key + 2 content logits + 5 values
    13
    """

    @property
    def cache_width(self):
        """Numbers per position of the compact cache: shared key, content
        logits (with a content bias) and the values of every head, or the
        shared value."""
        content = self._num_heads if self._use_content_bias else 0
        values = self._shared_value_dim
        if values is None:
            values = self._num_heads * self._value_dim
        return self._shared_key_dim + content + values

    def empty_cache(self, batch_size, max_length, dtype=None):
        """A zero compact cache of shape `(batch_size, 1, max_length,
        cache_width)`, in the layer's compute dtype by default."""
        return ops.zeros(
            (batch_size, 1, max_length, self.cache_width),
            dtype=dtype or self.compute_dtype,
        )

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
        if cache is None:
            if cache_update_index is not None:
                raise ValueError(
                    "`cache_update_index` should not be set if `cache` is "
                    f"`None`. Received: cache={cache}, "
                    f"cache_update_index={cache_update_index}"
                )
            shared_key, content_logits, projected_value = (
                self._key_dense(key),
                self._content_logits(key),
                self._value_dense(value),
            )
        else:
            layout = self._cache_layout(cache)
            if cache_update_index is not None:
                cache = self._update_cache(
                    cache, layout, key, value, cache_update_index
                )
            shared_key, content_logits, projected_value = self._read_cache(
                cache, layout
            )
        attention_output, attention_scores = self._compute_attention(
            shared_query,
            shared_key,
            projected_value,
            _rank4_mask(attention_mask),
            training,
            return_attention_scores,
            content_logits=content_logits,
        )
        attention_output = self._combine_heads(attention_output)
        outputs = (attention_output,)
        if return_attention_scores:
            outputs += (attention_scores,)
        if cache is not None:
            outputs += (cache,)
        return outputs[0] if len(outputs) == 1 else outputs

    def _update_cache(self, cache, layout, key, value, cache_update_index):
        """`cache` with the entries of `key`/`value` written from position
        `cache_update_index` on."""
        update = self._cache_entries(key, value, layout)
        if layout == KERAS_HUB:
            # Keys at index 0 and values at 1, each (B, L, H, d).
            start = [0, cache_update_index, 0, 0]
            return ops.stack(
                [
                    ops.slice_update(cache[:, i], start, entries)
                    for i, entries in enumerate(update)
                ],
                axis=1,
            )
        start = [0, 0, cache_update_index, 0]
        return ops.slice_update(cache, start, update)

    def _cache_layout(self, cache):
        """Which layout `cache` has; its sizes are checked against the
        layer's."""
        shape = tuple(cache.shape)
        if len(shape) == 4:
            if shape[1] != 1 or shape[3] != self.cache_width:
                raise ValueError(
                    "A compact cache must have shape (batch, 1, max_length, "
                    f"cache_width={self.cache_width}). Received: "
                    f"cache.shape={shape}"
                )
            return COMPACT
        if len(shape) == 5:
            self._check_keras_hub_layout(shape)
            return KERAS_HUB
        raise ValueError(
            "`cache` must have shape (batch, 1, max_length, cache_width) or "
            "KerasHub's (batch, 2, max_length, num_heads, key_dim). "
            f"Received: cache.shape={shape}"
        )

    def _check_keras_hub_layout(self, shape):
        if self._shared_value_dim is not None:
            raise ValueError(
                "KerasHub's cache layout holds per-head values "
                "(batch, 2, max_length, num_heads, key_dim); this layer "
                f"shares its values (shared_value_dim="
                f"{self._shared_value_dim}). Use the compact cache "
                "(`empty_cache`)."
            )
        expected = (2, self._num_heads, self._key_dim)
        if (shape[1], shape[3], shape[4]) != expected:
            raise ValueError(
                "KerasHub's cache layout must have shape (batch, 2, "
                f"max_length, {self._num_heads}, {self._key_dim}). Received: "
                f"cache.shape={shape}"
            )
        slot = self._num_heads * self._key_dim
        content = self._num_heads if self._use_content_bias else 0
        if self._shared_key_dim + content > slot:
            raise ValueError(
                "KerasHub's cache layout holds num_heads * key_dim = "
                f"{slot} numbers per key, but shared_key_dim="
                f"{self._shared_key_dim} plus {content} content-bias logits "
                "need more. Use the compact cache (`empty_cache`)."
            )
        if self._value_dim != self._key_dim:
            raise ValueError(
                "KerasHub's cache layout stores keys and values in one "
                f"tensor, so `value_dim` ({self._value_dim}) must equal "
                f"`key_dim` ({self._key_dim}). Use the compact cache "
                "(`empty_cache`)."
            )

    def _cache_entries(self, key, value, layout):
        """What the cache stores for new positions: `(B, 1, S, width)` in
        the compact layout, `(keys, values)` of shape `(B, S, H, key_dim)`
        in KerasHub's."""
        shared_key = self._key_dense(key)
        parts = [shared_key]
        if self._use_content_bias:
            content = self._content_logits(key)
            parts.append(ops.cast(content, shared_key.dtype))
        projected_value = self._value_dense(value)
        if layout == KERAS_HUB:
            packed = ops.concatenate(parts, axis=-1)
            padding = self._num_heads * self._key_dim - packed.shape[-1]
            if padding:
                packed = ops.pad(packed, [[0, 0], [0, 0], [0, padding]])
            shape = ops.shape(packed)
            keys = ops.reshape(
                packed, (shape[0], shape[1], self._num_heads, self._key_dim)
            )
            return keys, projected_value
        # Per-head values (B, S, H, d_v) flattened; shared ones (B, S, D̃_v).
        shape = ops.shape(projected_value)
        parts.append(ops.reshape(projected_value, (shape[0], shape[1], -1)))
        return ops.expand_dims(ops.concatenate(parts, axis=-1), 1)

    def _read_cache(self, cache, layout):
        """`(shared keys, content logits or None, values)`; the values are
        `(B, S, H, d_v)`, or `(B, S, D̃_v)` when shared."""
        if layout == KERAS_HUB:
            keys, projected_value = cache[:, 0], cache[:, 1]
            shape = ops.shape(keys)
            flat = ops.reshape(keys, (shape[0], shape[1], -1))
        else:
            flat = cache[:, 0]
            shape = ops.shape(flat)
            projected_value = None
        end = self._shared_key_dim
        shared_key = flat[..., :end]
        content_logits = None
        if self._use_content_bias:
            content_logits = flat[..., end : end + self._num_heads]
            end += self._num_heads
        if projected_value is None and self._shared_value_dim is not None:
            projected_value = flat[..., end:]
        elif projected_value is None:
            projected_value = ops.reshape(
                flat[..., end:],
                (shape[0], shape[1], self._num_heads, self._value_dim),
            )
        return shared_key, content_logits, projected_value
