"""Collaborative attention under `keras.distribution`, on 8 virtual CPU
devices; run by `tests/layers/test_distribution.py` in a fresh JAX process
(XLA reads the device count when JAX starts), which checks the JSON it
prints on its last line.

For a collaborative layer (per-head values and shared values, with content
bias and gate) and a converted tiny random BERT backbone and classifier,
under `DataParallel` over 8 devices and under `ModelParallel` on a
`(batch 2, model 4)` mesh with the package's layouts:

* outputs: the largest absolute difference from the same weights on one
  device;
* shardings: the partition spec of every weight;
* training: the losses of a few `fit` steps (and of the same steps on one
  device), and `keras_collab.distill`'s loss before and after.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 KERAS_BACKEND=jax \\
        python tests/layers/distribution_script.py
"""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("KERAS_BACKEND", "jax")

import contextlib  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import keras  # noqa: E402
import keras_hub  # noqa: E402
import numpy as np  # noqa: E402

import keras_collab  # noqa: E402

BATCH = 16
SEQUENCE = 8
HEADS = 4
HIDDEN = 32
VOCABULARY = 64


class Clock:
    """Wall and CPU seconds of each phase (for the log: the machine is
    shared, so they are no measurement)."""

    def __init__(self):
        self.wall, self.cpu = time.perf_counter(), time.process_time()

    def lap(self):
        wall, cpu = time.perf_counter(), time.process_time()
        lap = {"wall": wall - self.wall, "cpu": cpu - self.cpu}
        self.wall, self.cpu = wall, cpu
        return lap


def specs(model):
    """`{weight path: partition spec as a list}`."""
    return {
        v.path: [axis for axis in v.value.sharding.spec] for v in model.weights
    }


def scope(distribution):
    return distribution.scope() if distribution else contextlib.nullcontext()


def max_difference(a, b):
    a, b = keras.ops.convert_to_numpy(a), keras.ops.convert_to_numpy(b)
    return float(np.abs(a - b).max())


# The layer --------------------------------------------------------------


def layer_config(shared_values):
    return {
        "num_heads": HEADS,
        "key_dim": 8,
        "shared_key_dim": 16,
        "shared_value_dim": 16 if shared_values else None,
        "use_gate": True,
    }


def layer_model(config, weights=None):
    """A functional model around one built layer: `predict` runs it as one
    compiled step, and under a distribution splits the batch as `fit`
    would."""
    query = keras.Input((SEQUENCE, HIDDEN))
    value = keras.Input((SEQUENCE, HIDDEN))
    layer = keras_collab.CollaborativeMultiHeadAttention(**config)
    model = keras.Model([query, value], layer(query, value))
    if weights is not None:
        layer.set_weights(weights)
    return model, layer


def layer_results(distributions):
    """For per-head and shared values: outputs on one device, then under
    each distribution (built there, the one-device weights assigned)."""
    rng = np.random.default_rng(0)
    inputs = [
        rng.normal(size=(BATCH, SEQUENCE, HIDDEN)).astype("float32")
        for _ in range(2)
    ]
    results = {}
    for kind, shared_values in (("per_head", False), ("shared", True)):
        config = layer_config(shared_values)
        single, layer = layer_model(config)
        # Random weights everywhere: the zero biases of a new layer would
        # hide a wrong layout of theirs.
        weights = [
            rng.normal(scale=0.3, size=w.shape).astype("float32")
            for w in layer.get_weights()
        ]
        layer.set_weights(weights)
        expected = single.predict(inputs, batch_size=BATCH, verbose=0)
        for name, distribution in distributions(shared_values).items():
            with distribution.scope():
                model, layer = layer_model(config, weights)
                actual = model.predict(inputs, batch_size=BATCH, verbose=0)
            results[f"{name}/{kind}"] = {
                "max_abs_difference": max_difference(actual, expected),
                "output_scale": float(np.abs(expected).max()),
                "specs": specs(layer),
            }
    return results


# The backbone -----------------------------------------------------------


def tiny_bert():
    """A random BERT whose attention is far from uniform and weighs in its
    output (query/key and value/output kernels scaled up), so that a
    conversion below full size has an error for `distill` to lower."""
    keras.utils.set_random_seed(0)
    backbone = keras_hub.models.BertBackbone(
        vocabulary_size=VOCABULARY,
        num_layers=1,
        num_heads=HEADS,
        hidden_dim=HIDDEN,
        intermediate_dim=64,
        max_sequence_length=SEQUENCE,
        dropout=0.0,
    )
    scales = {
        "query/kernel": 4.0,
        "key/kernel": 4.0,
        "value/kernel": 3.0,
        "attention_output/kernel": 3.0,
    }
    for variable in backbone.weights:
        for name, scale in scales.items():
            if variable.path.endswith(name):
                variable.assign(variable * scale)
    return backbone


