"""Export of converted models for serving, with Keras' own `model.export`.

Two formats: a TensorFlow SavedModel (`"tf_saved_model"`: TF Serving, or
`tf.saved_model.load(path).serve(inputs)`) and ONNX (`"onnx"`: ONNX
Runtime). Keras exports with the backend that runs, and each backend's
exporter takes different input shapes. Found by trying with Keras 3.15.1,
KerasHub 0.32.0, tf2onnx 1.17, jax2onnx 0.17 and torch 2.13 (CPU), on
converted and on unconverted KerasHub models alike:

| backend    | `tf_saved_model`            | `onnx`                       |
| ---------- | --------------------------- | ---------------------------- |
| tensorflow | batch and length dynamic    | batch and length dynamic     |
| jax        | batch dynamic, fixed length | fixed batch and length       |
| torch      | not available               | fixed batch and length       |

A size left as `None` stays dynamic where the pair allows it, and is fixed
to `DEFAULT_BATCH_SIZE` or the model's sequence length where it does not.
What was exported (inputs with their shapes, outputs in the order the
artifact returns them) is written next to the artifact in `MANIFEST_FILE`.

The collaborative layer itself exports on every pair above: on PyTorch CPU
its cache-blocked kernel traces into plain ONNX operations, and on JAX the
fused `dot_product_attention` path exports too.
"""

import importlib.util
import json
import os

import keras
import keras_hub

from keras_collab.hub import preset_files

FORMATS = ("tf_saved_model", "onnx")
MODELS = ("backbone", "causal_lm")
MANIFEST_FILE = "keras_collab_export.json"
ONNX_FILE = "model.onnx"
DEFAULT_BATCH_SIZE = 1
DEFAULT_SEQUENCE_LENGTH = 128

# How many leading input axes (batch, then sequence) each pair's exporter
# keeps dynamic. JAX to SavedModel (jax2tf): KerasHub's position embedding
# compares the sequence length with its maximum, which a symbolic length
# cannot answer. JAX to ONNX (jax2onnx): with a symbolic batch the artifact
# fails at run time in a Reshape. PyTorch: Keras' ONNX export takes no
# dynamic shapes (its TorchScript fallback for them fails in Keras' own
# layer normalization).
_DYNAMIC_AXES = {
    ("tensorflow", "tf_saved_model"): 2,
    ("tensorflow", "onnx"): 2,
    ("jax", "tf_saved_model"): 1,
    ("jax", "onnx"): 0,
    ("torch", "onnx"): 0,
}
_UNSUPPORTED = {
    ("torch", "tf_saved_model"): (
        "Keras exports a SavedModel on PyTorch through torch_xla "
        "(StableHLO), and torch-xla (2.9.0, the newest on PyPI) is built "
        "against torch 2.9: it does not import with torch 2.13 (undefined "
        "symbols in _XLAC). Keras' PyTorch export archive also takes no "
        "dict inputs, which KerasHub models have."
    ),
}
# Modules each pair's exporter imports (module name: pip package).
_REQUIREMENTS = {
    ("tensorflow", "tf_saved_model"): {"tensorflow": "tensorflow-cpu"},
    ("tensorflow", "onnx"): {"tf2onnx": "tf2onnx", "onnx": "onnx"},
    ("jax", "tf_saved_model"): {"tensorflow": "tensorflow-cpu"},
    ("jax", "onnx"): {"jax2onnx": "jax2onnx", "onnx": "onnx"},
    ("torch", "onnx"): {"onnxscript": "onnxscript", "onnx": "onnx"},
}
# Export errors of third-party code, with what they mean.
_KNOWN_FAILURES = {
    ("jax", "onnx", "jax.numpy.arange"): (
        "jax2onnx cannot trace KerasHub's decoder causal mask (it calls "
        "`ops.arange` with one argument); the unconverted model fails the "
        "same way. Export this model on TensorFlow or PyTorch instead."
    ),
}


_BACKENDS = {backend for backend, _ in _DYNAMIC_AXES}


def _backend():
    return keras.backend.backend()


