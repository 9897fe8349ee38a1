"""Initializers for the mixing matrix of collaborative attention."""

import math

import keras
import numpy as np


@keras.saving.register_keras_serializable(package="keras_collab")
class ConcatenateMixing(keras.initializers.Initializer):
    """Mixing matrix that makes collaborative heads behave as concatenated ones.

    Row `h` of the `(num_heads, shared_key_dim)` mixing matrix is the indicator
    of the `h`-th block of `shared_key_dim // num_heads` columns. With
    `shared_key_dim == num_heads * key_dim`, head `h` then only sees its own
    `key_dim` slice of the shared query and key projections, which is exactly
    standard multi-head attention.

    Example:

    >>> mixing = ConcatenateMixing()((2, 4))
    >>> keras.ops.convert_to_numpy(mixing).tolist()
    [[1.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 1.0]]
    """

    def __call__(self, shape, dtype=None):
        num_heads, shared_key_dim = shape
        if shared_key_dim % num_heads:
            raise ValueError(
                "`mixing_initializer='concatenate'` needs `shared_key_dim` to "
                "be a multiple of `num_heads`. Received: "
                f"num_heads={num_heads}, shared_key_dim={shared_key_dim}"
            )
        block = shared_key_dim // num_heads
        mixing = np.repeat(np.eye(num_heads), block, axis=1)
        return keras.ops.convert_to_tensor(
            mixing, dtype=dtype or keras.backend.floatx()
        )


def get_mixing_initializer(identifier, num_heads, key_dim, shared_key_dim):
    """Resolves the `mixing_initializer` argument of the layer.

    `None` picks `"concatenate"` at full size (exact multi-head attention) and
    `"random_normal"` otherwise. `"random_normal"` is scaled so that, at
    initialization, the logits of a collaborative head have the variance of a
    concatenated head: the logit sums `shared_key_dim` products instead of
    `key_dim`, so each mixing entry gets variance `key_dim / shared_key_dim`.
    Any other identifier goes through `keras.initializers.get`.
    """
    if identifier is None:
        full_size = shared_key_dim == num_heads * key_dim
        identifier = "concatenate" if full_size else "random_normal"
    if identifier == "concatenate":
        return ConcatenateMixing()
    if identifier == "random_normal":
        return keras.initializers.RandomNormal(
            stddev=math.sqrt(key_dim / shared_key_dim)
        )
    return keras.initializers.get(identifier)


def clone_initializer(initializer):
    """A fresh copy of `initializer`, so that two weights drawn from one
    user-given initializer object get different values.

    KerasHub has the same helper (`keras_hub.src.utils.keras_utils`); the
    layer does not depend on KerasHub, hence this copy. Identifiers that are
    not `Initializer` objects are returned as they are.
    """
    if not isinstance(initializer, keras.initializers.Initializer):
        return initializer
    return initializer.__class__.from_config(initializer.get_config())
