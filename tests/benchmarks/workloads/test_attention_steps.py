import keras
import pytest

from benchmarks.workloads import attention_steps


@pytest.mark.parametrize("mode", attention_steps.MODES)
@pytest.mark.parametrize("shared_key_dim", [None, 8])
def test_steps_run_on_current_backend(mode, shared_key_dim):
    inputs = keras.random.normal((2, 6, 16))
    layer = attention_steps.build_attention(inputs, 2, 4, shared_key_dim)
    variant = attention_steps.VARIANTS[keras.backend.backend()][0]
    step = attention_steps.make_step(layer, inputs, mode, variant, False)
    step()
    step()