def bert_inputs(seed):
    rng = np.random.default_rng(seed)
    return {
        "token_ids": rng.integers(1, VOCABULARY, (BATCH, SEQUENCE)).astype(
            "int32"
        ),
        "segment_ids": np.zeros((BATCH, SEQUENCE), "int32"),
        "padding_mask": np.ones((BATCH, SEQUENCE), bool),
    }


def backbone_results(converted, distributions, directory):
    """Outputs of the converted backbone on one device and under each
    distribution, loaded there from its preset as a user would."""
    inputs = bert_inputs(1)
    expected = converted.predict(inputs, batch_size=BATCH, verbose=0)
    converted.save_to_preset(directory)
    results = {}
    for name, distribution in distributions.items():
        with distribution.scope():
            loaded = keras_hub.models.Backbone.from_preset(directory)
            actual = loaded.predict(inputs, batch_size=BATCH, verbose=0)
        results[name] = {
            "class": type(loaded).__name__,
            "max_abs_difference": max(
                max_difference(actual[k], expected[k]) for k in expected
            ),
            "specs": specs(loaded),
        }
    return results


def rebuilt(model, distribution):
    with scope(distribution):
        copy = type(model).from_config(model.get_config())
        copy.set_weights(model.get_weights())
    return copy


def fit_losses(classifier, distribution, epochs=4):
    """Per-epoch losses of `epochs` Adam steps on one batch, on a copy of
    `classifier` built under `distribution`."""
    inputs = bert_inputs(2)
    labels = (inputs["token_ids"][:, 0] % 2).astype("int32")
    model = rebuilt(classifier, distribution)
    with scope(distribution):
        model.compile(
            optimizer=keras.optimizers.Adam(1e-2),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        )
        history = model.fit(
            inputs,
            labels,
            batch_size=BATCH,
            epochs=epochs,
            shuffle=False,
            verbose=0,
        )
    return [float(loss) for loss in history.history["loss"]]


def distill_losses(source, converted, distribution=None):
    """`keras_collab.distill` of a copy of `converted`, built under
    `distribution`, toward `source`."""
    student = rebuilt(converted, distribution)
    with scope(distribution):
        result = keras_collab.distill(
            source, student, bert_inputs(3), steps=4, learning_rate=1e-2
        )
    return [result["loss_before"], result["loss_after"]]


def main():
    clock = Clock()
    devices = keras.distribution.list_devices()
    mesh = keras.distribution.DeviceMesh((2, 4), ("batch", "model"), devices)
    data_parallel = keras.distribution.DataParallel(devices=devices)

    def layer_distributions(shared_values):
        layout_map = keras_collab.get_layout_map(
            mesh, "model", "batch", shared_values=shared_values
        )
        return {
            "data_parallel": data_parallel,
            "model_parallel": keras.distribution.ModelParallel(
                layout_map=layout_map, batch_dim_name="batch"
            ),
        }

    result = {"devices": len(devices), "mesh": list(mesh.shape)}
    result["seconds"] = {}
    result["layer"] = layer_results(layer_distributions)
    result["seconds"]["layer"] = clock.lap()

    source = tiny_bert()
    conversion = keras_collab.convert_model(source, shared_key_dim=0.25)
    converted = conversion.model
    backbone_cls = type(converted)  # CollaborativeBertBackbone

    # The tiny vocabulary splits over the model axis, real ones rarely do.
    layout_map = backbone_cls.get_layout_map(mesh, shard_embeddings=True)
    distributions = {
        "data_parallel": data_parallel,
        "model_parallel": keras.distribution.ModelParallel(
            layout_map=layout_map, batch_dim_name="batch"
        ),
    }
    with tempfile.TemporaryDirectory() as directory:
        result["backbone"] = backbone_results(
            converted, distributions, directory
        )
    result["seconds"]["backbone"] = clock.lap()

    keras.utils.set_random_seed(0)
    classifier = keras_hub.models.BertTextClassifier(
        converted, num_classes=2, preprocessor=None, dropout=0.0
    )
    result["fit"] = {"single_device": fit_losses(classifier, None)}
    for name, distribution in distributions.items():
        result["fit"][name] = fit_losses(classifier, distribution)
    result["seconds"]["fit"] = clock.lap()
    result["distill"] = {"single_device": distill_losses(source, converted)}
    for name, distribution in distributions.items():
        result["distill"][name] = distill_losses(
            source, converted, distribution
        )
    result["seconds"]["distill"] = clock.lap()
    return result


if __name__ == "__main__":
    print(json.dumps(main()))
    sys.stdout.flush()
