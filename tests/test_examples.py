"""Smoke tests of the examples: each one's `main()`, in-process, with its
`--quick` setting (and a tiny preset where the example takes a source), on
every backend; `distributed.py` in a fresh JAX process with 8 virtual CPU
devices. The full runs use the bundled MiniLM; see README.md."""

import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import pytest

from tests.conftest import BACKEND

pytest.importorskip("keras_hub")

EXAMPLES = pathlib.Path(__file__).resolve().parents[1] / "examples"


def _example(name):
    spec = importlib.util.spec_from_file_location(
        f"examples_{name}", EXAMPLES / f"{name}.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_convert_preset(tiny_preset, tmp_path):
    output = tmp_path / "converted"
    result = _example("convert_preset").main(
        ["--quick", "--source", tiny_preset, "--output", str(output)]
    )
    assert result["backend"] == BACKEND
    assert result["layers"] == 2
    assert result["qk_params_after"] < result["qk_params_before"]
    assert 0.5 < result["mean_cosine"] <= 1 + 1e-6
    assert result["reloaded_class"] == "CollaborativeBertBackbone"
    assert result["reload_max_abs_difference"] < 1e-5
    assert (output / "config.json").is_file()


def test_finetune_converted_classifier(tiny_preset, tmp_path):
    module = _example("finetune_converted_classifier")
    train, train_labels, test, test_labels = module.labelled_task(32, 16)
    assert set(train).isdisjoint(test)
    assert train_labels.mean() == test_labels.mean() == 0.5
    assert all(module.label(s) == y for s, y in zip(test, test_labels))
    result = module.main(
        ["--quick", "--source", tiny_preset, "--output", str(tmp_path / "p")]
    )
    assert result["backend"] == BACKEND
    assert set(result["accuracy"]) == {"original", "converted"}
    assert all(0 <= a <= 1 for a in result["accuracy"].values())


def test_generate_with_converted_gpt2():
    result = _example("generate_with_converted_gpt2").main(
        [
            "--quick",
            "--train",
            "32",
            "--held-out",
            "8",
            "--sequence-length",
            "32",
            "--max-length",
            "16",
        ]
    )
    assert result["backend"] == BACKEND
    assert result["converted_class"] == "CollaborativeGPT2CausalLM"
    # 2 layers, H = 4, d = 16, D̃ = 32: 2·(2·4·16) against 2·(32 + 4 + 4·16).
    assert result["cache_numbers_per_token"] == {
        "original": 256,
        "converted": 200,
    }
    for texts in result["generated"].values():
        assert len(texts) == 3 and all(isinstance(t, str) for t in texts)


@pytest.mark.skipif(
    BACKEND != "jax",
    reason="keras.distribution is implemented for JAX only (TensorFlow's "
    "distribution_lib is a 'do not use' prototype, PyTorch has none)",
)
def test_distributed_on_8_virtual_cpu_devices():
    # A fresh process: XLA reads the device count when JAX starts.
    environ = {
        **os.environ,
        "KERAS_BACKEND": "jax",
        "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
    }
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / "distributed.py"), "--quick", "--json"],
        capture_output=True,
        text=True,
        env=environ,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["devices"] == 8 and result["mesh"] == [2, 4]
    assert result["converted_class"] == "CollaborativeBertTextClassifier"
    # Data parallel: the one-device steps, the weights replicated.
    assert result["data_parallel_loss"] == pytest.approx(
        result["single_device_loss"], rel=1e-5
    )
    assert result["data_parallel_replicated"]
    assert result["data_parallel_max_weight_difference"] < 1e-5
    # Model parallel: heads split over 'model', the one-device outputs.
    for difference in result["model_parallel_max_abs_difference"].values():
        assert difference < 1e-5
    specs = result["model_parallel_specs"]
    split = {
        "mixing": ["model", None],
        # The model width also over "batch", as KerasHub's Llama layout.
        "value/kernel": ["batch", "model", None],
        "value_mixing": ["model", None],
    }
    for kind, names in (
        ("per-head values", ("mixing", "value/kernel")),
        ("shared values", ("mixing", "value_mixing")),
    ):
        paths = specs[kind]
        assert len(paths) == 2
        for name in names:
            (spec,) = [s for p, s in paths.items() if p.endswith("/" + name)]
            assert spec == split[name], (kind, name)
