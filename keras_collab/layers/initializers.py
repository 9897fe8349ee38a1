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
    standard multi-head attention. The same holds for the value mixing
    `(num_heads, shared_value_dim)` at `shared_value_dim == num_heads *
    value_dim`: head `h` writes only its own `value_dim` block of the output
    projection's input.

    Example:

    >>> mixing = ConcatenateMixing()((2, 4))
    >>> keras.ops.convert_to_numpy(mixing).tolist()
    [[1.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 1.0]]
    """

    def __call__(self, shape, dtype=None):
        num_heads, width = shape
        if width % num_heads:
            raise ValueError(
                "`'concatenate'` mixing needs its width (`shared_key_dim`, "
                "or `shared_value_dim` for the value mixing) to be a "
                "multiple of `num_heads`. Received: "
                f"num_heads={num_heads}, width={width}"
            )
        block = width // num_heads
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


def get_value_mixing_initializer(
    identifier, num_heads, value_dim, shared_value_dim
):
    """Resolves the `value_mixing_initializer` argument of the layer.

    `None` picks `"concatenate"` at full size (`shared_value_dim ==
    num_heads * value_dim`: exact multi-head attention) and
    `"random_normal"` otherwise. `"random_normal"` draws entries of
    variance `1 / num_heads`. The output projection reads `Σ_h n_h ⊙
    context_h`: each of its inputs sums `num_heads` products of a mixing
    entry with a context entry. With independent zero-mean mixing entries
    the cross terms vanish in expectation, whatever the correlation
    between heads' contexts, so that sum has the variance of one context
    entry, as it does with concatenated heads (where exactly one `n_h` is
    1 on each coordinate): the output kernel's usual initialization sees
    inputs of the usual scale. Any other identifier goes through
    `keras.initializers.get`.

    Example:

    >>> initializer = get_value_mixing_initializer(None, 4, 8, 32)
    >>> type(initializer).__name__
    'ConcatenateMixing'
    >>> get_value_mixing_initializer(None, 4, 8, 16).stddev
    0.5
    """
    if identifier is None:
        full_size = shared_value_dim == num_heads * value_dim
        identifier = "concatenate" if full_size else "random_normal"
    if identifier == "concatenate":
        return ConcatenateMixing()
    if identifier == "random_normal":
        return keras.initializers.RandomNormal(stddev=math.sqrt(1 / num_heads))
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
