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
    """Runs `model` eagerly on the calibration batches and returns
    `{site path: AttentionStatistics}` of the inputs each site sees."""
    layers = {site.path: site.layer for site in sites}
    with record_attention_inputs(layers) as records:
        for batch in as_batches(calibration_data):
            model(batch, training=False)
    return attention_statistics(records)


@contextlib.contextmanager
def record_attention_inputs(layers):
    """Records the inputs of attention layers while a model runs eagerly.

    Temporarily wraps each layer's `call` (restored on exit, whatever
    happens) and appends, for each call, the query, key and value inputs
    and the attention mask as NumPy arrays.

    Args:
        layers: `{key: attention layer}`.

    Yields:
        `{key: list of AttentionInputs}`, filled as the model runs.
    """
    records = {key: [] for key in layers}
    patched = []

    def wrap(key, original):
        signature = inspect.signature(original)

        def call(*args, **kwargs):
            arguments = signature.bind(*args, **kwargs).arguments
            value_input = arguments["value"]
            key_input = arguments.get("key")
            if key_input is None:
                key_input = value_input
            mask = arguments.get("attention_mask")
            key_array = keras.ops.convert_to_numpy(key_input)
            records[key].append(
                AttentionInputs(
                    query=keras.ops.convert_to_numpy(arguments["query"]),
                    key=key_array,
                    mask=None
                    if mask is None
                    else keras.ops.convert_to_numpy(mask).astype(bool),
                    value=key_array
                    if value_input is key_input
                    else keras.ops.convert_to_numpy(value_input),
                )
            )
            return original(*args, **kwargs)

        return call

    try:
        for key, layer in layers.items():
            original = layer.call
            object.__setattr__(layer, "call", wrap(key, original))
            patched.append(layer)
        yield records
    finally:
        for layer in patched:
            object.__delattr__(layer, "call")


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
