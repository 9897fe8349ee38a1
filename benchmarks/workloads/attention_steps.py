"""Timeable forward and forward+backward passes of attention layers.

Each backend runs the pass the way a user of that backend would run it fast:

- jax: `jax.jit` of a pure function built on `layer.stateless_call` (and
  `jax.value_and_grad` of it);
- tensorflow: `tf.function(jit_compile=True)` (XLA), with a
  `tf.GradientTape` for the backward pass;
- torch: eager (`"eager"`), or `torch.compile` (`"compile"`).

The backward pass computes the gradients with respect to the weights AND the
input, as inside a deep network. Its loss is the mean square of the output.

This module imports Keras: import it only once `KERAS_BACKEND` is set.
"""

import gc

import keras

from keras_collab import CollaborativeMultiHeadAttention

MODES = ("forward", "forward_backward")

# The variants each backend is timed with, the compiled one first.
VARIANTS = {
    "jax": ("jit",),
    "tensorflow": ("xla",),
    "torch": ("eager", "compile"),
}


def build_attention(
    inputs, num_heads, key_dim, shared_key_dim=None, shared_value_dim=None
):
    """Builds a self-attention layer on `inputs`.

    Args:
        inputs: `(batch, seq_len, dim)` tensor the layer is built for.
        num_heads: Number of heads.
        key_dim: Per-head key size of the multi-head attention.
        shared_key_dim: `None` for `keras.layers.MultiHeadAttention`, else
            the shared key size of a `CollaborativeMultiHeadAttention`.
        shared_value_dim: With `shared_key_dim`, the collaborative layer's
            shared value size, or `None` for per-head values.

    Returns:
        The built layer. `flash_attention` is left to Keras (`None`), which
        uses a fused kernel wherever the backend has one for the shapes.
    """
    if shared_key_dim is None:
        layer = keras.layers.MultiHeadAttention(num_heads, key_dim)
    else:
        layer = CollaborativeMultiHeadAttention(
            num_heads,
            key_dim,
            shared_key_dim=shared_key_dim,
            shared_value_dim=shared_value_dim,
        )
    layer(inputs, inputs)
    return layer


def make_step(layer, inputs, mode, variant, on_accelerator):
    """A function that runs one pass of `layer` on `inputs` and waits for it.

    Args:
        layer: A built attention layer.
        inputs: The self-attention input.
        mode: `"forward"` or `"forward_backward"`.
        variant: One of `VARIANTS[backend]`.
        on_accelerator: Whether the backend runs on a GPU or TPU, whose
            asynchronous execution must be waited for.

    Returns:
        A function of no arguments. Its first call traces and compiles.
    """
    if mode not in MODES:
        raise ValueError(f"Unknown mode {mode!r}; expected one of {MODES}")
    backend = keras.backend.backend()
    if variant not in VARIANTS[backend]:
        raise ValueError(
            f"Unknown variant {variant!r} for {backend}; expected one of "
            f"{VARIANTS[backend]}"
        )
    if backend == "jax":
        return _jax_step(layer, inputs, mode)
    if backend == "tensorflow":
        return _tensorflow_step(layer, inputs, mode, on_accelerator)
    return _torch_step(layer, inputs, mode, variant, on_accelerator)


def jax_buffer_bytes(layer, inputs, mode):
    """Bytes of the buffers XLA assigns to the compiled JAX pass.

    Exact and noise-free, unlike a measured peak: the temporaries plus the
    outputs of the compiled program, without its arguments (weights, input).
    """
    compiled = _jax_function(layer, mode)
    trainable, non_trainable = _jax_state(layer)
    analysis = (
        compiled.lower(trainable, non_trainable, inputs)
        .compile()
        .memory_analysis()
    )
    if analysis is None:
        return None
    return analysis.temp_size_in_bytes + analysis.output_size_in_bytes


def _jax_state(layer):
    trainable = [variable.value for variable in layer.trainable_variables]
    non_trainable = [
        variable.value for variable in layer.non_trainable_variables
    ]
    return trainable, non_trainable


def _jax_function(layer, mode):
    import jax
    import jax.numpy as jnp

    def forward(trainable, non_trainable, inputs):
        outputs, _ = layer.stateless_call(
            trainable, non_trainable, inputs, inputs
        )
        return outputs

    if mode == "forward":
        return jax.jit(forward)

    def loss(trainable, non_trainable, inputs):
        return jnp.mean(jnp.square(forward(trainable, non_trainable, inputs)))

    # Gradients with respect to the weights (argument 0) and input (2).
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 2)))


def _jax_step(layer, inputs, mode):
    import jax

    compiled = _jax_function(layer, mode)
    trainable, non_trainable = _jax_state(layer)

    def step():
        jax.block_until_ready(compiled(trainable, non_trainable, inputs))

    return step


def _tensorflow_step(layer, inputs, mode, on_accelerator):
    import tensorflow as tf

    if mode == "forward":

        @tf.function(jit_compile=True)
        def compiled(inputs):
            return layer(inputs, inputs)

    else:
        variables = layer.trainable_variables

        @tf.function(jit_compile=True)
        def compiled(inputs):
            with tf.GradientTape() as tape:
                tape.watch(inputs)
                loss = tf.reduce_mean(tf.square(layer(inputs, inputs)))
            return loss, tape.gradient(loss, [inputs, *variables])

    def step():
        compiled(inputs)
        if on_accelerator:
            tf.test.experimental.sync_devices()

    return step


def _torch_step(layer, inputs, mode, variant, on_accelerator):
    import torch

    def forward(inputs):
        return layer(inputs, inputs)

    def loss(inputs):
        return torch.mean(torch.square(layer(inputs, inputs)))

    if variant == "compile":
        forward = torch.compile(forward)
        loss = torch.compile(loss)

    def synchronize():
        if on_accelerator:
            torch.cuda.synchronize()

    if mode == "forward":

        def step():
            with torch.no_grad():
                forward(inputs)
            synchronize()

        return step

    parameters = [variable.value for variable in layer.trainable_variables]
    watched_inputs = inputs.detach().clone().requires_grad_(True)

    def step():
        torch.autograd.grad(loss(watched_inputs), [watched_inputs, *parameters])
        synchronize()

    return step


def reset_torch_compile_cache():
    """Forgets what `torch.compile` compiled.

    Every step compiles the same two Python functions (with a different layer
    in their closure), and dynamo silently falls back to eager once a
    function has been recompiled more than its cache size limit allows. The
    steps of one timing group stay below it; reset between groups.
    """
    import torch

    torch._dynamo.reset()


def release_cached_memory():
    """Hands memory cached by PyTorch's allocator back to the GPU.

    For another process to measure on the same GPU. JAX and TensorFlow keep
    what they allocated; `benchmarks.layer_speed` stops them from reserving
    it all up front.
    """
    gc.collect()
    if keras.backend.backend() == "torch":
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
