"""Collaborative multi-head attention (Cordonnier, Loukas & Jaggi, 2020)."""

import dataclasses
import inspect

import keras
import numpy as np
from keras import ops

from keras_collab.layers._keras_compat import get_keras_mask
from keras_collab.layers._keras_compat import projection_equation
from keras_collab.layers._keras_compat import projection_output_shape
from keras_collab.layers._keras_compat import set_keras_mask
from keras_collab.layers.initializers import clone_initializer
from keras_collab.layers.initializers import get_mixing_initializer
from keras_collab.layers.initializers import get_value_mixing_initializer
from keras_collab.layers.weights import unshared_copy

# Masked logits get this value. Large and finite, as in Keras MHA, so that a
# fully masked row softmaxes to a uniform (finite) distribution.
_MASK_VALUE_FLOAT32 = -1e9
# Up to this many query rows (decoding steps, short prompts), attention with
# shared values runs query-major on XLA: each head's matmuls then do fewer
# than 2 * 16 FLOPs per element of K̃ and Ṽ they read, so reading them once
# for all heads beats one read per head (the `decode` benchmark's results).
_QUERY_MAJOR_MAX_ROWS = 16
# Up to this many query rows in all (batch times queries, e.g. one sequence
# of 128 tokens), past `_QUERY_MAJOR_MAX_ROWS`, the all-heads einsums run
# faster on XLA:CPU than one head at a time: the work is too small to
# repay 12 heads' worth of separate operations (layer timings at MiniLM
# shape, batch 1 and 4 against 32; the `inference` benchmark's batch 1).
_EINSUM_MAX_QUERY_ROWS = 128


@dataclasses.dataclass
class CollaborativeQueryKey:
    """The query/key side of a collaborative layer, as NumPy arrays.

    Attributes:
        query_kernel: `(D_q, D̃)` shared query kernel `W̃_Q`.
        key_kernel: `(D_k, D̃)` shared key kernel `W̃_K`.
        mixing: `(H, D̃)` mixing vectors `m_h`.
        query_bias: `(D̃,)` shared query bias, or `None` (zeros).
        content_bias: `(D_k, H)` content bias `c_h`, or `None` for a layer
            without one.
    """

    query_kernel: np.ndarray
    key_kernel: np.ndarray
    mixing: np.ndarray
    query_bias: np.ndarray = None
    content_bias: np.ndarray = None

    @property
    def shared_key_dim(self):
        return int(np.shape(self.query_kernel)[1])


@dataclasses.dataclass
class CollaborativeValueOutput:
    """The shared value/output side of a collaborative layer, as NumPy
    arrays (a layer with `shared_value_dim`).

    Attributes:
        value_kernel: `(D_v_in, D̃_v)` shared value kernel `W̃_V`.
        value_mixing: `(H, D̃_v)` value mixing vectors `n_h`.
        output_kernel: `(D̃_v, D_out)` shared output kernel `W̃_O`.
        value_bias: `(D̃_v,)` shared value bias, or `None` (zeros).
        output_bias: `(D_out,)` output bias, or `None` (zeros).
        gate_kernel: `(D_q, H, D̃_v)` gate kernel, or `None` for a layer
            without a gate.
        gate_bias: `(H, D̃_v)` gate bias, or `None` (zeros).
    """

    value_kernel: np.ndarray
    value_mixing: np.ndarray
    output_kernel: np.ndarray
    value_bias: np.ndarray = None
    output_bias: np.ndarray = None
    gate_kernel: np.ndarray = None
    gate_bias: np.ndarray = None

    @property
    def shared_value_dim(self):
        return int(np.shape(self.value_kernel)[1])


