"""Smoke tests of the examples: each one's `main()`, in-process, with its
`--quick` setting (and a tiny preset where the example takes a source), on
every backend. The full runs use the bundled MiniLM; see README.md."""

import importlib.util
import pathlib

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
