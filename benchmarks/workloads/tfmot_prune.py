"""Magnitude masks of attention query/key kernels, computed by TFMOT.

Runs in its own process, never inside a benchmark or test process:
TensorFlow Model Optimization only supports `tf_keras` (Keras 2), and
importing it sets `TF_USE_LEGACY_KERAS`, which would change what a Keras 3
process runs on. The `pruning` suite and the tests call it as

    python benchmarks/workloads/tfmot_prune.py INPUT.npz OUTPUT.npz

INPUT.npz holds `num_heads`, `key_dim`, `sparsities` (S,) and, for each layer
`i`, the weights of a Keras `MultiHeadAttention`: `{i}/query_kernel`,
`{i}/query_bias`, `{i}/key_kernel`, `{i}/key_bias`, `{i}/value_kernel`,
`{i}/value_bias`, `{i}/output_kernel`, `{i}/output_bias`.

For each layer and sparsity it builds a `tf_keras` `MultiHeadAttention` with
those weights, declares only the query and key kernels prunable (a
`PrunableLayer`), wraps it with `prune_low_magnitude` and
`ConstantSparsity(sparsity, begin_step=0, frequency=1)`, and runs one
training step of `fit` (SGD with learning rate 0, so the weights do not
move) with the `UpdatePruningStep` callback: the pruning step that computes
the masks. OUTPUT.npz gets `{i}/{j}/query_mask` and `{i}/{j}/key_mask`
(booleans, kernel-shaped) for sparsity `j`, and `versions` (JSON text).
Exit status 3 when TFMOT or tf_keras cannot be imported (the reason on
stderr).
"""

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SCRIPT = Path(__file__).resolve()
# Exit status of the script when TFMOT or tf_keras cannot be imported.
UNAVAILABLE = 3


def available():
    """Whether TFMOT and tf_keras are installed (without importing them)."""
    import importlib.util

    return all(
        importlib.util.find_spec(name) is not None
        for name in ("tensorflow_model_optimization", "tf_keras")
    )


def run(layer_weights, num_heads, key_dim, sparsities, timeout_s=600):
    """Runs this script in a subprocess and returns TFMOT's masks.

    Args:
        layer_weights: List, one dict per layer, of the MHA weights by role
            (see the module docstring).
        num_heads: Heads of every layer.
        key_dim: Key size of every layer.
        sparsities: Sparsities to prune at.
        timeout_s: Longest the subprocess may run.

    Returns:
        `(masks, info)`: `masks[layer][sparsity index]` is
        `{"query": bool array, "key": bool array}`, or `None` when TFMOT
        could not run; `info` has the seconds, versions or the reason.
    """
    if not available():
        return None, {
            "reason": "tensorflow-model-optimization or tf-keras is not "
            "installed (the optional `tfmot` extra)"
        }
    with tempfile.TemporaryDirectory() as directory:
        inputs = Path(directory) / "weights.npz"
        outputs = Path(directory) / "masks.npz"
        _save_inputs(inputs, layer_weights, num_heads, key_dim, sparsities)
        start = time.perf_counter()
        try:
            completed = subprocess.run(
                [sys.executable, str(SCRIPT), str(inputs), str(outputs)],
                env=_environment(),
                capture_output=True,
                text=True,
                timeout=timeout_s,
                check=False,
            )
        except subprocess.TimeoutExpired:
            return None, {"reason": f"TFMOT subprocess ran over {timeout_s} s"}
        seconds = time.perf_counter() - start
        if completed.returncode != 0:
            return None, {"reason": _failure(completed), "seconds": seconds}
        return _load_masks(
            outputs, len(layer_weights), len(sparsities), seconds
        )


def _save_inputs(path, layer_weights, num_heads, key_dim, sparsities):
    """Writes the script's INPUT.npz (see the module docstring)."""
    import numpy as np

    arrays = {
        "num_heads": np.array(num_heads),
        "key_dim": np.array(key_dim),
        "sparsities": np.asarray(sparsities, dtype=np.float64),
    }
    for index, weights in enumerate(layer_weights):
        for role, value in weights.items():
            arrays[f"{index}/{role}"] = value
    np.savez(path, **arrays)


def _environment():
    """This process's environment without its Keras 3 backend choice."""
    environment = {
        key: value
        for key, value in os.environ.items()
        if key not in ("KERAS_BACKEND", "TF_USE_LEGACY_KERAS")
    }
    environment.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    return environment