@keras.saving.register_keras_serializable(package="keras_collab")
class CollaborativeMultiHeadAttention(keras.layers.MultiHeadAttention):
    """Multi-head attention whose heads share their query and key projections.

    Standard multi-head attention gives each of the `H` heads its own query and
    key projection of size `key_dim`. Collaborative attention
    ([Cordonnier et al., 2020](https://arxiv.org/abs/2006.16362)) learns ONE
    query projection and ONE key projection of size `shared_key_dim` (D̃) for
    all heads; head `h` only owns a mixing vector `m_h` of size D̃:

    ```
    Q̃ = X W̃_Q + b̃_Q                   (B, T, D̃)
    K̃ = Y W̃_K                         (B, S, D̃)   no bias: softmax cancels it
    logits_h = ((Q̃ ⊙ m_h) K̃ᵀ + 1 (Y c_h)ᵀ) / sqrt(key_dim)
    ```

    Values, masks, softmax, dropout and the output projection are exactly those
    of `keras.layers.MultiHeadAttention`, so the layer is a drop-in
    replacement. The content bias `c_h` (shape `(D_key_in,)` per head) is the
    part of a query bias that survives the softmax, `W_K^h b_Q^h`: it lets a
    converted pretrained layer keep the exact effect of its query bias.

    With `shared_key_dim == num_heads * key_dim` and the default
    `"concatenate"` mixing, the layer computes exactly standard multi-head
    attention. A smaller `shared_key_dim` divides the key/query parameters and
    projection FLOPs by `num_heads * key_dim / shared_key_dim`. The scale stays
    `1 / sqrt(key_dim)` whatever D̃ is, so that the softmax temperature of a
    converted model does not change.

    With `shared_value_dim` (D̃_v) the values are shared too: one value
    projection of size D̃_v for all heads, a value mixing vector `n_h` per
    head, and the heads mixed before one output projection:

    ```
    Ṽ = V W̃_V + b̃_V                   (B, S, D̃_v)
    context_h = A_h Ṽ                  (B, T, D̃_v)   A_h: head h's softmax
    output = Σ_h (gate_h ⊙ context_h ⊙ n_h) W̃_O + b_O
    ```

    With `shared_value_dim == num_heads * value_dim` and `"concatenate"`
    value mixing this is again exactly standard multi-head attention (the
    gate, `(num_heads, shared_value_dim)` per query, acts on each head's
    block as Keras MHA's gate on each head). Attention with shared values
    is attention with one key/value head.

    Attention runs in `keras.ops` on every backend, with two exceptions that
    compute the same numbers (and are tested against it): the backend's fused
    `dot_product_attention` where it accepts the shared key as one key head
    for all heads (and shared values as one value head): JAX when
    `shared_key_dim` equals the values' head size (`value_dim`, or
    `shared_value_dim` when shared), PyTorch on accelerators (any sizes),
    never TensorFlow (it refuses one key head for several query heads); and
    on PyTorch CPU in float32 a cache-blocked kernel
    (`torch_blocked_attention`), which keeps each block's scores in cache
    instead of materialising them all.

    Subclasses that change the attention itself override one method, as
    with Keras MHA's `_compute_attention`: `_compute_attention(query, key,
    value, attention_mask=None, training=None, return_attention_scores=
    False, content_logits=None)`. It receives the shared query `Q̃` `(B, T,
    D̃)`, the shared key `K̃` `(B, S, D̃)`, the projected values `(B, S, H,
    value_dim)`, the final mask (every mask combined, `use_causal_mask`
    included, of rank 4, broadcastable to `(B, H, T, S)`, or `None`) and
    the content logits `Y c_h` `(B, S, H)` (or `None`), and returns the
    `(B, T, H, value_dim)` context and the `(B, H, T, S)` probabilities (or
    `None`). With shared values, `value` is `Ṽ` `(B, S, D̃_v)` and the
    context `(B, T, H, D̃_v)`. Every path calls it: rank-3 inputs,
    `attention_axes` (folded into rank 3 first) and
    `CachedCollaborativeMultiHeadAttention`.

    Args:
        num_heads: Number of attention heads.
        key_dim: Size of each attention head for query and key in the
            multi-head attention this layer mirrors. Sets the logit scale
            `1 / sqrt(key_dim)` and the default `shared_key_dim`.
        value_dim: Size of each attention head for value.
        dropout: Dropout probability on the attention probabilities.
        use_bias: Boolean, whether the projections use bias vectors. The key
            projection never has one (softmax cancels it); the content bias
            takes its place.
        output_shape: The expected shape of an output tensor, besides the batch
            and sequence dims. If not specified, projects back to the query
            feature dim.
        attention_axes: Axes over which the attention is applied. `None` means
            attention over all axes, but batch, heads, and features.
        sliding_window: Optional positive integer restricting each query to the
            keys within `sliding_window - 1` positions of it (along the
            attention axis).
        flash_attention: As in `keras.layers.MultiHeadAttention`: `None` uses a
            fused kernel when the backend offers one for these shapes, `True`
            requires it, `False` disables it.
        shared_key_dim: Size D̃ of the shared query/key projection. Defaults to
            `num_heads * key_dim`.
        mixing_initializer: Initializer of the `(num_heads, shared_key_dim)`
            mixing matrix. `"concatenate"` (default at full size) reproduces
            standard multi-head attention; `"random_normal"` (default
            otherwise) draws entries with variance `key_dim / shared_key_dim`
            so that initial logits have the scale of standard heads. Any Keras
            initializer is accepted.
        use_content_bias: Boolean, whether the layer has a content bias (only
            with `use_bias=True`). Defaults to `True`.
        shared_value_dim: Size D̃_v of a value projection shared by all
            heads. `None` (default) keeps a value projection per head, as
            in Keras MHA.
        value_mixing_initializer: Initializer of the `(num_heads,
            shared_value_dim)` value mixing matrix (only with
            `shared_value_dim`). `"concatenate"` (default at
            `shared_value_dim == num_heads * value_dim`) reproduces standard
            multi-head attention; `"random_normal"` (default otherwise)
            draws entries with variance `1 / num_heads`, so that each input
            of the output projection, a sum over heads of `n_h` times a
            context entry, has the variance of one context entry, as with
            concatenated heads. Any Keras initializer is accepted.
        kernel_initializer: Initializer for dense layer kernels.
        bias_initializer: Initializer for biases, content bias included.
        kernel_regularizer: Regularizer for dense layer kernels.
        bias_regularizer: Regularizer for biases.
        activity_regularizer: Regularizer for dense layer activity.
        kernel_constraint: Constraint for dense layer kernels.
        bias_constraint: Constraint for biases.
        use_gate: Boolean, whether to gate the attention output with a
            sigmoid projection of the query, as in Keras MHA.
        seed: Optional integer to seed the dropout layer.
        **kwargs: Base layer arguments, such as `name` and `dtype`.

    Call arguments:
        query: Query tensor of shape `(B, T, dim)`, or `(B, <positions>,
            dim)` with `attention_axes`.
        value: Value tensor of shape `(B, S, dim)`.
        key: Optional key tensor of shape `(B, S, dim)`; defaults to `value`.
        query_mask: Not read, as in Keras MHA: the query's padding mask is
            its Keras mask (set e.g. by `Embedding(mask_zero=True)`).
        value_mask: Optional boolean mask of shape `(B, S)`, `False` at
            padding keys.
        key_mask: Optional boolean mask of shape `(B, S)`, like `value_mask`.
        attention_mask: Optional boolean mask; `True` marks the pairs that
            may attend. As in Keras MHA, it has the shape of the scores,
            `(B, num_heads, T, S)` (one mask per head), or lacks leading
            axes, which broadcast: `(B, T, S)` or `(T, S)`; any axis may be
            1. With `attention_axes` the scores are `(B, <other axes>,
            num_heads, <query attention axes>, <key attention axes>)`, and
            a shorter mask likewise lacks axes before the attention axes.
        return_attention_scores: Whether to also return the attention
            probabilities, of shape `(B, num_heads, T, S)`.
        training: Python boolean, whether dropout is active.
        use_causal_mask: Whether to forbid attention to future positions
            (along the attention axis; several attention axes raise a
            `ValueError`, as `sliding_window` does).

    With inputs of rank > 3, the padding masks (the query's Keras mask,
    `value_mask`, `key_mask`) have the shape of their input without its last
    axis; with a single attention axis, a shorter one is read as Keras MHA
    reads it: its last axis runs along the attention axis, its leading axes
    over the batch and the other axes.

    A query whose keys are all masked gets what Keras MHA gives it: zero
    attention probabilities (so a zero context) where Keras MHA runs its
    masked softmax (scores returned, dropout, inputs of rank > 3), uniform
    ones where it runs the fused `dot_product_attention` (rank-3 inputs,
    no dropout, no scores returned).

    Returns:
        attention_output: Tensor of shape `(B, T, E)`, `E` being the query's
            last dimension or `output_shape`.
        attention_scores: (Optional) attention probabilities of shape
            `(B, num_heads, T, S)`.

    Example:

    >>> layer = CollaborativeMultiHeadAttention(
    ...     num_heads=8, key_dim=64, shared_key_dim=128
    ... )
    >>> query = keras.random.normal((2, 10, 512))
    >>> value = keras.random.normal((2, 16, 512))
    >>> output, scores = layer(query, value, return_attention_scores=True)
    >>> tuple(output.shape), tuple(scores.shape)
    ((2, 10, 512), (2, 8, 10, 16))

    Shared values as well:

    >>> layer = CollaborativeMultiHeadAttention(
    ...     num_heads=8, key_dim=64, shared_key_dim=128, shared_value_dim=256
    ... )
    >>> tuple(layer(query, value).shape)
    (2, 10, 512)
    >>> tuple(layer.value_dense.kernel.shape), tuple(layer.value_mixing.shape)
    ((512, 256), (8, 256))
    """

    def __init__(
        self,
        num_heads,
        key_dim,
        value_dim=None,
        dropout=0.0,
        use_bias=True,
        output_shape=None,
        attention_axes=None,
        sliding_window=None,
        flash_attention=None,
        shared_key_dim=None,
        mixing_initializer=None,
        use_content_bias=True,
        shared_value_dim=None,
        value_mixing_initializer=None,
        kernel_initializer="glorot_uniform",
        bias_initializer="zeros",
        kernel_regularizer=None,
        bias_regularizer=None,
        activity_regularizer=None,
        kernel_constraint=None,
        bias_constraint=None,
        use_gate=False,
        seed=None,
        **kwargs,
    ):
        if isinstance(dropout, bool) or not 0.0 <= float(dropout) < 1.0:
            raise ValueError(
                "Received an invalid value for argument `dropout`, expected "
                f"a float in [0, 1). Received: dropout={dropout}"
            )
        super().__init__(
            num_heads=num_heads,
            key_dim=key_dim,
            value_dim=value_dim,
            dropout=dropout,
            use_bias=use_bias,
            output_shape=output_shape,
            attention_axes=attention_axes,
            sliding_window=sliding_window,
            flash_attention=flash_attention,
            kernel_initializer=kernel_initializer,
            bias_initializer=bias_initializer,
            kernel_regularizer=kernel_regularizer,
            bias_regularizer=bias_regularizer,
            activity_regularizer=activity_regularizer,
            kernel_constraint=kernel_constraint,
            bias_constraint=bias_constraint,
            use_gate=use_gate,
            seed=seed,
            **kwargs,
        )
        if shared_key_dim is None:
            shared_key_dim = num_heads * key_dim
        self._shared_key_dim = _positive_int("shared_key_dim", shared_key_dim)
        self._mixing_initializer = get_mixing_initializer(
            mixing_initializer, num_heads, key_dim, self._shared_key_dim
        )
        self._use_content_bias = bool(use_content_bias) and use_bias
        self._shared_value_dim = None
        self._value_mixing_initializer = None
        if shared_value_dim is not None:
            self._shared_value_dim = _positive_int(
                "shared_value_dim", shared_value_dim
            )
            self._value_mixing_initializer = get_value_mixing_initializer(
                value_mixing_initializer,
                num_heads,
                self._value_dim,
                self._shared_value_dim,
            )
        elif value_mixing_initializer is not None:
            raise ValueError(
                "`value_mixing_initializer` needs `shared_value_dim`: with "
                "per-head values there is no value mixing. Received: "
                f"value_mixing_initializer={value_mixing_initializer}"
            )
        self._value_mixing = None

    @property
    def shared_key_dim(self):
        return self._shared_key_dim

    @property
    def use_content_bias(self):
        return self._use_content_bias

    @property
    def mixing(self):
        """The `(num_heads, shared_key_dim)` mixing matrix variable."""
        return self._mixing

    @property
    def content_bias(self):
        """The `(key_input_dim, num_heads)` content bias, or `None`."""
        return self._content_bias

    @property
    def shared_value_dim(self):
        """D̃_v of shared values, or `None` for per-head values."""
        return self._shared_value_dim

    @property
    def value_mixing(self):
        """The `(num_heads, shared_value_dim)` value mixing variable, or
        `None` for per-head values."""
        return self._value_mixing

    @property
    def _context_dim(self):
        """Size of each head's context: `value_dim`, or D̃_v with shared
        values."""
        if self._shared_value_dim is None:
            return self._value_dim
        return self._shared_value_dim

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "shared_key_dim": self._shared_key_dim,
                "mixing_initializer": keras.initializers.serialize(
                    self._mixing_initializer
                ),
                "use_content_bias": self._use_content_bias,
            }
        )
        # Per-head values keep the configuration (and saved files) they had
        # before shared values existed.
        if self._shared_value_dim is not None:
            config["shared_value_dim"] = self._shared_value_dim
            config["value_mixing_initializer"] = keras.initializers.serialize(
                self._value_mixing_initializer
            )
        return config

    def build(self, query_shape, value_shape, key_shape=None):
        key_shape = value_shape if key_shape is None else key_shape
        self._check_input_shapes(query_shape, value_shape, key_shape)
        self._build_shared_projections(query_shape, key_shape)
        self._build_value_side(query_shape, value_shape)
        self.built = True

    def _build_shared_projections(self, query_shape, key_shape):
        """The query/key side: shared query and key projections, mixing
        and content bias."""
        dim = self._shared_key_dim
        self._query_dense = self._shared_dense(
            "query", query_shape, dim, self._use_bias
        )
        # No key bias: softmax cancels it.
        self._key_dense = self._shared_dense("key", key_shape, dim, False)
        self._mixing = self.add_weight(
            name="mixing",
            shape=(self._num_heads, dim),
            initializer=self._mixing_initializer,
            regularizer=self._kernel_regularizer,
            constraint=self._kernel_constraint,
        )
        self._content_bias = None
        if self._use_content_bias:
            self._content_bias = self.add_weight(
                name="content_bias",
                shape=(key_shape[-1], self._num_heads),
                initializer=clone_initializer(self._bias_initializer),
                regularizer=self._bias_regularizer,
                constraint=self._bias_constraint,
            )

    def _shared_dense(self, name, input_shape, units, use_bias):
        """A built projection of the feature axis onto `units`: `(..., D)
        -> (..., units)`, a kernel `(D, units)`, one "head" for all
        heads."""
        free_dims = len(input_shape) - 1
        equation, bias_axes, _ = projection_equation(free_dims, output_dims=1)
        dense = keras.layers.EinsumDense(
            equation,
            output_shape=projection_output_shape(free_dims, [units]),
            bias_axes=bias_axes if use_bias else None,
            name=name,
            **self._get_common_kwargs_for_sublayer(),
        )
        dense.build(input_shape)
        return dense

    def _build_value_side(self, query_shape, value_shape):
        """Gate, values (per head exactly as in Keras MHA, or shared with
        their mixing) and output projection, and the attention's softmax
        and dropout."""
        if self._use_gate:
            self._gate_dense = self._head_dense(
                "gate", query_shape, self._context_dim, activation="sigmoid"
            )
        if self._shared_value_dim is None:
            self._value_dense = self._head_dense(
                "value", value_shape, self._value_dim
            )
        else:
            self._build_shared_values(value_shape)
        # Creates `_softmax`, `_dropout_layer` and normalises attention axes.
        self._build_attention(len(query_shape) + 1)
        self._output_dense = self._build_output_dense(query_shape)

    def _build_shared_values(self, value_shape):
        """The shared value projection `W̃_V` and the value mixing."""
        self._value_dense = self._shared_dense(
            "value", value_shape, self._shared_value_dim, self._use_bias
        )
        self._value_mixing = self.add_weight(
            name="value_mixing",
            shape=(self._num_heads, self._shared_value_dim),
            initializer=self._value_mixing_initializer,
            regularizer=self._kernel_regularizer,
            constraint=self._kernel_constraint,
        )

    def _build_output_dense(self, query_shape):
        """The built output projection: Keras MHA's `(H, value_dim, ...)`
        kernel, or `(D̃_v, ...)` with shared values (heads mixed first)."""
        common_kwargs = self._get_common_kwargs_for_sublayer()
        if self._shared_value_dim is None:
            dense = self._make_output_dense(
                query_shape, common_kwargs, "attention_output"
            )
            dense.build(
                tuple(query_shape[:-1]) + (self._num_heads, self._value_dim)
            )
            return dense
        output_shape = self._output_shape or (query_shape[-1],)
        equation, bias_axes, output_rank = projection_equation(
            len(query_shape) - 1, output_dims=len(output_shape)
        )
        dense = keras.layers.EinsumDense(
            equation,
            output_shape=projection_output_shape(
                output_rank - 1, list(output_shape)
            ),
            bias_axes=bias_axes if self._use_bias else None,
            name="attention_output",
            **common_kwargs,
        )
        dense.build(tuple(query_shape[:-1]) + (self._shared_value_dim,))
        return dense

    def _head_dense(self, name, input_shape, head_dim, activation=None):
        """A built per-head projection, as Keras MHA's value projection:
        `(..., D) -> (..., H, head_dim)`."""
        free_dims = len(input_shape) - 1
        equation, bias_axes, output_rank = projection_equation(
            free_dims, output_dims=2
        )
        dense = keras.layers.EinsumDense(
            equation,
            output_shape=projection_output_shape(
                output_rank - 1, [self._num_heads, head_dim]
            ),
            bias_axes=bias_axes if self._use_bias else None,
            activation=activation,
            name=name,
            **self._get_common_kwargs_for_sublayer(),
        )
        dense.build(input_shape)
        return dense

    def _check_input_shapes(self, query_shape, value_shape, key_shape):
        if len(query_shape) < 3:
            raise ValueError(
                "`query` must have rank >= 3 (batch, positions..., features). "
                f"Received: query.shape={tuple(query_shape)}"
            )
        if len(value_shape) != len(query_shape) or len(key_shape) != len(
            query_shape
        ):
            raise ValueError(
                "`query`, `value` and `key` must have the same rank. Received: "
                f"query.shape={tuple(query_shape)}, "
                f"value.shape={tuple(value_shape)}, "
                f"key.shape={tuple(key_shape)}"
            )
        if tuple(value_shape[1:-1]) != tuple(key_shape[1:-1]):
            raise ValueError(
                "All dimensions of `value` and `key`, except the last one, "
                f"must be equal. Received: value_shape={tuple(value_shape)} "
                f"and key_shape={tuple(key_shape)}"
            )
        if not self.built:
            return
        expected = {
            "query": (query_shape, self._query_dense.kernel.shape[0]),
            "key": (key_shape, self._key_dense.kernel.shape[0]),
            "value": (value_shape, self._value_dense.kernel.shape[0]),
        }
        for name, (shape, features) in expected.items():
            if shape[-1] is not None and shape[-1] != features:
                raise ValueError(
                    f"`{name}` has {shape[-1]} features but the layer was "
                    f"built for {features}. Received: "
                    f"{name}.shape={tuple(shape)}"
                )

    @property
    def query_key_variables(self):
        """The variables of the query/key side: shared query kernel and bias,
        shared key kernel, mixing and content bias (those that exist).

        These are the weights a conversion approximates, and the only ones
        refinement and distillation train; values, the output projection
        and the gate are exact copies.
        """
        candidates = (
            self._query_dense.kernel,
            self._query_dense.bias,
            self._key_dense.kernel,
            self._mixing,
            self._content_bias,
        )
        return [variable for variable in candidates if variable is not None]

    @property
    def value_output_variables(self):
        """The variables of the value/output side: value kernel and bias,
        value mixing (shared values), output kernel and bias, gate kernel
        and bias (those that exist).

        With shared values these are the weights a conversion of the value
        side approximates.
        """
        candidates = [
            self._value_dense.kernel,
            self._value_dense.bias,
            self._value_mixing,
            self._output_dense.kernel,
            self._output_dense.bias,
        ]
        if self._use_gate:
            candidates += [self._gate_dense.kernel, self._gate_dense.bias]
        return [variable for variable in candidates if variable is not None]

    @classmethod
    def from_multi_head_attention(
        cls, mha, query_key=None, name=None, value_output=None
    ):
        """Creates a collaborative layer from a built Keras MHA layer.

        Without `query_key`, the result is the exact full-size copy of `mha`
        (`shared_key_dim = num_heads * key_dim`, concatenated heads): it
        computes what `mha` computes. With `query_key`, the query/key side
        is the given factors and everything else (values, output projection,
        gate) is copied from `mha`. With `value_output`, the new layer has
        shared values (`shared_value_dim`) with the given value, mixing,
        output (and gate) weights instead. To choose a smaller D̃ (or D̃_v)
        from `mha`'s weights, use `keras_collab.convert_attention`, which
        computes those factors by tensor decomposition.

        Args:
            mha: A built `keras.layers.MultiHeadAttention` (or subclass). It
                is not modified, and the new layer shares no buffer with it.
            query_key: Optional `CollaborativeQueryKey`: the shared query and
                key kernels, mixing and biases of the new layer.
            name: Name of the new layer; defaults to `mha.name`.
            value_output: Optional `CollaborativeValueOutput`: the shared
                value side of the new layer. `None` copies `mha`'s per-head
                values, output projection and gate.

        Returns:
            A new, built layer of class `cls`.

        Example:

        >>> mha = keras.layers.MultiHeadAttention(num_heads=2, key_dim=4)
        >>> x = keras.random.normal((1, 3, 8))
        >>> _ = mha(x, x)
        >>> layer = CollaborativeMultiHeadAttention.from_multi_head_attention(
        ...     mha
        ... )
        >>> layer.shared_key_dim
        8
        """
        if not isinstance(mha, keras.layers.MultiHeadAttention) or isinstance(
            mha, CollaborativeMultiHeadAttention
        ):
            raise ValueError(
                "`mha` must be a keras.layers.MultiHeadAttention that is not "
                f"already collaborative. Received: {type(mha).__name__}"
            )
        if not mha.built:
            raise ValueError(
                f"Layer '{mha.name}' is not built: call it on data (or build "
                "the model) before converting it."
            )
        if query_key is None:
            query_key = _concatenated_query_key(mha)
        config = _config_like(mha, query_key, value_output)
        layer = cls(name=name or mha.name, dtype=mha.dtype_policy, **config)
        layer.build(*mha_input_shapes(mha))
        layer._assign_query_key(query_key)
        if value_output is None:
            layer._copy_value_side(mha)
        else:
            layer._assign_value_output(value_output)
        return layer

    def _copy_value_side(self, mha):
        """Copies `mha`'s per-head values, output projection and gate."""
        sources = [mha.value_dense, mha.output_dense]
        targets = [self._value_dense, self._output_dense]
        if getattr(mha, "_use_gate", False):
            sources.append(mha._gate_dense)
            targets.append(self._gate_dense)
        for source, target in zip(sources, targets):
            for source_var, target_var in zip(source.weights, target.weights):
                target_var.assign(unshared_copy(source_var))

    def _assign_value_output(self, value_output):
        """Assigns a `CollaborativeValueOutput` to the shared value side."""
        targets = {
            "value_kernel": self._value_dense.kernel,
            "value_mixing": self._value_mixing,
            "output_kernel": self._output_dense.kernel,
            "value_bias": self._value_dense.bias,
            "output_bias": self._output_dense.bias,
        }
        if self._use_gate:
            targets["gate_kernel"] = self._gate_dense.kernel
            targets["gate_bias"] = self._gate_dense.bias
        elif any(
            part is not None
            for part in (value_output.gate_kernel, value_output.gate_bias)
        ):
            raise ValueError(
                "`value_output` has a gate, but the layer has none "
                "(`use_gate=False`)."
            )
        _assign_all(
            (variable, getattr(value_output, name), name)
            for name, variable in targets.items()
        )

    def _assign_query_key(self, query_key):
        pairs = [
            (self._query_dense.kernel, query_key.query_kernel),
            (self._key_dense.kernel, query_key.key_kernel),
            (self._mixing, query_key.mixing),
        ]
        if self._query_dense.bias is not None:
            query_bias = query_key.query_bias
            if query_bias is None:
                query_bias = np.zeros(self._shared_key_dim, "float32")
            pairs.append((self._query_dense.bias, query_bias))
        if self._content_bias is not None:
            pairs.append((self._content_bias, query_key.content_bias))
        for variable, value in pairs:
            _assign(variable, value)

    def call(
        self,
        query,
        value,
        key=None,
        query_mask=None,
        value_mask=None,
        key_mask=None,
        attention_mask=None,
        return_attention_scores=False,
        training=None,
        use_causal_mask=False,
    ):
        if key is None:
            key = value
        self._check_input_shapes(query.shape, value.shape, key.shape)
        self._check_query_value_positions(query.shape, value.shape)
        masks = {
            "query_mask": _take_keras_masks(query, value, key),
            "value_mask": value_mask,
            "key_mask": key_mask,
            "attention_mask": attention_mask,
            "use_causal_mask": use_causal_mask,
        }
        attend = (
            self._attend
            if self._has_standard_layout(query)
            else self._attend_over_axes
        )
        context, attention_scores = attend(
            query,
            value,
            key,
            masks,
            training=training,
            return_attention_scores=return_attention_scores,
        )
        gate = self._gate_dense(query) if self._use_gate else None
        attention_output = self._combine_heads(context, gate)
        if masks["query_mask"] is not None:
            set_keras_mask(attention_output, masks["query_mask"])
        if return_attention_scores:
            return attention_output, attention_scores
        return attention_output

    def _project(self, query, value, key):
        """`(shared query, shared key, projected values, content logits or
        None)` of the layer's inputs; the values are `(..., H, value_dim)`,
        or `(..., D̃_v)` when shared."""
        return (
            self._query_dense(query),
            self._key_dense(key),
            self._value_dense(value),
            self._content_logits(key),
        )

    def _combine_heads(self, context, gate=None):
        """The attention output from the `(..., H, d)` context: gated (with
        `use_gate`), mixed over heads with shared values (`Σ_h n_h ⊙
        context_h`), then projected."""
        if gate is not None:
            context = ops.multiply(context, gate)
        if self._value_mixing is not None:
            context = _mix_heads(
                context, ops.cast(self._value_mixing, context.dtype)
            )
        return self._output_dense(context)

    def _is_causal_only(self, masks):
        """Whether the causal mask is the only mask, so that it can run as
        the backends' causal kernel rather than as a materialised mask (as
        in Keras MHA). Never for a subclass that overrides
        `_compute_attention`: it receives the mask."""
        return (
            masks["use_causal_mask"]
            and all(
                masks[name] is None
                for name in ("query_mask", "value_mask", "key_mask")
            )
            and masks["attention_mask"] is None
            and self._sliding_window is None
            and type(self)._compute_attention
            is CollaborativeMultiHeadAttention._compute_attention
        )

    def _attend(
        self,
        query,
        value,
        key,
        masks,
        training=None,
        return_attention_scores=False,
    ):
        """Attention over `(B, T, dim)` inputs: `(B, T, H, value_dim)`
        context and `(B, H, T, S)` scores (or `None`)."""
        causal_only = self._is_causal_only(masks)
        attention_mask = None
        if not causal_only:
            attention_mask = _rank4_mask(
                self._attention_mask(query, value, **masks)
            )
        shared_query, shared_key, projected_value, content_logits = (
            self._project(query, value, key)
        )
        # Only the layer's own implementation is told to add the causal
        # mask; an override always gets it in `attention_mask`.
        causal = {"use_causal_mask": True} if causal_only else {}
        return self._compute_attention(
            shared_query,
            shared_key,
            projected_value,
            attention_mask,
            training,
            return_attention_scores,
            content_logits=content_logits,
            **causal,
        )

    def _content_logits(self, key):
        """`Y C`: `(..., S, D_key_in) @ (D_key_in, H) -> (..., S, H)`, or
        `None` without a content bias."""
        if not self._use_content_bias:
            return None
        return ops.matmul(key, self._content_bias)

    def _has_standard_layout(self, query):
        return len(query.shape) == 3 and tuple(self._attention_axes) == (1,)

    def _layout(self, rank):
        """`(others, axes)`: the positional axes that act as batch axes, and
        the attention axes, of inputs of this rank."""
        axes = tuple(self._attention_axes)
        others = tuple(a for a in range(1, rank - 1) if a not in axes)
        return others, axes

    def _check_query_value_positions(self, query_shape, value_shape):
        """Checks statically that `query` and `value` agree on the axes that
        are not attended over (batch and other positional axes)."""
        others, _ = self._layout(len(query_shape))
        for axis in (0,) + others:
            q, v = query_shape[axis], value_shape[axis]
            if q is None or v is None or q == v:
                continue
            if axis == 0 and not others and 1 in (q, v):
                continue  # a batch of 1 broadcasts, as in Keras MHA
            raise ValueError(
                "All dimensions of `query` and `value`, except the attention "
                f"axes {tuple(self._attention_axes)} and the last one, must "
                f"be equal. Received: query_shape={tuple(query_shape)} and "
                f"value_shape={tuple(value_shape)}"
            )

    def _scores_shape(self, query_shape, value_shape):
        """Static shape of Keras MHA's attention scores: `(B, <other axes>,
        num_heads, <query attention axes>, <key attention axes>)`."""
        others, axes = self._layout(len(query_shape))
        return (
            (query_shape[0],)
            + tuple(query_shape[a] for a in others)
            + (self._num_heads,)
            + tuple(query_shape[a] for a in axes)
            + tuple(value_shape[a] for a in axes)
        )

    def _attention_mask(
        self,
        query,
        value,
        query_mask=None,
        value_mask=None,
        key_mask=None,
        attention_mask=None,
        use_causal_mask=False,
        flat_query=None,
        flat_value=None,
    ):
        """The attention mask, as Keras MHA defines it, over the positions of
        the flattened attention.

        The causal, sliding-window and padding masks are Keras MHA's own
        (`_compute_attention_mask`), computed over the flattened attention
        positions. The explicit `attention_mask` is placed over the scores
        `(B, <other axes>, H, <query axes>, <key axes>)` as Keras MHA places
        it (missing leading axes broadcast), then flattened the same way.
        Each mask is laid out before they are combined, so that a per-head
        mask and a padding mask combine position by position.

        Args:
            query: The query, or a tensor with its positions (only its shape
                is read).
            value: The value, or a tensor with its positions.
            query_mask: Keras mask of the query, `None` or of the shape of
                `query` without its last axis.
            value_mask: `None` or of the shape of `value` without its last
                axis.
            key_mask: Like `value_mask`.
            attention_mask: `None` or a boolean mask over the scores.
            use_causal_mask: Whether to add the causal mask.
            flat_query: A tensor whose axis 1 is the flattened query
                positions (default: `query`), for the causal and
                sliding-window masks.
            flat_value: Likewise for the key positions (default: `value`).

        Returns:
            `None` or a boolean mask broadcastable to the `(B', H, T', S')`
            scores of the flattened attention, `B'` running over the batch
            and the other axes.
        """
        others, axes = self._layout(len(query.shape))
        self._check_ordered_masks(axes, use_causal_mask)
        if flat_query is None:
            flat_query, flat_value = query, value
        scores_shape = self._scores_shape(query.shape, value.shape)
        position_masks = {
            name: _flat_position_mask(
                mask, name, role, tensor, others, axes, scores_shape
            )
            for name, mask, role, tensor in (
                ("query_mask", query_mask, "query", query),
                ("value_mask", value_mask, "key", value),
                ("key_mask", key_mask, "key", value),
            )
        }
        auto_mask = self._compute_attention_mask(
            flat_query,
            flat_value,
            attention_mask=None,
            use_causal_mask=use_causal_mask,
            **position_masks,
        )
        masks = [_rank4_mask(auto_mask)]
        if attention_mask is not None:
            masks.append(self._flat_explicit_mask(attention_mask, query, value))
        masks = [mask for mask in masks if mask is not None]
        if not masks:
            return None
        mask = masks[0]
        for other in masks[1:]:
            mask = ops.logical_and(mask, other)
        return mask

    def _check_ordered_masks(self, axes, use_causal_mask):
        """Causal and sliding-window masks need a single attention axis."""
        if len(axes) < 2:
            return
        asked = [
            name
            for name, on in (
                ("use_causal_mask=True", use_causal_mask),
                (
                    f"sliding_window={self._sliding_window}",
                    self._sliding_window is not None,
                ),
            )
            if on
        ]
        if asked:
            raise ValueError(
                f"{' and '.join(asked)} with attention_axes={axes} is "
                "not supported: causal and sliding-window masks order the "
                "positions of a single attention axis (Keras MHA builds "
                "them from axis 1 alone). Pass an explicit "
                "`attention_mask` over the scores instead."
            )

    def _flat_explicit_mask(self, attention_mask, query, value):
        """`attention_mask` laid out over the scores as Keras MHA lays it,
        flattened to `(B' or 1, H or 1, T' or 1, S' or 1)`."""
        rank = len(query.shape)
        others, axes = self._layout(rank)
        target = self._scores_shape(query.shape, value.shape)
        received = tuple(attention_mask.shape)
        if len(received) > len(target):
            raise ValueError(
                "`attention_mask` must be broadcastable to the scores and "
                "must not have more dimensions. The scores are (batch, "
                f"{'<other axes>, ' if others else ''}num_heads, <query "
                "positions>, <key positions>). Received: "
                f"scores.shape={target}, attention_mask.shape={received}"
            )
        mask = ops.cast(attention_mask, "bool")
        # Within the attention axes, plain broadcasting; the axes before them
        # (batch, other axes, heads) broadcast when missing, as in Keras MHA.
        while len(mask.shape) < 2 * len(axes):
            mask = ops.expand_dims(mask, 0)
        while len(mask.shape) < len(target):
            mask = ops.expand_dims(mask, -2 * len(axes) - 1)
        _check_broadcastable(
            "attention_mask", tuple(mask.shape), target, "scores", received
        )
        if rank == 3:
            return mask
        query_shape, value_shape = ops.shape(query), ops.shape(value)
        lead = 1 + len(others)
        groups = (
            ([query_shape[0]] + [query_shape[a] for a in others], -1),
            ([self._num_heads], self._num_heads),
            ([query_shape[a] for a in axes], None),
            ([value_shape[a] for a in axes], None),
        )
        bounds = (0, lead, lead + 1, lead + 1 + len(axes), len(target))
        broadcast_shape, flat_shape = [], []
        for (sizes, flat), start, stop in zip(groups, bounds, bounds[1:]):
            if all(size == 1 for size in mask.shape[start:stop]):
                broadcast_shape += [1] * (stop - start)
                flat_shape.append(1)
            else:
                broadcast_shape += sizes
                flat_shape.append(int(np.prod(sizes)) if flat is None else flat)
        mask = ops.broadcast_to(mask, tuple(broadcast_shape))
        return ops.reshape(mask, tuple(flat_shape))

    def _use_fused_kernel(self, return_attention_scores, tensor=None):
        """Whether `ops.dot_product_attention` should run this attention.

        The shared key is a single "head" of size D̃ while values keep
        `num_heads` heads of size `value_dim`, or, shared, are one head of
        size D̃_v. PyTorch's fused kernel accepts both (the key/value head
        broadcasts, value size may differ), but on CPU it then runs a
        generic path that measured slower than the einsum path
        (benchmarks/layer_speed, per-head values), so it is used on
        accelerators or when flash attention is asked for. The JAX kernel
        needs equal key and value head sizes (one key/value head is
        accepted); TensorFlow's needs equal head counts (it refuses one
        key/value head for several query heads). Elsewhere the einsum path
        computes the same numbers.
        """
        if self._dropout > 0.0 or return_attention_scores:
            return False
        backend = keras.backend.backend()
        if backend == "torch":
            return bool(self._flash_attention) or _prefer_fused_on_torch(tensor)
        return backend == "jax" and self._shared_key_dim == self._context_dim

    def _compute_attention(
        self,
        query,
        key,
        value,
        attention_mask=None,
        training=None,
        return_attention_scores=False,
        content_logits=None,
        use_causal_mask=False,
    ):
        """Attention from the shared projections: the override point.

        Every path of the layer (inputs of rank 3, `attention_axes`, the
        cached twin) computes its attention here, on `(B, T, ...)` tensors
        whose single sequence axis is 1 (with `attention_axes`, the
        non-attention axes are folded into `B` and the attention axes
        flattened into `T` and `S`).

        Args:
            query: `(B, T, D̃)` shared query projection `Q̃` (not scaled).
            key: `(B, S, D̃)` shared key projection `K̃`.
            value: `(B, S, H, value_dim)` projected values, or the shared
                values `Ṽ` `(B, S, D̃_v)`.
            attention_mask: `None` or a boolean mask of rank 4,
                broadcastable to `(B, H, T, S)`: the final mask, causal,
                sliding-window, padding and explicit masks combined.
            training: Whether dropout is active.
            return_attention_scores: Whether to return the probabilities.
            content_logits: `(B, S, H)` content-bias logits `Y c_h` (not
                scaled), or `None` without a content bias.
            use_causal_mask: Only ever `True` for the layer's own
                implementation, when the causal mask is the only mask
                (it then runs the backends' causal kernel); an override
                always receives the causal mask in `attention_mask`.

        Returns:
            `(B, T, H, value_dim)` (or `(B, T, H, D̃_v)`) context and `(B,
            H, T, S)` probabilities (or `None` where they are not
            computed). A query whose keys are all masked gets zero
            probabilities with dropout or returned scores, uniform ones
            otherwise, as in Keras MHA.
        """
        self._check_flash_attention_scores(return_attention_scores)
        zero_masked_rows = self._dropout > 0.0 or return_attention_scores
        mask = _rank4_mask(attention_mask)
        if use_causal_mask and mask is not None:
            # Never drop either mask: the causal one joins the other.
            mask = ops.logical_and(mask, self._causal_mask(query, value))
            use_causal_mask = False
        if self._use_fused_kernel(return_attention_scores, query):
            context = self._fused_attention(
                query, key, value, content_logits, mask, use_causal_mask
            )
        else:
            self._check_flash_attention_available()
            if use_causal_mask:
                mask = self._causal_mask(query, value)
            if self._use_xla_layout(training, return_attention_scores):
                context = self._xla_attention(
                    query, key, value, content_logits, mask
                )
            elif not self._use_blocked_torch_kernel(
                query, training, return_attention_scores
            ):
                return self._einsum_attention(
                    query,
                    key,
                    value,
                    content_logits,
                    mask,
                    training,
                    return_attention_scores,
                    zero_masked_rows,
                )
            else:
                context = self._blocked_torch_attention(
                    query, key, value, content_logits, mask
                )
        if zero_masked_rows:
            context = _zero_fully_masked_rows(context, mask)
        return context, None

    def _causal_mask(self, query, value):
        """Keras MHA's causal mask for these positions, of rank 4."""
        return _rank4_mask(self._compute_causal_mask(query, value))

    def _check_flash_attention_scores(self, return_attention_scores):
        if self._flash_attention and return_attention_scores:
            raise ValueError(
                "Returning attention scores is not supported when flash "
                "attention is enabled. Please disable flash attention to "
                "access attention scores."
            )

    def _check_flash_attention_available(self):
        """`flash_attention=True` where no fused kernel takes these shapes
        raises."""
        if self._flash_attention:
            raise ValueError(
                "`flash_attention=True` needs a fused attention kernel, and "
                f"the {keras.backend.backend()} backend has none for a shared "
                f"key of size {self._shared_key_dim} with values of size "
                f"{self._context_dim}. Use `flash_attention=None`."
            )

    def _einsum_attention(
        self,
        query,
        key,
        value,
        content_logits,
        mask,
        training,
        return_attention_scores,
        zero_masked_rows,
    ):
        """Attention in `keras.ops` einsums, with a float32 softmax: the
        path every other one is tested against."""
        scale = self._inverse_sqrt_key_dim
        mixing = ops.cast(self._mixing, query.dtype)
        # Per-head queries (B, H, T, D̃), scaled first as in Keras MHA; the
        # shared key is never copied per head.
        head_queries = ops.einsum(
            "btd,hd->bhtd",
            ops.multiply(query, ops.cast(scale, query.dtype)),
            mixing,
        )
        logits = ops.einsum("bhtd,bsd->bhts", head_queries, key)
        if content_logits is not None:
            logits = logits + _scaled_content_logits(content_logits, scale)
        # Returned scores show the zero rows; otherwise zeroing the context
        # gives the same output for less work than a pass over the scores.
        probabilities = self._masked_softmax_float32(
            logits, mask, zero_masked_rows and return_attention_scores
        )
        if self._dropout > 0.0:
            dropped = self._dropout_layer(probabilities, training=training)
        else:
            dropped = probabilities
        if self._shared_value_dim is None:
            context = ops.einsum("bhts,bshd->bthd", dropped, value)
        else:
            context = ops.einsum("bhts,bsd->bthd", dropped, value)
        if zero_masked_rows and not return_attention_scores:
            context = _zero_fully_masked_rows(context, mask)
        return context, probabilities

    def _use_xla_layout(self, training, return_attention_scores):
        """Whether `_xla_attention` should run this attention: on the XLA
        backends (JAX, TensorFlow) whenever neither the `(B, H, T, S)`
        probabilities nor a dropout pattern over them is asked for. PyTorch
        runs its blocked kernel instead."""
        if keras.backend.backend() not in ("jax", "tensorflow"):
            return False
        if return_attention_scores:
            return False
        return not (self._dropout > 0.0 and training)

    def _xla_attention(self, query, key, value, content_logits, mask):
        """Attention in the layout XLA:CPU runs fastest.

        One head at a time, every operand of each head's two matmuls is
        contiguous with its batch axis first, where the all-heads products
        would transpose the `(B, T, H, S)` probabilities or the `(B, T, H,
        D̃)` head queries. But each head then reads all of `K̃` (and of `Ṽ`
        with shared values) for its few query rows: with shared values and
        at most `_QUERY_MAJOR_MAX_ROWS` queries (decoding steps), one
        query-major matmul of all heads' rows reads them once, and with one
        value head it needs no transpose. And where the batch holds few
        query rows in all (`_EINSUM_MAX_QUERY_ROWS`) but more than a decoding
        step, the all-heads einsums of `_einsum_attention` win. Measured by
        the `layer_speed`, `inference` and `decode` benchmarks.
        """
        rows = query.shape[1]
        if (
            self._shared_value_dim is not None
            and rows is not None
            and rows <= _QUERY_MAJOR_MAX_ROWS
        ):
            return self._query_major_attention(
                query, key, value, content_logits, mask
            )
        if _few_query_rows(query):
            context, _ = self._einsum_attention(
                query,
                key,
                value,
                content_logits,
                mask,
                training=False,
                return_attention_scores=False,
                zero_masked_rows=False,
            )
            return context
        return self._head_by_head_attention(
            query, key, value, content_logits, mask
        )

    def _scaled_mixing(self, dtype):
        """The `(H, D̃)` mixing times the softmax scale: the scale goes into
        the smallest operand."""
        return ops.multiply(
            ops.cast(self._mixing, dtype),
            ops.cast(self._inverse_sqrt_key_dim, dtype),
        )

    def _head_by_head_attention(self, query, key, value, content_logits, mask):
        """What `_einsum_attention` computes without dropout and returned
        scores (tested against it), one head at a time.

        Head h scores `(Q̃ ⊙ m_h) K̃ᵀ = Q̃ (K̃ ⊙ m_h)ᵀ`: the mixing scales
        the shorter of the query and key sequences.
        """
        scale = self._inverse_sqrt_key_dim
        mixing = self._scaled_mixing(query.dtype)
        mix_keys = key.shape[1] is not None and (
            query.shape[1] is None or key.shape[1] <= query.shape[1]
        )
        # (B, H, 1, S): head h's slice adds to its (B, T, S) logits.
        bias = _scaled_content_logits(content_logits, scale)
        contexts = []
        for head in range(self._num_heads):
            if mix_keys:
                logits = ops.matmul(
                    query,
                    ops.transpose(ops.multiply(key, mixing[head]), (0, 2, 1)),
                )
            else:
                logits = ops.matmul(
                    ops.multiply(query, mixing[head]),
                    ops.transpose(key, (0, 2, 1)),
                )
            if bias is not None:
                logits = logits + bias[:, head]
            head_mask = None
            if mask is not None:
                head_mask = mask[:, head if mask.shape[1] > 1 else 0]
            probabilities = self._masked_softmax_float32(
                logits, head_mask, rank=3
            )
            head_value = value
            if self._shared_value_dim is None:
                head_value = value[:, :, head]
            contexts.append(ops.matmul(probabilities, head_value))
        return ops.stack(contexts, axis=2)

    def _query_major_attention(self, query, key, value, content_logits, mask):
        """What `_einsum_attention` computes without dropout and returned
        scores (tested against it), for shared values and few queries:
        logits laid out `(B, T, H, S)`, so that one matmul scores the `T *
        H` head queries of a batch element against `K̃`, and one multiplies
        their probabilities by `Ṽ`."""
        scale = self._inverse_sqrt_key_dim
        mixing = self._scaled_mixing(query.dtype)
        head_queries = ops.multiply(ops.expand_dims(query, 2), mixing)
        logits = ops.einsum("bthd,bsd->bths", head_queries, key)
        if content_logits is not None:
            bias = ops.expand_dims(ops.transpose(content_logits, (0, 2, 1)), 1)
            logits = logits + ops.multiply(bias, ops.cast(scale, bias.dtype))
        if mask is not None:
            mask = ops.transpose(mask, (0, 2, 1, 3))
        probabilities = self._masked_softmax_float32(logits, mask)
        return ops.einsum("bths,bsd->bthd", probabilities, value)

    def _use_blocked_torch_kernel(
        self, tensor, training, return_attention_scores
    ):
        """Whether the cache-blocked PyTorch CPU kernel should run this
        attention: float32 on CPU, no scores returned, no active dropout.

        It computes what the einsum path below computes (tested against it)
        in blocks of query rows; its speed is measured by
        `benchmarks/layer_speed` (see the benchmarks README).
        """
        if keras.backend.backend() != "torch" or return_attention_scores:
            return False
        if self._dropout > 0.0 and training:
            return False
        from keras_collab.kernels import torch_blocked_attention

        return torch_blocked_attention.is_supported(tensor)

    def _blocked_torch_attention(
        self, query, key, value, content_logits, attention_mask
    ):
        from keras_collab.kernels import torch_blocked_attention

        scale = self._inverse_sqrt_key_dim
        return torch_blocked_attention.blocked_collaborative_attention(
            ops.multiply(query, ops.cast(scale, query.dtype)),
            key,
            ops.cast(self._mixing, query.dtype),
            value,
            bias=_scaled_content_logits(content_logits, scale),
            mask=_rank4_mask(attention_mask),
            mask_value=_MASK_VALUE_FLOAT32,
        )

    def _masked_softmax_float32(
        self, logits, attention_mask, zero_masked_rows=False, rank=4
    ):
        """Softmax over keys, in float32 whatever the compute dtype.

        Half-precision softmax overflows or loses the masked-out mass; the
        logits are upcast, masked with a large finite negative value and the
        probabilities cast back. A fully masked row thus gets uniform
        probabilities, or zeros with `zero_masked_rows` (masked
        probabilities set to zero, as Keras' `Softmax` layer does).
        `rank` is that of the logits: 4 for `(B, H, T, S)`, 3 for one head's
        `(B, T, S)` (whose mask is then already of rank 3).
        """
        compute_dtype = logits.dtype
        logits = ops.cast(logits, "float32")
        mask = _rank4_mask(attention_mask) if rank == 4 else attention_mask
        if mask is not None:
            logits = ops.where(mask, logits, _MASK_VALUE_FLOAT32)
        probabilities = ops.softmax(logits, axis=-1)
        if mask is not None and zero_masked_rows:
            probabilities = ops.where(mask, probabilities, 0.0)
        return ops.cast(probabilities, compute_dtype)

    def _fused_attention(
        self,
        query,
        key,
        value,
        content_logits,
        attention_mask,
        use_causal_mask,
    ):
        """Attention in the backend's `ops.dot_product_attention`: head
        queries `Q̃ ⊙ m_h` against the shared key as one key "head" for all
        heads; with shared values, `Ṽ` is the one value head (attention
        with one key/value head)."""
        scale = self._inverse_sqrt_key_dim
        mixing = ops.cast(self._mixing, query.dtype)
        head_queries = ops.einsum("btd,hd->bthd", query, mixing)
        key, value = self._fused_key_value(key, value)
        mask = _rank4_mask(attention_mask)
        bias = _scaled_content_logits(content_logits, scale)
        if bias is not None:
            # Backends take a bias or a mask, not both: fold the mask in.
            if use_causal_mask:
                causal = self._causal_mask(query, value)
                mask = causal if mask is None else mask & causal
                use_causal_mask = False
            if mask is not None:
                negative = _large_negative(bias.dtype)
                bias = ops.where(mask, bias, negative)
                mask = None
        return ops.dot_product_attention(
            head_queries,
            key,
            value,
            bias=bias,
            mask=mask,
            scale=scale,
            is_causal=use_causal_mask,
            flash_attention=self._flash_attention,
        )

    def _fused_key_value(self, shared_key, value):
        """Key and value of the layout `dot_product_attention` takes:
        `(B, S, heads, d)`."""
        key = ops.expand_dims(shared_key, 2)
        if self._shared_value_dim is not None:
            return key, ops.expand_dims(value, 2)
        if keras.backend.backend() != "torch":
            # JAX groups heads only when keys and values have the same head
            # count; XLA fuses this broadcast into the dot product.
            key_shape = ops.shape(shared_key)
            key = ops.broadcast_to(
                key,
                (key_shape[0], key_shape[1], self._num_heads, key_shape[2]),
            )
        return key, value

    def _attend_over_axes(
        self,
        query,
        value,
        key,
        masks,
        training=None,
        return_attention_scores=False,
    ):
        """Attention over arbitrary `attention_axes`.

        Moves the non-attention axes into the batch and flattens the
        attention axes into one sequence axis, builds the mask over those
        flattened positions, attends (`_compute_attention`), and restores
        the layout. As in Keras MHA (whose masked softmax runs for these
        inputs), a query whose keys are all masked gets zero probabilities.

        Returns:
            `(B, <positions>, H, value_dim)` context and the scores `(B,
            <other axes>, H, <query attention axes>, <key attention
            axes>)` (or `None`).
        """
        projected = self._project(query, value, key)
        shared_query, shared_key = projected[:2]
        folding = self._folding(shared_query, shared_key)
        flat_query, flat_key, flat_value, flat_content = (
            None if tensor is None else folding.fold(tensor, role)
            for tensor, role in zip(projected, ("query", "key", "key", "key"))
        )
        flat_mask = self._attention_mask(
            shared_query,
            shared_key,
            flat_query=flat_query,
            flat_value=flat_value,
            **masks,
        )
        flat_mask = _rank4_mask(flat_mask)
        context, scores = self._compute_attention(
            flat_query,
            flat_key,
            flat_value,
            flat_mask,
            training,
            return_attention_scores,
            content_logits=flat_content,
        )
        # Keras MHA's masked softmax runs for these inputs: a query whose
        # keys are all masked gets no weight.
        context = _zero_fully_masked_rows(context, flat_mask)
        return folding.unfold_context(context), folding.unfold_scores(scores)

    def _folding(self, shared_query, shared_key):
        """The `_AxesFolding` of inputs with these positions."""
        rank = len(shared_query.shape)
        others, axes = self._layout(rank)
        query_shape = ops.shape(shared_query)
        key_shape = ops.shape(shared_key)
        return _AxesFolding(
            order=(0,) + others + axes + (rank - 1,),
            outer=tuple([query_shape[0]] + [query_shape[a] for a in others]),
            queries=tuple(query_shape[a] for a in axes),
            keys=tuple(key_shape[a] for a in axes),
        )

    def compute_output_spec(
        self,
        query,
        value,
        key=None,
        query_mask=None,
        value_mask=None,
        key_mask=None,
        attention_mask=None,
        return_attention_scores=False,
        training=None,
        use_causal_mask=False,
    ):
        key_shape = None if key is None else key.shape
        output_shape = self.compute_output_shape(
            query.shape, value.shape, key_shape
        )
        output_spec = keras.KerasTensor(output_shape, dtype=self.compute_dtype)
        if not return_attention_scores:
            return output_spec
        rank = len(query.shape)
        axes = self._attention_axes
        if axes is None:
            axes = tuple(range(1, rank - 1))
        axes = tuple(a if a >= 0 else rank - 1 + a for a in axes)
        others = [a for a in range(1, rank - 1) if a not in axes]
        scores_shape = (
            (query.shape[0],)
            + tuple(query.shape[a] for a in others)
            + (self._num_heads,)
            + tuple(query.shape[a] for a in axes)
            + tuple(value.shape[a] for a in axes)
        )
        return output_spec, keras.KerasTensor(
            scores_shape, dtype=self.compute_dtype
        )


