"""Calibration: what attention layers see on real inputs.

Activation-aware conversion weights the decomposition of each attention layer
by the second moments of that layer's actual query and key inputs, and the
optional refinement trains each converted layer on those inputs. This module
records those inputs while a model runs and reduces them to
`AttentionStatistics`. Where calibration text comes from is the hub's
business (`keras_collab.hub.text`).
"""

import contextlib
import dataclasses
import inspect
import typing

import keras
import numpy as np

from keras_collab.decomposition import second_moment
from keras_collab.kernels.compiled import compile_inference


@dataclasses.dataclass
class AttentionStatistics:
    """Second moments of the inputs an attention layer sees on real data.

    Attributes:
        query_moment: `(D_q, D_q)` second moment `E[x xᵀ]` of query inputs.
        key_moment: `(D_k, D_k)` second moment of key inputs, centred per
            sequence (a shift shared by every key of a sequence changes each
            query's logits by a constant, which softmax cancels).
        tokens: Number of (valid) query tokens the moments were estimated on.
        value_moment: `(D_v, D_v)` second moment of value inputs, not
            centred (a shared shift of the values moves the output), or
            `None` when unknown.
    """

    query_moment: np.ndarray
    key_moment: np.ndarray
    tokens: int = 0
    value_moment: np.ndarray = None


class AttentionInputs(typing.NamedTuple):
    """What one call of an attention layer received, as NumPy arrays."""

    query: np.ndarray
    key: np.ndarray
    mask: np.ndarray  # boolean, or None
    value: np.ndarray


def as_batches(calibration_data):
    """A list of batches from `None`, one batch, or a list/tuple of them."""
    if calibration_data is None:
        return []
    if isinstance(calibration_data, (list, tuple)):
        return list(calibration_data)
    return [calibration_data]


def as_statistics(calibration):
    """`AttentionStatistics` from statistics or from raw input activations:
    an `(N, T, D)` array of self-attention inputs, or a `(query, key)`
    pair of them for cross-attention."""
    if isinstance(calibration, AttentionStatistics):
        return calibration
    if isinstance(calibration, (tuple, list)) and len(calibration) == 2:
        query, key = (
            np.asarray(keras.ops.convert_to_numpy(x)) for x in calibration
        )
    else:
        query = key = np.asarray(keras.ops.convert_to_numpy(calibration))
    if query.ndim != 3 or key.ndim != 3:
        raise ValueError(
            "`calibration` activations must have shape (N, T, D). Received "
            f"shapes {query.shape} and {key.shape}."
        )
    return AttentionStatistics(
        query_moment=second_moment(query),
        key_moment=second_moment(key, center_per_sequence=True),
        tokens=query.shape[0] * query.shape[1],
        # Keras MHA's value defaults to the key input.
        value_moment=second_moment(key),
    )


def collect_statistics(model, sites, calibration_data):
    """`{site path: AttentionStatistics}` of the inputs each site sees on
    the calibration batches.

    The model runs in one compiled function (`compile_inference`: a
    `tf.function` on TensorFlow, `jax.jit` on JAX, eager without gradients
    on PyTorch) that returns, per site, the masked sums of the query, key
    and value outer products; the second moments need nothing else. Those
    sums are formed on the device in float32 and accumulated over batches
    on the host in float64. The function is traced once per batch shape, so
    batches should come in a few padded lengths (`keras_collab.hub.text`
    pads to multiples of 16): padded tokens are masked out of the attention
    and of the sums, and the statistics equal those of the unpadded batches
    (`attention_statistics` of `record_attention_inputs`, the eager
    reference, up to float32 round-off).
    """
    layers = {site.path: site.layer for site in sites}
    totals = {}
    with _compiled_calls(model, layers, attention_sums) as run:
        for batch in as_batches(calibration_data):
            _accumulate(totals, run(batch))
    return _statistics_from_sums(totals)


_SUM_FIELDS = ("query", "key", "value", "query_tokens", "key_tokens")


def _accumulate(totals, sums):
    """Adds one batch's per-call sums into `totals`, in float64."""
    for path, calls in sums.items():
        for call in calls:
            total = totals.setdefault(path, dict.fromkeys(_SUM_FIELDS, 0.0))
            for field in _SUM_FIELDS:
                value = keras.ops.convert_to_numpy(call[field])
                total[field] = total[field] + value.astype("float64")


def _statistics_from_sums(totals):
    statistics = {}
    for path, total in totals.items():
        moments = {}
        for field, tokens in (
            ("query", "query_tokens"),
            ("key", "key_tokens"),
            ("value", "key_tokens"),
        ):
            moment = total[field] / max(float(total[tokens]), 1.0)
            if not np.all(np.isfinite(moment)):
                raise ValueError(
                    f"The {field} inputs of attention layer '{path}' contain "
                    "non-finite values on the calibration data."
                )
            # Exactly symmetric, as `second_moment` returns it.
            moments[field] = (moment + moment.T) / 2
        statistics[path] = AttentionStatistics(
            query_moment=moments["query"],
            key_moment=moments["key"],
            tokens=int(total["query_tokens"]),
            value_moment=moments["value"],
        )
    return statistics


