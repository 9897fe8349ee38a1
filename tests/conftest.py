import importlib.util
import os

import keras
import numpy as np
import pytest

# Each backend runs the whole suite in its own process (see scripts/test.sh):
# KERAS_BACKEND is read once, when keras is imported.
BACKEND = keras.backend.backend()


def pytest_report_header(config):
    requested = os.environ.get("KERAS_BACKEND")
    return (
        f"keras {keras.__version__}, backend {BACKEND}, "
        f"KERAS_BACKEND={requested}"
    )


@pytest.fixture(autouse=True)
def _seed_and_policy():
    keras.utils.set_random_seed(1234)
    np.random.seed(1234)
    yield
    keras.config.set_dtype_policy("float32")


# Shared by the CLI and hub tests; KerasHub is optional.
if importlib.util.find_spec("keras_hub") is not None:
    from tests.fixtures.presets import tiny_bart_preset  # noqa: F401
    from tests.fixtures.presets import tiny_preset  # noqa: F401