def _positive_int(name, value):
    """`value` as an `int`, or a ValueError naming the argument."""
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, np.integer))
        or value < 1
    ):
        raise ValueError(
            f"Received an invalid value for argument `{name}`, expected a "
            f"positive integer. Received: {name}={value}"
        )
    return int(value)


def _assign(variable, value):
    """Assigns an unshared copy of `value`, shapes checked."""
    if tuple(variable.shape) != tuple(np.shape(value)):
        raise ValueError(
            f"`{variable.path}` has shape {tuple(variable.shape)}; "
            f"the given value has shape {tuple(np.shape(value))}."
        )
    variable.assign(unshared_copy(value))


def _assign_all(pairs):
    """Assigns `(variable, value, name)` triples of a `value_output`.

    A bias given as `None` is zero. A weight the layer lacks (a bias with
    `use_bias=False`) takes only `None` or zeros; a gate kernel the layer
    needs cannot be `None`.
    """
    for variable, value, name in pairs:
        if variable is None:
            if value is not None and np.any(value):
                raise ValueError(
                    f"`value_output.{name}` is not zero, but the layer has "
                    "no such weight (`use_bias=False`)."
                )
            continue
        if value is None:
            if not name.endswith("bias"):
                raise ValueError(
                    f"`value_output.{name}` is `None`, but the layer needs "
                    f"it for `{variable.path}`."
                )
            value = np.zeros(variable.shape, "float32")
        _assign(variable, value)