def _bound_inputs(signature, args, kwargs):
    """`(query, key, value, attention_mask)` of one call of a Keras MHA
    layer; the key defaults to the value, as in Keras."""
    arguments = signature.bind(*args, **kwargs).arguments
    value = arguments["value"]
    key = arguments.get("key")
    if key is None:
        key = value
    return arguments["query"], key, value, arguments.get("attention_mask")


def attention_sums(query, key, value, mask):
    """Masked sums of outer products of one attention call's inputs, in
    float32 backend tensors (what `attention_statistics` computes on the
    host, before the division by the token counts).

    Returns:
        A dict: `query`, `(D_q, D_q)` sum of `x xᵀ` over real query tokens;
        `key`, `(D_k, D_k)` the same over real keys centred per sequence;
        `value`, `(D_v, D_v)` the plain sum over real keys; `query_tokens`
        and `key_tokens`, the counts.
    """
    ops = keras.ops
    same_value = value is key
    self_attention = same_value and query is key
    query = ops.cast(query, "float32")
    key = ops.cast(key, "float32")
    query_valid, key_valid, same_validity = _validity(query, key, mask)
    query_gram = _masked_gram(query, query_valid)
    key_gram = _masked_gram(_centered(key, key_valid), key_valid)
    if self_attention and same_validity:
        value_gram = query_gram
    elif same_value:
        value_gram = _masked_gram(key, key_valid)
    else:
        value_gram = _masked_gram(ops.cast(value, "float32"), key_valid)
    return {
        "query": query_gram,
        "key": key_gram,
        "value": value_gram,
        "query_tokens": ops.sum(query_valid),
        "key_tokens": ops.sum(key_valid),
    }


def _validity(query, key, mask):
    """Float (N, T) and (N, S) indicators of real query and key tokens, as
    `token_validity` decides them, and whether they are the same one."""
    ops = keras.ops
    batch, queries, keys = query.shape[0], query.shape[1], key.shape[1]
    if mask is None:
        return (
            ops.ones(query.shape[:2], "float32"),
            ops.ones(key.shape[:2], "float32"),
            queries == keys,
        )
    mask = ops.broadcast_to(ops.cast(mask, "bool"), (batch, queries, keys))
    key_valid = ops.cast(ops.any(mask, axis=1), "float32")
    if queries == keys:
        # Self-attention: a padded query is a padded key of the same position.
        return key_valid, key_valid, True
    return ops.cast(ops.any(mask, axis=2), "float32"), key_valid, False


def _centered(inputs, valid):
    """`inputs` less each sequence's mean over its valid tokens."""
    ops = keras.ops
    counts = ops.maximum(ops.sum(valid, axis=1), 1.0)[:, None, None]
    means = ops.sum(inputs * valid[..., None], axis=1, keepdims=True) / counts
    return inputs - means


def _masked_gram(inputs, valid):
    """`sum over valid tokens of x xᵀ`, `(D, D)`."""
    tokens = inputs * valid[..., None]
    return keras.ops.einsum("ntd,nte->de", tokens, tokens)


@contextlib.contextmanager
def _patched_calls(layers, record):
    """Wraps each layer's `call` with `record(key, query, key_input, value,
    mask)` before the original runs; restored on exit, whatever happens."""
    patched = []

    def wrap(key, original):
        signature = inspect.signature(original)

        def call(*args, **kwargs):
            record(key, *_bound_inputs(signature, args, kwargs))
            return original(*args, **kwargs)

        return call

    try:
        for key, layer in layers.items():
            original = layer.call
            object.__setattr__(layer, "call", wrap(key, original))
            patched.append(layer)
        yield
    finally:
        for layer in patched:
            object.__delattr__(layer, "call")


@contextlib.contextmanager
def record_attention_inputs(layers):
    """Records the inputs of attention layers while a model runs eagerly.

    Temporarily wraps each layer's `call` (restored on exit, whatever
    happens) and appends, for each call, the query, key and value inputs
    and the attention mask as NumPy arrays. With `attention_statistics`,
    this is the eager reference of `collect_statistics`.

    Args:
        layers: `{key: attention layer}`.

    Yields:
        `{key: list of AttentionInputs}`, filled as the model runs.
    """
    records = {key: [] for key in layers}

    def record(key, query, key_input, value, mask):
        key_array = keras.ops.convert_to_numpy(key_input)
        records[key].append(
            AttentionInputs(
                query=keras.ops.convert_to_numpy(query),
                key=key_array,
                mask=None
                if mask is None
                else keras.ops.convert_to_numpy(mask).astype(bool),
                value=key_array
                if value is key_input
                else keras.ops.convert_to_numpy(value),
            )
        )

    with _patched_calls(layers, record):
        yield records


