"""GPT-2 causal LMs decoding with KerasHub's `generate()`, and the timeable
pieces of it: the prefill (`_build_cache`) and the decode loop.

The models are `keras_hub.models.GPT2CausalLM`s with random weights and no
preprocessor, compiled with the greedy sampler, and their collaborative
twins from `keras_collab.convert_model` (data-free), which decode with the
compact per-layer cache of `keras_collab.hub.decoding`.

`generate()` runs one compiled program per batch: the prefill, one pass of
`call_with_cache` over all `max_length` positions that fills the cache,
then the sampler's loop, one `call_with_cache` of one token per new token.
KerasHub compiles it in `CausalLM.make_generate_function`: `jax.jit` of the
step in a `keras.StatelessScope` (JAX), `tf.function(jit_compile=True)`
(TensorFlow), eager under `torch.no_grad()` (PyTorch). `compile_like_generate`
compiles the two halves of the step the same way, so that each can be timed
apart:

- `prefill_function`: `model._build_cache(token_ids)`, the first line of
  `GPT2CausalLM.generate_step`;
- `decode_function`: the rest of `generate_step` (the sampler's loop), from
  a cache passed in. Called with every position of the padding mask set, it
  generates nothing: its time is the call's fixed cost (on XLA, the copy of
  the input cache into the loop, which `generate()` does not make), to be
  subtracted.

This module imports Keras and KerasHub: import it only once `KERAS_BACKEND`
is set.
"""

import itertools

import keras
import numpy as np
from keras import ops

import keras_collab


def build_causal_lm(shape, seed=0):
    """A `GPT2CausalLM` of the given shape, random weights, greedy sampler.

    Args:
        shape: `GPT2Backbone` arguments: `vocabulary_size`, `num_layers`,
            `num_heads`, `hidden_dim`, `intermediate_dim`,
            `max_sequence_length`.
        seed: Seed of the weights.
    """
    import keras_hub

    keras.utils.set_random_seed(seed)
    backbone = keras_hub.models.GPT2Backbone(**shape)
    causal_lm = keras_hub.models.GPT2CausalLM(backbone, preprocessor=None)
    causal_lm.compile(sampler="greedy")
    return causal_lm


def convert(causal_lm, shared_key_dim, max_iter, shared_value_dim=None):
    """The collaborative twin of `causal_lm` at D̃ = `shared_key_dim`.

    Data-free (`keras_collab.convert_model` on the weights alone), with at
    most `max_iter` decomposition sweeps per layer: decoding time does not
    depend on how well the factors fit.

    Args:
        causal_lm: The original `GPT2CausalLM`.
        shared_key_dim: D̃ of every layer.
        max_iter: Decomposition sweeps per layer (0: the spectral start).
        shared_value_dim: D̃_v of shared values in every layer, or `None`
            for per-head values.

    Returns:
        `(converted causal LM, seconds the conversion took)`.
    """
    conversion = keras_collab.convert_model(
        causal_lm,
        shared_key_dim=shared_key_dim,
        shared_value_dim=shared_value_dim,
        max_iter=max_iter,
    )
    return conversion.model, conversion.seconds


def attention_layers(causal_lm):
    """The self-attention layers of a GPT-2 causal LM, first to last."""
    return [
        layer._self_attention_layer
        for layer in causal_lm.backbone.transformer_layers
    ]


def prompts(batch_size, context, new_tokens, vocabulary_size, seed=0):
    """`generate()` inputs: `context` positions of which the last
    `new_tokens` are to be generated.

    Returns:
        A dict of NumPy arrays, `token_ids` (int32, zero where generated) and
        `padding_mask` (bool, true over the prompt), both
        `(batch_size, context)`.
    """
    if not 0 < new_tokens < context:
        raise ValueError(
            f"new_tokens={new_tokens} must be between 1 and context - 1 = "
            f"{context - 1}"
        )
    rng = np.random.default_rng(seed)
    token_ids = rng.integers(1, vocabulary_size, size=(batch_size, context))
    padding_mask = np.zeros((batch_size, context), bool)
    padding_mask[:, : context - new_tokens] = True
    token_ids = np.where(padding_mask, token_ids, 0).astype("int32")
    return {"token_ids": token_ids, "padding_mask": padding_mask}


def compile_like_generate(causal_lm, function):
    """`function` compiled the way KerasHub 0.32's `make_generate_function`
    compiles `generate_step` on this backend.

    Returns:
        A function taking the arguments of `function`.
    """
    backend = keras.backend.backend()
    if backend == "jax":
        return _jax_compiled(causal_lm, function)
    if backend == "tensorflow":
        import tensorflow as tf

        jit_compile = getattr(causal_lm, "jit_compile", True)
        return tf.function(function, jit_compile=jit_compile)
    if backend == "torch":
        import torch

        def no_grad(*args):
            with torch.no_grad():
                return function(*args)

        return no_grad
    raise ValueError(f"Unsupported backend {backend!r}")