def _mix_heads(context, mixing):
    """`Σ_h n_h ⊙ context_h`: `(..., H, d) x (H, d) -> (..., d)`."""
    lead = "abcdefgijklmnopqrstu"[: len(context.shape) - 2]
    return ops.einsum(f"{lead}hv,hv->{lead}v", context, mixing)


def _take_keras_masks(query, value, key):
    """The query's Keras mask, once the Keras masks of the three inputs are
    removed: as in Keras MHA, the query's mask is its Keras mask (the
    `query_mask` argument is not read), and the masks are consumed by the
    layer rather than propagated."""
    query_mask = get_keras_mask(query)
    for tensor in (query, value, key):
        set_keras_mask(tensor, None)
    return query_mask


@dataclasses.dataclass(frozen=True)
class _AxesFolding:
    """How attention over `attention_axes` folds into attention over one
    sequence axis, and back.

    Attributes:
        order: Axis order that puts the batch, then the other positional
            axes, then the attention axes, then the features.
        outer: Sizes of the batch and the other axes.
        queries: Sizes of the query's attention axes.
        keys: Sizes of the key's attention axes.
    """

    order: tuple
    outer: tuple
    queries: tuple
    keys: tuple

    def fold(self, tensor, role):
        """`(B, <positions>, ...)` -> `(B', T', ...)` (`role="query"`) or
        `(B', S', ...)` (`role="key"`); trailing axes stay as they are."""
        rank = len(self.order)
        positions = self.queries if role == "query" else self.keys
        trailing = tuple(range(rank, len(tensor.shape)))
        tensor = ops.transpose(tensor, self.order + trailing)
        return ops.reshape(
            tensor,
            (-1, int(np.prod(positions))) + tuple(tensor.shape[rank - 1 :]),
        )

    def unfold_context(self, context):
        """`(B', T', H, d)` context -> `(B, <positions>, H, d)`."""
        rank = len(self.order)
        context = ops.reshape(
            context, self.outer + self.queries + tuple(context.shape[2:])
        )
        inverse = tuple(np.argsort(self.order[:-1])) + (rank - 1, rank)
        return ops.transpose(context, inverse)

    def unfold_scores(self, scores):
        """`(B', H, T', S')` scores -> `(B, <other axes>, H, <query
        attention axes>, <key attention axes>)`; `None` stays `None`."""
        if scores is None:
            return None
        heads = (scores.shape[1],)
        return ops.reshape(
            scores, self.outer + heads + self.queries + self.keys
        )