def _failure(completed):
    """Why the script failed, with the end of its standard error."""
    tail = " ".join(completed.stderr.split())[-400:]
    what = (
        "cannot import TFMOT"
        if completed.returncode == UNAVAILABLE
        else f"TFMOT subprocess exited with {completed.returncode}"
    )
    return f"{what}: {tail}"


def _load_masks(path, num_layers, num_sparsities, seconds):
    """`(masks, info)` from the script's OUTPUT.npz, as `run` returns."""
    import numpy as np

    result = np.load(path)
    masks = [
        [
            {
                "query": result[f"{layer}/{index}/query_mask"],
                "key": result[f"{layer}/{index}/key_mask"],
            }
            for index in range(num_sparsities)
        ]
        for layer in range(num_layers)
    ]
    info = {
        "seconds": seconds,
        "versions": json.loads(str(result["versions"])),
    }
    return masks, info


def _import():
    try:
        import tensorflow as tf
        import tensorflow_model_optimization as tfmot
        import tf_keras
    except Exception as error:  # ImportError, or a broken install
        print(f"cannot import TFMOT / tf_keras: {error!r}", file=sys.stderr)
        sys.exit(UNAVAILABLE)
    return tf, tf_keras, tfmot


def masks_for_layer(tf_keras, tfmot, weights, num_heads, key_dim, sparsity):
    """Query and key masks TFMOT computes for one layer at one sparsity."""
    import numpy as np

    class PrunableAttention(
        tf_keras.layers.MultiHeadAttention, tfmot.sparsity.keras.PrunableLayer
    ):
        def get_prunable_weights(self):
            return [self._query_dense.kernel, self._key_dense.kernel]

    model_dim = weights["query_kernel"].shape[0]
    layer = PrunableAttention(num_heads=num_heads, key_dim=key_dim)
    sample = np.zeros((1, 4, model_dim), np.float32)
    layer(sample, sample)
    for sublayer, name in (
        (layer._query_dense, "query"),
        (layer._key_dense, "key"),
        (layer._value_dense, "value"),
        (layer._output_dense, "output"),
    ):
        sublayer.set_weights(
            [weights[f"{name}_kernel"], weights[f"{name}_bias"]]
        )

    pruned = tfmot.sparsity.keras.prune_low_magnitude(
        layer,
        pruning_schedule=tfmot.sparsity.keras.ConstantSparsity(
            float(sparsity), begin_step=0, frequency=1
        ),
    )
    inputs = tf_keras.Input((4, model_dim))
    model = tf_keras.Model(inputs, pruned(inputs, value=inputs))
    model.compile(
        optimizer=tf_keras.optimizers.SGD(learning_rate=0.0), loss="mse"
    )
    model.fit(
        sample,
        sample,
        batch_size=1,
        epochs=1,
        verbose=0,
        callbacks=[tfmot.sparsity.keras.UpdatePruningStep()],
    )
    masks = {}
    for weight, mask, _ in pruned.pruning_vars:
        role = "query" if weight is layer._query_dense.kernel else "key"
        masks[role] = mask.numpy() > 0.5
    return masks


def main(argv):
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    import numpy as np

    # Before TensorFlow is imported: TFMOT needs Keras 2 (tf_keras).
    os.environ["TF_USE_LEGACY_KERAS"] = "1"
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    tf, tf_keras, tfmot = _import()
    data = np.load(argv[0])
    num_heads, key_dim = int(data["num_heads"]), int(data["key_dim"])
    sparsities = [float(s) for s in data["sparsities"]]
    layers = sorted(
        {key.split("/")[0] for key in data.files if "/" in key}, key=int
    )
    output = {}
    for layer in layers:
        weights = {
            key.split("/", 1)[1]: data[key]
            for key in data.files
            if key.startswith(f"{layer}/")
        }
        for index, sparsity in enumerate(sparsities):
            masks = masks_for_layer(
                tf_keras, tfmot, weights, num_heads, key_dim, sparsity
            )
            output[f"{layer}/{index}/query_mask"] = masks["query"]
            output[f"{layer}/{index}/key_mask"] = masks["key"]
    output["versions"] = np.array(
        json.dumps(
            {
                "tensorflow": tf.__version__,
                "tf_keras": tf_keras.__version__,
                "tensorflow_model_optimization": getattr(
                    tfmot, "__version__", "unknown"
                ),
            }
        )
    )
    np.savez(argv[1], **output)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