@contextlib.contextmanager
def compiled_input_recorder(model, layers):
    """A function that runs `model` compiled and returns what `layers` saw.

    It gives what `record_attention_inputs` records eagerly, but the model
    runs in one compiled function (`compile_inference`), traced once per
    batch shape and reused for as long as the context lasts. The model's
    current variable values are passed in on every call, so a caller may
    change weights between calls (layer-by-layer refinement records each
    layer after the ones before it were refined). Every layer's inputs are
    returned on every call, so that one trace serves them all.

    Args:
        model: The model to run, called with `training=False`.
        layers: `{key: attention layer}` inside `model`; distinct layers.

    Yields:
        `record(batches)`: `{key: list of AttentionInputs}` over the
        batches, in order.
    """

    def keep(query, key_input, value, mask):
        # On a trace, these are the tensors the compiled function returns.
        return {
            "query": query,
            "key": key_input,
            "value": None if value is key_input else value,
            "mask": mask,
        }

    with _compiled_calls(model, layers, keep) as run:

        def record(batches):
            records = {key: [] for key in layers}
            for batch in as_batches(batches):
                for key, calls in run(batch).items():
                    records[key] += [_as_inputs(call) for call in calls]
            return records

        yield record


@contextlib.contextmanager
def _compiled_calls(model, layers, capture):
    """Runs `model` in one compiled function that returns, for each call of
    each of `layers`, `capture(query, key, value, mask)` of its inputs.

    The function (`compile_inference`) is traced once per batch shape and
    reused for as long as the context lasts. The model's current variable
    values are passed in on every run, so weights may change between runs.

    Args:
        model: The model to run, called with `training=False`.
        layers: `{key: attention layer}` inside `model`; distinct layers.
        capture: Maps one call's inputs to a structure of tensors; it runs
            inside the trace.

    Yields:
        `run(batch)`: `{key: list of what capture returned, one per call}`.
    """
    if len({id(layer) for layer in layers.values()}) != len(layers):
        raise ValueError("`layers` must map to distinct layer objects.")
    traced = {key: [] for key in layers}

    def keep(key, *inputs):
        traced[key].append(capture(*inputs))

    def step(trainable, non_trainable, batch):
        for calls in traced.values():
            calls.clear()
        model.stateless_call(trainable, non_trainable, batch, training=False)
        return {key: list(calls) for key, calls in traced.items()}

    compiled = compile_inference(step)

    def run(batch):
        trainable = [v.value for v in model.trainable_variables]
        non_trainable = [v.value for v in model.non_trainable_variables]
        batch = keras.tree.map_structure(keras.ops.convert_to_tensor, batch)
        return compiled(trainable, non_trainable, batch)

    with _patched_calls(layers, keep):
        yield run


def _as_inputs(call):
    """`AttentionInputs` of NumPy arrays from one call's tensors."""

    def numpy(x):
        return None if x is None else keras.ops.convert_to_numpy(x)

    key = numpy(call["key"])
    mask = numpy(call["mask"])
    return AttentionInputs(
        query=numpy(call["query"]),
        key=key,
        mask=None if mask is None else mask.astype(bool),
        value=key if call["value"] is None else numpy(call["value"]),
    )


def token_validity(query, key, mask):
    """Boolean (N, T) and (N, S) arrays marking real query and key tokens."""
    batch, queries, keys = query.shape[0], query.shape[1], key.shape[1]
    if mask is None:
        return np.ones((batch, queries), bool), np.ones((batch, keys), bool)
    mask = np.broadcast_to(mask, (batch, queries, keys))
    key_valid = mask.any(axis=1)
    if queries == keys:
        # Self-attention: a padded query is a padded key of the same position.
        return key_valid, key_valid
    return mask.any(axis=2), key_valid


def attention_statistics(records):
    """Second moments of recorded inputs, per attention layer.

    The query side uses the plain second moment; the key side is centred per
    sequence, since a shift shared by every key of a sequence only adds a
    per-query constant to the logits, which softmax cancels. The value side
    uses the plain second moment over real keys.

    Args:
        records: `{key: list of AttentionInputs}` from
            `record_attention_inputs`.

    Returns:
        `{key: AttentionStatistics}`.
    """
    statistics = {}
    for name, calls in records.items():
        if not calls:
            continue
        query_sum = key_sum = value_sum = 0.0
        query_tokens = key_tokens = 0
        for call in calls:
            query_valid, key_valid = token_validity(
                call.query, call.key, call.mask
            )
            q_count, k_count = int(query_valid.sum()), int(key_valid.sum())
            query_sum = query_sum + q_count * second_moment(
                call.query, query_valid
            )
            key_sum = key_sum + k_count * second_moment(
                call.key, key_valid, center_per_sequence=True
            )
            value_sum = value_sum + k_count * second_moment(
                call.value, key_valid
            )
            query_tokens += q_count
            key_tokens += k_count
        statistics[name] = AttentionStatistics(
            query_moment=query_sum / max(query_tokens, 1),
            key_moment=key_sum / max(key_tokens, 1),
            tokens=query_tokens,
            value_moment=value_sum / max(key_tokens, 1),
        )
    return statistics
