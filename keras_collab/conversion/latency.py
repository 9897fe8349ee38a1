"""Latency: how fast a converted model runs against its source.

Both models run as `model.predict` runs them: `predict_on_batch`, whose
forward pass Keras compiles where the backend compiles (`jit_compile="auto"`:
XLA on JAX and TensorFlow, eager on PyTorch), on the same inputs, in the same
process. After a first call of each (the compilation) and a warm-up call,
their calls alternate, the order flipping from round to round so that
neither always runs right after the other, and the medians are compared.
A ratio below 1 means that the converted model is faster.

The values of the weights do not change how long dense float32 arithmetic
takes, only the shapes do. So the candidates that `--target-speedup` times
(`choose_shared_key_dim_for_speedup`) are structural conversions, without
calibration and without decomposition sweeps (the spectral start of the
factors): the architecture of the final model at a fraction of the cost of
converting it.
"""

import gc
import statistics
import time

import numpy as np

from keras_collab.conversion.attention import parse_dim
from keras_collab.conversion.attention import resolve_shared_key_dim
from keras_collab.conversion.model import convert_model
from keras_collab.conversion.model import find_sites

# Defaults of the CLI's measurement: a small batch, a few alternating rounds.
BATCH_SIZE = 8
ROUNDS = 5


def example_inputs(model, batch_size, sequence_length):
    """Inputs of `model`'s input signature at one batch size and length.

    The first dimension of every input is `batch_size`, every other
    dimension the model leaves open is `sequence_length`. Integer inputs are
    zeros (token and segment id 0 exist in every vocabulary), except those
    whose name ends in `mask`, which are ones (every token real); float
    inputs are standard normal. Timing depends on the shapes only.

    Args:
        model: A built Keras model (a KerasHub backbone, a functional model).
        batch_size: Rows of every input.
        sequence_length: Size of every other open dimension.

    Returns:
        A dict of NumPy arrays for a model with named inputs, else an array
        (one input) or a list of them.

    Example:

    >>> import keras
    >>> inputs = keras.Input((None, 4), name="features")
    >>> model = keras.Model(inputs, keras.layers.Dense(2)(inputs))
    >>> example_inputs(model, 3, 7).shape
    (3, 7, 4)
    """
    rng = np.random.default_rng(0)
    specs = model.input
    if isinstance(specs, dict):
        return {
            name: _example(spec, name, batch_size, sequence_length, rng)
            for name, spec in specs.items()
        }
    if isinstance(specs, (list, tuple)):
        return [
            _example(spec, spec.name, batch_size, sequence_length, rng)
            for spec in specs
        ]
    return _example(specs, specs.name, batch_size, sequence_length, rng)


def _example(spec, name, batch_size, sequence_length, rng):
    shape = [batch_size] + [
        sequence_length if dim is None else dim for dim in spec.shape[1:]
    ]
    dtype = np.dtype(spec.dtype)
    if np.issubdtype(dtype, np.integer) or dtype == np.bool_:
        fill = 1 if str(name).endswith("mask") else 0
        return np.full(shape, fill, dtype=dtype)
    return rng.standard_normal(shape).astype(dtype)


def compiled_forward(model):
    """A function of inputs running `model` as `model.predict` does.

    `predict_on_batch` compiles the forward pass on its first call for a
    given input shape (XLA on JAX and TensorFlow unless the model was
    compiled with `jit_compile=False`; PyTorch runs eagerly, without
    gradients) and returns NumPy arrays, so it has finished when it returns.
    """
    return model.predict_on_batch


def _seconds(function, inputs):
    start = time.perf_counter()
    function(inputs)
    return time.perf_counter() - start


class LatencyComparison:
    """Times converted models against one source on fixed inputs.

    The source is compiled once, when the object is made, and timed anew,
    in alternation, against each candidate.

    Args:
        source: The original model.
        inputs: What both models are called on (`example_inputs`).
        rounds: Timed rounds per comparison: one call of each model.
        warmup_calls: Untimed calls of each model after its first call.

    Example:

    ```python
    inputs = example_inputs(backbone, batch_size=8, sequence_length=128)
    latency = LatencyComparison(backbone, inputs)
    latency(converted)["ratio"]  # < 1: the converted model is faster
    ```
    """

    def __init__(self, source, inputs, rounds=ROUNDS, warmup_calls=1):
        if rounds < 1:
            raise ValueError(f"`rounds` must be at least 1. Received {rounds}")
        self.inputs = inputs
        self.rounds = int(rounds)
        self.warmup_calls = int(warmup_calls)
        self._source = compiled_forward(source)
        self.source_first_call_s = _seconds(self._source, inputs)

    def __call__(self, candidate):
        """Times `candidate` against the source.

        Returns:
            A dict: `source_ms` and `converted_ms` (medians), `ratio`
            (converted / source), `faster` (ratio below 1), `rounds`,
            `batch_size`, `sequence_length` (of the first input) and
            `converted_first_call_s` (its compilation included).
        """
        converted = compiled_forward(candidate)
        first_call_s = _seconds(converted, self.inputs)
        for _ in range(self.warmup_calls):
            self._source(self.inputs)
            converted(self.inputs)
        source_s, converted_s = self._alternate(converted)
        source_median = statistics.median(source_s)
        converted_median = statistics.median(converted_s)
        ratio = converted_median / source_median
        batch_size, sequence_length = _leading_shape(self.inputs)
        return {
            "source_ms": 1e3 * source_median,
            "converted_ms": 1e3 * converted_median,
            "ratio": ratio,
            "faster": bool(ratio < 1.0),
            "rounds": self.rounds,
            "batch_size": batch_size,
            "sequence_length": sequence_length,
            "converted_first_call_s": first_call_s,
        }

    def _alternate(self, converted):
        """Per-call seconds of the source and of `converted`, alternating,
        the garbage collector paused (collected once before)."""
        source_s, converted_s = [], []
        gc.collect()
        was_enabled = gc.isenabled()
        gc.disable()
        try:
            for index in range(self.rounds):
                pair = [
                    (self._source, source_s),
                    (converted, converted_s),
                ]
                for function, samples in pair[:: 1 if index % 2 else -1]:
                    samples.append(_seconds(function, self.inputs))
        finally:
            if was_enabled:
                gc.enable()
        return source_s, converted_s


