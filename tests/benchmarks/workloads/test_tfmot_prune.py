"""The keras.ops magnitude mask equals TFMOT's (TensorFlow backend only).

TFMOT needs tf_keras and sets TF_USE_LEGACY_KERAS when imported, so it runs
in a subprocess (`benchmarks/workloads/tfmot_prune.py`), never in the test
process.
"""

import keras
import numpy as np
import pytest

from benchmarks.workloads import compression
from benchmarks.workloads import tfmot_prune

pytestmark = pytest.mark.skipif(
    keras.backend.backend() != "tensorflow" or not tfmot_prune.available(),
    reason="needs KERAS_BACKEND=tensorflow and the `tfmot` extra "
    "(tensorflow-model-optimization, tf-keras)",
)


def test_keras_ops_magnitude_mask_equals_tfmot():
    rng = np.random.default_rng(0)
    model_dim, num_heads, key_dim = 16, 2, 4

    def kernel(shape, decimals):
        # Rounded values: entries tie at the threshold.
        return np.round(rng.standard_normal(shape), decimals).astype("float32")

    weights = {
        "query_kernel": kernel((model_dim, num_heads, key_dim), 1),
        "query_bias": kernel((num_heads, key_dim), 3),
        "key_kernel": kernel((model_dim, num_heads, key_dim), 2),
        "key_bias": kernel((num_heads, key_dim), 3),
        "value_kernel": kernel((model_dim, num_heads, key_dim), 3),
        "value_bias": kernel((num_heads, key_dim), 3),
        "output_kernel": kernel((num_heads, key_dim, model_dim), 3),
        "output_bias": kernel((model_dim,), 3),
    }
    sparsities = [0.55, 0.9]
    masks, info = tfmot_prune.run([weights], num_heads, key_dim, sparsities)
    assert masks is not None, info
    for index, sparsity in enumerate(sparsities):
        for role in ("query", "key"):
            expected = keras.ops.convert_to_numpy(
                compression.magnitude_mask(weights[f"{role}_kernel"], sparsity)
            )
            np.testing.assert_array_equal(masks[0][index][role], expected)