def _jax_compiled(causal_lm, function):
    import jax

    sampler = causal_lm.sampler

    @jax.jit
    def compiled(state, *args):
        sampler_values, trainable, non_trainable = state
        mapping = itertools.chain(
            zip(sampler.variables, sampler_values),
            zip(causal_lm.trainable_variables, trainable),
            zip(causal_lm.non_trainable_variables, non_trainable),
        )
        with keras.StatelessScope(state_mapping=mapping):
            return function(*args)

    def call(*args):
        state = (
            [variable.value for variable in sampler.variables],
            [variable.value for variable in causal_lm.trainable_variables],
            [variable.value for variable in causal_lm.non_trainable_variables],
        )
        return compiled(state, *args)

    return call


def prefill_function(causal_lm):
    """Compiled `token_ids -> (hidden_states, cache)`: `_build_cache`."""
    return compile_like_generate(causal_lm, causal_lm._build_cache)


def empty_cache(causal_lm, batch_size, max_length):
    """The zero cache `_build_cache` starts from: KerasHub's
    `(batch, num_layers, 2, max_length, num_heads, head_dim)` tensor, or
    the converted model's tuple of compact per-layer caches."""
    layers = attention_layers(causal_lm)
    dtype = causal_lm.compute_dtype
    if all(
        isinstance(layer, keras_collab.CachedCollaborativeMultiHeadAttention)
        for layer in layers
    ):
        return tuple(
            layer.empty_cache(batch_size, max_length, dtype) for layer in layers
        )
    backbone = causal_lm.backbone
    head_dim = backbone.hidden_dim // backbone.num_heads
    shape = [
        batch_size,
        backbone.num_layers,
        2,
        max_length,
        backbone.num_heads,
        head_dim,
    ]
    return ops.zeros(shape, dtype=dtype)


def decode_function(causal_lm):
    """Compiled `inputs -> token_ids`: the decoding loop of
    `GPT2CausalLM.generate_step` (KerasHub 0.32), greedy, without stop
    tokens, from a zero cache made inside the compiled function.

    Decoding costs the same whatever the cache holds, so the prefill is
    left out: the loop runs over a zero cache (`empty_cache`) of the shape
    the prefill fills. Making it is the call's fixed cost, with the
    dispatch; a call whose padding mask is true everywhere generates no
    token and costs just that (see `decode_zero_tokens`).
    """

    def decode(inputs):
        token_ids = inputs["token_ids"]
        padding_mask = inputs["padding_mask"]
        batch_size, max_length = ops.shape(token_ids)[:2]
        cache = empty_cache(causal_lm, batch_size, max_length)
        hidden_states = ops.zeros(
            (batch_size, max_length, causal_lm.backbone.hidden_dim),
            dtype=causal_lm.compute_dtype,
        )
        row_lengths = ops.sum(ops.cast(padding_mask, "int32"), axis=-1)
        index = ops.min(row_lengths)

        def next(prompt, cache, index):
            cache_update_index = index - 1
            batch_size = ops.shape(prompt)[0]
            prompt = ops.slice(prompt, [0, cache_update_index], [batch_size, 1])
            logits, hidden_states, cache = causal_lm.call_with_cache(
                prompt, cache, cache_update_index
            )
            return (
                ops.squeeze(logits, axis=1),
                ops.squeeze(hidden_states, axis=1),
                cache,
            )

        return causal_lm.sampler(
            next=next,
            prompt=token_ids,
            cache=cache,
            index=index,
            mask=padding_mask,
            stop_token_ids=None,
            hidden_states=hidden_states,
            model=causal_lm,
        )

    return compile_like_generate(causal_lm, decode)


def decode_zero_tokens(inputs):
    """`inputs` with the padding mask true everywhere: `decode_function`
    then runs its loop zero times."""
    return {
        "token_ids": inputs["token_ids"],
        "padding_mask": np.ones_like(inputs["padding_mask"]),
    }


def to_tensors(inputs):
    return {key: ops.convert_to_tensor(value) for key, value in inputs.items()}


def synchronise(outputs, on_accelerator):
    """Waits until `outputs` (any structure of tensors) are computed.

    Every leaf's first element is brought to NumPy, which waits for the
    program that computes it; on an accelerator the device is synchronised
    as well.
    """
    for leaf in keras.tree.flatten(outputs):
        ops.convert_to_numpy(ops.reshape(leaf, (-1,))[:1])
    if not on_accelerator:
        return
    backend = keras.backend.backend()
    if backend == "torch":
        import torch

        torch.cuda.synchronize()
    elif backend == "tensorflow":
        import tensorflow as tf

        tf.test.experimental.sync_devices()


def tree_bytes(tree):
    """Bytes of all tensors of a structure."""
    return sum(
        int(np.prod(leaf.shape))
        * np.dtype(keras.backend.standardize_dtype(leaf.dtype)).itemsize
        for leaf in keras.tree.flatten(tree)
    )


def tree_shapes(tree):
    """Shapes of the tensors of a structure, as lists."""
    return [list(leaf.shape) for leaf in keras.tree.flatten(tree)]


def release_memory():
    """Frees what the backend caches between models (PyTorch's GPU cache)."""
    import gc

    gc.collect()
    if keras.backend.backend() == "torch":
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
