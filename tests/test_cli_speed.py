"""`keras-collab convert`: the speed report and `--target-speedup`, on a
tiny preset. No timing value is asserted (the machine's load decides them):
what is tested is what the report holds and what is chosen or refused."""

import json
import os

import pytest

from keras_collab import cli
from tests.fixtures.presets import WORDS  # noqa: F401

pytest.importorskip("keras_hub")


def _convert(capsys, preset, output, *options):
    code = cli.main(
        [
            "convert",
            preset,
            "--output",
            str(output),
            "--no-calibration",
            "--sequence-length",
            "32",
            *options,
        ]
    )
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_report_has_the_measured_speed(tiny_preset, tmp_path, capsys):
    code, out, err = _convert(capsys, tiny_preset, tmp_path / "a", "--json")
    assert code == 0, err
    report = json.loads(out)
    assert report["shared_key_dim"] == 0.5  # the default D̃
    speed = report["speed"]
    assert (speed["batch_size"], speed["sequence_length"]) == (8, 32)
    assert speed["rounds"] == 5
    assert speed["source_ms"] > 0 and speed["converted_ms"] > 0
    assert speed["ratio"] == pytest.approx(
        speed["converted_ms"] / speed["source_ms"]
    )
    assert speed["faster"] == (speed["ratio"] < 1)
    assert report["speed_selection"] is None
    text = cli.format_report(report)
    assert "Speed (compiled predict on " in text
    assert f"{speed['ratio']:.2f}x the source's time" in text


def test_no_speed_leaves_it_out(tiny_preset, tmp_path, capsys):
    code, out, err = _convert(
        capsys, tiny_preset, tmp_path / "a", "--json", "--no-speed"
    )
    assert code == 0, err
    report = json.loads(out)
    assert report["speed"] is None
    assert "Speed" not in cli.format_report(report)


def test_target_speedup_picks_the_largest_candidate_that_meets_it(
    tiny_preset, tmp_path, capsys
):
    # Full size 16 (2 heads of 8): candidates 8, 4 and 12. Any model runs
    # at least 0.01x as fast as the source, so the largest, 12, meets the
    # target, and no smaller one is timed.
    code, out, err = _convert(
        capsys,
        tiny_preset,
        tmp_path / "a",
        "--json",
        "--target-speedup",
        "0.01",
        "--speed-candidates",
        "0.5,0.25,12",
    )
    assert code == 0, err
    report = json.loads(out)
    selection = report["speed_selection"]
    assert selection["chosen"] == 12 and report["shared_key_dim"] == 12
    assert [row["shared_key_dim"] for row in report["layers"]] == [12, 12]
    assert [row["shared_key_dim"] for row in selection["candidates"]] == [12]
    assert selection["ratio"] == selection["candidates"][0]["ratio"]
    assert selection["max_ratio"] == pytest.approx(100.0)
    assert report["speed"]["ratio"] > 0
    assert "chose D̃ = 12" in cli.format_report(report)


def test_impossible_target_speedup_is_refused(tiny_preset, tmp_path, capsys):
    output = tmp_path / "a"
    code, _, err = _convert(
        capsys,
        tiny_preset,
        output,
        "--target-speedup",
        "1000",
        "--speed-candidates",
        "0.5,0.25",
    )
    assert code == 2
    assert "No candidate D̃ runs 1000x as fast as the source" in err
    assert "D̃=0.5: " in err and "D̃=0.25: " in err
    assert not os.path.exists(output)


@pytest.mark.parametrize(
    "options, message",
    [
        (["--target-speedup", "0"], "--target-speedup must be > 0"),
        (
            ["--target-speedup", "1.5", "--shared-key-dim", "8"],
            "--shared-key-dim",
        ),
        (["--target-speedup", "1.5", "--no-speed"], "--no-speed"),
        (
            ["--target-speedup", "1.5", "--target-error", "0.1"],
            "--target-error",
        ),
        (
            ["--target-speedup", "1.5", "--speed-candidates", ""],
            "--speed-candidates needs",
        ),
    ],
)
def test_bad_speed_options_are_refused(
    tiny_preset, tmp_path, capsys, options, message
):
    code, _, err = _convert(capsys, tiny_preset, tmp_path / "a", *options)
    assert code == 2 and message in err


def test_bad_speed_candidate_is_a_usage_error(tiny_preset, tmp_path, capsys):
    with pytest.raises(SystemExit) as error:
        _convert(
            capsys,
            tiny_preset,
            tmp_path / "a",
            "--target-speedup",
            "1.5",
            "--speed-candidates",
            "0.5,abc",
        )
    assert error.value.code == 2
    assert "argument --speed-candidates" in capsys.readouterr().err
