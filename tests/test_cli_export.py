"""`keras-collab convert --export FORMAT` and `keras-collab export`, end to
end: the artifacts they write give the preset's Keras outputs."""

import json
import os

import numpy as np
import pytest

from keras_collab import cli
from keras_collab.hub import export
from tests.conftest import BACKEND
from tests.hub.test_export import ATOL
from tests.hub.test_export import _inputs
from tests.hub.test_export import _keras_outputs
from tests.hub.test_export import _served_outputs

keras_hub = pytest.importorskip("keras_hub")

# The formats this backend exports (all of them where Keras can).
EXPORTABLE = [f for f in export.FORMATS if not export.unsupported_reason(f)]


def _run(capsys, *argv):
    code = cli.main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _assert_artifact_matches(model, directory):
    with open(os.path.join(directory, export.MANIFEST_FILE)) as file:
        manifest = json.load(file)
    inputs = _inputs(manifest, 2, 8)
    expected = _keras_outputs(model, inputs, manifest["outputs"])
    actual = _served_outputs(directory, manifest, inputs)
    assert set(actual) == set(expected)
    for name in expected:
        np.testing.assert_allclose(
            actual[name], expected[name], atol=ATOL, err_msg=name
        )
    return manifest


@pytest.fixture(scope="module")
def converted_preset(tiny_preset, tmp_path_factory):
    """A tiny BERT preset converted by the CLI with `--export` for every
    format this backend exports; `(preset, JSON report)`."""
    for format in EXPORTABLE:
        export.check_supported(format)
    output = str(tmp_path_factory.mktemp("cli_export") / "converted")
    flags = [arg for format in EXPORTABLE for arg in ("--export", format)]
    code = cli.main(
        [
            "convert",
            tiny_preset,
            "--shared-key-dim",
            "8",
            "--no-calibration",
            "--no-speed",
            "--sequence-length",
            "16",
            "--output",
            output,
            "--json",
            *flags,
        ]
    )
    assert code == 0
    with open(os.path.join(output, "keras_collab_report.json")) as file:
        return output, json.load(file)


def test_convert_export_writes_artifacts_in_the_preset(converted_preset):
    preset, report = converted_preset
    assert set(report["exports"]) == set(EXPORTABLE)
    backbone = keras_hub.models.Backbone.from_preset(preset)  # still loads
    assert type(backbone).__name__ == "CollaborativeBertBackbone"
    for format in EXPORTABLE:
        directory = os.path.join(preset, cli.EXPORT_FOLDER, format)
        manifest = _assert_artifact_matches(backbone, directory)
        assert manifest == report["exports"][format]


def test_export_command(converted_preset, tmp_path, capsys):
    preset, _ = converted_preset
    backbone = keras_hub.models.Backbone.from_preset(preset)
    for format in EXPORTABLE:
        output = str(tmp_path / format)
        code, out, err = _run(
            capsys, "export", preset, "--format", format, "--output", output
        )
        assert code == 0, err
        assert f"Exported CollaborativeBertBackbone from {preset}" in out
        assert f"Keras backend: {BACKEND}" in out
        assert "Outputs, in order: pooled_output, sequence_output" in out
        _assert_artifact_matches(backbone, output)


def test_export_command_json_and_fixed_sizes(
    converted_preset, tmp_path, capsys
):
    preset, _ = converted_preset
    format = EXPORTABLE[-1]
    output = str(tmp_path / "fixed")
    code, out, err = _run(
        capsys,
        "export",
        preset,
        "--format",
        format,
        "--output",
        output,
        "--batch-size",
        "2",
        "--sequence-length",
        "8",
        "--json",
    )
    assert code == 0, err
    manifest = json.loads(out)
    assert manifest["output"] == output and manifest["preset"] == preset
    for spec in manifest["inputs"].values():
        assert spec["shape"] == [2, 8]
    backbone = keras_hub.models.Backbone.from_preset(preset)
    _assert_artifact_matches(backbone, output)
    # An existing output is kept unless --force.
    code, _, err = _run(
        capsys, "export", preset, "--format", format, "--output", output
    )
    assert code == 2 and "--force" in err


def test_causal_lm_export(tmp_path, capsys):
    """`--model causal_lm`: a GPT-2 preset's forward pass to logits."""
    from keras_collab.conversion import convert_model

    format = "onnx" if BACKEND == "torch" else "tf_saved_model"
    backbone = keras_hub.models.GPT2Backbone(
        vocabulary_size=30,
        num_layers=1,
        num_heads=2,
        hidden_dim=16,
        intermediate_dim=32,
        max_sequence_length=16,
    )
    converted = convert_model(backbone, shared_key_dim=4, max_iter=1).model
    preset = str(tmp_path / "gpt2")
    converted.save_to_preset(preset)
    output = str(tmp_path / "export")
    code, out, err = _run(
        capsys,
        "export",
        preset,
        "--format",
        format,
        "--output",
        output,
        "--model",
        "causal_lm",
    )
    assert code == 0, err
    assert "CollaborativeGPT2CausalLM" in out
    causal_lm = keras_hub.models.CausalLM.from_preset(preset, preprocessor=None)
    manifest = _assert_artifact_matches(causal_lm, output)
    assert list(manifest["inputs"]) == ["padding_mask", "token_ids"]


def test_unknown_format_is_named(tiny_preset, tmp_path, capsys):
    for argv in (
        ["export", tiny_preset, "--format", "tflite", "--output", "x"],
        ["convert", tiny_preset, "--export", "tflite"],
    ):
        with pytest.raises(SystemExit) as info:
            cli.main(argv)
        assert info.value.code == 2
        assert "invalid choice: 'tflite'" in capsys.readouterr().err


def test_formats_match_the_export_module():
    assert cli.EXPORT_FORMATS == export.FORMATS


def test_backend_that_cannot_export_is_named_before_converting(
    tiny_preset, tmp_path, capsys, monkeypatch
):
    # What the PyTorch backend answers, on every backend.
    monkeypatch.setattr(export, "_backend", lambda: "torch")
    output = tmp_path / "converted"
    code, _, err = _run(
        capsys,
        "convert",
        tiny_preset,
        "--no-calibration",
        "--no-speed",
        "--output",
        str(output),
        "--export",
        "tf_saved_model",
    )
    assert code == 2
    assert "torch backend cannot export tf_saved_model" in err
    assert "KERAS_BACKEND=tensorflow or KERAS_BACKEND=jax" in err
    assert not output.exists()
    code, _, err = _run(
        capsys,
        "export",
        tiny_preset,
        "--format",
        "tf_saved_model",
        "--output",
        str(output),
    )
    assert code == 2 and "torch_xla" in err and not output.exists()


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--output", "{preset}/inside"], "--output must lie outside"),
        (["--output", "{tmp}/x", "--batch-size", "0"], "positive integer"),
        (["--output", "{tmp}/x", "--model", "causal_lm"], "no causal LM"),
    ],
)
def test_bad_export_input(tiny_preset, tmp_path, capsys, argv, message):
    format = EXPORTABLE[-1]
    argv = [a.format(preset=tiny_preset, tmp=tmp_path) for a in argv]
    try:
        code = cli.main(["export", tiny_preset, "--format", format, *argv])
    except SystemExit as exit:  # argparse's own errors
        code = exit.code
    assert code == 2
    assert message in capsys.readouterr().err
    assert not os.path.exists(os.path.join(tiny_preset, "inside"))
