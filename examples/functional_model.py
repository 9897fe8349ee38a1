"""A small Transformer classifier with collaborative attention, on any backend.

    KERAS_BACKEND=jax python examples/functional_model.py

The task needs attention: a sequence is labelled 1 when its first token
appears again later in the sequence.
"""

import keras
import numpy as np

from keras_collab import CollaborativeMultiHeadAttention

VOCABULARY, LENGTH, WIDTH = 32, 12, 64


def make_data(samples, seed):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(1, VOCABULARY, size=(samples, LENGTH))
    labels = (tokens[:, 1:] == tokens[:, :1]).any(axis=1).astype("int32")
    return tokens, labels


def transformer_classifier(shared_key_dim=32):
    tokens = keras.Input((LENGTH,), dtype="int32", name="tokens")
    x = keras.layers.Embedding(VOCABULARY, WIDTH)(tokens)
    positions = keras.layers.Embedding(LENGTH, WIDTH)(keras.ops.arange(LENGTH))
    x = x + positions
    # 4 heads of key_dim 16 would need 64 key/query dimensions; they share 32.
    attention = CollaborativeMultiHeadAttention(
        num_heads=4, key_dim=16, shared_key_dim=shared_key_dim, dropout=0.1
    )
    x = keras.layers.LayerNormalization()(x + attention(x, x))
    x = keras.layers.LayerNormalization()(
        x + keras.layers.Dense(WIDTH)(keras.layers.Dense(128, "gelu")(x))
    )
    x = keras.layers.GlobalAveragePooling1D()(x)
    logits = keras.layers.Dense(2)(x)
    return keras.Model(tokens, logits)


def main():
    keras.utils.set_random_seed(0)
    model = transformer_classifier()
    model.compile(
        optimizer=keras.optimizers.Adam(3e-3),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    model.summary()
    train, validation = make_data(4096, seed=1), make_data(512, seed=2)
    model.fit(*train, validation_data=validation, epochs=5, batch_size=64)
    loss, accuracy = model.evaluate(*validation, verbose=0)
    print(
        f"backend={keras.backend.backend()} validation loss={loss:.3f} "
        f"accuracy={accuracy:.3f}"
    )


if __name__ == "__main__":
    main()
