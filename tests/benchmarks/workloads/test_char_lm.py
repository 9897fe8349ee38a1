import keras
import numpy as np
import pytest

from benchmarks.workloads import char_lm
from benchmarks.workloads import stdlib_text


@pytest.mark.parametrize("variant", ["concatenated", "collaborative"])
def test_language_model_runs_at_a_small_key_size(variant):
    factory = {
        "concatenated": char_lm.concatenated_attention,
        "collaborative": char_lm.collaborative_attention,
    }[variant]
    model = char_lm.build_language_model(
        factory(num_heads=2, total_key_dim=4, value_dim=8),
        seq_len=6,
        vocabulary_size=stdlib_text.VOCABULARY_SIZE,
        width=16,
        depth=1,
    )
    logits = model(np.zeros((2, 6), dtype="int32"))
    assert tuple(logits.shape) == (2, 6, stdlib_text.VOCABULARY_SIZE)
    assert keras.ops.all(keras.ops.isfinite(logits))