def check_format(format):
    """Raises `ValueError` naming `format` unless it is one of `FORMATS`."""
    if format not in FORMATS:
        raise ValueError(
            f"Unknown export format '{format}'; expected one of "
            f"{', '.join(FORMATS)}."
        )


def unsupported_reason(format, backend=None):
    """Why Keras cannot export `format` on `backend` (the running one), or
    `None` where it can.

    >>> unsupported_reason("onnx", "torch") is None
    True
    >>> unsupported_reason("tf_saved_model", "torch").startswith("Keras")
    True
    >>> unsupported_reason("onnx", "numpy")
    'keras-collab exports on the jax, tensorflow, torch backends only.'
    """
    check_format(format)
    backend = backend or _backend()
    if (backend, format) not in _DYNAMIC_AXES | _UNSUPPORTED:
        return (
            f"keras-collab exports on the {', '.join(sorted(_BACKENDS))} "
            "backends only."
        )
    return _UNSUPPORTED.get((backend, format))


def check_supported(format, backend=None):
    """Raises `ValueError` where Keras cannot export `format` on `backend`
    (the running one) or its exporter's packages are missing."""
    backend = backend or _backend()
    reason = unsupported_reason(format, backend)
    if reason:
        others = [b for b, f in _DYNAMIC_AXES if f == format and b != backend]
        hint = " or ".join(f"KERAS_BACKEND={name}" for name in others)
        raise ValueError(
            f"The {backend} backend cannot export {format}: {reason} "
            f"Run the export with {hint}."
        )
    missing = [
        package
        for module, package in _REQUIREMENTS[(backend, format)].items()
        if importlib.util.find_spec(module) is None
    ]
    if missing:
        raise ValueError(
            f"Exporting {format} on the {backend} backend needs "
            f"{', '.join(missing)}: pip install 'keras-collab[export]'."
        )


def input_signature(
    model, format, batch_size=None, sequence_length=None, backend=None
):
    """The input specs `export_model` exports `model` with.

    Axis 0 of each input is the batch, and any other unknown axis its
    sequence. A size given stays fixed; a size left `None` stays dynamic
    where the backend's exporter allows it (see the module's table), and is
    otherwise `DEFAULT_BATCH_SIZE` or the model's sequence length
    (`DEFAULT_SEQUENCE_LENGTH`, at most its `max_sequence_length`).

    Args:
        model: A built functional model.
        format: One of `FORMATS`, on a backend that exports it.
        batch_size: A fixed batch size, or `None`.
        sequence_length: A fixed sequence length, or `None`.
        backend: The backend whose exporter the specs are for (default:
            the running one).

    Returns:
        The structure of `model.input` (a dict for KerasHub models), of
        `keras.InputSpec`s named after the inputs.
    """
    backend = backend or _backend()
    dynamic = _DYNAMIC_AXES[(backend, format)]
    batch = batch_size or (None if dynamic >= 1 else DEFAULT_BATCH_SIZE)
    length = sequence_length or (
        None if dynamic >= 2 else _default_sequence_length(model)
    )

    def spec(tensor):
        shape = [
            (batch if axis == 0 else length) if size is None else size
            for axis, size in enumerate(tensor.shape)
        ]
        return keras.InputSpec(
            shape=tuple(shape), dtype=tensor.dtype, name=tensor.name
        )

    return keras.tree.map_structure(spec, model.input)


def _default_sequence_length(model):
    backbone = getattr(model, "backbone", model)
    limit = getattr(backbone, "max_sequence_length", None)
    if isinstance(limit, int) and limit > 0:
        return min(DEFAULT_SEQUENCE_LENGTH, limit)
    return DEFAULT_SEQUENCE_LENGTH


def output_names(model):
    """Names of `model`'s outputs, in the order the artifacts return them
    (ONNX Runtime returns a list; Keras flattens dict outputs by key)."""
    output = model.output
    if isinstance(output, dict):
        return keras.tree.flatten({key: key for key in output})
    return [tensor.name for tensor in keras.tree.flatten(output)]


