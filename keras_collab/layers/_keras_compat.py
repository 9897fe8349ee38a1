"""The only module of keras-collab that imports private Keras (`keras.src`).

Everything Keras does not export publicly, and keras-collab needs, is named
here once, so that a Keras release that moves one of them breaks one import
in one file, and `pyproject.toml` pins Keras below its next minor version.
The einsum helpers are written here rather than imported: Keras' own are
underscore functions of its attention module.
"""

import string

from keras.src.backend import get_keras_mask
from keras.src.backend import set_keras_mask
from keras.src.models.functional import Functional

__all__ = [
    "Functional",
    "get_keras_mask",
    "projection_equation",
    "projection_output_shape",
    "set_keras_mask",
]


def projection_equation(free_dims, output_dims):
    """An `EinsumDense` equation that projects the last axis onto new axes.

    The input has `free_dims` leading axes that are kept (batch and
    positions) and one feature axis that is contracted; the kernel maps it
    to `output_dims` new axes (e.g. `(heads, head_dim)`).

    Args:
        free_dims: Number of input axes kept as they are.
        output_dims: Number of axes the feature axis becomes.

    Returns:
        `(equation, bias_axes, output_rank)`; the bias spans the new axes.

    Example:

    >>> projection_equation(2, 2)
    ('abc,cde->abde', 'de', 4)
    """
    letters = string.ascii_lowercase
    free = letters[:free_dims]
    bound = letters[free_dims]
    new = letters[free_dims + 1 : free_dims + 1 + output_dims]
    equation = f"{free}{bound},{bound}{new}->{free}{new}"
    return equation, new, free_dims + output_dims


def projection_output_shape(output_rank, known_last_dims):
    """The `output_shape` of an `EinsumDense`, batch axis excluded: unknown
    positions followed by `known_last_dims`.

    Example:

    >>> projection_output_shape(3, [4])
    [None, None, 4]
    """
    unknown = output_rank - len(known_last_dims)
    return [None] * unknown + list(known_last_dims)