def _scaled_content_logits(content_logits, scale):
    """`(B, S, H)` content logits as a scaled `(B, H, 1, S)` logit bias, or
    `None`."""
    if content_logits is None:
        return None
    return ops.multiply(
        ops.expand_dims(ops.transpose(content_logits, (0, 2, 1)), 2),
        ops.cast(scale, content_logits.dtype),
    )


def _few_query_rows(query):
    """Whether `query` `(B, T, D̃)` holds more query rows than a decoding
    step (`_QUERY_MAJOR_MAX_ROWS`) per sequence but at most
    `_EINSUM_MAX_QUERY_ROWS` in all; `False` where a size is not a known
    integer (`None`, or a symbolic dimension of a shape-polymorphic
    export, which cannot be compared)."""
    batch, rows = query.shape[0], query.shape[1]
    if not (isinstance(batch, int) and isinstance(rows, int)):
        return False
    return (
        _QUERY_MAJOR_MAX_ROWS < rows and batch * rows <= _EINSUM_MAX_QUERY_ROWS
    )


def _rank4_mask(attention_mask):
    """A boolean mask for `(B, H, T, S)` logits: a rank-4 mask stays as it
    is, one of lower rank gets unit axes before its last two (the head axis,
    then the batch axis), as Keras MHA expands masks; `None` stays `None`."""
    if attention_mask is None:
        return None
    mask = ops.cast(attention_mask, "bool")
    while len(mask.shape) < 4:
        mask = ops.expand_dims(mask, axis=-3)
    return mask


