import argparse
import subprocess

from benchmarks.harness.result_files import read_json
from benchmarks.suites import full_set


def _args(tmp_path, **kwargs):
    defaults = {
        "quick": False,
        "backend": "jax",
        "backend_all": False,
        "output_dir": str(tmp_path),
    }
    return argparse.Namespace(**{**defaults, **kwargs})


def test_suite_commands_pass_backend_output_and_quick(tmp_path):
    command = full_set.suite_command(
        "fidelity", _args(tmp_path, quick=True), "torch"
    )
    assert command[1:] == [
        "-m",
        "benchmarks",
        "fidelity",
        "--backend",
        "torch",
        "--output-dir",
        str(tmp_path),
        "--quick",
    ]
    every_backend = full_set.suite_command("training", _args(tmp_path), "all")
    assert "--backend-all" in every_backend
    assert "--backend" not in every_backend


def test_runs_every_suite_in_order_and_reports_failures(tmp_path, monkeypatch):
    ran = []

    def fake_run(command, env, check):
        suite = command[3]
        ran.append((suite, env["KERAS_BACKEND"]))
        status = 3 if suite == "training" else 0
        return subprocess.CompletedProcess(command, status)

    monkeypatch.setattr(full_set.subprocess, "run", fake_run)
    status = full_set.main(_args(tmp_path))

    assert status == 1
    assert ran == [(suite, "jax") for suite in full_set.SUITES]
    document = read_json(tmp_path / "all_jax.json")
    assert [row["suite"] for row in document["rows"]] == list(full_set.SUITES)
    assert [row["exit_status"] for row in document["rows"]] == [
        0,
        3,
        0,
        0,
        0,
    ]
    assert document["errors"] == [
        {"backend": "jax", "message": "training exited with status 3"}
    ]
    assert document["config"]["budget_s"] == 30 * 60
    summary = (tmp_path / "all_jax.md").read_text()
    assert "FAILED (3)" in summary
    assert "within the budget of 30 min" in summary
    assert (tmp_path / "all_jax.png").stat().st_size > 0


def test_quick_budget_is_three_minutes_per_suite(tmp_path, monkeypatch):
    monkeypatch.setattr(
        full_set.subprocess,
        "run",
        lambda command, env, check: subprocess.CompletedProcess(command, 0),
    )
    assert full_set.main(_args(tmp_path, quick=True)) == 0
    document = read_json(tmp_path / "all_jax.json")
    assert document["config"]["budget_s"] == 3 * 60 * len(full_set.SUITES)
    assert document["errors"] == []
