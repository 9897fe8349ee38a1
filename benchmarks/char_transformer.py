"""A small causal Transformer language model with pluggable attention.

Pre-layer-norm blocks (attention, then a 4x-wide GELU MLP, each around a
residual connection), learned position embeddings, untied output layer.
Used by the `training` suite to compare attention layers at equal width.

This module imports Keras: import it only once `KERAS_BACKEND` is set.
"""

import keras
from keras import layers
from keras import ops

from keras_collab import CollaborativeMultiHeadAttention


class PositionEmbedding(keras.layers.Layer):
    """Adds a learned embedding of each position to a `(B, T, D)` input."""

    def __init__(self, max_length, **kwargs):
        super().__init__(**kwargs)
        self.max_length = max_length

    def build(self, input_shape):
        self.embeddings = self.add_weight(
            name="embeddings",
            shape=(self.max_length, input_shape[-1]),
            initializer=keras.initializers.RandomNormal(stddev=0.02),
        )

    def call(self, inputs):
        length = ops.shape(inputs)[1]
        return inputs + ops.cast(
            self.embeddings[:length], inputs.dtype
        )

    def get_config(self):
        return {**super().get_config(), "max_length": self.max_length}


def concatenated_attention(num_heads, total_key_dim, value_dim):
    """Keras multi-head attention whose heads split `total_key_dim`."""
    if total_key_dim % num_heads:
        raise ValueError(
            f"total_key_dim={total_key_dim} is not a multiple of "
            f"num_heads={num_heads}"
        )

    def make(name):
        return keras.layers.MultiHeadAttention(
            num_heads,
            key_dim=total_key_dim // num_heads,
            value_dim=value_dim,
            name=name,
        )

    return make


def collaborative_attention(num_heads, total_key_dim, value_dim):
    """Collaborative attention whose heads share a key of `total_key_dim`.

    The mixing matrix starts random whatever `total_key_dim` is: at full size
    the default would start as exact multi-head attention, and the point is
    to train collaborative heads from scratch. `key_dim` only sets the logit
    scale; it is the per-head size of a full-width model.
    """

    def make(name):
        return CollaborativeMultiHeadAttention(
            num_heads,
            key_dim=value_dim,
            value_dim=value_dim,
            shared_key_dim=total_key_dim,
            mixing_initializer="random_normal",
            name=name,
        )

    return make


def build_language_model(
    make_attention,
    seq_len,
    vocabulary_size,
    width=128,
    depth=2,
    mlp_ratio=4,
    name="char_transformer",
):
    """A causal Transformer mapping `(B, seq_len)` codes to next-code logits.

    Args:
        make_attention: Function of a layer name returning an attention layer
            (see `concatenated_attention` and `collaborative_attention`).
        seq_len: Length of the input sequences.
        vocabulary_size: Number of distinct input codes.
        width: Model width D.
        depth: Number of Transformer blocks.
        mlp_ratio: Hidden width of the MLPs, in multiples of `width`.
        name: Model name.

    Returns:
        An uncompiled `keras.Model`.
    """
    tokens = keras.Input((seq_len,), dtype="int32", name="tokens")
    x = layers.Embedding(vocabulary_size, width, name="token_embedding")(
        tokens
    )
    x = PositionEmbedding(seq_len, name="position_embedding")(x)
    for block in range(depth):
        normed = layers.LayerNormalization(name=f"block{block}_norm1")(x)
        attended = make_attention(f"block{block}_attention")(
            normed, normed, use_causal_mask=True
        )
        x = layers.Add(name=f"block{block}_residual1")([x, attended])
        normed = layers.LayerNormalization(name=f"block{block}_norm2")(x)
        hidden = layers.Dense(
            mlp_ratio * width, activation="gelu", name=f"block{block}_mlp1"
        )(normed)
        x = layers.Add(name=f"block{block}_residual2")(
            [x, layers.Dense(width, name=f"block{block}_mlp2")(hidden)]
        )
    x = layers.LayerNormalization(name="final_norm")(x)
    logits = layers.Dense(vocabulary_size, name="logits")(x)
    return keras.Model(tokens, logits, name=name)
