"""A function compiled by the current Keras backend, for inference only.

`compile_inference(function)` returns `function` traced and compiled the
way each backend runs Keras models fastest without a gradient:

* TensorFlow: a `tf.function` (a graph, no XLA: one trace per input shape
  and no compile step worth the name);
* JAX: `jax.jit` (one XLA compilation per input shape);
* PyTorch: eager, under `torch.no_grad()` (nothing to retrace; PyTorch's
  eager kernels are what Keras runs too, unless `jit_compile=True`);
* NumPy: the function itself.

The function must be pure in the backend's sense: on JAX it may not read
variable values it was not given, so Keras models are called through
`stateless_call` with their variables' values as arguments.
"""

import keras


def compile_inference(function):
    """`function` compiled once per input structure and shape.

    Args:
        function: A Python function of backend tensors (and nested lists,
            tuples and dicts of them) that returns the same kind of
            structure.

    Returns:
        A callable with the signature of `function`.

    Example:

    >>> double = compile_inference(lambda x: keras.ops.multiply(x, 2.0))
    >>> float(keras.ops.convert_to_numpy(double(keras.ops.ones(()))))
    2.0
    """
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        # Without `reduce_retracing`, every trace keeps its static shapes.
        return tf.function(function, jit_compile=False)
    if backend == "jax":
        import jax

        return jax.jit(function)
    if backend == "torch":
        import torch

        def without_gradient(*args, **kwargs):
            with torch.no_grad():
                return function(*args, **kwargs)

        return without_gradient
    return function