def _zero_fully_masked_rows(context, attention_mask):
    """`(B, T, H, value_dim)` context with zeros for the query rows whose
    keys are all masked (where a masked softmax gives zero probabilities);
    `attention_mask` is a rank-4 mask broadcastable to `(B, H, T, S)`, or
    `None`."""
    if attention_mask is None:
        return context
    attended = ops.any(attention_mask, axis=-1)  # (B, H, T)
    attended = ops.expand_dims(ops.transpose(attended, (0, 2, 1)), -1)
    return ops.multiply(context, ops.cast(attended, context.dtype))


def _check_broadcastable(name, shape, target, target_name, received=None):
    """Raises a ValueError worded like Keras' mask errors unless `shape`
    broadcasts to `target` dimension by dimension (unknown sizes pass).

    Args:
        name: The mask's argument name.
        shape: Its static shape, laid out over `target`.
        target: The static shape it must broadcast to.
        target_name: What `target` is, e.g. `"scores"`.
        received: The shape the caller passed, if not `shape`.
    """
    ok = len(shape) <= len(target) and all(
        m is None or t is None or m in (1, t)
        for m, t in zip(reversed(shape), reversed(target))
    )
    if not ok:
        received = tuple(shape) if received is None else received
        raise ValueError(
            f"`{name}` must be broadcastable to the {target_name}. Each "
            "mask dimension must be 1 or match the corresponding "
            f"{target_name} dimension. Received: "
            f"{target_name}.shape={tuple(target)}, "
            f"{name}.shape={tuple(received)}"
        )