def write_export(
    model, directory, format, batch_size=None, sequence_length=None
):
    """Exports `model` into the new or empty `directory`: the artifact
    (the SavedModel files, or `ONNX_FILE`) and `MANIFEST_FILE`.

    Not atomic: `export_model` and `keras-collab convert --export` call it
    inside a folder that is renamed into place once complete.

    Returns:
        The manifest (a dict): format, backend, artifact (a path relative
        to `directory`), inputs (name: shape and dtype) and outputs.
    """
    check_format(format)
    check_supported(format)
    signature = input_signature(model, format, batch_size, sequence_length)
    # ONNX is one file; a SavedModel is a folder of files.
    artifact = ONNX_FILE if format == "onnx" else "."
    os.makedirs(directory, exist_ok=True)
    try:
        model.export(
            os.path.normpath(os.path.join(directory, artifact)),
            format=format,
            input_signature=[signature],
            verbose=False,
        )
    except Exception as error:  # the exporters raise many kinds
        raise _export_failure(model, format, error) from error
    manifest = _manifest(model, format, artifact, signature)
    with open(os.path.join(directory, MANIFEST_FILE), "w") as file:
        json.dump(manifest, file, indent=2)
    return manifest


def _manifest(model, format, artifact, signature):
    return {
        "format": format,
        "backend": _backend(),
        "keras_version": keras.__version__,
        "model": type(model).__name__,
        "artifact": artifact,
        "inputs": {
            spec.name: {"shape": list(spec.shape), "dtype": spec.dtype}
            for spec in keras.tree.flatten(signature)
        },
        "outputs": output_names(model),
    }


def _export_failure(model, format, error):
    backend = _backend()
    text = str(error).strip()
    first_line = text.splitlines()[0] if text else ""
    message = (
        f"Keras could not export {type(model).__name__} as {format} on the "
        f"{backend} backend: {type(error).__name__}: {first_line}"
    )
    for (
        known_backend,
        known_format,
        marker,
    ), meaning in _KNOWN_FAILURES.items():
        if (known_backend, known_format) == (backend, format) and (
            marker in text
        ):
            message += f" ({meaning})"
    return ValueError(message)


def export_model(
    model,
    path,
    format="onnx",
    batch_size=None,
    sequence_length=None,
    force=False,
):
    """Exports `model`'s forward pass for serving, with `model.export`.

    Args:
        model: A built functional Keras model (a KerasHub backbone or task).
        path: The folder to write: the artifact and `MANIFEST_FILE`.
            Written next to its final place and renamed into place once
            complete.
        format: One of `FORMATS`.
        batch_size: A fixed batch size, or `None` (see `input_signature`).
        sequence_length: A fixed sequence length, or `None`.
        force: Whether to replace an existing `path`.

    Returns:
        The manifest (see `write_export`).

    Raises:
        ValueError: naming an unknown format, a backend that cannot export
            the format and why, a missing package, or the exporter's error.
        FileExistsError: if `path` exists and not `force`.

    Example:

    ```python
    manifest = export_model(converted_backbone, "export/onnx", "onnx")
    session = onnxruntime.InferenceSession("export/onnx/model.onnx")
    outputs = dict(zip(manifest["outputs"], session.run(None, inputs)))
    ```
    """
    check_format(format)
    check_supported(format)
    with preset_files.atomic_directory(path, force=force) as staging:
        return write_export(model, staging, format, batch_size, sequence_length)


def load_preset_model(preset, model="backbone"):
    """What `keras-collab export` exports from a preset folder: its
    backbone, or the causal LM built on it (a GPT-2-like preset's forward
    pass to token logits, no preprocessing)."""
    if model not in MODELS:
        raise ValueError(
            f"Unknown model '{model}'; expected one of {', '.join(MODELS)}."
        )
    if not os.path.isdir(preset):
        raise ValueError(f"Preset '{preset}' is not a directory.")
    if model == "backbone":
        return keras_hub.models.Backbone.from_preset(preset)
    try:
        return keras_hub.models.CausalLM.from_preset(preset, preprocessor=None)
    except ValueError as error:
        raise ValueError(
            f"'{preset}' holds no causal LM backbone: {error}"
        ) from error