def _leading_shape(inputs):
    first = inputs
    if isinstance(inputs, dict):
        first = next(iter(inputs.values()))
    elif isinstance(inputs, (list, tuple)):
        first = inputs[0]
    shape = np.shape(first)
    return int(shape[0]), int(shape[1]) if len(shape) > 1 else None


def structural_conversion(model, shared_key_dim, shared_value_dim=None):
    """A converted `model` with the architecture of a real conversion at
    `shared_key_dim` (and `shared_value_dim`) but weights from the spectral
    start of the decomposition, without data or sweeps: fit to be timed,
    not to be used."""
    return convert_model(
        model,
        shared_key_dim,
        shared_value_dim=shared_value_dim,
        max_iter=0,
    ).model


def _total_dim(model, spec):
    """Sum over the attention sites of `model` of the D̃ `spec` gives."""
    return sum(
        resolve_shared_key_dim(spec, site.layer) for site in find_sites(model)
    )


def choose_shared_key_dim_for_speedup(
    model,
    candidates,
    target_speedup,
    comparison,
    shared_value_dim=None,
):
    """The largest candidate D̃ whose converted model is fast enough.

    Candidates are tried from the largest total D̃ (over the model's
    attention layers) down; the first whose measured time ratio (converted /
    source) is at most `1 / target_speedup` is chosen, and no smaller one is
    timed. One D̃ holds for every layer (a fraction: the same share of each
    layer's full size), the way the whole model's time is measured.

    Args:
        model: The source model.
        candidates: D̃ specs, as `convert_model`'s `shared_key_dim` takes
            them (integers, fractions of `num_heads * key_dim`).
        target_speedup: How many times as fast as the source the converted
            model must run (1.25: at most 0.8 of its time).
        comparison: A `LatencyComparison` of `model` on the inputs to time.
        shared_value_dim: The conversion's D̃_v, which changes the speed
            too.

    Returns:
        A dict: `target_speedup`, `max_ratio` (`1 / target_speedup`),
        `chosen` (the spec), `ratio` (its measured ratio) and `candidates`
        (`{"shared_key_dim", "ratio", ...}` of each one timed, in order).

    Raises:
        ValueError: if `target_speedup` is not positive, there are no
            candidates, or none meets the target (naming each ratio).
    """
    if not target_speedup > 0:
        raise ValueError(
            "`target_speedup` must be positive. Received: "
            f"target_speedup={target_speedup}"
        )
    specs = [parse_dim(spec) for spec in candidates]
    if not specs or any(spec is None for spec in specs):
        raise ValueError(
            "Give at least one candidate D̃ (an integer or a fraction). "
            f"Received: {list(candidates)}"
        )
    max_ratio = 1.0 / target_speedup
    ordered = sorted(
        set(specs), key=lambda spec: _total_dim(model, spec), reverse=True
    )
    timed = []
    for spec in ordered:
        candidate = structural_conversion(model, spec, shared_value_dim)
        measured = comparison(candidate)
        timed.append({"shared_key_dim": spec, **measured})
        if measured["ratio"] <= max_ratio:
            return {
                "target_speedup": target_speedup,
                "max_ratio": max_ratio,
                "chosen": spec,
                "ratio": measured["ratio"],
                "candidates": timed,
            }
    measured = ", ".join(
        f"D̃={row['shared_key_dim']}: {row['ratio']:.3f}x" for row in timed
    )
    raise ValueError(
        f"No candidate D̃ runs {target_speedup:g}x as fast as the source "
        f"(time ratio <= {max_ratio:.3f}). Measured time ratios "
        f"(converted / source): {measured}. Try smaller candidates "
        "(--speed-candidates) or a lower target."
    )
