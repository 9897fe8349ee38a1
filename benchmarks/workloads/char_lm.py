"""A small causal Transformer character model, and how it is trained.

Pre-layer-norm blocks (attention, then a 4x-wide GELU MLP, each around a
residual connection), learned position embeddings, untied output layer.
Used by the `training` suite to compare attention layers at equal width.

This module imports Keras: import it only once `KERAS_BACKEND` is set.
"""

import math
import time

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
        return inputs + ops.cast(self.embeddings[:length], inputs.dtype)

    def get_config(self):
        return {**super().get_config(), "max_length": self.max_length}


def concatenated_attention(num_heads, total_key_dim, value_dim):
    """Causal Keras multi-head attention whose heads split `total_key_dim`.

    Returns:
        A function of a layer name returning a function that applies a new
        attention layer of that name to a `(B, T, D)` tensor.
    """
    if total_key_dim % num_heads:
        raise ValueError(
            f"total_key_dim={total_key_dim} is not a multiple of "
            f"num_heads={num_heads}"
        )
    key_dim = total_key_dim // num_heads
    # Keras 3.15's JAX `dot_product_attention` shapes its output with the
    # query's head size, so Keras MHA fails when key and value heads differ.
    # Asking for the attention scores sends MHA down its einsum path, which
    # computes the same output.
    via_scores = keras.backend.backend() == "jax" and key_dim != value_dim

    def make(name):
        layer = keras.layers.MultiHeadAttention(
            num_heads, key_dim=key_dim, value_dim=value_dim, name=name
        )

        def attend(inputs):
            if via_scores:
                outputs, _ = layer(
                    inputs,
                    inputs,
                    use_causal_mask=True,
                    return_attention_scores=True,
                )
                return outputs
            return layer(inputs, inputs, use_causal_mask=True)

        return attend

    return make


def collaborative_attention(num_heads, total_key_dim, value_dim):
    """Causal collaborative attention sharing a key of `total_key_dim`.

    The mixing matrix starts random whatever `total_key_dim` is: at full size
    the default would start as exact multi-head attention, and the point is
    to train collaborative heads from scratch. `key_dim` only sets the logit
    scale; it is the per-head size of a full-width model.

    Returns:
        A function of a layer name returning a function that applies a new
        attention layer of that name to a `(B, T, D)` tensor.
    """

    def make(name):
        layer = CollaborativeMultiHeadAttention(
            num_heads,
            key_dim=value_dim,
            value_dim=value_dim,
            shared_key_dim=total_key_dim,
            mixing_initializer="random_normal",
            name=name,
        )
        return lambda inputs: layer(inputs, inputs, use_causal_mask=True)

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
        make_attention: Function of a layer name returning a function that
            applies causal self-attention (see `concatenated_attention` and
            `collaborative_attention`).
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
    x = layers.Embedding(vocabulary_size, width, name="token_embedding")(tokens)
    x = PositionEmbedding(seq_len, name="position_embedding")(x)
    for block in range(depth):
        normed = layers.LayerNormalization(name=f"block{block}_norm1")(x)
        attended = make_attention(f"block{block}_attention")(normed)
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


class StepTimer(keras.callbacks.Callback):
    """Measures the time per training step once compiled and warmed up.

    With asynchronous backends a step's end is only its dispatch, so the
    average over many steps is used: dispatch is throttled by execution.
    """

    def __init__(self, warmup_steps=5):
        super().__init__()
        self.warmup_steps = warmup_steps
        self.step_ends = []

    def on_train_batch_end(self, batch, logs=None):
        self.step_ends.append(time.perf_counter())

    def steady_step_ms(self):
        """Mean milliseconds per step after warm-up, `None` if too few."""
        ends = self.step_ends[self.warmup_steps :]
        if len(ends) < 2:
            return None
        return 1e3 * (ends[-1] - ends[0]) / (len(ends) - 1)


def warmup_cosine_adamw(
    steps,
    learning_rate,
    warmup_fraction,
    weight_decay,
    global_clipnorm,
):
    """AdamW with linear warm-up then cosine decay to zero over `steps`."""
    warmup_steps = max(1, int(warmup_fraction * steps))
    schedule = keras.optimizers.schedules.CosineDecay(
        initial_learning_rate=0.0,
        decay_steps=max(1, steps - warmup_steps),
        warmup_target=learning_rate,
        warmup_steps=warmup_steps,
    )
    return keras.optimizers.AdamW(
        learning_rate=schedule,
        weight_decay=weight_decay,
        global_clipnorm=global_clipnorm,
    )


def train_and_evaluate(model, optimizer, training, validation, batch_size):
    """Trains `model` for one pass over `training`, then evaluates it.

    Args:
        model: An uncompiled language model from `build_language_model`.
        optimizer: A Keras optimizer.
        training: `(inputs, targets)` arrays; one step per `batch_size`
            windows, in order.
        validation: `(inputs, targets)` arrays.
        batch_size: Windows per step.

    Returns:
        A dict with the validation loss (nats per character) and bits per
        character, the wall time of `fit` (compilation included), the time
        per step once compiled, and the parameter counts.
    """
    model.compile(
        optimizer=optimizer,
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    timer = StepTimer()
    start = time.perf_counter()
    model.fit(
        *training,
        batch_size=batch_size,
        epochs=1,
        shuffle=False,
        verbose=0,
        callbacks=[timer],
    )
    fit_s = time.perf_counter() - start
    validation_loss = float(
        model.evaluate(*validation, batch_size=batch_size, verbose=0)
    )
    return {
        "validation_loss": validation_loss,
        "validation_bpc": validation_loss / math.log(2),
        "fit_s": fit_s,
        "step_ms": timer.steady_step_ms(),
        "parameters": model.count_params(),
        "attention_parameters": sum(
            layer.count_params()
            for layer in model.layers
            if isinstance(layer, keras.layers.MultiHeadAttention)
        ),
    }
