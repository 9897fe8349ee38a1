"""The default recipe of `keras-collab convert` and its held-out domains."""

import json

import pytest

from keras_collab import cli
from keras_collab.hub import corpus

keras_hub = pytest.importorskip("keras_hub")


def _convert(capsys, *argv):
    code = cli.main(["convert", *argv, "--json"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return json.loads(captured.out)


def _convert_help():
    parser = cli._parser()
    commands = next(
        action
        for action in parser._actions
        if getattr(action, "choices", None) and "convert" in action.choices
    )
    return " ".join(commands.choices["convert"].format_help().split())


def test_defaults_are_documented_in_help():
    text = _convert_help()
    assert f"default {cli.DEFAULT_SAMPLES}, every calibration domain" in text
    assert f"(default {cli.DEFAULT_REFINE_STEPS} below full size" in text
    assert f"(default {cli.DEFAULT_DISTILL_STEPS}: off;" in text
    assert "0 turns refinement off" in text
    assert f"(default {cli.DEFAULT_DISTILL_LEARNING_RATE:g})" in text
    for domain in corpus.HELD_OUT_DOMAINS:
        assert domain in text


def test_quick_run_with_default_recipe(tiny_preset, tmp_path, capsys):
    report = _convert(
        capsys,
        tiny_preset,
        "--shared-key-dim",
        "8",
        "--output",
        str(tmp_path / "out"),
        "--samples",
        "16",
        "--sequence-length",
        "32",
    )
    assert report["refine_steps"] == cli.DEFAULT_REFINE_STEPS
    assert report["refine_objective"] == "attention"
    assert report["distill_steps"] == cli.DEFAULT_DISTILL_STEPS == 0
    assert report["distillation"] is None
    assert all("loss_after" in row for row in report["layers"])
    assert report["calibration_domains"] == list(corpus.CALIBRATION_DOMAINS)
    assert report["held_out_domains"] == list(corpus.HELD_OUT_DOMAINS)
    fidelity = report["fidelity"]
    per_domain = cli.HELD_OUT_TEXTS // len(corpus.HELD_OUT_DOMAINS)
    assert fidelity["texts"] == cli.HELD_OUT_TEXTS
    assert sorted(fidelity["domains"]) == sorted(corpus.HELD_OUT_DOMAINS)
    for measured in fidelity["domains"].values():
        assert measured["texts"] == per_domain
        assert 0.5 < measured["mean_cosine"] <= 1.0 + 1e-6
    # The text report names each held-out domain.
    lines = cli.format_report(report).splitlines()
    for domain in corpus.HELD_OUT_DOMAINS:
        assert any(f"{per_domain} {domain} texts" in line for line in lines)


def test_distillation_can_be_turned_on(tiny_preset, tmp_path, capsys):
    report = _convert(
        capsys,
        tiny_preset,
        "--shared-key-dim",
        "8",
        "--output",
        str(tmp_path / "out"),
        "--samples",
        "8",
        "--refine-steps",
        "0",
        "--distill-steps",
        "3",
        "--distill-learning-rate",
        "3e-4",
    )
    assert report["distillation"]["steps"] == 3
    assert report["distill_learning_rate"] == 3e-4
    assert report["distillation"]["trainable_parameters"] > 0


def test_training_can_be_turned_off(tiny_preset, tmp_path, capsys):
    report = _convert(
        capsys,
        tiny_preset,
        "--shared-key-dim",
        "8",
        "--output",
        str(tmp_path / "out"),
        "--samples",
        "8",
        "--refine-steps",
        "0",
        "--distill-steps",
        "0",
    )
    assert report["refine_steps"] == 0 and report["distill_steps"] == 0
    assert report["distillation"] is None
    assert not any("loss_after" in row for row in report["layers"])


@pytest.mark.parametrize("flag", [["--no-calibration"], []])
def test_nothing_to_train_means_no_default_training(
    tiny_preset, tmp_path, capsys, flag
):
    # Without data there is nothing to train on; at full size the conversion
    # is exact and there is nothing to train toward.
    dim = "8" if flag else "1.0"
    report = _convert(
        capsys,
        tiny_preset,
        "--shared-key-dim",
        dim,
        "--output",
        str(tmp_path / "out"),
        "--samples",
        "8",
        *flag,
    )
    assert report["refine_steps"] == 0 and report["distill_steps"] == 0
    if not flag:
        assert report["fidelity"]["min_cosine"] >= 0.99999


def test_bad_learning_rate_is_named(tiny_preset, tmp_path, capsys):
    code = cli.main(
        ["convert", tiny_preset, "--output", str(tmp_path / "out"),
         "--distill-learning-rate", "0"]
    )  # fmt: skip
    assert code != 0
    assert "--distill-learning-rate must be > 0" in capsys.readouterr().err


def test_help_names_the_corpus_split():
    assert cli.CALIBRATION_DOMAINS == corpus.CALIBRATION_DOMAINS
    assert cli.HELD_OUT_DOMAINS == corpus.HELD_OUT_DOMAINS