def _flat_position_mask(mask, name, role, tensor, others, axes, scores):
    """A padding mask over the positions of `tensor`, for Keras MHA's
    `_compute_attention_mask` over the flattened attention.

    For `(B, T, dim)` inputs the mask is returned as it is, once checked
    against the `scores` shape as Keras MHA lays it out (`(B, T, 1)` for
    the query's, `role="query"`; `(B, 1, S)` for a key's, `role="key"`).
    Otherwise it is flattened to `(B', T')` like the attention: a mask with
    the shape of `tensor` without its last axis (the Keras mask of a tensor)
    marks each position; with a single attention axis, a mask with fewer
    axes is read as Keras MHA reads it: its last axis runs over the
    attention positions, its leading axes over the batch and the other
    axes, from the left.
    """
    if mask is None:
        return None
    positions = tuple(tensor.shape[:-1])
    received = tuple(mask.shape)
    if len(positions) == 2:
        if role == "query":
            piece = received + (1,)
        else:
            piece = received[:-1] + (1,) + received[-1:]
        piece = piece[:-2] + (1,) * (len(scores) - len(piece)) + piece[-2:]
        _check_broadcastable(name, piece, scores, "scores", received)
        return mask
    order = (0,) + others + axes
    target = tuple(positions[i] for i in order)
    if len(received) == len(positions):
        laid_out = tuple(received[i] for i in order)
    elif 1 <= len(received) < len(positions) and len(axes) == 1:
        missing = len(positions) - len(received)
        laid_out = received[:-1] + (1,) * missing + received[-1:]
    else:
        raise ValueError(
            f"`{name}` must have the shape of the positions of its input, "
            f"{positions} (its shape without the last axis), for "
            f"attention_axes={axes}. Received: {name}.shape={received}"
        )
    _check_broadcastable(name, laid_out, target, "positions", received)
    mask = ops.cast(mask, "bool")
    if len(received) == len(positions):
        mask = ops.transpose(mask, order)
    else:
        for _ in range(len(positions) - len(received)):
            mask = ops.expand_dims(mask, len(received) - 1)
    sizes = ops.shape(tensor)
    mask = ops.broadcast_to(mask, tuple(sizes[i] for i in order))
    return ops.reshape(mask, (-1, int(np.prod([sizes[a] for a in axes]))))


