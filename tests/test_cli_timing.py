"""The conversion report's time split (`conversion_stage_seconds`)."""

import json

import pytest

from keras_collab import cli
from keras_collab.conversion.progress import STAGES

pytest.importorskip("keras_hub")


def test_json_and_text_reports_split_the_conversion_time(
    tiny_preset, tmp_path, capsys
):
    output = str(tmp_path / "converted")
    argv = [
        "convert",
        tiny_preset,
        "--shared-key-dim",
        "8",
        "--output",
        output,
        "--samples",
        "16",
        "--sequence-length",
        "32",
        "--refine-steps",
        "1",
        "--distill-steps",
        "1",
    ]
    assert cli.main(argv + ["--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    times = report["conversion_stage_seconds"]
    assert list(times) == [*STAGES, "other", "total"]
    assert times["total"] == report["conversion_seconds"]
    parts = sum(value for name, value in times.items() if name != "total")
    assert parts == pytest.approx(times["total"], rel=1e-6)
    for stage in STAGES:
        assert times[stage] > 0.0, stage

    text = cli.format_report(report)
    line = next(row for row in text.splitlines() if "by stage:" in row)
    for stage in STAGES:
        assert f"{stage} {times[stage]:.1f} s" in line


def test_reports_without_a_split_still_format(tiny_preset, tmp_path, capsys):
    output = str(tmp_path / "converted")
    argv = [
        "convert",
        tiny_preset,
        "--shared-key-dim",
        "8",
        "--output",
        output,
        "--samples",
        "8",
        "--sequence-length",
        "32",
        "--json",
    ]
    assert cli.main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    del report["conversion_stage_seconds"]  # a report written before it
    assert "by stage" not in cli.format_report(report)