def _prefer_fused_on_torch(tensor):
    """Fused attention pays off on PyTorch only on an accelerator."""
    device = getattr(tensor, "device", None)
    return getattr(device, "type", "cpu") != "cpu"


def _large_negative(dtype):
    """A large finite negative number representable in `dtype`."""
    if keras.backend.standardize_dtype(dtype) == "float16":
        return ops.cast(-0.7 * np.finfo("float16").max, dtype)
    return ops.cast(_MASK_VALUE_FLOAT32, dtype)


def mha_input_shapes(mha):
    """The `(query, value, key)` shapes a built attention layer was built
    for, read off its kernels: the feature sizes and the rank are known, the
    positions are not, so any built layer works however it was built."""
    rank = len(mha.query_dense.equation.split(",")[0])
    positions = (None,) * (rank - 1)
    return (
        positions + (mha.query_dense.kernel.shape[0],),
        positions + (mha.value_dense.kernel.shape[0],),
        positions + (mha.key_dense.kernel.shape[0],),
    )


def _concatenated_query_key(mha):
    """The exact full-size query/key side of `mha`: head `h` owns columns
    `[h * key_dim, (h + 1) * key_dim)` of the shared projections, which
    `"concatenate"` mixing selects."""
    query = np.asarray(ops.convert_to_numpy(mha.query_dense.kernel))
    key = np.asarray(ops.convert_to_numpy(mha.key_dense.kernel))
    full = mha.num_heads * mha.key_dim
    query_bias = None
    if mha.query_dense.bias is not None:
        bias = ops.convert_to_numpy(mha.query_dense.bias)
        query_bias = np.reshape(bias, (full,))
    return CollaborativeQueryKey(
        query_kernel=np.reshape(query, (query.shape[0], full)),
        key_kernel=np.reshape(key, (key.shape[0], full)),
        mixing=np.repeat(np.eye(mha.num_heads), mha.key_dim, axis=1),
        query_bias=query_bias,
    )


def _config_like(mha, query_key, value_output=None):
    """Arguments of a collaborative twin of `mha` with this query/key side
    (and shared values, given a `value_output`).

    At full size the query bias stays in the shared query projection and a
    content bias would always be zero, so the layer has none.
    """
    config = mha.get_config()
    accepted = inspect.signature(CollaborativeMultiHeadAttention).parameters
    # KerasHub subclasses add their own arguments; keep only ours.
    config = {k: v for k, v in config.items() if k in accepted}
    config.pop("name", None)
    config.pop("dtype", None)
    full_size = query_key.shared_key_dim == mha.num_heads * mha.key_dim
    config.update(
        shared_key_dim=query_key.shared_key_dim,
        mixing_initializer="concatenate" if full_size else None,
        use_content_bias=query_key.content_bias is not None,
    )
    if value_output is not None:
        dim = value_output.shared_value_dim
        full_size = dim == mha.num_heads * mha.value_dim
        config.update(
            shared_value_dim=dim,
            value_mixing_initializer="concatenate" if full_size else None,
        )
    return config
